//! Injected time.
//!
//! All timestamps in the agent come from a [`Clock`]: wall-clock milliseconds
//! derived from a base taken once at start plus `tokio::time::Instant` elapsed
//! time. In production that is ordinary monotonic wall time; under tokio's
//! paused test clock (`#[tokio::test(start_paused = true)]`) it advances
//! virtually, so a 48 h outage runs in seconds and timestamps stay consistent
//! with timers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Milliseconds since the Unix epoch, driven by tokio time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base_ms: u64,
    base: Instant,
}

impl Clock {
    /// A clock reading the system time now.
    pub fn system() -> Self {
        let base_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self::starting_at(base_ms)
    }

    /// A clock that reads `base_ms` now (for tests and the simulator).
    pub fn starting_at(base_ms: u64) -> Self {
        Self {
            base_ms,
            base: Instant::now(),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        self.base_ms
            .saturating_add(u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// The tokio instant corresponding to "now".
    pub fn instant(&self) -> Instant {
        Instant::now()
    }

    /// Time elapsed since `earlier_ms`, zero if it lies in the future.
    pub fn since(&self, earlier_ms: u64) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(earlier_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn advances_with_paused_tokio_time() {
        let c = Clock::starting_at(1_000);
        assert_eq!(c.now_ms(), 1_000);
        tokio::time::sleep(Duration::from_secs(48 * 3600)).await;
        assert_eq!(c.now_ms(), 1_000 + 48 * 3600 * 1000);
        assert_eq!(c.since(1_000), Duration::from_secs(48 * 3600));
    }
}
