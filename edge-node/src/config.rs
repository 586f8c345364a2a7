//! Agent configuration: typed, documented, with defaults.
//!
//! Layering: built-in defaults < TOML file < environment (`EDGEFLEET_…`) <
//! command-line flags. [`EdgeConfig::validate`] returns every problem with the
//! field that has it; the binary exits with status 64 on any. The loading
//! skeleton and [`ConfigError`] are shared with the hub ([`protocols::config`]).

use std::path::PathBuf;
use std::time::Duration;

use protocols::config;
use protocols::validate::{Collector, Path, ValidationErrors, check_name};
use serde::{Deserialize, Serialize};

use crate::store::{OutboxLimits, OverflowPolicy, StoreConfig};

/// Why configuration could not be loaded (shared with the hub: the file, the
/// variable or the field is named in the message).
pub use protocols::config::ConfigError;

/// Everything the agent needs to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// This node's name; also its MQTT client id unless `mqtt.client_id` is set.
    pub node: String,
    /// Directory of the sled database and artifacts.
    pub data_dir: PathBuf,
    /// Broker connection.
    pub mqtt: MqttConfig,
    /// Hub trust and topic scheme.
    pub hub: HubConfig,
    /// Outbox capacity and group commit.
    pub outbox: OutboxConfig,
    /// Upstream pacing.
    pub uplink: UplinkConfig,
    /// sled page cache in bytes.
    pub cache_capacity_bytes: u64,
    /// What desired state may make this gateway touch (`[policy]`): the
    /// cloud cannot override it ([`crate::policy`]).
    pub policy: crate::policy::PolicyConfig,
    /// Bounds on device functions (`[functions]`): kv quota, log rate.
    pub functions: FunctionsConfig,
    /// Device connections (`[devices]`): clock skew, secrets.
    pub devices: DevicesConfig,
    /// Renewal of the joined identity (`[identity]`, [`crate::renewal`]).
    pub identity: IdentityConfig,
}

/// `[identity]`: when and how the agent renews its certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Renew once this fraction of the certificate's validity has passed
    /// (0 < renew_after < 1; default 0.66: a 30-day certificate is renewed
    /// after about 20 days, leaving 10 days to retry).
    pub renew_after: f64,
    /// First delay after a failed renewal.
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    /// Longest delay between renewal attempts (jittered exponential
    /// backoff in between).
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
}

impl IdentityConfig {
    fn check(&self, c: &mut Collector, id: &Path) {
        if !(self.renew_after > 0.0 && self.renew_after < 1.0) {
            c.push(
                &id.field("renew_after"),
                format!(
                    "{} is not a fraction of the validity strictly between 0 and 1",
                    self.renew_after
                ),
            );
        }
        if self.retry_min.is_zero() || self.retry_min > self.retry_max {
            c.push(&id.field("retry_min"), "must be > 0 and <= retry_max");
        }
    }
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            renew_after: 0.66,
            retry_min: Duration::from_secs(10),
            retry_max: Duration::from_secs(600),
        }
    }
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            node: "edge-1".into(),
            data_dir: PathBuf::from("data/edge-1"),
            mqtt: MqttConfig::default(),
            hub: HubConfig::default(),
            outbox: OutboxConfig::default(),
            uplink: UplinkConfig::default(),
            cache_capacity_bytes: 64 * 1024 * 1024,
            policy: crate::policy::PolicyConfig::default(),
            functions: FunctionsConfig::default(),
            devices: DevicesConfig::default(),
            identity: IdentityConfig::default(),
        }
    }
}

/// MQTT broker connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Client id (default: the node name). Fixed, so the session persists.
    pub client_id: Option<String>,
    /// Keep-alive interval.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// TLS files. When absent, a joined node (one with
    /// `{data_dir}/identity`, from `edge-node join`) uses TLS with its
    /// identity: `node.crt`/`node.key` as client certificate, trusting only
    /// `ca.crt` (the hub CA). A node with neither connects over plain TCP.
    pub tls: Option<TlsConfig>,
    /// Connect over plain TCP even when joined (a lab broker without TLS);
    /// `[mqtt.tls]` must then be unset.
    pub plaintext: bool,
    /// Username for external brokers that want one (with `password_file`).
    pub username: Option<String>,
    /// File whose first line is the MQTT password (keep it 0600).
    pub password_file: Option<PathBuf>,
    /// Shortest reconnect delay.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest reconnect delay (jittered exponential backoff in between).
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: None,
            keep_alive: Duration::from_secs(15),
            tls: None,
            plaintext: false,
            username: None,
            password_file: None,
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
        }
    }
}

/// TLS files (PEM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA certificate(s) that sign the broker's certificate.
    pub ca_file: PathBuf,
    /// Client certificate for mTLS.
    pub cert_file: Option<PathBuf>,
    /// Client private key for mTLS.
    pub key_file: Option<PathBuf>,
}

/// Hub trust and topics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// MQTT topic root shared with the hub.
    pub topic_root: String,
    /// Hex Ed25519 public key of the hub. When unset, the key `edge-node
    /// join` wrote to `{data_dir}/identity/hub.pub` is used; with neither
    /// (and no `insecure_trust_first_use`) the agent refuses to start.
    pub public_key: Option<String>,
    /// Opt-in trust on first use: with no `public_key` and no identity,
    /// pin whichever key signs the first desired document received. Anyone
    /// who can publish to the node's desired topic before the hub does
    /// (a rogue broker, a broker without ACLs) then owns the node for good.
    pub insecure_trust_first_use: bool,
    /// Base URL of the hub's HTTP API, where artifacts (WASM modules,
    /// models) are downloaded from: `{http_url}/v1/artifacts/{sha256}`.
    pub http_url: String,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            topic_root: protocols::Topics::DEFAULT_ROOT.into(),
            public_key: None,
            insecure_trust_first_use: false,
            http_url: "https://127.0.0.1:8080".into(),
        }
    }
}

/// Outbox capacity and durability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Expected post-filter rate (samples/s), used to size the default capacity.
    pub expected_rate: u64,
    /// Capacity in bytes per stream; default: 48 h at `expected_rate`, 12 bytes
    /// per sample, times 1.5 margin.
    pub max_bytes: Option<u64>,
    /// Samples older than this are dropped.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// `drop-oldest` (default) or `reject-new`.
    pub policy: OverflowPolicy,
    /// Group-commit interval: the loss window on a crash.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            expected_rate: 100,
            max_bytes: None,
            max_age: Duration::from_secs(7 * 24 * 3600),
            policy: OverflowPolicy::DropOldest,
            flush_interval: Duration::from_millis(100),
        }
    }
}

impl OutboxConfig {
    /// Effective byte capacity per stream.
    pub fn effective_max_bytes(&self) -> u64 {
        self.max_bytes
            .unwrap_or_else(|| self.expected_rate.saturating_mul(48 * 3600 * 12 * 3 / 2))
    }
}

/// Upstream pacing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UplinkConfig {
    /// Backlog drain rate, samples/s per stream (live data is not limited).
    pub drain_rate: u64,
    /// Samples published but not yet acked, per stream (drain only).
    pub max_in_flight_samples: u64,
    /// With unacked data and no ack progress for this long, resend from the last ack.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        Self {
            drain_rate: 20_000,
            max_in_flight_samples: 100_000,
            ack_timeout: Duration::from_secs(20),
        }
    }
}

impl EdgeConfig {
    /// Parses TOML text (unknown fields are errors).
    pub fn from_toml(text: &str, path: &std::path::Path) -> Result<Self, ConfigError> {
        config::parse_file(path, text, |t: &str| toml::from_str(t))
    }

    /// Loads defaults < file (if given) < environment from `env` (a lookup
    /// function, so tests need not touch the process environment).
    pub fn load(
        file: Option<&std::path::Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        config::load(
            file,
            |p: &std::path::Path| std::fs::read_to_string(p),
            |t: &str| toml::from_str(t),
            |cfg: &mut Self| cfg.apply_env(&env),
        )
    }

    fn apply_env(&mut self, env: &impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = env("EDGEFLEET_NODE") {
            self.node = v;
        }
        if let Some(v) = env("EDGEFLEET_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = env("EDGEFLEET_MQTT_HOST") {
            self.mqtt.host = v;
        }
        if let Some(port) = config::env_parse(env, "EDGEFLEET_MQTT_PORT")? {
            self.mqtt.port = port;
        }
        if let Some(v) = env("EDGEFLEET_HUB_PUBLIC_KEY") {
            self.hub.public_key = Some(v);
        }
        if let Some(v) = env("EDGEFLEET_HUB_HTTP_URL") {
            self.hub.http_url = v;
        }
        if let Some(v) = env("EDGEFLEET_TOPIC_ROOT") {
            self.hub.topic_root = v;
        }
        Ok(())
    }

    /// Every problem, each naming its field.
    #[expect(
        clippy::too_many_lines,
        reason = "one flat check per field, in the order of the fields"
    )]
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut c = Collector::new();
        let root = Path::Root;
        check_name(&mut c, &root.field("node"), &self.node);
        crate::policy::Policy::validate_at(&self.policy, &mut c, &root.field("policy"));
        if self.data_dir.as_os_str().is_empty() {
            c.push(&root.field("data_dir"), "must not be empty");
        }
        let m = root.field("mqtt");
        if self.mqtt.host.trim().is_empty() {
            c.push(&m.field("host"), "must not be empty");
        }
        if self.mqtt.port == 0 {
            c.push(&m.field("port"), "0 is not a usable port");
        }
        if let Some(id) = &self.mqtt.client_id {
            check_name(&mut c, &m.field("client_id"), id);
        }
        if self.mqtt.keep_alive < Duration::from_secs(5) {
            c.push(
                &m.field("keep_alive"),
                "must be at least 5s (rumqttc minimum)",
            );
        }
        if self.mqtt.reconnect_min.is_zero() || self.mqtt.reconnect_min > self.mqtt.reconnect_max {
            c.push(
                &m.field("reconnect_min"),
                "must be > 0 and <= reconnect_max",
            );
        }
        if let Some(tls) = &self.mqtt.tls {
            let t = m.field("tls");
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                c.push(&t.field("key_file"), "cert_file and key_file go together");
            }
            if self.mqtt.plaintext {
                c.push(&m.field("plaintext"), "contradicts [mqtt.tls]");
            }
        }
        if let Some(u) = &self.mqtt.username
            && u.is_empty()
        {
            c.push(&m.field("username"), "must not be empty");
        }
        if self.mqtt.password_file.is_some() && self.mqtt.username.is_none() {
            c.push(&m.field("password_file"), "needs mqtt.username");
        }
        self.identity.check(&mut c, &root.field("identity"));
        let h = root.field("hub");
        config::check_topic_root(&mut c, &h.field("topic_root"), &self.hub.topic_root);
        if let Some(k) = &self.hub.public_key
            && protocols::signing::key_from_hex(k).is_err()
        {
            c.push(
                &h.field("public_key"),
                format!("{k:?} is not 64 hex characters of an Ed25519 key"),
            );
        }
        if self.hub.public_key.is_none()
            && !self.hub.insecure_trust_first_use
            && !crate::identity::dir(&self.data_dir).exists()
        {
            c.push(
                &h.field("public_key"),
                "must be set (or run `edge-node join`, or opt in to hub.insecure_trust_first_use = true)",
            );
        }
        if !valid_http_url(&self.hub.http_url) {
            c.push(
                &h.field("http_url"),
                format!(
                    "{:?} is not an https:// (or http://) URL with a host (e.g. https://hub:8080)",
                    self.hub.http_url
                ),
            );
        }
        let o = root.field("outbox");
        if self.outbox.effective_max_bytes() < 64 * 1024 {
            c.push(&o.field("max_bytes"), "must be at least 65536");
        }
        if self.outbox.flush_interval.is_zero()
            || self.outbox.flush_interval > Duration::from_secs(10)
        {
            c.push(&o.field("flush_interval"), "must be between 1ms and 10s");
        }
        if self.outbox.max_age < Duration::from_secs(60) {
            c.push(&o.field("max_age"), "must be at least 60s");
        }
        let u = root.field("uplink");
        if self.uplink.drain_rate == 0 {
            c.push(&u.field("drain_rate"), "must be greater than 0");
        }
        if self.uplink.max_in_flight_samples == 0 {
            c.push(&u.field("max_in_flight_samples"), "must be greater than 0");
        }
        config::check_cache_capacity(
            &mut c,
            &root.field("cache_capacity_bytes"),
            self.cache_capacity_bytes,
        );
        self.functions.validate_at(&mut c, &root.field("functions"));
        self.devices.validate_at(&mut c, &root.field("devices"));
        c.finish()
    }

    /// The MQTT client id.
    pub fn client_id(&self) -> &str {
        self.mqtt.client_id.as_deref().unwrap_or(&self.node)
    }

    /// Driver settings derived from this config: the OPC UA client PKI in
    /// `{data_dir}/opcua-pki` (created 0700 by [`crate::datadir::prepare`]),
    /// never in a shared temporary directory (L4).
    /// MQTT and OPC UA devices' secrets come from `[devices] secrets_dir`
    /// (default `{data_dir}/device-secrets`).
    pub fn driver_options(&self) -> crate::drivers::DriverOptions {
        let mut o = crate::drivers::DriverOptions::default();
        o.opcua.pki_dir = self.data_dir.join(crate::datadir::OPCUA_PKI);
        o.mqtt.max_future_skew = self.devices.mqtt_max_future_skew;
        let secrets = self
            .devices
            .secrets_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join(DevicesConfig::SECRETS_DIR));
        o.opcua.secrets_dir = Some(secrets.clone());
        o.mqtt.secrets_dir = Some(secrets);
        o
    }

    /// Store settings derived from this config.
    pub fn store_config(&self) -> StoreConfig {
        StoreConfig {
            path: self.data_dir.join("db"),
            cache_capacity_bytes: self.cache_capacity_bytes,
            outbox: OutboxLimits {
                max_bytes: self.outbox.effective_max_bytes(),
                max_age: self.outbox.max_age,
                policy: self.outbox.policy,
            },
        }
    }
}

/// Bounds the gateway puts on every device function (`[functions]`),
/// whatever desired state asks for.
///
/// ```toml
/// [functions]
/// kv_max_keys = 10000          # keys per function
/// kv_max_bytes = 67108864      # keys + values per function (64 MiB)
/// log_lines_per_second = 20    # sustained guest log rate per function
/// log_burst = 100              # guest log lines allowed at once
/// component_cache_entries = 32 # compiled modules kept in memory
/// component_cache_bytes = 268435456   # their compiled code at most (256 MiB)
/// cpu_share_percent = 25       # share of wall time one function may spend in calls
/// cpu_burst = "2s"             # call time allowed at once beyond that share
/// cpu_backoff_max = "5m"       # longest hold of a function over its budget
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FunctionsConfig {
    /// Keys one function may keep in its kv store. Default 10 000.
    pub kv_max_keys: u64,
    /// Bytes (keys plus values) one function may keep in its kv store.
    /// Default 64 MiB.
    pub kv_max_bytes: u64,
    /// Guest log lines per second one function may write, sustained
    /// (token bucket refill). Default 20.
    pub log_lines_per_second: u32,
    /// Guest log lines one function may write at once (bucket size).
    /// Default 100.
    pub log_burst: u32,
    /// Compiled components kept in memory at most. Modules the current or
    /// the previous desired state uses are always kept; others are evicted
    /// least recently used first (counted: `function_modules_evicted`).
    /// Default 32.
    pub component_cache_entries: usize,
    /// Bytes of compiled code kept in memory at most, under the same rule.
    /// Default 256 MiB.
    pub component_cache_bytes: u64,
    /// Percentage (1..=100) of wall-clock time one function may spend in
    /// its calls, sustained. Calls run one at a time, so a function over
    /// it is held back (1 s, doubling up to `cpu_backoff_max`; reported as
    /// `backoff`, counted: `throttled`, `function_throttled`) and the
    /// others keep their time. Default 25.
    pub cpu_share_percent: u32,
    /// Call time a function may use at once beyond its share. Default 2 s
    /// (two calls at the longest deadline desired state allows).
    #[serde(with = "humantime_serde")]
    pub cpu_burst: Duration,
    /// Longest hold of a function over its budget. Default 5 min.
    #[serde(with = "humantime_serde")]
    pub cpu_backoff_max: Duration,
}

impl Default for FunctionsConfig {
    fn default() -> Self {
        Self {
            kv_max_keys: 10_000,
            kv_max_bytes: 64 * 1024 * 1024,
            log_lines_per_second: 20,
            log_burst: 100,
            component_cache_entries: 32,
            component_cache_bytes: 256 * 1024 * 1024,
            cpu_share_percent: 25,
            cpu_burst: Duration::from_secs(2),
            cpu_backoff_max: Duration::from_mins(5),
        }
    }
}

impl FunctionsConfig {
    /// Smallest accepted `kv_max_bytes`.
    pub const MIN_KV_BYTES: u64 = 4096;
    /// Smallest accepted `component_cache_bytes` (1 MiB).
    pub const MIN_COMPONENT_CACHE_BYTES: u64 = 1 << 20;

    fn validate_at(&self, c: &mut Collector, f: &Path<'_>) {
        if !(1..=10_000_000).contains(&self.kv_max_keys) {
            c.push(
                &f.field("kv_max_keys"),
                format!("{} is out of range 1..=10000000", self.kv_max_keys),
            );
        }
        if self.kv_max_bytes < Self::MIN_KV_BYTES {
            c.push(
                &f.field("kv_max_bytes"),
                format!("{} is less than {}", self.kv_max_bytes, Self::MIN_KV_BYTES),
            );
        }
        if !(1..=100_000).contains(&self.log_lines_per_second) {
            c.push(
                &f.field("log_lines_per_second"),
                format!("{} is out of range 1..=100000", self.log_lines_per_second),
            );
        }
        if !(1..=100_000).contains(&self.log_burst) {
            c.push(
                &f.field("log_burst"),
                format!("{} is out of range 1..=100000", self.log_burst),
            );
        }
        if !(1..=4096).contains(&self.component_cache_entries) {
            c.push(
                &f.field("component_cache_entries"),
                format!("{} is out of range 1..=4096", self.component_cache_entries),
            );
        }
        if !(1..=100).contains(&self.cpu_share_percent) {
            c.push(
                &f.field("cpu_share_percent"),
                format!("{} is out of range 1..=100", self.cpu_share_percent),
            );
        }
        if self.cpu_burst < Duration::from_millis(10) || self.cpu_burst > Duration::from_mins(1) {
            c.push(&f.field("cpu_burst"), "must be between 10ms and 1m");
        }
        if self.cpu_backoff_max < Duration::from_secs(1)
            || self.cpu_backoff_max > Duration::from_secs(3600)
        {
            c.push(&f.field("cpu_backoff_max"), "must be between 1s and 1h");
        }
        if self.component_cache_bytes < Self::MIN_COMPONENT_CACHE_BYTES {
            c.push(
                &f.field("component_cache_bytes"),
                format!(
                    "{} is less than {}",
                    self.component_cache_bytes,
                    Self::MIN_COMPONENT_CACHE_BYTES
                ),
            );
        }
    }
}

/// Device connections (`[devices]`).
///
/// ```toml
/// [devices]
/// mqtt_max_future_skew = "5m"   # MQTT device messages stamped further ahead are refused
/// secrets_dir = "/etc/edgefleet/device-secrets"   # default {data_dir}/device-secrets
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevicesConfig {
    /// An MQTT-native device message whose `ts_ms` is further ahead of this
    /// gateway's clock is refused (counted, the device's last error).
    /// Default 5 minutes.
    #[serde(with = "humantime_serde")]
    pub mqtt_max_future_skew: Duration,
    /// Directory of the files MQTT devices may name as `ca_file` and
    /// `password_file` (plain names: desired state can only choose among
    /// them). Default `{data_dir}/device-secrets`.
    pub secrets_dir: Option<PathBuf>,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        Self {
            mqtt_max_future_skew: Duration::from_secs(300),
            secrets_dir: None,
        }
    }
}

impl DevicesConfig {
    /// Name of the default secrets directory under `data_dir`.
    pub const SECRETS_DIR: &'static str = "device-secrets";

    fn validate_at(&self, c: &mut Collector, f: &Path<'_>) {
        if self.mqtt_max_future_skew < Duration::from_secs(1)
            || self.mqtt_max_future_skew > Duration::from_secs(7 * 24 * 3600)
        {
            c.push(
                &f.field("mqtt_max_future_skew"),
                "must be between 1s and 7days",
            );
        }
        if let Some(d) = &self.secrets_dir
            && d.as_os_str().is_empty()
        {
            c.push(&f.field("secrets_dir"), "must not be empty");
        }
    }
}

/// `http://host[:port][/path]` (https is not built in yet).
fn valid_http_url(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
    else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let host = authority.rsplit_once(':').map_or(authority, |(h, port)| {
        if port.parse::<u16>().is_ok_and(|p| p > 0) {
            h
        } else {
            ""
        }
    });
    !host.is_empty() && !host.contains(char::is_whitespace) && !url.contains(['?', '#'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_size_48h() {
        // Secure by default: no hub key, no identity and no TOFU opt-in is
        // refused, naming hub.public_key; any one of the three is enough.
        let mut c = EdgeConfig {
            data_dir: "/nonexistent/edgefleet-test".into(),
            ..EdgeConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("hub.public_key: must be set"), "{e}");
        c.hub.insecure_trust_first_use = true;
        c.validate().unwrap();
        c.hub.insecure_trust_first_use = false;
        c.hub.public_key = Some("11".repeat(32));
        c.validate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(crate::identity::dir(dir.path())).unwrap();
        let c = EdgeConfig {
            data_dir: dir.path().to_path_buf(),
            ..EdgeConfig::default()
        };
        c.validate().unwrap();
        assert_eq!(c.outbox.effective_max_bytes(), 100 * 48 * 3600 * 18);
    }

    #[test]
    fn unknown_fields_and_bad_values_name_the_field() {
        let e = EdgeConfig::from_toml(
            "node = \"n\"\n[mqtt]\nhots = \"x\"\n",
            std::path::Path::new("e.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `hots`"), "{e}");
        let e = EdgeConfig::from_toml(
            "[outbox]\nflush_interval = \"soon\"\n",
            std::path::Path::new("e.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("flush_interval"), "{e}");
        let c = EdgeConfig::from_toml(
            "[identity]\nrenew_after = 0.5\nretry_max = \"1h\"\n",
            std::path::Path::new("e.toml"),
        )
        .unwrap();
        assert!((c.identity.renew_after - 0.5).abs() < 1e-9);
        assert_eq!(c.identity.retry_max, Duration::from_secs(3600));
        let mut c = EdgeConfig {
            node: "a/b".into(),
            ..EdgeConfig::default()
        };
        c.mqtt.port = 0;
        c.hub.public_key = Some("zz".into());
        c.hub.http_url = "ftp://hub".into();
        c.identity.renew_after = 1.0;
        c.identity.retry_min = Duration::ZERO;
        let e = c.validate().unwrap_err().to_string();
        for want in [
            "node: \"a/b\" contains '/'",
            "mqtt.port: 0",
            "identity.renew_after: 1 is not a fraction",
            "identity.retry_min: must be > 0",
            "hub.public_key: \"zz\"",
            "hub.http_url: \"ftp://hub\"",
        ] {
            assert!(e.contains(want), "{want} not in {e}");
        }
    }

    #[test]
    fn mqtt_credentials_and_plaintext_are_checked_by_name() {
        let c = EdgeConfig::from_toml(
            "[mqtt]\nusername = \"n\"\npassword_file = \"/run/pw\"\n[hub]\npublic_key = \"\
             1111111111111111111111111111111111111111111111111111111111111111\"\n",
            std::path::Path::new("e.toml"),
        )
        .unwrap();
        c.validate().unwrap();
        assert!(
            !c.mqtt.plaintext,
            "TLS with the joined identity is the default"
        );
        let mut bad = c.clone();
        bad.mqtt.username = None;
        bad.mqtt.plaintext = true;
        bad.mqtt.tls = Some(TlsConfig {
            ca_file: "ca.pem".into(),
            cert_file: None,
            key_file: None,
        });
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("mqtt.password_file: needs mqtt.username"), "{e}");
        assert!(e.contains("mqtt.plaintext: contradicts [mqtt.tls]"), "{e}");
    }

    #[test]
    fn http_urls() {
        // https:// since the hub serves HTTPS by default.
        for ok in [
            "http://127.0.0.1:8080",
            "http://hub",
            "http://hub:80/base/",
            "https://hub",
            "https://127.0.0.1:8443",
        ] {
            assert!(valid_http_url(ok), "{ok}");
        }
        for bad in [
            "",
            "hub:8080",
            "http://",
            "http://:80",
            "http://hub:x",
            "https://",
            "ftp://hub",
        ] {
            assert!(!valid_http_url(bad), "{bad}");
        }
    }

    #[test]
    fn functions_bounds_have_defaults_and_name_bad_fields() {
        let c = EdgeConfig::from_toml(
            "[functions]\nkv_max_keys = 5\n",
            std::path::Path::new("e.toml"),
        )
        .unwrap();
        assert_eq!(c.functions.kv_max_keys, 5);
        assert_eq!(c.functions.kv_max_bytes, 64 * 1024 * 1024);
        assert_eq!(
            (c.functions.log_lines_per_second, c.functions.log_burst),
            (20, 100)
        );
        assert_eq!(
            (
                c.functions.component_cache_entries,
                c.functions.component_cache_bytes
            ),
            (32, 256 << 20)
        );
        let mut c = EdgeConfig {
            hub: HubConfig {
                insecure_trust_first_use: true,
                ..HubConfig::default()
            },
            ..EdgeConfig::default()
        };
        c.validate().unwrap();
        c.functions = FunctionsConfig {
            kv_max_keys: 0,
            kv_max_bytes: 10,
            log_lines_per_second: 0,
            log_burst: 0,
            component_cache_entries: 0,
            component_cache_bytes: 1000,
            cpu_share_percent: 0,
            cpu_burst: Duration::ZERO,
            cpu_backoff_max: Duration::ZERO,
        };
        let e = c.validate().unwrap_err().to_string();
        for want in [
            "functions.kv_max_keys: 0",
            "functions.kv_max_bytes: 10",
            "functions.log_lines_per_second: 0",
            "functions.log_burst: 0",
            "functions.component_cache_entries: 0",
            "functions.component_cache_bytes: 1000",
            "functions.cpu_share_percent: 0",
            "functions.cpu_burst: must be",
            "functions.cpu_backoff_max: must be",
        ] {
            assert!(e.contains(want), "{want} not in {e}");
        }
    }

    #[test]
    fn drivers_keep_their_opcua_pki_in_the_data_dir() {
        let c = EdgeConfig {
            data_dir: "/var/lib/edgefleet".into(),
            ..EdgeConfig::default()
        };
        let o = c.driver_options();
        assert_eq!(
            o.opcua.pki_dir,
            std::path::Path::new("/var/lib/edgefleet/opcua-pki")
        );
        assert!(!o.opcua.pki_dir.starts_with(std::env::temp_dir()));
        assert_eq!(
            o.mqtt.secrets_dir.as_deref(),
            Some(std::path::Path::new("/var/lib/edgefleet/device-secrets"))
        );
        assert_eq!(o.mqtt.max_future_skew, Duration::from_secs(300));
    }

    #[test]
    fn device_settings_name_bad_fields() {
        let c = EdgeConfig::from_toml(
            "[devices]\nmqtt_max_future_skew = \"30s\"\nsecrets_dir = \"/etc/s\"\n",
            std::path::Path::new("e.toml"),
        )
        .unwrap();
        let o = c.driver_options();
        assert_eq!(o.mqtt.max_future_skew, Duration::from_secs(30));
        assert_eq!(
            o.mqtt.secrets_dir.as_deref(),
            Some(std::path::Path::new("/etc/s"))
        );
        let mut c = EdgeConfig {
            hub: HubConfig {
                insecure_trust_first_use: true,
                ..HubConfig::default()
            },
            ..EdgeConfig::default()
        };
        c.devices.mqtt_max_future_skew = Duration::ZERO;
        c.devices.secrets_dir = Some(PathBuf::new());
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("devices.mqtt_max_future_skew: must be between"),
            "{e}"
        );
        assert!(e.contains("devices.secrets_dir: must not be empty"), "{e}");
    }

    #[test]
    fn the_example_config_parses_with_the_documented_defaults() {
        let c = EdgeConfig::from_toml(
            include_str!("../../examples/edge.toml"),
            std::path::Path::new("examples/edge.toml"),
        )
        .unwrap();
        assert_eq!(c.functions, FunctionsConfig::default());
        assert_eq!(c.devices, DevicesConfig::default());
    }

    #[test]
    fn env_overrides_file() {
        let env = |k: &str| match k {
            "EDGEFLEET_NODE" => Some("from-env".to_owned()),
            "EDGEFLEET_MQTT_PORT" => Some("1999".to_owned()),
            _ => None,
        };
        let c = EdgeConfig::load(None, env).unwrap();
        assert_eq!((c.node.as_str(), c.mqtt.port), ("from-env", 1999));
        let bad = |k: &str| (k == "EDGEFLEET_MQTT_PORT").then(|| "x".to_owned());
        let e = EdgeConfig::load(None, bad).unwrap_err().to_string();
        assert!(e.contains("EDGEFLEET_MQTT_PORT"), "{e}");
    }
}
