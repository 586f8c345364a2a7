//! Reconnect backoff of the drivers: the configuration side.
//!
//! The policy itself (bounded, jittered exponential, pure, seeded) is
//! [`protocols::backoff`], shared with the artifact fetcher; it is re-exported
//! here so driver code and the simulator keep one import path. This module
//! adds [`BackoffConfig`], the serde form of [`BackoffPolicy`] in the driver
//! options (durations as `"200ms"`, `"30s"`).
//!
//! # Invariants
//! - A [`BackoffConfig`] converts into a [`BackoffPolicy`] field for field;
//!   [`Backoff::new`] sanitizes it, so every delay lies in
//!   `[initial·(1−jitter), max]` whatever a config file says.

use std::time::Duration;

pub use protocols::backoff::{Backoff, BackoffPolicy, SplitMix64, mix64, unit_f64};
use serde::{Deserialize, Serialize};

/// Backoff parameters, as configured.
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
        BackoffPolicy::default().into()
    }
}

impl From<BackoffConfig> for BackoffPolicy {
    fn from(c: BackoffConfig) -> Self {
        Self {
            initial: c.initial,
            max: c.max,
            factor: c.factor,
            jitter: c.jitter,
        }
    }
}

impl From<BackoffPolicy> for BackoffConfig {
    fn from(p: BackoffPolicy) -> Self {
        Self {
            initial: p.initial,
            max: p.max,
            factor: p.factor,
            jitter: p.jitter,
        }
    }
}

impl BackoffConfig {
    /// A copy with out-of-range fields clamped to usable values
    /// ([`BackoffPolicy::sanitized`]).
    #[must_use]
    pub fn sanitized(self) -> Self {
        BackoffPolicy::from(self).sanitized().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_sanitizing_are_the_policys() {
        assert_eq!(
            BackoffPolicy::from(BackoffConfig::default()),
            BackoffPolicy::default()
        );
        let c = BackoffConfig {
            initial: Duration::ZERO,
            max: Duration::ZERO,
            factor: f64::NAN,
            jitter: 7.0,
        };
        assert_eq!(
            BackoffPolicy::from(c.sanitized()),
            BackoffPolicy::from(c).sanitized()
        );
    }

    #[test]
    fn a_config_drives_the_same_delays_as_its_policy() {
        let c = BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(350),
            factor: 2.0,
            jitter: 0.0,
        };
        let mut b = Backoff::new(c, 1);
        let got: Vec<_> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, vec![100, 200, 350, 350]);
    }

    #[test]
    fn durations_read_as_humantime() {
        let c: BackoffConfig = toml::from_str("initial = \"50ms\"\nmax = \"2s\"").unwrap();
        assert_eq!(
            (c.initial, c.max),
            (Duration::from_millis(50), Duration::from_secs(2))
        );
        assert!(
            (c.factor - 2.0).abs() < f64::EPSILON,
            "unset fields keep defaults"
        );
        let e = toml::from_str::<BackoffConfig>("inital = \"1s\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `inital`"), "{e}");
    }
}
