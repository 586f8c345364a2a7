//! An in-process TCP proxy that can cut, blackhole or delay a link — put
//! between an edge agent and the MQTT broker to partition one node.
//!
//! [`Proxy::start`] listens on `127.0.0.1:0` and forwards every accepted
//! connection to `upstream` (connecting anew each time, so the upstream may
//! restart). [`Proxy::set_mode`] changes the behaviour of existing and new
//! connections at once:
//! - [`LinkMode::Pass`]: forward bytes as they come;
//! - [`LinkMode::Delay`]: deliver every chunk `d` after it was read
//!   (latency without throttling: chunks are queued, not slept on);
//! - [`LinkMode::Blackhole`]: keep connections open but discard every byte
//!   in both directions (the peers find out by their keep-alive);
//! - [`LinkMode::Cut`]: close every connection; new ones are accepted and
//!   closed at once.
//!
//! # Invariants
//! - Bytes are never reordered or altered; in `Blackhole` they are dropped,
//!   and a connection that saw dropped bytes is closed when the mode
//!   changes back (a TCP stream with a hole in it is useless to MQTT).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinkMode {
    /// Forward.
    #[default]
    Pass,
    /// Forward each chunk after this delay.
    Delay(Duration),
    /// Discard everything, keep connections open.
    Blackhole,
    /// Close connections, refuse new ones.
    Cut,
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<LinkMode>,
    stats: Arc<Stats>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Stats {
    accepted: AtomicU64,
    forwarded_bytes: AtomicU64,
    dropped_bytes: AtomicU64,
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let (mode, rx) = watch::channel(LinkMode::Pass);
        let stats = Arc::new(Stats::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(accept_loop(
            listener,
            upstream,
            rx,
            stats.clone(),
            cancel.clone(),
        ));
        Ok(Self {
            addr,
            mode,
            stats,
            cancel,
            task,
        })
    }

    /// Where clients connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the behaviour of every connection.
    pub fn set_mode(&self, mode: LinkMode) {
        self.mode.send_replace(mode);
    }

    /// The current mode.
    pub fn mode(&self) -> LinkMode {
        *self.mode.borrow()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.stats.accepted.load(Ordering::Relaxed)
    }

    /// Bytes forwarded (both directions).
    pub fn forwarded_bytes(&self) -> u64 {
        self.stats.forwarded_bytes.load(Ordering::Relaxed)
    }

    /// Bytes discarded in blackhole mode.
    pub fn dropped_bytes(&self) -> u64 {
        self.stats.dropped_bytes.load(Ordering::Relaxed)
    }

    /// Closes everything.
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Receiver<LinkMode>,
    stats: Arc<Stats>,
    cancel: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            r = listener.accept() => {
                let Ok((client, _)) = r else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                if *mode.borrow() == LinkMode::Cut {
                    drop(client);
                    continue;
                }
                let (mode, stats, cancel) = (mode.clone(), stats.clone(), cancel.clone());
                conns.spawn(async move {
                    let Ok(Ok(server)) = tokio::time::timeout(
                        Duration::from_secs(5),
                        TcpStream::connect(upstream),
                    )
                    .await
                    else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    tokio::select! {
                        () = cancel.cancelled() => {}
                        () = splice(client, server, mode, stats) => {}
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
}

/// Runs both directions; returns when either ends or the link is cut.
async fn splice(
    client: TcpStream,
    server: TcpStream,
    mode: watch::Receiver<LinkMode>,
    stats: Arc<Stats>,
) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let holed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let up = direction(cr, sw, mode.clone(), stats.clone(), holed.clone());
    let down = direction(sr, cw, mode, stats, holed);
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

async fn direction(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<LinkMode>,
    stats: Arc<Stats>,
    holed: Arc<std::sync::atomic::AtomicBool>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let current = *mode.borrow_and_update();
            if current == LinkMode::Cut {
                return;
            }
            if current != LinkMode::Blackhole && holed.load(Ordering::Relaxed) {
                return; // the stream has a hole: close it
            }
            tokio::select! {
                r = from.read(&mut buf) => {
                    let n = match r {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    match *mode.borrow() {
                        LinkMode::Cut => return,
                        LinkMode::Blackhole => {
                            holed.store(true, Ordering::Relaxed);
                            stats.dropped_bytes.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        LinkMode::Pass => {
                            stats.forwarded_bytes.fetch_add(n as u64, Ordering::Relaxed);
                            if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                                return;
                            }
                        }
                        LinkMode::Delay(d) => {
                            stats.forwarded_bytes.fetch_add(n as u64, Ordering::Relaxed);
                            if tx.send((Instant::now() + d, buf[..n].to_vec())).is_err() {
                                return;
                            }
                        }
                    }
                }
                r = mode.changed() => {
                    if r.is_err() {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        () = writer => {}
        () = reader => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut b = [0u8; 1024];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> Option<Vec<u8>> {
        s.write_all(msg).await.ok()?;
        let mut b = vec![0u8; msg.len()];
        match tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut b)).await {
            Ok(Ok(_)) => Some(b),
            _ => None,
        }
    }

    #[tokio::test]
    async fn pass_cut_blackhole_delay() {
        let echo = echo_server().await;
        let p = Proxy::start(echo).await.unwrap();
        let mut c = TcpStream::connect(p.local_addr()).await.unwrap();
        assert_eq!(
            roundtrip(&mut c, b"hello").await.as_deref(),
            Some(&b"hello"[..])
        );

        // Cut: the open connection closes, new ones are closed at once.
        p.set_mode(LinkMode::Cut);
        let mut b = [0u8; 8];
        let r = tokio::time::timeout(Duration::from_secs(2), c.read(&mut b))
            .await
            .unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        let mut c2 = TcpStream::connect(p.local_addr()).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(2), c2.read(&mut b))
            .await
            .unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");

        // Back to pass: a new connection works.
        p.set_mode(LinkMode::Pass);
        let mut c = TcpStream::connect(p.local_addr()).await.unwrap();
        assert_eq!(
            roundtrip(&mut c, b"again").await.as_deref(),
            Some(&b"again"[..])
        );

        // Blackhole: nothing comes back, the connection stays open, and is
        // closed when the link heals (it has a hole).
        p.set_mode(LinkMode::Blackhole);
        assert_eq!(roundtrip(&mut c, b"lost").await, None);
        assert!(p.dropped_bytes() >= 4);
        p.set_mode(LinkMode::Pass);
        let r = tokio::time::timeout(Duration::from_secs(2), c.read(&mut b))
            .await
            .unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");

        // Delay: data arrives, no earlier than the delay.
        p.set_mode(LinkMode::Delay(Duration::from_millis(150)));
        let mut c = TcpStream::connect(p.local_addr()).await.unwrap();
        let t = Instant::now();
        c.write_all(b"slow").await.unwrap();
        let mut r = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(3), c.read_exact(&mut r))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&r, b"slow");
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        p.stop().await;
    }
}
