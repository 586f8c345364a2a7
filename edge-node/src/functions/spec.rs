//! Desired-state functions mapped onto the runtime's spec.

use std::collections::HashMap;
use std::time::Duration;

use device_runtime::{Limits, PointRef};
use protocols::DesiredState;

/// Maps a desired-state function onto the runtime's spec. `points` resolves
/// node-wide point indexes to (device, point name).
pub fn runtime_spec<S: std::hash::BuildHasher>(
    f: &protocols::FunctionSpec,
    points: &HashMap<u32, PointRef, S>,
) -> device_runtime::FunctionSpec {
    device_runtime::FunctionSpec {
        name: f.name.clone(),
        module_digest: f.module_sha256.clone(),
        config: guest_config(&f.config),
        points: f
            .inputs
            .iter()
            .map(|i| {
                points
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| PointRef::new("", i.to_string()))
            })
            .collect(),
        devices: f.granted_devices.iter().cloned().collect(),
        outputs: f.outputs.clone(),
        kv: true,
        models: f.granted_models.iter().cloned().collect(),
        limits: Limits {
            memory_bytes: f.limits.memory_bytes,
            fuel_per_call: Some(f.limits.fuel_per_call),
            epoch_deadline: Duration::from_millis(f.limits.deadline_ms),
            ..Limits::default()
        },
    }
}

/// The text a guest's `init` receives. The reference guests parse
/// `key=value;key=value`: a JSON object of scalars is rendered that way (keys
/// in order), a JSON string is passed verbatim, `null` as an empty string,
/// anything else as JSON text.
pub fn guest_config(v: &serde_json::Value) -> String {
    use serde_json::Value;
    fn scalar(v: &Value) -> String {
        match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Object(m) if m.values().all(|v| !v.is_object() && !v.is_array()) => m
            .iter()
            .map(|(k, v)| format!("{k}={}", scalar(v)))
            .collect::<Vec<_>>()
            .join(";"),
        other => other.to_string(),
    }
}
pub(super) fn point_names(d: &DesiredState) -> HashMap<u32, PointRef> {
    d.points()
        .map(|(dev, _, p)| (p.index, PointRef::new(&dev.id, &p.name)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_config_renders_key_values() {
        assert_eq!(
            guest_config(&serde_json::json!({"deadband": 0.5, "max_interval_ms": 1000})),
            "deadband=0.5;max_interval_ms=1000"
        );
        assert_eq!(guest_config(&serde_json::json!("deadband=2")), "deadband=2");
        assert_eq!(guest_config(&serde_json::Value::Null), "");
        assert_eq!(guest_config(&serde_json::json!({"a": [1]})), "{\"a\":[1]}");
    }
}
