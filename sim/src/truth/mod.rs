//! Ground truth: independent reference implementations of the reference
//! filters and the analysis that compares what the devices served with what
//! the hub stored.
//!
//! This module holds the inputs ([`Obs`]), the guests' config parsing
//! ([`Filter`]) and the reference filters ([`reference()`],
//! [`reference_detailed`]); `check` (re-exported here) holds every
//! comparison type and algorithm once: the matching of stored samples to
//! served ones ([`compare_point`] → [`PointVerdict`]), the reconstruction
//! error, sequence numbers ([`seq_analysis`] → [`SeqVerdict`]), and the
//! runner's per-point check ([`check_point`] → [`PointCheck`], with the
//! deployed [`PointFilter`] and [`local`]'s read-anchored reconstruction).
//!
//! Nothing here uses code of the system under test: the filters are
//! re-implemented from the behaviour documented in the C guests
//! (`device-runtime/guests/{deadband,swinging-door}`), including their
//! floating-point operation order, so that on the same input they emit
//! exactly the same samples (checked by `sim/tests/truth_vs_guest.rs`, which
//! runs the committed WASM guests).
//!
//! # Inputs
//! - `served`: the observations of one point, in the order the device served
//!   them (timestamps non-decreasing), as the simulated device recorded them.
//!   Only values the agent actually read belong here: while a device is down
//!   nothing is served, so nothing is "lost". The caller passes served values
//!   only; the function sees exactly one input sample per served observation.
//! - `stored`: the samples of that point the hub stored, in any order
//!   (usually hub order), duplicates included.
//!
//! `served` must be the function's input sequence: one observation per
//! sample the agent produced. Every simulated device logs exactly that: the
//! MQTT devices every message the broker accepted (a subscriber receives
//! each), the Modbus servers every read that covered the point (repeats
//! included), the OPC UA servers every data change (a subscription delivers
//! changes, one per device tick).
//!
//! # Timing model of the host
//! The edge node calls `process` with each sample and `tick(now)` every
//! [`TICK_INTERVAL`](edge_node::functions::TICK_INTERVAL) (100 ms). A tick
//! emits a held-back sample once it is due (deadband heartbeat: the newest
//! dropped sample when `now - last_sent_ts >= max_interval_ms`; swinging
//! door: the held sample when `now - archived_ts >= max_time_ms`). The
//! reference assumes ticks are continuous: before input `i` it lets the due
//! tick fire when `ts_i - last_ts > interval` (strictly). When `ts_i - last_ts`
//! is within about one tick period plus the read latency of the interval the
//! real host may go either way (a *heartbeat tie*). Scenarios avoid ties by
//! choosing heartbeat / max-time intervals that are not close to a multiple
//! of the sampling interval, e.g. `max_interval_ms = (k + 0.5) ·
//! sampling_ms` with `sampling_ms >= 500`.
//!
//! After the last input a filter may still hold a sample back (deadband with a
//! heartbeat, swinging door). Whether it reaches the hub depends on how long
//! the run continued (a tick) or whether the agent stopped cleanly (swinging
//! door's `flush`). The reference marks it `optional`: stored, it is matched
//! like any other; missing, it is not lost.
//!
//! # Matching stored samples to served ones
//! A stored sample is identified with a served observation by *ordinal
//! position*: the candidates are the served observations whose timestamp is
//! within [`MatchOptions::skew_ms`] of the stored one (the device's served
//! timestamp and the agent's sample timestamp differ by the read latency)
//! and whose value (within [`MatchOptions::value_tolerance`]) and quality
//! are equal. Among the candidates the nearest in time that the reference
//! emits and that is not matched yet wins; else one already matched (a
//! duplicate); else the stored sample is unexpected. Served values change
//! at most once per sampling interval, so with `skew_ms` below half the
//! sampling interval there is at most one candidate per distinct value.
//!
//! Stored samples of bad quality (`>= 0x80`) that match no served
//! observation are the agent's own outage markers (a failed read reported
//! as a bad sample). They are not served values, but the filter saw them, so
//! they are merged into the reference input at their timestamp and counted
//! in [`PointVerdict::bad_markers`], not as unexpected.
//!
//! # Known limit
//! Swinging door decides on slopes, so it is sensitive to the exact
//! timestamps. The reference runs on served timestamps; if the agent stamps
//! samples with its own read time (Modbus) instead of a device timestamp
//! (OPC UA source timestamp, MQTT payload `ts_ms`), a decision that lies
//! within the latency jitter of the door's edge may flip, which shows as a
//! lost plus an unexpected sample. Deadband decisions only depend on time
//! through the heartbeat (see ties above). Scenarios therefore scope a
//! swinging door to device-timestamped protocols
//! (`functions[].protocols` in [`crate::scenario`]); factory-10k, chaos and
//! smoke do.
//!
//! # Reconstruction
//! [`reconstruct_max_error`] rebuilds the signal from the stored samples
//! that match served observations: step-hold (last stored value at or before
//! the served sample) for deadband and passthrough, linear interpolation
//! between consecutive stored samples for swinging door, on the served time
//! axis. It compares at every served observation with a finite value between
//! the first and the last matched stored sample (before the first nothing can
//! be reconstructed; after the last, a swinging door's held-back tail is not
//! known yet: missing samples there are accounted by `lost`).

mod check;

pub use check::{
    MatchOptions, PointCheck, PointFilter, PointVerdict, SeqVerdict, check_point, compare_point,
    compare_point_with, local, reconstruct_max_error, seq_analysis,
};

/// One observation of one point: what a device served or the hub stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Obs {
    /// Timestamp, ms since the Unix epoch (or the simulation epoch).
    pub ts_ms: u64,
    /// Engineering value.
    pub value: f64,
    /// Quality byte (`0` good, `>= 0x80` bad), as in [`protocols::Quality`].
    pub quality: u8,
}

impl Obs {
    /// A good-quality observation.
    pub fn good(ts_ms: u64, value: f64) -> Self {
        Self {
            ts_ms,
            value,
            quality: 0,
        }
    }
}

/// Why a filter could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TruthError {
    /// The guest has no reference implementation.
    #[error("no reference implementation for guest `{0}` (known: deadband, swinging-door)")]
    UnknownGuest(String),
    /// A config field is missing or invalid.
    #[error("guest `{guest}` config field `{field}`: {reason}")]
    Config {
        /// Guest name.
        guest: String,
        /// The offending field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Deadband settings, as the `deadband` guest resolves its config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Deadband {
    /// Absolute deadband in engineering units (percent mode already resolved:
    /// `percent / 100 · (range_high - range_low)`).
    pub deadband: f64,
    /// Heartbeat interval, `0` = off.
    pub max_interval_ms: u64,
}

/// Swinging-door settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SwingingDoor {
    /// Compression deviation in engineering units.
    pub deviation: f64,
    /// Maximum time between archived samples, `0` = off.
    pub max_time_ms: u64,
}

/// A filter whose output the reference predicts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Filter {
    /// No function: every sample goes upstream.
    Passthrough,
    /// The `deadband` guest.
    Deadband(Deadband),
    /// The `swinging-door` guest.
    SwingingDoor(SwingingDoor),
}

impl Filter {
    /// The filter for guest `name` (`deadband`, `swinging-door`; `none` or
    /// `passthrough` for no function) with the config a
    /// [`protocols::FunctionSpec`] carries. The JSON is turned into the
    /// guest's `key=value;...` text the way the edge node does (an object of
    /// scalars as pairs in key order, a string verbatim, `null` empty) and
    /// parsed with the guest's rules.
    pub fn from_guest(name: &str, config: &serde_json::Value) -> Result<Self, TruthError> {
        Self::from_guest_text(name, &config_text(config))
    }

    /// As [`from_guest`](Self::from_guest), from the guest's config text.
    pub fn from_guest_text(name: &str, text: &str) -> Result<Self, TruthError> {
        match name {
            "none" | "passthrough" => Ok(Self::Passthrough),
            "deadband" => parse_deadband(text).map(Self::Deadband),
            "swinging-door" | "swinging_door" => parse_swinging_door(text).map(Self::SwingingDoor),
            other => Err(TruthError::UnknownGuest(other.to_owned())),
        }
    }

    /// The error bound the filter promises for its reconstruction: the
    /// deadband, the swinging-door deviation, `0` for passthrough.
    pub fn deviation(&self) -> f64 {
        match self {
            Self::Passthrough => 0.0,
            Self::Deadband(d) => d.deadband,
            Self::SwingingDoor(s) => s.deviation,
        }
    }

    /// Whether reconstruction interpolates linearly (swinging door) rather
    /// than holding the last value.
    pub fn is_linear(&self) -> bool {
        matches!(self, Self::SwingingDoor(_))
    }
}

/// Renders a `FunctionSpec` config as guest text (same rules as the edge
/// node, written independently).
fn config_text(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Object(m) if m.values().all(|v| !v.is_object() && !v.is_array()) => {
            let mut out = String::new();
            for (k, v) in m {
                if !out.is_empty() {
                    out.push(';');
                }
                out.push_str(k);
                out.push('=');
                match v {
                    Value::String(s) => out.push_str(s),
                    other => out.push_str(&other.to_string()),
                }
            }
            out
        }
        other => other.to_string(),
    }
}

/// `key=value` pairs with the guests' rules: separators `;`, `,`, newlines;
/// spaces and tabs trimmed; empty items and items starting with `#` skipped;
/// a key without `=` has an empty value.
fn pairs(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.split([';', ',', '\n', '\r'])
        .map(|item| item.trim_matches([' ', '\t']))
        .filter(|item| !item.is_empty() && !item.starts_with('#'))
        .map(|item| match item.split_once('=') {
            Some((k, v)) => (k.trim_matches([' ', '\t']), v.trim_matches([' ', '\t'])),
            None => (item, ""),
        })
}

fn config_err(guest: &str, field: &str, reason: impl Into<String>) -> TruthError {
    TruthError::Config {
        guest: guest.to_owned(),
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// A finite number, as the guests' `parse_f64` (strtod over the whole text,
/// at most 63 bytes, magnitude at most 1e308).
fn number(guest: &str, key: &str, v: &str) -> Result<f64, TruthError> {
    let bad = || config_err(guest, key, format!("`{v}` is not a number"));
    if v.is_empty() || v.len() >= 64 {
        return Err(bad());
    }
    let n: f64 = v.parse().map_err(|_| bad())?;
    if n.is_nan() || !(-1e308..=1e308).contains(&n) {
        return Err(bad());
    }
    Ok(n)
}

/// A non-negative interval in ms, truncated like the guests' `(uint64_t)`.
fn interval(guest: &str, key: &str, v: &str) -> Result<u64, TruthError> {
    let n = number(guest, key, v)?;
    if n < 0.0 {
        return Err(config_err(guest, key, "must be >= 0"));
    }
    Ok(n as u64)
}

fn parse_deadband(text: &str) -> Result<Deadband, TruthError> {
    const G: &str = "deadband";
    let mut percent_mode = false;
    let (mut db, mut pct, mut lo, mut hi) = (None, None, 0.0, 0.0);
    let mut max_interval_ms = 0;
    for (k, v) in pairs(text) {
        match k {
            "mode" => match v {
                "percent" => percent_mode = true,
                "absolute" => percent_mode = false,
                _ => return Err(config_err(G, k, "must be absolute or percent")),
            },
            "deadband" => db = Some(number(G, k, v)?),
            "percent" => pct = Some(number(G, k, v)?),
            "range_low" => lo = number(G, k, v)?,
            "range_high" => hi = number(G, k, v)?,
            "max_interval_ms" => max_interval_ms = interval(G, k, v)?,
            _ => return Err(config_err(G, k, "unknown config key")),
        }
    }
    let deadband = if percent_mode {
        let pct = pct
            .filter(|p| (0.0..=100.0).contains(p))
            .ok_or_else(|| config_err(G, "percent", "required in percent mode, 0..100"))?;
        if hi <= lo {
            return Err(config_err(G, "range_high", "must exceed range_low"));
        }
        pct / 100.0 * (hi - lo)
    } else {
        db.filter(|d| *d >= 0.0)
            .ok_or_else(|| config_err(G, "deadband", "required, >= 0"))?
    };
    Ok(Deadband {
        deadband,
        max_interval_ms,
    })
}

fn parse_swinging_door(text: &str) -> Result<SwingingDoor, TruthError> {
    const G: &str = "swinging-door";
    let mut deviation = None;
    let mut max_time_ms = 0;
    for (k, v) in pairs(text) {
        match k {
            "deviation" => {
                let d = number(G, k, v)?;
                if d < 0.0 {
                    return Err(config_err(G, k, "must be >= 0"));
                }
                deviation = Some(d);
            }
            "max_time_ms" => max_time_ms = interval(G, k, v)?,
            _ => return Err(config_err(G, k, "unknown config key")),
        }
    }
    let deviation = deviation.ok_or_else(|| config_err(G, "deviation", "required"))?;
    Ok(SwingingDoor {
        deviation,
        max_time_ms,
    })
}

// ------------------------------------------------------------------ reference

/// One sample the reference says reaches the hub.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RefSample {
    /// Position of the sample in the reference input.
    pub index: usize,
    /// The sample.
    pub obs: Obs,
    /// Held back at the end of the input: reaches the hub only if a later
    /// tick or a flush released it (see the module doc).
    pub optional: bool,
}

/// What should reach the hub for one point: the samples the filter emits
/// for `served`, in emission order, without a trailing held-back sample
/// (see [`reference_detailed`]).
pub fn reference(filter: &Filter, served: &[Obs]) -> Vec<Obs> {
    reference_detailed(filter, served)
        .into_iter()
        .filter(|r| !r.optional)
        .map(|r| r.obs)
        .collect()
}

/// The filter's output for `input` with input positions, including the
/// sample still held back at the end (marked `optional`).
pub fn reference_detailed(filter: &Filter, input: &[Obs]) -> Vec<RefSample> {
    match filter {
        Filter::Passthrough => input
            .iter()
            .enumerate()
            .map(|(index, &obs)| RefSample {
                index,
                obs,
                optional: false,
            })
            .collect(),
        Filter::Deadband(d) => deadband_reference(*d, input),
        Filter::SwingingDoor(s) => swinging_door_reference(*s, input),
    }
}

fn emit(out: &mut Vec<RefSample>, index: usize, obs: Obs) {
    out.push(RefSample {
        index,
        obs,
        optional: false,
    });
}

fn deadband_reference(cfg: Deadband, input: &[Obs]) -> Vec<RefSample> {
    let mi = cfg.max_interval_ms;
    let mut out = Vec::new();
    let mut sent: Option<Obs> = None;
    let mut held: Option<(usize, Obs)> = None;
    for (i, &o) in input.iter().enumerate() {
        // The heartbeat tick that fired since the previous input.
        if mi > 0
            && let (Some(s), Some((hi, h))) = (sent, held)
            && o.ts_ms >= s.ts_ms
            && o.ts_ms - s.ts_ms > mi
        {
            emit(&mut out, hi, h);
            sent = Some(h);
            // `held` is reassigned below in both branches.
        }
        let passes = match sent {
            None => true,
            Some(s) if o.quality != s.quality => true,
            Some(s) if !o.value.is_finite() || !s.value.is_finite() => {
                // C: !(v == sent_v)
                #[allow(clippy::float_cmp, reason = "exact emulation of the guest")]
                let same = o.value == s.value;
                !same
            }
            Some(s) if (o.value - s.value).abs() > cfg.deadband => true,
            Some(s) => mi > 0 && o.ts_ms >= s.ts_ms && o.ts_ms - s.ts_ms >= mi,
        };
        if passes {
            emit(&mut out, i, o);
            sent = Some(o);
            held = None;
        } else {
            held = Some((i, o));
        }
    }
    if mi > 0
        && let Some((index, obs)) = held
    {
        out.push(RefSample {
            index,
            obs,
            optional: true,
        });
    }
    out
}

/// Per-point swinging-door state (the guest's `point_t`).
struct Door {
    a: Option<Obs>,
    h: Option<(usize, Obs)>,
    lo: f64,
    hi: f64,
}

impl Door {
    fn archive(&mut self, out: &mut Vec<RefSample>, index: usize, o: Obs) {
        emit(out, index, o);
        self.a = Some(o);
        self.h = None;
    }

    fn archive_held(&mut self, out: &mut Vec<RefSample>) {
        if let Some((i, h)) = self.h {
            self.archive(out, i, h);
        }
    }

    fn hold_first(&mut self, dev: f64, a: Obs, index: usize, o: Obs) {
        let dt = (o.ts_ms - a.ts_ms) as f64;
        self.lo = (o.value - dev - a.value) / dt;
        self.hi = (o.value + dev - a.value) / dt;
        self.h = Some((index, o));
    }

    fn step(&mut self, cfg: SwingingDoor, out: &mut Vec<RefSample>, index: usize, o: Obs) {
        let dev = cfg.deviation;
        let mt = cfg.max_time_ms;
        let Some(a) = self.a else {
            self.archive(out, index, o);
            return;
        };
        let last = self.h.map_or(a, |(_, h)| h);
        if o.quality != last.quality
            || !o.value.is_finite()
            || !a.value.is_finite()
            || o.ts_ms <= last.ts_ms
        {
            self.archive_held(out);
            self.archive(out, index, o);
            return;
        }
        if mt > 0 && self.h.is_some() && o.ts_ms - a.ts_ms > mt {
            self.archive_held(out);
        }
        let a = self.a.unwrap_or(a);
        let Some(_) = self.h else {
            if mt > 0 && o.ts_ms - a.ts_ms > mt {
                self.archive(out, index, o);
            } else {
                self.hold_first(dev, a, index, o);
            }
            return;
        };
        let dt = (o.ts_ms - a.ts_ms) as f64;
        let s = (o.value - a.value) / dt;
        let mut lo = (o.value - dev - a.value) / dt;
        let mut hi = (o.value + dev - a.value) / dt;
        if lo < self.lo {
            lo = self.lo;
        }
        if hi > self.hi {
            hi = self.hi;
        }
        if lo <= s && s <= hi {
            self.lo = lo;
            self.hi = hi;
            self.h = Some((index, o));
        } else {
            self.archive_held(out);
            let a = self.a.unwrap_or(a);
            self.hold_first(dev, a, index, o);
        }
    }
}

fn swinging_door_reference(cfg: SwingingDoor, input: &[Obs]) -> Vec<RefSample> {
    let mut out = Vec::new();
    let mut door = Door {
        a: None,
        h: None,
        lo: 0.0,
        hi: 0.0,
    };
    for (i, &o) in input.iter().enumerate() {
        // The max-time tick that fired since the previous input.
        if cfg.max_time_ms > 0
            && let (Some(a), Some(_)) = (door.a, door.h)
            && o.ts_ms >= a.ts_ms
            && o.ts_ms - a.ts_ms > cfg.max_time_ms
        {
            door.archive_held(&mut out);
        }
        door.step(cfg, &mut out, i, o);
    }
    if let Some((index, obs)) = door.h {
        out.push(RefSample {
            index,
            obs,
            optional: true,
        });
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::float_cmp, reason = "test code")]
mod tests {
    use super::*;
    use serde_json::json;

    fn series(values: &[f64]) -> Vec<Obs> {
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| Obs::good(1_000 + i as u64 * 1000, v))
            .collect()
    }

    fn db(deadband: f64) -> Filter {
        Filter::Deadband(Deadband {
            deadband,
            max_interval_ms: 0,
        })
    }

    #[test]
    fn config_parses_like_the_guests() {
        let f = Filter::from_guest(
            "deadband",
            &json!({"deadband": 0.5, "max_interval_ms": 1500}),
        )
        .unwrap();
        assert_eq!(
            f,
            Filter::Deadband(Deadband {
                deadband: 0.5,
                max_interval_ms: 1500
            })
        );
        let f = Filter::from_guest(
            "deadband",
            &json!({"mode": "percent", "percent": 2, "range_low": -50, "range_high": 150}),
        )
        .unwrap();
        assert_eq!(f.deviation(), 2.0 / 100.0 * 200.0);
        let f = Filter::from_guest(
            "swinging-door",
            &json!("deviation = 0.25, # c\nmax_time_ms=9"),
        )
        .unwrap();
        assert_eq!(
            f,
            Filter::SwingingDoor(SwingingDoor {
                deviation: 0.25,
                max_time_ms: 9
            })
        );
        assert_eq!(
            Filter::from_guest("none", &serde_json::Value::Null).unwrap(),
            Filter::Passthrough
        );
    }

    #[test]
    fn config_errors_name_the_field() {
        let field = |name: &str, cfg: serde_json::Value| match Filter::from_guest(name, &cfg) {
            Err(TruthError::Config { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field("deadband", json!({})), "deadband");
        assert_eq!(field("deadband", json!({"deadband": -1})), "deadband");
        assert_eq!(field("deadband", json!({"deadband": "x"})), "deadband");
        assert_eq!(
            field("deadband", json!({"deadband": 1, "bogus": 1})),
            "bogus"
        );
        assert_eq!(field("deadband", json!({"mode": "log"})), "mode");
        assert_eq!(
            field("deadband", json!({"mode": "percent", "percent": 101})),
            "percent"
        );
        assert_eq!(
            field(
                "deadband",
                json!({"mode": "percent", "percent": 1, "range_low": 5, "range_high": 5})
            ),
            "range_high"
        );
        assert_eq!(
            field("deadband", json!({"deadband": 1, "max_interval_ms": -5})),
            "max_interval_ms"
        );
        assert_eq!(field("swinging-door", json!({})), "deviation");
        assert_eq!(
            field("swinging-door", json!({"deviation": -0.1})),
            "deviation"
        );
        assert_eq!(
            field(
                "swinging-door",
                json!({"deviation": 1, "max_time_ms": "soon"})
            ),
            "max_time_ms"
        );
        assert!(matches!(
            Filter::from_guest("anomaly", &json!({})),
            Err(TruthError::UnknownGuest(_))
        ));
        let msg = Filter::from_guest("deadband", &json!({"deadband": -1}))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("`deadband`"), "{msg}");
    }

    #[test]
    fn deadband_reference_basics() {
        let s = series(&[0.0, 0.4, 0.6, 0.7, 2.0, 2.0]);
        let out: Vec<f64> = reference(&db(0.5), &s).iter().map(|o| o.value).collect();
        assert_eq!(out, vec![0.0, 0.6, 2.0]);
        // Quality change always passes.
        let mut s = series(&[1.0, 1.0, 1.0]);
        s[1].quality = 0x80;
        assert_eq!(reference(&db(10.0), &s).len(), 3);
    }

    #[test]
    fn deadband_heartbeat_tick_releases_the_held_sample() {
        let f = Filter::Deadband(Deadband {
            deadband: 10.0,
            max_interval_ms: 2500,
        });
        // 1 s sampling: sent at t=1000; a tick after 3500 releases the sample
        // held from t=3000, which becomes the new reference; one after 5500
        // releases t=5000; t=7000 is still held at the end.
        let s = series(&[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]);
        let d = reference_detailed(&f, &s);
        let idx: Vec<(usize, bool)> = d.iter().map(|r| (r.index, r.optional)).collect();
        assert_eq!(idx, vec![(0, false), (2, false), (4, false), (6, true)]);
        assert_eq!(reference(&f, &s).len(), 3);
    }

    #[test]
    fn swinging_door_keeps_lines_within_deviation() {
        let f = Filter::SwingingDoor(SwingingDoor {
            deviation: 0.1,
            max_time_ms: 0,
        });
        // A straight line collapses to its ends; a kink is archived.
        let s = series(&[0.0, 1.0, 2.0, 3.0, 4.0, 3.0, 2.0]);
        let d = reference_detailed(&f, &s);
        let idx: Vec<(usize, bool)> = d.iter().map(|r| (r.index, r.optional)).collect();
        assert_eq!(idx, vec![(0, false), (4, false), (6, true)]);
        let stored: Vec<Obs> = d.iter().map(|r| r.obs).collect();
        assert_eq!(reconstruct_max_error(&f, &s, &stored), 0.0);
    }

    #[test]
    fn compare_counts_lost_duplicates_and_unexpected() {
        let f = db(0.5);
        let s = series(&[0.0, 1.0, 2.0, 2.1, 3.0]);
        let exp = reference(&f, &s);
        assert_eq!(exp.len(), 4);
        // Agent latency: stored timestamps lag served ones by 3 ms.
        let lag = |o: &Obs| Obs {
            ts_ms: o.ts_ms + 3,
            ..*o
        };
        let perfect: Vec<Obs> = exp.iter().map(lag).collect();
        let v = compare_point(&f, &s, &perfect);
        assert_eq!(
            (v.expected, v.stored, v.lost, v.duplicates, v.unexpected),
            (4, 4, 0, 0, 0)
        );
        assert_eq!(v.max_abs_error, 2.1 - 2.0);

        // Drop one, repeat one, add one the filter would not send.
        let mut bad: Vec<Obs> = perfect.clone();
        bad.remove(1);
        bad.push(perfect[2]);
        bad.push(lag(&s[3]));
        let v = compare_point(&f, &s, &bad);
        assert_eq!(v.lost, 1, "{v:?}");
        assert_eq!(v.duplicates, 1, "{v:?}");
        assert_eq!(v.unexpected, 1, "{v:?}");
        // Without sample 1 (value 1.0) the hold of 0.0 is off by 1.0 there.
        assert_eq!(v.max_abs_error, 1.0);

        // A value nobody served is unexpected.
        let v = compare_point(&f, &s, &[Obs::good(1_001, 7.0)]);
        assert_eq!(v.unexpected, 1);
        assert_eq!(v.lost, 4);
    }

    #[test]
    fn agent_outage_markers_are_not_unexpected() {
        let f = db(0.5);
        // Served 0.0, then the device went down (agent stored a bad marker),
        // then 0.1 again: it passes because the quality changed back.
        let s = vec![Obs::good(1_000, 0.0), Obs::good(9_000, 0.1)];
        let marker = Obs {
            ts_ms: 5_000,
            value: 0.0,
            quality: 0x84,
        };
        let stored = vec![s[0], marker, s[1]];
        let v = compare_point(&f, &s, &stored);
        assert_eq!(
            (
                v.expected,
                v.lost,
                v.duplicates,
                v.unexpected,
                v.bad_markers
            ),
            (2, 0, 0, 0, 1),
            "{v:?}"
        );
        // Without the marker 0.1 would have been within the deadband.
        assert_eq!(reference(&f, &s).len(), 1);
    }

    #[test]
    fn trailing_held_sample_is_optional() {
        let f = Filter::SwingingDoor(SwingingDoor {
            deviation: 0.1,
            max_time_ms: 0,
        });
        let s = series(&[0.0, 1.0, 2.0]);
        let v = compare_point(&f, &s, &s[..1]);
        assert_eq!((v.expected, v.lost), (1, 0));
        let v = compare_point(&f, &s, &[s[0], s[2]]);
        assert_eq!((v.expected, v.lost, v.unexpected), (2, 0, 0));
    }

    #[test]
    fn seq_analysis_counts_gaps_missing_and_duplicates() {
        assert_eq!(
            seq_analysis(&[1, 2, 3]),
            SeqVerdict {
                count: 3,
                ..SeqVerdict::default()
            }
        );
        let v = seq_analysis(&[3, 4, 4, 7, 6, 10]);
        assert_eq!(
            v,
            SeqVerdict {
                count: 6,
                gaps: 3,
                missing: 2 + 1 + 2,
                duplicates: 1,
                out_of_order: 1,
            }
        );
        assert_eq!(seq_analysis(&[]), SeqVerdict::default());
    }
}
