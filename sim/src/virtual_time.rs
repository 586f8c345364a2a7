//! Virtual time for one edge node of a `fleet-sim run` (a partition with
//! `clock = "virtual"`, see
//! [`PartitionClock::Virtual`](crate::scenario::PartitionClock::Virtual)).
//!
//! A [`VirtualNode`] is a dedicated OS thread running a single-threaded
//! tokio runtime. The runner starts the node's simulated Modbus servers and
//! its `edge_node::Agent` on it, both on the node's [`Clock`] (the agent's
//! sample timestamps and the servers' served-log timestamps come from the
//! same clock), and the agent reaches the servers over in-memory streams
//! (`edge_node::drivers::transport`, [`ModbusSim::attach_tcp`]): no socket
//! between them.
//!
//! Until the outage the runtime runs on wall time and the agent talks to the
//! real hub through its proxy like every other node. [`VirtualNode::begin_outage`]
//! pauses the runtime's clock ([`tokio::time::pause`]: whenever every task
//! on the runtime waits, the clock jumps to the next timer), sleeps the
//! outage's duration and resumes wall time. Only the node's own runtime is
//! affected: the hub, the broker and the other nodes stay on wall time.
//!
//! # Invariants
//! - Everything the paused clock must not outrun is in memory on the same
//!   runtime (device polls, device ticks, pipeline, function host, outbox
//!   appends); blocking work (`spawn_blocking`: store open, WASM calls)
//!   holds auto-advance off while it runs. The only socket, the MQTT link,
//!   is cut for the whole outage, so its spurious timeouts change nothing.
//! - After the outage the node's clock is ahead of the wall clock by the
//!   outage minus the wall time it took; [`VirtualNode::clock_offset_ms`]
//!   measures that, and the runner shifts every comparison with the node's
//!   timestamps by it.
//!
//! [`ModbusSim::attach_tcp`]: crate::devices::modbus::ModbusSim::attach_tcp

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use edge_node::Clock;
use edge_node::drivers::transport::DeviceTransports;
use protocols::{Device, DeviceProtocol};
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::devices::modbus::ModbusSim;

/// A node's own single-threaded runtime whose clock can be paused.
#[derive(Debug)]
pub struct VirtualNode {
    name: String,
    handle: Handle,
    clock: Clock,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A virtual-time outage in progress (see [`VirtualNode::begin_outage`]).
#[derive(Debug)]
pub struct Outage {
    task: JoinHandle<()>,
    progress_ms: Arc<AtomicU64>,
    started: Instant,
    duration: Duration,
}

impl Outage {
    /// Whether the virtual duration has passed and wall time resumed.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Virtual time elapsed so far (in steps of at most 10 minutes).
    pub fn progress(&self) -> Duration {
        Duration::from_millis(self.progress_ms.load(Ordering::Relaxed))
    }

    /// The outage's virtual duration.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// Wall time since it began.
    pub fn wall(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits for the end; an error if the outage task failed.
    pub async fn finish(self) -> anyhow::Result<Duration> {
        self.task
            .await
            .map_err(|e| anyhow!("virtual-time outage task: {e}"))?;
        Ok(self.started.elapsed())
    }
}

impl VirtualNode {
    /// Starts the node's thread and runtime (on wall time).
    pub fn start(name: &str) -> anyhow::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("vnode-{name}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                // The clock's base instant must come from this runtime.
                let clock = rt.block_on(async { Clock::system() });
                let _ = tx.send(Ok((rt.handle().clone(), clock)));
                rt.block_on(async {
                    let _ = stopped.await;
                });
                rt.shutdown_timeout(Duration::from_secs(10));
            })
            .context("starting a virtual-time node thread")?;
        let (handle, clock) = rx
            .recv()
            .context("the virtual-time node thread ended early")?
            .context("building the virtual-time node runtime")?;
        Ok(Self {
            name: name.to_owned(),
            handle,
            clock,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The node's clock: give it to the agent and to the device servers.
    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// The node's runtime.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs `fut` on the node's runtime and waits for its result.
    pub async fn run<F>(&self, fut: F) -> anyhow::Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle
            .spawn(fut)
            .await
            .map_err(|e| anyhow!("task on virtual-time node {}: {e}", self.name))
    }

    /// Pauses the node's clock, lets `duration` pass in virtual time
    /// (auto-advancing), then resumes wall time. Returns at once; poll the
    /// [`Outage`].
    pub fn begin_outage(&self, duration: Duration) -> Outage {
        let progress_ms = Arc::new(AtomicU64::new(0));
        let p = progress_ms.clone();
        let task = self.handle.spawn(async move {
            tokio::time::pause();
            let step = Duration::from_secs(600);
            let mut done = Duration::ZERO;
            while done < duration {
                let d = step.min(duration.saturating_sub(done));
                tokio::time::sleep(d).await;
                done += d;
                p.store(
                    u64::try_from(done.as_millis()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
            }
            tokio::time::resume();
        });
        Outage {
            task,
            progress_ms,
            started: Instant::now(),
            duration,
        }
    }

    /// The node's clock minus the wall clock, in ms.
    pub async fn clock_offset_ms(&self) -> anyhow::Result<i64> {
        let clock = self.clock;
        let node = self.run(async move { clock.now_ms() }).await?;
        let wall = Clock::system().now_ms();
        Ok(i64::try_from(node).unwrap_or(i64::MAX) - i64::try_from(wall).unwrap_or(i64::MAX))
    }

    /// Stops the runtime (tasks still on it are dropped) and joins the thread.
    pub fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::warn!(node = %self.name, "virtual-time node thread panicked");
        }
    }
}

impl Drop for VirtualNode {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Routes a node's Modbus TCP devices to its simulated servers over
/// in-memory streams: the host of every device served by `servers[i]`
/// becomes `{node}-mb{i}.mem`, registered with a dialer that attaches one
/// end of a `tokio::io::duplex` pipe to that server
/// ([`ModbusSim::attach_tcp`](crate::devices::modbus::ModbusSim::attach_tcp)).
/// Dial from the runtime the servers run on.
pub fn in_memory_routes(
    node: &str,
    servers: &[Arc<ModbusSim>],
    devices: &mut [Device],
) -> DeviceTransports {
    let mut t = DeviceTransports::new();
    for (i, sim) in servers.iter().enumerate() {
        let host = format!("{node}-mb{i}.mem");
        let port = sim.local_addr().port();
        for d in devices.iter_mut() {
            if let DeviceProtocol::ModbusTcp {
                host: h, port: p, ..
            } = &mut d.protocol
                && *p == port
            {
                h.clone_from(&host);
            }
        }
        let sim = sim.clone();
        t.register(host, move |_port: u16| {
            let sim = sim.clone();
            async move {
                let (client, server) = tokio::io::duplex(64 * 1024);
                sim.attach_tcp(server).await;
                Ok(client)
            }
        });
    }
    t
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    #[tokio::test]
    async fn outage_passes_in_virtual_time_and_shifts_the_clock() {
        let vn = VirtualNode::start("t").unwrap();
        let before = vn.clock_offset_ms().await.unwrap();
        assert!(before.abs() < 1_000, "{before}");
        // A task ticking every virtual second through the outage.
        let ticks = vn.handle().spawn(async {
            let mut n = 0u32;
            let mut iv = tokio::time::interval(Duration::from_secs(1));
            for _ in 0..7_201 {
                iv.tick().await;
                n += 1;
            }
            n
        });
        let o = vn.begin_outage(Duration::from_secs(2 * 3600));
        let wall = o.finish().await.unwrap();
        assert_eq!(ticks.await.unwrap(), 7_201);
        let after = vn.clock_offset_ms().await.unwrap();
        let shift = after - before;
        let expect = 2 * 3_600_000 - i64::try_from(wall.as_millis()).unwrap();
        assert!(
            (shift - expect).abs() < 1_000,
            "shift {shift}, expected ~{expect}"
        );
        vn.shutdown();
    }
}
