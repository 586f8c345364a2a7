//! Resident memory of an edge-node agent running N WASM device functions.
//!
//! ```sh
//! cargo run --release -p edge-node --example rss_functions -- 10 10
//! #                                               functions ^  ^ seconds of data flow
//! ```
//!
//! No hub is needed: the example seeds the agent's store with a signed
//! desired state (one synthetic device with 10 points per function, at
//! least 100, sampled every 100 ms; function `fK` runs the committed
//! `deadband` guest over points `10K..10K+10`, the rest go raw) and the module blob, exactly as a previous run with a hub
//! would have left them, then starts the agent with an unreachable broker
//! (it runs offline, buffering to the outbox). It prints `VmRSS`/`VmHWM`
//! from `/proc/self/status` before the agent starts, once every function
//! runs, and after the given seconds of data flow.

use std::time::Duration;

use anyhow::{Context as _, bail};
use edge_node::store::{ArtifactRecord, Store};
use edge_node::{Agent, Clock, EdgeConfig};
use protocols::signing::{SigningKey, key_to_hex};
use protocols::{DesiredState, FunctionState, SignedDesired};
use serde_json::json;
use sha2::Digest as _;
use tokio_util::sync::CancellationToken;

fn rss() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .filter(|l| l.starts_with("VmRSS") || l.starts_with("VmHWM"))
        .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(" / peak ")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: u32 = args.next().map_or(Ok(10), |a| a.parse())?;
    let secs: u64 = args.next().map_or(Ok(10), |a| a.parse())?;
    println!("baseline (process, no agent): VmRSS {}", rss());

    let dir = tempfile::tempdir()?;
    let module_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../device-runtime/guests/deadband/deadband.wasm");
    let module = std::fs::read(&module_path).with_context(|| module_path.display().to_string())?;
    let sha = hex::encode(sha2::Sha256::digest(&module));

    // At least 100 points, so `0` functions is a baseline with the same data
    // load (points no function takes go to the raw stream).
    let points: Vec<_> = (0..n.max(10) * 10)
        .map(|i| {
            json!({"index": i, "name": format!("p{i}"),
                   "address": {"kind": "synthetic", "signal": {"shape": "sine", "amplitude": 10.0, "period_s": 10.0, "noise": 0.2}}})
        })
        .collect();
    let functions: Vec<_> = (0..n)
        .map(|k| {
            json!({"name": format!("f{k}"), "module_sha256": sha, "module_size": module.len(),
                   "config": {"deadband": 1.0, "max_interval_ms": 10000},
                   "inputs": (k * 10..k * 10 + 10).collect::<Vec<_>>(), "outputs": ["filtered"]})
        })
        .collect();
    let desired: DesiredState = serde_json::from_value(json!({
        "node": "rss", "revision": 1,
        "devices": [{"id": "gen", "protocol": {"kind": "synthetic"},
                     "groups": [{"name": "g", "interval_ms": 100, "points": points}]}],
        "functions": functions,
        "config": {"batch_max_samples": 1000, "batch_max_age_ms": 1000, "report_interval_ms": 5000, "raw_stream": "raw"}
    }))?;
    desired.validate()?;
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let doc = SignedDesired::sign(&desired, &key)?;

    let unused_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut cfg = EdgeConfig {
        node: "rss".into(),
        data_dir: dir.path().join("edge"),
        ..EdgeConfig::default()
    };
    cfg.mqtt.port = unused_port;
    cfg.hub.public_key = Some(key_to_hex(&key.verifying_key()));
    cfg.validate()?;
    {
        let store = Store::open(&cfg.store_config())?;
        store.put_desired(&doc).await?;
        std::fs::create_dir_all(cfg.data_dir.join("artifacts"))?;
        std::fs::write(cfg.data_dir.join("artifacts").join(&sha), &module)?;
        store
            .artifact_put(
                &sha,
                ArtifactRecord {
                    size: module.len() as u64,
                    stored_at_ms: 0,
                },
            )
            .await?;
    }

    let cancel = CancellationToken::new();
    let agent = Agent::start(cfg, Clock::system(), cancel.clone()).await?;
    let view = agent.functions();
    let run = tokio::spawn(agent.run());
    let started = tokio::time::Instant::now();
    loop {
        let s = view.snapshot();
        if s.len() == n as usize && s.values().all(|f| f.state == FunctionState::Running) {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("functions not running after 120 s: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "{n} functions running after {:?}: VmRSS {}",
        started.elapsed(),
        rss()
    );
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let s = view.snapshot();
    let total = |k: &str| -> u64 { s.values().filter_map(|f| f.counters.get(k)).sum() };
    println!(
        "after {secs} s of data ({} samples in, {} out over {n} functions): VmRSS {}",
        total("samples_in"),
        total("samples_out"),
        rss()
    );
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(20), run).await???;
    Ok(())
}
