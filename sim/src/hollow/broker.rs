//! An external MQTT broker for a hollow run: Mosquitto as a child process.
//!
//! The hub's embedded broker (rumqttd) does not scale to 10,000 nodes (see
//! `sim/HOLLOW-BENCHMARKS.md`); a production fleet runs the hub against an
//! external broker. [`Mosquitto::spawn`] writes a config into a fresh
//! temporary directory (a listener on a free loopback port, anonymous access
//! on loopback only, no connection limit, no persistence, queues deep enough
//! for the hub's subscriptions to a whole fleet), starts `mosquitto -c` with
//! its output in a log file beside the config, and waits until the port
//! accepts connections. [`Mosquitto::stop`] kills it, waits for it and
//! removes the directory (kept with [`Mosquitto::keep_dir`]).
//!
//! The child inherits this process's `RLIMIT_NOFILE` soft limit: raise it
//! first ([`super::raise_fd_limit`]); Mosquitto needs one descriptor per
//! client.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::HollowError;

/// Which broker the hollow nodes and the hub meet on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BrokerKind {
    /// The hub's embedded rumqttd (the hub's default configuration).
    #[default]
    Embedded,
    /// A Mosquitto process started for the run; the hub connects to it as an
    /// external broker.
    Mosquitto,
    /// A broker that was already running (`--hub-url`/`--mqtt`): not
    /// started, not measured.
    External,
}

/// Settings of a started Mosquitto.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MosquittoOptions {
    /// The executable; `None` looks for `mosquitto` on `PATH`, then in
    /// `/usr/sbin` and `/usr/local/sbin` (where Debian puts it).
    pub bin: Option<PathBuf>,
    /// `max_queued_messages`: QoS 1 messages queued per client beyond those
    /// in flight. The hub subscribes to every node's status, reported state
    /// and events, so a desired-state change to N nodes queues up to 2N
    /// messages for it at once; Mosquitto's default (1,000) drops the rest.
    pub max_queued_messages: usize,
    /// `max_inflight_messages`: QoS 1 messages in flight to one client
    /// (Mosquitto's default is 20).
    pub max_inflight_messages: u16,
    /// Longest wait for the listener to accept connections.
    pub ready_timeout: Duration,
    /// mTLS with the shipped `deploy/mosquitto` config and ACL
    /// ([`tls_config_text`]); plain anonymous loopback ([`config_text`])
    /// when `None`.
    pub tls: Option<MosquittoTls>,
}

/// What a TLS Mosquitto needs (PEM): the hub CA it trusts for client
/// certificates, and its own server certificate and key from that CA.
#[derive(Clone, PartialEq, Eq)]
pub struct MosquittoTls {
    /// The hub CA certificate.
    pub ca_pem: String,
    /// The broker's server certificate (SAN 127.0.0.1).
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

impl std::fmt::Debug for MosquittoTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MosquittoTls").finish_non_exhaustive()
    }
}

/// The shipped Mosquitto config (`deploy/mosquitto/mosquitto.conf`).
pub const SHIPPED_CONF: &str = include_str!("../../../deploy/mosquitto/mosquitto.conf");
/// The shipped ACL (`deploy/mosquitto/acl`).
pub const SHIPPED_ACL: &str = include_str!("../../../deploy/mosquitto/acl");

/// The shipped config, adapted to one run in `dir`: its listener on
/// `127.0.0.1:port`, certificates and ACL in `dir`, no persistence, the
/// queue sizes of `opts`. Every security line (require_certificate,
/// use_identity_as_username, use_username_as_clientid, allow_anonymous,
/// acl_file) is kept as shipped.
pub fn tls_config_text(port: u16, opts: &MosquittoOptions, dir: &Path) -> String {
    let file = |name: &str| dir.join(name).display().to_string();
    let mut out =
        String::from("# deploy/mosquitto/mosquitto.conf, adapted by fleet-sim for one run\n");
    for line in SHIPPED_CONF.lines() {
        let key = line.split_whitespace().next().unwrap_or_default();
        let adapted = match key {
            "listener" => format!("listener {port} 127.0.0.1"),
            "cafile" => format!("cafile {}", file("ca.crt")),
            "certfile" => format!("certfile {}", file("broker.crt")),
            "keyfile" => format!("keyfile {}", file("broker.key")),
            "acl_file" => format!("acl_file {}", file("acl")),
            "persistence" => "persistence false".to_owned(),
            "persistence_location" => continue,
            "max_queued_messages" => format!("max_queued_messages {}", opts.max_queued_messages),
            "max_inflight_messages" => {
                format!("max_inflight_messages {}", opts.max_inflight_messages)
            }
            _ => line.to_owned(),
        };
        out.push_str(&adapted);
        out.push('\n');
    }
    out.push_str("max_connections -1\n# as root, Mosquitto would switch to the `mosquitto` user\nuser root\n");
    out
}

impl MosquittoOptions {
    /// Settings for a fleet of `nodes`: queues of 8 messages per node (and at
    /// least 10,000), 100 in flight, 10 s to start.
    pub fn for_fleet(nodes: usize) -> Self {
        Self {
            bin: None,
            max_queued_messages: nodes.saturating_mul(8).max(10_000),
            max_inflight_messages: 100,
            ready_timeout: Duration::from_secs(10),
            tls: None,
        }
    }
}

/// The message when no Mosquitto executable can be found.
pub const MOSQUITTO_MISSING: &str = "mosquitto not found on PATH, in /usr/sbin or /usr/local/sbin; install mosquitto: apt-get install mosquitto (or pass its path)";

/// Finds the `mosquitto` executable: `PATH` first, then `/usr/sbin` and
/// `/usr/local/sbin` (not on a normal user's `PATH`).
pub fn find_mosquitto() -> Result<PathBuf, HollowError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("mosquitto"))
        .find(|p| is_executable(p))
        .ok_or_else(|| HollowError::Broker(MOSQUITTO_MISSING.into()))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The `mosquitto.conf` of a run: one listener on `127.0.0.1:port`.
pub fn config_text(port: u16, opts: &MosquittoOptions) -> String {
    format!(
        "# written by fleet-sim hollow for one run\n\
         per_listener_settings false\n\
         # loopback only, so anonymous clients are the hub and the hollow nodes\n\
         listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         max_connections -1\n\
         persistence false\n\
         max_queued_messages {queued}\n\
         max_inflight_messages {inflight}\n\
         set_tcp_nodelay true\n\
         # as root, Mosquitto would switch to the `mosquitto` user\n\
         user root\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n\
         log_type notice\n\
         connection_messages false\n\
         log_timestamp_format %Y-%m-%dT%H:%M:%S\n",
        queued = opts.max_queued_messages,
        inflight = opts.max_inflight_messages,
    )
}

/// A Mosquitto child process and its directory; killed when dropped (the
/// directory is then removed as well).
#[derive(Debug)]
pub struct Mosquitto {
    child: Child,
    dir: Option<tempfile::TempDir>,
    port: u16,
    log: PathBuf,
    bin: PathBuf,
}

impl Mosquitto {
    /// Starts Mosquitto on a free loopback port with a generated config in a
    /// new temporary directory, and waits until it accepts connections.
    pub async fn spawn(opts: &MosquittoOptions) -> Result<Self, HollowError> {
        let bin = match &opts.bin {
            Some(b) if is_executable(b) => b.clone(),
            Some(b) => {
                return Err(HollowError::Broker(format!(
                    "{} is not an executable file; {MOSQUITTO_MISSING}",
                    b.display()
                )));
            }
            None => find_mosquitto()?,
        };
        let io = |what: String| move |source| HollowError::Io { what, source };
        let dir = tempfile::Builder::new()
            .prefix("fleet-sim-mosquitto-")
            .tempdir()
            .map_err(io("creating the broker directory".into()))?;
        let port = super::hub::free_port()?;
        let conf = dir.path().join("mosquitto.conf");
        let text = match &opts.tls {
            Some(tls) => {
                for (name, text) in [
                    ("ca.crt", tls.ca_pem.as_str()),
                    ("broker.crt", tls.cert_pem.as_str()),
                    ("broker.key", tls.key_pem.as_str()),
                    ("acl", SHIPPED_ACL),
                ] {
                    let p = dir.path().join(name);
                    std::fs::write(&p, text).map_err(io(format!("writing {}", p.display())))?;
                }
                tls_config_text(port, opts, dir.path())
            }
            None => config_text(port, opts),
        };
        std::fs::write(&conf, text).map_err(io(format!("writing {}", conf.display())))?;
        let log = dir.path().join("mosquitto.log");
        let out = std::fs::File::create(&log).map_err(io(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io(format!("opening {}", log.display())))?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("starting {}", bin.display())))?;
        let mut me = Self {
            child,
            dir: Some(dir),
            port,
            log,
            bin,
        };
        me.wait_ready(opts.ready_timeout).await?;
        Ok(me)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), HollowError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(HollowError::Broker(format!(
                    "mosquitto exited during start-up ({status}): {}",
                    self.log_tail()
                )));
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(HollowError::Broker(format!(
                    "mosquitto did not listen on 127.0.0.1:{} within {timeout:?}: {}",
                    self.port,
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
        if tail.is_empty() {
            format!("no output in {}", self.log.display())
        } else {
            tail
        }
    }

    /// The listener port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id (to sample its memory).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The executable that runs.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Its directory (config and log), while it exists.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(tempfile::TempDir::path)
    }

    /// Keeps the directory after [`Mosquitto::stop`]; returns its path.
    pub fn keep_dir(&mut self) -> Option<PathBuf> {
        self.dir.take().map(tempfile::TempDir::keep)
    }

    /// Whether it is still running (`Err` with its exit status if not).
    pub fn check_alive(&mut self) -> Result<(), HollowError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(HollowError::Broker(format!(
                "mosquitto exited ({status}): {}",
                self.log_tail()
            ))),
            Err(source) => Err(HollowError::Io {
                what: "checking the mosquitto process".into(),
                source,
            }),
        }
    }

    /// Kills it, waits for it and removes its directory (unless kept).
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

/// The version line of a Mosquitto executable (`mosquitto -h` prints
/// "mosquitto version X.Y.Z" first), or `None`.
pub async fn mosquitto_version(bin: &Path) -> Option<String> {
    let out = Command::new(bin)
        .arg("-h")
        .stdin(Stdio::null())
        .output()
        .await
        .ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.lines()
        .find(|l| l.starts_with("mosquitto version"))
        .map(|l| l.trim().to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    #[test]
    fn config_listens_on_loopback_without_limits_or_persistence() {
        let text = config_text(4242, &MosquittoOptions::for_fleet(10_000));
        for line in [
            "listener 4242 127.0.0.1",
            "allow_anonymous true",
            "max_connections -1",
            "persistence false",
            "max_queued_messages 80000",
            "max_inflight_messages 100",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing:\n{text}");
        }
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("listener") && !l.ends_with("127.0.0.1")),
            "every listener is on loopback"
        );
        assert_eq!(MosquittoOptions::for_fleet(10).max_queued_messages, 10_000);
    }

    #[test]
    fn the_tls_config_keeps_every_security_line_of_the_shipped_one() {
        let dir = Path::new("/run/x");
        let text = tls_config_text(4242, &MosquittoOptions::for_fleet(10_000), dir);
        for line in [
            "listener 4242 127.0.0.1",
            "allow_anonymous false",
            "require_certificate true",
            "use_identity_as_username true",
            "use_username_as_clientid true",
            "acl_file /run/x/acl",
            "cafile /run/x/ca.crt",
            "persistence false",
            "max_queued_messages 80000",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing:\n{text}");
        }
        assert!(
            !text
                .lines()
                .any(|l| !l.starts_with('#') && l.contains("/etc/mosquitto")),
            "{text}"
        );
        assert!(SHIPPED_ACL.contains("pattern write edgefleet/v1/nodes/%u/telemetry"));
        assert!(SHIPPED_ACL.contains("pattern read edgefleet/v1/nodes/%u/desired"));
    }

    #[tokio::test]
    async fn a_missing_executable_is_named_with_the_install_hint() {
        let opts = MosquittoOptions {
            bin: Some("/nonexistent/mosquitto".into()),
            ..MosquittoOptions::for_fleet(1)
        };
        let e = Mosquitto::spawn(&opts).await.unwrap_err().to_string();
        assert!(e.contains("/nonexistent/mosquitto"), "{e}");
        assert!(e.contains("apt-get install mosquitto"), "{e}");
    }
}
