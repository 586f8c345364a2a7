//! Device transports: reaching a device over something other than the
//! operating system's network stack.
//!
//! A [`DeviceTransports`] registry maps a device host name to a dialer that
//! opens a byte stream. Drivers consult it before opening a socket: a Modbus
//! TCP device whose `host` is registered speaks Modbus TCP (MBAP framing)
//! over the dialed stream instead of a TCP connection, with the same
//! timeouts, retries and reconnects as over TCP. Hand the registry to the
//! agent with [`AgentOptions`](crate::agent::AgentOptions), or to a single
//! driver with [`spawn_routed`](super::spawn_routed). The default (empty)
//! registry changes nothing: every device is reached over the network.
//!
//! Uses: an in-memory pipe to a simulated device (`tokio::io::duplex`), which
//! keeps a whole node on tokio's paused clock (real sockets cannot be used
//! there: the clock jumps ahead while a read is in flight, and requests time
//! out that were never late); a tunnel or a vendor gateway library that
//! hands out streams.
//!
//! Only Modbus TCP consults the registry so far; OPC UA and MQTT devices
//! always use the network.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream to a device.
pub trait DeviceStream: AsyncRead + AsyncWrite + Send + Unpin + fmt::Debug + 'static {}

impl<T> DeviceStream for T where T: AsyncRead + AsyncWrite + Send + Unpin + fmt::Debug + 'static {}

/// An opened device stream.
pub type BoxStream = Box<dyn DeviceStream>;

/// What a dialer returns: the stream, once open.
pub type DialFuture = Pin<Box<dyn Future<Output = io::Result<BoxStream>> + Send>>;

/// A dialer: opens a stream to `port` of its host. Called again after every
/// lost connection.
pub type Dialer = Arc<dyn Fn(u16) -> DialFuture + Send + Sync>;

/// Dialers by device host name. Cheap to clone.
#[derive(Clone, Default)]
pub struct DeviceTransports {
    dialers: BTreeMap<String, Dialer>,
}

impl fmt::Debug for DeviceTransports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceTransports")
            .field("hosts", &self.dialers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl DeviceTransports {
    /// An empty registry: every device over the network.
    pub fn new() -> Self {
        Self::default()
    }

    /// Devices whose host is `host` are reached through `dial(port)`
    /// instead of the network. Replaces an earlier dialer for `host`.
    pub fn register<F, Fut, S>(&mut self, host: impl Into<String>, dial: F)
    where
        F: Fn(u16) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = io::Result<S>> + Send + 'static,
        S: DeviceStream,
    {
        let dialer: Dialer = Arc::new(move |port| {
            let fut = dial(port);
            Box::pin(async move { Ok(Box::new(fut.await?) as BoxStream) })
        });
        self.dialers.insert(host.into(), dialer);
    }

    /// The dialer registered for `host`.
    pub fn dialer(&self, host: &str) -> Option<Dialer> {
        self.dialers.get(host).cloned()
    }

    /// Whether no host is registered.
    pub fn is_empty(&self) -> bool {
        self.dialers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn registered_host_dials_its_stream() {
        let mut t = DeviceTransports::new();
        assert!(t.is_empty());
        t.register("plc.mem", |port: u16| async move {
            let (a, mut b) = tokio::io::duplex(64);
            tokio::spawn(async move {
                b.write_all(&port.to_be_bytes()).await.unwrap();
            });
            Ok(a)
        });
        assert!(t.dialer("other").is_none());
        let mut s = t.dialer("plc.mem").unwrap()(502).await.unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(u16::from_be_bytes(buf), 502);
        assert!(format!("{t:?}").contains("plc.mem"));
    }
}
