//! Shared test helpers: committed guests, WAT fixtures componentized at test
//! time, a small runtime and signal generators.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_precision_loss,
    reason = "test helpers: failing loudly is the point"
)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use device_runtime::memory::MemoryCapabilities;
use device_runtime::{
    BackoffConfig, Batch, CallOutput, DeviceRuntime, FunctionSpec, PoolConfig, RuntimeConfig,
    digest_hex,
};
use wit_component::{ComponentEncoder, StringEncoding, embed_component_metadata};
use wit_parser::Resolve;

pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A committed reference guest, e.g. `guest("deadband")`.
pub fn guest(name: &str) -> Vec<u8> {
    let path = crate_dir()
        .join("guests")
        .join(name)
        .join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// WAT source of a hostile or helper fixture.
pub fn fixture_wat(name: &str) -> String {
    let path = crate_dir()
        .join("tests/fixtures")
        .join(format!("{name}.wat"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Componentizes core-module WAT against the `device-function` world.
pub fn componentize_wat(wat: &str) -> Vec<u8> {
    let mut resolve = Resolve::default();
    let (pkg, _) = resolve.push_dir(crate_dir().join("wit")).unwrap();
    let world = resolve
        .select_world(&[pkg], Some("device-function"))
        .unwrap();
    encode(&resolve, world, wat)
}

/// Componentizes core-module WAT against a world that adds a WASI import
/// (`wasi:cli/environment@0.2.0`) to `device-function`.
pub fn componentize_wat_with_wasi(wat: &str) -> Vec<u8> {
    let mut resolve = Resolve::default();
    resolve.push_dir(crate_dir().join("wit")).unwrap();
    resolve
        .push_str(
            "wasi-cli.wit",
            "package wasi:cli@0.2.0;\n\
             interface environment { get-arguments: func() -> list<string>; }\n",
        )
        .unwrap();
    let pkg = resolve
        .push_str(
            "hostile.wit",
            "package test:hostile;\n\
             world hostile {\n\
               include edgefleet:device/device-function@0.1.0;\n\
               import wasi:cli/environment@0.2.0;\n\
             }\n",
        )
        .unwrap();
    let world = resolve.select_world(&[pkg], Some("hostile")).unwrap();
    encode(&resolve, world, wat)
}

fn encode(resolve: &Resolve, world: wit_parser::WorldId, wat: &str) -> Vec<u8> {
    let mut module = wat::parse_str(wat).unwrap();
    embed_component_metadata(&mut module, resolve, world, StringEncoding::UTF8).unwrap();
    ComponentEncoder::default()
        .module(&module)
        .unwrap()
        .validate(true)
        .encode()
        .unwrap()
}

/// A fixture, componentized.
pub fn fixture(name: &str) -> Vec<u8> {
    componentize_wat(&fixture_wat(name))
}

/// Small pool, fast epoch, short backoff.
pub fn config() -> RuntimeConfig {
    RuntimeConfig {
        pool: PoolConfig {
            max_instances: 16,
            max_memory_bytes: 64 << 20,
            ..PoolConfig::default()
        },
        epoch_tick: Duration::from_millis(5),
        cache_dir: None,
        backoff: BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1600),
            reset_after: Duration::from_mins(1),
        },
        ..RuntimeConfig::default()
    }
}

pub fn runtime(caps: &MemoryCapabilities) -> DeviceRuntime {
    DeviceRuntime::new(config(), caps.capabilities()).unwrap()
}

/// A spec for `bytes` with its digest filled in.
pub fn spec(name: &str, bytes: &[u8], config: &str) -> FunctionSpec {
    FunctionSpec::new(name, digest_hex(bytes), config)
}

/// Module source over a list of module bytes.
pub fn modules(list: &[&[u8]]) -> HashMap<String, Vec<u8>> {
    list.iter().map(|b| (digest_hex(b), b.to_vec())).collect()
}

/// `n` samples of point 0, one every `step_ms`, values from `f(i)`.
pub fn series(n: usize, step_ms: u64, f: impl Fn(usize) -> f64) -> Batch {
    let mut b = Batch::with_capacity(n);
    for i in 0..n {
        b.push(0, 1_000_000 + i as u64 * step_ms, f(i), 0);
    }
    b
}

/// Stream 0 of an output (empty if nothing was emitted).
pub fn out0(output: &CallOutput) -> Batch {
    output
        .streams
        .first()
        .map(|s| s.samples.clone())
        .unwrap_or_default()
}

/// Deterministic pseudo-random numbers (xorshift64*), so signals are
/// reproducible without a rand dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

pub fn path_exists(p: &Path) -> bool {
    p.exists()
}
