//! The per-function CPU budget: a token bucket of call time, pure (the
//! embedder's clock and the measured call durations are passed in).
//!
//! Calls run one at a time, so a function that spends its whole deadline
//! in every call without trapping takes the time of every other function
//! (finding M8). Each function may spend a share of wall-clock time in its
//! calls (`share_percent` of the time passing on the embedder's clock) plus
//! a burst; a function that overdraws is held back with exponential
//! backoff: its calls return [`CallError::Unavailable`](crate::CallError)
//! (the embedder keeps its input) and the other functions keep running.
//!
//! # Invariants
//! - `-burst <= tokens_us <= burst` at all times: a debt is capped at one
//!   burst, so a function that behaves again is released after paying back
//!   at most that much.
//! - The bucket refills only as the embedder's clock advances (a clock that
//!   goes backwards refills nothing).

use std::time::Duration;

use crate::backoff::{Backoff, BackoffConfig};

/// How much call time one function may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuBudget {
    /// Percentage (1..=100) of wall-clock time one function may spend in
    /// calls, sustained. Default 25: four functions that each use their
    /// whole share still leave time for the rest.
    pub share_percent: u32,
    /// Call time a function may use at once beyond its share (the bucket
    /// size). Default 2 s: two calls at the longest deadline the desired
    /// state allows (`protocols::limits::MAX_FUNCTION_DEADLINE_MS`).
    pub burst: Duration,
    /// How long an overdrawn function is held back: `initial` doubling per
    /// consecutive overdraw up to `max`; the count resets after
    /// `reset_after` without one.
    pub backoff: BackoffConfig,
}

impl Default for CpuBudget {
    fn default() -> Self {
        Self {
            share_percent: 25,
            burst: Duration::from_secs(2),
            backoff: BackoffConfig {
                initial: Duration::from_secs(1),
                max: Duration::from_mins(5),
                reset_after: Duration::from_mins(1),
            },
        }
    }
}

/// The call-time bucket of one function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CpuBucket {
    tokens_us: i64,
    last_ms: u64,
    burst_us: i64,
}

fn burst_limit(bucket: &CpuBucket) -> i64 {
    bucket.burst_us
}

/// The budget state of one function: its bucket, whether it is held back
/// and how often it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Throttle {
    bucket: CpuBucket,
    backoff: Backoff,
    until_ms: Option<u64>,
    /// Times the function was held back.
    pub(crate) times: u64,
}

impl Throttle {
    pub(crate) fn new(budget: &CpuBudget, now_ms: u64) -> Self {
        let mut backoff = Backoff::default();
        backoff.on_start(now_ms);
        Self {
            bucket: CpuBucket::new(budget, now_ms),
            backoff,
            until_ms: None,
            times: 0,
        }
    }

    /// When the function is released, if it is held back at `now_ms`; a
    /// hold that is over is lifted here.
    pub(crate) fn held_until(&mut self, now_ms: u64) -> Option<u64> {
        match self.until_ms {
            Some(until) if now_ms < until => Some(until),
            Some(_) => {
                self.until_ms = None;
                self.backoff.on_start(now_ms);
                None
            }
            None => None,
        }
    }

    /// Charges a call that started at `now_ms` and took `used`. Returns
    /// when the function is released if this call overdrew its budget.
    pub(crate) fn record(
        &mut self,
        budget: &CpuBudget,
        now_ms: u64,
        used: Duration,
    ) -> Option<u64> {
        self.bucket.refill(budget, now_ms);
        if !self.bucket.charge(used) {
            self.backoff.on_success(&budget.backoff, now_ms);
            return None;
        }
        let until = self.backoff.on_failure(&budget.backoff, now_ms);
        self.until_ms = Some(until);
        self.times += 1;
        Some(until)
    }

    /// When the function is released, if it is held back (as last seen).
    pub(crate) fn until_ms(&self) -> Option<u64> {
        self.until_ms
    }

    /// Consecutive overdraws (0 once it kept within its budget for
    /// `backoff.reset_after`).
    pub(crate) fn strikes(&self) -> u32 {
        self.backoff.failures()
    }
}

impl CpuBucket {
    /// A full bucket at `now_ms`.
    pub(crate) fn new(budget: &CpuBudget, now_ms: u64) -> Self {
        Self {
            tokens_us: burst_us(budget),
            last_ms: now_ms,
            burst_us: burst_us(budget),
        }
    }

    /// Adds the share of the time since the last refill.
    pub(crate) fn refill(&mut self, budget: &CpuBudget, now_ms: u64) {
        let elapsed_ms = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        let share = u64::from(budget.share_percent.clamp(1, 100));
        let earned =
            i64::try_from(elapsed_ms.saturating_mul(10).saturating_mul(share)).unwrap_or(i64::MAX);
        self.tokens_us = self.tokens_us.saturating_add(earned).min(burst_us(budget));
    }

    /// Charges a call of `used`; returns whether the bucket is overdrawn.
    pub(crate) fn charge(&mut self, used: Duration) -> bool {
        let used_us = i64::try_from(used.as_micros()).unwrap_or(i64::MAX);
        self.tokens_us = self
            .tokens_us
            .saturating_sub(used_us)
            .max(-burst_limit(self));
        self.tokens_us < 0
    }
}

fn burst_us(budget: &CpuBudget) -> i64 {
    i64::try_from(budget.burst.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> CpuBudget {
        CpuBudget {
            share_percent: 10,
            burst: Duration::from_millis(50),
            ..CpuBudget::default()
        }
    }

    #[test]
    fn a_call_within_the_share_never_overdraws() {
        let b = budget();
        let mut bucket = CpuBucket::new(&b, 0);
        for tick in 1..=1000 {
            bucket.refill(&b, tick * 100);
            assert!(!bucket.charge(Duration::from_millis(10)), "tick {tick}");
        }
    }

    #[test]
    fn a_hog_overdraws_after_its_burst_and_refills_with_the_clock() {
        let b = budget();
        let mut bucket = CpuBucket::new(&b, 0);
        assert!(!bucket.charge(Duration::from_millis(40)));
        assert!(
            bucket.charge(Duration::from_millis(40)),
            "50 ms burst spent"
        );
        // 30 ms in debt; 10 % of 300 ms pays it back.
        bucket.refill(&b, 299);
        assert!(bucket.charge(Duration::ZERO));
        bucket.refill(&b, 300);
        assert!(!bucket.charge(Duration::ZERO));
        // Never more than the burst, and a clock going back earns nothing.
        bucket.refill(&b, 1_000_000);
        bucket.refill(&b, 5);
        assert!(!bucket.charge(Duration::from_millis(50)));
        assert!(bucket.charge(Duration::from_micros(1)));
        // A debt is capped at one burst: 10 % of 1 s pays back any call.
        assert!(bucket.charge(Duration::from_secs(3600)));
        bucket.refill(&b, 1_000_500);
        assert!(!bucket.charge(Duration::ZERO));
    }

    #[test]
    fn a_throttled_function_is_held_back_with_exponential_backoff() {
        let b = CpuBudget {
            backoff: BackoffConfig {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(1),
                reset_after: Duration::from_secs(10),
            },
            ..budget()
        };
        let mut t = Throttle::new(&b, 0);
        let hog = Duration::from_millis(200);
        assert_eq!(t.record(&b, 0, hog), Some(100));
        assert_eq!(t.held_until(50), Some(100));
        assert_eq!(t.held_until(100), None);
        assert_eq!(t.record(&b, 100, hog), Some(300));
        assert_eq!(t.held_until(300), None);
        assert_eq!(t.record(&b, 300, hog), Some(700));
        assert_eq!((t.times, t.strikes()), (3, 3));
        // Within budget for `reset_after`: strikes go back to zero.
        assert_eq!(t.held_until(700), None);
        assert_eq!(t.record(&b, 20_000, Duration::ZERO), None);
        assert_eq!(t.strikes(), 0);
    }
}
