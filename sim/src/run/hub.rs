//! The hub of a run: a `fleet-sim hub` child process or an in-process
//! `cloud_hub::App`, and the REST calls the runner makes to it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use protocols::DesiredState;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::monitor::{ArtifactInfoLite, SampleLite, SamplePageLite};
use crate::scenario::{HubMode, Scenario};

#[allow(clippy::large_enum_variant, reason = "one per run")]
pub(super) enum HubRt {
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

pub(super) struct HubCtl {
    pub(super) base: String,
    pub(super) mqtt: SocketAddr,
    pub(super) public_key: String,
    pub(super) rt: HubRt,
    pub(super) http: reqwest::Client,
}

pub(super) fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

impl HubCtl {
    pub(super) async fn start(
        s: &Scenario,
        dir: &Path,
        hub_exe: Option<PathBuf>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Self> {
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
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()?;
        let (rt, base, mqtt) = match s.hub.mode {
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
                let mut rt = HubRt::Process {
                    exe,
                    config,
                    log: dir.join("hub.log"),
                    child: None,
                };
                let base = format!("http://{}", cfg.http_listen);
                rt.spawn_child()?;
                (rt, base, mqtt)
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
                (
                    HubRt::InProcess {
                        cancel: token,
                        task,
                    },
                    base,
                    mqtt,
                )
            }
        };
        let mut hub = Self {
            base,
            mqtt,
            public_key: String::new(),
            rt,
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

    pub(super) async fn wait_healthy(&self, limit: Duration) -> anyhow::Result<()> {
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

    pub(super) fn pid(&self) -> Option<u32> {
        match &self.rt {
            HubRt::Process { child, .. } => child.as_ref().and_then(tokio::process::Child::id),
            HubRt::InProcess { .. } => None,
        }
    }

    /// Kills the hub process (SIGKILL: broker, sessions and unflushed sled
    /// data go with it).
    pub(super) async fn kill(&mut self) -> anyhow::Result<()> {
        if let HubRt::Process { child, .. } = &mut self.rt
            && let Some(mut c) = child.take()
        {
            c.kill().await.context("killing the hub")?;
        }
        Ok(())
    }

    pub(super) async fn restart(&mut self) -> anyhow::Result<()> {
        if matches!(self.rt, HubRt::Process { .. }) {
            // The ports were just released; retry while the OS frees them.
            let start = Instant::now();
            loop {
                self.rt.spawn_child()?;
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

    pub(super) async fn stop(mut self) -> anyhow::Result<()> {
        match &mut self.rt {
            HubRt::Process { child, .. } => {
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
            HubRt::InProcess { cancel, task } => {
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

    pub(super) async fn upload(&self, bytes: &'static [u8]) -> anyhow::Result<ArtifactInfoLite> {
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

    pub(super) async fn streams(&self, node: &str) -> anyhow::Result<Vec<String>> {
        let v: BTreeMap<String, serde_json::Value> = self
            .http
            .get(format!("{}/v1/nodes/{node}/streams", self.base))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(v.into_keys().collect())
    }

    pub(super) async fn samples(
        &self,
        node: &str,
        stream: &str,
    ) -> anyhow::Result<Vec<SampleLite>> {
        let mut out = Vec::new();
        let mut from = 1u64;
        loop {
            let page: SamplePageLite = self
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

impl HubRt {
    pub(super) fn spawn_child(&mut self) -> anyhow::Result<()> {
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
