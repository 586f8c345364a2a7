//! Hub configuration: typed, documented, with defaults.
//!
//! Layering: defaults < TOML file < environment (`EDGEFLEET_HUB_…`) < flags.
//! The loading skeleton and [`ConfigError`] are shared with the edge node
//! ([`protocols::config`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use protocols::config;
use protocols::validate::{Collector, Path, ValidationErrors, check_name};
use serde::{Deserialize, Serialize};

/// Why configuration could not be loaded (shared with the edge node: the
/// file, the variable or the field is named in the message).
pub use protocols::config::ConfigError;

/// Everything the hub needs to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// Directory of the registry database, signing key and sink.
    pub data_dir: PathBuf,
    /// Address of the REST API.
    pub http_listen: SocketAddr,
    /// MQTT topic root shared with the edge nodes.
    pub topic_root: String,
    /// Embedded broker (standalone mode). When `None`, connect to `mqtt`.
    /// In TOML: a `[embedded_broker]` table, or `embedded_broker = false`
    /// for an external broker (a missing key means the default broker).
    #[serde(with = "embedded_or_false")]
    pub embedded_broker: Option<EmbeddedBroker>,
    /// External broker connection (ignored when the broker is embedded).
    pub mqtt: MqttConfig,
    /// Acks are coalesced: at most one per stream per interval, after a flush.
    #[serde(with = "humantime_serde")]
    pub ack_interval: Duration,
    /// How often the rollout loop looks at what nodes report and moves
    /// rollouts on (default 1 s; 50 ms to 60 s).
    #[serde(with = "humantime_serde")]
    pub rollout_tick: Duration,
    /// When set, telemetry is consumed through the shared subscription group
    /// `$share/{group}/…` so several hub replicas split the load.
    pub shared_group: Option<String>,
    /// sled page cache in bytes.
    pub cache_capacity_bytes: u64,
    /// How the REST API is served (`[http]`).
    pub http: HttpConfig,
    /// Certificates, join tokens, audit log (`[security]`).
    pub security: SecurityConfig,
    /// Bounds on what nodes and clients may make the hub hold (`[limits]`).
    pub limits: LimitsConfig,
}

/// `[limits]`: bounds on what nodes (or anyone who reaches the broker) can
/// make the hub hold. Past a bound the message is refused whole, counted in
/// `edgefleet_hub_refused_total{reason}` and logged; nothing stored is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Nodes the registry holds (a message or API call for one more is refused).
    pub max_nodes: usize,
    /// Telemetry streams of one node.
    pub max_streams_per_node: usize,
    /// Telemetry streams in all.
    pub max_streams: usize,
    /// Separate stored runs above one stream's watermark (gaps waiting for a
    /// resend; a real edge has a handful).
    pub max_runs_per_stream: usize,
    /// Largest reported-state document, bytes.
    pub max_reported_bytes: usize,
    /// Largest event document, bytes.
    pub max_event_bytes: usize,
    /// Largest artifact upload, bytes (at most protocols' MAX_ARTIFACT_BYTES).
    pub max_artifact_bytes: u64,
    /// Bytes the artifact store holds in all.
    pub max_artifact_store_bytes: u64,
    /// Bytes of the artifacts one uploader (token) first uploaded.
    pub max_artifact_bytes_per_uploader: u64,
    /// Artifact uploads in progress at once (more are answered 429).
    pub max_concurrent_uploads: usize,
    /// Unreferenced artifacts younger than this survive `POST /v1/artifacts/gc`.
    #[serde(with = "humantime_serde")]
    pub artifact_gc_grace: Duration,
    /// Deployments the control plane holds (default 1000; one more is
    /// refused 409 and counted as `refused_total{reason="max_deployments"}`).
    pub max_deployments: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let sink = crate::sink::SinkLimits::default();
        let art = crate::artifacts::ArtifactLimits::default();
        Self {
            max_nodes: 100_000,
            max_streams_per_node: sink.max_streams_per_node,
            max_streams: sink.max_streams,
            max_runs_per_stream: sink.max_runs_per_stream,
            max_reported_bytes: 256 * 1024,
            max_event_bytes: 16 * 1024,
            max_artifact_bytes: art.max_artifact_bytes,
            max_artifact_store_bytes: art.max_store_bytes,
            max_artifact_bytes_per_uploader: art.max_bytes_per_uploader,
            max_concurrent_uploads: art.max_concurrent_uploads,
            artifact_gc_grace: Duration::from_secs(3600),
            max_deployments: 1_000,
        }
    }
}

impl LimitsConfig {
    /// Every problem of `[limits]`, each naming its field under `lim`.
    fn validate_at(&self, c: &mut Collector, lim: &Path<'_>) {
        for (name, v) in [
            ("max_nodes", self.max_nodes),
            ("max_streams_per_node", self.max_streams_per_node),
            ("max_streams", self.max_streams),
            ("max_runs_per_stream", self.max_runs_per_stream),
            ("max_reported_bytes", self.max_reported_bytes),
            ("max_event_bytes", self.max_event_bytes),
            ("max_concurrent_uploads", self.max_concurrent_uploads),
            ("max_deployments", self.max_deployments),
        ] {
            if v == 0 {
                c.push(&lim.field(name), "must be greater than 0");
            }
        }
        if !(1..=protocols::limits::MAX_ARTIFACT_BYTES).contains(&self.max_artifact_bytes) {
            c.push(
                &lim.field("max_artifact_bytes"),
                format!(
                    "must be between 1 and {} (what desired state may name)",
                    protocols::limits::MAX_ARTIFACT_BYTES
                ),
            );
        }
        if self.max_artifact_store_bytes == 0 || self.max_artifact_bytes_per_uploader == 0 {
            c.push(
                &lim.field("max_artifact_store_bytes"),
                "the artifact quotas must be greater than 0",
            );
        }
        if self.max_reported_bytes > protocols::limits::MAX_SYNC_PACKET_BYTES {
            c.push(
                &lim.field("max_reported_bytes"),
                format!(
                    "must be at most the MQTT packet limit of {} bytes",
                    protocols::limits::MAX_SYNC_PACKET_BYTES
                ),
            );
        }
    }

    /// The artifact store's part.
    pub fn artifacts(&self) -> crate::artifacts::ArtifactLimits {
        crate::artifacts::ArtifactLimits {
            max_artifact_bytes: self.max_artifact_bytes,
            max_store_bytes: self.max_artifact_store_bytes,
            max_bytes_per_uploader: self.max_artifact_bytes_per_uploader,
            max_concurrent_uploads: self.max_concurrent_uploads,
        }
    }

    /// The sink's part.
    pub fn sink(&self) -> crate::sink::SinkLimits {
        crate::sink::SinkLimits {
            max_streams_per_node: self.max_streams_per_node,
            max_streams: self.max_streams,
            max_runs_per_stream: self.max_runs_per_stream,
        }
    }
}

/// `[http]`: how the REST API is served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Serve HTTPS with a certificate from the hub CA (default). `false`
    /// serves plain HTTP: bearer tokens and node traffic then cross the
    /// network readable by anyone on the path, and nodes cannot
    /// authenticate with certificates; the hub logs a WARN at start.
    pub tls: bool,
    /// DNS names and IP addresses in the server certificate (what clients
    /// connect to).
    pub subject_alt_names: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            tls: true,
            subject_alt_names: vec!["localhost".into(), "127.0.0.1".into()],
        }
    }
}

/// `[security]`: identities and the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Validity of node certificates issued at join and renewal.
    #[serde(with = "humantime_serde")]
    pub node_cert_validity: Duration,
    /// Lifetime of a join token from `POST /v1/nodes/{node}/bootstrap`.
    #[serde(with = "humantime_serde")]
    pub join_token_ttl: Duration,
    /// Records the audit log keeps (the oldest are overwritten).
    pub audit_capacity: u64,
    /// Broker URL handed to joining nodes (`mqtt_url` of the join answer).
    pub advertised_mqtt_url: Option<String>,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            node_cert_validity: Duration::from_secs(30 * 24 * 3600),
            join_token_ttl: Duration::from_secs(3600),
            audit_capacity: 10_000,
            advertised_mqtt_url: None,
        }
    }
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data/hub"),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            topic_root: protocols::Topics::DEFAULT_ROOT.into(),
            embedded_broker: Some(EmbeddedBroker::default()),
            mqtt: MqttConfig::default(),
            ack_interval: Duration::from_millis(200),
            rollout_tick: Duration::from_secs(1),
            shared_group: None,
            cache_capacity_bytes: 128 * 1024 * 1024,
            http: HttpConfig::default(),
            security: SecurityConfig::default(),
            limits: LimitsConfig::default(),
        }
    }
}

/// The embedded broker: rumqttd behind the identity gate
/// ([`crate::broker`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedBroker {
    /// MQTT listen address (the gate's; rumqttd itself listens on an
    /// internal loopback port).
    pub listen: SocketAddr,
    /// Most simultaneous client connections through the gate (the hub's own
    /// session does not count).
    pub max_connections: usize,
    /// MQTT over TLS with client certificates from the hub CA (default).
    /// `false` is a lab mode: plain MQTT, and a client's identity is its
    /// client id, unauthenticated: anyone on the network can impersonate
    /// any node (the same topic rules still apply). The hub logs a WARN.
    pub tls: bool,
    /// DNS names and IP addresses in the gate's server certificate (what
    /// nodes connect to).
    pub subject_alt_names: Vec<String>,
}

impl Default for EmbeddedBroker {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            max_connections: 20_000,
            tls: true,
            subject_alt_names: vec!["localhost".into(), "127.0.0.1".into()],
        }
    }
}

/// `embedded_broker` in a file: a table, `true` (the default broker) or
/// `false` (none: use `mqtt`). `None` serializes as `false` so a written
/// config reads back the same; a missing key keeps the default (embedded).
mod embedded_or_false {
    use serde::de::{self, MapAccess, Visitor, value::MapAccessDeserializer};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::EmbeddedBroker;

    #[expect(clippy::ref_option, reason = "the signature serde's `with` calls")]
    pub(super) fn serialize<S: Serializer>(
        v: &Option<EmbeddedBroker>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => b.serialize(s),
            None => s.serialize_bool(false),
        }
    }

    struct OrFalse;

    impl<'de> Visitor<'de> for OrFalse {
        type Value = Option<EmbeddedBroker>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a table, or false for an external broker")
        }

        fn visit_bool<E: de::Error>(self, on: bool) -> Result<Self::Value, E> {
            Ok(on.then(EmbeddedBroker::default))
        }

        // A table keeps the inner field errors ("unknown field `listn`").
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            EmbeddedBroker::deserialize(MapAccessDeserializer::new(map)).map(Some)
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<EmbeddedBroker>, D::Error> {
        d.deserialize_any(OrFalse)
    }
}

/// External broker connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Client id; fixed so the session persists.
    pub client_id: String,
    /// TLS to the broker (`[mqtt.tls]`); plain TCP when absent.
    pub tls: Option<MqttTls>,
    /// Username for brokers that want one (with `password_file`).
    pub username: Option<String>,
    /// File whose first line is the password (keep it 0600).
    pub password_file: Option<PathBuf>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: "cloud-hub".into(),
            tls: None,
            username: None,
            password_file: None,
        }
    }
}

/// `[mqtt.tls]`: PEM files for TLS to an external broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttTls {
    /// CA certificate(s) that sign the broker's certificate.
    pub ca_file: PathBuf,
    /// Client certificate (mTLS; e.g. a hub certificate from the hub CA,
    /// `OU=hub`).
    pub cert_file: Option<PathBuf>,
    /// Client private key (mTLS).
    pub key_file: Option<PathBuf>,
}

impl HubConfig {
    /// Loads defaults < file < environment (through `env`, so tests need not
    /// touch the process environment).
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
        if let Some(v) = env("EDGEFLEET_HUB_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(addr) = config::env_parse(env, "EDGEFLEET_HUB_HTTP_LISTEN")? {
            self.http_listen = addr;
        }
        if let Some(listen) = config::env_parse(env, "EDGEFLEET_HUB_MQTT_LISTEN")? {
            self.embedded_broker
                .get_or_insert_with(EmbeddedBroker::default)
                .listen = listen;
        }
        if let Some(v) = env("EDGEFLEET_TOPIC_ROOT") {
            self.topic_root = v;
        }
        Ok(())
    }

    /// Every problem, each naming its field.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut c = Collector::new();
        let root = Path::Root;
        if self.data_dir.as_os_str().is_empty() {
            c.push(&root.field("data_dir"), "must not be empty");
        }
        config::check_topic_root(&mut c, &root.field("topic_root"), &self.topic_root);
        if self.ack_interval.is_zero() || self.ack_interval > Duration::from_secs(10) {
            c.push(&root.field("ack_interval"), "must be between 1ms and 10s");
        }
        if self.rollout_tick < Duration::from_millis(50)
            || self.rollout_tick > Duration::from_secs(60)
        {
            c.push(&root.field("rollout_tick"), "must be between 50ms and 60s");
        }
        if let Some(g) = &self.shared_group {
            check_name(&mut c, &root.field("shared_group"), g);
        }
        let m = root.field("mqtt");
        check_name(&mut c, &m.field("client_id"), &self.mqtt.client_id);
        if self.embedded_broker.is_none() && self.mqtt.port == 0 {
            c.push(&m.field("port"), "0 is not a usable port");
        }
        if let Some(tls) = &self.mqtt.tls {
            let t = m.field("tls");
            if tls.ca_file.as_os_str().is_empty() {
                c.push(&t.field("ca_file"), "must not be empty");
            }
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                c.push(&t.field("key_file"), "cert_file and key_file go together");
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
        if let Some(b) = &self.embedded_broker {
            let e = root.field("embedded_broker");
            if b.max_connections == 0 {
                c.push(&e.field("max_connections"), "must be greater than 0");
            }
            if b.tls && b.subject_alt_names.is_empty() {
                c.push(
                    &e.field("subject_alt_names"),
                    "must name at least one host when embedded_broker.tls is on",
                );
            }
        }
        if self.http.tls && self.http.subject_alt_names.is_empty() {
            c.push(
                &root.field("http").field("subject_alt_names"),
                "must name at least one host when http.tls is on",
            );
        }
        let sec = root.field("security");
        if self.security.node_cert_validity < Duration::from_secs(60) {
            c.push(&sec.field("node_cert_validity"), "must be at least 1m");
        }
        if self.security.join_token_ttl.is_zero() {
            c.push(&sec.field("join_token_ttl"), "must be greater than 0");
        }
        if self.security.audit_capacity == 0 {
            c.push(&sec.field("audit_capacity"), "must be greater than 0");
        }
        self.limits.validate_at(&mut c, &root.field("limits"));
        config::check_cache_capacity(
            &mut c,
            &root.field("cache_capacity_bytes"),
            self.cache_capacity_bytes,
        );
        c.finish()
    }

    /// Where the hub's MQTT client connects.
    pub fn broker_address(&self) -> (String, u16) {
        match &self.embedded_broker {
            Some(b) => (b.listen.ip().to_string(), b.listen.port()),
            None => (self.mqtt.host.clone(), self.mqtt.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_unknown_fields_are_named() {
        HubConfig::default().validate().unwrap();
        let e = toml::from_str::<HubConfig>("http_listn = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `http_listn`"), "{e}");
        let e = HubConfig::load(None, |k| {
            (k == "EDGEFLEET_HUB_HTTP_LISTEN").then(|| "nope".into())
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("EDGEFLEET_HUB_HTTP_LISTEN"), "{e}");
    }

    #[test]
    fn an_external_broker_config_survives_a_toml_round_trip() {
        // Without `false`, a written config with no embedded broker would
        // read back with the default one (a missing key means the default).
        let mut cfg = HubConfig {
            embedded_broker: None,
            ..HubConfig::default()
        };
        cfg.mqtt.port = 41_883;
        let text = toml::to_string(&cfg).unwrap();
        assert!(text.contains("embedded_broker = false"), "{text}");
        let back: HubConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, cfg);
        assert_eq!(back.broker_address(), ("127.0.0.1".to_owned(), 41_883));

        let mut on = HubConfig::default();
        on.embedded_broker.as_mut().unwrap().max_connections = 7;
        let back: HubConfig = toml::from_str(&toml::to_string(&on).unwrap()).unwrap();
        assert_eq!(back, on);
        let t: HubConfig = toml::from_str("embedded_broker = true").unwrap();
        assert_eq!(t.embedded_broker, Some(EmbeddedBroker::default()));
        let missing: HubConfig = toml::from_str("").unwrap();
        assert_eq!(missing.embedded_broker, Some(EmbeddedBroker::default()));
        let e = toml::from_str::<HubConfig>("embedded_broker = 3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("embedded_broker"), "{e}");
        let e = toml::from_str::<HubConfig>("[embedded_broker]\nlistn = 1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `listn`"), "{e}");
    }

    #[test]
    fn broker_security_settings_are_secure_by_default_and_checked_by_name() {
        let d = HubConfig::default();
        let b = d.embedded_broker.as_ref().unwrap();
        assert!(b.tls, "the embedded broker is mTLS by default");
        assert!(!b.subject_alt_names.is_empty());
        let cfg: HubConfig = toml::from_str(
            "embedded_broker = false\n[mqtt]\nusername = \"hub\"\npassword_file = \"/run/pw\"\n\
             [mqtt.tls]\nca_file = \"ca.crt\"\ncert_file = \"hub.crt\"\nkey_file = \"hub.key\"\n",
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(
            cfg.mqtt.tls.as_ref().unwrap().cert_file.as_deref(),
            Some(std::path::Path::new("hub.crt"))
        );
        let back: HubConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);

        let mut bad = cfg.clone();
        bad.mqtt.tls.as_mut().unwrap().key_file = None;
        bad.mqtt.username = None;
        let e = bad.validate().unwrap_err().to_string();
        assert!(
            e.contains("mqtt.tls.key_file: cert_file and key_file go together"),
            "{e}"
        );
        assert!(e.contains("mqtt.password_file: needs mqtt.username"), "{e}");
        let mut bad = HubConfig::default();
        bad.embedded_broker
            .as_mut()
            .unwrap()
            .subject_alt_names
            .clear();
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("embedded_broker.subject_alt_names"), "{e}");
        bad.embedded_broker.as_mut().unwrap().tls = false;
        bad.validate().unwrap();
        let e = toml::from_str::<HubConfig>("[mqtt.tls]\ncafile = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `cafile`"), "{e}");
    }
}
