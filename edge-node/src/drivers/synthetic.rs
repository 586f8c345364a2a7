//! Synthetic signals: the math (shared with the simulator) and the driver for
//! [`DeviceProtocol::Synthetic`](protocols::DeviceProtocol::Synthetic) devices.
//!
//! [`SignalGen`] is pure and reproducible: the same [`Signal`], seed and
//! sequence of sample times give the same values on every machine (the noise
//! comes from [`mix64`], not from an external RNG crate). The driver seeds
//! each point with its node-wide index.

use std::time::Duration;

use protocols::{Device, PointAddress, Quality, Sample, Signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::backoff::{mix64, unit_f64};
use super::health::Health;
use crate::clock::Clock;

/// Uniform noise in `[-1, 1)` for (`seed`, `k`): a pure function.
pub fn noise(seed: u64, k: u64) -> f64 {
    unit_f64(mix64(seed ^ mix64(k))) * 2.0 - 1.0
}

/// Levels a [`Signal::Steps`] signal visits: `0, height, …, (LEVELS-1)·height`.
pub const STEP_LEVELS: u64 = 5;

/// A reproducible generator for one point.
#[derive(Debug, Clone)]
pub struct SignalGen {
    signal: Signal,
    seed: u64,
    /// Random-walk state.
    level: f64,
    step: u64,
}

impl SignalGen {
    /// Generator of `signal` with `seed` (the driver uses the point index).
    pub fn new(signal: Signal, seed: u64) -> Self {
        let level = match signal {
            Signal::RandomWalk { start, .. } => start,
            _ => 0.0,
        };
        Self {
            signal,
            seed,
            level,
            step: 0,
        }
    }

    /// The value at `t_ms` (ms since the generator's epoch).
    ///
    /// Sine and steps are pure functions of `t_ms`; a random walk takes one
    /// step per call, so its sequence depends only on the number of calls.
    #[allow(
        clippy::cast_precision_loss,
        reason = "ms since epoch fit f64 for 285k years"
    )]
    pub fn sample(&mut self, t_ms: u64) -> f64 {
        let t = t_ms as f64 / 1000.0;
        match self.signal {
            Signal::Sine {
                amplitude,
                period_s,
                offset,
                noise: n,
            } => {
                let phase = if period_s > 0.0 { t / period_s } else { 0.0 };
                let wave = (std::f64::consts::TAU * phase).sin();
                offset + amplitude * wave + n * noise(self.seed, t_ms)
            }
            Signal::RandomWalk { step, .. } => {
                let s = self.step;
                self.step = self.step.wrapping_add(1);
                if s > 0 {
                    self.level += step * noise(self.seed, s);
                }
                self.level
            }
            Signal::Steps { height, every_s } => {
                let every_ms = (every_s * 1000.0).max(1.0);
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "non-negative, floored"
                )]
                let n = (t_ms as f64 / every_ms).floor() as u64;
                let idx = mix64(self.seed ^ mix64(n.wrapping_add(0x5eed))) % STEP_LEVELS;
                height * idx as f64
            }
        }
    }
}

/// Runs a synthetic device until `cancel`: every group emits one sample per
/// point per interval, timestamped by `clock`.
pub(crate) async fn run(
    device: Device,
    out: mpsc::Sender<Vec<Sample>>,
    clock: Clock,
    health: Health,
    cancel: CancellationToken,
) {
    struct Group {
        interval: Duration,
        next: tokio::time::Instant,
        points: Vec<(u32, f64, f64, SignalGen)>,
    }
    let start = clock.instant();
    let mut groups: Vec<Group> = device
        .groups
        .iter()
        .map(|g| Group {
            interval: Duration::from_millis(g.interval_ms.max(1)),
            next: start,
            points: g
                .points
                .iter()
                .filter_map(|p| match &p.address {
                    PointAddress::Synthetic { signal } => Some((
                        p.index,
                        p.scale,
                        p.offset,
                        SignalGen::new(signal.clone(), u64::from(p.index)),
                    )),
                    _ => None,
                })
                .collect(),
        })
        .collect();
    let skipped: usize = device.groups.iter().map(|g| g.points.len()).sum::<usize>()
        - groups.iter().map(|g| g.points.len()).sum::<usize>();
    if skipped > 0 {
        health.disconnected(format!(
            "{skipped} points without a synthetic address are ignored"
        ));
    }
    health.connected();
    let epoch_ms = clock.now_ms();
    loop {
        let Some(due) = groups.iter().map(|g| g.next).min() else {
            cancel.cancelled().await;
            return;
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep_until(due) => {}
        }
        let now = clock.instant();
        for g in groups.iter_mut().filter(|g| g.next <= now) {
            let ts = clock.now_ms();
            let t = ts.saturating_sub(epoch_ms);
            let batch: Vec<Sample> = g
                .points
                .iter_mut()
                .map(|(index, scale, offset, gen_)| Sample {
                    point: *index,
                    ts_ms: ts,
                    value: gen_.sample(t).mul_add(*scale, *offset),
                    quality: Quality::GOOD,
                })
                .collect();
            g.next += g.interval;
            if g.next <= now {
                g.next = now + g.interval;
            }
            health.request(true, Duration::ZERO, None);
            health.samples(batch.len(), 0);
            if batch.is_empty() {
                continue;
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                r = out.send(batch) => if r.is_err() { return; },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproducible() {
        let s = Signal::Sine {
            amplitude: 2.0,
            period_s: 10.0,
            offset: 1.0,
            noise: 0.1,
        };
        let mut a = SignalGen::new(s.clone(), 3);
        let mut b = SignalGen::new(s, 3);
        for t in (0..10_000).step_by(100) {
            let (x, y) = (a.sample(t), b.sample(t));
            assert_eq!(x.to_bits(), y.to_bits());
            assert!((-1.1..=3.1).contains(&x));
        }
        // Quarter period, no noise: exactly the peak.
        let mut c = SignalGen::new(
            Signal::Sine {
                amplitude: 2.0,
                period_s: 10.0,
                offset: 1.0,
                noise: 0.0,
            },
            0,
        );
        assert!((c.sample(2_500) - 3.0).abs() < 1e-12);
    }

    #[test]
    fn walk_steps_are_bounded() {
        let mut g = SignalGen::new(
            Signal::RandomWalk {
                start: 5.0,
                step: 0.5,
            },
            1,
        );
        let mut prev = g.sample(0);
        assert!((prev - 5.0).abs() < f64::EPSILON);
        for t in 1..1000 {
            let v = g.sample(t);
            assert!((v - prev).abs() <= 0.5);
            prev = v;
        }
    }

    #[test]
    fn steps_hold_between_changes() {
        let mut g = SignalGen::new(
            Signal::Steps {
                height: 2.0,
                every_s: 1.0,
            },
            9,
        );
        let a = g.sample(1_000);
        assert_eq!(a.to_bits(), g.sample(1_999).to_bits());
        for t in (0..100_000).step_by(500) {
            let v = g.sample(t);
            assert!(v >= 0.0 && v <= 2.0 * (STEP_LEVELS - 1) as f64 && (v / 2.0).fract() == 0.0);
        }
    }

    #[test]
    fn noise_range() {
        for k in 0..10_000 {
            let n = noise(42, k);
            assert!((-1.0..1.0).contains(&n));
        }
    }
}
