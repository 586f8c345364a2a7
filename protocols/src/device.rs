//! The device and point model shared by drivers, functions and the simulator.
//!
//! A [`Device`] is one thing the gateway talks to (a Modbus unit, an OPC UA
//! server, an MQTT-native device publishing to a broker, or a built-in
//! synthetic signal source). Its points are grouped into
//! [`PointGroup`]s that share a sampling interval. Every [`Point`] carries a
//! node-wide `index` (u32): telemetry, device functions and the hub's store
//! identify points by that number only, never by string.

use serde::{Deserialize, Serialize};

use crate::validate::{Collector, Path, check_name};

/// A device attached to an edge node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// Unique per node; `[A-Za-z0-9._-]{1,64}`.
    pub id: String,
    /// How to reach it.
    pub protocol: DeviceProtocol,
    /// Point groups, each polled/sampled at its own interval.
    pub groups: Vec<PointGroup>,
}

/// Transport and addressing of a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DeviceProtocol {
    /// Modbus TCP.
    ModbusTcp {
        /// Host name or IP address.
        host: String,
        /// TCP port (502 by default).
        #[serde(default = "default_modbus_port")]
        port: u16,
        /// Unit id / slave address, 0..=247 (255 common for TCP gateways).
        #[serde(default = "default_unit")]
        unit: u8,
    },
    /// Modbus RTU over a serial line.
    ModbusRtu {
        /// Serial device path, e.g. `/dev/ttyUSB0`.
        path: String,
        /// Baud rate.
        #[serde(default = "default_baud")]
        baud: u32,
        /// Slave address 1..=247.
        unit: u8,
    },
    /// OPC UA client connection.
    OpcUa {
        /// Endpoint URL, `opc.tcp://host:port/path`.
        endpoint: String,
        /// Security mode: none, sign, sign-and-encrypt (policy
        /// Basic256Sha256). The gateway's `[policy]
        /// opcua_insecure_endpoints` (default loopback only) says where
        /// `none` or an anonymous login is allowed.
        #[serde(default)]
        security: OpcUaSecurity,
        /// User name to activate the session with; absent: anonymous.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        username: Option<String>,
        /// The password: the name of a file in the gateway's
        /// device-secrets directory (edge config `[devices] secrets_dir`)
        /// whose first line it is; a plain file name, so the document can
        /// only pick among files the gateway's operator put there. Needs
        /// `username`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        password_file: Option<String>,
    },
    /// An MQTT-native device: it publishes its values to a broker (the
    /// device-side broker, not necessarily the hub's) as JSON
    /// [`MqttDevicePayload`] messages on `topic`; the edge node subscribes.
    /// Every point must use [`PointAddress::Mqtt`]. Groups'
    /// `interval_ms` is the expected publish interval (documentation only:
    /// the device decides when to publish).
    Mqtt {
        /// Broker host name or IP address.
        host: String,
        /// Broker TCP port (1883 by default).
        #[serde(default = "default_mqtt_port")]
        port: u16,
        /// Topic (or topic filter with `+` / `#`) the device publishes on.
        topic: String,
        /// Subscription QoS, 0 or 1 (default 1).
        #[serde(default = "default_mqtt_qos")]
        qos: u8,
        /// MQTT client id of the edge node's connection; default
        /// `edgefleet-<device id>`. Must be unique on that broker.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_id: Option<String>,
        /// TLS to the broker: the name of a PEM file of CA certificates in
        /// the gateway's device-secrets directory (edge config `[devices]
        /// secrets_dir`), the only roots the broker's certificate is
        /// checked against. A plain file name: the document can only pick
        /// among files the gateway's operator put there. Absent: plain TCP.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ca_file: Option<String>,
        /// User name to log in to the broker with.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        username: Option<String>,
        /// The password: the name of a file in the gateway's
        /// device-secrets directory whose first line it is (a plain file
        /// name, like `ca_file`; the secret never travels in desired
        /// state). Needs `username`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        password_file: Option<String>,
    },
    /// A built-in signal generator: no device needed. For demos and soak tests;
    /// every point must use [`PointAddress::Synthetic`].
    Synthetic,
}

fn default_mqtt_port() -> u16 {
    1883
}
fn default_mqtt_qos() -> u8 {
    1
}

/// What an MQTT-native device ([`DeviceProtocol::Mqtt`]) publishes: one
/// JSON object per message, e.g.
/// `{"ts_ms": 1764300000000, "values": {"temp": 21.5, "flow": null}}`.
///
/// - `ts_ms` (optional): the device's timestamp in ms since the Unix epoch
///   for every value of the message; without it the edge node stamps the
///   values with its receive time.
/// - `values`: point key ([`PointAddress::Mqtt::key`]) → raw value (engineering
///   value = raw × scale + offset) or `null` for "no value" (the sample gets
///   bad quality). Keys no point uses are ignored; a point whose key is
///   absent gets no sample from that message.
///
/// Anything else (not JSON, other fields, a value that is not a number or
/// `null`) makes the whole message malformed. Numbers are parsed exactly
/// (a value printed with enough digits, e.g. Rust's or JavaScript's shortest
/// round-trip form, arrives as the same `f64`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MqttDevicePayload {
    /// Device timestamp, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts_ms: Option<u64>,
    /// Raw values by point key.
    pub values: std::collections::BTreeMap<String, Option<f64>>,
}

fn default_modbus_port() -> u16 {
    502
}
fn default_unit() -> u8 {
    1
}
fn default_baud() -> u32 {
    19_200
}

/// OPC UA message security.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum OpcUaSecurity {
    /// No signing, no encryption.
    #[default]
    None,
    /// Basic256Sha256, signed.
    Sign,
    /// Basic256Sha256, signed and encrypted.
    SignAndEncrypt,
}

/// Points sampled together at one interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PointGroup {
    /// Group name, unique within the device.
    pub name: String,
    /// Sampling / polling interval in milliseconds (10..=86 400 000).
    pub interval_ms: u64,
    /// The points.
    pub points: Vec<Point>,
}

/// One measured value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Point {
    /// Node-wide point number used in telemetry; unique per node.
    pub index: u32,
    /// Human name, unique per device.
    pub name: String,
    /// Where the raw value lives.
    pub address: PointAddress,
    /// Engineering value = raw × scale + offset.
    #[serde(default = "one")]
    pub scale: f64,
    /// See `scale`.
    #[serde(default)]
    pub offset: f64,
    /// Expected engineering range; percent deadbands are relative to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<EngineeringRange>,
    /// Unit of measure, free text (`°C`, `bar`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

fn one() -> f64 {
    1.0
}

/// Low and high engineering limits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EngineeringRange {
    /// Lower limit.
    pub low: f64,
    /// Upper limit, greater than `low`.
    pub high: f64,
}

/// Where a point's raw value lives on its device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum PointAddress {
    /// A Modbus coil/discrete input/register range.
    Modbus {
        /// Which table.
        table: ModbusTable,
        /// Zero-based protocol address, 0..=65535. Stored wider so an out-of-range
        /// value is reported by validation with its path instead of a parse error.
        address: u32,
        /// How to interpret the registers.
        #[serde(default)]
        data_type: DataType,
        /// Byte order within each 16-bit register.
        #[serde(default)]
        byte_order: ByteOrder,
        /// Register order for 32/64-bit values.
        #[serde(default)]
        word_order: WordOrder,
    },
    /// An OPC UA variable.
    OpcUa {
        /// Node id in the standard string form, e.g. `ns=2;s=Line1.Temp` or `i=2258`.
        node_id: String,
        /// Server-side absolute deadband to request in the DataChangeFilter, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deadband: Option<f64>,
    },
    /// A generated signal (for [`DeviceProtocol::Synthetic`] devices).
    Synthetic {
        /// The signal shape.
        signal: Signal,
    },
    /// A value in the `values` object of an MQTT device's
    /// [`MqttDevicePayload`].
    Mqtt {
        /// Key in `values`; non-empty, unique per device.
        key: String,
    },
}

/// Modbus data tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum ModbusTable {
    /// Read/write single bits (function 1).
    Coil,
    /// Read-only single bits (function 2).
    DiscreteInput,
    /// Read/write 16-bit registers (function 3).
    Holding,
    /// Read-only 16-bit registers (function 4).
    Input,
}

impl ModbusTable {
    /// Whether the table holds bits rather than 16-bit registers.
    pub fn is_bit(self) -> bool {
        matches!(self, Self::Coil | Self::DiscreteInput)
    }
}

/// Value encodings of Modbus registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    /// One bit (coils, discrete inputs) or a register that is non-zero.
    Bool,
    /// Signed 16 bit.
    I16,
    /// Unsigned 16 bit.
    #[default]
    U16,
    /// Signed 32 bit (2 registers).
    I32,
    /// Unsigned 32 bit (2 registers).
    U32,
    /// Signed 64 bit (4 registers).
    I64,
    /// IEEE 754 single (2 registers).
    F32,
    /// IEEE 754 double (4 registers).
    F64,
}

impl DataType {
    /// How many 16-bit registers the type spans (bits count as one).
    pub fn registers(self) -> u16 {
        match self {
            Self::Bool | Self::I16 | Self::U16 => 1,
            Self::I32 | Self::U32 | Self::F32 => 2,
            Self::I64 | Self::F64 => 4,
        }
    }
}

/// Byte order inside a 16-bit register.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum ByteOrder {
    /// High byte first (the Modbus standard).
    #[default]
    BigEndian,
    /// Low byte first.
    LittleEndian,
}

/// Register order of multi-register values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum WordOrder {
    /// Most significant register first.
    #[default]
    HighFirst,
    /// Least significant register first ("word swapped").
    LowFirst,
}

/// Synthetic signal shapes (seeded, reproducible).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "shape", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Signal {
    /// `offset + amplitude · sin(2π t / period)` plus uniform noise of ±`noise`.
    Sine {
        /// Peak amplitude.
        amplitude: f64,
        /// Period in seconds.
        period_s: f64,
        /// Constant offset.
        #[serde(default)]
        offset: f64,
        /// Noise half-width.
        #[serde(default)]
        noise: f64,
    },
    /// Random walk with steps of at most `step`, starting at `start`.
    RandomWalk {
        /// Start value.
        #[serde(default)]
        start: f64,
        /// Maximum absolute step per sample.
        step: f64,
    },
    /// A constant value, changed to a new level every `every_s` seconds.
    Steps {
        /// Distance between levels.
        height: f64,
        /// Seconds between steps.
        every_s: f64,
    },
}

impl Device {
    /// Validates one device at `path` (e.g. `devices[3]`).
    pub fn validate_at(&self, c: &mut Collector, path: &Path<'_>) {
        check_name(c, &path.field("id"), &self.id);
        self.protocol.validate_at(c, &path.field("protocol"));
        let groups = path.field("groups");
        if self.groups.is_empty() {
            c.push(&groups, "a device needs at least one point group");
        }
        let mut group_names = std::collections::BTreeSet::new();
        let mut point_names = std::collections::BTreeSet::new();
        let mut mqtt_keys = std::collections::BTreeSet::new();
        for (gi, g) in self.groups.iter().enumerate() {
            let gp = groups.index(gi);
            check_name(c, &gp.field("name"), &g.name);
            if !group_names.insert(g.name.as_str()) {
                c.push(
                    &gp.field("name"),
                    format!("duplicate group name {:?}", g.name),
                );
            }
            if !(10..=86_400_000).contains(&g.interval_ms) {
                c.push(
                    &gp.field("interval_ms"),
                    format!("{} is out of range 10..=86400000", g.interval_ms),
                );
            }
            let points = gp.field("points");
            if g.points.is_empty() {
                c.push(&points, "a point group needs at least one point");
            }
            for (pi, p) in g.points.iter().enumerate() {
                let pp = points.index(pi);
                if !point_names.insert(p.name.as_str()) {
                    c.push(
                        &pp.field("name"),
                        format!("duplicate point name {:?}", p.name),
                    );
                }
                p.validate_at(c, &pp, &self.protocol);
                if let PointAddress::Mqtt { key } = &p.address
                    && !mqtt_keys.insert(key.as_str())
                {
                    c.push(
                        &pp.field("address").field("key"),
                        format!("duplicate key {key:?}: another point of this device uses it"),
                    );
                }
            }
        }
    }
}

impl DeviceProtocol {
    fn validate_at(&self, c: &mut Collector, path: &Path<'_>) {
        match self {
            Self::ModbusTcp { host, port, .. } => {
                if host.trim().is_empty() {
                    c.push(&path.field("host"), "must not be empty");
                }
                if *port == 0 {
                    c.push(&path.field("port"), "0 is not a usable port");
                }
            }
            Self::ModbusRtu {
                path: dev,
                unit,
                baud,
            } => {
                if dev.trim().is_empty() {
                    c.push(&path.field("path"), "must not be empty");
                }
                if !(1..=247).contains(unit) {
                    c.push(
                        &path.field("unit"),
                        format!("{unit} is out of range 1..=247"),
                    );
                }
                if *baud == 0 {
                    c.push(&path.field("baud"), "must be greater than 0");
                }
            }
            Self::OpcUa {
                endpoint,
                username,
                password_file,
                ..
            } => {
                if !endpoint.starts_with("opc.tcp://") {
                    c.push(
                        &path.field("endpoint"),
                        format!("{endpoint:?} must start with opc.tcp://"),
                    );
                }
                check_login(c, path, username.as_deref(), password_file.as_deref());
            }
            Self::Mqtt {
                host,
                port,
                topic,
                qos,
                client_id,
                ca_file,
                username,
                password_file,
            } => {
                if host.trim().is_empty() {
                    c.push(&path.field("host"), "must not be empty");
                }
                if *port == 0 {
                    c.push(&path.field("port"), "0 is not a usable port");
                }
                if let Some(e) = mqtt_filter_error(topic) {
                    c.push(&path.field("topic"), format!("{topic:?}: {e}"));
                }
                if *qos > 1 {
                    c.push(&path.field("qos"), format!("{qos} must be 0 or 1"));
                }
                if let Some(id) = client_id
                    && (id.is_empty() || id.len() > 128)
                {
                    c.push(&path.field("client_id"), "must be 1..=128 bytes");
                }
                if let Some(name) = ca_file
                    && let Some(e) = secret_name_error(name)
                {
                    c.push(&path.field("ca_file"), format!("{name:?}: {e}"));
                }
                check_login(c, path, username.as_deref(), password_file.as_deref());
            }
            Self::Synthetic => {}
        }
    }
}

/// Checks a device login: a user name of 1..=256 bytes without NUL and a
/// password file that is a plain secret name and comes with a user name.
fn check_login(
    c: &mut Collector,
    path: &Path<'_>,
    username: Option<&str>,
    password_file: Option<&str>,
) {
    if let Some(name) = password_file
        && let Some(e) = secret_name_error(name)
    {
        c.push(&path.field("password_file"), format!("{name:?}: {e}"));
    }
    if let Some(u) = username
        && (u.is_empty() || u.len() > 256 || u.contains('\0'))
    {
        c.push(&path.field("username"), "must be 1..=256 bytes without NUL");
    }
    if password_file.is_some() && username.is_none() {
        c.push(
            &path.field("password_file"),
            "needs username (a password is sent only with a user name)",
        );
    }
}

/// Why `name` is not a plain file name in the gateway's device-secrets
/// directory, if it is not: no directory part, no `..`, nothing hidden.
fn secret_name_error(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > 255 {
        return Some("must be 1..=255 bytes");
    }
    if name.contains(['/', '\\', '\0']) {
        return Some(
            "must be a plain file name in the gateway's device-secrets directory (no '/', '\\' or NUL)",
        );
    }
    if name.starts_with('.') {
        return Some("must not start with '.'");
    }
    None
}

/// Why `topic` is not a usable MQTT topic filter, if it is not.
fn mqtt_filter_error(topic: &str) -> Option<&'static str> {
    if topic.is_empty() {
        return Some("must not be empty");
    }
    if topic.len() > 1024 {
        return Some("is longer than 1024 bytes");
    }
    if topic.contains('\0') {
        return Some("must not contain NUL");
    }
    let levels: Vec<&str> = topic.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Some("`#` must be a whole level and the last one");
        }
        if level.contains('+') && *level != "+" {
            return Some("`+` must be a whole level");
        }
    }
    None
}

impl Point {
    fn validate_at(&self, c: &mut Collector, path: &Path<'_>, protocol: &DeviceProtocol) {
        check_name(c, &path.field("name"), &self.name);
        if !self.scale.is_finite() || self.scale == 0.0 {
            c.push(
                &path.field("scale"),
                format!("{} must be finite and non-zero", self.scale),
            );
        }
        if !self.offset.is_finite() {
            c.push(
                &path.field("offset"),
                format!("{} must be finite", self.offset),
            );
        }
        if let Some(r) = self.range
            && !(r.low.is_finite() && r.high.is_finite() && r.low < r.high)
        {
            c.push(
                &path.field("range"),
                format!("low {} must be finite and less than high {}", r.low, r.high),
            );
        }
        let ap = path.field("address");
        match (&self.address, protocol) {
            (
                PointAddress::Modbus {
                    table,
                    address,
                    data_type,
                    ..
                },
                DeviceProtocol::ModbusTcp { .. } | DeviceProtocol::ModbusRtu { .. },
            ) => {
                let p = ap.field("address");
                if *address > 65_535 {
                    c.push(&p, format!("{address} is out of range 0..=65535"));
                } else if address + u32::from(data_type.registers()) - 1 > 65_535 {
                    c.push(
                        &p,
                        format!(
                            "{address} + {} registers of {data_type:?} runs past 65535",
                            data_type.registers()
                        ),
                    );
                }
                if table.is_bit() && *data_type != DataType::Bool {
                    c.push(
                        &ap.field("data_type"),
                        format!(
                            "{table:?} holds single bits; data_type must be bool, not {data_type:?}"
                        ),
                    );
                }
            }
            (PointAddress::OpcUa { node_id, deadband }, DeviceProtocol::OpcUa { .. }) => {
                if !is_plausible_node_id(node_id) {
                    c.push(
                        &ap.field("node_id"),
                        format!("{node_id:?} is not an OPC UA node id (expected e.g. ns=2;s=Tag or i=2258)"),
                    );
                }
                if let Some(d) = deadband
                    && !(d.is_finite() && *d >= 0.0)
                {
                    c.push(
                        &ap.field("deadband"),
                        format!("{d} must be finite and >= 0"),
                    );
                }
            }
            (PointAddress::Synthetic { signal }, DeviceProtocol::Synthetic) => {
                signal.validate_at(c, &ap.field("signal"));
            }
            (PointAddress::Mqtt { key }, DeviceProtocol::Mqtt { .. }) => {
                if key.is_empty() || key.len() > 256 {
                    c.push(&ap.field("key"), "must be 1..=256 bytes");
                }
            }
            (addr, proto) => c.push(
                &ap,
                format!(
                    "a {} address does not fit a {} device",
                    addr.kind_name(),
                    proto.kind_name()
                ),
            ),
        }
    }
}

impl PointAddress {
    /// The `kind` tag as written in documents.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::Modbus { .. } => "modbus",
            Self::OpcUa { .. } => "opc-ua",
            Self::Synthetic { .. } => "synthetic",
            Self::Mqtt { .. } => "mqtt",
        }
    }
}

impl DeviceProtocol {
    /// The `kind` tag as written in documents.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::ModbusTcp { .. } => "modbus-tcp",
            Self::ModbusRtu { .. } => "modbus-rtu",
            Self::OpcUa { .. } => "opc-ua",
            Self::Mqtt { .. } => "mqtt",
            Self::Synthetic => "synthetic",
        }
    }
}

impl Signal {
    fn validate_at(&self, c: &mut Collector, path: &Path<'_>) {
        let mut finite = |name: &str, v: f64| {
            if !v.is_finite() {
                c.push(&path.field(name), format!("{v} must be finite"));
            }
        };
        match *self {
            Self::Sine {
                amplitude,
                period_s,
                offset,
                noise,
            } => {
                finite("amplitude", amplitude);
                finite("offset", offset);
                finite("noise", noise);
                if !(period_s.is_finite() && period_s > 0.0) {
                    c.push(&path.field("period_s"), format!("{period_s} must be > 0"));
                }
            }
            Self::RandomWalk { start, step } => {
                finite("start", start);
                finite("step", step);
            }
            Self::Steps { height, every_s } => {
                finite("height", height);
                if !(every_s.is_finite() && every_s > 0.0) {
                    c.push(&path.field("every_s"), format!("{every_s} must be > 0"));
                }
            }
        }
    }
}

/// Accepts `ns=<u16>;<i|s|g|b>=<id>` or `<i|s|g|b>=<id>`.
fn is_plausible_node_id(s: &str) -> bool {
    let rest = match s.strip_prefix("ns=") {
        Some(r) => match r.split_once(';') {
            Some((ns, rest)) if ns.parse::<u16>().is_ok() => rest,
            _ => return false,
        },
        None => s,
    };
    match rest.split_once('=') {
        Some(("i", id)) => id.parse::<u32>().is_ok(),
        Some(("s" | "g" | "b", id)) => !id.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids() {
        for ok in ["i=2258", "ns=2;s=Line1.Temp", "ns=0;i=85", "s=x"] {
            assert!(is_plausible_node_id(ok), "{ok}");
        }
        for bad in ["", "ns=x;i=1", "i=abc", "ns=2", "q=1", "ns=70000;i=1"] {
            assert!(!is_plausible_node_id(bad), "{bad}");
        }
    }

    #[test]
    fn register_widths() {
        assert_eq!(DataType::F64.registers(), 4);
        assert_eq!(DataType::F32.registers(), 2);
        assert_eq!(DataType::Bool.registers(), 1);
    }
}
