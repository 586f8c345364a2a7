//! A Modbus TCP device reached through a registered in-memory transport
//! (`drivers::transport`) instead of a socket, on tokio's paused clock: a
//! virtual hour of polling must give one good sample per point per cycle,
//! every one a fresh reply (no spurious timeout, no reconnect).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::float_cmp,
    reason = "test code"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use edge_node::clock::Clock;
use edge_node::drivers::transport::DeviceTransports;
use edge_node::drivers::{self, DriverOptions};
use protocols::{
    ByteOrder, DataType, Device, DeviceProtocol, ModbusTable, Point, PointAddress, PointGroup,
    Quality, WordOrder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A minimal Modbus TCP server for "read holding registers": register 0
/// holds the number of requests answered so far, register 1 holds 7.
async fn serve(mut s: DuplexStream, answered: Arc<AtomicU64>) {
    let mut hdr = [0u8; 7];
    loop {
        if s.read_exact(&mut hdr).await.is_err() {
            return;
        }
        let len = usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
        let mut pdu = vec![0u8; len - 1];
        s.read_exact(&mut pdu).await.unwrap();
        assert_eq!(pdu[0], 0x03, "only holding registers are read");
        let start = u16::from_be_bytes([pdu[1], pdu[2]]);
        let count = u16::from_be_bytes([pdu[3], pdu[4]]);
        let n = answered.fetch_add(1, Ordering::Relaxed) + 1;
        let mut body = vec![0x03, u8::try_from(count * 2).unwrap()];
        for r in start..start + count {
            let v: u16 = if r == 0 { (n % 65_536) as u16 } else { 7 };
            body.extend_from_slice(&v.to_be_bytes());
        }
        let mut out = hdr[..4].to_vec();
        out.extend_from_slice(&u16::try_from(body.len() + 1).unwrap().to_be_bytes());
        out.push(hdr[6]);
        out.extend_from_slice(&body);
        s.write_all(&out).await.unwrap();
    }
}

fn point(index: u32, address: u32) -> Point {
    Point {
        index,
        name: format!("r{address}"),
        address: PointAddress::Modbus {
            table: ModbusTable::Holding,
            address,
            data_type: DataType::U16,
            byte_order: ByteOrder::BigEndian,
            word_order: WordOrder::HighFirst,
        },
        scale: 1.0,
        offset: 0.0,
        range: None,
        unit: None,
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn modbus_over_registered_stream_runs_on_the_paused_clock() {
    let answered = Arc::new(AtomicU64::new(0));
    let dials = Arc::new(AtomicU64::new(0));
    let mut transports = DeviceTransports::new();
    {
        let (answered, dials) = (answered.clone(), dials.clone());
        transports.register("plc-1.mem", move |port: u16| {
            assert_eq!(port, 502);
            dials.fetch_add(1, Ordering::Relaxed);
            let (client, server) = tokio::io::duplex(4096);
            tokio::spawn(serve(server, answered.clone()));
            async move { Ok(client) }
        });
    }
    let device = Device {
        id: "plc-1".into(),
        protocol: DeviceProtocol::ModbusTcp {
            host: "plc-1.mem".into(),
            port: 502,
            unit: 1,
        },
        groups: vec![PointGroup {
            name: "g".into(),
            interval_ms: 1_000,
            points: vec![point(0, 0), point(1, 1)],
        }],
    };
    let (tx, mut rx) = mpsc::channel(16);
    let cancel = CancellationToken::new();
    let clock = Clock::starting_at(1_000_000);
    let h = drivers::spawn_routed(
        device,
        DriverOptions::default(),
        &transports,
        tx,
        clock,
        cancel.clone(),
    );
    let hour_ms = 3_600_000u64;
    let mut cycles = 0u64;
    let mut last_ts = 0u64;
    let mut last_counter = 0.0;
    while let Some(batch) = rx.recv().await {
        assert_eq!(batch.len(), 2);
        for s in &batch {
            assert_eq!(s.quality, Quality::GOOD, "{s:?}");
        }
        let ts = batch[0].ts_ms;
        assert!(ts > last_ts, "timestamps advance");
        // A fresh reply every cycle: the request counter moves by one.
        assert_eq!(batch[0].value, last_counter + 1.0, "at {ts}");
        assert_eq!(batch[1].value, 7.0);
        last_ts = ts;
        last_counter = batch[0].value;
        cycles += 1;
        if ts - 1_000_000 >= hour_ms {
            break;
        }
    }
    h.stop().await;
    assert_eq!(cycles, 3_601, "one cycle per virtual second, first at 0");
    assert_eq!(answered.load(Ordering::Relaxed), cycles);
    assert_eq!(dials.load(Ordering::Relaxed), 1, "never reconnected");
    assert!(clock.now_ms() - 1_000_000 >= hour_ms);
}
