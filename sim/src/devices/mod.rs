//! Simulated field devices: Modbus ([`modbus`]) and OPC UA ([`opcua`])
//! servers and MQTT-native devices publishing to a broker ([`mqtt`]), whose
//! values come from [`signal`](crate::signal) models, with fault injection
//! and a log of every value served (the simulator's ground truth).
//!
//! [`SimDevice`] is what a scenario run needs from any of them — go down,
//! come back, stop, the served log, and the protocol's delivery rule — with
//! one signature set and one error type ([`SimDeviceError`]), so the runner
//! does not match on the protocol. Each simulator keeps its own inherent
//! API (sync or async as fits it) for tests that drive one protocol.

pub mod modbus;
pub mod mqtt;
pub mod opcua;

use futures::future::BoxFuture;

use crate::truth::Obs;

/// Why a simulated device could not be brought back up.
#[derive(Debug, thiserror::Error)]
pub enum SimDeviceError {
    /// A Modbus server.
    #[error("Modbus device server")]
    Modbus(#[from] modbus::ModbusSimError),
    /// An OPC UA server.
    #[error("OPC UA device server")]
    OpcUa(#[from] opcua::OpcUaSimError),
    /// An MQTT device simulator.
    #[error("MQTT device simulator")]
    Mqtt(#[from] mqtt::MqttSimError),
}

/// A simulated device server (or MQTT simulator connection) as a scenario
/// run drives it, whatever its protocol.
pub trait SimDevice: Send + Sync {
    /// The devices disappear: servers close their listener and every
    /// connection, MQTT devices stop publishing. Returns once nothing more
    /// is served.
    fn go_down(&self) -> BoxFuture<'_, ()>;

    /// The devices come back (servers on the same address).
    fn come_up(&self) -> BoxFuture<'_, Result<(), SimDeviceError>>;

    /// Stops for good and waits for the simulator's tasks.
    fn stop(&self) -> BoxFuture<'_, ()>;

    /// Values served for point `id`: `(ts_ms, value)`, one entry per value a
    /// client received, in time order. Point ids are unique per simulator.
    fn served(&self, id: u32) -> Vec<(u64, f64)>;

    /// The protocol's delivery rule: trims `served` (one point's served
    /// values, in time order) to what its client could have received.
    /// `stored` is what the hub stored for the point (time order) and
    /// `t0_ms` the moment its subscription was active at the latest (the
    /// earlier of its first stored sample and the run's subscribe grace).
    /// Polled devices (the default) lose nothing: every logged read reached
    /// the client.
    fn delivery_window(&self, served: &mut Vec<Obs>, stored: &[Obs], t0_ms: u64) {
        let _ = (served, stored, t0_ms);
    }
}
