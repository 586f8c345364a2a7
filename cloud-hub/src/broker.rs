//! The embedded MQTT broker (rumqttd) for standalone mode.
//!
//! rumqttd has no shutdown API and no persistence: the broker runs on its own
//! thread for the life of the process, and sessions and retained messages
//! live in memory. Retained desired state is re-published by the hub on start
//! from its registry, so a hub restart loses nothing that matters.

use protocols::limits::MAX_SYNC_PACKET_BYTES;
use std::net::{SocketAddr, TcpListener};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

use crate::config::EmbeddedBroker;

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
}

/// Starts rumqttd on `cfg.listen` in a background thread.
pub fn start(cfg: &EmbeddedBroker) -> Result<(), BrokerError> {
    // rumqttd reports bind failures only in its log; check first so the user
    // gets an error that names the field.
    drop(
        TcpListener::bind(cfg.listen).map_err(|source| BrokerError::Bind {
            addr: cfg.listen,
            source,
        })?,
    );
    let server = ServerSettings {
        name: "edgefleet-v4".into(),
        listen: cfg.listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: MAX_SYNC_PACKET_BYTES,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: cfg.max_connections,
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
    Ok(())
}
