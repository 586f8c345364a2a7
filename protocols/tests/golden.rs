//! Golden-file tests: every message type has a checked-in encoding. A change
//! to the wire format shows up here as a diff, not as a surprise in the field.
//! Regenerate deliberately with `UPDATE_GOLDEN=1 cargo test -p protocols --test golden`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use protocols::codec::{decode_batch, decode_desired, decode_json, encode_batch, encode_json};
use protocols::device::OpcUaSecurity;
use protocols::signing::SigningKey;
use protocols::*;

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn check_golden(name: &str, bytes: &[u8]) {
    let path = golden_path(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, bytes).unwrap();
    }
    let want = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create)",
            path.display()
        )
    });
    assert!(
        want == bytes,
        "{name} differs from its golden file:\n--- golden\n{}\n--- now\n{}",
        String::from_utf8_lossy(&want),
        String::from_utf8_lossy(bytes)
    );
}

fn pretty<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut s = serde_json::to_vec_pretty(v).unwrap();
    s.push(b'\n');
    s
}

#[expect(
    clippy::too_many_lines,
    reason = "the golden document, one literal with every field set"
)]
pub fn sample_desired() -> DesiredState {
    DesiredState {
        node: "press-7".into(),
        revision: 42,
        functions: vec![FunctionSpec {
            name: "temp-deadband".into(),
            module_sha256: "a".repeat(64),
            module_size: 12_345,
            config: serde_json::json!({"deadband_abs": 0.5, "max_interval_ms": 60000}),
            inputs: vec![1, 2],
            granted_devices: vec!["plc-1".into()],
            granted_models: vec!["temp-model".into()],
            outputs: vec!["filtered".into()],
            limits: FunctionLimits::default(),
        }],
        devices: vec![
            Device {
                id: "plc-1".into(),
                protocol: DeviceProtocol::ModbusTcp {
                    host: "10.0.0.5".into(),
                    port: 502,
                    unit: 1,
                },
                groups: vec![PointGroup {
                    name: "fast".into(),
                    interval_ms: 100,
                    points: vec![
                        Point {
                            index: 1,
                            name: "temp".into(),
                            address: PointAddress::Modbus {
                                table: ModbusTable::Holding,
                                address: 100,
                                data_type: DataType::F32,
                                byte_order: ByteOrder::BigEndian,
                                word_order: WordOrder::LowFirst,
                            },
                            scale: 1.0,
                            offset: 0.0,
                            range: Some(EngineeringRange {
                                low: -40.0,
                                high: 150.0,
                            }),
                            unit: Some("°C".into()),
                        },
                        Point {
                            index: 2,
                            name: "running".into(),
                            address: PointAddress::Modbus {
                                table: ModbusTable::Coil,
                                address: 7,
                                data_type: DataType::Bool,
                                byte_order: ByteOrder::BigEndian,
                                word_order: WordOrder::HighFirst,
                            },
                            scale: 1.0,
                            offset: 0.0,
                            range: None,
                            unit: None,
                        },
                    ],
                }],
            },
            Device {
                id: "ua-1".into(),
                protocol: DeviceProtocol::OpcUa {
                    endpoint: "opc.tcp://10.0.0.6:4840/".into(),
                    security: OpcUaSecurity::SignAndEncrypt,
                    username: None,
                    password_file: None,
                },
                groups: vec![PointGroup {
                    name: "slow".into(),
                    interval_ms: 1000,
                    points: vec![Point {
                        index: 3,
                        name: "pressure".into(),
                        address: PointAddress::OpcUa {
                            node_id: "ns=2;s=Line1.Pressure".into(),
                            deadband: Some(0.1),
                        },
                        scale: 1.0,
                        offset: 0.0,
                        range: None,
                        unit: Some("bar".into()),
                    }],
                }],
            },
            Device {
                id: "gen".into(),
                protocol: DeviceProtocol::Synthetic,
                groups: vec![PointGroup {
                    name: "demo".into(),
                    interval_ms: 50,
                    points: vec![Point {
                        index: 4,
                        name: "wave".into(),
                        address: PointAddress::Synthetic {
                            signal: Signal::Sine {
                                amplitude: 10.0,
                                period_s: 60.0,
                                offset: 20.0,
                                noise: 0.1,
                            },
                        },
                        scale: 1.0,
                        offset: 0.0,
                        range: None,
                        unit: None,
                    }],
                }],
            },
            Device {
                id: "meter-9".into(),
                protocol: DeviceProtocol::Mqtt {
                    host: "10.0.0.7".into(),
                    port: 1883,
                    topic: "plant/meters/9".into(),
                    qos: 1,
                    client_id: Some("press-7-meter-9".into()),
                    ca_file: None,
                    username: None,
                    password_file: None,
                },
                groups: vec![PointGroup {
                    name: "pushed".into(),
                    interval_ms: 1000,
                    points: vec![Point {
                        index: 5,
                        name: "flow".into(),
                        address: PointAddress::Mqtt { key: "flow".into() },
                        scale: 0.1,
                        offset: 0.0,
                        range: None,
                        unit: Some("m3/h".into()),
                    }],
                }],
            },
        ],
        models: vec![ModelRef {
            name: "temp-model".into(),
            sha256: "b".repeat(64),
            size: 2048,
        }],
        config: NodeConfig::default(),
    }
}

fn sample_batch() -> TelemetryBatch {
    TelemetryBatch {
        stream: "filtered".into(),
        first_seq: 1_000,
        floor_seq: 990,
        samples: (0..10)
            .map(|i| Sample {
                point: 1 + (i % 3),
                ts_ms: 1_764_300_000_000 + u64::from(i) * 100,
                value: f64::from(i) * 0.25 - 1.0,
                quality: if i == 7 {
                    Quality::BAD_TIMEOUT
                } else {
                    Quality::GOOD
                },
            })
            .collect(),
    }
}

#[test]
fn desired_state() {
    let d = sample_desired();
    d.validate().unwrap();
    check_golden("desired.json", &pretty(&d));
    let back = decode_desired(&std::fs::read(golden_path("desired.json")).unwrap()).unwrap();
    assert_eq!(back, d);
}

#[test]
fn signed_desired_state() {
    let key = SigningKey::from_bytes(&[7; 32]);
    let signed = SignedDesired::sign(&sample_desired(), &key).unwrap();
    check_golden("signed-desired.json", &pretty(&signed));
    let back =
        SignedDesired::decode(&std::fs::read(golden_path("signed-desired.json")).unwrap()).unwrap();
    assert_eq!(back.verify(&key.verifying_key()).unwrap(), sample_desired());
}

#[test]
fn reported_state() {
    let r = ReportedState {
        node: "press-7".into(),
        applied_revision: 42,
        received_revision: 44,
        staged_revision: 43,
        rejected: Some(Rejection {
            revision: Some(45),
            reason: "functions[0].inputs[2]: point 99 is not defined".into(),
            at_ms: 1_764_300_001_000,
        }),
        functions: BTreeMap::from([(
            "temp-deadband".into(),
            FunctionStatus {
                module_sha256: "a".repeat(64),
                state: FunctionState::Running,
                last_error: None,
                counters: BTreeMap::from([("in".into(), 1000), ("out".into(), 95)]),
                rolled_back: Some(FunctionRollback {
                    from_sha256: "b".repeat(64),
                    to_sha256: "a".repeat(64),
                    reason: "wasm trap: unreachable".into(),
                    at_ms: 1_764_300_000_500,
                }),
            },
        )]),
        devices: BTreeMap::from([(
            "plc-1".into(),
            DeviceStatus {
                connected: true,
                last_error: Some("timeout after 1s".into()),
                latency_ms: 3.5,
                success_ratio: 0.99,
                counters: BTreeMap::from([("reads".into(), 100)]),
            },
        )]),
        backlog: Backlog {
            samples: 12,
            bytes: 140,
            oldest_age_ms: 900,
            dropped: 0,
            floors: BTreeMap::new(),
        },
        offline_since_ms: Some(1_764_300_000_000),
        loss_windows: vec![LossWindow {
            from_ms: 1_764_299_990_000,
            to_ms: 1_764_299_995_000,
        }],
        counters: BTreeMap::from([("samples_in".into(), 5000)]),
        at_ms: 1_764_300_001_000,
    };
    check_golden("reported.json", &pretty(&r));
    let back: ReportedState = decode_json(
        "reported",
        &std::fs::read(golden_path("reported.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(back, r);
}

/// The function state is an enum in Rust and the same four strings on the
/// wire: each decodes from and re-encodes to exactly the golden bytes with
/// that string in place; any other string is refused with the field's path.
#[test]
fn reported_function_states_keep_their_strings() {
    let golden = std::fs::read_to_string(golden_path("reported.json")).unwrap();
    let running = "\"state\": \"running\"";
    assert_eq!(golden.matches(running).count(), 1, "{golden}");
    for (text, state) in [
        ("running", FunctionState::Running),
        ("backoff", FunctionState::Backoff),
        ("failed", FunctionState::Failed),
        ("loading", FunctionState::Loading),
    ] {
        let doc = golden.replace(running, &format!("\"state\": \"{text}\""));
        let r: ReportedState = decode_json("reported state", doc.as_bytes()).unwrap();
        assert_eq!(r.functions["temp-deadband"].state, state);
        assert_eq!(String::from_utf8(pretty(&r)).unwrap(), doc);
    }
    let doc = golden.replace(running, "\"state\": \"stopped\"");
    let e = decode_json::<ReportedState>("reported state", doc.as_bytes())
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("reported state: functions.temp-deadband.state: unknown variant `stopped`"),
        "{e}"
    );
}

#[test]
fn status_ack_event() {
    let s = NodeStatus {
        node: "press-7".into(),
        state: NodeState::Offline,
        at_ms: 1,
    };
    check_golden("status.json", &pretty(&s));
    let a = Ack {
        stream: "filtered".into(),
        up_to_seq: 1009,
    };
    check_golden("ack.json", &pretty(&a));
    let e = Event {
        node: "press-7".into(),
        at_ms: 2,
        kind: EventKind::OverflowDrop {
            stream: "raw".into(),
            dropped: 17,
        },
        message: "outbox full: dropped 17 oldest samples".into(),
    };
    check_golden("event.json", &pretty(&e));
    let back: NodeStatus = decode_json("status", &encode_json("status", &s).unwrap()).unwrap();
    assert_eq!(back, s);
    let back: Ack = decode_json("ack", &encode_json("ack", &a).unwrap()).unwrap();
    assert_eq!(back, a);
    let back: Event = decode_json("event", &encode_json("event", &e).unwrap()).unwrap();
    assert_eq!(back, e);
}

#[test]
fn telemetry_batch_binary() {
    let b = sample_batch();
    let bytes = encode_batch(&b);
    check_golden("telemetry.bin", &bytes);
    assert_eq!(decode_batch(&bytes).unwrap(), b);
}
