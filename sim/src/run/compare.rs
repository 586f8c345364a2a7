//! Phase 5 helpers: comparing one point across function restarts.

use std::time::Duration;

use crate::report::{self, Obs, PointFilter};

/// Added to the moment a re-deploy was seen applied, to bound when the
/// function instances were actually swapped.
pub(super) const RESTART_SLACK: Duration = Duration::from_secs(1);

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
pub(super) fn compare_segmented(
    filter: impl Fn(u64) -> PointFilter,
    served: &[Obs],
    stored: &[Obs],
    restarts: &[(u64, u64)],
    interval_ms: u64,
    excluded: &mut u64,
) -> report::PointVerdict {
    let slack = report::local::CLOCK_SLACK_MS;
    let mut total = report::PointVerdict::default();
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
        let v = report::compare_point(&seg_filter, &served[ss..se], &stored[ts..te]);
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
    let v = report::compare_point(&filter(seg_at), &owned, &stored[ts..]);
    merge(&mut total, &v, first);
    total
}

/// Adds segment verdict `v` to `total`.
pub(super) fn merge(total: &mut report::PointVerdict, v: &report::PointVerdict, first: bool) {
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
