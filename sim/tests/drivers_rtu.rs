//! Modbus RTU driver over an in-memory duplex pipe against the simulated
//! server's RTU framing: every data type and order, and a line that drops
//! and comes back.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::float_cmp
)]

mod drivers_support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use drivers_support::*;
use edge_node::clock::Clock;
use edge_node::drivers::backoff::BackoffConfig;
use edge_node::drivers::health::counter;
use edge_node::drivers::modbus::Connector;
use edge_node::drivers::{self, DriverOptions};
use protocols::{ByteOrder, DataType, DeviceProtocol, ModbusTable, Point, Quality, WordOrder};
use sim::devices::modbus::{Fault, ModbusSim, ModbusSimConfig, SimPoint, UnitConfig};
use sim::signal::Model;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn options() -> DriverOptions {
    DriverOptions {
        backoff: BackoffConfig {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(300),
            factor: 2.0,
            jitter: 0.3,
        },
        request_timeout: Duration::from_millis(300),
        jitter_seed: Some(5),
        ..DriverOptions::default()
    }
}

fn points() -> Vec<Point> {
    let mut v = Vec::new();
    let mut addr = 0;
    for (i, (dt, bo, wo)) in all_formats().into_iter().enumerate() {
        let i = u32::try_from(i).unwrap();
        v.push(modbus_point(i, ModbusTable::Holding, addr, dt, bo, wo));
        addr += u32::from(dt.registers());
    }
    v.push(modbus_point(
        100,
        ModbusTable::Coil,
        3,
        DataType::Bool,
        ByteOrder::BigEndian,
        WordOrder::HighFirst,
    ));
    v.push(modbus_point(
        101,
        ModbusTable::DiscreteInput,
        9,
        DataType::Bool,
        ByteOrder::BigEndian,
        WordOrder::HighFirst,
    ));
    v.push(modbus_point(
        102,
        ModbusTable::Input,
        2,
        DataType::I16,
        ByteOrder::LittleEndian,
        WordOrder::HighFirst,
    ));
    v
}

fn model(p: &Point) -> Model {
    match &p.address {
        protocols::PointAddress::Modbus {
            data_type: DataType::Bool,
            ..
        } => Model::new(protocols::Signal::Steps {
            height: 1.0,
            every_s: 0.2,
        }),
        protocols::PointAddress::Modbus {
            data_type: DataType::U16 | DataType::U32,
            ..
        } => Model::sine(1000.0, 1.5, 5000.0),
        _ => Model::sine(1000.0, 1.5, -3.5),
    }
}

async fn setup() -> (Arc<ModbusSim>, Vec<Point>, Connector) {
    let pts = points();
    let sim = Arc::new(
        ModbusSim::start(ModbusSimConfig {
            units: vec![UnitConfig {
                unit: 7,
                points: pts
                    .iter()
                    .map(|p| SimPoint::from_point(p, model(p)).unwrap())
                    .collect(),
                size: 0,
            }],
            tick: Duration::from_millis(20),
            seed: 3,
            ..ModbusSimConfig::default()
        })
        .await
        .unwrap(),
    );
    let s = sim.clone();
    let connector = Connector::stream("duplex", 7, move || {
        let s = s.clone();
        async move {
            let (client, server) = tokio::io::duplex(4096);
            s.attach_rtu(server).await;
            Ok(client)
        }
    });
    (sim, pts, connector)
}

fn rtu() -> DeviceProtocol {
    DeviceProtocol::ModbusRtu {
        path: "duplex".into(),
        baud: 19_200,
        unit: 7,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_over_duplex_decodes_every_type() {
    let (sim, pts, connector) = setup().await;
    let (tx, mut rx) = mpsc::channel(64);
    let h = drivers::spawn_modbus(
        device("rtu", rtu(), 30, pts.clone()),
        connector,
        options(),
        tx,
        Clock::system(),
        CancellationToken::new(),
    );
    let idx: Vec<u32> = pts.iter().map(|p| p.index).collect();
    let mut n = std::collections::HashMap::<u32, u32>::new();
    let samples = until_all(&mut rx, &idx, |s| {
        assert_eq!(s.quality, Quality::GOOD, "{s:?}");
        let c = n.entry(s.point).or_default();
        *c += 1;
        *c >= 3
    })
    .await;
    h.stop().await;
    for p in &pts {
        let truth: HashSet<u64> = sim
            .served(7, p.index)
            .iter()
            .map(|(_, v)| v.to_bits())
            .collect();
        for s in samples.iter().filter(|s| s.point == p.index) {
            assert!(
                truth.contains(&s.value.to_bits()),
                "{} = {} not served",
                p.name,
                s.value
            );
        }
    }
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_line_drop_and_faults_recover() {
    let (sim, pts, connector) = setup().await;
    let (tx, mut rx) = mpsc::channel(64);
    let h = drivers::spawn_modbus(
        device("rtu", rtu(), 30, pts.clone()),
        connector,
        options(),
        tx,
        Clock::system(),
        CancellationToken::new(),
    );
    let idx: Vec<u32> = pts.iter().map(|p| p.index).collect();
    until_all(&mut rx, &idx, good).await;

    sim.go_down();
    eprintln!("down");
    until_any(&mut rx, |s| s.quality == Quality::BAD_NOT_CONNECTED).await;
    eprintln!("saw not connected");
    sim.come_up().await.unwrap();
    until_all(&mut rx, &idx, good).await;
    assert!(h.health().counter(counter::RECONNECTS) >= 1);

    eprintln!("recovered {:?}", h.status());
    sim.set_fault(Fault::Exception(2));
    until_any(&mut rx, |s| s.quality == Quality::BAD_DEVICE_EXCEPTION).await;
    eprintln!("exceptions seen");
    sim.set_fault(Fault::Garbage);
    until_any(&mut rx, |s| {
        matches!(s.quality, Quality::BAD_MALFORMED | Quality::BAD_TIMEOUT)
    })
    .await;
    sim.set_fault(Fault::None);
    until_all(&mut rx, &idx, good).await;
    assert!(h.health().counter(counter::EXCEPTIONS) >= 1);
    assert!(!h.is_finished());
    h.stop().await;
    sim.stop().await;
}
