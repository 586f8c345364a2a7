//! Simulated OPC UA server (async-opcua) with thousands of variables driven
//! by [`signal`](crate::signal) models.
//!
//! [`OpcUaSim::start`] binds `127.0.0.1:0` (or the configured address) and
//! serves endpoints with security None and, if asked, Basic256Sha256 Sign and
//! SignAndEncrypt using a self-signed certificate created in
//! [`OpcUaSimConfig::pki_dir`]. Client certificates are trusted.
//! Variables are `ns=<ns>;s=<name>`; [`OpcUaSim::node_id`] spells them.
//!
//! [`OpcUaSim::go_down`] stops the server (sessions and subscriptions are
//! lost, as in a real restart); [`OpcUaSim::come_up`] starts a fresh server on
//! the same port with the same variables and values.
//!
//! # Invariants
//! - All variables change only at ticks, under one `set_values` call.
//! - The served log of a variable holds `(ts_ms, value)` whenever a tick gave
//!   it a value different from the previous one (what any reader or
//!   subscriber could have seen from then on).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use edge_node::clock::Clock;
use futures::future::BoxFuture;
use opcua::crypto::SecurityPolicy;
use opcua::server::address_space::{AccessLevel, VariableBuilder};
use opcua::server::diagnostics::NamespaceMetadata;
use opcua::server::node_manager::memory::{SimpleNodeManager, simple_node_manager};
use opcua::server::{ANONYMOUS_USER_TOKEN_ID, ServerBuilder, ServerHandle};
use opcua::types::{
    DataTypeId, DataValue, DateTime, MessageSecurityMode, NodeId, ObjectId, Variant,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::devices::SimDeviceError;
use crate::signal::{Model, ModelState};
use crate::truth::Obs;

/// Namespace URI of the simulated variables.
pub const NAMESPACE_URI: &str = "urn:edgefleet:sim";

/// OPC UA type a variable is served as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VarKind {
    /// Double.
    #[default]
    Double,
    /// Float.
    Float,
    /// Int32 (value rounded).
    Int32,
    /// UInt16 (value rounded, saturated).
    UInt16,
    /// Boolean (`value > 0.5`).
    Boolean,
}

impl VarKind {
    fn data_type(self) -> DataTypeId {
        match self {
            Self::Double => DataTypeId::Double,
            Self::Float => DataTypeId::Float,
            Self::Int32 => DataTypeId::Int32,
            Self::UInt16 => DataTypeId::UInt16,
            Self::Boolean => DataTypeId::Boolean,
        }
    }

    /// The variant served for `v` and the value a client reads back.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "saturating casts are intended"
    )]
    fn variant(self, v: f64) -> (Variant, f64) {
        match self {
            Self::Double => (Variant::Double(v), v),
            Self::Float => {
                let f = v as f32;
                (Variant::Float(f), f64::from(f))
            }
            Self::Int32 => {
                let i = v.round() as i32;
                (Variant::Int32(i), f64::from(i))
            }
            Self::UInt16 => {
                let i = v.round() as u16;
                (Variant::UInt16(i), f64::from(i))
            }
            Self::Boolean => {
                let b = v > 0.5;
                (Variant::Boolean(b), if b { 1.0 } else { 0.0 })
            }
        }
    }
}

/// One simulated variable.
#[derive(Debug, Clone)]
pub struct SimVariable {
    /// Key in the served log.
    pub id: u32,
    /// String identifier in the sim namespace.
    pub name: String,
    /// Served type.
    pub kind: VarKind,
    /// Value model.
    pub model: Model,
}

/// Server configuration.
#[derive(Debug, Clone)]
pub struct OpcUaSimConfig {
    /// Listen address.
    pub bind: SocketAddr,
    /// Variables.
    pub variables: Vec<SimVariable>,
    /// Value update period.
    pub tick: Duration,
    /// Time source of source timestamps.
    pub clock: Clock,
    /// Seed of all models (each variable uses `seed ^ id`).
    pub seed: u64,
    /// Directory for the server's PKI (certificate, key, trusted clients).
    pub pki_dir: PathBuf,
    /// Also offer Basic256Sha256 Sign and SignAndEncrypt endpoints.
    pub secure_endpoints: bool,
    /// Keep a served-values log.
    pub record: bool,
}

impl Default for OpcUaSimConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            variables: Vec::new(),
            tick: Duration::from_millis(100),
            clock: Clock::system(),
            seed: 0,
            pki_dir: std::env::temp_dir().join("edgefleet-sim-opcua-pki"),
            secure_endpoints: true,
            record: true,
        }
    }
}

/// Errors of the simulated OPC UA server.
#[derive(Debug, thiserror::Error)]
pub enum OpcUaSimError {
    /// Could not bind the listen address.
    #[error("bind {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The server library refused the configuration.
    #[error("server setup: {0}")]
    Setup(String),
}

struct Values {
    states: Vec<ModelState>,
    /// Value a client reads back, per variable.
    current: Vec<f64>,
    log: HashMap<u32, Vec<(u64, f64)>>,
}

struct Running {
    handle: ServerHandle,
    nm: Arc<SimpleNodeManager>,
    server: JoinHandle<Result<(), String>>,
    ticker: JoinHandle<()>,
    stop: CancellationToken,
}

/// A running simulated OPC UA server.
pub struct OpcUaSim {
    config: OpcUaSimConfig,
    addr: SocketAddr,
    ns: u16,
    node_ids: Vec<NodeId>,
    values: Arc<Mutex<Values>>,
    epoch_ms: u64,
    running: tokio::sync::Mutex<Option<Running>>,
}

impl std::fmt::Debug for OpcUaSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpcUaSim")
            .field("addr", &self.addr)
            .field("variables", &self.node_ids.len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// OPC UA `DateTime` of a Unix time in ms.
pub fn datetime_of_ms(ms: u64) -> DateTime {
    const EPOCH_DIFF_TICKS: i64 = 116_444_736_000_000_000;
    let ms = i64::try_from(ms).unwrap_or(i64::MAX / 10_000);
    DateTime::from(ms.saturating_mul(10_000).saturating_add(EPOCH_DIFF_TICKS))
}

impl OpcUaSim {
    /// Builds, binds and starts the server.
    pub async fn start(config: OpcUaSimConfig) -> Result<Self, OpcUaSimError> {
        let listener =
            TcpListener::bind(config.bind)
                .await
                .map_err(|source| OpcUaSimError::Bind {
                    addr: config.bind,
                    source,
                })?;
        let addr = listener
            .local_addr()
            .map_err(|source| OpcUaSimError::Bind {
                addr: config.bind,
                source,
            })?;
        let epoch_ms = config.clock.now_ms();
        let mut states: Vec<ModelState> = config
            .variables
            .iter()
            .map(|v| v.model.start(config.seed ^ u64::from(v.id)))
            .collect();
        let mut log = HashMap::new();
        let current: Vec<f64> = config
            .variables
            .iter()
            .zip(states.iter_mut())
            .map(|(v, s)| {
                let back = v.kind.variant(s.value_at(0)).1;
                if config.record {
                    log.insert(v.id, vec![(epoch_ms, back)]);
                }
                back
            })
            .collect();
        let values = Arc::new(Mutex::new(Values {
            states,
            current,
            log,
        }));
        let mut sim = Self {
            addr,
            ns: 0,
            node_ids: Vec::new(),
            values,
            epoch_ms,
            running: tokio::sync::Mutex::new(None),
            config,
        };
        let running = sim.launch(listener)?;
        sim.ns = running.1;
        sim.node_ids = running.2;
        *sim.running.lock().await = Some(running.0);
        Ok(sim)
    }

    /// The server's identity, endpoints (`none`, plus the Basic256Sha256
    /// ones with `secure_endpoints`) and limits sized for fleet-scale
    /// subscriptions.
    fn server_builder(&self) -> ServerBuilder {
        let c = &self.config;
        let port = self.addr.port();
        let host = self.addr.ip().to_string();
        let tokens = [ANONYMOUS_USER_TOKEN_ID];
        let mut builder = ServerBuilder::new()
            .application_name("edgefleet simulated device")
            .application_uri("urn:edgefleet:sim:opcua")
            .product_uri("urn:edgefleet:sim")
            .host(host.clone())
            .port(port)
            .discovery_urls(vec![format!("opc.tcp://{host}:{port}/")])
            .pki_dir(c.pki_dir.clone())
            .create_sample_keypair(true)
            .trust_client_certs(true)
            .with_node_manager(simple_node_manager(
                NamespaceMetadata {
                    namespace_uri: NAMESPACE_URI.to_owned(),
                    ..Default::default()
                },
                "sim",
            ))
            .add_endpoint(
                "none",
                (
                    "/",
                    SecurityPolicy::None,
                    MessageSecurityMode::None,
                    &tokens as &[&str],
                ),
            );
        if c.secure_endpoints {
            builder = builder
                .add_endpoint(
                    "basic256sha256_sign",
                    (
                        "/",
                        SecurityPolicy::Basic256Sha256,
                        MessageSecurityMode::Sign,
                        &tokens as &[&str],
                    ),
                )
                .add_endpoint(
                    "basic256sha256_sign_encrypt",
                    (
                        "/",
                        SecurityPolicy::Basic256Sha256,
                        MessageSecurityMode::SignAndEncrypt,
                        &tokens as &[&str],
                    ),
                );
        }
        let limits = builder.limits_mut();
        limits.max_message_size = 64 << 20;
        limits.max_chunk_count = 1024;
        limits.max_array_length = 1 << 20;
        limits.subscriptions.max_monitored_items_per_sub = 100_000;
        limits.subscriptions.max_subscriptions_per_session = 1_000;
        limits.subscriptions.max_queued_notifications = 100_000;
        limits.subscriptions.min_sampling_interval_ms = 10.0;
        limits.subscriptions.min_publishing_interval_ms = 10.0;
        limits.operational.max_monitored_items_per_call = 100_000;
        limits.operational.max_nodes_per_read = 100_000;
        builder
    }

    fn launch(&self, listener: TcpListener) -> Result<(Running, u16, Vec<NodeId>), OpcUaSimError> {
        let c = &self.config;
        let builder = self.server_builder();
        let (server, handle) = builder
            .subscription_poll_interval_ms(10)
            .build()
            .map_err(OpcUaSimError::Setup)?;
        let nm = handle
            .node_managers()
            .get_of_type::<SimpleNodeManager>()
            .ok_or_else(|| OpcUaSimError::Setup("simple node manager missing".into()))?;
        let ns = handle
            .get_namespace_index(NAMESPACE_URI)
            .ok_or_else(|| OpcUaSimError::Setup("namespace missing".into()))?;
        let node_ids: Vec<NodeId> = c
            .variables
            .iter()
            .map(|v| NodeId::new(ns, v.name.clone()))
            .collect();
        {
            let vals = lock(&self.values);
            let mut space = nm.address_space().write();
            for ((v, id), cur) in c.variables.iter().zip(&node_ids).zip(&vals.current) {
                let (variant, _) = v.kind.variant(*cur);
                VariableBuilder::new(id, v.name.as_str(), v.name.as_str())
                    .data_type(v.kind.data_type())
                    .value(variant)
                    .access_level(AccessLevel::CURRENT_READ)
                    .user_access_level(AccessLevel::CURRENT_READ)
                    .organized_by(ObjectId::ObjectsFolder)
                    .insert(&mut *space);
            }
        }
        let stop = CancellationToken::new();
        let server = tokio::spawn(server.run_with(listener));
        let ticker = tokio::spawn(ticker(
            self.config.clone(),
            node_ids.clone(),
            self.values.clone(),
            handle.clone(),
            nm.clone(),
            self.epoch_ms,
            stop.clone(),
        ));
        Ok((
            Running {
                handle,
                nm,
                server,
                ticker,
                stop,
            },
            ns,
            node_ids,
        ))
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Endpoint URL, `opc.tcp://127.0.0.1:<port>/`.
    pub fn endpoint(&self) -> String {
        format!("opc.tcp://{}:{}/", self.addr.ip(), self.addr.port())
    }

    /// Namespace index of the simulated variables.
    pub fn namespace(&self) -> u16 {
        self.ns
    }

    /// Node id string of variable `name`, e.g. `ns=2;s=Line1.Temp`.
    pub fn node_id(&self, name: &str) -> String {
        format!("ns={};s={name}", self.ns)
    }

    /// Values served for variable `id` (see the module invariants).
    pub fn served(&self, id: u32) -> Vec<(u64, f64)> {
        lock(&self.values).log.get(&id).cloned().unwrap_or_default()
    }

    /// The value variable `id` holds now, as a client reads it.
    pub fn current(&self, id: u32) -> Option<f64> {
        let pos = self.config.variables.iter().position(|v| v.id == id)?;
        lock(&self.values).current.get(pos).copied()
    }

    /// Stops the server, dropping every session and subscription.
    pub async fn go_down(&self) {
        let running = self.running.lock().await.take();
        if let Some(r) = running {
            stop_running(r).await;
        }
    }

    /// Starts a fresh server on the same port.
    pub async fn come_up(&self) -> Result<(), OpcUaSimError> {
        let mut guard = self.running.lock().await;
        if guard.is_some() {
            return Ok(());
        }
        let listener =
            TcpListener::bind(self.addr)
                .await
                .map_err(|source| OpcUaSimError::Bind {
                    addr: self.addr,
                    source,
                })?;
        let (running, _, _) = self.launch(listener)?;
        *guard = Some(running);
        Ok(())
    }

    /// Stops the server (same as [`go_down`](Self::go_down)).
    pub async fn stop(&self) {
        self.go_down().await;
    }
}

impl crate::devices::SimDevice for OpcUaSim {
    fn go_down(&self) -> BoxFuture<'_, ()> {
        Box::pin(OpcUaSim::go_down(self))
    }

    fn come_up(&self) -> BoxFuture<'_, Result<(), SimDeviceError>> {
        Box::pin(async move { OpcUaSim::come_up(self).await.map_err(SimDeviceError::from) })
    }

    fn stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(OpcUaSim::stop(self))
    }

    fn served(&self, id: u32) -> Vec<(u64, f64)> {
        OpcUaSim::served(self, id)
    }

    /// See [`subscription_window`].
    fn delivery_window(&self, served: &mut Vec<Obs>, stored: &[Obs], t0_ms: u64) {
        subscription_window(served, stored, t0_ms);
    }
}

/// The OPC UA delivery rule ([`SimDevice::delivery_window`](crate::devices::SimDevice::delivery_window)):
/// values served before the subscription reached no subscriber. The first
/// notification carries the value current at subscription time, stamped
/// with the latest tick (the log has it at the tick that changed it): that
/// entry is kept, with the source timestamp the subscriber got.
pub fn subscription_window(served: &mut Vec<Obs>, stored: &[Obs], t0_ms: u64) {
    let keep_from = served
        .partition_point(|o| o.ts_ms <= t0_ms)
        .saturating_sub(1);
    served.drain(..keep_from);
    if let (Some(f), Some(first)) = (stored.first(), served.first_mut())
        && f.value.to_bits() == first.value.to_bits()
        && f.ts_ms > first.ts_ms
        && f.ts_ms <= t0_ms
    {
        first.ts_ms = f.ts_ms;
    }
}

async fn stop_running(r: Running) {
    r.stop.cancel();
    r.handle.cancel();
    let _ = r.ticker.await;
    // The server ends once its connections have closed.
    if tokio::time::timeout(Duration::from_secs(5), r.server)
        .await
        .is_err()
    {
        tracing::warn!("simulated OPC UA server did not stop within 5 s");
    }
    drop(r.nm);
}

async fn ticker(
    config: OpcUaSimConfig,
    node_ids: Vec<NodeId>,
    values: Arc<Mutex<Values>>,
    handle: ServerHandle,
    nm: Arc<SimpleNodeManager>,
    epoch_ms: u64,
    stop: CancellationToken,
) {
    let mut iv = tokio::time::interval(config.tick.max(Duration::from_millis(1)));
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut updates: Vec<DataValue> = Vec::with_capacity(node_ids.len());
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = iv.tick() => {}
        }
        let now = config.clock.now_ms();
        let t = now.saturating_sub(epoch_ms);
        let ts = datetime_of_ms(now);
        updates.clear();
        {
            let mut guard = lock(&values);
            let vals = &mut *guard;
            for (i, v) in config.variables.iter().enumerate() {
                let raw = vals.states[i].value_at(t);
                let (variant, back) = v.kind.variant(raw);
                if config.record && vals.current[i].to_bits() != back.to_bits() {
                    vals.log.entry(v.id).or_default().push((now, back));
                }
                vals.current[i] = back;
                updates.push(DataValue {
                    value: Some(variant),
                    status: None,
                    source_timestamp: Some(ts),
                    source_picoseconds: None,
                    server_timestamp: Some(ts),
                    server_picoseconds: None,
                });
            }
        }
        let items = node_ids
            .iter()
            .zip(updates.drain(..))
            .map(|(id, dv)| (id, None, dv));
        if let Err(e) = nm.set_values(handle.subscriptions(), items) {
            tracing::warn!(error = %e, "simulated OPC UA update failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Served every 10 ms; subscribed at 25 with the value of the tick at 20
    /// delivered stamped 25.
    #[test]
    fn the_first_notification_keeps_the_current_value_at_its_delivered_time() {
        let mut served: Vec<Obs> = (0..6).map(|i| Obs::good(10 * i, i as f64)).collect();
        let stored = [Obs::good(25, 2.0), Obs::good(30, 3.0)];
        subscription_window(&mut served, &stored, 25);
        assert_eq!(
            served,
            vec![
                Obs::good(25, 2.0),
                Obs::good(30, 3.0),
                Obs::good(40, 4.0),
                Obs::good(50, 5.0)
            ]
        );
        // A first stored value that is not the current one keeps the log's
        // timestamp.
        let mut served: Vec<Obs> = (0..6).map(|i| Obs::good(10 * i, i as f64)).collect();
        subscription_window(&mut served, &[Obs::good(25, 9.0)], 25);
        assert_eq!(served.first(), Some(&Obs::good(20, 2.0)));
    }
}
