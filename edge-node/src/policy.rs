//! Edge-local policy: what this gateway's own configuration lets desired
//! state make it touch. The cloud cannot override it.
//!
//! Desired state is signed by the hub, but the hub is not the site: a
//! compromised hub, or an operator with the wrong file, must not turn a
//! gateway into a pivot into the plant network (a Modbus TCP "device" at any
//! host:port is a port scanner whose answers come back in reported state) or
//! make it open any file read+write (a Modbus RTU `path`). So the gateway's
//! config (`[policy]`) lists what devices may use, and a desired document
//! that asks for anything else is refused whole, with an event naming the
//! field, before anything is persisted or applied.
//!
//! - `serial_devices`: glob patterns (`*` any run of characters, `?` one)
//!   of serial device paths. A path is allowed when both the path as
//!   written and, where it exists, the path with every symlink resolved
//!   match a pattern; paths with `..` or that are not absolute are refused.
//!   Default: none.
//! - `device_endpoints`: where Modbus TCP devices, OPC UA servers and
//!   device-side MQTT brokers may be. Each entry is a host part and an
//!   optional port part: `10.1.0.0/16`, `10.1.2.3:502`, `192.168.0.0/24:500-510`,
//!   `[fd00::]/8`, `[::1]:4840`, `plc-*.line1.local:502`. An IP host is
//!   matched against the networks, a name against the name globs (names are
//!   matched as written, not resolved: the site controls its DNS). Without a
//!   port part any port matches. Default: loopback only (`127.0.0.0/8`, `::1`).
//! - `opcua_insecure_endpoints`: where an OPC UA device may use security
//!   `none` or an anonymous session (no `username`), in the same syntax.
//!   Anywhere else it must use `sign` or `sign-and-encrypt` and log in,
//!   so neither its traffic nor the session is open to anyone on the plant
//!   network (L4). Default: loopback only.
//!
//! Synthetic devices need nothing and are always allowed.

use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::{Component, Path};

use ipnet::IpNet;
use protocols::device::OpcUaSecurity;
use protocols::{DesiredState, DeviceProtocol};
use serde::{Deserialize, Serialize};

/// `[policy]` in the edge config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Glob patterns of serial device paths Modbus RTU devices may open.
    pub serial_devices: Vec<String>,
    /// Networks, host names and ports devices may connect to.
    pub device_endpoints: Vec<String>,
    /// Networks, host names and ports where OPC UA devices may use
    /// security `none` or an anonymous session.
    pub opcua_insecure_endpoints: Vec<String>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            serial_devices: Vec::new(),
            device_endpoints: vec!["127.0.0.0/8".into(), "[::1]".into()],
            opcua_insecure_endpoints: vec!["127.0.0.0/8".into(), "[::1]".into()],
        }
    }
}

/// A parsed [`PolicyConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    serial: Vec<String>,
    endpoints: Vec<Endpoint>,
    /// The config lines, for error messages.
    endpoints_text: Vec<String>,
    insecure: Vec<Endpoint>,
    insecure_text: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMatch {
    Net(IpNet),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    host: HostMatch,
    ports: RangeInclusive<u16>,
}

impl Default for Policy {
    fn default() -> Self {
        // The default config always parses.
        Self::parse(&PolicyConfig::default()).unwrap_or(Self {
            serial: Vec::new(),
            endpoints: Vec::new(),
            endpoints_text: Vec::new(),
            insecure: Vec::new(),
            insecure_text: Vec::new(),
        })
    }
}

impl Policy {
    /// Parses the config; an error names the entry (`device_endpoints[2]: …`).
    pub fn parse(cfg: &PolicyConfig) -> Result<Self, Vec<(String, String)>> {
        let mut errors = Vec::new();
        for (i, p) in cfg.serial_devices.iter().enumerate() {
            if !p.starts_with('/') {
                errors.push((
                    format!("serial_devices[{i}]"),
                    format!("{p:?} must be an absolute path pattern such as \"/dev/ttyUSB*\""),
                ));
            }
        }
        let endpoints = parse_list("device_endpoints", &cfg.device_endpoints, &mut errors);
        let insecure = parse_list(
            "opcua_insecure_endpoints",
            &cfg.opcua_insecure_endpoints,
            &mut errors,
        );
        if errors.is_empty() {
            Ok(Self {
                serial: cfg.serial_devices.clone(),
                endpoints,
                endpoints_text: cfg.device_endpoints.clone(),
                insecure,
                insecure_text: cfg.opcua_insecure_endpoints.clone(),
            })
        } else {
            Err(errors)
        }
    }

    /// Parses the config; the error lists every bad entry in one line.
    pub fn from_config(cfg: &PolicyConfig) -> Result<Self, String> {
        Self::parse(cfg).map_err(|e| {
            e.iter()
                .map(|(f, m)| format!("policy.{f}: {m}"))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }

    /// Adds every bad entry of `cfg` to `c`, under `path`.
    pub fn validate_at(
        cfg: &PolicyConfig,
        c: &mut protocols::validate::Collector,
        path: &protocols::validate::Path<'_>,
    ) {
        for (field, message) in Self::parse(cfg).err().unwrap_or_default() {
            c.push(&path.field(&field), message);
        }
    }

    /// Checks every device of `d`; the error names each field outside the
    /// policy and what the policy allows.
    pub fn check(&self, d: &DesiredState) -> Result<(), String> {
        let mut bad = Vec::new();
        for (i, dev) in d.devices.iter().enumerate() {
            let field = |f: &str| format!("devices[{i}].protocol.{f}");
            match &dev.protocol {
                DeviceProtocol::ModbusTcp { host, port, .. }
                | DeviceProtocol::Mqtt { host, port, .. } => {
                    if !self.endpoint_allowed(host, *port) {
                        bad.push(self.endpoint_refusal(&field("host"), host, *port));
                    }
                }
                DeviceProtocol::OpcUa {
                    endpoint,
                    security,
                    username,
                    ..
                } => match opcua_host_port(endpoint) {
                    Some((host, port)) => {
                        if !self.endpoint_allowed(&host, port) {
                            bad.push(self.endpoint_refusal(&field("endpoint"), &host, port));
                        }
                        let secure = *security != OpcUaSecurity::None;
                        bad.extend(self.insecure_refusal(
                            &field,
                            &host,
                            port,
                            secure,
                            username.as_ref(),
                        ));
                    }
                    None => bad.push(format!(
                        "{}: {endpoint:?} is not an opc.tcp://host:port URL",
                        field("endpoint")
                    )),
                },
                DeviceProtocol::ModbusRtu { path, .. } => {
                    if let Err(why) = self.serial_allowed(path) {
                        bad.push(format!("{}: {why}", field("path")));
                    }
                }
                DeviceProtocol::Synthetic => {}
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "refused by this gateway's [policy]: {}",
                bad.join("; ")
            ))
        }
    }

    fn endpoint_refusal(&self, field: &str, host: &str, port: u16) -> String {
        format!(
            "{field}: {host}:{port} is not in policy.device_endpoints {:?}",
            self.endpoints_text
        )
    }

    /// Refusals of an OPC UA session without security or without a login
    /// to `host:port` outside `opcua_insecure_endpoints`.
    fn insecure_refusal(
        &self,
        field: &dyn Fn(&str) -> String,
        host: &str,
        port: u16,
        secure: bool,
        username: Option<&String>,
    ) -> Vec<String> {
        if list_matches(&self.insecure, host, port) {
            return Vec::new();
        }
        let mut bad = Vec::new();
        let only = format!(
            "allowed only to policy.opcua_insecure_endpoints {:?}",
            self.insecure_text
        );
        if !secure {
            bad.push(format!(
                "{}: none to {host}:{port} is {only}; use sign or sign-and-encrypt",
                field("security")
            ));
        }
        if username.is_none() {
            bad.push(format!(
                "{}: an anonymous session to {host}:{port} is {only}; set username and password_file",
                field("username")
            ));
        }
        bad
    }

    fn endpoint_allowed(&self, host: &str, port: u16) -> bool {
        list_matches(&self.endpoints, host, port)
    }

    fn serial_allowed(&self, path: &str) -> Result<(), String> {
        let p = Path::new(path);
        if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(format!("{path:?} must be an absolute path without \"..\""));
        }
        let allowed = |s: &str| self.serial.iter().any(|g| glob_match(g, s));
        if !allowed(path) {
            return Err(format!(
                "{path:?} is not in policy.serial_devices {:?}",
                self.serial
            ));
        }
        // A symlink may point anywhere: its target must be allowed too.
        if let Ok(real) = std::fs::canonicalize(p) {
            let real = real.to_string_lossy();
            if !allowed(&real) {
                return Err(format!(
                    "{path:?} resolves to {real:?}, which is not in policy.serial_devices {:?}",
                    self.serial
                ));
            }
        }
        Ok(())
    }
}

/// Whether `host:port` matches an entry of `list`.
fn list_matches(list: &[Endpoint], host: &str, port: u16) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: Option<IpAddr> = host.parse().ok();
    list.iter().any(|e| {
        e.ports.contains(&port)
            && match (&e.host, ip) {
                (HostMatch::Net(n), Some(ip)) => n.contains(&ip),
                (HostMatch::Name(g), None) => glob_match(g, &host.to_ascii_lowercase()),
                _ => false,
            }
    })
}

/// Parses the entries of list `name`, pushing each bad one to `errors`.
fn parse_list(name: &str, entries: &[String], errors: &mut Vec<(String, String)>) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        match parse_endpoint(e) {
            Ok(ep) => out.push(ep),
            Err(msg) => errors.push((format!("{name}[{i}]"), msg)),
        }
    }
    out
}

fn parse_endpoint(e: &str) -> Result<Endpoint, String> {
    let e = e.trim();
    let bad = |why: &str| format!("{e:?}: {why}");
    // Split off the port part: "host:ports", "[v6]:ports", "[v6]/len:ports".
    let (host, ports) = if let Some(rest) = e.strip_prefix('[') {
        let Some(close) = rest.find(']') else {
            return Err(bad("missing ']' after an IPv6 address"));
        };
        let inner = &rest[..close];
        let after = &rest[close + 1..];
        let (len, ports) = match after.split_once(':') {
            Some((len, p)) => (len, Some(p)),
            None => (after, None),
        };
        (format!("{inner}{len}"), ports)
    } else if e.matches(':').count() > 1 {
        // A bare IPv6 network with no port part.
        (e.to_owned(), None)
    } else {
        match e.split_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (e.to_owned(), None),
        }
    };
    let ports = match ports {
        None => 0..=u16::MAX,
        Some(p) => parse_ports(p).ok_or_else(|| bad("ports must be a port or a range lo-hi"))?,
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let host = if let Ok(net) = host.parse::<IpNet>() {
        HostMatch::Net(net)
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        HostMatch::Net(IpNet::from(ip))
    } else if host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '*' | '?' | '_'))
    {
        if host.contains('/') {
            return Err(bad("not a network"));
        }
        HostMatch::Name(host.to_ascii_lowercase())
    } else {
        return Err(bad(
            "not a network (10.0.0.0/8), an address or a host name pattern",
        ));
    };
    Ok(Endpoint { host, ports })
}

fn parse_ports(p: &str) -> Option<RangeInclusive<u16>> {
    if let Some((lo, hi)) = p.split_once('-') {
        let (lo, hi) = (lo.parse().ok()?, hi.parse().ok()?);
        (lo <= hi).then_some(lo..=hi)
    } else {
        let p = p.parse().ok()?;
        Some(p..=p)
    }
}

/// Host and port of `opc.tcp://host[:port][/path]` (port 4840 by default).
fn opcua_host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("opc.tcp://")?;
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit('@').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => 4840,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    match authority.split_once(':') {
        Some((h, p)) => Some((h.to_owned(), p.parse().ok()?)),
        None => Some((authority.to_owned(), 4840)),
    }
    .filter(|(h, _)| !h.is_empty())
}

/// `*` matches any run of characters (also `/`), `?` exactly one.
fn glob_match(pattern: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pattern.chars().collect(), s.chars().collect());
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocols::Device;

    fn policy(serial: &[&str], endpoints: &[&str]) -> Policy {
        Policy::parse(&PolicyConfig {
            serial_devices: serial.iter().map(|s| (*s).to_owned()).collect(),
            device_endpoints: endpoints.iter().map(|s| (*s).to_owned()).collect(),
            ..PolicyConfig::default()
        })
        .unwrap()
    }

    fn desired(protocols: Vec<DeviceProtocol>) -> DesiredState {
        DesiredState {
            node: "n".into(),
            revision: 1,
            devices: protocols
                .into_iter()
                .enumerate()
                .map(|(i, protocol)| Device {
                    id: format!("d{i}"),
                    protocol,
                    groups: Vec::new(),
                })
                .collect(),
            functions: Vec::new(),
            models: Vec::new(),
            config: protocols::NodeConfig::default(),
        }
    }

    fn opcua(endpoint: &str, security: OpcUaSecurity, username: Option<&str>) -> DeviceProtocol {
        DeviceProtocol::OpcUa {
            endpoint: endpoint.into(),
            security,
            username: username.map(Into::into),
            password_file: username.map(|_| "ua.pw".into()),
        }
    }

    #[test]
    fn opcua_without_security_or_login_only_to_the_insecure_endpoints() {
        let p = policy(&[], &["0.0.0.0/0", "[::]/0"]);
        // Loopback (the default insecure list): anything goes, as the
        // simulators in fleet-sim and the tests use it.
        for (sec, user) in [
            (OpcUaSecurity::None, None),
            (OpcUaSecurity::Sign, None),
            (OpcUaSecurity::None, Some("edge")),
        ] {
            p.check(&desired(vec![opcua(
                "opc.tcp://127.0.0.1:4840/",
                sec,
                user,
            )]))
            .unwrap();
            p.check(&desired(vec![opcua("opc.tcp://[::1]:4840/", sec, user)]))
                .unwrap();
        }
        // Elsewhere: refused, naming each field.
        let e = p
            .check(&desired(vec![opcua(
                "opc.tcp://10.0.0.6:4840/",
                OpcUaSecurity::None,
                None,
            )]))
            .unwrap_err();
        assert!(
            e.contains("devices[0].protocol.security: none to 10.0.0.6:4840 is allowed only to policy.opcua_insecure_endpoints"),
            "{e}"
        );
        assert!(
            e.contains("devices[0].protocol.username: an anonymous session to 10.0.0.6:4840"),
            "{e}"
        );
        let e = p
            .check(&desired(vec![opcua(
                "opc.tcp://10.0.0.6:4840/",
                OpcUaSecurity::SignAndEncrypt,
                None,
            )]))
            .unwrap_err();
        assert!(e.contains("protocol.username"), "{e}");
        assert!(!e.contains("protocol.security"), "{e}");
        p.check(&desired(vec![opcua(
            "opc.tcp://10.0.0.6:4840/",
            OpcUaSecurity::SignAndEncrypt,
            Some("edge"),
        )]))
        .unwrap();
        // The site can allow its own lab network.
        let lab = Policy::parse(&PolicyConfig {
            device_endpoints: vec!["0.0.0.0/0".into()],
            opcua_insecure_endpoints: vec!["10.9.0.0/16:4840".into()],
            ..PolicyConfig::default()
        })
        .unwrap();
        lab.check(&desired(vec![opcua(
            "opc.tcp://10.9.1.2:4840/",
            OpcUaSecurity::None,
            None,
        )]))
        .unwrap();
        assert!(
            lab.check(&desired(vec![opcua(
                "opc.tcp://10.9.1.2:4841/",
                OpcUaSecurity::None,
                None
            )]))
            .is_err()
        );
        let errs = Policy::parse(&PolicyConfig {
            opcua_insecure_endpoints: vec!["not a host!".into()],
            ..PolicyConfig::default()
        })
        .unwrap_err();
        assert_eq!(errs[0].0, "opcua_insecure_endpoints[0]");
    }

    fn tcp(host: &str, port: u16) -> DeviceProtocol {
        DeviceProtocol::ModbusTcp {
            host: host.into(),
            port,
            unit: 1,
        }
    }

    #[test]
    fn globs_match_like_a_shell_without_path_rules() {
        assert!(glob_match("/dev/ttyUSB*", "/dev/ttyUSB0"));
        assert!(glob_match("/dev/tty?", "/dev/ttyS"));
        assert!(!glob_match("/dev/tty?", "/dev/ttyS0"));
        assert!(glob_match("plc-*.local", "plc-7.local"));
        assert!(!glob_match("/dev/ttyUSB*", "/etc/passwd"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
    }

    #[test]
    fn the_default_allows_loopback_only_and_no_serial_device() {
        let p = Policy::default();
        let ok = desired(vec![
            tcp("127.0.0.1", 502),
            tcp("::1", 1502),
            DeviceProtocol::Synthetic,
        ]);
        p.check(&ok).unwrap();
        let e = p
            .check(&desired(vec![tcp("127.0.0.1", 502), tcp("10.0.0.5", 22)]))
            .unwrap_err();
        assert!(e.contains("devices[1].protocol.host: 10.0.0.5:22"), "{e}");
        assert!(!e.contains("devices[0]"), "{e}");
        let e = p
            .check(&desired(vec![DeviceProtocol::ModbusRtu {
                path: "/dev/ttyUSB0".into(),
                baud: 9600,
                unit: 1,
            }]))
            .unwrap_err();
        assert!(e.contains("devices[0].protocol.path"), "{e}");
        assert!(e.contains("policy.serial_devices"), "{e}");
    }

    #[test]
    fn networks_ports_and_name_globs() {
        let p = policy(
            &[],
            &[
                "10.1.0.0/16:502",
                "192.168.7.0/24:4841-4850",
                "plc-*.line1.local",
                "[fd00::]/8:502",
            ],
        );
        p.check(&desired(vec![tcp("10.1.200.3", 502)])).unwrap();
        assert!(p.check(&desired(vec![tcp("10.1.200.3", 503)])).is_err());
        assert!(p.check(&desired(vec![tcp("10.2.0.1", 502)])).is_err());
        p.check(&desired(vec![tcp("PLC-3.line1.local", 9999)]))
            .unwrap();
        assert!(
            p.check(&desired(vec![tcp("plc-3.line2.local", 502)]))
                .is_err()
        );
        p.check(&desired(vec![tcp("fd12::7", 502)])).unwrap();
        p.check(&desired(vec![opcua(
            "opc.tcp://192.168.7.9:4841/UA/Server",
            OpcUaSecurity::SignAndEncrypt,
            Some("edge"),
        )]))
        .unwrap();
        let e = p
            .check(&desired(vec![opcua(
                "opc.tcp://192.168.7.9/UA",
                OpcUaSecurity::Sign,
                Some("edge"),
            )]))
            .unwrap_err();
        assert!(
            e.contains("devices[0].protocol.endpoint: 192.168.7.9:4840"),
            "{e}"
        );
        // A name never matches a network, an address never matches a name glob.
        assert!(
            policy(&[], &["*"])
                .check(&desired(vec![tcp("10.0.0.1", 1)]))
                .is_err()
        );
        assert!(
            policy(&[], &["0.0.0.0/0"])
                .check(&desired(vec![tcp("evil.example", 1)]))
                .is_err()
        );
    }

    #[test]
    fn serial_paths_must_match_as_written_and_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("ttyUSB0");
        std::fs::write(&allowed, b"").unwrap();
        let link = dir.path().join("ttyUSB9");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        let pattern = format!("{}/ttyUSB*", dir.path().display());
        let p = policy(&[&pattern], &[]);
        let rtu = |path: &Path| {
            desired(vec![DeviceProtocol::ModbusRtu {
                path: path.display().to_string(),
                baud: 9600,
                unit: 1,
            }])
        };
        // The temp dir itself may sit behind a symlink: allow its real path too.
        let real = std::fs::canonicalize(dir.path()).unwrap();
        let p2 = policy(&[&pattern, &format!("{}/ttyUSB*", real.display())], &[]);
        p2.check(&rtu(&allowed)).unwrap();
        let e = p2.check(&rtu(&link)).unwrap_err();
        assert!(e.contains("resolves to \"/etc/passwd\""), "{e}");
        let e = p.check(&rtu(Path::new("/etc/passwd"))).unwrap_err();
        assert!(e.contains("not in policy.serial_devices"), "{e}");
        let dotdot = format!("{}/ttyUSB0/../../etc/passwd", dir.path().display());
        let e = p.check(&rtu(Path::new(&dotdot))).unwrap_err();
        assert!(e.contains("without \"..\""), "{e}");
    }

    #[test]
    fn bad_entries_are_named() {
        let errs = Policy::parse(&PolicyConfig {
            serial_devices: vec!["ttyUSB*".into()],
            device_endpoints: vec!["10.0.0.0/8".into(), "10.0.0.0/8:70000".into(), "a b".into()],
            ..PolicyConfig::default()
        })
        .unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "serial_devices[0]",
                "device_endpoints[1]",
                "device_endpoints[2]"
            ]
        );
    }
}
