//! A node as the control plane sees it: what the operator says about it
//! ([`Node`]: labels, annotations, paused) and what it says about itself
//! ([`NodeView`], derived from its reports by [`NodeView::derive`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::selector::{check_label_key, check_label_value};
use crate::reported::{FunctionState, ReportedState};
use crate::status::{NodeState, NodeStatus};
use crate::validate::{Collector, Path, ValidationErrors, check_name};

/// Longest annotation value, in bytes (annotations are free text for tools,
/// bounded so one node's record stays small).
pub const MAX_ANNOTATION_BYTES: usize = 4_096;

/// Most labels or annotations on one node.
pub const MAX_NODE_LABELS: usize = 64;

/// An edge node registered at the hub.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// The node's name (its MQTT topic level).
    pub name: String,
    /// Labels deployments select on.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Free-form notes for tools; never selected on.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Cordoned: rollouts skip the node (never fail it) until it is resumed.
    #[serde(default)]
    pub paused: bool,
}

impl Node {
    /// Checks name, label syntax and sizes. Errors name the field.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut c = Collector::new();
        let root = Path::Root;
        check_name(&mut c, &root.field("name"), &self.name);
        for (field, map) in [("labels", &self.labels), ("annotations", &self.annotations)] {
            let mp = root.field(field);
            if map.len() > MAX_NODE_LABELS {
                c.push(
                    &mp,
                    format!(
                        "{} entries, more than the limit of {MAX_NODE_LABELS}",
                        map.len()
                    ),
                );
            }
            for (k, v) in map {
                let kp = mp.field(k);
                check_label_key(&mut c, &kp, k);
                if field == "labels" {
                    check_label_value(&mut c, &kp, v);
                } else if v.len() > MAX_ANNOTATION_BYTES {
                    c.push(
                        &kp,
                        format!("{} bytes, more than {MAX_ANNOTATION_BYTES}", v.len()),
                    );
                }
            }
        }
        c.finish()
    }
}

/// What the hub knows about a node's health, derived from what it reported.
/// This is what health gates judge and what the planner reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NodeView {
    /// The node.
    pub name: String,
    /// The agent's broker session is up (its `status` says online).
    pub connected: bool,
    /// Cordoned by the operator (copied from [`Node::paused`]).
    pub paused: bool,
    /// Latest report or status, ms since epoch (0: never heard from).
    pub last_seen_ms: u64,
    /// Revision the hub last published to the node (0: none).
    pub desired_revision: u64,
    /// Revision the node says it applied (0: none).
    pub applied_revision: u64,
    /// Revision the node says it received and verified: its acknowledgement
    /// of a delivery (0: none, or a node that does not report it).
    #[serde(default)]
    pub received_revision: u64,
    /// Revision whose artifacts the node has on disk (0: none).
    #[serde(default)]
    pub staged_revision: u64,
    /// The last revision the node refused, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<(Option<u64>, String)>,
    /// Per-function health, by function name.
    pub functions: BTreeMap<String, FunctionHealth>,
    /// Devices whose driver is connected.
    pub devices_connected: u32,
    /// Devices the node reports on.
    pub devices_total: u32,
    /// Per stream, the hub's watermark: the highest sequence number made
    /// durable at the hub.
    pub watermarks: BTreeMap<String, u64>,
    /// Samples the node ever dropped by its overflow policy.
    pub dropped: u64,
}

/// One function's health in a [`NodeView`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FunctionHealth {
    /// sha256 of the module running.
    pub module_sha256: String,
    /// Running, backing off, failed, loading.
    pub state: FunctionState,
    /// Samples the function took in, ever (the node's `samples_in`).
    pub samples_in: u64,
    /// Samples it emitted, ever (`samples_out`).
    pub samples_out: u64,
    /// Calls that failed, ever (`errors`).
    pub errors: u64,
    /// Restarts after a trap, ever (`restarts`).
    pub restarts: u64,
    /// The node put the function back on its previous module by itself:
    /// why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<String>,
}

impl NodeView {
    /// Derives the view from the operator's record, the node's latest
    /// `reported` and `status` documents (if any arrived) and the hub's
    /// per-stream watermarks. Pure: the same inputs give the same view.
    pub fn derive(
        node: &Node,
        desired_revision: u64,
        reported: Option<&ReportedState>,
        status: Option<&NodeStatus>,
        watermarks: &BTreeMap<String, u64>,
    ) -> Self {
        let counter = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
        let functions = reported
            .map(|r| {
                r.functions
                    .iter()
                    .map(|(name, f)| {
                        let h = FunctionHealth {
                            module_sha256: f.module_sha256.clone(),
                            state: f.state,
                            samples_in: counter(&f.counters, "samples_in"),
                            samples_out: counter(&f.counters, "samples_out"),
                            errors: counter(&f.counters, "errors"),
                            restarts: counter(&f.counters, "restarts"),
                            rolled_back: f.rolled_back.as_ref().map(|r| {
                                format!(
                                    "the node rolled it back from {} to {}: {}",
                                    r.from_sha256, r.to_sha256, r.reason
                                )
                            }),
                        };
                        (name.clone(), h)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let last_seen_ms = reported
            .map(|r| r.at_ms)
            .into_iter()
            .chain(status.map(|s| s.at_ms))
            .max()
            .unwrap_or(0);
        Self {
            name: node.name.clone(),
            connected: status.is_some_and(|s| s.state == NodeState::Online),
            paused: node.paused,
            last_seen_ms,
            desired_revision,
            applied_revision: reported.map_or(0, |r| r.applied_revision),
            received_revision: reported.map_or(0, |r| r.received_revision),
            staged_revision: reported.map_or(0, |r| r.staged_revision),
            rejected: reported
                .and_then(|r| r.rejected.as_ref())
                .map(|r| (r.revision, r.reason.clone())),
            functions,
            devices_connected: reported.map_or(0, |r| {
                r.devices.values().filter(|d| d.connected).count() as u32
            }),
            devices_total: reported.map_or(0, |r| r.devices.len() as u32),
            watermarks: watermarks.clone(),
            dropped: reported.map_or(0, |r| r.backlog.dropped),
        }
    }

    /// Whether the node runs what the hub last sent it.
    pub fn converged(&self) -> bool {
        self.desired_revision != 0 && self.applied_revision >= self.desired_revision
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reported::{DeviceStatus, FunctionStatus};

    #[test]
    fn view_is_derived_from_reports() {
        let node = Node {
            name: "n1".into(),
            paused: true,
            ..Node::default()
        };
        let mut r = ReportedState {
            node: "n1".into(),
            applied_revision: 4,
            at_ms: 900,
            ..ReportedState::default()
        };
        r.functions.insert(
            "f".into(),
            FunctionStatus {
                module_sha256: "ab".into(),
                state: FunctionState::Backoff,
                last_error: None,
                counters: [("restarts".to_owned(), 3), ("samples_in".to_owned(), 10)]
                    .into_iter()
                    .collect(),
                rolled_back: None,
            },
        );
        r.devices.insert(
            "d1".into(),
            DeviceStatus {
                connected: true,
                ..DeviceStatus::default()
            },
        );
        r.devices.insert("d2".into(), DeviceStatus::default());
        r.backlog.dropped = 7;
        let s = NodeStatus {
            node: "n1".into(),
            state: NodeState::Online,
            at_ms: 1_000,
        };
        let wm = BTreeMap::from([("out".to_owned(), 42)]);
        let v = NodeView::derive(&node, 5, Some(&r), Some(&s), &wm);
        assert!(v.connected && v.paused);
        assert_eq!(v.last_seen_ms, 1_000);
        assert_eq!((v.desired_revision, v.applied_revision), (5, 4));
        assert!(!v.converged());
        assert_eq!(v.functions["f"].restarts, 3);
        assert_eq!(v.functions["f"].samples_in, 10);
        assert_eq!(v.functions["f"].state, FunctionState::Backoff);
        assert_eq!((v.devices_connected, v.devices_total), (1, 2));
        assert_eq!((v.watermarks["out"], v.dropped), (42, 7));
        let never = NodeView::derive(&node, 0, None, None, &BTreeMap::new());
        assert!(!never.connected && never.last_seen_ms == 0 && never.functions.is_empty());
    }

    #[test]
    fn node_validation_names_the_label() {
        let node = Node {
            name: "n/1".into(),
            labels: BTreeMap::from([
                ("site".into(), "lyon".into()),
                ("x".into(), "bad value".into()),
            ]),
            annotations: BTreeMap::from([("note".into(), "n".repeat(MAX_ANNOTATION_BYTES + 1))]),
            paused: false,
        };
        let e = node.validate().unwrap_err();
        let paths: Vec<&str> = e.errors().iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["name", "labels.x", "annotations.note"], "{e}");
    }
}
