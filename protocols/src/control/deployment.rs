//! Deployments: a label selector, a priority and a template fragment of
//! desired state that every selected node gets.
//!
//! A template reuses the item types of [`crate::desired`]: functions,
//! devices, models, and node-config overrides ([`NodeConfigPatch`], one item
//! per key). Several deployments may select one node; [`render`](fn@super::render)
//! merges them by priority per named item.

use std::collections::BTreeSet;

use serde::{Deserialize, Deserializer, Serialize};

use super::selector::LabelSelector;
use crate::desired::{FunctionSpec, ModelRef, NodeConfig};
use crate::device::Device;
use crate::validate::{Collector, Path, ValidationErrors, check_name};

/// Priorities are in this range (higher wins).
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -1_000_000..=1_000_000;

/// A named group of desired-state items, sent to every node its selector
/// matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    /// Unique at the hub; `[A-Za-z0-9._-]{1,64}`.
    pub name: String,
    /// Which nodes get the template. Required: `{}` selects every node.
    pub selector: LabelSelector,
    /// When two deployments give one node the same item, the higher
    /// priority wins; the same priority is a conflict.
    #[serde(default)]
    pub priority: i32,
    /// What selected nodes get.
    #[serde(default)]
    pub template: Template,
}

/// A fragment of desired state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// Functions, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub functions: Vec<FunctionSpec>,
    /// Devices, by id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<Device>,
    /// Models, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelRef>,
    /// Node-config keys this deployment sets.
    #[serde(default, skip_serializing_if = "NodeConfigPatch::is_empty")]
    pub config: NodeConfigPatch,
}

/// Node-config overrides: each `Some` field is one item of the merge, keyed
/// by its field name; unset keys keep [`NodeConfig::default`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NodeConfigPatch {
    /// Overrides [`NodeConfig::batch_max_samples`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_max_samples: Option<u32>,
    /// Overrides [`NodeConfig::batch_max_age_ms`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_max_age_ms: Option<u64>,
    /// Overrides [`NodeConfig::report_interval_ms`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_interval_ms: Option<u64>,
    /// Overrides [`NodeConfig::raw_stream`]: absent leaves it, `null` turns
    /// the raw stream off, a string names it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub raw_stream: Option<Option<String>>,
}

/// A present field (even `null`) is `Some`; an absent one is the `default`.
#[expect(
    clippy::option_option,
    reason = "decodes NodeConfigPatch::raw_stream, whose null differs from absent"
)]
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// Names of the node-config keys, as items of the merge.
pub const CONFIG_KEYS: [&str; 4] = [
    "batch_max_samples",
    "batch_max_age_ms",
    "report_interval_ms",
    "raw_stream",
];

impl NodeConfigPatch {
    /// Sets nothing.
    pub fn is_empty(&self) -> bool {
        self.keys().is_empty()
    }

    /// The keys this patch sets, in [`CONFIG_KEYS`] order.
    pub fn keys(&self) -> Vec<&'static str> {
        let set = [
            self.batch_max_samples.is_some(),
            self.batch_max_age_ms.is_some(),
            self.report_interval_ms.is_some(),
            self.raw_stream.is_some(),
        ];
        CONFIG_KEYS
            .iter()
            .zip(set)
            .filter_map(|(k, s)| s.then_some(*k))
            .collect()
    }

    /// Copies the value of `key` (if this patch sets it) into `config`.
    pub fn apply_key(&self, key: &str, config: &mut NodeConfig) {
        match key {
            "batch_max_samples" => {
                if let Some(v) = self.batch_max_samples {
                    config.batch_max_samples = v;
                }
            }
            "batch_max_age_ms" => {
                if let Some(v) = self.batch_max_age_ms {
                    config.batch_max_age_ms = v;
                }
            }
            "report_interval_ms" => {
                if let Some(v) = self.report_interval_ms {
                    config.report_interval_ms = v;
                }
            }
            "raw_stream" => {
                if let Some(v) = &self.raw_stream {
                    config.raw_stream.clone_from(v);
                }
            }
            _ => {}
        }
    }
}

impl Deployment {
    /// Checks the name, priority, selector and that each item name appears
    /// once. Item contents (digests, addresses, ranges) are checked on the
    /// rendered document of each node by [`crate::DesiredState::validate`],
    /// where items from several deployments meet.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut c = Collector::new();
        let root = Path::Root;
        check_name(&mut c, &root.field("name"), &self.name);
        if !PRIORITY_RANGE.contains(&self.priority) {
            c.push(
                &root.field("priority"),
                format!(
                    "{} is out of range {}..={}",
                    self.priority,
                    PRIORITY_RANGE.start(),
                    PRIORITY_RANGE.end()
                ),
            );
        }
        self.selector.validate_at(&mut c, &root.field("selector"));
        let t = root.field("template");
        let f: Vec<&str> = self
            .template
            .functions
            .iter()
            .map(|x| x.name.as_str())
            .collect();
        let d: Vec<&str> = self
            .template
            .devices
            .iter()
            .map(|x| x.id.as_str())
            .collect();
        let m: Vec<&str> = self
            .template
            .models
            .iter()
            .map(|x| x.name.as_str())
            .collect();
        for (field, key, names) in [
            ("functions", "name", f),
            ("devices", "id", d),
            ("models", "name", m),
        ] {
            let list = t.field(field);
            let mut seen = BTreeSet::new();
            for (i, name) in names.into_iter().enumerate() {
                let ip = list.index(i);
                let np = ip.field(key);
                check_name(&mut c, &np, name);
                if !seen.insert(name) {
                    c.push(&np, format!("{name:?} appears twice in this template"));
                }
            }
        }
        c.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_stream_override_tells_absent_from_null() {
        let p: NodeConfigPatch = serde_json::from_str("{}").unwrap();
        assert_eq!(p.raw_stream, None);
        let p: NodeConfigPatch = serde_json::from_str(r#"{"raw_stream":null}"#).unwrap();
        assert_eq!(p.raw_stream, Some(None));
        assert_eq!(serde_json::to_string(&p).unwrap(), r#"{"raw_stream":null}"#);
        let p: NodeConfigPatch =
            serde_json::from_str(r#"{"raw_stream":"r","batch_max_age_ms":5}"#).unwrap();
        assert_eq!(p.keys(), ["batch_max_age_ms", "raw_stream"]);
        let mut cfg = NodeConfig::default();
        for k in p.keys() {
            p.apply_key(k, &mut cfg);
        }
        assert_eq!(
            (cfg.batch_max_age_ms, cfg.raw_stream.as_deref()),
            (5, Some("r"))
        );
    }

    #[test]
    fn deployment_validation_names_fields() {
        let json = r#"{"name":"d 1","priority":2000000,
            "selector":{"match_labels":{"site":"-x"}},
            "template":{"models":[{"name":"m","sha256":"00","size":1},{"name":"m","sha256":"00","size":1}]}}"#;
        let d: Deployment = serde_json::from_str(json).unwrap();
        let e = d.validate().unwrap_err();
        let paths: Vec<&str> = e.errors().iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "name",
                "priority",
                "selector.match_labels.site",
                "template.models[1].name"
            ],
            "{e}"
        );
        assert!(
            serde_json::from_str::<Deployment>(r#"{"name":"d"}"#).is_err(),
            "selector is required"
        );
    }
}
