//! Readings from `/proc`: peak resident memory of hub, broker and simulator
//! ([`MemWatch`]) and the load average.

use std::sync::atomic::{AtomicU64, Ordering};

use super::hub::{self, Memory};

/// Samples resident memory of the hub, the external broker and this
/// process, and the load average.
#[derive(Debug, Default)]
pub(super) struct MemWatch {
    pub(super) hub_pid: Option<u32>,
    pub(super) broker_pid: Option<u32>,
    pub(super) hub_max: AtomicU64,
    pub(super) broker_max: AtomicU64,
    pub(super) sim_max: AtomicU64,
    /// Highest 1-minute load average, `f64` bits.
    pub(super) load_max: AtomicU64,
}

/// What one [`MemWatch::sample`] read (0: not measured).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct MemSample {
    pub(super) hub_rss: u64,
    pub(super) broker_rss: u64,
}

impl MemWatch {
    pub(super) fn sample(&self) -> MemSample {
        let peak = |m: Memory| m.rss_bytes.max(m.hwm_bytes);
        if let Some(m) = hub::memory(std::process::id()) {
            self.sim_max.fetch_max(peak(m), Ordering::Relaxed);
        }
        let mut out = MemSample::default();
        if let Some(m) = self.hub_pid.and_then(hub::memory) {
            self.hub_max.fetch_max(peak(m), Ordering::Relaxed);
            out.hub_rss = m.rss_bytes;
        }
        if let Some(m) = self.broker_pid.and_then(hub::memory) {
            self.broker_max.fetch_max(peak(m), Ordering::Relaxed);
            out.broker_rss = m.rss_bytes;
        }
        if let Some([one, ..]) = load_average() {
            // Non-negative floats order like their bits.
            self.load_max.fetch_max(one.to_bits(), Ordering::Relaxed);
        }
        out
    }
}

/// `/proc/loadavg`'s 1, 5 and 15 minute figures (`None` off Linux).
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    parse_loadavg(&text)
}

fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut it = text.split_whitespace().map(str::parse::<f64>);
    let mut next = || it.next()?.ok().filter(|x| *x >= 0.0);
    Some([next()?, next()?, next()?])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    #[test]
    fn load_average_is_parsed_from_proc() {
        assert_eq!(
            parse_loadavg("0.23 1.27 1.72 1/79 11951\n"),
            Some([0.23, 1.27, 1.72])
        );
        assert_eq!(parse_loadavg("0.2 x 1"), None);
        assert_eq!(parse_loadavg(""), None);
    }
}
