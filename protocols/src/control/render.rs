//! Rendering: one node's desired content from every deployment that
//! selects it.
//!
//! Every deployment whose selector matches the node's labels contributes its
//! template. Items merge per named item — a function by name, a device by
//! id, a model by name, a node-config key by key — and the highest priority
//! wins the whole item. Two deployments giving the same item at the highest
//! priority is a [`MergeConflict`] naming both and the item.
//!
//! # Invariants
//! - Deterministic: the output lists are sorted by name and do not depend
//!   on the order of the deployments, so [`Rendered::digest`] changes only
//!   when the content does; the hub bumps a node's revision only then.
//! - A selector that cannot be evaluated renders nothing: the error is
//!   returned and the caller keeps the node's previous document. An
//!   unevaluable selector never means "this node is not selected".
//! - The merged content passes [`DesiredState::validate`]; errors say which
//!   deployment the offending item came from.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::deployment::Deployment;
use super::node::Node;
use super::selector::CompiledSelector;
use crate::desired::{DesiredState, FunctionSpec, ModelRef, NodeConfig};
use crate::device::Device;
use crate::validate::{FieldError, ValidationErrors};

/// One node's merged content.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Rendered {
    /// Functions, sorted by name.
    pub functions: Vec<FunctionSpec>,
    /// Devices, sorted by id.
    pub devices: Vec<Device>,
    /// Models, sorted by name.
    pub models: Vec<ModelRef>,
    /// Node config: defaults with the winning overrides.
    pub config: NodeConfig,
    /// Which deployment each item came from, keyed `functions/NAME`,
    /// `devices/ID`, `models/NAME`, `config/KEY`. Not part of the digest.
    #[serde(skip)]
    pub sources: BTreeMap<String, String>,
}

/// The kinds of items that merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ItemKind {
    /// A function, by name.
    Function,
    /// A device, by id.
    Device,
    /// A model, by name.
    Model,
    /// A node-config key.
    ConfigKey,
}

impl fmt::Display for ItemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Function => "function",
            Self::Device => "device",
            Self::Model => "model",
            Self::ConfigKey => "config key",
        })
    }
}

/// Two deployments give one node the same item at the same (highest)
/// priority.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{kind} {item:?} is set by deployments {first:?} and {second:?}, both at priority {priority}"
)]
pub struct MergeConflict {
    /// What kind of item.
    pub kind: ItemKind,
    /// Its name.
    pub item: String,
    /// One deployment (the first by name).
    pub first: String,
    /// The other.
    pub second: String,
    /// Their shared priority.
    pub priority: i32,
}

/// Why a node could not be rendered. The caller keeps its previous document.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RenderError {
    /// A deployment's selector (or the deployment) is invalid, so whether it
    /// selects the node is unknown.
    #[error("deployment {deployment:?} cannot be evaluated: {errors}")]
    InvalidDeployment {
        /// The deployment.
        deployment: String,
        /// What is wrong with it.
        errors: ValidationErrors,
    },
    /// Two deployments have the same name.
    #[error("deployment name {0:?} is used twice")]
    DuplicateDeployment(String),
    /// Same item, same priority, two deployments.
    #[error(transparent)]
    Conflict(#[from] MergeConflict),
    /// The merged document does not validate.
    #[error("node {node:?}: the merged document is invalid: {}", attributed(.errors))]
    Invalid {
        /// The node.
        node: String,
        /// Each error with the deployment its item came from.
        errors: Vec<(FieldError, Option<String>)>,
    },
}

fn attributed(errors: &[(FieldError, Option<String>)]) -> String {
    let parts: Vec<String> = errors
        .iter()
        .map(|(e, d)| match d {
            Some(d) => format!("{} (from deployment {d:?}): {}", e.path, e.message),
            None => e.to_string(),
        })
        .collect();
    parts.join("; ")
}

/// Deployments with their selectors compiled once, to render many nodes.
#[derive(Debug)]
pub struct Renderer<'a> {
    deployments: Vec<(&'a Deployment, CompiledSelector)>,
}

/// Renders one node from `deployments` (see [`Renderer`] for many nodes).
pub fn render(node: &Node, deployments: &[Deployment]) -> Result<Rendered, RenderError> {
    Renderer::new(deployments)?.render(node)
}

impl<'a> Renderer<'a> {
    /// Validates every deployment and compiles its selector. Any invalid
    /// deployment is an error: no node can be rendered until it is fixed.
    pub fn new(deployments: &'a [Deployment]) -> Result<Self, RenderError> {
        let mut sorted: Vec<&Deployment> = deployments.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = sorted.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(RenderError::DuplicateDeployment(w[0].name.clone()));
        }
        let mut out = Vec::with_capacity(sorted.len());
        for d in sorted {
            let invalid = |errors| RenderError::InvalidDeployment {
                deployment: d.name.clone(),
                errors,
            };
            d.validate().map_err(invalid)?;
            out.push((d, d.selector.compile().map_err(invalid)?));
        }
        Ok(Self { deployments: out })
    }

    /// The deployments that select `node`, by name.
    pub fn selecting(&self, node: &Node) -> Vec<&'a Deployment> {
        self.deployments
            .iter()
            .filter(|(_, s)| s.matches(&node.labels))
            .map(|(d, _)| *d)
            .collect()
    }

    /// Merges every deployment that selects `node`.
    pub fn render(&self, node: &Node) -> Result<Rendered, RenderError> {
        let selected = self.selecting(node);
        let mut sources = BTreeMap::new();
        let functions = merge(&selected, ItemKind::Function, &mut sources, |d| {
            d.template
                .functions
                .iter()
                .map(|f| (f.name.clone(), f))
                .collect()
        })?;
        let devices = merge(&selected, ItemKind::Device, &mut sources, |d| {
            d.template
                .devices
                .iter()
                .map(|x| (x.id.clone(), x))
                .collect()
        })?;
        let models = merge(&selected, ItemKind::Model, &mut sources, |d| {
            d.template
                .models
                .iter()
                .map(|m| (m.name.clone(), m))
                .collect()
        })?;
        let patches = merge(&selected, ItemKind::ConfigKey, &mut sources, |d| {
            d.template
                .config
                .keys()
                .into_iter()
                .map(|k| (k.to_owned(), &d.template.config))
                .collect()
        })?;
        let mut config = NodeConfig::default();
        for (key, patch) in patches {
            patch.apply_key(&key, &mut config);
        }
        let rendered = Rendered {
            functions: functions.into_iter().map(|(_, f)| f.clone()).collect(),
            devices: devices.into_iter().map(|(_, d)| d.clone()).collect(),
            models: models.into_iter().map(|(_, m)| m.clone()).collect(),
            config,
            sources,
        };
        rendered.check(&node.name)?;
        Ok(rendered)
    }
}

/// Merges one kind of item: per name, the highest priority wins; two at the
/// highest is a conflict. Returns the winners sorted by name and records
/// where each came from in `sources`.
fn merge<'a, T>(
    selected: &[&'a Deployment],
    kind: ItemKind,
    sources: &mut BTreeMap<String, String>,
    items: impl Fn(&'a Deployment) -> Vec<(String, &'a T)>,
) -> Result<Vec<(String, &'a T)>, MergeConflict> {
    let mut best: BTreeMap<String, (i32, &'a Deployment, &'a T, Option<&'a Deployment>)> =
        BTreeMap::new();
    for d in selected {
        for (name, item) in items(d) {
            match best.get_mut(&name) {
                Some(b) if b.0 > d.priority => {}
                Some(b) if b.0 == d.priority => b.3 = b.3.or(Some(d)),
                _ => {
                    best.insert(name, (d.priority, d, item, None));
                }
            }
        }
    }
    let prefix = match kind {
        ItemKind::Function => "functions",
        ItemKind::Device => "devices",
        ItemKind::Model => "models",
        ItemKind::ConfigKey => "config",
    };
    let mut out = Vec::with_capacity(best.len());
    for (name, (priority, d, item, tie)) in best {
        if let Some(other) = tie {
            return Err(MergeConflict {
                kind,
                item: name,
                first: d.name.clone(),
                second: other.name.clone(),
                priority,
            });
        }
        sources.insert(format!("{prefix}/{name}"), d.name.clone());
        out.push((name, item));
    }
    Ok(out)
}

impl Rendered {
    /// The desired-state document for `node` at `revision`.
    pub fn to_desired(&self, node: &str, revision: u64) -> DesiredState {
        DesiredState {
            node: node.to_owned(),
            revision,
            functions: self.functions.clone(),
            devices: self.devices.clone(),
            models: self.models.clone(),
            config: self.config.clone(),
        }
    }

    /// sha256 (lower-case hex) of the content: functions, devices, models
    /// and config in their canonical JSON form. Equal content, equal digest,
    /// whatever the deployments' order or which deployment gave an item.
    #[expect(
        clippy::expect_used,
        reason = "serializing these types to a Vec cannot fail: every map has string keys and nothing is a custom serializer"
    )]
    pub fn digest(&self) -> String {
        let bytes = serde_json::to_vec(self).expect("plain data serializes");
        hex::encode(Sha256::digest(&bytes))
    }

    fn check(&self, node: &str) -> Result<(), RenderError> {
        let Err(errors) = self.to_desired(node, 1).validate() else {
            return Ok(());
        };
        let errors = errors
            .0
            .into_iter()
            .map(|e| {
                let from = self.source_of(&e.path).cloned();
                (e, from)
            })
            .collect();
        Err(RenderError::Invalid {
            node: node.to_owned(),
            errors,
        })
    }

    /// The deployment the item at `path` (`functions[2].inputs[0]`) came from.
    fn source_of(&self, path: &str) -> Option<&String> {
        let (list, rest) = path.split_once('[')?;
        let index: usize = rest.split_once(']')?.0.parse().ok()?;
        let name = match list {
            "functions" => self.functions.get(index).map(|f| f.name.as_str()),
            "devices" => self.devices.get(index).map(|d| d.id.as_str()),
            "models" => self.models.get(index).map(|m| m.name.as_str()),
            _ => None,
        }?;
        self.sources.get(&format!("{list}/{name}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(c: char) -> String {
        c.to_string().repeat(64)
    }

    fn function(name: &str, digest: char, inputs: &[u32]) -> serde_json::Value {
        serde_json::json!({"name": name, "module_sha256": sha(digest), "module_size": 10,
            "inputs": inputs, "outputs": [format!("{name}-out")]})
    }

    fn device(id: &str, index: u32) -> serde_json::Value {
        serde_json::json!({"id": id, "protocol": {"kind": "modbus-tcp", "host": "h"},
            "groups": [{"name": "g", "interval_ms": 100, "points": [
                {"index": index, "name": "p", "address": {"kind": "modbus", "table": "holding", "address": 1}}]}]})
    }

    fn deployment(
        name: &str,
        priority: i32,
        site: Option<&str>,
        template: &serde_json::Value,
    ) -> Deployment {
        let selector = match site {
            Some(s) => serde_json::json!({"match_labels": {"site": s}}),
            None => serde_json::json!({}),
        };
        serde_json::from_value(serde_json::json!({
            "name": name, "priority": priority, "selector": selector, "template": template}))
        .unwrap()
    }

    fn node(site: &str) -> Node {
        Node {
            name: "n1".into(),
            labels: BTreeMap::from([("site".to_owned(), site.to_owned())]),
            ..Node::default()
        }
    }

    #[test]
    fn higher_priority_wins_per_item_and_output_is_sorted() {
        let base = deployment(
            "base",
            0,
            None,
            &serde_json::json!({
            "functions": [function("zeta", 'a', &[1]), function("alpha", 'a', &[])],
            "devices": [device("plc", 1)],
            "config": {"batch_max_samples": 10, "raw_stream": null}}),
        );
        let lyon = deployment(
            "lyon",
            5,
            Some("lyon"),
            &serde_json::json!({
            "functions": [function("zeta", 'b', &[1])],
            "config": {"batch_max_samples": 20}}),
        );
        let turin = deployment(
            "turin",
            9,
            Some("turin"),
            &serde_json::json!({
            "functions": [function("zeta", 'c', &[1])]}),
        );
        let r = render(&node("lyon"), &[turin, lyon, base]).unwrap();
        let names: Vec<&str> = r.functions.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["alpha", "zeta"]);
        assert_eq!(r.functions[1].module_sha256, sha('b'));
        assert_eq!(r.sources["functions/zeta"], "lyon");
        assert_eq!(r.sources["functions/alpha"], "base");
        assert_eq!(r.sources["config/batch_max_samples"], "lyon");
        assert_eq!(r.config.batch_max_samples, 20);
        assert_eq!(r.config.raw_stream, None);
        assert_eq!(
            r.config.report_interval_ms,
            NodeConfig::default().report_interval_ms
        );
        let d = r.to_desired("n1", 3);
        assert_eq!((d.revision, d.functions.len(), d.devices.len()), (3, 2, 1));
    }

    #[test]
    fn same_priority_is_a_conflict_naming_both_unless_a_higher_one_owns_the_item() {
        let a = deployment(
            "a",
            1,
            None,
            &serde_json::json!({"models": [{"name": "m", "sha256": sha('1'), "size": 1}]}),
        );
        let b = deployment(
            "b",
            1,
            None,
            &serde_json::json!({"models": [{"name": "m", "sha256": sha('2'), "size": 1}]}),
        );
        let e = render(&node("x"), &[b.clone(), a.clone()]).unwrap_err();
        assert_eq!(
            e,
            RenderError::Conflict(MergeConflict {
                kind: ItemKind::Model,
                item: "m".into(),
                first: "a".into(),
                second: "b".into(),
                priority: 1
            })
        );
        assert_eq!(
            e.to_string(),
            r#"model "m" is set by deployments "a" and "b", both at priority 1"#
        );
        let c = deployment(
            "c",
            2,
            None,
            &serde_json::json!({"models": [{"name": "m", "sha256": sha('3'), "size": 1}]}),
        );
        let r = render(&node("x"), &[a.clone(), b.clone(), c]).unwrap();
        assert_eq!(r.models[0].sha256, sha('3'));
        let off = deployment(
            "b",
            1,
            Some("elsewhere"),
            &serde_json::json!({"models": [{"name": "m", "sha256": sha('2'), "size": 1}]}),
        );
        assert_eq!(
            render(&node("x"), &[a, off]).unwrap().sources["models/m"],
            "a"
        );
    }

    #[test]
    fn digest_follows_content_only() {
        let a = deployment(
            "a",
            0,
            None,
            &serde_json::json!({"functions": [function("f", 'a', &[])]}),
        );
        let b = deployment(
            "b",
            0,
            None,
            &serde_json::json!({"functions": [function("g", 'a', &[])]}),
        );
        let d1 = render(&node("x"), &[a.clone(), b.clone()])
            .unwrap()
            .digest();
        let d2 = render(&node("x"), &[b.clone(), a.clone()])
            .unwrap()
            .digest();
        assert_eq!(d1, d2);
        assert_eq!(d1.len(), 64);
        let both = deployment(
            "c",
            0,
            None,
            &serde_json::json!({"functions": [function("f", 'a', &[]), function("g", 'a', &[])]}),
        );
        assert_eq!(
            render(&node("x"), &[both]).unwrap().digest(),
            d1,
            "moving an item between deployments changes nothing"
        );
        let changed = deployment(
            "a",
            0,
            None,
            &serde_json::json!({"functions": [function("f", 'b', &[])]}),
        );
        assert_ne!(render(&node("x"), &[changed, b]).unwrap().digest(), d1);
    }

    #[test]
    fn an_invalid_deployment_renders_nothing() {
        let ok = deployment("ok", 0, None, &serde_json::json!({}));
        let mut bad = deployment("bad", 0, Some("lyon"), &serde_json::json!({}));
        bad.selector
            .match_labels
            .insert("site".into(), "not valid!".into());
        let e = render(&node("turin"), &[ok.clone(), bad]).unwrap_err();
        assert!(
            matches!(&e, RenderError::InvalidDeployment { deployment, .. } if deployment == "bad"),
            "{e}"
        );
        assert!(e.to_string().contains("match_labels.site"), "{e}");
        assert_eq!(
            render(&node("x"), &[ok.clone(), ok]).unwrap_err(),
            RenderError::DuplicateDeployment("ok".into())
        );
    }

    #[test]
    fn merged_document_is_validated_and_errors_name_the_deployment() {
        let dev = deployment(
            "devices",
            0,
            None,
            &serde_json::json!({"devices": [device("plc", 1)]}),
        );
        let f = deployment(
            "fns",
            0,
            None,
            &serde_json::json!({"functions": [function("f", 'a', &[1, 2])]}),
        );
        render(
            &node("x"),
            &[
                dev.clone(),
                deployment(
                    "g",
                    0,
                    None,
                    &serde_json::json!({"functions": [function("f", 'a', &[1])]}),
                ),
            ],
        )
        .unwrap();
        let e = render(&node("x"), &[dev.clone(), f]).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"node "n1": the merged document is invalid: functions[0].inputs[1] (from deployment "fns"): point index 2 is not defined by any device"#
        );
        let clash = deployment(
            "more",
            0,
            None,
            &serde_json::json!({"devices": [device("plc2", 1)]}),
        );
        let e = render(&node("x"), &[dev, clash]).unwrap_err().to_string();
        assert!(
            e.contains("devices[1].groups[0].points[0].index (from deployment \"more\")"),
            "{e}"
        );
    }
}
