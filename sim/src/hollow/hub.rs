//! The hub under test as a separate process, and memory readings from `/proc`.
//!
//! 10,000 MQTT connections need 10,000 file descriptors on each side, so the
//! hub (with its embedded broker, or connected to an external one) runs in
//! its own process with its own descriptor table. [`HubProcess::spawn`]
//! writes a [`HubConfig`] to a TOML file, starts `BIN [ARGS…] --config FILE`
//! with stdout and stderr going to a log file beside it, and waits until
//! `/healthz` answers.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cloud_hub::HubConfig;
use tokio::process::{Child, Command};

use super::{BrokerKind, HollowError};

/// Where the hollow fleet finds the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubEndpoint {
    /// REST API base, e.g. `http://127.0.0.1:8080`.
    pub http_base: String,
    /// Broker host.
    pub mqtt_host: String,
    /// Broker port.
    pub mqtt_port: u16,
    /// Whether the broker wants TLS with client certificates from the hub
    /// CA (the embedded broker's default; a Mosquitto stack started with
    /// TLS): each hollow node then gets its own certificate, issued in this
    /// process from the CA in `data_dir`.
    pub mqtt_tls: bool,
    /// The hub's process id, to sample its memory (`None`: not sampled).
    pub pid: Option<u32>,
    /// The external broker's process id, to sample its memory (`None`: the
    /// broker is embedded in the hub, or not ours to measure).
    pub broker_pid: Option<u32>,
    /// Which broker it is.
    pub broker: BrokerKind,
    /// Whether the hub runs inside this process (its memory then includes
    /// the hollow nodes').
    pub in_process: bool,
    /// The hub's data directory when it is local: the admin token and the
    /// CA certificate are read from it (`None`: an unauthenticated client).
    pub data_dir: Option<PathBuf>,
}

/// A hub child process; killed when dropped.
#[derive(Debug)]
pub struct HubProcess {
    child: Child,
    endpoint: HubEndpoint,
    log: PathBuf,
}

/// Reserves a free loopback port ([`edgefleet_testkit::free_port`]), as a
/// [`HollowError`].
pub(crate) fn free_port() -> Result<u16, HollowError> {
    edgefleet_testkit::free_port().map_err(|source| HollowError::Io {
        what: "reserving a loopback port".into(),
        source,
    })
}

impl HubProcess {
    /// Starts `bin args… --config <dir>/hub.toml` with `cfg` and waits up to
    /// `ready_timeout` for `/healthz`. Its data dir and HTTP address are set
    /// here (`dir`, a free loopback port); so is the embedded broker's
    /// address when `cfg.embedded_broker` is set. When it is `None` the hub
    /// connects to the external broker `cfg.mqtt`, which is also where the
    /// hollow nodes connect.
    pub async fn spawn(
        bin: &Path,
        args: &[String],
        mut cfg: HubConfig,
        dir: &Path,
        log_filter: &str,
        ready_timeout: Duration,
    ) -> Result<Self, HollowError> {
        let io = |what: String| move |source| HollowError::Io { what, source };
        cfg.data_dir = dir.join("data");
        let http_port = free_port()?;
        cfg.http_listen = ([127, 0, 0, 1], http_port).into();
        let (mqtt_host, mqtt_port, mqtt_tls) = match &mut cfg.embedded_broker {
            Some(broker) => {
                let port = free_port()?;
                broker.listen = ([127, 0, 0, 1], port).into();
                ("127.0.0.1".to_owned(), port, broker.tls)
            }
            None => (cfg.mqtt.host.clone(), cfg.mqtt.port, cfg.mqtt.tls.is_some()),
        };
        cfg.validate()
            .map_err(|e| HollowError::Config(format!("hub config: {e}")))?;
        let toml = toml::to_string(&cfg)
            .map_err(|e| HollowError::Config(format!("hub config does not serialize: {e}")))?;
        let cfg_path = dir.join("hub.toml");
        std::fs::write(&cfg_path, toml).map_err(io(format!("writing {}", cfg_path.display())))?;
        let log = dir.join("hub.log");
        let out = std::fs::File::create(&log).map_err(io(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io(format!("opening {}", log.display())))?;
        let child = Command::new(bin)
            .args(args)
            .arg("--config")
            .arg(&cfg_path)
            .env("RUST_LOG", log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("starting hub {}", bin.display())))?;
        let endpoint = HubEndpoint {
            http_base: format!(
                "{}://127.0.0.1:{http_port}",
                if cfg.http.tls { "https" } else { "http" }
            ),
            mqtt_host,
            mqtt_port,
            mqtt_tls,
            pid: child.id(),
            broker_pid: None,
            broker: if cfg.embedded_broker.is_some() {
                BrokerKind::Embedded
            } else {
                BrokerKind::External
            },
            in_process: false,
            data_dir: Some(cfg.data_dir.clone()),
        };
        let mut me = Self {
            child,
            endpoint,
            log,
        };
        me.wait_ready(ready_timeout).await?;
        Ok(me)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), HollowError> {
        let url = format!("{}/healthz", self.endpoint.http_base);
        let deadline = tokio::time::Instant::now() + timeout;
        // The hub creates its CA at first start (unless fleet-sim made it
        // beforehand for Mosquitto): the client trusts it once it exists.
        let mut client = None;
        loop {
            if client.is_none()
                && let Ok(ca_pem) = std::fs::read_to_string(cfg_ca(&self.endpoint))
            {
                client = Some(
                    cloud_hub::client::HubClient::with_options(
                        self.endpoint.http_base.clone(),
                        &cloud_hub::client::ClientOptions {
                            ca_pem: Some(ca_pem),
                            ..cloud_hub::client::ClientOptions::default()
                        },
                    )
                    .map_err(|e| HollowError::Hub(e.to_string()))?,
                );
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(HollowError::Hub(format!(
                    "hub exited during start-up ({status}); see {}",
                    self.log.display()
                )));
            }
            if let Some(c) = &client
                && c.healthy().await.is_ok()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(HollowError::Hub(format!(
                    "hub did not answer {url} within {timeout:?}; see {}",
                    self.log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Where to reach it.
    pub fn endpoint(&self) -> &HubEndpoint {
        &self.endpoint
    }

    /// Records which broker it uses and that broker's process (for memory
    /// sampling), when the caller started one.
    pub fn set_broker(&mut self, kind: BrokerKind, pid: Option<u32>) {
        self.endpoint.broker = kind;
        self.endpoint.broker_pid = pid;
    }

    /// Its log file (stdout and stderr).
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Whether it is still running (`Err` with its exit status if not).
    pub fn check_alive(&mut self) -> Result<(), HollowError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(HollowError::Hub(format!(
                "hub exited ({status}); see {}",
                self.log.display()
            ))),
            Err(source) => Err(HollowError::Io {
                what: "checking the hub process".into(),
                source,
            }),
        }
    }

    /// Kills it and waits for it.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Memory of a process from `/proc/{pid}/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// Resident set size now (`VmRSS`), bytes.
    pub rss_bytes: u64,
    /// Peak resident set size (`VmHWM`), bytes.
    pub hwm_bytes: u64,
}

/// Reads `VmRSS` and `VmHWM` of `pid` (`None` if the process is gone or
/// this is not Linux).
pub fn memory(pid: u32) -> Option<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(parse_status(&text))
}

fn parse_status(text: &str) -> Memory {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    Memory {
        rss_bytes: field("VmRSS:"),
        hwm_bytes: field("VmHWM:"),
    }
}

/// Where the CA certificate of a local hub is (an empty path when unknown).
fn cfg_ca(ep: &HubEndpoint) -> PathBuf {
    ep.data_dir
        .as_ref()
        .map(|d| d.join("ca").join("ca.crt"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    #[test]
    fn proc_status_fields_are_read_in_bytes() {
        let m = parse_status("Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n");
        assert_eq!(
            m,
            Memory {
                rss_bytes: 1024 * 1024,
                hwm_bytes: 2048 * 1024
            }
        );
        let me = memory(std::process::id()).unwrap();
        assert!(me.rss_bytes > 0 && me.hwm_bytes >= me.rss_bytes);
    }
}
