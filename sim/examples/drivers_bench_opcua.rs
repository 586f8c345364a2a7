//! OPC UA notification throughput: data-change notifications/s received by
//! the driver, and per core of driver CPU.
//!
//! The simulated server (async-opcua) runs on its own threads; the driver,
//! the client library's session loop and the consumer run on ONE
//! current-thread runtime whose thread CPU time gives "per core".
//!
//! `cargo run --release -p sim --example drivers_bench_opcua -- [variables] [tick_ms] [seconds]`
//! (defaults: 5000 variables, all changing every 100 ms, 10 s).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use edge_node::clock::Clock;
use edge_node::drivers::{self, DriverOptions, OpcUaOptions};
use protocols::{Device, DeviceProtocol, OpcUaSecurity, Point, PointAddress, PointGroup};
use sim::devices::opcua::{OpcUaSim, OpcUaSimConfig, SimVariable, VarKind};
use sim::signal::Model;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn thread_cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat")?;
    let after = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).context("utime")?.parse::<f64>()? + f.get(12).context("stime")?.parse::<f64>()?;
    Ok(ticks / 100.0)
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
    let n = u32::try_from(arg(1, 5000))?;
    let tick_ms = arg(2, 100);
    let seconds = arg(3, 10);
    let dir = tempfile::tempdir()?;
    let pki = dir.path().to_path_buf();

    let (tx_info, rx_info) = std::sync::mpsc::channel();
    let stop = CancellationToken::new();
    let stop_srv = stop.clone();
    let server_pki = pki.join("server");
    let server = std::thread::spawn(move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let variables = (0..n)
                .map(|i| SimVariable {
                    id: i,
                    name: format!("v{i}"),
                    kind: VarKind::Double,
                    model: Model::sine(100.0, 7.0, 0.0),
                })
                .collect();
            let sim = OpcUaSim::start(OpcUaSimConfig {
                variables,
                tick: Duration::from_millis(tick_ms),
                pki_dir: server_pki,
                secure_endpoints: false,
                record: false,
                ..OpcUaSimConfig::default()
            })
            .await?;
            tx_info.send((sim.endpoint(), sim.namespace()))?;
            stop_srv.cancelled().await;
            sim.stop().await;
            anyhow::Ok(())
        })
    });
    let (endpoint, ns) = rx_info.recv()?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (count, wall, cpu) = rt.block_on(async move {
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
        let dev = Device {
            id: "ua".into(),
            protocol: DeviceProtocol::OpcUa {
                endpoint,
                security: OpcUaSecurity::None,
                username: None,
                password_file: None,
            },
            groups: vec![PointGroup {
                name: "g".into(),
                interval_ms: tick_ms,
                points,
            }],
        };
        let opts = DriverOptions {
            opcua: OpcUaOptions {
                pki_dir: pki.join("client"),
                trust_server_certs: true,
                ..OpcUaOptions::default()
            },
            ..DriverOptions::default()
        };
        let (tx, mut rx) = mpsc::channel(4096);
        let h = drivers::spawn_with(dev, opts, tx, Clock::system(), CancellationToken::new());
        // Warm-up: until a full round of values has arrived.
        let mut seen = 0u64;
        let warm_end = Instant::now() + Duration::from_secs(60);
        while seen < u64::from(n) && Instant::now() < warm_end {
            if let Ok(Some(b)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
                seen += b.len() as u64;
            }
        }
        let cpu0 = thread_cpu_seconds()?;
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs(seconds);
        let mut count = 0u64;
        while Instant::now() < end {
            if let Ok(Some(b)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
                count += b.iter().filter(|s| s.quality.is_good()).count() as u64;
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        let cpu = thread_cpu_seconds()? - cpu0;
        println!("  driver status: {:?}", h.status().counters);
        h.stop().await;
        anyhow::Ok((count, wall, cpu))
    })?;
    stop.cancel();
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    #[allow(clippy::cast_precision_loss)]
    let (rate, per_core) = (count as f64 / wall, count as f64 / cpu.max(1e-9));
    println!("opcua: {n} variables changing every {tick_ms} ms, one subscription, {seconds} s");
    println!(
        "  notifications/s received: {rate:.0} (offered: {})",
        u64::from(n) * 1000 / tick_ms.max(1)
    );
    println!(
        "  driver thread CPU: {cpu:.2} s of {wall:.2} s wall ({:.0} %)",
        100.0 * cpu / wall
    );
    println!("  notifications/s per core of driver CPU: {per_core:.0}");
    Ok(())
}
