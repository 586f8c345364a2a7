//! `fleet-sim demo`: the whole system on one machine with one command.
//!
//! Starts a standalone `cloud-hub` (embedded broker, embedded registry) and one
//! real `edge-node` agent in this process, pushes a desired state through the
//! hub's REST API, and prints progress from the hub's point of view until the
//! duration ends or Ctrl-C. The hub's API stays reachable meanwhile.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use cloud_hub::{App, HubConfig};
use edge_node::{Agent, Clock, EdgeConfig};
use tokio_util::sync::CancellationToken;

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Hub config file (embedded defaults when `None`).
    pub hub_config: Option<PathBuf>,
    /// Edge config file (defaults with node `line-1` when `None`).
    pub edge_config: Option<PathBuf>,
    /// Desired state to push (the built-in example when `None`).
    pub desired: Option<PathBuf>,
    /// How long to run; `None` until Ctrl-C.
    pub duration: Option<Duration>,
}

const EXAMPLE_DESIRED: &str = include_str!("../../examples/desired.json");

/// Runs the demo.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let hub_cfg = HubConfig::load(opts.hub_config.as_deref(), |k| std::env::var(k).ok())?;
    hub_cfg.validate().context("hub config")?;
    let mut edge_cfg = match &opts.edge_config {
        Some(p) => EdgeConfig::load(Some(p), |k| std::env::var(k).ok())?,
        None => EdgeConfig {
            node: "line-1".into(),
            data_dir: "data/line-1".into(),
            ..EdgeConfig::default()
        },
    };
    let desired_text = match &opts.desired {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => EXAMPLE_DESIRED.to_owned(),
    };
    let desired =
        protocols::codec::decode_desired(desired_text.as_bytes()).context("desired state")?;
    if desired.node != edge_cfg.node {
        bail!(
            "desired state is for node {:?} but the edge config runs node {:?}",
            desired.node,
            edge_cfg.node
        );
    }

    let cancel = CancellationToken::new();
    let app = App::start(hub_cfg, cancel.clone())
        .await
        .context("starting cloud-hub")?;
    let base = format!("http://{}", app.http_addr());
    let (host, port) = app.mqtt_addr();
    edge_cfg.mqtt.host = host;
    edge_cfg.mqtt.port = port;
    edge_cfg.hub.public_key = Some(protocols::signing::key_to_hex(
        &app.hub().key.verifying_key(),
    ));
    edge_cfg.validate().context("edge config")?;
    println!(
        "cloud-hub  REST API {base}   MQTT {}:{}",
        edge_cfg.mqtt.host, edge_cfg.mqtt.port
    );
    let hub_task = tokio::spawn(app.run());
    let agent = Agent::start(edge_cfg.clone(), Clock::system(), cancel.clone())
        .await
        .context("starting edge-node")?;
    println!(
        "edge-node  {} (data in {})",
        edge_cfg.node,
        edge_cfg.data_dir.display()
    );
    let edge_task = tokio::spawn(agent.run());

    // Push the desired state with a revision above whatever the hub has.
    let http = reqwest::Client::new();
    let node_url = format!("{base}/v1/nodes/{}", desired.node);
    let current = http.get(&node_url).send().await?;
    let current_rev = if current.status().is_success() {
        current.json::<serde_json::Value>().await?["desired_revision"]
            .as_u64()
            .unwrap_or(0)
    } else {
        0
    };
    let mut doc: serde_json::Value = serde_json::from_str(&desired_text)?;
    doc["revision"] = serde_json::json!(current_rev.max(desired.revision.saturating_sub(1)) + 1);
    let r = http
        .put(format!("{node_url}/desired"))
        .json(&doc)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("hub refused the desired state: {}", r.text().await?);
    }
    println!(
        "pushed desired revision {} ({} devices)",
        doc["revision"],
        desired.devices.len()
    );

    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {}
        }
        if let Ok(r) = http.get(&node_url).send().await
            && let Ok(v) = r.json::<serde_json::Value>().await
        {
            let rep = &v["reported"];
            println!(
                "[{:>4}s] applied rev {:<3} status {:<8} hub stored {:>8} samples (dups {}, bad {})  edge backlog {} samples",
                started.elapsed().as_secs(),
                rep["applied_revision"],
                v["status"]["state"].as_str().unwrap_or("-"),
                v["telemetry"]["samples"],
                v["telemetry"]["duplicates"],
                v["telemetry"]["bad_payloads"],
                rep["backlog"]["samples"],
            );
        }
        if opts.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
    }
    println!("stopping…");
    cancel.cancel();
    edge_task.await.context("edge task")?.context("edge-node")?;
    hub_task.await.context("hub task")?.context("cloud-hub")?;
    Ok(())
}
