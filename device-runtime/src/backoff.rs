//! Exponential restart backoff, pure (time is passed in).

use std::time::Duration;

/// Backoff policy for restarting crashed functions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Delay before the first restart.
    pub initial: Duration,
    /// Upper bound of the delay.
    pub max: Duration,
    /// A function that runs this long without failing has its failure count
    /// reset, so the next crash restarts after `initial` again.
    pub reset_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_mins(5),
            reset_after: Duration::from_mins(10),
        }
    }
}

/// Consecutive-failure counter of one function.
///
/// # Invariants
/// `failures == 0` exactly when the function has not failed since the last
/// reset; `healthy_since_ms` is when it last (re)started.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Backoff {
    failures: u32,
    healthy_since_ms: u64,
}

impl Backoff {
    /// Consecutive failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Records a failure at `now_ms`; returns when the next restart is due.
    pub fn on_failure(&mut self, config: &BackoffConfig, now_ms: u64) -> u64 {
        if self.failures > 0
            && now_ms.saturating_sub(self.healthy_since_ms) >= millis(config.reset_after)
        {
            self.failures = 0;
        }
        self.failures = self.failures.saturating_add(1);
        now_ms.saturating_add(millis(self.delay(config)))
    }

    /// Delay after the current number of failures:
    /// `initial * 2^(failures-1)`, capped at `max`.
    pub fn delay(&self, config: &BackoffConfig) -> Duration {
        let exp = self.failures.saturating_sub(1).min(31);
        config.initial.saturating_mul(1_u32 << exp).min(config.max)
    }

    /// Records a (re)start at `now_ms`.
    pub fn on_start(&mut self, now_ms: u64) {
        self.healthy_since_ms = now_ms;
    }

    /// Records a successful call at `now_ms`: after `reset_after` of health
    /// the failure count goes back to zero.
    pub fn on_success(&mut self, config: &BackoffConfig, now_ms: u64) {
        if self.failures > 0
            && now_ms.saturating_sub(self.healthy_since_ms) >= millis(config.reset_after)
        {
            self.failures = 0;
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BackoffConfig {
        BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            reset_after: Duration::from_secs(5),
        }
    }

    #[test]
    fn doubles_then_caps() {
        let mut b = Backoff::default();
        let c = cfg();
        let dues: Vec<u64> = (0..6).map(|_| b.on_failure(&c, 0)).collect();
        assert_eq!(dues, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.failures(), 6);
    }

    #[test]
    fn resets_after_a_healthy_period() {
        let mut b = Backoff::default();
        let c = cfg();
        b.on_failure(&c, 0);
        b.on_failure(&c, 0);
        b.on_start(1000);
        b.on_success(&c, 2000);
        assert_eq!(b.failures(), 2, "not healthy long enough yet");
        b.on_success(&c, 6000);
        assert_eq!(b.failures(), 0);
        assert_eq!(b.on_failure(&c, 6000), 6100);
    }
}
