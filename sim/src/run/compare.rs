//! Phase 5: the devices stop, the fleet drains, and every point's stored
//! samples are compared with what its device served.
//!
//! [`RunState::stop_and_drain`] waits (bounded) until every node has acked
//! everything stamped before the devices stopped; [`RunState::compare`]
//! reads every stored stream back and compares point by point. The
//! per-protocol delivery rules (OPC UA's first notification, MQTT payload
//! timestamps, Modbus stamp-after-read) trim each point's served window;
//! [`compare_segmented`] splits a point at function restarts (agent
//! restarts, re-deploys, crash loss windows) so each segment is replayed
//! through the filter in force then.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::fleet::{PointInfo, SimNode};
use edgefleet_testkit::wait_until;

use super::monitor::drained;
use super::{RunState, lock, now_ms};
use crate::report::Totals;
use crate::truth::{self, Obs, PointCheck, PointFilter};

/// Added to the moment a re-deploy was seen applied, to bound when the
/// function instances were actually swapped.
const RESTART_SLACK: Duration = Duration::from_secs(1);

/// How the final drain went.
pub(super) struct Drain {
    /// Wall ms when the devices stopped.
    pub(super) end_ms: u64,
    /// Seconds from the devices stopping until every node had drained.
    pub(super) seconds: f64,
    /// Whether that happened within `drain_timeout`.
    pub(super) complete: bool,
}

/// What the comparison of every point adds up.
struct Tally {
    totals: Totals,
    /// Points logged at debug level, per kind of mismatch.
    flagged: [u32; 4],
}

/// The fixed inputs of one point's comparison.
#[allow(
    clippy::struct_field_names,
    reason = "all wall-clock ms, named like the runner's other instants"
)]
struct Window {
    /// Served values after this (node time) are not compared.
    cut_ms: u64,
    /// Wall ms by which every subscription had to be active.
    subscribed_by_ms: u64,
    interval_ms: u64,
}

impl RunState {
    /// Stops every device server, then waits (bounded by `drain_timeout`)
    /// until every node has acked everything stamped before that.
    pub(super) async fn stop_and_drain(&mut self, device_seconds: f64) -> Drain {
        let end_ms = now_ms();
        let drain_start = Instant::now();
        for n in &self.nodes {
            n.stop_devices().await;
        }
        self.progress.bar.finish_and_clear();
        self.progress.println(format!(
            "devices stopped after {device_seconds:.1} s; waiting for the edge nodes to drain"
        ));
        let margin_ms = self.s.edge.batch_max_age.as_millis() as u64 + 1_000;
        let is_drained = wait_until("the edge nodes to drain", self.s.drain_timeout, || async {
            drained(
                &lock(&self.monitor),
                &self.nodes,
                end_ms + margin_ms,
                Some(end_ms + margin_ms),
                0,
            )
            .then_some(())
        })
        .await
        .is_ok();
        let final_drain = drain_start.elapsed().as_secs_f64();
        self.progress.println(format!(
            "drain {} after {final_drain:.1} s; comparing with ground truth",
            if is_drained { "complete" } else { "TIMED OUT" }
        ));
        Drain {
            end_ms,
            seconds: final_drain,
            complete: is_drained,
        }
    }

    /// Reads every stored stream back and compares every point.
    pub(super) async fn compare(
        &self,
        end_ms: u64,
        subscribed_by_ms: u64,
    ) -> anyhow::Result<Totals> {
        // Values served in the last moments before the devices stopped may
        // not have been delivered (an OPC UA publish cycle, a Modbus reply in
        // flight): the comparison window ends two sampling intervals earlier.
        let interval_ms = self.s.sampling_interval.as_millis() as u64;
        let cut_ms = end_ms.saturating_sub(2 * interval_ms);
        let mut tally = Tally {
            totals: Totals::default(),
            flagged: [0; 4],
        };
        for n in &self.nodes {
            // In the node's time (shifted after a virtual-time outage).
            let w = Window {
                cut_ms: cut_ms.saturating_add_signed(n.clock_offset_ms),
                subscribed_by_ms,
                interval_ms,
            };
            let mut stored = self.stored_of(n, &w, &mut tally.totals).await?;
            let restarts = self.restart_windows(n, end_ms);
            for p in &n.points {
                let mut st = stored.remove(&p.index).unwrap_or_default();
                st.sort_by_key(|o| o.ts_ms);
                self.compare_one(n, p, st, &w, &restarts, &mut tally);
            }
        }
        Ok(tally.totals)
    }

    /// Node `n`'s stored samples by point, up to an interval after the cut;
    /// every stream's sequence numbers go into `totals`.
    async fn stored_of(
        &self,
        n: &SimNode,
        w: &Window,
        totals: &mut Totals,
    ) -> anyhow::Result<HashMap<u32, Vec<Obs>>> {
        let mut stored: HashMap<u32, Vec<Obs>> = HashMap::new();
        for stream in self.hub.streams(&n.layout.name).await? {
            let samples = self.hub.samples(&n.layout.name, &stream).await?;
            let seqs: Vec<u64> = samples.iter().map(|x| x.seq).collect();
            totals.add_stream(&truth::seq_analysis(&seqs));
            for x in samples {
                if x.ts_ms <= w.cut_ms + w.interval_ms {
                    stored.entry(x.point).or_default().push(Obs {
                        ts_ms: x.ts_ms,
                        value: x.value,
                        quality: x.quality,
                    });
                }
            }
        }
        Ok(stored)
    }

    /// Restart windows of node `n`, `[lo, hi]` wall ms, sorted. An agent
    /// restart is over when `start_agent` returns. A re-deploy is reported
    /// applied when the agent has handed the new functions to its function
    /// host, which swaps the instances asynchronously right after (a cached
    /// module instantiates in well under a millisecond): hi is when the
    /// monitor saw it applied plus [`RESTART_SLACK`]. After a crash
    /// (SIGKILL) the agent reports the window in which samples not yet
    /// committed may be lost; the restarted instance begins at its end.
    fn restart_windows(&self, n: &SimNode, end_ms: u64) -> Vec<(u64, u64)> {
        let mon = lock(&self.monitor);
        let mut out: Vec<(u64, u64)> = self
            .restarts
            .iter()
            .filter(|r| r.node == n.layout.index)
            .map(|r| {
                let hi = r.revision.map_or(r.lo_ms, |rev| {
                    mon.applied_at_ms
                        .get(&(n.layout.name.clone(), rev))
                        .map_or(end_ms, |t| t + RESTART_SLACK.as_millis() as u64)
                });
                (r.lo_ms, hi.max(r.lo_ms))
            })
            .collect();
        if let Some(rep) = mon
            .nodes
            .get(&n.layout.name)
            .and_then(|v| v.reported.as_ref())
        {
            out.extend(rep.loss_windows.iter().map(|w| (w.from_ms, w.to_ms)));
        }
        out.sort_unstable();
        out
    }

    /// Compares point `p` of node `n` (`st`: its stored samples in time
    /// order) and adds the verdict to `totals`.
    fn compare_one(
        &self,
        n: &SimNode,
        p: &PointInfo,
        mut st: Vec<Obs>,
        w: &Window,
        restarts: &[(u64, u64)],
        tally: &mut Tally,
    ) {
        let served = served_window(n, p, &st, w);
        // The compared window ends at the last served value: a Modbus
        // sample is stamped after its read (by less than half an
        // interval), so stored samples up to there belong to it; later
        // ones belong to reads after the cut.
        let window_end = served
            .last()
            .map_or(w.cut_ms, |o| o.ts_ms + w.interval_ms / 2);
        st.retain(|o| o.ts_ms <= window_end);
        let func = self.s.function_of(p.slot, p.source.protocol);
        let fname = func.map_or_else(String::new, |f| f.name.clone());
        let config_log = &self.deploy.config_log;
        // The filter in force from wall ms `at` on (re-deploys change it).
        let filter = |at: u64| match func {
            Some(f) => PointFilter::Guest {
                guest: f.guest,
                config: config_log
                    .iter()
                    .rev()
                    .find(|(t, name, _)| *t <= at && *name == f.name)
                    .map_or_else(|| f.config.clone(), |(_, _, c)| c.clone()),
            },
            None => PointFilter::Passthrough,
        };
        let v = compare_segmented(
            filter,
            &served,
            &st,
            restarts,
            w.interval_ms,
            &mut tally.totals.in_restart_windows,
        );
        let bound = func.map_or(0.0, |f| {
            self.deploy
                .max_error_of
                .get(&f.name)
                .copied()
                .unwrap_or(f.max_error)
        });
        flag(n, p, &v, bound, &served, &st, &mut tally.flagged);
        tally
            .totals
            .add_point_of(p.source.protocol.name(), &fname, &v);
    }
}

/// The values point `p`'s device served that the comparison covers: up to
/// the cut, and from when the point's client could get them (the device's
/// delivery rule; `st`: its stored samples, in time order).
fn served_window(n: &SimNode, p: &PointInfo, st: &[Obs], w: &Window) -> Vec<Obs> {
    let Some(device) = n.device_of(p.source) else {
        return Vec::new();
    };
    let mut served: Vec<Obs> = device
        .served(p.index)
        .into_iter()
        .filter(|(ts, _)| *ts <= w.cut_ms)
        .map(|(ts_ms, value)| Obs {
            ts_ms,
            value,
            quality: 0,
        })
        .collect();
    // Subscriptions (OPC UA, MQTT): values served before the first one a
    // point delivered (or before every subscription had to be active)
    // reached no subscriber.
    let t0 = st
        .first()
        .map_or(w.subscribed_by_ms, |f| f.ts_ms.min(w.subscribed_by_ms));
    device.delivery_window(&mut served, st, t0);
    served
}

/// Logs up to 10 points per kind of mismatch (duplicates, unexpected, lost,
/// error over `bound`) at debug level.
fn flag(
    n: &SimNode,
    p: &PointInfo,
    v: &PointCheck,
    bound: f64,
    served: &[Obs],
    st: &[Obs],
    flagged: &mut [u32; 4],
) {
    let kind = if v.duplicates > 0 {
        0
    } else if v.unexpected > 0 {
        1
    } else if v.lost.is_some_and(|l| l > 0) {
        2
    } else if v.max_abs_error > bound {
        3
    } else {
        return;
    };
    if flagged[kind] < 10 {
        flagged[kind] += 1;
        let stray: Vec<_> = st
            .iter()
            .filter(|o| {
                !served
                    .iter()
                    .any(|x| x.value.to_bits() == o.value.to_bits())
            })
            .take(3)
            .collect();
        tracing::debug!(node = %n.layout.name, point = p.index, slot = p.slot, source = ?p.source, ?v, ?stray, first_served = ?served.first(), "point verdict");
    }
}

/// Compares one point whose function instances restarted at `restarts`
/// (`(lo, hi)` wall ms: the restart happened between them), each segment
/// with the filter in force then (`filter(segment start)`).
///
/// A restarted instance starts with fresh state, which the reference cannot
/// place exactly in time. But the state of both reference filters right
/// after they emit a sample is fully determined by that sample (deadband:
/// the last value sent; swinging door: the archived point, the door reopened
/// from it), so the comparison restarts the reference at an *anchor*: the
/// first stored sample at or after `hi`, which only the new instance can
/// have emitted. Served values and stored samples from `lo` to the anchor
/// are not compared; they are counted in `excluded` (the documented restart
/// window), never as lost.
fn compare_segmented(
    filter: impl Fn(u64) -> PointFilter,
    served: &[Obs],
    stored: &[Obs],
    restarts: &[(u64, u64)],
    interval_ms: u64,
    excluded: &mut u64,
) -> PointCheck {
    let slack = truth::local::CLOCK_SLACK_MS;
    let mut total = PointCheck::default();
    let (mut ss, mut ts) = (0usize, 0usize); // segment starts in served / stored
    let mut seg_at = 0u64;
    let mut first = true;
    let mut owned: Vec<Obs>;
    for &(lo, hi) in restarts {
        // The segment ends before `lo`; a Modbus sample is stamped after its
        // read, so stored samples up to half an interval after the last
        // served value of the segment belong to it.
        let se = served.partition_point(|o| o.ts_ms < lo).max(ss);
        let te_limit = served[ss..se].last().map_or(lo, |o| {
            (o.ts_ms + interval_ms / 2).min(lo + interval_ms / 2)
        });
        let te = stored.partition_point(|o| o.ts_ms <= te_limit).max(ts);
        // (a good sample: a bad one is an outage marker, not a value)
        let a = stored.partition_point(|o| o.ts_ms < hi).max(te);
        let a = stored[a..]
            .iter()
            .position(|o| o.quality == 0)
            .map_or(stored.len(), |i| a + i);
        let seg_filter = filter(seg_at);
        let v = truth::check_point(&seg_filter, &served[ss..se], &stored[ts..te]);
        merge(&mut total, &v, first);
        first = false;
        // Restart at the anchor: the served observation it came from is the
        // latest with its value served at or before it.
        let Some(anchor) = stored.get(a) else {
            *excluded += (served.len() - se) as u64;
            return total;
        };
        let k = served[se..].partition_point(|o| o.ts_ms <= anchor.ts_ms + slack);
        let k = served[se..se + k]
            .iter()
            .rposition(|o| o.value.to_bits() == anchor.value.to_bits())
            .map_or(se + k, |i| se + i);
        *excluded += (k - se) as u64;
        ss = k;
        ts = a;
        seg_at = lo;
    }
    // Last segment; its first served value takes the anchor's timestamp
    // (the observation it came from, as the agent stamped it: an OPC UA
    // re-subscription delivers the current value with the latest tick).
    owned = served[ss..].to_vec();
    if ss > 0
        && let (Some(f), Some(a)) = (owned.first_mut(), stored.get(ts))
        && f.value.to_bits() == a.value.to_bits()
        && a.ts_ms > f.ts_ms
    {
        f.ts_ms = a.ts_ms;
    }
    let v = truth::check_point(&filter(seg_at), &owned, &stored[ts..]);
    merge(&mut total, &v, first);
    total
}

/// Adds segment verdict `v` to `total`.
fn merge(total: &mut PointCheck, v: &PointCheck, first: bool) {
    total.served += v.served;
    total.stored += v.stored;
    total.duplicates += v.duplicates;
    total.unexpected += v.unexpected;
    total.expected = match (first, total.expected, v.expected) {
        (true, _, e) => e,
        (false, Some(a), Some(b)) => Some(a + b),
        _ => None,
    };
    total.lost = match (first, total.lost, v.lost) {
        (true, _, l) => l,
        (false, Some(a), Some(b)) => Some(a + b),
        _ => None,
    };
    if v.max_abs_error.is_nan() || v.max_abs_error > total.max_abs_error {
        total.max_abs_error = v.max_abs_error;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Guest;

    fn o(i: u64) -> Obs {
        Obs {
            ts_ms: 10 * i,
            value: 0.4 * i as f64,
            quality: 0,
        }
    }

    /// A deadband instance restarted between reads 10 and 11: the old one
    /// sent every even read, the fresh one starts by sending read 11 and
    /// then every odd read.
    #[test]
    fn a_restart_window_restarts_the_reference_at_the_new_instance() {
        let served: Vec<Obs> = (0..=20).map(o).collect();
        let stored: Vec<Obs> = (0..=10)
            .step_by(2)
            .chain((11..=19).step_by(2))
            .map(o)
            .collect();
        let filter = |_| PointFilter::Guest {
            guest: Guest::Deadband,
            config: "deadband=0.5".into(),
        };
        let mut excluded = 0;
        let v = compare_segmented(filter, &served, &stored, &[(105, 110)], 10, &mut excluded);
        assert_eq!(v.lost, Some(0), "{v:?}");
        assert_eq!(v.unexpected, 0, "{v:?}");
        assert_eq!(v.stored, stored.len() as u64);
        assert_eq!(excluded, 0, "read 11 is the anchor itself");

        // Without the restart the continuous reference disagrees.
        let v = compare_segmented(filter, &served, &stored, &[], 10, &mut excluded);
        assert!(v.unexpected > 0 && v.lost.unwrap_or(0) > 0, "{v:?}");

        // A sample the new instance should have sent but that is missing
        // is still lost.
        let mut gappy = stored.clone();
        gappy.retain(|x| x.ts_ms != 150);
        let v = compare_segmented(filter, &served, &gappy, &[(105, 110)], 10, &mut excluded);
        assert_eq!(v.lost, Some(1), "{v:?}");
    }
}
