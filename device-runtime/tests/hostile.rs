//! One test per hostile fixture: the host survives, the error is the right
//! one, and a well-behaved function loaded beside it keeps running.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    reason = "test code: failing loudly is the point; signal sizes are small"
)]

mod common;

use std::time::Duration;

use common::*;
use device_runtime::memory::{DeviceAccess, MemoryCapabilities};
use device_runtime::{
    CallError, DeviceRuntime, FunctionSpec, FunctionState, LoadError, RuntimeEvent, digest_hex,
};

/// Loads a passthrough bystander and checks it still processes a batch.
fn load_bystander(rt: &mut DeviceRuntime) {
    let bytes = fixture("passthrough");
    rt.load(spec("bystander", &bytes, ""), &bytes, 0).unwrap();
}

fn assert_bystander_runs(rt: &mut DeviceRuntime, now_ms: u64) {
    let input = series(100, 10, |i| i as f64);
    let out = rt.process("bystander", &input, now_ms).unwrap();
    assert_eq!(
        out0(&out),
        input,
        "bystander must pass its batch through unchanged"
    );
}

fn crashed_events(rt: &mut DeviceRuntime, name: &str) -> usize {
    rt.drain_events()
        .iter()
        .filter(|e| matches!(e, RuntimeEvent::Crashed { function, .. } if function == name))
        .count()
}

#[test]
fn infinite_loop_runs_out_of_fuel() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime(&caps);
    load_bystander(&mut rt);
    let bytes = fixture("infinite_loop");
    let mut s = spec("looper", &bytes, "");
    s.limits.fuel_per_call = Some(5_000_000);
    s.limits.epoch_deadline = Duration::from_mins(1);
    rt.load(s, &bytes, 0).unwrap();

    let err = rt
        .process("looper", &series(10, 1, |_| 0.0), 0)
        .unwrap_err();
    assert!(
        matches!(
            err,
            CallError::OutOfFuel {
                fuel: 5_000_000,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(crashed_events(&mut rt, "looper"), 1);
    assert_bystander_runs(&mut rt, 0);
}

#[test]
fn infinite_loop_hits_epoch_deadline() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime(&caps);
    load_bystander(&mut rt);
    let bytes = fixture("infinite_loop");
    let mut s = spec("looper", &bytes, "");
    s.limits.fuel_per_call = None;
    s.limits.epoch_deadline = Duration::from_millis(50);
    rt.load(s, &bytes, 0).unwrap();

    let err = rt
        .process("looper", &series(10, 1, |_| 0.0), 0)
        .unwrap_err();
    assert!(matches!(err, CallError::Timeout { .. }), "{err:?}");
    assert_bystander_runs(&mut rt, 0);
}

#[test]
fn memory_bomb_hits_memory_cap() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime(&caps);
    load_bystander(&mut rt);
    let bytes = fixture("memory_bomb");
    let mut s = spec("bomb", &bytes, "");
    s.limits.memory_bytes = 4 << 20;
    rt.load(s, &bytes, 0).unwrap();

    let err = rt.process("bomb", &series(10, 1, |_| 0.0), 0).unwrap_err();
    match err {
        CallError::MemoryLimit {
            limit, requested, ..
        } => {
            assert_eq!(limit, 4 << 20);
            assert!(requested > limit);
        }
        other => panic!("expected MemoryLimit, got {other:?}"),
    }
    assert_bystander_runs(&mut rt, 0);
}

#[test]
fn trap_in_process_is_restarted_with_exponential_backoff() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime(&caps);
    load_bystander(&mut rt);
    let bytes = fixture("trap_in_process");
    rt.load(spec("trapper", &bytes, ""), &bytes, 0).unwrap();
    let batch = series(10, 1, |_| 0.0);

    let err = rt.process("trapper", &batch, 1000).unwrap_err();
    assert!(matches!(err, CallError::Trap(_)), "{err:?}");
    let events = rt.drain_events();
    assert!(
        events.iter().any(|e| matches!(e,
            RuntimeEvent::Crashed { function, failures: 1, restart_at_ms: 1100, .. } if function == "trapper")),
        "{events:?}"
    );

    // Before the backoff expires the function is unavailable, not restarted.
    let err = rt.process("trapper", &batch, 1050).unwrap_err();
    assert!(
        matches!(err, CallError::Unavailable { until_ms: 1100, .. }),
        "{err:?}"
    );
    assert_bystander_runs(&mut rt, 1050);

    // Due: restarted, traps again, and the delay doubles.
    let err = rt.process("trapper", &batch, 1100).unwrap_err();
    assert!(matches!(err, CallError::Trap(_)), "{err:?}");
    let events = rt.drain_events();
    assert!(
        events.iter().any(
            |e| matches!(e, RuntimeEvent::Restarted { function, .. } if function == "trapper")
        )
    );
    assert!(
        events.iter().any(|e| matches!(
            e,
            RuntimeEvent::Crashed {
                failures: 2,
                restart_at_ms: 1300,
                ..
            }
        )),
        "{events:?}"
    );

    // tick() skips it while backing off and restarts it once due; tick
    // itself works on the fixture, so the function is running again.
    let results = rt.tick(1200);
    assert!(results.iter().all(|(name, _)| name != "trapper"));
    let results = rt.tick(1300);
    assert!(
        results
            .iter()
            .any(|(name, r)| name == "trapper" && r.is_ok())
    );
    let status = rt.status();
    let trapper = status.iter().find(|s| s.name == "trapper").unwrap();
    assert_eq!(trapper.state, FunctionState::Running);
    assert_eq!(trapper.restarts, 2);
    assert_eq!(trapper.failures, 2);
    assert_bystander_runs(&mut rt, 1300);
}

#[test]
fn oversized_emit_is_refused() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime(&caps);
    load_bystander(&mut rt);
    let bytes = fixture("oversized_emit");
    let mut small = spec("spammer", &bytes, "");
    small.limits.max_emit_samples = 1000;
    rt.load(small, &bytes, 0).unwrap();
    let err = rt
        .process("spammer", &series(1, 1, |_| 0.0), 0)
        .unwrap_err();
    assert!(
        matches!(
            err,
            CallError::OversizedEmit {
                limit: 1000,
                attempted: 4096,
                ..
            }
        ),
        "{err:?}"
    );
    assert_bystander_runs(&mut rt, 0);

    // The same module under a larger limit emits its 4096 samples: the
    // refusal above came from the limit, not from a broken fixture.
    let mut large = spec("spammer-ok", &bytes, "");
    large.limits.max_emit_samples = 10_000;
    rt.load(large, &bytes, 0).unwrap();
    let out = rt.process("spammer-ok", &series(1, 1, |_| 0.0), 0).unwrap();
    assert_eq!(out.len(), 4096);
}

#[test]
fn import_not_granted_fails_to_link() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime(&caps);
    load_bystander(&mut rt);
    let bytes = fixture("import_not_granted");
    let err = rt.load(spec("sneaky", &bytes, ""), &bytes, 0).unwrap_err();
    match &err {
        LoadError::ImportNotGranted { import } => {
            assert_eq!(import, "edgefleet:device/kv@0.1.0");
        }
        other => panic!("expected ImportNotGranted, got {other:?}"),
    }
    assert!(rt.functions().all(|f| f != "sneaky"));
    assert!(
        rt.drain_events().iter().any(
            |e| matches!(e, RuntimeEvent::LoadFailed { function, .. } if function == "sneaky")
        )
    );

    // Granting kv makes the same module load.
    let mut granted = spec("sneaky", &bytes, "");
    granted.kv = true;
    rt.load(granted, &bytes, 0).unwrap();
    assert_bystander_runs(&mut rt, 0);
}

#[test]
fn wasi_imports_are_denied() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime(&caps);
    load_bystander(&mut rt);
    let bytes = componentize_wat_with_wasi(&fixture_wat("wasi_import"));
    let err = rt.load(spec("wasi", &bytes, ""), &bytes, 0).unwrap_err();
    match &err {
        LoadError::ImportNotGranted { import } => {
            assert_eq!(import, "wasi:cli/environment@0.2.0");
        }
        other => panic!("expected ImportNotGranted, got {other:?}"),
    }
    assert_bystander_runs(&mut rt, 0);
}

#[test]
fn malformed_modules_are_rejected() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime(&caps);
    load_bystander(&mut rt);

    let garbage = std::fs::read(crate_dir().join("tests/fixtures/malformed.bin")).unwrap();
    let err = rt
        .load(spec("garbage", &garbage, ""), &garbage, 0)
        .unwrap_err();
    assert!(matches!(err, LoadError::Malformed(_)), "{err:?}");

    let good = fixture("passthrough");
    let truncated = &good[..good.len() / 2];
    let err = rt
        .load(spec("truncated", truncated, ""), truncated, 0)
        .unwrap_err();
    assert!(matches!(err, LoadError::Malformed(_)), "{err:?}");

    let core = wat::parse_str(fixture_wat("passthrough")).unwrap();
    let err = rt.load(spec("core", &core, ""), &core, 0).unwrap_err();
    assert!(matches!(err, LoadError::NotAComponent), "{err:?}");

    let mut wrong = spec("wrong-digest", &good, "");
    wrong.module_digest = digest_hex(b"something else");
    let err = rt.load(wrong, &good, 0).unwrap_err();
    assert!(matches!(err, LoadError::DigestMismatch { .. }), "{err:?}");

    assert_eq!(rt.functions().collect::<Vec<_>>(), vec!["bystander"]);
    assert_bystander_runs(&mut rt, 0);
}

#[test]
fn device_not_granted_gets_an_error_not_access() {
    let caps = MemoryCapabilities::default();
    caps.devices.set_registers("plc-1", vec![10, 20, 30]);
    caps.devices.set_registers("plc-2", vec![1000, 2000, 3000]);
    let mut rt = runtime(&caps);
    let probe = guest("probe");
    let mut s: FunctionSpec = spec("probe", &probe, "registers=plc-2:0:2");
    s.devices.insert("plc-1".to_owned());
    s.kv = true;
    s.models.insert("m".to_owned());
    s.outputs = vec!["pass".into(), "probe".into()];
    rt.load(s.clone(), &probe, 0).unwrap();

    let out = rt.process("probe", &series(3, 1, |i| i as f64), 0).unwrap();
    let result = out.stream("probe").unwrap();
    assert_eq!(result.values, vec![-1.0], "guest sees not-granted");
    assert_eq!(result.qualities, vec![2]);
    assert!(
        caps.devices.accesses().is_empty(),
        "a refused call must not reach the device: {:?}",
        caps.devices.accesses()
    );
    let events = rt.drain_events();
    assert!(
        events.iter().any(|e| matches!(e,
            RuntimeEvent::CapabilityDenied { function, call, target }
                if function == "probe" && call == "devices.read-registers" && target == "plc-2")),
        "{events:?}"
    );
    assert_eq!(rt.status()[0].denied, 1);
    // The function keeps running after the refusal.
    assert_eq!(out.stream("pass").unwrap().len(), 3);

    // The granted device is readable.
    s.config = "registers=plc-1:1:2".into();
    rt.load(s, &probe, 0).unwrap();
    let out = rt.process("probe", &series(3, 1, |i| i as f64), 0).unwrap();
    assert_eq!(out.stream("probe").unwrap().values, vec![50.0]);
    assert_eq!(
        caps.devices.accesses(),
        vec![DeviceAccess::Registers {
            device: "plc-1".into(),
            address: 1,
            count: 2
        }]
    );
}

#[test]
fn log_flood_is_rate_limited_and_counted() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime(&caps);
    load_bystander(&mut rt);
    let bytes = fixture("log_flood");
    rt.load(spec("flood", &bytes, ""), &bytes, 0).unwrap();
    let dropped = |rt: &DeviceRuntime| {
        rt.status()
            .into_iter()
            .find(|s| s.name == "flood")
            .unwrap()
            .log_dropped
    };
    // 1000 lines in one call: the burst (100) is logged, 900 are dropped.
    rt.process("flood", &series(1, 1, |_| 0.0), 0).unwrap();
    assert_eq!(dropped(&rt), 900);
    // One second later the bucket has refilled 20 lines.
    rt.process("flood", &series(1, 1, |_| 0.0), 1_000).unwrap();
    assert_eq!(dropped(&rt), 900 + 980);
    // Dropping lines is not a failure: the function and its neighbour run.
    assert!(matches!(
        rt.status()
            .iter()
            .find(|s| s.name == "flood")
            .unwrap()
            .state,
        FunctionState::Running
    ));
    assert_bystander_runs(&mut rt, 1_000);
}
