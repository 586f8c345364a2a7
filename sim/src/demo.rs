//! `fleet-sim demo`: the whole system on one machine with one command.
//!
//! Starts a standalone `cloud-hub` (embedded broker, embedded registry) and one
//! real `edge-node` agent in this process, pushes a desired state through the
//! hub's REST API, and prints progress from the hub's point of view until the
//! duration ends or Ctrl-C. The hub's API stays reachable meanwhile.
//!
//! The rig is the test kit's: [`HubHarness`] runs the hub on the loaded
//! config (its ports, its data directory), [`EdgeHarness`] the agent, and
//! every REST call goes through the hub's typed [`HubClient`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use cloud_hub::HubConfig;
use cloud_hub::client::HubClient;
use edge_node::{Clock, EdgeConfig};
use edgefleet_testkit::{EdgeHarness, HubHarness};
use protocols::DesiredState;
use protocols::api::NodeView;

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

/// Runs the demo: configs, rig, desired state, progress until the end.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let Configs {
        hub: hub_cfg,
        mut edge,
        desired_text,
        desired,
    } = Configs::load(&opts)?;
    let hub_data = hub_cfg.data_dir.clone();
    let hub = HubHarness::start(hub_cfg)
        .await
        .context("starting cloud-hub")?;
    edge.mqtt.host.clone_from(&hub.mqtt.0);
    edge.mqtt.port = hub.mqtt.1;
    edge.hub.public_key = Some(hub.public_key.clone());
    hub.base().clone_into(&mut edge.hub.http_url);
    hub.write_identity(&edge.node, &edge.data_dir)
        .context("the edge's identity")?;
    edge.validate().context("edge config")?;
    println!(
        "cloud-hub  REST API {}   MQTT {}:{}",
        hub.base(),
        edge.mqtt.host,
        edge.mqtt.port
    );
    println!(
        "operator   admin token in {} (mode 0600), hub CA {}; e.g. curl --cacert {} -H \"Authorization: Bearer $(cat {})\" {}/v1/nodes",
        hub_data.join("admin.token").display(),
        hub_data.join("ca/ca.crt").display(),
        hub_data.join("ca/ca.crt").display(),
        hub_data.join("admin.token").display(),
        hub.base()
    );
    let agent = EdgeHarness::start(edge.clone(), Clock::system())
        .await
        .context("starting edge-node")?;
    println!(
        "edge-node  {} (data in {})",
        edge.node,
        edge.data_dir.display()
    );
    push_desired(&hub.client, &desired_text, &desired).await?;
    watch(&hub.client, &desired.node, opts.duration).await;
    println!("stopping…");
    agent.stop().await.context("edge-node")?;
    hub.stop().await.context("cloud-hub")?;
    Ok(())
}

/// The demo's inputs, loaded and checked against each other.
struct Configs {
    hub: HubConfig,
    edge: EdgeConfig,
    /// The desired state as written (pushed as JSON, revision replaced).
    desired_text: String,
    desired: DesiredState,
}

impl Configs {
    fn load(opts: &DemoOptions) -> anyhow::Result<Self> {
        let hub = HubConfig::load(opts.hub_config.as_deref(), |k| std::env::var(k).ok())?;
        hub.validate().context("hub config")?;
        let edge = match &opts.edge_config {
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
        if desired.node != edge.node {
            bail!(
                "desired state is for node {:?} but the edge config runs node {:?}",
                desired.node,
                edge.node
            );
        }
        Ok(Self {
            hub,
            edge,
            desired_text,
            desired,
        })
    }
}

/// Pushes the desired state with a revision above whatever the hub has.
async fn push_desired(
    hub: &HubClient,
    desired_text: &str,
    desired: &DesiredState,
) -> anyhow::Result<()> {
    let current_rev = hub
        .node(&desired.node)
        .await?
        .map_or(0, |v| v.desired_revision);
    let mut doc: serde_json::Value = serde_json::from_str(desired_text)?;
    doc["revision"] = serde_json::json!(current_rev.max(desired.revision.saturating_sub(1)) + 1);
    hub.put_desired_json(&desired.node, &doc)
        .await
        .context("hub refused the desired state")?;
    println!(
        "pushed desired revision {} ({} devices)",
        doc["revision"],
        desired.devices.len()
    );
    Ok(())
}

/// Prints the hub's view of `node` every 2 s until `duration` (or Ctrl-C).
async fn watch(hub: &HubClient, node: &str, duration: Option<Duration>) {
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {}
        }
        if let Ok(Some(v)) = hub.node(node).await {
            println!(
                "[{:>4}s] {}",
                started.elapsed().as_secs(),
                progress_line(&v)
            );
        }
        if duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
    }
}

/// One progress line (after the elapsed time); `null` where the node has
/// not reported yet.
fn progress_line(v: &NodeView) -> String {
    let or_null = |x: Option<u64>| x.map_or_else(|| "null".to_owned(), |n| n.to_string());
    let rep = v.reported.as_ref();
    let state = match v.status.as_ref().map(|s| s.state) {
        Some(protocols::NodeState::Online) => "online",
        Some(protocols::NodeState::Offline) => "offline",
        None => "-",
    };
    format!(
        "applied rev {:<3} status {state:<8} hub stored {:>8} samples (dups {}, bad {})  edge backlog {} samples",
        or_null(rep.map(|r| r.applied_revision)),
        v.telemetry.samples,
        v.telemetry.duplicates,
        v.telemetry.bad_payloads,
        or_null(rep.map(|r| r.backlog.samples)),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    #[test]
    fn progress_line_shows_null_until_the_node_reports() {
        let v: NodeView = serde_json::from_value(serde_json::json!({
            "node": "line-1",
            "desired_revision": 3,
            "reported": null,
            "status": null,
            "telemetry": {"batches": 2, "samples": 40, "duplicates": 1, "bad_payloads": 0}
        }))
        .unwrap();
        assert_eq!(
            progress_line(&v),
            "applied rev null status -        hub stored       40 samples (dups 1, bad 0)  edge backlog null samples"
        );
    }

    #[test]
    fn example_desired_state_is_for_the_default_node() {
        let c = Configs::load(&DemoOptions {
            hub_config: None,
            edge_config: None,
            desired: None,
            duration: None,
        })
        .unwrap();
        assert_eq!(c.desired.node, c.edge.node);
    }
}
