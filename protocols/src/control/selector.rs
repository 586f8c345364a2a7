//! Label selectors with Kubernetes `matchLabels` / `matchExpressions`
//! semantics.
//!
//! A [`LabelSelector`] is data; [`LabelSelector::compile`] checks it and
//! returns a [`CompiledSelector`] that can only answer yes or no. There is no
//! third answer: a selector that fails validation never "matches nothing" or
//! "matches everything" — it is an error, and the caller changes nothing.
//!
//! Semantics (as in Kubernetes `metav1.LabelSelector`):
//! - every `match_labels` entry and every expression must hold (AND);
//! - `in`: the label is present and its value is one of `values`;
//! - `not-in`: the label is absent, or its value is none of `values`;
//! - `exists` / `does-not-exist`: the key is present / absent (`values` empty);
//! - an empty selector (`{}`) selects every node. Deployments make the field
//!   required, so "every node" is always written on purpose.
//!
//! Keys are `[prefix/]name`: the name 1..=63 characters of `[A-Za-z0-9._-]`
//! starting and ending alphanumeric, the optional prefix a DNS subdomain of
//! at most 253 characters. Values are empty or follow the name rule.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::validate::{Collector, Path, ValidationErrors};

/// Which nodes a deployment targets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LabelSelector {
    /// Labels that must be present with exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Further requirements, all of which must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<SelectorRequirement>,
}

/// One `match_expressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SelectorRequirement {
    /// The label key.
    pub key: String,
    /// How the key's value is tested.
    pub operator: SelectorOperator,
    /// Values for `in` / `not-in` (non-empty); empty for `exists` /
    /// `does-not-exist`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// A `match_expressions` operator. On the wire `in`, `not-in`, `exists`,
/// `does-not-exist`; the Kubernetes spellings (`In`, `NotIn`, `Exists`,
/// `DoesNotExist`) are accepted too, so a CRD's selector decodes unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum SelectorOperator {
    /// The value is one of `values`.
    #[serde(alias = "In")]
    In,
    /// The label is absent or its value is none of `values`.
    #[serde(alias = "NotIn")]
    NotIn,
    /// The key is present.
    #[serde(alias = "Exists")]
    Exists,
    /// The key is absent.
    #[serde(alias = "DoesNotExist")]
    DoesNotExist,
}

/// A selector that passed validation; it can only say yes or no.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledSelector {
    reqs: Vec<(String, Test)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Test {
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// A selector that needs every label of `labels`.
    pub fn match_labels<K: Into<String>, V: Into<String>>(
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            match_labels: labels
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            match_expressions: Vec::new(),
        }
    }

    /// Records every problem of this selector under `path`.
    pub fn validate_at(&self, c: &mut Collector, path: &Path<'_>) {
        let ml = path.field("match_labels");
        for (k, v) in &self.match_labels {
            let kp = ml.field(k);
            check_label_key(c, &kp, k);
            check_label_value(c, &kp, v);
        }
        let me = path.field("match_expressions");
        for (i, r) in self.match_expressions.iter().enumerate() {
            let rp = me.index(i);
            check_label_key(c, &rp.field("key"), &r.key);
            let vp = rp.field("values");
            match r.operator {
                SelectorOperator::In | SelectorOperator::NotIn => {
                    if r.values.is_empty() {
                        c.push(&vp, "`in` and `not-in` need at least one value");
                    }
                }
                SelectorOperator::Exists | SelectorOperator::DoesNotExist => {
                    if !r.values.is_empty() {
                        c.push(&vp, "`exists` and `does-not-exist` take no values");
                    }
                }
            }
            for (vi, v) in r.values.iter().enumerate() {
                check_label_value(c, &vp.index(vi), v);
            }
        }
    }

    /// Validates the selector and returns its matcher.
    pub fn compile(&self) -> Result<CompiledSelector, ValidationErrors> {
        let mut c = Collector::new();
        self.validate_at(&mut c, &Path::Root);
        c.finish()?;
        let mut reqs: Vec<(String, Test)> = self
            .match_labels
            .iter()
            .map(|(k, v)| (k.clone(), Test::In(BTreeSet::from([v.clone()]))))
            .collect();
        for r in &self.match_expressions {
            let values = || r.values.iter().cloned().collect();
            let test = match r.operator {
                SelectorOperator::In => Test::In(values()),
                SelectorOperator::NotIn => Test::NotIn(values()),
                SelectorOperator::Exists => Test::Exists,
                SelectorOperator::DoesNotExist => Test::DoesNotExist,
            };
            reqs.push((r.key.clone(), test));
        }
        Ok(CompiledSelector { reqs })
    }

    /// Validates, then evaluates against `labels`.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> Result<bool, ValidationErrors> {
        Ok(self.compile()?.matches(labels))
    }
}

impl CompiledSelector {
    /// Whether a node with these labels is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.reqs.iter().all(|(key, test)| {
            let value = labels.get(key);
            match test {
                Test::In(set) => value.is_some_and(|v| set.contains(v)),
                Test::NotIn(set) => value.is_none_or(|v| !set.contains(v)),
                Test::Exists => value.is_some(),
                Test::DoesNotExist => value.is_none(),
            }
        })
    }
}

/// Whether `s` is a label name: 1..=63 of `[A-Za-z0-9._-]`, alphanumeric at
/// both ends.
fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, b'.' | b'_' | b'-'))
}

/// Whether `s` is a DNS subdomain (RFC 1123, lower case, ≤ 253 characters).
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || *ch == b'-')
        })
}

/// Records an error unless `key` is a Kubernetes label key (`[prefix/]name`).
pub fn check_label_key(c: &mut Collector, path: &Path<'_>, key: &str) {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && !is_dns_subdomain(p)
    {
        c.push(
            path,
            format!("label key {key:?}: prefix {p:?} is not a lower-case DNS subdomain of at most 253 characters"),
        );
    }
    if !is_label_name(name) {
        c.push(
            path,
            format!("label key {key:?}: name {name:?} must be 1..=63 characters of A-Z a-z 0-9 . _ -, beginning and ending with a letter or digit"),
        );
    }
}

/// Records an error unless `value` is a Kubernetes label value (empty, or
/// like a label name).
pub fn check_label_value(c: &mut Collector, path: &Path<'_>, value: &str) {
    if !value.is_empty() && !is_label_name(value) {
        c.push(
            path,
            format!("label value {value:?} must be empty or 1..=63 characters of A-Z a-z 0-9 . _ -, beginning and ending with a letter or digit"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn req(key: &str, operator: SelectorOperator, values: &[&str]) -> SelectorRequirement {
        SelectorRequirement {
            key: key.to_owned(),
            operator,
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        }
    }

    #[test]
    fn operators_follow_kubernetes() {
        let node = labels(&[("site", "lyon"), ("tier", "canary")]);
        let bare = labels(&[]);
        let cases = [
            (
                req("site", SelectorOperator::In, &["lyon", "turin"]),
                true,
                false,
            ),
            (req("site", SelectorOperator::In, &["turin"]), false, false),
            (req("site", SelectorOperator::NotIn, &["turin"]), true, true),
            (req("site", SelectorOperator::NotIn, &["lyon"]), false, true),
            (req("tier", SelectorOperator::Exists, &[]), true, false),
            (
                req("tier", SelectorOperator::DoesNotExist, &[]),
                false,
                true,
            ),
        ];
        for (r, on_node, on_bare) in cases {
            let s = LabelSelector {
                match_labels: BTreeMap::new(),
                match_expressions: vec![r.clone()],
            };
            assert_eq!(s.matches(&node).unwrap(), on_node, "{r:?}");
            assert_eq!(s.matches(&bare).unwrap(), on_bare, "{r:?}");
        }
    }

    #[test]
    fn match_labels_and_expressions_are_anded_and_empty_selects_all() {
        let mut s = LabelSelector::match_labels([("site", "lyon")]);
        s.match_expressions
            .push(req("tier", SelectorOperator::DoesNotExist, &[]));
        assert!(s.matches(&labels(&[("site", "lyon")])).unwrap());
        assert!(
            !s.matches(&labels(&[("site", "lyon"), ("tier", "x")]))
                .unwrap()
        );
        assert!(!s.matches(&labels(&[("site", "turin")])).unwrap());
        assert!(LabelSelector::default().matches(&labels(&[])).unwrap());
    }

    #[test]
    fn an_invalid_selector_is_an_error_naming_the_field_never_a_match() {
        let s = LabelSelector {
            match_labels: labels(&[("bad key!", "v")]),
            match_expressions: vec![
                req("ok", SelectorOperator::In, &[]),
                req("ok", SelectorOperator::Exists, &["x"]),
                req("Example.com/ok", SelectorOperator::In, &["-bad"]),
            ],
        };
        let e = s.matches(&labels(&[])).unwrap_err();
        let paths: Vec<&str> = e.errors().iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "match_labels.bad key!",
                "match_expressions[0].values",
                "match_expressions[1].values",
                "match_expressions[2].key",
                "match_expressions[2].values[0]",
            ],
            "{e}"
        );
    }

    #[test]
    fn label_syntax_matches_kubernetes() {
        let key_ok = |k: &str| {
            let mut c = Collector::new();
            check_label_key(&mut c, &Path::Root, k);
            c.finish().is_ok()
        };
        for good in [
            "a",
            "app.kubernetes.io/name",
            "edgefleet.io/site",
            "A_b-9.z",
        ] {
            assert!(key_ok(good), "{good}");
        }
        let long = "x".repeat(64);
        for bad in ["", "-a", "a-", "a/b/c", "/a", "UPPER.io/a", &long, "a b"] {
            assert!(!key_ok(bad), "{bad}");
        }
        let mut c = Collector::new();
        check_label_value(&mut c, &Path::Root, "");
        check_label_value(&mut c, &Path::Root, "v1.2_x");
        assert!(c.finish().is_ok());
    }

    #[test]
    fn kubernetes_operator_spellings_decode() {
        let s: LabelSelector = serde_json::from_str(
            r#"{"match_expressions":[{"key":"a","operator":"NotIn","values":["x"]},{"key":"b","operator":"does-not-exist"}]}"#,
        )
        .unwrap();
        assert_eq!(s.match_expressions[0].operator, SelectorOperator::NotIn);
        assert_eq!(
            s.match_expressions[1].operator,
            SelectorOperator::DoesNotExist
        );
        assert!(serde_json::from_str::<LabelSelector>(r#"{"matchLabels":{}}"#).is_err());
    }
}
