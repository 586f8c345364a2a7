//! Bounded, jittered exponential backoff: the one retry policy of the
//! workspace (device reconnects, artifact downloads, the MQTT links of hub and edge).
//!
//! Pure: the caller injects the randomness (a seed for [`SplitMix64`], so a
//! run is reproducible and a fleet does not retry in lockstep when each
//! device or node gets its own seed) and does the sleeping on its own clock.
//! Nothing here reads the time.
//!
//! # Invariants
//! - Every delay lies in `[initial·(1−jitter), max]`; the bound `max` is never
//!   exceeded, so a peer that comes back is retried within `max` (plus one
//!   connect timeout).
//! - Delays grow by `factor` per failed attempt until they reach `max`;
//!   [`Backoff::reset`] (after a success) starts over at `initial`.

use std::time::Duration;

/// The policy: how delays start, grow, and are jittered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffPolicy {
    /// First delay after a failure.
    pub initial: Duration,
    /// Upper bound of every delay.
    pub max: Duration,
    /// Growth factor per consecutive failure (>= 1).
    pub factor: f64,
    /// Fraction of the delay removed at random (0..=1): the delay is drawn
    /// uniformly from `[d·(1−jitter), d]`.
    pub jitter: f64,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
            factor: 2.0,
            jitter: 0.3,
        }
    }
}

impl BackoffPolicy {
    /// The MQTT reconnect policy of hub and edge links: doubling from
    /// `initial` to `max`, each delay jittered down by up to half so a fleet
    /// that lost its broker does not reconnect in lockstep.
    pub const fn reconnect(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            factor: 2.0,
            jitter: 0.5,
        }
    }

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

    /// The delay after `failures_before` earlier consecutive failures, with
    /// `unit` (uniform in `[0, 1)`) choosing the jitter. Expects a
    /// [`sanitized`](Self::sanitized) policy.
    pub fn delay(&self, failures_before: u32, unit: f64) -> Duration {
        let exp = i32::try_from(failures_before.min(64)).unwrap_or(64);
        let nominal =
            (self.initial.as_secs_f64() * self.factor.powi(exp)).min(self.max.as_secs_f64());
        let cut = self.jitter * unit;
        Duration::from_secs_f64(nominal * (1.0 - cut)).min(self.max)
    }
}

/// Backoff state of one connection (or one retried item).
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    attempt: u32,
    rng: SplitMix64,
}

impl Backoff {
    /// A fresh backoff; `seed` makes the jitter reproducible. Accepts any
    /// config type that converts into a [`BackoffPolicy`].
    pub fn new(policy: impl Into<BackoffPolicy>, seed: u64) -> Self {
        Self {
            policy: policy.into().sanitized(),
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
        let d = self.policy.delay(self.attempt, self.rng.next_f64());
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Forget past failures (call after a success).
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
    use proptest::prelude::*;

    #[test]
    fn grows_and_stays_bounded() {
        let cfg = BackoffPolicy {
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
        let cfg = BackoffPolicy {
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
        let c = BackoffPolicy {
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

    #[test]
    fn the_same_seed_gives_the_same_delays() {
        let delays = |seed| {
            let mut b = Backoff::new(BackoffPolicy::default(), seed);
            (0..20).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(delays(42), delays(42));
        assert_ne!(delays(42), delays(43));
    }

    proptest! {
        #[test]
        fn every_delay_is_within_the_documented_bounds(
            initial_ms in 0u64..5_000,
            max_ms in 0u64..120_000,
            factor in 0.0f64..5.0,
            jitter in -1.0f64..2.0,
            seed in any::<u64>(),
            failures in 0usize..80,
        ) {
            let policy = BackoffPolicy {
                initial: Duration::from_millis(initial_ms),
                max: Duration::from_millis(max_ms),
                factor,
                jitter,
            };
            let p = policy.sanitized();
            let mut b = Backoff::new(policy, seed);
            let low = p.initial.mul_f64(1.0 - p.jitter);
            let mut prev_nominal = Duration::ZERO;
            for i in 0..failures {
                prop_assert_eq!(b.attempt() as usize, i);
                let d = b.next_delay();
                prop_assert!(d <= p.max, "{:?} > max {:?}", d, p.max);
                // 1 µs of slack for the f64 round trip.
                prop_assert!(d + Duration::from_micros(1) >= low, "{:?} < {:?}", d, low);
                let nominal = p.delay(u32::try_from(i).unwrap(), 0.0);
                prop_assert!(nominal >= prev_nominal, "nominal delays never shrink");
                prev_nominal = nominal;
            }
            b.reset();
            prop_assert_eq!(b.attempt(), 0);
            prop_assert!(b.next_delay() <= p.initial);
        }
    }
}
