//! Southbound device drivers: Modbus TCP/RTU, OPC UA, MQTT-native devices and
//! synthetic signals.
//!
//! Start here: [`spawn`] starts one task per [`Device`] and returns a
//! [`DeviceHandle`] that reports [`DeviceStatus`] and stops the task. The task
//! sends one `Vec<Sample>` per group per poll cycle (Modbus, synthetic), per
//! notification batch (OPC UA subscriptions) or per message (MQTT) to the
//! channel it was given.
//!
//! Drivers never panic and never exit on device errors: failed reads become
//! samples with bad [`Quality`](protocols::Quality) (`BAD_TIMEOUT`,
//! `BAD_DEVICE_EXCEPTION`, `BAD_MALFORMED`, `BAD_NOT_CONNECTED`), everything
//! is counted (see [`health`]), and lost connections are re-established with
//! bounded, jittered exponential [`backoff`]. A driver task ends only when its
//! cancellation token fires or the sample receiver is dropped.
//!
//! Modules:
//! - [`decode`]: register ⇄ value conversion (pure);
//! - [`coalesce`]: merging point reads into ≤125-register requests (pure);
//! - [`backoff`]: reconnect delay settings; the policy is [`protocols::backoff`] (pure);
//! - [`health`]: per-device status and counters;
//! - [`modbus`]: the Modbus TCP/RTU poller (one request in flight per connection);
//! - [`opcua`]: the OPC UA subscription/polling client;
//! - [`mqtt`]: the subscriber for devices that publish to an MQTT broker;
//! - [`synthetic`]: signal generators, shared with the simulator;
//! - [`transport`]: reaching devices over registered byte streams instead
//!   of the network (in-memory pipes to simulated devices, tunnels).

pub mod backoff;
pub mod coalesce;
pub mod decode;
pub mod health;
pub mod modbus;
pub mod mqtt;
pub mod opcua;
mod secrets;
pub mod synthetic;
pub mod transport;

use std::path::PathBuf;
use std::time::Duration;

use protocols::{Device, DeviceProtocol, DeviceStatus, Sample};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use backoff::BackoffConfig;
use health::Health;
use transport::DeviceTransports;

/// Driver tuning shared by all protocols. Every field has a sane default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DriverOptions {
    /// Reconnect backoff.
    pub backoff: BackoffConfig,
    /// Deadline of one request (a Modbus read, an OPC UA service call).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Deadline of one connect attempt.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Extra attempts after a timed-out request, within one poll cycle.
    pub retries: u32,
    /// Modbus request coalescing.
    pub coalesce: coalesce::Limits,
    /// OPC UA client settings.
    pub opcua: OpcUaOptions,
    /// MQTT-native device settings.
    pub mqtt: MqttDeviceOptions,
    /// Seed of the reconnect jitter; `None` draws one at spawn.
    pub jitter_seed: Option<u64>,
}

impl Default for DriverOptions {
    fn default() -> Self {
        Self {
            backoff: BackoffConfig::default(),
            request_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(3),
            retries: 1,
            coalesce: coalesce::Limits::default(),
            opcua: OpcUaOptions::default(),
            mqtt: MqttDeviceOptions::default(),
            jitter_seed: None,
        }
    }
}

/// How the OPC UA driver gets values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpcUaMode {
    /// One subscription per group; polling reads for whatever the server
    /// refuses to monitor (or if it refuses subscriptions altogether).
    #[default]
    Subscribe,
    /// Polling `Read` requests only.
    Poll,
}

/// OPC UA client settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpcUaOptions {
    /// Subscribe (default) or poll.
    pub mode: OpcUaMode,
    /// PKI directory (own certificate and key, trusted and rejected peers).
    /// A key pair is created there on first use. The agent uses
    /// `{data_dir}/opcua-pki`, created 0700
    /// ([`EdgeConfig::driver_options`](crate::config::EdgeConfig::driver_options));
    /// the default, under the system temporary directory, is for tests and
    /// tools only: anyone who can write there can plant trusted servers.
    pub pki_dir: PathBuf,
    /// Trust any server certificate (otherwise it must be in `pki_dir/trusted`).
    pub trust_server_certs: bool,
    /// Monitored items per CreateMonitoredItems call.
    pub items_per_call: usize,
    /// Publishing keep-alive count of subscriptions.
    pub keep_alive_count: u32,
    /// Queue size per monitored item on the server.
    pub queue_size: u32,
    /// Application URI of this client (must match its certificate).
    pub application_uri: String,
    /// Where the `password_file` a device names is looked up (the agent
    /// uses `[devices] secrets_dir`). `None`: a device that names one
    /// cannot connect.
    pub secrets_dir: Option<PathBuf>,
}

impl Default for OpcUaOptions {
    fn default() -> Self {
        Self {
            mode: OpcUaMode::Subscribe,
            pki_dir: std::env::temp_dir().join("edgefleet-opcua-pki"),
            trust_server_certs: false,
            items_per_call: 1000,
            keep_alive_count: 10,
            queue_size: 10,
            application_uri: "urn:edgefleet:edge-node".to_owned(),
            secrets_dir: None,
        }
    }
}

/// Settings of the connections to MQTT-native devices' brokers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttDeviceOptions {
    /// A message whose `ts_ms` is further ahead of the gateway's clock than
    /// this is refused (counted as `future_timestamp`, the device's last
    /// error): one message stamped far in the future would otherwise make
    /// every later value of its points a "duplicate" (M10).
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    /// Where the `ca_file` and `password_file` a device names are looked
    /// up. `None`: a device that names one cannot connect.
    pub secrets_dir: Option<PathBuf>,
}

impl Default for MqttDeviceOptions {
    fn default() -> Self {
        Self {
            max_future_skew: Duration::from_secs(300),
            secrets_dir: None,
        }
    }
}

/// One running device driver task.
#[derive(Debug)]
pub struct DeviceHandle {
    id: String,
    health: Health,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl DeviceHandle {
    /// The device id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Current health, for reported state and metrics.
    pub fn status(&self) -> DeviceStatus {
        self.health.status()
    }

    /// Live health handle (for tests and metrics exporters).
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Whether the task has ended (it only ends when cancelled or when the
    /// sample receiver is gone).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the driver and waits for its task to end (closing connections).
    pub async fn stop(self) {
        self.cancel.cancel();
        if let Err(e) = self.task.await {
            tracing::warn!(device = %self.id, error = %e, "driver task ended abnormally");
        }
    }
}

/// Starts the driver of `device` with default [`DriverOptions`].
pub fn spawn(
    device: Device,
    out: mpsc::Sender<Vec<Sample>>,
    clock: Clock,
    cancel: CancellationToken,
) -> DeviceHandle {
    spawn_with(device, DriverOptions::default(), out, clock, cancel)
}

/// Starts the driver of `device` with `options`.
///
/// Modbus RTU devices are opened as a file at their `path` (the line must be
/// configured beforehand, e.g. with `stty`: this build has no serial-port
/// configuration); use [`spawn_modbus`] with [`modbus::Connector::stream`] to
/// run RTU over any other byte stream.
pub fn spawn_with(
    device: Device,
    options: DriverOptions,
    out: mpsc::Sender<Vec<Sample>>,
    clock: Clock,
    cancel: CancellationToken,
) -> DeviceHandle {
    spawn_routed(
        device,
        options,
        &DeviceTransports::default(),
        out,
        clock,
        cancel,
    )
}

/// Starts the driver of `device` with `options`, reaching it through
/// `transports` when its host is registered there (Modbus TCP only; see
/// [`transport`]), over the network otherwise.
pub fn spawn_routed(
    device: Device,
    options: DriverOptions,
    transports: &DeviceTransports,
    out: mpsc::Sender<Vec<Sample>>,
    clock: Clock,
    cancel: CancellationToken,
) -> DeviceHandle {
    match &device.protocol {
        DeviceProtocol::ModbusTcp { host, port, unit } => {
            let c = match transports.dialer(host) {
                Some(dial) => {
                    let port = *port;
                    modbus::Connector::tcp_over(
                        format!("modbus-tcp://{host}:{port}/{unit} (registered transport)"),
                        *unit,
                        move || dial(port),
                    )
                }
                None => modbus::Connector::tcp(host.clone(), *port, *unit),
            };
            spawn_modbus(device, c, options, out, clock, cancel)
        }
        DeviceProtocol::ModbusRtu { path, unit, .. } => {
            let c = modbus::Connector::serial_file(path.clone(), *unit);
            spawn_modbus(device, c, options, out, clock, cancel)
        }
        DeviceProtocol::OpcUa { .. } => start(device, &cancel, |d, health, cancel| {
            opcua::run(d, options, out, clock, health, cancel)
        }),
        DeviceProtocol::Mqtt { .. } => start(device, &cancel, |d, health, cancel| {
            mqtt::run(d, options, out, clock, health, cancel)
        }),
        DeviceProtocol::Synthetic => start(device, &cancel, |d, health, cancel| {
            synthetic::run(d, out, clock, health, cancel)
        }),
    }
}

/// Starts a Modbus driver for `device` over `connector` (TCP, a serial file,
/// or any byte stream carrying RTU frames). The device's protocol field is
/// ignored apart from logging.
#[allow(
    clippy::needless_pass_by_value,
    reason = "same shape as `spawn`: the handle owns a child of the caller's token"
)]
pub fn spawn_modbus(
    device: Device,
    connector: modbus::Connector,
    options: DriverOptions,
    out: mpsc::Sender<Vec<Sample>>,
    clock: Clock,
    cancel: CancellationToken,
) -> DeviceHandle {
    start(device, &cancel, |d, health, cancel| {
        modbus::run(d, connector, options, out, clock, health, cancel)
    })
}

fn start<F, Fut>(device: Device, cancel: &CancellationToken, f: F) -> DeviceHandle
where
    F: FnOnce(Device, Health, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let id = device.id.clone();
    let health = Health::new();
    let cancel = cancel.child_token();
    let span = tracing::info_span!("device", device = %id, kind = device.protocol.kind_name());
    let fut = f(device, health.clone(), cancel.clone());
    let task = tokio::spawn(tracing::Instrument::instrument(fut, span));
    DeviceHandle {
        id,
        health,
        cancel,
        task,
    }
}
