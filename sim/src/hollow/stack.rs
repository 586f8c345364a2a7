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

use super::broker::{Mosquitto, MosquittoOptions, MosquittoTls, mosquitto_version};
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
    /// MQTT with client certificates from the hub CA (the secure default):
    /// the embedded broker's mTLS gate, or Mosquitto with the shipped
    /// `deploy/mosquitto` config and ACL (the hub then connects with a hub
    /// certificate, CN [`HUB_MQTT_NAME`]). `false`: plain MQTT (the
    /// embedded broker's lab mode; an anonymous loopback Mosquitto).
    pub mqtt_tls: bool,
}

/// The CN of the hub's client certificate towards a started Mosquitto (the
/// `user` of the shipped ACL).
pub const HUB_MQTT_NAME: &str = "hub:cloud-hub";

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
        let dir = tempfile::Builder::new()
            .prefix("fleet-sim-hollow-")
            .tempdir()
            .map_err(|source| HollowError::Io {
                what: "creating the hub directory".into(),
                source,
            })?;
        let (mosquitto, broker_version) = match o.broker {
            BrokerKind::Embedded => {
                let broker = cfg.embedded_broker.get_or_insert_with(Default::default);
                broker.tls = o.mqtt_tls;
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
                let mut mo = o.mosquitto.clone();
                if o.mqtt_tls {
                    let (broker_tls, hub_tls) = mosquitto_identities(dir.path())?;
                    mo.tls = Some(broker_tls);
                    cfg.mqtt.tls = Some(hub_tls);
                }
                let m = Mosquitto::spawn(&mo).await?;
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

/// Before the hub's first start: its CA (created in `{dir}/data`, where
/// [`HubProcess::spawn`] puts the hub's data), a server certificate for
/// Mosquitto, and the hub's client certificate ([`HUB_MQTT_NAME`], `OU=hub`)
/// written to `{dir}/mqtt-tls` as the hub's `[mqtt.tls]`.
fn mosquitto_identities(
    dir: &std::path::Path,
) -> Result<(MosquittoTls, cloud_hub::config::MqttTls), HollowError> {
    let fail = |e: &dyn std::fmt::Display| HollowError::Broker(format!("broker certificates: {e}"));
    let ca = cloud_hub::ca::Ca::open_offline(&dir.join("data")).map_err(|e| fail(&e))?;
    let server = ca
        .issue_server(&["localhost".to_owned(), "127.0.0.1".to_owned()])
        .map_err(|e| fail(&e))?;
    let hub = ca
        .issue_keyed(
            &cloud_hub::ca::Identity::hub(HUB_MQTT_NAME),
            Duration::from_secs(7 * 24 * 3600),
        )
        .map_err(|e| fail(&e))?;
    let tls_dir = dir.join("mqtt-tls");
    std::fs::create_dir_all(&tls_dir).map_err(|e| fail(&e))?;
    let write = |name: &str, text: &str| {
        let p = tls_dir.join(name);
        std::fs::write(&p, text).map_err(|e| fail(&format!("{}: {e}", p.display())))?;
        Ok::<_, HollowError>(p)
    };
    let hub_tls = cloud_hub::config::MqttTls {
        ca_file: write("ca.crt", ca.cert_pem())?,
        cert_file: Some(write("hub.crt", &hub.cert_pem)?),
        key_file: Some(write("hub.key", &hub.key_pem)?),
    };
    Ok((
        MosquittoTls {
            ca_pem: ca.cert_pem().to_owned(),
            cert_pem: server.cert_pem,
            key_pem: server.key_pem,
        },
        hub_tls,
    ))
}
