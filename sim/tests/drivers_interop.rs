//! Interop tests against independent implementations: a pymodbus Modbus TCP
//! server and an asyncua OPC UA server (Python, from PyPI), started from
//! `sim/interop/`. Ignored by default; `.ci/run` installs the Python packages
//! and runs them with `--ignored` (see `sim/interop/README.md`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::float_cmp
)]

mod drivers_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use drivers_support::*;
use edge_node::clock::Clock;
use edge_node::drivers::backoff::BackoffConfig;
use edge_node::drivers::health::counter;
use edge_node::drivers::opcua::SUBSCRIPTIONS;
use edge_node::drivers::{self, DriverOptions, OpcUaOptions};
use protocols::{
    ByteOrder, DataType, Device, DeviceProtocol, ModbusTable, OpcUaSecurity, Point, PointAddress,
    PointGroup, Quality, WordOrder,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const STARTUP: Duration = Duration::from_secs(120);

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("interop")
}

fn python() -> String {
    std::env::var("EDGEFLEET_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn free_port() -> u16 {
    edgefleet_testkit::free_port().unwrap()
}

/// Starts a Python server script and waits for its `READY` line; returns the
/// child and the words after `READY`.
async fn start_py(script: &str, args: &[String]) -> (Child, Vec<String>) {
    let mut child = Command::new(python())
        .arg("-u")
        .arg(interop_dir().join(script))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {} {script}: {e}", python()));
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(STARTUP, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.strip_prefix("READY") {
                return rest
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect::<Vec<_>>();
            }
        }
        panic!("{script} exited before READY");
    })
    .await
    .unwrap_or_else(|_| panic!("{script} not ready within {STARTUP:?}"));
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, ready)
}

async fn kill(mut child: Child) {
    let _ = child.kill().await;
    let _ = child.wait().await;
}

fn options(pki: &Path) -> DriverOptions {
    DriverOptions {
        backoff: BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(800),
            factor: 2.0,
            jitter: 0.3,
        },
        request_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(5),
        jitter_seed: Some(3),
        opcua: OpcUaOptions {
            pki_dir: pki.join("client"),
            trust_server_certs: true,
            ..OpcUaOptions::default()
        },
        ..DriverOptions::default()
    }
}

fn type_name(dt: DataType) -> &'static str {
    match dt {
        DataType::Bool => "bool",
        DataType::I16 => "i16",
        DataType::U16 => "u16",
        DataType::I32 => "i32",
        DataType::U32 => "u32",
        DataType::I64 => "i64",
        DataType::F32 => "f32",
        DataType::F64 => "f64",
    }
}

/// A value of `dt` that exercises every byte (sign bits, high words).
fn value_of(dt: DataType, k: u32) -> f64 {
    let k = f64::from(k);
    match dt {
        DataType::Bool => f64::from(u8::from(k as u32 % 2 == 1)),
        DataType::I16 => -12_345.0 + k,
        DataType::U16 => 54_321.0 + k,
        DataType::I32 => -123_456_789.0 - k,
        DataType::U32 => 3_000_000_000.0 + k,
        DataType::I64 => -1_234_567_890_123.0 - k,
        DataType::F32 => f64::from(-1234.5f32 + k as f32 * 0.25),
        DataType::F64 => -12_345.678_901_234 - k,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python3 with pymodbus; run by .ci/run"]
#[expect(
    clippy::too_many_lines,
    reason = "one end-to-end scenario against the pymodbus peer, read top to bottom"
)]
async fn pymodbus_every_type_both_orders_and_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let mut points = Vec::new();
    let mut spec = Vec::new();
    let mut expected = HashMap::new();
    let mut idx = 0u32;
    for table in [ModbusTable::Holding, ModbusTable::Input] {
        let mut addr = 0u32;
        for (dt, bo, wo) in all_formats() {
            if dt == DataType::Bool {
                continue; // bools live in the bit tables below
            }
            let v = value_of(dt, idx);
            points.push(modbus_point(idx, table, addr, dt, bo, wo));
            spec.push(serde_json::json!({
                "table": if table == ModbusTable::Holding { "holding" } else { "input" },
                "address": addr, "type": type_name(dt),
                "byte_order": if bo == ByteOrder::BigEndian { "big-endian" } else { "little-endian" },
                "word_order": if wo == WordOrder::HighFirst { "high-first" } else { "low-first" },
                "value": v,
            }));
            expected.insert(idx, v);
            idx += 1;
            // Input registers get unmapped holes between points: merged reads
            // are refused with exception 2 and must be split.
            addr += u32::from(dt.registers()) + if table == ModbusTable::Input { 3 } else { 0 };
        }
    }
    for (table, name) in [
        (ModbusTable::Coil, "coil"),
        (ModbusTable::DiscreteInput, "discrete-input"),
    ] {
        for a in 0..6u32 {
            let v = f64::from(a % 2);
            points.push(modbus_point(
                idx,
                table,
                a,
                DataType::Bool,
                ByteOrder::BigEndian,
                WordOrder::HighFirst,
            ));
            spec.push(serde_json::json!({"table": name, "address": a, "type": "bool", "value": v}));
            expected.insert(idx, v);
            idx += 1;
        }
    }
    let spec_path = dir.path().join("spec.json");
    std::fs::write(
        &spec_path,
        serde_json::to_vec(&serde_json::json!({"unit": 1, "points": spec})).unwrap(),
    )
    .unwrap();
    let port = free_port();
    let args = vec![
        "--port".to_owned(),
        port.to_string(),
        "--spec".to_owned(),
        spec_path.display().to_string(),
    ];
    let (child, _) = start_py("modbus_server.py", &args).await;

    let dev = device(
        "pymodbus",
        DeviceProtocol::ModbusTcp {
            host: "127.0.0.1".into(),
            port,
            unit: 1,
        },
        100,
        points.clone(),
    );
    let (tx, mut rx) = mpsc::channel(256);
    let h = drivers::spawn_with(
        dev,
        options(dir.path()),
        tx,
        Clock::system(),
        CancellationToken::new(),
    );
    let all: Vec<u32> = expected.keys().copied().collect();
    let mut seen: HashMap<u32, u32> = HashMap::new();
    until_all(&mut rx, &all, |s| {
        if s.quality != Quality::GOOD {
            return false;
        }
        assert_eq!(
            s.value, expected[&s.point],
            "point {} ({:?})",
            s.point, points[s.point as usize].address
        );
        let n = seen.entry(s.point).or_default();
        *n += 1;
        *n >= 2
    })
    .await;
    let st = h.status();
    assert!(
        st.counters[counter::EXCEPTIONS] >= 1,
        "the holes should have refused a merged read once: {st:?}"
    );

    // The server process dies and a new one starts on the same port.
    kill(child).await;
    until_any(&mut rx, |s| s.quality == Quality::BAD_NOT_CONNECTED).await;
    let (child, _) = start_py("modbus_server.py", &args).await;
    until_all(&mut rx, &all, |s| {
        s.quality == Quality::GOOD && s.value == expected[&s.point]
    })
    .await;
    assert!(h.health().counter(counter::RECONNECTS) >= 1);
    h.stop().await;
    kill(child).await;
}

fn opc_device(port: u16, ns: &str, n: u32, security: OpcUaSecurity) -> Device {
    let points = (0..n)
        .map(|i| Point {
            index: i,
            name: format!("v{i}"),
            address: PointAddress::OpcUa {
                node_id: format!("ns={ns};s=v{i}"),
                deadband: None,
            },
            scale: 1.0,
            offset: 0.0,
            range: None,
            unit: None,
        })
        .collect();
    Device {
        id: "asyncua".into(),
        protocol: DeviceProtocol::OpcUa {
            endpoint: format!("opc.tcp://127.0.0.1:{port}/"),
            security,
            username: None,
            password_file: None,
        },
        groups: vec![PointGroup {
            name: "g".into(),
            interval_ms: 100,
            points,
        }],
    }
}

/// The asyncua script's value rule: Boolean k%2; integers k%100; floats
/// (k%100)+0.5 — with 11 types cycling by variable index.
fn plausible(i: u32, v: f64) -> bool {
    match i % 11 {
        0 => v == 0.0 || v == 1.0,
        9 | 10 => v.fract() == 0.5 && (0.5..100.0).contains(&v),
        _ => v.fract() == 0.0 && (0.0..100.0).contains(&v),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python3 with asyncua; run by .ci/run"]
async fn asyncua_subscriptions_types_security_and_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let n = 55; // every type 5 times
    let port = free_port();
    let args = vec![
        "--port".to_owned(),
        port.to_string(),
        "--count".to_owned(),
        n.to_string(),
        "--pki".to_owned(),
        dir.path().join("server").display().to_string(),
    ];
    let (child, ready) = start_py("opcua_server.py", &args).await;
    let ns = ready.get(1).cloned().unwrap_or_else(|| "2".into());
    let all: Vec<u32> = (0..n).collect();

    for security in [
        OpcUaSecurity::None,
        OpcUaSecurity::Sign,
        OpcUaSecurity::SignAndEncrypt,
    ] {
        let (tx, mut rx) = mpsc::channel(1024);
        let h = drivers::spawn_with(
            opc_device(port, &ns, n, security),
            options(dir.path()),
            tx,
            Clock::system(),
            CancellationToken::new(),
        );
        let mut seen: HashMap<u32, u32> = HashMap::new();
        until_all(&mut rx, &all, |s| {
            if s.quality != Quality::GOOD {
                return false;
            }
            assert!(
                plausible(s.point, s.value),
                "{security:?}: v{} = {}",
                s.point,
                s.value
            );
            let c = seen.entry(s.point).or_default();
            *c += 1;
            *c >= 3 // changes arrive by subscription, several per point
        })
        .await;
        let st = h.status();
        assert_eq!(st.counters[SUBSCRIPTIONS], 1, "{security:?}: {st:?}");
        h.stop().await;
    }

    // Reconnect: the server process dies; a new one (no sessions, no
    // subscriptions) starts on the same port; data must flow again.
    let (tx, mut rx) = mpsc::channel(1024);
    let h = drivers::spawn_with(
        opc_device(port, &ns, n, OpcUaSecurity::None),
        options(dir.path()),
        tx,
        Clock::system(),
        CancellationToken::new(),
    );
    until_all(&mut rx, &all, good).await;
    kill(child).await;
    until_any(&mut rx, |s| s.quality == Quality::BAD_NOT_CONNECTED).await;
    let (child, _) = start_py("opcua_server.py", &args).await;
    let fut = until_all(&mut rx, &all, |s| {
        s.quality == Quality::GOOD && plausible(s.point, s.value)
    });
    tokio::time::timeout(STARTUP, fut)
        .await
        .expect("data did not resume after the server restart");
    assert!(
        h.health().counter(counter::RECONNECTS) >= 1,
        "{:?}",
        h.status()
    );
    h.stop().await;
    kill(child).await;
}
