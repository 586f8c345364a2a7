//! The control plane as data: nodes, deployments targeted by label
//! selectors, rollouts, rendering and the rollout planner.
//!
//! Shared by the standalone hub (sled) and Kubernetes mode (CRDs): no I/O,
//! no clock (callers pass `now_ms`), no randomness.
//!
//! Where to start:
//! - [`node`]: [`Node`] (labels, annotations, paused) and [`NodeView`], the
//!   health view derived from a node's reports.
//! - [`selector`]: [`LabelSelector`] with Kubernetes semantics; an invalid
//!   selector is an error, never "matches nothing" or "matches everything".
//! - [`deployment`]: [`Deployment`], a selector, a priority and a
//!   [`Template`] of desired-state items.
//! - [`rollout`]: [`RolloutSpec`], [`RolloutStatus`] (bounded) and the
//!   per-node [`RolloutProgress`] map.
//! - [`gate`]: the health verdict of one node after its bake.
//! - [`planner`]: the pure rollout planner — [`plan`] the next actions,
//!   [`apply`] them once performed, [`observe`] what the fleet says,
//!   [`command`] pause/resume/cancel/supersede.
//! - [`render`](mod@render): one node's merged content from every deployment that
//!   selects it, by priority per named item, with a content digest.
//!
//! # Invariants
//! - Validation errors name the field path (`rollout.strategy.waves[2]`).
//! - Status objects are bounded whatever the fleet size; per-node data lives
//!   in maps the hub stores per node.

pub mod deployment;
pub mod gate;
pub mod node;
pub mod planner;
pub mod render;
pub mod rollout;
pub mod selector;

pub use deployment::{Deployment, NodeConfigPatch, Template};
pub use gate::{HealthVerdict, early, judge};
pub use node::{FunctionHealth, Node, NodeView};
pub use planner::{
    Action, Command, CommandError, Folded, Observation, apply, command, observe, plan, tick,
    wave_sizes,
};
pub use render::{ItemKind, MergeConflict, RenderError, Rendered, Renderer, render};
pub use rollout::{
    AbortCriterion, FailureKind, FailureRecord, HealthGate, NodeProgress, NodeRolloutState,
    OfflinePolicy, OnAbort, RolloutCounts, RolloutPhase, RolloutProgress, RolloutSpec,
    RolloutStatus, Strategy, WaveSize,
};
pub use selector::{CompiledSelector, LabelSelector, SelectorOperator, SelectorRequirement};
