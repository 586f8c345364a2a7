//! Modbus TCP driver against the simulated Modbus server: every data type and
//! byte/word order, coalescing, multiple units, and faults (disappearing
//! device, exceptions, garbage, short replies, silence).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::float_cmp
)]

mod drivers_support;

use std::collections::HashSet;
use std::time::Duration;

use drivers_support::*;
use edge_node::clock::Clock;
use edge_node::drivers::backoff::BackoffConfig;
use edge_node::drivers::decode::Format;
use edge_node::drivers::health::counter;
use edge_node::drivers::{self, DriverOptions};
use protocols::{
    ByteOrder, DataType, DeviceProtocol, ModbusTable, Point, Quality, Signal, WordOrder,
};
use sim::devices::modbus::{Fault, ModbusSim, ModbusSimConfig, SimPoint, UnitConfig};
use sim::signal::Model;
use tokio::sync::mpsc;
use tokio_modbus::client::Reader as _;
use tokio_util::sync::CancellationToken;

fn fast_options() -> DriverOptions {
    DriverOptions {
        backoff: BackoffConfig {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(400),
            factor: 2.0,
            jitter: 0.3,
        },
        request_timeout: Duration::from_millis(300),
        connect_timeout: Duration::from_millis(500),
        retries: 1,
        jitter_seed: Some(1),
        ..DriverOptions::default()
    }
}

/// Range of values a model may take that fits every integer type.
fn model_for(dt: DataType, i: u32) -> Model {
    let base = match dt {
        DataType::Bool => Signal::Steps {
            height: 1.0,
            every_s: 0.3,
        },
        DataType::U16 => Signal::Sine {
            amplitude: 30_000.0,
            period_s: 2.0,
            offset: 32_000.0,
            noise: 0.0,
        },
        DataType::I16 => Signal::Sine {
            amplitude: 30_000.0,
            period_s: 2.0,
            offset: 0.0,
            noise: 0.0,
        },
        DataType::U32 => Signal::Sine {
            amplitude: 2.0e9,
            period_s: 2.0,
            offset: 2.1e9,
            noise: 0.0,
        },
        DataType::I32 => Signal::Sine {
            amplitude: 2.0e9,
            period_s: 2.0,
            offset: 0.0,
            noise: 0.0,
        },
        DataType::I64 => Signal::Sine {
            amplitude: 1.0e15,
            period_s: 2.0,
            offset: -5.0,
            noise: 0.0,
        },
        DataType::F32 | DataType::F64 => Signal::Sine {
            amplitude: 123.456,
            period_s: 1.0 + f64::from(i) / 10.0,
            offset: -7.25,
            noise: 0.5,
        },
    };
    Model::new(base)
}

/// Points of every format in holding and input registers, plus coils and
/// discrete inputs; addresses spaced so reads coalesce with gaps.
fn every_format_points() -> Vec<Point> {
    let mut points = Vec::new();
    let mut idx = 0u32;
    for table in [ModbusTable::Holding, ModbusTable::Input] {
        let mut addr = 0u32;
        for (dt, bo, wo) in all_formats() {
            points.push(modbus_point(idx, table, addr, dt, bo, wo));
            idx += 1;
            addr += u32::from(dt.registers()) + 1; // one-register gaps
        }
    }
    for table in [ModbusTable::Coil, ModbusTable::DiscreteInput] {
        for a in 0..5 {
            points.push(modbus_point(
                idx,
                table,
                a * 3,
                DataType::Bool,
                ByteOrder::BigEndian,
                WordOrder::HighFirst,
            ));
            idx += 1;
        }
    }
    points
}

fn sim_points(points: &[Point]) -> Vec<SimPoint> {
    points
        .iter()
        .map(|p| {
            let protocols::PointAddress::Modbus { data_type, .. } = &p.address else {
                unreachable!()
            };
            SimPoint::from_point(p, model_for(*data_type, p.index)).unwrap()
        })
        .collect()
}

async fn start_sim(units: Vec<UnitConfig>) -> ModbusSim {
    ModbusSim::start(ModbusSimConfig {
        units,
        tick: Duration::from_millis(20),
        seed: 42,
        ..ModbusSimConfig::default()
    })
    .await
    .unwrap()
}

fn tcp(sim: &ModbusSim, unit: u8) -> DeviceProtocol {
    DeviceProtocol::ModbusTcp {
        host: "127.0.0.1".into(),
        port: sim.local_addr().port(),
        unit,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_and_order_matches_ground_truth() {
    let points = every_format_points();
    let sim = start_sim(vec![UnitConfig {
        unit: 1,
        points: sim_points(&points),
        size: 0,
    }])
    .await;
    let dev = device("plc", tcp(&sim, 1), 50, points.clone());
    let (tx, mut rx) = mpsc::channel(64);
    let h = drivers::spawn_with(
        dev,
        fast_options(),
        tx,
        Clock::system(),
        CancellationToken::new(),
    );

    let indexes: Vec<u32> = points.iter().map(|p| p.index).collect();
    // Collect several good cycles of every point.
    let mut seen = std::collections::HashMap::<u32, usize>::new();
    let samples = until_all(&mut rx, &indexes, |s| {
        assert_eq!(s.quality, Quality::GOOD, "{s:?}");
        let n = seen.entry(s.point).or_default();
        *n += 1;
        *n >= 5
    })
    .await;
    h.stop().await;

    // Every sample equals, bit for bit, a value the server served for it,
    // and values change over time (the decoding is not stuck on a constant).
    for p in &points {
        let served = sim.served(1, p.index);
        assert!(!served.is_empty(), "nothing served for {}", p.name);
        let truth: HashSet<u64> = served.iter().map(|(_, v)| v.to_bits()).collect();
        let mine: Vec<_> = samples.iter().filter(|s| s.point == p.index).collect();
        for s in &mine {
            assert!(
                truth.contains(&s.value.to_bits()),
                "point {} sample {} not in served {:?}",
                p.name,
                s.value,
                &served[..served.len().min(5)]
            );
            assert!(s.ts_ms > 1_600_000_000_000);
        }
    }
    let moving = points
        .iter()
        .filter(|p| {
            let served = sim.served(1, p.index);
            served
                .iter()
                .map(|(_, v)| v.to_bits())
                .collect::<HashSet<_>>()
                .len()
                > 1
        })
        .count();
    assert!(
        moving * 2 > points.len(),
        "values should move: only {moving} of {} did",
        points.len()
    );
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adjacent_points_coalesce_into_one_request() {
    // 120 consecutive u16 registers + 10 f32 after a gap of 4: one read.
    let mut points: Vec<Point> = (0..120)
        .map(|i| {
            modbus_point(
                i,
                ModbusTable::Holding,
                i,
                DataType::U16,
                ByteOrder::BigEndian,
                WordOrder::HighFirst,
            )
        })
        .collect();
    points.push(modbus_point(
        500,
        ModbusTable::Holding,
        124,
        DataType::U16,
        ByteOrder::BigEndian,
        WordOrder::HighFirst,
    ));
    let sim = start_sim(vec![UnitConfig {
        unit: 1,
        points: points
            .iter()
            .map(|p| SimPoint::from_point(p, Model::sine(100.0, 5.0, 200.0)).unwrap())
            .collect(),
        size: 0,
    }])
    .await;
    let dev = device("plc", tcp(&sim, 1), 50, points.clone());
    let (tx, mut rx) = mpsc::channel(64);
    let h = drivers::spawn_with(
        dev,
        fast_options(),
        tx,
        Clock::system(),
        CancellationToken::new(),
    );
    for _ in 0..6 {
        let batch = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(batch.len(), points.len());
        assert!(batch.iter().all(good));
    }
    h.stop().await;
    // Every cycle that completed produced one batch; count them all.
    let mut cycles = 6;
    while let Ok(batch) = rx.try_recv() {
        assert_eq!(batch.len(), points.len());
        cycles += 1;
    }
    let requests = sim.requests();
    // One request per cycle (121 registers in one read), never one per
    // point; at most one more request may have been cut short by the stop.
    assert!(
        requests >= cycles && requests <= cycles + 1,
        "{requests} requests for {cycles} cycles"
    );
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_units_on_one_server() {
    let mut units = Vec::new();
    let mut devices = Vec::new();
    for unit in 1..=3u8 {
        let p = modbus_point(
            u32::from(unit) * 10,
            ModbusTable::Holding,
            7,
            DataType::I32,
            ByteOrder::BigEndian,
            WordOrder::LowFirst,
        );
        let mut sp = SimPoint::from_point(
            &p,
            Model::new(Signal::Steps {
                height: 1000.0,
                every_s: 3600.0,
            }),
        )
        .unwrap();
        sp.model = Model::sine(0.0, 1.0, f64::from(unit) * 1000.0);
        units.push(UnitConfig {
            unit,
            points: vec![sp],
            size: 16,
        });
        devices.push((unit, p));
    }
    let sim = start_sim(units).await;
    for (unit, p) in devices {
        let (tx, mut rx) = mpsc::channel(8);
        let h = drivers::spawn_with(
            device("u", tcp(&sim, unit), 20, vec![p.clone()]),
            fast_options(),
            tx,
            Clock::system(),
            CancellationToken::new(),
        );
        let s = until_any(&mut rx, good).await;
        assert_eq!((s.point, s.value), (p.index, f64::from(unit) * 1000.0));
        h.stop().await;
    }
    sim.stop().await;
}

fn one_point_setup() -> (Vec<Point>, Vec<SimPoint>) {
    let points = vec![
        modbus_point(
            1,
            ModbusTable::Holding,
            0,
            DataType::F32,
            ByteOrder::BigEndian,
            WordOrder::HighFirst,
        ),
        modbus_point(
            2,
            ModbusTable::Input,
            10,
            DataType::U16,
            ByteOrder::BigEndian,
            WordOrder::HighFirst,
        ),
    ];
    let sims = points
        .iter()
        .map(|p| SimPoint::from_point(p, Model::sine(10.0, 2.0, 50.0)).unwrap())
        .collect();
    (points, sims)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_that_disappears_and_returns_is_recovered_within_the_backoff_bound() {
    let (points, sims) = one_point_setup();
    let sim = start_sim(vec![UnitConfig {
        unit: 1,
        points: sims,
        size: 0,
    }])
    .await;
    let opts = fast_options();
    let (tx, mut rx) = mpsc::channel(64);
    let h = drivers::spawn_with(
        device("plc", tcp(&sim, 1), 20, points),
        opts.clone(),
        tx,
        Clock::system(),
        CancellationToken::new(),
    );
    until_all(&mut rx, &[1, 2], good).await;
    assert!(h.status().connected);

    for round in 0..3 {
        sim.go_down();
        until_all(&mut rx, &[1, 2], |s| {
            s.quality == Quality::BAD_NOT_CONNECTED
        })
        .await;
        eventually("driver notices", || !h.status().connected).await;
        // Stay down long enough for the backoff to reach its bound.
        let down_for = opts.backoff.max * 3;
        let t_down = tokio::time::Instant::now();
        while t_down.elapsed() < down_for {
            let _ = tokio::time::timeout(Duration::from_millis(50), rx.recv()).await;
        }
        assert!(
            !h.is_finished(),
            "the driver must never exit on device errors"
        );
        sim.come_up().await.unwrap();
        let back = tokio::time::Instant::now();
        // Recovery within: backoff bound + one poll interval + one connect.
        let bound = opts.backoff.max + Duration::from_millis(20) + opts.connect_timeout;
        let recovered = tokio::time::timeout(
            bound + Duration::from_millis(500),
            until_all(&mut rx, &[1, 2], good),
        )
        .await;
        assert!(
            recovered.is_ok(),
            "round {round}: not recovered within {bound:?} (+500 ms slack), status {:?}",
            h.status()
        );
        tracing::info!(?round, elapsed = ?back.elapsed(), "recovered");
    }
    let st = h.status();
    assert!(st.connected);
    assert!(st.counters[counter::RECONNECTS] >= 3, "{st:?}");
    assert!(st.counters[counter::CONNECT_FAILURES] >= 3, "{st:?}");
    assert!(st.counters[counter::BAD_SAMPLES] > 0);
    h.stop().await;
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exception_replies_are_bad_quality_and_counted() {
    let (points, sims) = one_point_setup();
    let sim = start_sim(vec![UnitConfig {
        unit: 1,
        points: sims,
        size: 0,
    }])
    .await;
    let (tx, mut rx) = mpsc::channel(64);
    let h = drivers::spawn_with(
        device("plc", tcp(&sim, 1), 20, points),
        fast_options(),
        tx,
        Clock::system(),
        CancellationToken::new(),
    );
    until_all(&mut rx, &[1, 2], good).await;
    sim.set_fault(Fault::Exception(0x04));
    until_all(&mut rx, &[1, 2], |s| {
        s.quality == Quality::BAD_DEVICE_EXCEPTION
    })
    .await;
    let reconnects = h
        .status()
        .counters
        .get(counter::RECONNECTS)
        .copied()
        .unwrap_or(0);
    sim.set_fault(Fault::None);
    until_all(&mut rx, &[1, 2], good).await;
    let st = h.status();
    assert!(st.counters[counter::EXCEPTIONS] >= 2, "{st:?}");
    assert!(st.counters[counter::ERRORS] >= st.counters[counter::EXCEPTIONS]);
    // An exception is an answer: the connection is kept.
    assert_eq!(
        st.counters.get(counter::RECONNECTS).copied().unwrap_or(0),
        reconnects
    );
    assert!(
        st.last_error.as_deref().unwrap_or("").contains("exception"),
        "{st:?}"
    );
    h.stop().await;
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_replies_are_bad_quality_and_counted() {
    let (points, sims) = one_point_setup();
    let sim = start_sim(vec![UnitConfig {
        unit: 1,
        points: sims,
        size: 0,
    }])
    .await;
    let (tx, mut rx) = mpsc::channel(64);
    let h = drivers::spawn_with(
        device("plc", tcp(&sim, 1), 20, points),
        fast_options(),
        tx,
        Clock::system(),
        CancellationToken::new(),
    );
    until_all(&mut rx, &[1, 2], good).await;

    // A well-framed reply with a register missing.
    sim.set_fault(Fault::ShortReply);
    until_all(&mut rx, &[1, 2], |s| s.quality == Quality::BAD_MALFORMED).await;
    let malformed = h.health().counter(counter::MALFORMED);
    assert!(malformed >= 2);

    // Bytes that are not Modbus at all: malformed or, if the decoder waits
    // for a frame that never completes, a timeout; never a good value.
    sim.set_fault(Fault::Garbage);
    let bad = until_any(&mut rx, |s| {
        s.quality.is_bad() && s.quality != Quality::BAD_NOT_CONNECTED
    })
    .await;
    assert!(
        matches!(bad.quality, Quality::BAD_MALFORMED | Quality::BAD_TIMEOUT),
        "{bad:?}"
    );
    eventually("garbage counted", || {
        h.health().counter(counter::MALFORMED) + h.health().counter(counter::TIMEOUTS) > malformed
    })
    .await;

    sim.set_fault(Fault::None);
    until_all(&mut rx, &[1, 2], good).await;
    assert!(!h.is_finished());
    h.stop().await;
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_device_times_out_then_recovers() {
    let (points, sims) = one_point_setup();
    let sim = start_sim(vec![UnitConfig {
        unit: 1,
        points: sims,
        size: 0,
    }])
    .await;
    let (tx, mut rx) = mpsc::channel(64);
    let h = drivers::spawn_with(
        device("plc", tcp(&sim, 1), 20, points),
        fast_options(),
        tx,
        Clock::system(),
        CancellationToken::new(),
    );
    until_all(&mut rx, &[1, 2], good).await;
    sim.set_fault(Fault::Silent);
    until_any(&mut rx, |s| s.quality == Quality::BAD_TIMEOUT).await;
    assert!(
        h.health().counter(counter::TIMEOUTS) >= 2,
        "one timeout plus its retry"
    );
    sim.set_fault(Fault::None);
    until_all(&mut rx, &[1, 2], good).await;
    let st = h.status();
    assert!(st.success_ratio > 0.0 && st.success_ratio < 1.0, "{st:?}");
    assert!(st.latency_ms > 0.0);
    h.stop().await;
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_writes_match_the_driver_decoder() {
    // The simulator encodes with edge_node's encoder; check one value by hand
    // so a symmetric bug in encode/decode would show up here too.
    let p = modbus_point(
        9,
        ModbusTable::Holding,
        3,
        DataType::F32,
        ByteOrder::BigEndian,
        WordOrder::LowFirst,
    );
    let sp = SimPoint::from_point(&p, Model::sine(0.0, 1.0, 1.0)).unwrap();
    assert_eq!(
        sp.format,
        Format {
            data_type: DataType::F32,
            byte_order: ByteOrder::BigEndian,
            word_order: WordOrder::LowFirst
        }
    );
    let sim = start_sim(vec![UnitConfig {
        unit: 1,
        points: vec![sp],
        size: 8,
    }])
    .await;
    // Read the raw registers with tokio-modbus directly.
    let mut ctx =
        tokio_modbus::client::tcp::connect_slave(sim.local_addr(), tokio_modbus::Slave(1))
            .await
            .unwrap();
    let regs = ctx.read_holding_registers(3, 2).await.unwrap().unwrap();
    assert_eq!(regs, vec![0x0000, 0x3F80], "1.0f32 word-swapped");
    sim.stop().await;
}
