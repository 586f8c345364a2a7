//! The processes a hollow run measures: a hub, and optionally a Mosquitto
//! broker it uses instead of its embedded one.
//!
//! [`Stack::start`] starts the broker first (when asked), then the hub with
//! its embedded broker off and `mqtt` pointing at the broker, and returns
//! an endpoint whose `pid`/`broker_pid` let [`super::run`] sample both
//! processes' memory. [`Stack::stop`] kills and waits for both and removes
//! their temporary directories unless asked to keep them.

use std::path::PathBuf;
use std::time::Duration;

use cloud_hub::HubConfig;

use super::broker::{Mosquitto, MosquittoOptions, mosquitto_version};
use super::hub::{HubEndpoint, HubProcess};
use super::{BrokerKind, HollowError};

/// What to start.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Executable that serves a hub: this crate's `fleet-sim` (with
    /// `hub_args = ["hub"]`) or `cloud-hub` (with `["serve"]`).
    pub hub_bin: PathBuf,
    /// Arguments before `--config FILE`.
    pub hub_args: Vec<String>,
    /// Base hub config; data dir, listen addresses and broker are set here.
    pub hub_config: HubConfig,
    /// `RUST_LOG` of the hub.
    pub hub_log: String,
    /// Longest wait for the hub's `/healthz`.
    pub hub_ready_timeout: Duration,
    /// The hub's embedded broker, or a Mosquitto started here
    /// ([`BrokerKind::External`] is not something to start).
    pub broker: BrokerKind,
    /// Settings of the started Mosquitto.
    pub mosquitto: MosquittoOptions,
    /// Nodes that will connect (sizes the embedded broker's connection
    /// limit).
    pub nodes: usize,
}

/// A running hub (and broker); stop it with [`Stack::stop`]. Dropping it
/// kills both processes too.
#[derive(Debug)]
pub struct Stack {
    hub: HubProcess,
    hub_dir: Option<tempfile::TempDir>,
    mosquitto: Option<Mosquitto>,
    broker_version: Option<String>,
}

impl Stack {
    /// Starts the broker (if [`BrokerKind::Mosquitto`]) and the hub.
    pub async fn start(o: &StackOptions) -> Result<Self, HollowError> {
        let mut cfg = o.hub_config.clone();
        let (mosquitto, broker_version) = match o.broker {
            BrokerKind::Embedded => {
                let broker = cfg.embedded_broker.get_or_insert_with(Default::default);
                // The hub's own client and a margin beside the nodes.
                broker.max_connections = broker.max_connections.max(o.nodes + 64);
                (
                    None,
                    Some(format!(
                        "embedded rumqttd (cloud-hub {})",
                        env!("CARGO_PKG_VERSION")
                    )),
                )
            }
            BrokerKind::Mosquitto => {
                let m = Mosquitto::spawn(&o.mosquitto).await?;
                let version = mosquitto_version(m.bin()).await;
                cfg.embedded_broker = None;
                cfg.mqtt.host = "127.0.0.1".into();
                cfg.mqtt.port = m.port();
                (Some(m), version)
            }
            BrokerKind::External => {
                return Err(HollowError::Config(
                    "broker: an external broker is used through a running hub (--hub-url/--mqtt), not started"
                        .into(),
                ));
            }
        };
        let dir = tempfile::Builder::new()
            .prefix("fleet-sim-hollow-")
            .tempdir()
            .map_err(|source| HollowError::Io {
                what: "creating the hub directory".into(),
                source,
            })?;
        let mut hub = match HubProcess::spawn(
            &o.hub_bin,
            &o.hub_args,
            cfg,
            dir.path(),
            &o.hub_log,
            o.hub_ready_timeout,
        )
        .await
        {
            Ok(h) => h,
            Err(e) => {
                let kept = dir.keep();
                if let Some(m) = mosquitto {
                    m.stop().await;
                }
                return Err(HollowError::Hub(format!(
                    "{e} (hub directory kept: {})",
                    kept.display()
                )));
            }
        };
        if let Some(m) = &mosquitto {
            hub.set_broker(BrokerKind::Mosquitto, m.pid());
        }
        Ok(Self {
            hub,
            hub_dir: Some(dir),
            mosquitto,
            broker_version,
        })
    }

    /// Where the hollow nodes and the API client go.
    pub fn endpoint(&self) -> &HubEndpoint {
        self.hub.endpoint()
    }

    /// The started Mosquitto, if any.
    pub fn mosquitto(&self) -> Option<&Mosquitto> {
        self.mosquitto.as_ref()
    }

    /// "mosquitto version 2.0.11", or the embedded broker's name.
    pub fn broker_version(&self) -> Option<&str> {
        self.broker_version.as_deref()
    }

    /// The hub's log file.
    pub fn hub_log(&self) -> &std::path::Path {
        self.hub.log()
    }

    /// Whether hub and broker still run (`Err` naming the one that exited).
    pub fn check_alive(&mut self) -> Result<(), HollowError> {
        if let Some(m) = &mut self.mosquitto {
            m.check_alive()?;
        }
        self.hub.check_alive()
    }

    /// Kills and waits for the hub, then the broker. Their directories are
    /// removed, or kept and returned when `keep` is set.
    pub async fn stop(self, keep: bool) -> Vec<PathBuf> {
        let Self {
            hub,
            hub_dir,
            mosquitto,
            ..
        } = self;
        let mut kept = Vec::new();
        hub.stop().await;
        if let Some(d) = hub_dir {
            if keep {
                kept.push(d.keep());
            } else {
                let _ = d.close();
            }
        }
        if let Some(mut m) = mosquitto {
            if keep {
                kept.extend(m.keep_dir());
            }
            m.stop().await;
        }
        kept
    }
}
