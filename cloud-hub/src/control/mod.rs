//! The control plane of the standalone hub: node labels, deployments, and
//! the desired document each node gets rendered from them.
//!
//! The model and the merge are pure and live in [`protocols::control`];
//! this module stores them (sled trees `control_nodes`,
//! `control_deployments`, `control_rendered` in the hub database), checks a
//! change against every node it affects before storing it ([`change`]),
//! and publishes rendered documents through [`crate::Hub::set_desired`]
//! (hub-assigned revision, signed, durable). Routes are in [`api`].
//!
//! # Which nodes the control plane manages
//! A node enters the control plane when its labels are PUT
//! (`PUT /v1/nodes/{node}/labels`, even with no label). Nodes that were
//! never labelled are not selected by any deployment, not even by `{}`: a
//! hub upgraded to deployments never takes over nodes operators still
//! manage by hand.
//!
//! # Ownership: deployments own the nodes they select
//! A node that at least one deployment selects gets its desired document
//! from rendering only; `PUT /v1/nodes/{node}/desired` to it is refused with
//! 409 naming the deployments. The alternative, "last writer wins", would
//! let a hand-written document silently undo a deployment until the next
//! unrelated change re-rendered the node, and a rollout could not tell which
//! revision it owns. Refusing is the safer choice: the operator either
//! changes the node's labels or the deployment, and both are audited.
//!
//! # Rendering
//! - When a deployment is put or deleted, every node its old or new
//!   selector matches is re-rendered; when a node's labels change, only that
//!   node is.
//! - Every affected node is rendered *before* anything is stored: a
//!   same-priority conflict (409 naming both deployments and the item) or a
//!   merged document that does not validate (400 naming the field and the
//!   deployment it came from) refuses the change whole. The stored set of
//!   deployments therefore always renders every managed node.
//! - A node's document is signed and published only when the rendered
//!   content digest differs from the last one published for it (kept in
//!   `control_rendered`, so a restart changes nothing), or when someone else
//!   published a revision meanwhile. An unchanged render never bumps the
//!   revision.
//! - A node that no deployment selects any more keeps its last document:
//!   "selected by nothing" never means "run nothing". Its record shows no
//!   contributing deployment, and hand PUTs are accepted again.
//! - A paused (cordoned) node is checked like any other but not published
//!   to; PUT its labels with `paused: false` to render it again.
//! - At start the hub re-renders every managed node ([`reconcile`]) so a
//!   crash between storing a change and publishing it heals itself.
//!
//! # Rollouts
//! A put with `"rollout": {…}` does not publish the new revision to every
//! node: it pins every selected node on what it runs and starts a rollout
//! that the loop in [`rollouts`] moves node by node, wave by wave, gated on
//! what the nodes report. Routes are in [`rollout_api`]. A put without
//! `rollout` is applied at once (and supersedes a running rollout).

pub mod api;
pub mod change;
pub mod rollout_api;
pub mod rollouts;
pub mod store;

pub use change::{ChangeError, reconcile};
pub use store::{Control, RenderedRecord, StoreError};
