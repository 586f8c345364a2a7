//! Bounded, jittered exponential backoff for reconnects.
//!
//! Pure: the caller supplies the random source ([`SplitMix64`], seeded per
//! device) and does the sleeping.
//!
//! # Invariants
//! - Every delay lies in `[initial·(1−jitter), max]`; the bound `max` is never
//!   exceeded, so a device that comes back is retried within `max` (plus one
//!   connect timeout).
//! - Delays grow by `factor` per failed attempt until they reach `max`;
//!   [`Backoff::reset`] (after a successful connect) starts over at `initial`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Backoff parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackoffConfig {
    /// First delay after a failure.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Upper bound of every delay.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Growth factor per consecutive failure (>= 1).
    pub factor: f64,
    /// Fraction of the delay removed at random (0..=1): the delay is drawn
    /// uniformly from `[d·(1−jitter), d]`.
    pub jitter: f64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
            factor: 2.0,
            jitter: 0.3,
        }
    }
}

impl BackoffConfig {
    /// A copy with out-of-range fields clamped to usable values.
    #[must_use]
    pub fn sanitized(self) -> Self {
        let initial = self.initial.max(Duration::from_millis(1));
        Self {
            initial,
            max: self.max.max(initial),
            factor: if self.factor.is_finite() {
                self.factor.max(1.0)
            } else {
                2.0
            },
            jitter: if self.jitter.is_finite() {
                self.jitter.clamp(0.0, 1.0)
            } else {
                0.0
            },
        }
    }
}

/// Backoff state of one connection.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    attempt: u32,
    rng: SplitMix64,
}

impl Backoff {
    /// A fresh backoff; `seed` makes the jitter reproducible.
    pub fn new(config: BackoffConfig, seed: u64) -> Self {
        Self {
            config: config.sanitized(),
            attempt: 0,
            rng: SplitMix64::new(seed),
        }
    }

    /// Consecutive failures so far.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The delay before the next attempt; counts one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let c = self.config;
        let exp = i32::try_from(self.attempt.min(64)).unwrap_or(64);
        let nominal = (c.initial.as_secs_f64() * c.factor.powi(exp)).min(c.max.as_secs_f64());
        let cut = c.jitter * self.rng.next_f64();
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_secs_f64(nominal * (1.0 - cut)).min(c.max)
    }

    /// Forget past failures (call after a successful connect).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// SplitMix64: a tiny, fast, reproducible PRNG (Steele, Lea, Flood 2014).
/// Used for jitter and synthetic signals so sequences never depend on the
/// version of an external crate.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        unit_f64(self.next_u64())
    }
}

/// The SplitMix64 finaliser: a stateless 64-bit hash, good enough to derive
/// independent streams from (seed, index, step) tuples.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Maps 64 random bits to a uniform `f64` in `[0, 1)` (53 bits of mantissa).
#[allow(
    clippy::cast_precision_loss,
    reason = "53 bits fit the f64 mantissa exactly"
)]
pub fn unit_f64(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_stays_bounded() {
        let cfg = BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            factor: 2.0,
            jitter: 0.5,
        };
        let mut b = Backoff::new(cfg, 7);
        let mut last_nominal = Duration::ZERO;
        for i in 0..100 {
            let d = b.next_delay();
            assert!(d <= cfg.max, "attempt {i}: {d:?}");
            assert!(d >= Duration::from_millis(50), "attempt {i}: {d:?}");
            last_nominal = last_nominal.max(d);
        }
        assert!(last_nominal > Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn no_jitter_is_exact() {
        let cfg = BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(350),
            factor: 2.0,
            jitter: 0.0,
        };
        let mut b = Backoff::new(cfg, 1);
        let got: Vec<_> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, vec![100, 200, 350, 350]);
    }

    #[test]
    fn sanitizes_nonsense() {
        let c = BackoffConfig {
            initial: Duration::ZERO,
            max: Duration::ZERO,
            factor: f64::NAN,
            jitter: 7.0,
        }
        .sanitized();
        assert!(c.initial > Duration::ZERO && c.max >= c.initial);
        assert!((c.factor - 2.0).abs() < f64::EPSILON);
        assert!((c.jitter - 1.0).abs() < f64::EPSILON);
    }

    #[test]
    fn unit_range() {
        let mut r = SplitMix64::new(0);
        for _ in 0..10_000 {
            let x = r.next_f64();
            assert!((0.0..1.0).contains(&x));
        }
    }
}
