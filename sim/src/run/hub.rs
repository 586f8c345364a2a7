//! The hub of a run and the REST calls the runner makes to it.
//!
//! [`Hub`] is the runner's handle: the hub's URLs and key, a REST client
//! whose answers are the hub's own API types (`cloud_hub::api`,
//! `cloud_hub::sink`, `cloud_hub::artifacts`), and a [`HubProc`] — the one
//! type through which the hub is started, killed, restarted and stopped,
//! whether it is a `fleet-sim hub` child process or an in-process
//! `cloud_hub::App`. [`spawn_logged`] and [`sigterm`] are the child-process
//! primitives, shared with the agents' [`AgentProc`](super::fleet::AgentProc).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use cloud_hub::api::SamplePage;
use cloud_hub::artifacts::ArtifactInfo;
use cloud_hub::sink::{StoredSample, StreamStats};
use protocols::DesiredState;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::scenario::{HubMode, Scenario};

/// The hub as the runner drives it.
pub(super) struct Hub {
    /// `http://127.0.0.1:PORT`.
    pub(super) base: String,
    /// The broker the agents' proxies forward to.
    pub(super) mqtt: SocketAddr,
    /// The hub's signing key (hex), pinned in every edge config.
    pub(super) public_key: String,
    proc: HubProc,
    http: reqwest::Client,
}

/// Hub child process or in-process app.
#[allow(clippy::large_enum_variant, reason = "one per run")]
enum HubProc {
    Process {
        exe: PathBuf,
        config: PathBuf,
        log: PathBuf,
        child: Option<tokio::process::Child>,
    },
    InProcess {
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<Result<(), cloud_hub::HubError>>,
    },
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// The hub config of a run: ephemeral ports, data under `dir`.
fn hub_config(s: &Scenario, dir: &Path) -> anyhow::Result<cloud_hub::HubConfig> {
    let mut cfg = cloud_hub::HubConfig {
        data_dir: dir.join("hub"),
        http_listen: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        ack_interval: s.hub.ack_interval,
        cache_capacity_bytes: s.hub.cache_capacity_bytes,
        ..cloud_hub::HubConfig::default()
    };
    if let Some(b) = cfg.embedded_broker.as_mut() {
        b.listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    }
    cfg.validate().context("hub config")?;
    Ok(cfg)
}

impl HubProc {
    /// Starts the hub as `mode` says; returns it with its HTTP base URL and
    /// broker address.
    async fn launch(
        mode: HubMode,
        cfg: cloud_hub::HubConfig,
        dir: &Path,
        hub_exe: Option<PathBuf>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<(Self, String, SocketAddr)> {
        match mode {
            HubMode::Process => {
                let exe = match hub_exe {
                    Some(e) => e,
                    None => std::env::current_exe().context("locating fleet-sim")?,
                };
                std::fs::create_dir_all(dir).context("creating the work directory")?;
                let config = dir.join("hub.toml");
                std::fs::write(&config, toml::to_string(&cfg).context("hub config")?)
                    .context("writing hub.toml")?;
                let mqtt = cfg
                    .embedded_broker
                    .as_ref()
                    .map_or(SocketAddr::from(([127, 0, 0, 1], 1883)), |b| b.listen);
                let mut proc = Self::Process {
                    exe,
                    config,
                    log: dir.join("hub.log"),
                    child: None,
                };
                let base = format!("http://{}", cfg.http_listen);
                proc.spawn_child()?;
                Ok((proc, base, mqtt))
            }
            HubMode::InProcess => {
                let token = cancel.child_token();
                let app = cloud_hub::App::start(cfg, token.clone())
                    .await
                    .context("starting cloud-hub")?;
                let base = format!("http://{}", app.http_addr());
                let (host, port) = app.mqtt_addr();
                let mqtt: SocketAddr = format!("{host}:{port}").parse()?;
                let task = tokio::spawn(app.run());
                let proc = Self::InProcess {
                    cancel: token,
                    task,
                };
                Ok((proc, base, mqtt))
            }
        }
    }

    fn spawn_child(&mut self) -> anyhow::Result<()> {
        if let Self::Process {
            exe,
            config,
            log,
            child,
        } = self
        {
            let c = spawn_logged(exe, "hub", config, log)
                .with_context(|| format!("starting the hub: {} hub", exe.display()))?;
            *child = Some(c);
        }
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Self::Process { child, .. } => child.as_ref().and_then(tokio::process::Child::id),
            Self::InProcess { .. } => None,
        }
    }

    /// SIGKILL of the child process; nothing for an in-process hub.
    async fn kill(&mut self) -> anyhow::Result<()> {
        if let Self::Process { child, .. } = self
            && let Some(mut c) = child.take()
        {
            c.kill().await.context("killing the hub")?;
        }
        Ok(())
    }

    /// Stops the hub cleanly: SIGTERM then SIGKILL after 15 s, or cancel
    /// and join the in-process app.
    async fn stop(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Process { child, .. } => {
                if let Some(mut c) = child.take() {
                    // Ask politely, then insist.
                    sigterm(&c).await;
                    if tokio::time::timeout(Duration::from_secs(15), c.wait())
                        .await
                        .is_err()
                    {
                        c.kill().await?;
                    }
                }
            }
            Self::InProcess { cancel, task } => {
                cancel.cancel();
                match tokio::time::timeout(Duration::from_secs(20), task).await {
                    Ok(Ok(r)) => r.context("cloud-hub")?,
                    Ok(Err(e)) => bail!("hub task: {e}"),
                    Err(_) => bail!("the hub did not stop within 20 s"),
                }
            }
        }
        Ok(())
    }
}

impl Hub {
    /// Starts the hub of scenario `s` and waits until it is healthy.
    pub(super) async fn start(
        s: &Scenario,
        dir: &Path,
        hub_exe: Option<PathBuf>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let cfg = hub_config(s, dir)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()?;
        let (proc, base, mqtt) = HubProc::launch(s.hub.mode, cfg, dir, hub_exe, cancel).await?;
        let mut hub = Self {
            base,
            mqtt,
            public_key: String::new(),
            proc,
            http,
        };
        hub.wait_healthy(Duration::from_secs(60)).await?;
        let info: serde_json::Value = hub
            .http
            .get(format!("{}/v1/hub", hub.base))
            .send()
            .await?
            .json()
            .await?;
        info["public_key"]
            .as_str()
            .context("hub did not tell its public key")?
            .clone_into(&mut hub.public_key);
        Ok(hub)
    }

    async fn wait_healthy(&self, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Ok(r) = self.http.get(format!("{}/healthz", self.base)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!(
                    "the hub did not become healthy at {} within {limit:?}",
                    self.base
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The hub's process id (`None` in process or while it is down).
    pub(super) fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Kills the hub process (SIGKILL: broker, sessions and unflushed sled
    /// data go with it).
    pub(super) async fn kill(&mut self) -> anyhow::Result<()> {
        self.proc.kill().await
    }

    /// Starts a killed hub process again on the same ports.
    pub(super) async fn restart(&mut self) -> anyhow::Result<()> {
        if matches!(self.proc, HubProc::Process { .. }) {
            // The ports were just released; retry while the OS frees them.
            let start = Instant::now();
            loop {
                self.proc.spawn_child()?;
                if self.wait_healthy(Duration::from_secs(10)).await.is_ok() {
                    return Ok(());
                }
                self.kill().await?;
                if start.elapsed() > Duration::from_secs(60) {
                    bail!("the hub did not come back on {}", self.base);
                }
            }
        }
        Ok(())
    }

    /// Stops the hub cleanly.
    pub(super) async fn stop(&mut self) -> anyhow::Result<()> {
        self.proc.stop().await
    }

    /// `PUT /v1/artifacts`.
    pub(super) async fn upload(&self, bytes: &'static [u8]) -> anyhow::Result<ArtifactInfo> {
        let r = self
            .http
            .put(format!("{}/v1/artifacts", self.base))
            .body(bytes)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("artifact upload refused: {}", r.text().await?);
        }
        Ok(r.json().await?)
    }

    /// `PUT /v1/nodes/{node}/desired`.
    pub(super) async fn put_desired(&self, d: &DesiredState) -> anyhow::Result<()> {
        let r = self
            .http
            .put(format!("{}/v1/nodes/{}/desired", self.base, d.node))
            .json(d)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!(
                "hub refused desired state of {} rev {}: {}",
                d.node,
                d.revision,
                r.text().await?
            );
        }
        Ok(())
    }

    /// Names of `node`'s stored streams (`GET /v1/nodes/{node}/streams`).
    pub(super) async fn streams(&self, node: &str) -> anyhow::Result<Vec<String>> {
        let v: BTreeMap<String, StreamStats> = self
            .http
            .get(format!("{}/v1/nodes/{node}/streams", self.base))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(v.into_keys().collect())
    }

    /// Every stored sample of one stream, page by page.
    pub(super) async fn samples(
        &self,
        node: &str,
        stream: &str,
    ) -> anyhow::Result<Vec<StoredSample>> {
        let mut out = Vec::new();
        let mut from = 1u64;
        loop {
            let page: SamplePage = self
                .http
                .get(format!(
                    "{}/v1/nodes/{node}/streams/{stream}/samples?from_seq={from}&limit=200000",
                    self.base
                ))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            out.extend(page.samples);
            match page.next_seq {
                Some(n) => from = n,
                None => return Ok(out),
            }
        }
    }
}

/// Starts `exe SUBCOMMAND --config CONFIG` (a `fleet-sim` child: hub or
/// agent) with stdout and stderr appended to `log`, killed if dropped.
pub(super) fn spawn_logged(
    exe: &Path,
    subcommand: &str,
    config: &Path,
    log: &Path,
) -> anyhow::Result<tokio::process::Child> {
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    Ok(tokio::process::Command::new(exe)
        .arg(subcommand)
        .arg("--config")
        .arg(config)
        .stdin(std::process::Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .kill_on_drop(true)
        .spawn()?)
}

/// Asks a child process to stop (SIGTERM, through `kill`); the caller waits.
pub(super) async fn sigterm(c: &tokio::process::Child) {
    if let Some(pid) = c.id() {
        let _ = tokio::process::Command::new("kill")
            .arg(pid.to_string())
            .status()
            .await;
    }
}
