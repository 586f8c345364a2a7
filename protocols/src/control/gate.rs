//! Health gates judged on real signals: what a node reported when it
//! applied a revision (the baseline) against what it reports after the bake.

use super::node::NodeView;
use super::rollout::HealthGate;
use crate::desired::FunctionSpec;
use crate::reported::FunctionState;

/// The outcome of judging one node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "verdict", rename_all = "snake_case", deny_unknown_fields)]
pub enum HealthVerdict {
    /// Every check passed.
    Healthy,
    /// A check failed; `reason` says which and by how much.
    Unhealthy {
        /// For people, e.g. `function "f": restarted 2 times during the bake`.
        reason: String,
    },
}

/// Judges `now` against `baseline` for the functions the revision changed:
/// each runs the new module, is `running`, did not restart; its output
/// streams advanced at the hub (if the gate asks); the node's drop rate and
/// the functions' error rate stay within the gate's bounds. The first
/// failed check is the reason.
pub fn judge(
    gate: &HealthGate,
    baseline: &NodeView,
    now: &NodeView,
    changed: &[FunctionSpec],
) -> HealthVerdict {
    match first_failure(gate, baseline, now, changed) {
        None => HealthVerdict::Healthy,
        Some(reason) => HealthVerdict::Unhealthy { reason },
    }
}

/// A failure that need not wait for the bake to end: a changed function
/// the node rolled back by itself, one that failed to load, or one that
/// trapped (restarted) since the baseline. `None` while nothing of that
/// kind happened.
pub fn early(
    baseline: &NodeView,
    now: &NodeView,
    changed: &[FunctionSpec],
) -> Option<HealthVerdict> {
    changed.iter().find_map(|f| {
        let h = now.functions.get(&f.name)?;
        let reason = if let Some(why) = &h.rolled_back {
            format!("function {:?}: {why}", f.name)
        } else if h.state == FunctionState::Failed {
            format!("function {:?} failed on the node", f.name)
        } else {
            let before = baseline.functions.get(&f.name).map_or(0, |b| b.restarts);
            let restarts = h.restarts.saturating_sub(before);
            if restarts == 0 {
                return None;
            }
            format!(
                "function {:?} restarted {restarts} times during the bake",
                f.name
            )
        };
        Some(HealthVerdict::Unhealthy { reason })
    })
}

fn first_failure(
    gate: &HealthGate,
    baseline: &NodeView,
    now: &NodeView,
    changed: &[FunctionSpec],
) -> Option<String> {
    let (mut calls, mut errors) = (0u64, 0u64);
    for f in changed {
        let Some(h) = now.functions.get(&f.name) else {
            return Some(format!("function {:?} is not reported by the node", f.name));
        };
        if let Some(why) = &h.rolled_back {
            return Some(format!("function {:?}: {why}", f.name));
        }
        if h.module_sha256 != f.module_sha256 {
            return Some(format!(
                "function {:?} runs module {} instead of {}",
                f.name, h.module_sha256, f.module_sha256
            ));
        }
        if h.state != FunctionState::Running {
            return Some(format!(
                "function {:?} is {:?}, not running",
                f.name, h.state
            ));
        }
        let before = baseline.functions.get(&f.name).cloned().unwrap_or_default();
        let restarts = h.restarts.saturating_sub(before.restarts);
        if restarts > 0 {
            return Some(format!(
                "function {:?} restarted {restarts} times during the bake",
                f.name
            ));
        }
        calls += h.samples_in.saturating_sub(before.samples_in);
        errors += h.errors.saturating_sub(before.errors);
        if gate.require_streams_advance {
            for s in &f.outputs {
                let b = baseline.watermarks.get(s).copied().unwrap_or(0);
                let n = now.watermarks.get(s).copied().unwrap_or(0);
                if n <= b {
                    return Some(format!(
                        "stream {s:?} of function {:?} did not advance at the hub (watermark {n})",
                        f.name
                    ));
                }
            }
        }
    }
    let dropped = now.dropped.saturating_sub(baseline.dropped);
    rate_check("error rate", errors, calls.max(errors), gate.max_error_rate)
        .or_else(|| rate_check("drop rate", dropped, calls.max(dropped), gate.max_drop_rate))
}

fn rate_check(what: &str, bad: u64, total: u64, max: f64) -> Option<String> {
    if bad == 0 || total == 0 {
        return None;
    }
    let rate = bad as f64 / total as f64;
    (rate > max).then(|| format!("{what} {rate:.4} ({bad} of {total}) is above {max}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::node::FunctionHealth;

    fn spec() -> FunctionSpec {
        FunctionSpec {
            name: "f".into(),
            module_sha256: "aa".into(),
            module_size: 1,
            config: serde_json::Value::Null,
            inputs: vec![],
            granted_devices: vec![],
            granted_models: vec![],
            outputs: vec!["out".into()],
            limits: crate::desired::FunctionLimits::default(),
        }
    }

    fn view(restarts: u64, samples_in: u64, errors: u64, wm: u64, dropped: u64) -> NodeView {
        let mut v = NodeView {
            name: "n".into(),
            dropped,
            ..NodeView::default()
        };
        v.functions.insert(
            "f".into(),
            FunctionHealth {
                module_sha256: "aa".into(),
                state: FunctionState::Running,
                samples_in,
                samples_out: 0,
                errors,
                restarts,
                rolled_back: None,
            },
        );
        v.watermarks.insert("out".into(), wm);
        v
    }

    fn reason(v: HealthVerdict) -> String {
        match v {
            HealthVerdict::Healthy => String::new(),
            HealthVerdict::Unhealthy { reason } => reason,
        }
    }

    #[test]
    fn each_signal_can_fail_the_gate() {
        let g = HealthGate::default();
        let base = view(1, 100, 0, 10, 0);
        assert_eq!(
            judge(&g, &base, &view(1, 1_100, 5, 20, 3), &[spec()]),
            HealthVerdict::Healthy
        );
        assert!(
            reason(judge(&g, &base, &view(2, 1_100, 0, 20, 0), &[spec()]))
                .contains("restarted 1 times")
        );
        assert!(
            reason(judge(&g, &base, &view(1, 1_100, 0, 10, 0), &[spec()]))
                .contains("did not advance")
        );
        assert!(
            reason(judge(&g, &base, &view(1, 1_100, 50, 20, 0), &[spec()])).contains("error rate")
        );
        assert!(
            reason(judge(&g, &base, &view(1, 1_100, 0, 20, 500), &[spec()])).contains("drop rate")
        );
        let mut other = view(1, 1_100, 0, 20, 0);
        other.functions.get_mut("f").unwrap().module_sha256 = "bb".into();
        assert!(reason(judge(&g, &base, &other, &[spec()])).contains("instead of aa"));
        other.functions.get_mut("f").unwrap().state = FunctionState::Backoff;
        assert!(!reason(judge(&g, &base, &other, &[spec()])).is_empty());
        other.functions.clear();
        assert!(reason(judge(&g, &base, &other, &[spec()])).contains("not reported"));
        assert_eq!(early(&base, &view(1, 1_100, 0, 20, 0), &[spec()]), None);
        assert!(
            early(&base, &view(3, 1_100, 0, 20, 0), &[spec()])
                .is_some_and(|v| reason(v).contains("restarted 2 times"))
        );
        let mut back = view(1, 1_100, 0, 20, 0);
        back.functions.get_mut("f").unwrap().rolled_back = Some("trap".into());
        assert!(early(&base, &back, &[spec()]).is_some_and(|v| reason(v).contains("trap")));
        assert!(reason(judge(&g, &base, &back, &[spec()])).contains("trap"));
        let lax = HealthGate {
            require_streams_advance: false,
            ..g
        };
        assert_eq!(
            judge(&lax, &base, &view(1, 1_100, 0, 10, 0), &[spec()]),
            HealthVerdict::Healthy
        );
    }
}
