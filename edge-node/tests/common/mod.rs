//! Helpers shared by the offline, disk-cap and crash tests.

#![allow(
    dead_code,
    clippy::unwrap_used,
    reason = "each test binary uses a subset; test code"
)]

use std::sync::Arc;
use std::time::Duration;

use cloud_hub::{App, Hub, HubConfig};
use protocols::{
    DesiredState, Device, DeviceProtocol, NodeConfig, Point, PointAddress, PointGroup, Signal,
};
use tokio_util::sync::CancellationToken;

/// Revision 1 for `node`: one synthetic device `gen` with `points` random-walk
/// points `p0…` sampled every `interval_ms`, with the given node config.
pub fn random_walk_desired(
    node: &str,
    points: u32,
    interval_ms: u64,
    config: NodeConfig,
) -> DesiredState {
    let points = (0..points)
        .map(|i| Point {
            index: i,
            name: format!("p{i}"),
            address: PointAddress::Synthetic {
                signal: Signal::RandomWalk {
                    start: 0.0,
                    step: 1.0,
                },
            },
            scale: 1.0,
            offset: 0.0,
            range: None,
            unit: None,
        })
        .collect();
    DesiredState {
        node: node.into(),
        revision: 1,
        functions: vec![],
        devices: vec![Device {
            id: "gen".into(),
            protocol: DeviceProtocol::Synthetic,
            groups: vec![PointGroup {
                name: "g".into(),
                interval_ms,
                points,
            }],
        }],
        models: vec![],
        config,
    }
}

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the hub on its own real-time runtime thread (so the test's own
/// runtime may run on paused time).
pub fn start_hub_thread(cfg: HubConfig, cancel: CancellationToken) -> Arc<Hub> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let app = App::start(cfg, cancel).await.unwrap();
            tx.send(app.hub()).unwrap();
            app.run().await.unwrap();
        });
    });
    rx.recv_timeout(Duration::from_secs(30)).unwrap()
}
