//! Shared helpers of the driver integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::time::Duration;

use protocols::{
    ByteOrder, DataType, Device, DeviceProtocol, ModbusTable, Point, PointAddress, PointGroup,
    Quality, Sample, WordOrder,
};
use tokio::sync::mpsc;

/// Upper bound of any single wait in these tests.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn modbus_point(
    index: u32,
    table: ModbusTable,
    address: u32,
    data_type: DataType,
    byte_order: ByteOrder,
    word_order: WordOrder,
) -> Point {
    Point {
        index,
        name: format!("p{index}"),
        address: PointAddress::Modbus {
            table,
            address,
            data_type,
            byte_order,
            word_order,
        },
        scale: 1.0,
        offset: 0.0,
        range: None,
        unit: None,
    }
}

pub fn device(id: &str, protocol: DeviceProtocol, interval_ms: u64, points: Vec<Point>) -> Device {
    Device {
        id: id.to_owned(),
        protocol,
        groups: vec![PointGroup {
            name: "g".into(),
            interval_ms,
            points,
        }],
    }
}

/// Receives batches until `pred` holds for the latest sample of every point
/// in `points`, or panics after [`DEADLINE`]. Returns all samples received.
pub async fn until_all(
    rx: &mut mpsc::Receiver<Vec<Sample>>,
    points: &[u32],
    mut pred: impl FnMut(&Sample) -> bool,
) -> Vec<Sample> {
    let mut all = Vec::new();
    let mut ok: HashMap<u32, bool> = points.iter().map(|p| (*p, false)).collect();
    let fut = async {
        while let Some(batch) = rx.recv().await {
            for s in &batch {
                if let Some(v) = ok.get_mut(&s.point) {
                    *v = pred(s);
                }
            }
            all.extend(batch);
            if ok.values().all(|v| *v) {
                return;
            }
        }
        panic!("sample channel closed");
    };
    if tokio::time::timeout(DEADLINE, fut).await.is_err() {
        let missing: Vec<_> = ok.iter().filter(|(_, v)| !**v).map(|(k, _)| *k).collect();
        let last: Vec<_> = all.iter().rev().take(8).collect();
        panic!(
            "condition not met within {DEADLINE:?} for points {missing:?}; last samples {last:?}"
        );
    }
    all
}

/// Waits until some sample satisfies `pred`.
pub async fn until_any(
    rx: &mut mpsc::Receiver<Vec<Sample>>,
    mut pred: impl FnMut(&Sample) -> bool,
) -> Sample {
    let fut = async {
        while let Some(batch) = rx.recv().await {
            if let Some(s) = batch.iter().find(|s| pred(s)) {
                return *s;
            }
        }
        panic!("sample channel closed");
    };
    tokio::time::timeout(DEADLINE, fut)
        .await
        .expect("no matching sample before the deadline")
}

/// Waits for a condition on something polled, with a deadline.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let fut = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: not reached within {DEADLINE:?}"));
}

pub fn good(s: &Sample) -> bool {
    s.quality == Quality::GOOD
}

/// Every (type, byte order, word order) combination, with register widths.
pub fn all_formats() -> Vec<(DataType, ByteOrder, WordOrder)> {
    let mut v = Vec::new();
    for dt in [
        DataType::Bool,
        DataType::I16,
        DataType::U16,
        DataType::I32,
        DataType::U32,
        DataType::I64,
        DataType::F32,
        DataType::F64,
    ] {
        for bo in [ByteOrder::BigEndian, ByteOrder::LittleEndian] {
            for wo in [WordOrder::HighFirst, WordOrder::LowFirst] {
                v.push((dt, bo, wo));
            }
        }
    }
    v
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}
