//! Lifecycle driven by desired state: load, hot swap, remove, compile cache.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    reason = "test code: failing loudly is the point; signal sizes are small"
)]

mod common;

use common::*;
use device_runtime::memory::MemoryCapabilities;
use device_runtime::{Batch, DeviceRuntime, FunctionSpec, LoadError, RuntimeConfig, RuntimeEvent};

fn passthrough_v2() -> Vec<u8> {
    // A different module (different digest) with the same behaviour.
    let wat = fixture_wat("passthrough").replacen(
        "(memory (export \"memory\") 1)",
        "(memory (export \"memory\") 1)\n  (global $version i32 (i32.const 2))",
        1,
    );
    componentize_wat(&wat)
}

#[test]
fn hot_swap_loses_and_duplicates_no_sample() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime(&caps);
    let v1 = fixture("passthrough");
    let v2 = passthrough_v2();
    let spec_v1 = spec("f", &v1, "");
    let spec_v2 = spec("f", &v2, "");
    assert_ne!(spec_v1.module_digest, spec_v2.module_digest);
    let modules = modules(&[&v1, &v2]);

    let report = rt.apply(std::slice::from_ref(&spec_v1), &modules, 0);
    assert_eq!(report.loaded, vec!["f"]);

    let mut sent = Batch::new();
    let mut received = Batch::new();
    let mut digests = Vec::new();
    for k in 0..20u64 {
        if k == 10 {
            let report = rt.apply(std::slice::from_ref(&spec_v2), &modules, k);
            assert_eq!(report.replaced, vec!["f"]);
            assert!(report.failed.is_empty());
            for flushed in report.flushed {
                received.append(out0(&flushed));
            }
        }
        let mut batch = Batch::new();
        for i in 0..50u64 {
            let seq = k * 50 + i;
            batch.push((seq % 7) as u32, seq, seq as f64, 0);
        }
        sent.append(batch.clone());
        let out = rt.process("f", &batch, k).unwrap();
        digests.push(out.digest.clone());
        received.append(out0(&out));
    }
    assert_eq!(received, sent, "every sample exactly once, in order");
    assert!(digests[..10].iter().all(|d| *d == spec_v1.module_digest));
    assert!(digests[10..].iter().all(|d| *d == spec_v2.module_digest));
    let events = rt.drain_events();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, RuntimeEvent::Replaced { from, to, .. }
        if *from == spec_v1.module_digest && *to == spec_v2.module_digest))
    );
}

#[test]
fn swinging_door_swap_flushes_held_points() {
    // The outgoing version holds back its newest sample; flush on swap must
    // release it so reconstruction stays within the deviation across the
    // swap.
    let caps = MemoryCapabilities::default();
    let mut rt = runtime(&caps);
    let bytes = guest("swinging-door");
    rt.load(spec("sdt", &bytes, "deviation=0.1"), &bytes, 0)
        .unwrap();
    let line = series(100, 1000, |i| i as f64 * 0.01);
    let out = rt.process("sdt", &line, 0).unwrap();
    // A straight line: only the first sample goes out; the last is held.
    assert_eq!(out0(&out).timestamps, vec![line.timestamps[0]]);

    let flushed = rt
        .load(spec("sdt", &bytes, "deviation=0.2"), &bytes, 0)
        .unwrap()
        .expect("old version was running");
    assert_eq!(out0(&flushed).timestamps, vec![line.timestamps[99]]);
    assert_eq!(out0(&flushed).values, vec![0.99]);
}

#[test]
fn failed_replacement_keeps_the_old_version_running() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime(&caps);
    let good = guest("deadband");
    rt.load(spec("db", &good, "deadband=1"), &good, 0).unwrap();
    // Same module, bad config: init fails.
    let err = rt
        .load(spec("db", &good, "deadband=-1"), &good, 0)
        .unwrap_err();
    assert!(
        matches!(&err, LoadError::Init(device_runtime::CallError::Guest(m)) if m.contains("deadband")),
        "{err:?}"
    );
    let out = rt
        .process("db", &series(3, 1, |i| i as f64 * 5.0), 0)
        .unwrap();
    assert_eq!(out0(&out).len(), 3, "old config (deadband=1) still applies");
}

#[test]
fn apply_loads_replaces_removes_and_leaves_unchanged() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime(&caps);
    let db = guest("deadband");
    let win = guest("window");
    let modules = modules(&[&db, &win]);
    let a = spec("a", &db, "deadband=1");
    let b = spec("b", &win, "window_ms=1000");
    let mut b_outputs = b.clone();
    b_outputs.outputs = vec!["min".into(), "max".into(), "mean".into(), "count".into()];

    let r = rt.apply(&[a.clone(), b_outputs.clone()], &modules, 0);
    assert_eq!((r.loaded.len(), r.failed.len()), (2, 0), "{r:?}");
    let r = rt.apply(&[a.clone(), b_outputs.clone()], &modules, 0);
    assert_eq!(r.unchanged, vec!["a", "b"]);
    let a2 = spec("a", &db, "deadband=2");
    let r = rt.apply(&[a2], &modules, 0);
    assert_eq!(r.replaced, vec!["a"]);
    assert_eq!(r.removed, vec!["b"]);
    assert_eq!(rt.functions().collect::<Vec<_>>(), vec!["a"]);

    // A module the source does not have is reported, not fatal.
    let mut missing = spec("c", &db, "deadband=1");
    missing.module_digest = "00".repeat(32);
    let r = rt.apply(&[missing], &modules, 0);
    assert!(
        matches!(r.failed.as_slice(), [(name, LoadError::ModuleUnavailable { .. })] if name == "c")
    );
    assert_eq!(r.removed, vec!["a"]);
}

#[test]
fn restart_from_disk_cache_does_not_recompile() {
    let dir = tempfile::tempdir().unwrap();
    let caps = MemoryCapabilities::default();
    let bytes = guest("deadband");
    let config = || RuntimeConfig {
        cache_dir: Some(dir.path().to_owned()),
        ..common::config()
    };
    let mut first = DeviceRuntime::new(config(), caps.capabilities()).unwrap();
    first
        .load(spec("db", &bytes, "deadband=1"), &bytes, 0)
        .unwrap();
    let (hits, misses) = first.cache_stats().unwrap();
    assert_eq!((hits, misses), (0, 1), "cold: compiled once");
    drop(first);

    // A new runtime (as after an edge-node restart) finds the machine code.
    let mut second = DeviceRuntime::new(config(), caps.capabilities()).unwrap();
    second
        .load(spec("db", &bytes, "deadband=1"), &bytes, 0)
        .unwrap();
    let (hits, misses) = second.cache_stats().unwrap();
    assert_eq!((hits, misses), (1, 0), "warm: loaded from cache");
    let out = second
        .process("db", &series(3, 1, |i| i as f64 * 5.0), 0)
        .unwrap();
    assert_eq!(out0(&out).len(), 3);
}

#[test]
fn unknown_function_and_limit_too_large_are_errors() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime(&caps);
    let err = rt.process("nope", &Batch::new(), 0).unwrap_err();
    assert!(matches!(err, device_runtime::CallError::UnknownFunction(_)));
    let bytes = guest("deadband");
    let mut s: FunctionSpec = spec("big", &bytes, "deadband=1");
    s.limits.memory_bytes = 1 << 40;
    let err = rt.load(s, &bytes, 0).unwrap_err();
    assert!(matches!(err, LoadError::LimitTooLarge { .. }), "{err:?}");
}
