//! What a new desired state means for the functions, decided without a
//! runtime: which to start, reload, keep, keep on their previous version,
//! wait for, stop and forget, and why.
//!
//! [`plan`] is pure (no wasmtime, no I/O: whether an artifact is on disk is
//! asked through the `available` closure); `FunctionHost::reconcile` applies
//! the [`Plan`] to the runtime and records what the runtime did.
//!
//! # Invariants
//! - A desired function whose module or a granted model is not available
//!   keeps running its loaded version ([`Action::KeepPrevious`]); without
//!   one it waits ([`Action::Wait`]), its input stays buffered.
//! - Every desired function appears once in [`Plan::functions`], in desired
//!   order; every slot desired state no longer names is in exactly one of
//!   [`Plan::stop`] (loaded) or [`Plan::forget`] (not loaded).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use device_runtime::PointRef;
use protocols::DesiredState;

use super::slots::Slot;
use super::spec::{point_names, runtime_spec};

/// What to do with every function for one desired state.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Plan {
    /// Model name -> digest for the `models` capability: the previous
    /// revision's models, overridden by the desired ones.
    pub(super) models: HashMap<String, String>,
    /// Node-wide point index -> (device, point name) of the desired devices.
    pub(super) points: HashMap<u32, PointRef>,
    /// One entry per desired function, in desired order.
    pub(super) functions: Vec<FunctionPlan>,
    /// Loaded functions desired state no longer names: they are left out of
    /// the runtime's specs, so it flushes and removes them.
    pub(super) stop: Vec<String>,
    /// Functions desired state no longer names that are not loaded: they are
    /// forgotten, their buffered input goes raw.
    pub(super) forget: Vec<String>,
}

/// The decision for one desired function.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct FunctionPlan {
    /// What desired state asks for.
    pub(super) desired: protocols::FunctionSpec,
    /// The function is new or desired state changed it: earlier load errors
    /// no longer apply and are cleared.
    pub(super) changed: bool,
    /// What to run and why.
    pub(super) action: Action,
}

/// A runtime spec to hand to `apply`, with the node-wide indexes of its points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Run {
    /// The spec.
    pub(super) spec: device_runtime::FunctionSpec,
    /// Node-wide point index of each of the spec's points, in order.
    pub(super) inputs: Vec<u32>,
}

/// What happens to one desired function, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Action {
    /// Not loaded; its module and models are here: load it.
    Start(Run),
    /// Loaded with a different spec (module, config, points, grants, limits)
    /// and the new one is ready: the runtime hot-swaps it.
    Reload(Run),
    /// Loaded with exactly this spec (e.g. only the revision changed): the
    /// runtime keeps the instance.
    Keep(Run),
    /// The new version's artifacts are not here yet: the loaded version keeps
    /// running.
    KeepPrevious {
        /// The loaded spec, requested again.
        run: Run,
        /// Digests still missing (module and/or models).
        missing: Vec<String>,
    },
    /// Not loaded and its artifacts are not here yet: nothing runs; input
    /// stays buffered until they arrive.
    Wait {
        /// Digests still missing (module and/or models).
        missing: Vec<String>,
    },
}

impl FunctionPlan {
    /// The spec to request from the runtime, if any.
    pub(super) fn run(&self) -> Option<&Run> {
        match &self.action {
            Action::Start(run)
            | Action::Reload(run)
            | Action::Keep(run)
            | Action::KeepPrevious { run, .. } => Some(run),
            Action::Wait { .. } => None,
        }
    }
}

/// Decides what each function does under `desired`, given the host's
/// `slots` (what was desired and what is loaded), the `previous` desired
/// state (its models stay readable) and `available(digest)`: whether an
/// artifact is downloaded.
pub(super) fn plan(
    desired: &DesiredState,
    previous: Option<&DesiredState>,
    slots: &BTreeMap<String, Slot>,
    available: impl Fn(&str) -> bool,
) -> Plan {
    let points = point_names(desired);
    let models = previous
        .iter()
        .flat_map(|p| p.models.iter())
        .chain(&desired.models)
        .map(|m| (m.name.clone(), m.sha256.clone()))
        .collect();
    let functions = desired
        .functions
        .iter()
        .map(|f| {
            let slot = slots.get(&f.name);
            let loaded = slot.and_then(|s| s.loaded.as_ref());
            let missing = missing(f, desired, &available);
            let action = if missing.is_empty() {
                let run = Run {
                    spec: runtime_spec(f, &points),
                    inputs: f.inputs.clone(),
                };
                match loaded {
                    None => Action::Start(run),
                    Some((spec, inputs)) if *spec == run.spec && *inputs == run.inputs => {
                        Action::Keep(run)
                    }
                    Some(_) => Action::Reload(run),
                }
            } else if let Some((spec, inputs)) = loaded {
                Action::KeepPrevious {
                    run: Run {
                        spec: spec.clone(),
                        inputs: inputs.clone(),
                    },
                    missing,
                }
            } else {
                Action::Wait { missing }
            };
            FunctionPlan {
                desired: f.clone(),
                changed: slot.and_then(|s| s.desired.as_ref()) != Some(f),
                action,
            }
        })
        .collect();
    let wanted: BTreeSet<&str> = desired.functions.iter().map(|f| f.name.as_str()).collect();
    let (stop, forget) = slots
        .iter()
        .filter(|(name, _)| !wanted.contains(name.as_str()))
        .partition::<Vec<_>, _>(|(_, s)| s.loaded.is_some());
    let names = |v: Vec<(&String, &Slot)>| v.into_iter().map(|(n, _)| n.clone()).collect();
    Plan {
        models,
        points,
        functions,
        stop: names(stop),
        forget: names(forget),
    }
}

/// Digests `f` needs that are not available: its module, then the granted
/// models desired state names (a grant of a model it does not name needs
/// nothing).
fn missing(
    f: &protocols::FunctionSpec,
    desired: &DesiredState,
    available: impl Fn(&str) -> bool,
) -> Vec<String> {
    let models = f
        .granted_models
        .iter()
        .filter_map(|m| desired.models.iter().find(|r| &r.name == m))
        .map(|r| &r.sha256);
    std::iter::once(&f.module_sha256)
        .chain(models)
        .filter(|d| !available(d))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOD_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const MOD_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const MODEL_1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const MODEL_2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    /// Desired state with one synthetic device (points 0..3) and `functions`.
    fn desired(revision: u64, functions: serde_json::Value) -> DesiredState {
        let pts: Vec<_> = (0..3)
            .map(|i| {
                serde_json::json!({"index": i, "name": format!("p{i}"),
                    "address": {"kind": "synthetic", "signal": {"shape": "sine", "amplitude": 1.0, "period_s": 1.0}}})
            })
            .collect();
        let mut doc = serde_json::json!({
            "node": "n1",
            "revision": revision,
            "devices": [{"id": "gen", "protocol": {"kind": "synthetic"},
                         "groups": [{"name": "g", "interval_ms": 100, "points": pts}]}],
            "models": [{"name": "m", "sha256": MODEL_1, "size": 10}],
        });
        doc["functions"] = functions;
        let d: DesiredState = serde_json::from_value(doc).unwrap();
        d.validate().unwrap();
        d
    }

    fn function(name: &str, module: &str, config: &str, inputs: &[u32]) -> serde_json::Value {
        serde_json::json!({"name": name, "module_sha256": module, "module_size": 1,
                           "config": config, "inputs": inputs, "outputs": ["out"]})
    }

    /// The host's slots after all of `d`'s functions were loaded.
    fn loaded(d: &DesiredState) -> BTreeMap<String, Slot> {
        let points = point_names(d);
        d.functions
            .iter()
            .map(|f| {
                let slot = Slot {
                    desired: Some(f.clone()),
                    loaded: Some((runtime_spec(f, &points), f.inputs.clone())),
                    ..Slot::default()
                };
                (f.name.clone(), slot)
            })
            .collect()
    }

    fn all(_: &str) -> bool {
        true
    }

    fn only<'a>(here: &'a [&'a str]) -> impl Fn(&str) -> bool + 'a {
        move |d| here.contains(&d)
    }

    fn action<'a>(p: &'a Plan, name: &str) -> &'a Action {
        &p.functions
            .iter()
            .find(|f| f.desired.name == name)
            .unwrap()
            .action
    }

    #[test]
    fn a_new_function_whose_module_is_here_starts() {
        let d = desired(1, serde_json::json!([function("f", MOD_A, "x=1", &[0, 1])]));
        let p = plan(&d, None, &BTreeMap::new(), all);
        assert_eq!(p.functions.len(), 1);
        assert!(p.functions[0].changed);
        let Action::Start(run) = action(&p, "f") else {
            panic!("{p:?}");
        };
        assert_eq!(run.inputs, vec![0, 1]);
        assert_eq!(run.spec.module_digest, MOD_A);
        assert_eq!(run.spec.config, "x=1");
        assert_eq!(
            run.spec.points,
            vec![PointRef::new("gen", "p0"), PointRef::new("gen", "p1")]
        );
        assert!(p.stop.is_empty() && p.forget.is_empty());
    }

    #[test]
    fn a_new_function_waits_for_its_module() {
        let d = desired(1, serde_json::json!([function("f", MOD_A, "", &[0])]));
        let p = plan(&d, None, &BTreeMap::new(), only(&[MODEL_1]));
        assert_eq!(
            action(&p, "f"),
            &Action::Wait {
                missing: vec![MOD_A.to_owned()]
            }
        );
        assert!(p.functions[0].run().is_none());
    }

    #[test]
    fn a_function_waits_for_a_granted_model_but_not_for_an_unnamed_one() {
        let mut f = function("f", MOD_A, "", &[0]);
        f["granted_models"] = serde_json::json!(["m"]);
        let mut g = function("g", MOD_A, "", &[1]);
        g["granted_models"] = serde_json::json!(["not-in-desired"]);
        let mut d = desired(1, serde_json::json!([f]));
        // Validation refuses such a grant; the plan still does not wait for it.
        d.functions.push(serde_json::from_value(g).unwrap());
        let p = plan(&d, None, &BTreeMap::new(), only(&[MOD_A]));
        assert_eq!(
            action(&p, "f"),
            &Action::Wait {
                missing: vec![MODEL_1.to_owned()]
            }
        );
        assert!(matches!(action(&p, "g"), Action::Start(_)));
    }

    #[test]
    fn an_unchanged_function_keeps_its_instance_across_a_revision_bump() {
        let d1 = desired(1, serde_json::json!([function("f", MOD_A, "x=1", &[0])]));
        let d2 = desired(2, serde_json::json!([function("f", MOD_A, "x=1", &[0])]));
        let slots = loaded(&d1);
        let p = plan(&d2, Some(&d1), &slots, all);
        let Action::Keep(run) = action(&p, "f") else {
            panic!("{p:?}");
        };
        assert_eq!(
            Some(run.spec.clone()),
            slots["f"].loaded.clone().map(|l| l.0)
        );
        assert!(!p.functions[0].changed);
    }

    #[test]
    fn a_changed_config_or_inputs_reloads() {
        let d1 = desired(
            1,
            serde_json::json!([
                function("f", MOD_A, "x=1", &[0]),
                function("g", MOD_A, "", &[1])
            ]),
        );
        let d2 = desired(
            2,
            serde_json::json!([
                function("f", MOD_A, "x=2", &[0]),
                function("g", MOD_A, "", &[1, 2])
            ]),
        );
        let p = plan(&d2, Some(&d1), &loaded(&d1), all);
        let Action::Reload(f) = action(&p, "f") else {
            panic!("{p:?}");
        };
        assert_eq!(f.spec.config, "x=2");
        let Action::Reload(g) = action(&p, "g") else {
            panic!("{p:?}");
        };
        assert_eq!(g.inputs, vec![1, 2]);
        assert!(p.functions.iter().all(|f| f.changed));
    }

    #[test]
    fn a_new_module_reloads_once_it_is_here() {
        let d1 = desired(1, serde_json::json!([function("f", MOD_A, "", &[0])]));
        let d2 = desired(2, serde_json::json!([function("f", MOD_B, "", &[0])]));
        let p = plan(&d2, Some(&d1), &loaded(&d1), all);
        let Action::Reload(run) = action(&p, "f") else {
            panic!("{p:?}");
        };
        assert_eq!(run.spec.module_digest, MOD_B);
    }

    #[test]
    fn the_previous_version_keeps_running_while_the_new_module_downloads() {
        let d1 = desired(1, serde_json::json!([function("f", MOD_A, "x=1", &[0])]));
        let d2 = desired(2, serde_json::json!([function("f", MOD_B, "x=2", &[0, 1])]));
        let slots = loaded(&d1);
        let p = plan(&d2, Some(&d1), &slots, only(&[MOD_A, MODEL_1]));
        let Action::KeepPrevious { run, missing } = action(&p, "f") else {
            panic!("{p:?}");
        };
        assert_eq!(missing, &vec![MOD_B.to_owned()]);
        assert_eq!(run.spec.module_digest, MOD_A);
        assert_eq!(run.spec.config, "x=1");
        assert_eq!(run.inputs, vec![0]);
        assert!(p.functions[0].changed);
    }

    #[test]
    fn a_function_that_failed_to_load_is_retried_without_clearing_its_error() {
        let d = desired(1, serde_json::json!([function("f", MOD_A, "", &[0])]));
        let slots = BTreeMap::from([(
            "f".to_owned(),
            Slot {
                desired: Some(d.functions[0].clone()),
                load_failed: true,
                last_error: Some("bad module".into()),
                ..Slot::default()
            },
        )]);
        let p = plan(&d, None, &slots, all);
        assert!(matches!(action(&p, "f"), Action::Start(_)));
        assert!(!p.functions[0].changed);
    }

    #[test]
    fn removed_functions_stop_if_loaded_and_are_forgotten_otherwise() {
        let d1 = desired(
            1,
            serde_json::json!([
                function("a", MOD_A, "", &[0]),
                function("b", MOD_A, "", &[1]),
                function("waiting", MOD_B, "", &[2]),
            ]),
        );
        let mut slots = loaded(&d1);
        slots.get_mut("waiting").unwrap().loaded = None;
        let d2 = desired(2, serde_json::json!([function("b", MOD_A, "", &[1])]));
        let p = plan(&d2, Some(&d1), &slots, all);
        assert_eq!(p.stop, vec!["a".to_owned()]);
        assert_eq!(p.forget, vec!["waiting".to_owned()]);
        assert_eq!(p.functions.len(), 1);
        assert!(matches!(action(&p, "b"), Action::Keep(_)));
    }

    #[test]
    fn models_of_the_previous_revision_stay_readable_and_desired_ones_win() {
        let mut prev = desired(1, serde_json::json!([]));
        prev.models = vec![
            protocols::ModelRef {
                name: "m".into(),
                sha256: MODEL_2.into(),
                size: 1,
            },
            protocols::ModelRef {
                name: "old".into(),
                sha256: MODEL_2.into(),
                size: 1,
            },
        ];
        let d = desired(2, serde_json::json!([]));
        let p = plan(&d, Some(&prev), &BTreeMap::new(), all);
        assert_eq!(
            p.models,
            HashMap::from([
                ("m".to_owned(), MODEL_1.to_owned()),
                ("old".to_owned(), MODEL_2.to_owned()),
            ])
        );
        assert_eq!(p.points.get(&2), Some(&PointRef::new("gen", "p2")));
    }

    #[test]
    fn functions_keep_desired_order() {
        let d = desired(
            1,
            serde_json::json!([
                function("z", MOD_A, "", &[0]),
                function("a", MOD_B, "", &[1])
            ]),
        );
        let p = plan(&d, None, &BTreeMap::new(), only(&[MOD_A]));
        let names: Vec<_> = p
            .functions
            .iter()
            .map(|f| f.desired.name.as_str())
            .collect();
        assert_eq!(names, ["z", "a"]);
        let runs: Vec<_> = p
            .functions
            .iter()
            .filter_map(FunctionPlan::run)
            .map(|r| r.spec.name.as_str())
            .collect();
        assert_eq!(runs, ["z"]);
    }
}
