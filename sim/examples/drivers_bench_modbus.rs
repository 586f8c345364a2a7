//! Modbus polling throughput: points/s polled, and per core of driver CPU.
//!
//! The simulated server runs on its own thread; all driver tasks and the
//! sample consumer run on ONE current-thread runtime, whose thread CPU time
//! (from /proc/thread-self/stat) gives "points/s per core".
//!
//! `cargo run --release -p sim --example drivers_bench_modbus -- [devices] [points] [interval_ms] [seconds]`
//! (defaults: 20 devices × 1000 u16 points, 10 ms interval, 10 s).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use edge_node::clock::Clock;
use edge_node::drivers::{self, DriverOptions};
use protocols::{
    ByteOrder, DataType, Device, DeviceProtocol, ModbusTable, Point, PointAddress, PointGroup,
    WordOrder,
};
use sim::devices::modbus::{ModbusSim, ModbusSimConfig, SimPoint, UnitConfig};
use sim::signal::Model;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// CPU seconds (user + system) of the calling thread.
fn thread_cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat")?;
    let after = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the comm field.
    let ticks: f64 =
        f.get(11).context("utime")?.parse::<f64>()? + f.get(12).context("stime")?.parse::<f64>()?;
    Ok(ticks / 100.0) // USER_HZ is 100 on Linux
}

fn arg(n: usize, default: u64) -> u64 {
    std::env::args()
        .nth(n)
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[expect(
    clippy::too_many_lines,
    reason = "a benchmark script: set-up, the timed loop and the printed table in order"
)]
fn main() -> anyhow::Result<()> {
    let devices = u8::try_from(arg(1, 20).clamp(1, 247))?;
    let points = u32::try_from(arg(2, 1000).min(60_000))?;
    let interval_ms = arg(3, 10);
    let seconds = arg(4, 10);

    let point = |i: u32| Point {
        index: i,
        name: format!("p{i}"),
        address: PointAddress::Modbus {
            table: ModbusTable::Holding,
            address: i,
            data_type: DataType::U16,
            byte_order: ByteOrder::BigEndian,
            word_order: WordOrder::HighFirst,
        },
        scale: 1.0,
        offset: 0.0,
        range: None,
        unit: None,
    };
    let pts: Vec<Point> = (0..points).map(point).collect();
    let units: Vec<UnitConfig> = (1..=devices)
        .map(|u| UnitConfig {
            unit: u,
            points: pts
                .iter()
                .filter_map(|p| SimPoint::from_point(p, Model::sine(1000.0, 10.0, 2000.0)))
                .collect(),
            size: 0,
        })
        .collect();

    // Server thread.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let stop = CancellationToken::new();
    let stop_srv = stop.clone();
    let server = std::thread::spawn(move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let sim = ModbusSim::start(ModbusSimConfig {
                units,
                tick: Duration::from_millis(100),
                record: false,
                ..ModbusSimConfig::default()
            })
            .await?;
            addr_tx.send(sim.local_addr())?;
            stop_srv.cancelled().await;
            sim.stop().await;
            anyhow::Ok(())
        })
    });
    let addr = addr_rx.recv()?;

    // Driver thread: everything on one current-thread runtime.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (good, total, wall, cpu, reads) = rt.block_on(async move {
        let (tx, mut rx) = mpsc::channel(4096);
        let cancel = CancellationToken::new();
        let handles: Vec<_> = (1..=devices)
            .map(|u| {
                let dev = Device {
                    id: format!("d{u}"),
                    protocol: DeviceProtocol::ModbusTcp {
                        host: addr.ip().to_string(),
                        port: addr.port(),
                        unit: u,
                    },
                    groups: vec![PointGroup {
                        name: "g".into(),
                        interval_ms,
                        points: pts.clone(),
                    }],
                };
                drivers::spawn_with(
                    dev,
                    DriverOptions::default(),
                    tx.clone(),
                    Clock::system(),
                    cancel.clone(),
                )
            })
            .collect();
        drop(tx);
        // Warm-up: first batch from every device.
        let warm = Instant::now() + Duration::from_secs(2);
        while Instant::now() < warm {
            let _ = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await;
        }
        let (mut good, mut total) = (0u64, 0u64);
        let cpu0 = thread_cpu_seconds()?;
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs(seconds);
        let reads0: u64 = handles.iter().map(|h| h.health().counter("reads")).sum();
        while Instant::now() < end {
            if let Ok(Some(batch)) =
                tokio::time::timeout(Duration::from_millis(100), rx.recv()).await
            {
                total += batch.len() as u64;
                good += batch.iter().filter(|s| s.quality.is_good()).count() as u64;
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        let cpu = thread_cpu_seconds()? - cpu0;
        let reads: u64 = handles
            .iter()
            .map(|h| h.health().counter("reads"))
            .sum::<u64>()
            - reads0;
        cancel.cancel();
        for h in handles {
            h.stop().await;
        }
        anyhow::Ok((good, total, wall, cpu, reads))
    })?;
    stop.cancel();
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;

    #[allow(clippy::cast_precision_loss)]
    let (rate, per_core) = (good as f64 / wall, good as f64 / cpu.max(1e-9));
    println!(
        "modbus: {devices} devices x {points} u16 points, interval {interval_ms} ms, {seconds} s"
    );
    println!("  samples {total} (good {good}), requests {reads}");
    println!("  points/s polled: {rate:.0}");
    println!(
        "  driver thread CPU: {cpu:.2} s of {wall:.2} s wall ({:.0} %)",
        100.0 * cpu / wall
    );
    println!("  points/s per core of driver CPU: {per_core:.0}");
    Ok(())
}
