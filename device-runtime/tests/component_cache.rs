//! The in-memory compiled-component cache is bounded (M7): what neither the
//! running functions nor the current or previous desired state use is
//! evicted, least recently used first, and every eviction is counted.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: failing loudly is the point"
)]

mod common;

use common::*;
use device_runtime::memory::MemoryCapabilities;
use device_runtime::{CacheLimits, DeviceRuntime, FunctionSpec, RuntimeConfig, digest_hex};

/// Passthrough modules that differ only in a constant (distinct digests).
fn variant(i: u32) -> Vec<u8> {
    let wat = fixture_wat("passthrough").replacen(
        "(memory (export \"memory\") 1)",
        &format!("(memory (export \"memory\") 1)\n  (global $variant i32 (i32.const {i}))"),
        1,
    );
    componentize_wat(&wat)
}

fn runtime_with(caps: &MemoryCapabilities, limits: CacheLimits) -> DeviceRuntime {
    let config = RuntimeConfig {
        component_cache: limits,
        ..config()
    };
    DeviceRuntime::new(config, caps.capabilities()).unwrap()
}

fn entries(max_entries: usize) -> CacheLimits {
    CacheLimits {
        max_entries,
        ..CacheLimits::default()
    }
}

#[test]
fn modules_of_neither_the_current_nor_the_previous_desired_state_are_evicted() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime_with(&caps, entries(2));
    let mods: Vec<Vec<u8>> = (0..4).map(variant).collect();
    let refs: Vec<&[u8]> = mods.iter().map(Vec::as_slice).collect();
    let source = modules(&refs);
    for (i, bytes) in mods.iter().enumerate() {
        let report = rt.apply(&[spec("f", bytes, "")], &source, i as u64);
        assert!(report.failed.is_empty(), "{:?}", report.failed);
    }
    let digests: Vec<String> = mods.iter().map(|b| digest_hex(b)).collect();
    let stats = rt.component_cache_stats();
    assert_eq!(stats.entries, 2, "{stats:?}");
    assert_eq!(stats.evictions, 2, "modules 0 and 1 went out: {stats:?}");
    assert!(!rt.is_component_cached(&digests[0]));
    assert!(!rt.is_component_cached(&digests[1]));
    assert!(
        rt.is_component_cached(&digests[2]),
        "previous desired state"
    );
    assert!(rt.is_component_cached(&digests[3]), "current desired state");
    assert!(stats.bytes > 0);
}

#[test]
fn unpinned_entries_go_least_recently_used_first() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime_with(&caps, entries(3));
    let pinned = variant(0);
    let source = modules(&[&pinned]);
    let report = rt.apply(&[spec("f", &pinned, "")], &source, 0);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let (x, y, z) = (variant(1), variant(2), variant(3));
    rt.compile(&digest_hex(&x), &x).unwrap();
    rt.compile(&digest_hex(&y), &y).unwrap();
    // Use x again: y is now the least recently used unpinned entry.
    rt.compile(&digest_hex(&x), &x).unwrap();
    rt.compile(&digest_hex(&z), &z).unwrap();
    assert_eq!(rt.component_cache_stats().evictions, 1);
    assert!(rt.is_component_cached(&digest_hex(&pinned)));
    assert!(rt.is_component_cached(&digest_hex(&x)));
    assert!(
        !rt.is_component_cached(&digest_hex(&y)),
        "least recently used"
    );
    assert!(rt.is_component_cached(&digest_hex(&z)));
}

#[test]
fn pinned_modules_stay_even_over_the_bound_and_a_byte_bound_applies() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime_with(&caps, entries(1));
    let (a, b) = (variant(0), variant(1));
    let source = modules(&[&a, &b]);
    let desired: Vec<FunctionSpec> = vec![spec("f", &a, ""), spec("g", &b, "")];
    let report = rt.apply(&desired, &source, 0);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let stats = rt.component_cache_stats();
    assert_eq!((stats.entries, stats.evictions), (2, 0), "both in use");

    // A byte bound below one image keeps only what is pinned.
    let mut rt = runtime_with(
        &caps,
        CacheLimits {
            max_entries: 100,
            max_bytes: 1,
        },
    );
    let report = rt.apply(&[spec("f", &a, "")], &source, 0);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    rt.compile(&digest_hex(&b), &b).unwrap();
    let stats = rt.component_cache_stats();
    assert_eq!((stats.entries, stats.evictions), (1, 1), "{stats:?}");
    assert!(rt.is_component_cached(&digest_hex(&a)));
    // The function still runs from its (pinned) component.
    let out = rt.process("f", &series(10, 1, |_| 1.5), 1).unwrap();
    assert_eq!(out.len(), 10);
}
