//! Per-device health: connection state, last error, latency, success ratio
//! and counters, shared between a driver task and whoever reports status.
//!
//! The driver task writes through [`Health`]'s methods; readers take a
//! [`DeviceStatus`] snapshot. A plain mutex guards the state: it is held for
//! a few field updates only, never across an `.await`.
//!
//! Counter names (all monotonic): `reads` (requests sent, retries included),
//! `errors` (failed requests of any kind), `exceptions` (protocol exception
//! replies), `timeouts`, `malformed` (undecodable replies), `reconnects`
//! (successful connects after the first), `connect_failures`, `samples`
//! (samples emitted), `bad_samples` (of those, with bad quality),
//! `notifications` (OPC UA data changes received).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use protocols::DeviceStatus;

/// Number of recent requests that `latency_ms` and `success_ratio` cover.
pub const WINDOW: usize = 128;

/// Counter names, to avoid typos between drivers and tests.
pub mod counter {
    /// Requests sent (retries included).
    pub const READS: &str = "reads";
    /// Failed requests of any kind.
    pub const ERRORS: &str = "errors";
    /// Protocol exception replies.
    pub const EXCEPTIONS: &str = "exceptions";
    /// Requests that timed out.
    pub const TIMEOUTS: &str = "timeouts";
    /// Replies that could not be decoded.
    pub const MALFORMED: &str = "malformed";
    /// Successful connects after the first one.
    pub const RECONNECTS: &str = "reconnects";
    /// Failed connect attempts.
    pub const CONNECT_FAILURES: &str = "connect_failures";
    /// Samples emitted.
    pub const SAMPLES: &str = "samples";
    /// Samples emitted with bad quality.
    pub const BAD_SAMPLES: &str = "bad_samples";
    /// OPC UA data change notifications received.
    pub const NOTIFICATIONS: &str = "notifications";
}

#[derive(Debug, Default)]
struct Inner {
    connected: bool,
    ever_connected: bool,
    last_error: Option<String>,
    /// (success, latency) of recent requests.
    window: VecDeque<(bool, Duration)>,
    counters: BTreeMap<String, u64>,
}

/// Shared health of one device. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Health {
    inner: Arc<Mutex<Inner>>,
}

impl Health {
    /// A device that has not connected yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut g)
    }

    /// Adds `n` to counter `name`.
    pub fn add(&self, name: &str, n: u64) {
        if n == 0 {
            return;
        }
        self.with(|i| bump(&mut i.counters, name, n));
    }

    /// The connection is up. Counts a reconnect unless it is the first.
    pub fn connected(&self) {
        self.with(|i| {
            if i.ever_connected {
                bump(&mut i.counters, counter::RECONNECTS, 1);
            }
            i.ever_connected = true;
            i.connected = true;
        });
    }

    /// The connection is down because of `error`.
    pub fn disconnected(&self, error: impl Into<String>) {
        let e = error.into();
        self.with(|i| {
            i.connected = false;
            i.last_error = Some(e);
        });
    }

    /// A connect attempt failed.
    pub fn connect_failed(&self, error: impl Into<String>) {
        let e = error.into();
        self.with(|i| {
            i.connected = false;
            i.last_error = Some(e);
            bump(&mut i.counters, counter::CONNECT_FAILURES, 1);
        });
    }

    /// Records one request's outcome. `kind` is an extra counter to bump on
    /// failure (`timeouts`, `exceptions`, `malformed`), if any.
    pub fn request(&self, ok: bool, latency: Duration, failure: Option<(&str, String)>) {
        self.with(|i| {
            bump(&mut i.counters, counter::READS, 1);
            if i.window.len() == WINDOW {
                i.window.pop_front();
            }
            i.window.push_back((ok, latency));
            if !ok {
                bump(&mut i.counters, counter::ERRORS, 1);
            }
            if let Some((kind, msg)) = failure {
                bump(&mut i.counters, kind, 1);
                i.last_error = Some(msg);
            }
        });
    }

    /// Counts emitted samples.
    pub fn samples(&self, total: usize, bad: usize) {
        self.with(|i| {
            bump(&mut i.counters, counter::SAMPLES, total as u64);
            bump(&mut i.counters, counter::BAD_SAMPLES, bad as u64);
        });
    }

    /// Value of counter `name` (0 if never bumped).
    pub fn counter(&self, name: &str) -> u64 {
        self.with(|i| i.counters.get(name).copied().unwrap_or(0))
    }

    /// Whether the driver is connected now.
    pub fn is_connected(&self) -> bool {
        self.with(|i| i.connected)
    }

    /// Snapshot for reported state.
    pub fn status(&self) -> DeviceStatus {
        self.with(|i| {
            let n = i.window.len();
            #[allow(clippy::cast_precision_loss, reason = "n <= WINDOW")]
            let (latency_ms, success_ratio) = if n == 0 {
                (0.0, if i.connected { 1.0 } else { 0.0 })
            } else {
                let ok = i.window.iter().filter(|(ok, _)| *ok).count();
                let lat: f64 = i.window.iter().map(|(_, d)| d.as_secs_f64() * 1e3).sum();
                (lat / n as f64, ok as f64 / n as f64)
            };
            DeviceStatus {
                connected: i.connected,
                last_error: i.last_error.clone(),
                latency_ms,
                success_ratio,
                counters: i.counters.clone(),
            }
        })
    }
}

fn bump(c: &mut BTreeMap<String, u64>, name: &str, n: u64) {
    if let Some(v) = c.get_mut(name) {
        *v = v.saturating_add(n);
    } else {
        c.insert(name.to_owned(), n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_ratios() {
        let h = Health::new();
        h.connected();
        h.request(true, Duration::from_millis(2), None);
        h.request(
            false,
            Duration::from_millis(4),
            Some((counter::TIMEOUTS, "timeout".into())),
        );
        h.disconnected("reset");
        h.connected();
        let s = h.status();
        assert!(s.connected);
        assert_eq!(s.counters[counter::READS], 2);
        assert_eq!(s.counters[counter::ERRORS], 1);
        assert_eq!(s.counters[counter::TIMEOUTS], 1);
        assert_eq!(s.counters[counter::RECONNECTS], 1);
        assert!((s.success_ratio - 0.5).abs() < 1e-9);
        assert!((s.latency_ms - 3.0).abs() < 1e-9);
        assert_eq!(s.last_error.as_deref(), Some("reset"));
    }

    #[test]
    fn window_is_bounded() {
        let h = Health::new();
        for _ in 0..WINDOW {
            h.request(false, Duration::ZERO, None);
        }
        for _ in 0..WINDOW {
            h.request(true, Duration::ZERO, None);
        }
        assert!((h.status().success_ratio - 1.0).abs() < 1e-9);
    }
}
