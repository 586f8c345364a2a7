//! The guest log rate limit (L5): a token bucket per function instance.
//!
//! Each line a guest logs takes one token; the bucket holds
//! [`LogLimits::burst`] tokens and refills at
//! [`LogLimits::lines_per_second`], by the time the embedder passes to the
//! call (the runtime reads no clock). A line that finds the bucket empty is
//! dropped and counted (`log_dropped` in
//! [`FunctionStatus`](crate::FunctionStatus)); the next line that passes is
//! preceded by one line saying how many were dropped.

/// Guest log rate limits, the same for every function of a runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// Lines per second a function may log, sustained.
    pub lines_per_second: u32,
    /// Lines a function may log at once.
    pub burst: u32,
}

impl Default for LogLimits {
    /// 20 lines per second, 100 at once.
    fn default() -> Self {
        Self {
            lines_per_second: 20,
            burst: 100,
        }
    }
}

/// Milli-tokens per line.
const LINE: u64 = 1000;

/// What to do with one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Log it; first say that `dropped_before` lines were dropped (if > 0).
    Pass {
        /// Lines dropped since the last line that passed.
        dropped_before: u64,
    },
    /// Drop it (counted).
    Drop,
}

/// One function's bucket.
///
/// # Invariants
/// `tokens <= burst * LINE`; time only moves forward (an earlier `now` than
/// the last one refills nothing).
#[derive(Debug, Clone)]
pub(crate) struct LogThrottle {
    limits: LogLimits,
    /// Milli-tokens.
    tokens: u64,
    last_ms: u64,
    /// Dropped since the last line that passed.
    pending: u64,
}

impl LogThrottle {
    /// A full bucket at `now_ms`.
    pub(crate) fn new(limits: LogLimits, now_ms: u64) -> Self {
        Self {
            limits,
            tokens: u64::from(limits.burst) * LINE,
            last_ms: now_ms,
            pending: 0,
        }
    }

    /// Decides about one line logged at `now_ms`.
    pub(crate) fn admit(&mut self, now_ms: u64) -> Verdict {
        let capacity = u64::from(self.limits.burst) * LINE;
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        // r lines per second = r milli-tokens per millisecond.
        let refill = elapsed.saturating_mul(u64::from(self.limits.lines_per_second));
        self.tokens = self.tokens.saturating_add(refill).min(capacity);
        if self.tokens >= LINE {
            self.tokens -= LINE;
            Verdict::Pass {
                dropped_before: std::mem::take(&mut self.pending),
            }
        } else {
            self.pending += 1;
            Verdict::Drop
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passed(t: &mut LogThrottle, now: u64, lines: usize) -> (usize, u64) {
        let mut n = 0;
        let mut announced = 0;
        for _ in 0..lines {
            if let Verdict::Pass { dropped_before } = t.admit(now) {
                n += 1;
                announced += dropped_before;
            }
        }
        (n, announced)
    }

    #[test]
    fn a_burst_then_the_sustained_rate_and_one_summary_of_the_drops() {
        let mut t = LogThrottle::new(LogLimits::default(), 1_000);
        // 1000 lines at once: the burst of 100 passes, 900 are dropped.
        assert_eq!(passed(&mut t, 1_000, 1000), (100, 0));
        // Half a second later: 10 tokens; the first line announces the 900.
        assert_eq!(passed(&mut t, 1_500, 50), (10, 900));
        // The 40 dropped just now are announced by the next line that passes.
        assert_eq!(t.admit(1_500), Verdict::Drop);
        assert_eq!(t.admit(1_550), Verdict::Pass { dropped_before: 41 });
        // A quiet minute refills only up to the burst.
        assert_eq!(passed(&mut t, 61_550, 1000), (100, 0));
        // A clock that goes back refills nothing.
        assert_eq!(t.admit(0), Verdict::Drop);
    }
}
