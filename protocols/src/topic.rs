//! The MQTT topic scheme. No other crate formats topic strings.
//!
//! Every topic is `{root}/nodes/{node}/{kind}`; the root defaults to
//! [`Topics::DEFAULT_ROOT`] and is configurable so several fleets can share a
//! broker. Node names are validated with [`crate::validate::check_name`], so they
//! never contain `/`, `+` or `#`.

use std::fmt;

/// What a topic carries; the table in `ARCHITECTURE.md` (repository root)
/// lists direction, QoS and payload of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// hub → edge, QoS 1, retained: signed desired state.
    Desired,
    /// edge → hub, QoS 1, retained: reported state.
    Reported,
    /// edge → hub, QoS 1, retained, also the last will: online/offline.
    Status,
    /// edge → hub, QoS 1: telemetry batches (binary).
    Telemetry,
    /// hub → edge, QoS 1: cumulative acks.
    Ack,
    /// edge → hub, QoS 1: events.
    Events,
}

impl TopicKind {
    /// All kinds.
    pub const ALL: [Self; 6] = [
        Self::Desired,
        Self::Reported,
        Self::Status,
        Self::Telemetry,
        Self::Ack,
        Self::Events,
    ];

    /// The last topic level.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Desired => "desired",
            Self::Reported => "reported",
            Self::Status => "status",
            Self::Telemetry => "telemetry",
            Self::Ack => "ack",
            Self::Events => "events",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether messages of this kind are published retained.
    pub fn retained(self) -> bool {
        matches!(self, Self::Desired | Self::Reported | Self::Status)
    }
}

impl fmt::Display for TopicKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Builds and parses topics under one root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    root: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self::new(Self::DEFAULT_ROOT)
    }
}

impl Topics {
    /// `edgefleet/v1`.
    pub const DEFAULT_ROOT: &'static str = "edgefleet/v1";

    /// Topics under `root` (trailing slashes are ignored).
    pub fn new(root: &str) -> Self {
        Self {
            root: root.trim_end_matches('/').to_owned(),
        }
    }

    /// The root.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// `{root}/nodes/{node}/{kind}`.
    pub fn node(&self, node: &str, kind: TopicKind) -> String {
        format!("{}/nodes/{node}/{}", self.root, kind.as_str())
    }

    /// Subscription filter for one kind across all nodes: `{root}/nodes/+/{kind}`.
    pub fn all_nodes(&self, kind: TopicKind) -> String {
        format!("{}/nodes/+/{}", self.root, kind.as_str())
    }

    /// The same filter as an MQTT 5 / broker shared subscription, so several hub
    /// replicas split the load: `$share/{group}/{root}/nodes/+/{kind}`.
    pub fn shared_all_nodes(&self, group: &str, kind: TopicKind) -> String {
        format!("$share/{group}/{}", self.all_nodes(kind))
    }

    /// Splits a concrete topic into (node, kind); `None` if it is not ours.
    pub fn parse<'t>(&self, topic: &'t str) -> Option<(&'t str, TopicKind)> {
        let rest = topic
            .strip_prefix(self.root.as_str())?
            .strip_prefix("/nodes/")?;
        let (node, kind) = rest.split_once('/')?;
        if node.is_empty() || kind.contains('/') {
            return None;
        }
        Some((node, TopicKind::parse(kind)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_and_parse_round_trip() {
        let t = Topics::default();
        for kind in TopicKind::ALL {
            let s = t.node("press-7", kind);
            assert_eq!(s, format!("edgefleet/v1/nodes/press-7/{kind}"));
            assert_eq!(t.parse(&s), Some(("press-7", kind)));
        }
    }

    #[test]
    fn foreign_topics_are_not_parsed() {
        let t = Topics::new("plant/a/");
        assert_eq!(t.root(), "plant/a");
        assert_eq!(t.parse("edgefleet/v1/nodes/n/desired"), None);
        assert_eq!(t.parse("plant/a/nodes//desired"), None);
        assert_eq!(t.parse("plant/a/nodes/n/desired/x"), None);
        assert_eq!(t.parse("plant/a/nodes/n/bogus"), None);
        assert_eq!(t.parse("plant/a/nodes/n/ack"), Some(("n", TopicKind::Ack)));
        assert_eq!(
            t.all_nodes(TopicKind::Telemetry),
            "plant/a/nodes/+/telemetry"
        );
        assert_eq!(
            t.shared_all_nodes("hub", TopicKind::Telemetry),
            "$share/hub/plant/a/nodes/+/telemetry"
        );
    }
}
