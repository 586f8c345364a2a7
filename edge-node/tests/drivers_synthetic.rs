//! Driver tests that need no device server: synthetic signals (on tokio's
//! paused clock) and a Modbus RTU device whose serial path does not exist.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::float_cmp
)]

use std::time::Duration;

use edge_node::clock::Clock;
use edge_node::drivers::health::counter;
use edge_node::drivers::synthetic::SignalGen;
use edge_node::drivers::{self, DriverOptions};
use protocols::{
    ByteOrder, DataType, Device, DeviceProtocol, ModbusTable, Point, PointAddress, PointGroup,
    Quality, Sample, Signal, WordOrder,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn synthetic_point(index: u32, signal: Signal) -> Point {
    Point {
        index,
        name: format!("s{index}"),
        address: PointAddress::Synthetic { signal },
        scale: 2.0,
        offset: 1.0,
        range: None,
        unit: None,
    }
}

fn synthetic_device() -> Device {
    Device {
        id: "synth".into(),
        protocol: DeviceProtocol::Synthetic,
        groups: vec![
            PointGroup {
                name: "fast".into(),
                interval_ms: 100,
                points: vec![
                    synthetic_point(
                        1,
                        Signal::Sine {
                            amplitude: 5.0,
                            period_s: 2.0,
                            offset: 10.0,
                            noise: 0.5,
                        },
                    ),
                    synthetic_point(
                        2,
                        Signal::RandomWalk {
                            start: 3.0,
                            step: 0.25,
                        },
                    ),
                ],
            },
            PointGroup {
                name: "slow".into(),
                interval_ms: 1_000,
                points: vec![synthetic_point(
                    3,
                    Signal::Steps {
                        height: 4.0,
                        every_s: 3.0,
                    },
                )],
            },
        ],
    }
}

async fn collect(until_ms: u64) -> Vec<Sample> {
    let (tx, mut rx) = mpsc::channel(1024);
    let clock = Clock::starting_at(1_700_000_000_000);
    let h = drivers::spawn(synthetic_device(), tx, clock, CancellationToken::new());
    let mut out = Vec::new();
    while let Some(batch) = rx.recv().await {
        let done = batch
            .iter()
            .any(|s| s.ts_ms >= 1_700_000_000_000 + until_ms);
        out.extend(batch);
        if done {
            break;
        }
    }
    let st = h.status();
    assert!(st.connected);
    assert!(st.counters[counter::SAMPLES] >= out.len() as u64);
    h.stop().await;
    out
}

#[tokio::test(start_paused = true)]
async fn synthetic_signals_are_periodic_and_reproducible() {
    let a = collect(10_000).await;
    let b = collect(10_000).await;
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            (x.point, x.ts_ms, x.value.to_bits()),
            (y.point, y.ts_ms, y.value.to_bits())
        );
        assert_eq!(x.quality, Quality::GOOD);
    }
    // Per-group intervals: ~10 samples/s for the fast points, 1/s for the slow one.
    let count = |p| a.iter().filter(|s| s.point == p).count();
    assert!((100..=102).contains(&count(1)), "{}", count(1));
    assert!((10..=12).contains(&count(3)), "{}", count(3));
    // Values follow the shared signal math, seeded by point index, then scaled.
    let mut g = SignalGen::new(
        Signal::Sine {
            amplitude: 5.0,
            period_s: 2.0,
            offset: 10.0,
            noise: 0.5,
        },
        1,
    );
    for s in a.iter().filter(|s| s.point == 1).take(20) {
        let t = s.ts_ms - 1_700_000_000_000;
        assert_eq!(s.value, g.sample(t).mul_add(2.0, 1.0));
    }
}

#[tokio::test(start_paused = true)]
async fn missing_serial_port_is_reported_not_fatal() {
    let dev = Device {
        id: "rtu".into(),
        protocol: DeviceProtocol::ModbusRtu {
            path: "/nonexistent/ttyUSB9".into(),
            baud: 9_600,
            unit: 1,
        },
        groups: vec![PointGroup {
            name: "g".into(),
            interval_ms: 500,
            points: vec![Point {
                index: 5,
                name: "t".into(),
                address: PointAddress::Modbus {
                    table: ModbusTable::Holding,
                    address: 0,
                    data_type: DataType::U16,
                    byte_order: ByteOrder::BigEndian,
                    word_order: WordOrder::HighFirst,
                },
                scale: 1.0,
                offset: 0.0,
                range: None,
                unit: None,
            }],
        }],
    };
    let (tx, mut rx) = mpsc::channel(64);
    let h = drivers::spawn_with(
        dev,
        DriverOptions::default(),
        tx,
        Clock::starting_at(0),
        CancellationToken::new(),
    );
    for _ in 0..5 {
        let batch = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(batch[0].quality, Quality::BAD_NOT_CONNECTED);
    }
    let st = h.status();
    assert!(!st.connected);
    assert!(st.last_error.unwrap().contains("/nonexistent/ttyUSB9"));
    assert!(st.counters[counter::CONNECT_FAILURES] >= 1);
    assert!(!h.is_finished());
    h.stop().await;
}
