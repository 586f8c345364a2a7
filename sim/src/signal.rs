//! Signal models that drive simulated devices.
//!
//! A [`Model`] is a base [`Signal`] (sine + noise, random walk, steps — the
//! same math the edge node's synthetic driver uses, from
//! [`edge_node::drivers::synthetic`]) plus slow drift, extra noise and
//! injected [`Anomaly`] windows. [`ModelState::value_at`] evaluates it at a
//! time in ms since the simulation epoch. Everything is seeded: the same
//! model, seed and sequence of times give the same values.

use edge_node::drivers::synthetic::{SignalGen, noise};
use protocols::Signal;
use serde::{Deserialize, Serialize};

/// An injected deviation from normal behaviour, active on
/// `[at_ms, at_ms + duration_ms)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Anomaly {
    /// Adds `magnitude` to the value.
    Spike {
        /// Start, ms since the simulation epoch.
        at_ms: u64,
        /// Length in ms.
        duration_ms: u64,
        /// Added value.
        magnitude: f64,
    },
    /// Holds the last value from before `at_ms` (a frozen sensor).
    Stuck {
        /// Start, ms since the simulation epoch.
        at_ms: u64,
        /// Length in ms.
        duration_ms: u64,
    },
    /// Multiplies the noise by `factor` (a degrading sensor).
    Noisy {
        /// Start, ms since the simulation epoch.
        at_ms: u64,
        /// Length in ms.
        duration_ms: u64,
        /// Extra noise half-width.
        amplitude: f64,
    },
}

impl Anomaly {
    fn window(&self) -> (u64, u64) {
        match *self {
            Self::Spike {
                at_ms, duration_ms, ..
            }
            | Self::Stuck { at_ms, duration_ms }
            | Self::Noisy {
                at_ms, duration_ms, ..
            } => (at_ms, at_ms.saturating_add(duration_ms)),
        }
    }

    /// Whether the anomaly is active at `t_ms`.
    pub fn active(&self, t_ms: u64) -> bool {
        let (a, b) = self.window();
        (a..b).contains(&t_ms)
    }
}

/// A complete signal model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// Base shape.
    pub base: Signal,
    /// Linear drift per hour.
    #[serde(default)]
    pub drift_per_hour: f64,
    /// Extra uniform noise half-width.
    #[serde(default)]
    pub noise: f64,
    /// Injected anomalies.
    #[serde(default)]
    pub anomalies: Vec<Anomaly>,
}

impl Model {
    /// A plain base signal.
    pub fn new(base: Signal) -> Self {
        Self {
            base,
            drift_per_hour: 0.0,
            noise: 0.0,
            anomalies: Vec::new(),
        }
    }

    /// A sine of `amplitude` around `offset` with `period_s`.
    pub fn sine(amplitude: f64, period_s: f64, offset: f64) -> Self {
        Self::new(Signal::Sine {
            amplitude,
            period_s,
            offset,
            noise: 0.0,
        })
    }

    /// Evaluation state of this model with `seed`.
    pub fn start(&self, seed: u64) -> ModelState {
        ModelState {
            generator: SignalGen::new(self.base.clone(), seed),
            model: self.clone(),
            seed,
            last_normal: None,
        }
    }
}

/// A model being evaluated.
#[derive(Debug, Clone)]
pub struct ModelState {
    generator: SignalGen,
    model: Model,
    seed: u64,
    last_normal: Option<f64>,
}

impl ModelState {
    /// The value at `t_ms` (ms since the simulation epoch). Call with
    /// non-decreasing times: random walks advance one step per call.
    #[allow(clippy::cast_precision_loss, reason = "ms fit f64")]
    pub fn value_at(&mut self, t_ms: u64) -> f64 {
        let m = &self.model;
        let mut v = self.generator.sample(t_ms)
            + m.drift_per_hour * (t_ms as f64 / 3_600_000.0)
            + m.noise * noise(self.seed ^ 0xA5A5, t_ms);
        let mut stuck = false;
        for a in m.anomalies.iter().filter(|a| a.active(t_ms)) {
            match *a {
                Anomaly::Spike { magnitude, .. } => v += magnitude,
                Anomaly::Stuck { .. } => stuck = true,
                Anomaly::Noisy { amplitude, .. } => {
                    v += amplitude * noise(self.seed ^ 0x5A5A, t_ms);
                }
            }
        }
        if stuck {
            return self.last_normal.unwrap_or(v);
        }
        self.last_normal = Some(v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anomalies_apply_in_their_window() {
        let mut m = Model::sine(0.0, 10.0, 5.0);
        m.anomalies = vec![
            Anomaly::Spike {
                at_ms: 1_000,
                duration_ms: 100,
                magnitude: 10.0,
            },
            Anomaly::Stuck {
                at_ms: 2_000,
                duration_ms: 1_000,
            },
        ];
        m.drift_per_hour = 3_600.0; // 1 per second
        let mut s = m.start(1);
        assert!((s.value_at(0) - 5.0).abs() < 1e-9);
        assert!((s.value_at(1_050) - 16.05).abs() < 1e-9);
        assert!((s.value_at(1_500) - 6.5).abs() < 1e-9);
        let before = s.value_at(1_999);
        assert!((s.value_at(2_500) - before).abs() < 1e-12);
        assert!((s.value_at(3_000) - 8.0).abs() < 1e-9);
    }

    #[test]
    fn reproducible() {
        let mut m = Model::new(Signal::RandomWalk {
            start: 0.0,
            step: 1.0,
        });
        m.noise = 0.5;
        let (mut a, mut b) = (m.start(3), m.start(3));
        for t in 0..1000 {
            assert_eq!(a.value_at(t * 10).to_bits(), b.value_at(t * 10).to_bits());
        }
    }
}
