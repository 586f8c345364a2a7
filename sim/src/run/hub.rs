//! The hub of a run and the REST calls the runner makes to it.
//!
//! [`Hub`] is the runner's handle: the hub's broker address and key, its
//! typed REST client ([`HubClient`], answers as [`protocols::api`] types,
//! errors with the hub's own message), and a [`HubProc`] — the one
//! type through which the hub is started, killed, restarted and stopped,
//! whether it is a `fleet-sim hub` child process or an in-process
//! `cloud_hub::App`. [`spawn_logged`] and [`sigterm`] are the child-process
//! primitives, shared with the agents' [`AgentProc`](super::fleet::AgentProc).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use cloud_hub::client::HubClient;
use edgefleet_testkit::{free_port, wait_until};
use protocols::DesiredState;
use protocols::api::{ArtifactInfo, SampleQuery, StoredSample};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::scenario::{HubMode, Scenario};

/// The hub as the runner drives it.
pub(super) struct Hub {
    /// Typed client of its REST API (base `https://127.0.0.1:PORT`), as
    /// the admin whose token the hub wrote at first start.
    pub(super) client: HubClient,
    /// The broker the agents' proxies forward to.
    pub(super) mqtt: SocketAddr,
    /// The hub's signing key (hex), pinned in every edge config.
    pub(super) public_key: String,
    /// Its data directory (admin token, CA certificate).
    data_dir: PathBuf,
    proc: HubProc,
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

/// The hub config of a run: ephemeral ports, data under `dir`.
fn hub_config(s: &Scenario, dir: &Path) -> anyhow::Result<cloud_hub::HubConfig> {
    let mut cfg = cloud_hub::HubConfig {
        data_dir: dir.join("hub"),
        http_listen: SocketAddr::from((
            [127, 0, 0, 1],
            free_port().context("finding a free port")?,
        )),
        ack_interval: s.hub.ack_interval,
        cache_capacity_bytes: s.hub.cache_capacity_bytes,
        ..cloud_hub::HubConfig::default()
    };
    if let Some(b) = cfg.embedded_broker.as_mut() {
        b.listen = SocketAddr::from(([127, 0, 0, 1], free_port().context("finding a free port")?));
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
                let scheme = if cfg.http.tls { "https" } else { "http" };
                let base = format!("{scheme}://{}", cfg.http_listen);
                proc.spawn_child()?;
                Ok((proc, base, mqtt))
            }
            HubMode::InProcess => {
                let token = cancel.child_token();
                let app = cloud_hub::App::start(cfg, token.clone())
                    .await
                    .context("starting cloud-hub")?;
                let base = app.http_url();
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
    /// Per-request timeout of the runner's client: a read-back of a big
    /// stream is one large page.
    const TIMEOUT: Duration = Duration::from_secs(120);

    /// Starts the hub of scenario `s` and waits until it is healthy.
    pub(super) async fn start(
        s: &Scenario,
        dir: &Path,
        hub_exe: Option<PathBuf>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let cfg = hub_config(s, dir)?;
        let data_dir = cfg.data_dir.clone();
        let (proc, base, mqtt) = HubProc::launch(s.hub.mode, cfg, dir, hub_exe, cancel).await?;
        // Until the hub made its CA and admin token: health needs neither.
        let unauthenticated = HubClient::with_options(
            base.clone(),
            &cloud_hub::client::ClientOptions {
                ca_pem: None,
                ..cloud_hub::client::ClientOptions::default()
            },
        )?;
        let mut hub = Self {
            client: unauthenticated,
            mqtt,
            public_key: String::new(),
            data_dir: data_dir.clone(),
            proc,
        };
        let ca = data_dir.join("ca").join("ca.crt");
        wait_until(
            "the hub's CA and admin token",
            Duration::from_secs(60),
            || async { (ca.exists() && data_dir.join("admin.token").exists()).then_some(()) },
        )
        .await?;
        hub.client = HubClient::local_admin(base, &data_dir, Self::TIMEOUT)?;
        hub.wait_healthy(Duration::from_secs(60)).await?;
        hub.public_key = hub
            .client
            .hub_info()
            .await
            .context("asking the hub for its public key")?
            .public_key;
        Ok(hub)
    }

    /// Another admin client of the hub, with its own per-request timeout.
    pub(super) fn admin_client(&self, timeout: Duration) -> anyhow::Result<HubClient> {
        Ok(HubClient::local_admin(
            self.base(),
            &self.data_dir,
            timeout,
        )?)
    }

    async fn wait_healthy(&self, limit: Duration) -> anyhow::Result<()> {
        let what = format!("the hub to become healthy at {}", self.client.base());
        wait_until(&what, limit, || async { self.client.healthy().await.ok() }).await?;
        Ok(())
    }

    /// The REST API's base URL, `https://127.0.0.1:PORT`.
    pub(super) fn base(&self) -> &str {
        self.client.base()
    }

    /// Gives `node` (data in `data_dir`) its identity the way an operator
    /// would: a join token from the hub, then `edge-node join`.
    pub(super) async fn enroll(&self, node: &str, data_dir: &Path) -> anyhow::Result<()> {
        if !self.base().starts_with("https://") {
            return Ok(());
        }
        let token = self.client.bootstrap(node).await?.token;
        edge_node::identity::join(self.base(), &token, data_dir)
            .await
            .with_context(|| format!("joining node {node}"))?;
        Ok(())
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
                    bail!("the hub did not come back on {}", self.base());
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
        self.client
            .put_artifact(bytes.to_vec())
            .await
            .context("artifact upload refused")
    }

    /// `PUT /v1/nodes/{node}/desired`.
    pub(super) async fn put_desired(&self, d: &DesiredState) -> anyhow::Result<()> {
        self.client.put_desired(d).await.with_context(|| {
            format!("hub refused desired state of {} rev {}", d.node, d.revision)
        })?;
        Ok(())
    }

    /// Names of `node`'s stored streams (`GET /v1/nodes/{node}/streams`).
    pub(super) async fn streams(&self, node: &str) -> anyhow::Result<Vec<String>> {
        Ok(self.client.streams(node).await?.into_keys().collect())
    }

    /// Every stored sample of one stream, in pages of [`Self::PAGE`].
    pub(super) async fn samples(
        &self,
        node: &str,
        stream: &str,
    ) -> anyhow::Result<Vec<StoredSample>> {
        let mut out = Vec::new();
        let mut next = Some(1u64);
        while let Some(from_seq) = next {
            let query = SampleQuery {
                from_seq: Some(from_seq),
                limit: Some(Self::PAGE),
                ..SampleQuery::default()
            };
            let page = self.client.samples(node, stream, &query).await?;
            out.extend(page.samples);
            next = page.next_seq;
        }
        Ok(out)
    }

    /// Page size of [`Hub::samples`]: fewer round trips than the hub's
    /// default page for the long streams of a run.
    const PAGE: usize = 200_000;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    fn desired(node: &str, revision: u64) -> DesiredState {
        serde_json::from_value(serde_json::json!({"node": node, "revision": revision})).unwrap()
    }

    /// The runner's calls go through the typed client: an upload answers
    /// its digest, streams and samples of a node without data are empty,
    /// and a refused put names the node, the revision and the hub's reason.
    #[tokio::test]
    async fn in_process_hub_answers_through_the_client() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/smoke.toml");
        let mut s = Scenario::load(&path).unwrap();
        s.hub.mode = HubMode::InProcess;
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let mut hub = Hub::start(&s, dir.path(), None, &cancel).await.unwrap();
        assert_eq!(hub.public_key.len(), 64, "{}", hub.public_key);
        assert!(
            hub.base().starts_with("https://127.0.0.1:"),
            "{}",
            hub.base()
        );
        assert_eq!(hub.pid(), None);

        let art = hub.upload(b"not really wasm").await.unwrap();
        assert_eq!(art.size, 15);
        assert_eq!(art.sha256.len(), 64);

        assert!(hub.streams("n1").await.unwrap().is_empty());
        assert!(hub.samples("n1", "nothing").await.unwrap().is_empty());

        // The hub assigns revisions: 1 is next; 1 again is refused.
        hub.put_desired(&desired("n1", 1)).await.unwrap();
        let e = hub.put_desired(&desired("n1", 1)).await.unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("hub refused desired state of n1 rev 1"),
            "{msg}"
        );
        assert!(msg.contains("409") && msg.contains("revision"), "{msg}");
        hub.stop().await.unwrap();
    }
}
