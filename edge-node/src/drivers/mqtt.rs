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
//! Reconnects use [`Backoff`] with the driver options' backoff settings.

use protocols::limits::MAX_DEVICE_MESSAGE_BYTES;
use std::collections::HashMap;
use std::time::Duration;

use protocols::{Device, DeviceProtocol, MqttDevicePayload, PointAddress, Quality, Sample};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeReasonCode};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::DriverOptions;
use super::backoff::Backoff;
use super::decode;
use super::health::{Health, counter};
use crate::clock::Clock;

/// Counter of per-point values dropped as redeliveries (see the module doc).
pub const DUPLICATES: &str = "duplicates";

/// Counter of subscriptions the broker refused.
pub const SUBSCRIBE_REFUSED: &str = "subscribe_refused";

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

    /// Samples of one message; `Err` describes a malformed payload.
    /// Returns the samples and how many were dropped as duplicates.
    fn decode(&mut self, payload: &[u8], now_ms: u64) -> Result<(Vec<Sample>, u64), String> {
        let msg: MqttDevicePayload =
            serde_json::from_slice(payload).map_err(|e| format!("malformed payload: {e}"))?;
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
        host,
        port,
        topic,
        qos,
        client_id,
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
    let mut mqtt = MqttOptions::new(id, host.clone(), *port);
    mqtt.set_keep_alive(Duration::from_secs(10));
    mqtt.set_clean_session(false);
    mqtt.set_max_packet_size(MAX_DEVICE_MESSAGE_BYTES, MAX_DEVICE_MESSAGE_BYTES);
    let (client, mut eventloop) = AsyncClient::new(mqtt, 16);
    eventloop
        .network_options
        .set_connection_timeout(options.connect_timeout.as_secs().max(1));
    let mut table = Table::new(&device);
    let seed = options.jitter_seed.unwrap_or_else(rand::random);
    let mut backoff = Backoff::new(options.backoff, seed);
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
                match table.decode(&p.payload, clock.now_ms()) {
                    Ok((samples, dup)) => {
                        health.request(true, Duration::ZERO, None);
                        health.add(DUPLICATES, dup);
                        if !send(&out, samples, &health, &cancel).await {
                            break;
                        }
                    }
                    Err(msg) => {
                        tracing::debug!(topic = %p.topic, "{msg}");
                        health.request(
                            false,
                            Duration::ZERO,
                            Some((counter::MALFORMED, format!("{}: {msg}", p.topic))),
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::float_cmp, reason = "test code")]
mod tests {
    use super::*;
    use protocols::{Point, PointGroup};

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
            .decode(br#"{"ts_ms":100,"values":{"a":2.5,"b":null,"zzz":1}}"#, 5)
            .unwrap();
        assert_eq!(dup, 0);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].point, s[0].ts_ms, s[0].value), (7, 100, 6.0));
        assert_eq!(s[0].quality, Quality::GOOD);
        assert_eq!(s[1].point, 8);
        assert!(s[1].value.is_nan());
        assert_eq!(s[1].quality, Quality::BAD);
        // No ts: receive time. Null keeps the last good value.
        let (s, _) = t.decode(br#"{"values":{"a":null}}"#, 5).unwrap();
        assert_eq!(
            (s[0].ts_ms, s[0].value, s[0].quality),
            (5, 6.0, Quality::BAD)
        );
    }

    #[test]
    fn redeliveries_are_dropped_and_garbage_is_an_error() {
        let mut t = Table::new(&device());
        let (s, _) = t.decode(br#"{"ts_ms":100,"values":{"a":1}}"#, 0).unwrap();
        assert_eq!(s.len(), 1);
        let (s, dup) = t.decode(br#"{"ts_ms":100,"values":{"a":1}}"#, 0).unwrap();
        assert_eq!((s.len(), dup), (0, 1));
        for bad in [
            &b"not json"[..],
            br#"{"values":{"a":"x"}}"#,
            br#"{"v":{}}"#,
            b"\xff",
        ] {
            let e = t.decode(bad, 0).unwrap_err();
            assert!(e.starts_with("malformed payload"), "{e}");
        }
        let marks = t.not_connected(9);
        assert_eq!(marks.len(), 2);
        assert!(
            marks
                .iter()
                .all(|m| m.quality == Quality::BAD_NOT_CONNECTED)
        );
    }
}
