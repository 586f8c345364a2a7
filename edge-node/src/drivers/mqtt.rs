//! The driver of MQTT-native devices ([`DeviceProtocol::Mqtt`]).
//!
//! The device publishes JSON [`MqttDevicePayload`] messages to a broker of
//! its own (not necessarily the hub's); the driver connects to that broker
//! with its own rumqttc client, subscribes to the device's topic and turns
//! each message into one `Vec<Sample>`: one sample per point whose key is in
//! `values`, engineering value = raw × scale + offset, stamped with the
//! message's `ts_ms` (or the receive time if it has none).
//!
//! # Quality
//! - a number whose engineering value is finite: `GOOD`;
//! - `null`: `BAD` (the device has no value), value = the point's last good
//!   value (`NaN` before the first);
//! - a number whose engineering value is not finite: `BAD_OUT_OF_RANGE`;
//! - connection to the broker lost: one `BAD_NOT_CONNECTED` sample per point
//!   (value = last good value), once per outage, stamped at detection.
//!
//! # Faults
//! A message that is not a valid payload (not JSON, unknown fields, a value
//! that is neither a number nor `null`) is counted (`malformed`, `errors`),
//! recorded as the device's `last_error` (reported state) and dropped; the
//! driver never stops because of what a device sends. Every message counts
//! as one `reads` entry, so `success_ratio` is the share of valid messages.
//!
//! # Delivery
//! The session is persistent (clean session off, client id
//! `edgefleet-<device id>` unless configured) and the subscription QoS 1 by
//! default, so the broker keeps what the device published while the driver
//! was disconnected and delivers it on reconnect. QoS 1 may deliver a message
//! twice: a message whose `ts_ms` is not newer than the last one taken for a
//! point gives no sample for that point (counted as `duplicates`). Messages
//! without `ts_ms` are not deduplicated.
//!
//! A message whose `ts_ms` is more than
//! [`MqttDeviceOptions::max_future_skew`](super::MqttDeviceOptions) (default
//! 5 minutes) ahead of the gateway's clock is refused whole (counted as
//! `future_timestamp`, recorded as the device's `last_error`; the first of a
//! burst is logged): it would otherwise set the points' dedup mark so far
//! ahead that every later value is dropped as a duplicate (M10).
//!
//! # Broker security
//! With `ca_file` the connection is TLS, checked against the CA
//! certificates in that file only; with `username` (and `password_file`)
//! the driver logs in. Both files are plain names looked up in the
//! gateway's device-secrets directory
//! ([`MqttDeviceOptions::secrets_dir`](super::MqttDeviceOptions)), so
//! desired state can only pick among files the site put there. A file that
//! cannot be read, or a password file group or others can read or replace
//! (see `secrets`), is a connect failure naming the field; the driver
//! retries with backoff (the file may be added or fixed later). A password
//! sent over plain TCP to a broker that is not on loopback is logged as a
//! warning at every connect.
//!
//! Reconnects use [`Backoff`] with the driver options' backoff settings.

use protocols::limits::MAX_DEVICE_MESSAGE_BYTES;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use protocols::{Device, DeviceProtocol, MqttDevicePayload, PointAddress, Quality, Sample};
use rumqttc::{
    AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::decode;
use super::health::{Health, counter};
use super::secrets::{is_loopback, read_password, secret_path};
use super::{DriverOptions, MqttDeviceOptions};
use crate::burst::Burst;
use crate::clock::Clock;

/// Counter of per-point values dropped as redeliveries (see the module doc).
pub const DUPLICATES: &str = "duplicates";

/// Counter of subscriptions the broker refused.
pub const SUBSCRIBE_REFUSED: &str = "subscribe_refused";

/// Counter of messages refused because their `ts_ms` is too far in the future.
pub const FUTURE_TIMESTAMP: &str = "future_timestamp";

/// Why a message gave no samples.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refused {
    /// Not a valid payload.
    Malformed(String),
    /// Stamped more than the allowed skew ahead of the gateway's clock.
    Future {
        /// The message's timestamp.
        ts_ms: u64,
        /// The gateway's clock.
        now_ms: u64,
        /// The allowed skew.
        skew_ms: u64,
    },
}

impl Refused {
    fn counter(&self) -> &'static str {
        match self {
            Self::Malformed(_) => counter::MALFORMED,
            Self::Future { .. } => FUTURE_TIMESTAMP,
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Malformed(m) => f.write_str(m),
            Self::Future {
                ts_ms,
                now_ms,
                skew_ms,
            } => write!(
                f,
                "ts_ms {ts_ms} is {} ms ahead of the gateway clock ({now_ms}), more than the allowed {skew_ms} ms; message refused",
                ts_ms - now_ms
            ),
        }
    }
}

/// One point of the device.
#[derive(Debug, Clone)]
struct PointMeta {
    index: u32,
    scale: f64,
    offset: f64,
    /// Last good engineering value.
    last: f64,
    /// Device timestamp of the last sample taken (dedup).
    last_ts: Option<u64>,
}

/// Points by payload key.
#[derive(Debug, Default)]
struct Table {
    by_key: HashMap<String, PointMeta>,
}

impl Table {
    fn new(device: &Device) -> Self {
        let mut by_key = HashMap::new();
        for p in device.groups.iter().flat_map(|g| &g.points) {
            if let PointAddress::Mqtt { key } = &p.address {
                by_key.insert(
                    key.clone(),
                    PointMeta {
                        index: p.index,
                        scale: p.scale,
                        offset: p.offset,
                        last: f64::NAN,
                        last_ts: None,
                    },
                );
            } else {
                tracing::warn!(point = %p.name, "not an mqtt address; point ignored");
            }
        }
        Self { by_key }
    }

    /// Samples of one message received at `now_ms`; `Err` says why it
    /// gives none (malformed, or stamped more than `skew_ms` ahead).
    /// Returns the samples and how many were dropped as duplicates.
    fn decode(
        &mut self,
        payload: &[u8],
        now_ms: u64,
        skew_ms: u64,
    ) -> Result<(Vec<Sample>, u64), Refused> {
        let msg: MqttDevicePayload = serde_json::from_slice(payload)
            .map_err(|e| Refused::Malformed(format!("malformed payload: {e}")))?;
        if let Some(ts_ms) = msg.ts_ms
            && ts_ms > now_ms.saturating_add(skew_ms)
        {
            return Err(Refused::Future {
                ts_ms,
                now_ms,
                skew_ms,
            });
        }
        let ts_ms = msg.ts_ms.unwrap_or(now_ms);
        let mut out = Vec::with_capacity(msg.values.len());
        let mut dup = 0;
        for (key, raw) in &msg.values {
            let Some(p) = self.by_key.get_mut(key) else {
                continue;
            };
            if let Some(ts) = msg.ts_ms {
                if p.last_ts.is_some_and(|last| ts <= last) {
                    dup += 1;
                    continue;
                }
                p.last_ts = Some(ts);
            }
            let (value, quality) = match raw {
                None => (p.last, Quality::BAD),
                Some(raw) => {
                    let v = decode::engineering(*raw, p.scale, p.offset);
                    if v.is_finite() {
                        p.last = v;
                        (v, Quality::GOOD)
                    } else {
                        (p.last, Quality::BAD_OUT_OF_RANGE)
                    }
                }
            };
            out.push(Sample {
                point: p.index,
                ts_ms,
                value,
                quality,
            });
        }
        out.sort_by_key(|s| s.point);
        Ok((out, dup))
    }

    fn not_connected(&self, now_ms: u64) -> Vec<Sample> {
        let mut out: Vec<Sample> = self
            .by_key
            .values()
            .map(|p| Sample {
                point: p.index,
                ts_ms: now_ms,
                value: p.last,
                quality: Quality::BAD_NOT_CONNECTED,
            })
            .collect();
        out.sort_by_key(|s| s.point);
        out
    }
}

async fn send(
    out: &mpsc::Sender<Vec<Sample>>,
    batch: Vec<Sample>,
    health: &Health,
    cancel: &CancellationToken,
) -> bool {
    if batch.is_empty() {
        return true;
    }
    let bad = batch.iter().filter(|s| s.quality.is_bad()).count();
    health.samples(batch.len(), bad);
    tokio::select! {
        () = cancel.cancelled() => false,
        r = out.send(batch) => r.is_ok(),
    }
}

/// Runs the driver until `cancel` fires or `out` is dropped.
#[expect(
    clippy::too_many_lines,
    reason = "the client set-up, then the driver's one select loop over broker events and cancellation; the arms share the loop's local session state"
)]
pub async fn run(
    device: Device,
    options: DriverOptions,
    out: mpsc::Sender<Vec<Sample>>,
    clock: Clock,
    health: Health,
    cancel: CancellationToken,
) {
    let DeviceProtocol::Mqtt {
        topic,
        qos,
        client_id,
        ..
    } = &device.protocol
    else {
        tracing::error!(
            "mqtt driver started for a {} device",
            device.protocol.kind_name()
        );
        return;
    };
    let qos = if *qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let id = client_id
        .clone()
        .unwrap_or_else(|| format!("edgefleet-{}", device.id));
    let seed = options.jitter_seed.unwrap_or_else(rand::random);
    let mut backoff = Backoff::new(options.backoff, seed);
    // The secrets are read before each connect attempt until they are
    // there: a missing file is a device error, not a reason to stop.
    let mqtt = loop {
        match connect_options(&id, &device.protocol, &options.mqtt) {
            Ok(o) => break o,
            Err(e) => {
                tracing::warn!(device = %device.id, "{e}");
                health.connect_failed(e);
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    };
    let (client, mut eventloop) = AsyncClient::new(mqtt, 16);
    eventloop
        .network_options
        .set_connection_timeout(options.connect_timeout.as_secs().max(1));
    let mut table = Table::new(&device);
    let skew_ms = u64::try_from(options.mqtt.max_future_skew.as_millis()).unwrap_or(u64::MAX);
    let mut future = Burst::default();
    let mut connected = false;
    loop {
        let polled = tokio::select! {
            () = cancel.cancelled() => break,
            p = eventloop.poll() => p,
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected = true;
                backoff.reset();
                health.connected();
                // Never await the request channel from the polling task: it is
                // drained by `poll` itself.
                if let Err(e) = client.try_subscribe(topic.clone(), qos) {
                    health.disconnected(format!("subscribe {topic}: {e}"));
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    let msg = format!("broker refused the subscription to {topic}");
                    tracing::warn!("{msg}");
                    health.request(false, Duration::ZERO, Some((SUBSCRIBE_REFUSED, msg)));
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                match table.decode(&p.payload, clock.now_ms(), skew_ms) {
                    Ok((samples, dup)) => {
                        health.request(true, Duration::ZERO, None);
                        health.add(DUPLICATES, dup);
                        if let Some(n) = future.accept() {
                            tracing::info!(device = %device.id, refused = n, "device timestamps are plausible again after {n} message(s) refused as from the future");
                        }
                        if !send(&out, samples, &health, &cancel).await {
                            break;
                        }
                    }
                    Err(why) => {
                        if matches!(why, Refused::Future { .. }) && future.refuse(1) {
                            tracing::warn!(device = %device.id, topic = %p.topic, "{why} (further ones are counted as {FUTURE_TIMESTAMP}, not logged)");
                        } else {
                            tracing::debug!(device = %device.id, topic = %p.topic, "{why}");
                        }
                        health.request(
                            false,
                            Duration::ZERO,
                            Some((why.counter(), format!("{}: {why}", p.topic))),
                        );
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                if connected {
                    connected = false;
                    health.disconnected(e.to_string());
                    let batch = table.not_connected(clock.now_ms());
                    if !send(&out, batch, &health, &cancel).await {
                        break;
                    }
                } else {
                    health.connect_failed(e.to_string());
                }
                let delay = backoff.next_delay();
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    // Bounded, polite disconnect; the event loop is dropped with this task.
    if connected {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            while let Ok(ev) = eventloop.poll().await {
                if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// The client options of `protocol` (an MQTT device): keep-alive,
/// persistent session, packet limit, TLS with the device's CA file and the
/// login, the files read from `options.secrets_dir`. `Err` names the field.
fn connect_options(
    client_id: &str,
    protocol: &DeviceProtocol,
    options: &MqttDeviceOptions,
) -> Result<MqttOptions, String> {
    let DeviceProtocol::Mqtt {
        host,
        port,
        ca_file,
        username,
        password_file,
        ..
    } = protocol
    else {
        return Err(format!("not an mqtt device: {}", protocol.kind_name()));
    };
    let mut mqtt = MqttOptions::new(client_id, host.clone(), *port);
    mqtt.set_keep_alive(Duration::from_secs(10));
    mqtt.set_clean_session(false);
    mqtt.set_max_packet_size(MAX_DEVICE_MESSAGE_BYTES, MAX_DEVICE_MESSAGE_BYTES);
    let dir = options.secrets_dir.as_deref();
    if let Some(name) = ca_file {
        let path = secret_path(dir, "ca_file", name)?;
        mqtt.set_transport(Transport::tls_with_config(tls_config(&path)?));
    }
    if let Some(user) = username {
        let password = match password_file {
            Some(name) => read_password(dir, "password_file", name)?,
            None => String::new(),
        };
        if ca_file.is_none() && password_file.is_some() && !is_loopback(host) {
            tracing::warn!(%host, port, "sending a password to a non-loopback device broker over plain TCP (no ca_file): it travels in clear text");
        }
        mqtt.set_credentials(user.clone(), password);
    }
    Ok(mqtt)
}

/// TLS trusting only the CA certificates in `ca` (PEM).
fn tls_config(ca: &std::path::Path) -> Result<TlsConfiguration, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let bad = |e: &dyn std::fmt::Display| format!("protocol.ca_file {}: {e}", ca.display());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| bad(&e))? {
        roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    if roots.is_empty() {
        return Err(bad(&"no certificate in it"));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(&e))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConfiguration::Rustls(Arc::new(config)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::float_cmp, reason = "test code")]
mod tests {
    use super::*;
    use protocols::{Point, PointGroup};

    /// The default skew, in ms.
    const SKEW: u64 = 300_000;

    fn device() -> Device {
        let point = |index: u32, key: &str, scale: f64| Point {
            index,
            name: key.into(),
            address: PointAddress::Mqtt { key: key.into() },
            scale,
            offset: 1.0,
            range: None,
            unit: None,
        };
        Device {
            id: "m".into(),
            protocol: DeviceProtocol::Mqtt {
                host: "127.0.0.1".into(),
                port: 1883,
                topic: "t".into(),
                qos: 1,
                client_id: None,
                ca_file: None,
                username: None,
                password_file: None,
            },
            groups: vec![PointGroup {
                name: "g".into(),
                interval_ms: 1000,
                points: vec![point(7, "a", 2.0), point(8, "b", 1.0)],
            }],
        }
    }

    #[test]
    fn decodes_values_with_quality_and_scale() {
        let mut t = Table::new(&device());
        let (s, dup) = t
            .decode(
                br#"{"ts_ms":100,"values":{"a":2.5,"b":null,"zzz":1}}"#,
                5,
                SKEW,
            )
            .unwrap();
        assert_eq!(dup, 0);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].point, s[0].ts_ms, s[0].value), (7, 100, 6.0));
        assert_eq!(s[0].quality, Quality::GOOD);
        assert_eq!(s[1].point, 8);
        assert!(s[1].value.is_nan());
        assert_eq!(s[1].quality, Quality::BAD);
        // No ts: receive time. Null keeps the last good value.
        let (s, _) = t.decode(br#"{"values":{"a":null}}"#, 5, SKEW).unwrap();
        assert_eq!(
            (s[0].ts_ms, s[0].value, s[0].quality),
            (5, 6.0, Quality::BAD)
        );
    }

    #[test]
    fn redeliveries_are_dropped_and_garbage_is_an_error() {
        let mut t = Table::new(&device());
        let (s, _) = t
            .decode(br#"{"ts_ms":100,"values":{"a":1}}"#, 100, SKEW)
            .unwrap();
        assert_eq!(s.len(), 1);
        let (s, dup) = t
            .decode(br#"{"ts_ms":100,"values":{"a":1}}"#, 100, SKEW)
            .unwrap();
        assert_eq!((s.len(), dup), (0, 1));
        for bad in [
            &b"not json"[..],
            br#"{"values":{"a":"x"}}"#,
            br#"{"v":{}}"#,
            b"\xff",
        ] {
            let e = t.decode(bad, 0, SKEW).unwrap_err();
            assert!(matches!(e, Refused::Malformed(_)), "{e}");
            assert!(e.to_string().starts_with("malformed payload"), "{e}");
        }
        let marks = t.not_connected(9);
        assert_eq!(marks.len(), 2);
        assert!(
            marks
                .iter()
                .all(|m| m.quality == Quality::BAD_NOT_CONNECTED)
        );
    }

    #[test]
    fn a_message_from_the_future_is_refused_and_does_not_silence_the_point() {
        let mut t = Table::new(&device());
        let now = 1_000_000;
        // Ahead by less than the skew: taken.
        let (s, _) = t
            .decode(br#"{"ts_ms":1200000,"values":{"a":1}}"#, now, SKEW)
            .unwrap();
        assert_eq!(s.len(), 1);
        let e = t
            .decode(
                br#"{"ts_ms":18446744073709551615,"values":{"a":1,"b":1}}"#,
                now,
                SKEW,
            )
            .unwrap_err();
        assert!(matches!(e, Refused::Future { .. }), "{e}");
        assert_eq!(e.counter(), FUTURE_TIMESTAMP);
        assert!(
            e.to_string().contains("more than the allowed 300000 ms"),
            "{e}"
        );
        // The next real message still gets through: without the check the
        // u64::MAX stamp made every later value a "duplicate", for good.
        let (s, dup) = t
            .decode(
                br#"{"ts_ms":1300000,"values":{"a":2,"b":2}}"#,
                1_100_000,
                SKEW,
            )
            .unwrap();
        assert_eq!((s.len(), dup), (2, 0));
    }

    fn mqtt_protocol(
        ca_file: Option<&str>,
        username: Option<&str>,
        password_file: Option<&str>,
    ) -> DeviceProtocol {
        DeviceProtocol::Mqtt {
            host: "127.0.0.1".into(),
            port: 8883,
            topic: "t".into(),
            qos: 1,
            client_id: None,
            ca_file: ca_file.map(Into::into),
            username: username.map(Into::into),
            password_file: password_file.map(Into::into),
        }
    }

    #[test]
    fn tls_and_login_come_from_the_secrets_dir_and_errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let opts = MqttDeviceOptions {
            secrets_dir: Some(dir.path().to_owned()),
            ..MqttDeviceOptions::default()
        };
        let plain = connect_options("c", &mqtt_protocol(None, None, None), &opts).unwrap();
        assert!(matches!(plain.transport(), Transport::Tcp));
        assert!(plain.credentials().is_none());

        std::fs::write(dir.path().join("broker.pw"), "s3cret\nignored\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            // Only the owner may enter: a 0644 password file inside is private.
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(vec!["broker.local".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let secure = connect_options(
            "c",
            &mqtt_protocol(Some("ca.pem"), Some("edge"), Some("broker.pw")),
            &opts,
        )
        .unwrap();
        assert!(matches!(secure.transport(), Transport::Tls(_)));
        let login = secure.credentials().unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("edge", "s3cret")
        );
        // A user name alone logs in without a password.
        let user = connect_options("c", &mqtt_protocol(None, Some("edge"), None), &opts).unwrap();
        assert_eq!(user.credentials().unwrap().password, "");

        for (protocol, want) in [
            (
                mqtt_protocol(Some("missing.pem"), None, None),
                "protocol.ca_file",
            ),
            (
                mqtt_protocol(Some("broker.pw"), None, None),
                "protocol.ca_file",
            ),
            (
                mqtt_protocol(None, Some("edge"), Some("missing.pw")),
                "protocol.password_file",
            ),
            (
                mqtt_protocol(None, Some("edge"), Some("../identity/node.key")),
                "protocol.password_file: \"../identity/node.key\" is not a plain file name",
            ),
        ] {
            let e = connect_options("c", &protocol, &opts).unwrap_err();
            assert!(e.contains(want), "{want} not in {e}");
        }
        let none = MqttDeviceOptions::default();
        let e =
            connect_options("c", &mqtt_protocol(Some("ca.pem"), None, None), &none).unwrap_err();
        assert!(
            e.contains("protocol.ca_file: this gateway has no device secrets"),
            "{e}"
        );
    }
}
