//! The desired state shared by the offline, disk-cap and crash tests (the
//! hub and edge rig is `edgefleet_testkit`).

use protocols::{
    DesiredState, Device, DeviceProtocol, NodeConfig, Point, PointAddress, PointGroup, Signal,
};

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
