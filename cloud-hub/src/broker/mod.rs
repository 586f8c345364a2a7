//! The embedded MQTT broker for standalone mode: rumqttd behind the
//! identity gate ([`gate`]).
//!
//! rumqttd listens only on `127.0.0.1`, on an ephemeral port, and accepts
//! only a random per-process username and password ([`Internal`]): nothing
//! but the gate and the hub's own MQTT session can connect to it. The gate
//! listens on `embedded_broker.listen`, terminates TLS, requires a client
//! certificate from the hub CA, and binds every packet a client sends to the
//! identity in that certificate (see [`gate`] for the rules). rumqttd's own
//! hooks cannot express per-topic ACLs (its external auth sees only the
//! CONNECT credentials; its tenant-prefix mode forces `/tenants/{org}/`
//! topics with alphanumeric-only names), so the gate does it in front.
//!
//! The hub's session connects to the internal port directly (in process,
//! never through the gate), so the gate's connection cap cannot lock it out.
//!
//! rumqttd has no shutdown API and no persistence: it runs on its own thread
//! for the life of the process, and sessions and retained messages live in
//! memory. Retained desired state is re-published by the hub on start from
//! its registry, so a hub restart loses nothing that matters. The gate stops
//! with the [`crate::app::App`] that started it.

pub mod gate;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use protocols::limits::MAX_SYNC_PACKET_BYTES;
use rand::RngCore as _;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

use crate::config::EmbeddedBroker;

/// How long a client of rumqttd may take to send CONNECT (the gate sends it
/// at once; the hub's session too).
const INTERNAL_CONNECT_TIMEOUT_MS: u16 = 10_000;
/// Connections rumqttd takes beyond the gate's cap: the hub's own session
/// and connections the gate is still closing.
const INTERNAL_MARGIN: usize = 64;
/// How long [`start`] waits for rumqttd to listen.
const INTERNAL_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The listen address is taken or not ours.
    #[error("embedded_broker.listen {addr}: cannot bind: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// The broker thread could not be spawned.
    #[error("cannot start the broker thread: {0}")]
    Thread(#[source] std::io::Error),
    /// rumqttd did not listen on its internal port in time.
    #[error("the embedded broker did not listen on its internal port {0} in time")]
    NotListening(SocketAddr),
    /// The gate's TLS configuration could not be built.
    #[error("embedded_broker: {0}")]
    Tls(String),
}

/// Where and how the hub's own session reaches rumqttd.
#[derive(Clone)]
pub struct Internal {
    /// rumqttd's address (`127.0.0.1`, ephemeral port).
    pub addr: SocketAddr,
    /// The only username rumqttd accepts (random, per process).
    pub username: String,
    /// Its password (random, per process).
    pub password: String,
}

impl std::fmt::Debug for Internal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Internal")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Starts rumqttd on a free loopback port in a background thread, with a
/// random username and password; waits until it listens.
pub async fn start(cfg: &EmbeddedBroker) -> Result<Internal, BrokerError> {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let addr = TcpListener::bind(loopback)
        .and_then(|l| l.local_addr())
        .map_err(|source| BrokerError::Bind {
            addr: loopback,
            source,
        })?;
    let internal = Internal {
        addr,
        username: format!("hub-{}", random_hex(8)),
        password: random_hex(32),
    };
    let server = ServerSettings {
        name: "edgefleet-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: INTERNAL_CONNECT_TIMEOUT_MS,
            max_payload_size: MAX_SYNC_PACKET_BYTES,
            max_inflight_count: 500,
            auth: Some(HashMap::from([(
                internal.username.clone(),
                internal.password.clone(),
            )])),
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: cfg.max_connections.saturating_add(INTERNAL_MARGIN),
            max_outgoing_packet_count: 1_000,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            ..RouterConfig::default()
        },
        v4: Some(std::iter::once(("v4".to_owned(), server)).collect()),
        ..Config::default()
    };
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;
    // rumqttd reports bind failures only in its log: log in once (a bare
    // TCP probe would make it log an error).
    let deadline = tokio::time::Instant::now() + INTERNAL_READY_TIMEOUT;
    while !logs_in(&internal).await {
        if tokio::time::Instant::now() >= deadline {
            return Err(BrokerError::NotListening(addr));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(internal)
}

/// Whether rumqttd answers a CONNECT with the internal credentials with a
/// successful CONNACK (then disconnects cleanly).
async fn logs_in(internal: &Internal) -> bool {
    use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Disconnect, Packet};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let attempt = async {
        let mut tcp = tokio::net::TcpStream::connect(internal.addr).await.ok()?;
        let mut connect = Connect::new(format!("{}-probe", internal.username));
        connect.keep_alive = 10;
        connect.set_login(internal.username.clone(), internal.password.clone());
        let mut out = bytes::BytesMut::new();
        connect.write(&mut out).ok()?;
        tcp.write_all(&out).await.ok()?;
        let mut buf = bytes::BytesMut::with_capacity(64);
        loop {
            match Packet::read(&mut buf, 64) {
                Ok(Packet::ConnAck(ConnAck {
                    code: ConnectReturnCode::Success,
                    ..
                })) => break,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                _ => return None,
            }
            if tcp.read_buf(&mut buf).await.ok()? == 0 {
                return None;
            }
        }
        let mut out = bytes::BytesMut::new();
        Disconnect.write(&mut out).ok()?;
        tcp.write_all(&out).await.ok()?;
        Some(())
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .is_some()
}
