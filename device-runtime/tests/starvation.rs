//! A function that spends long stretches of CPU in every call without ever
//! trapping is held back by its CPU budget (M8), so a normal function
//! beside it keeps its throughput, and the hog is reported as throttled.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_precision_loss,
    reason = "test code: failing loudly is the point"
)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use device_runtime::memory::MemoryCapabilities;
use device_runtime::{
    BackoffConfig, CallError, CpuBudget, DeviceRuntime, FunctionState, RuntimeConfig, RuntimeEvent,
};

const TICK_MS: u64 = 100;
const TICKS: u64 = 200;
const BATCH: usize = 10;

fn budget() -> CpuBudget {
    CpuBudget {
        share_percent: 10,
        burst: Duration::from_millis(20),
        backoff: BackoffConfig {
            initial: Duration::from_millis(200),
            max: Duration::from_millis(1600),
            reset_after: Duration::from_mins(1),
        },
    }
}

#[derive(Default)]
struct Tally {
    hog_calls: u64,
    hog_held: u64,
    hog_busy: Duration,
    hog_longest: Duration,
    normal_in: u64,
    normal_out: u64,
}

/// One 100 ms tick of the edge's loop: a batch for each function, then
/// `tick`. Input of a held-back hog is what the edge would keep buffered.
fn step(rt: &mut DeviceRuntime, now: u64, t: &mut Tally) {
    let batch = series(BATCH, 1, |i| i as f64);
    let out = rt.process("normal", &batch, now).unwrap();
    t.normal_in += batch.len() as u64;
    t.normal_out += out.len() as u64;
    let started = Instant::now();
    match rt.process("hog", &batch, now) {
        Ok(_) => {
            let took = started.elapsed();
            t.hog_calls += 1;
            t.hog_busy += took;
            t.hog_longest = t.hog_longest.max(took);
        }
        Err(CallError::Unavailable { .. }) => t.hog_held += 1,
        Err(e) => panic!("the hog never traps: {e}"),
    }
    for (name, result) in rt.tick(now) {
        result.unwrap_or_else(|e| panic!("tick of {name}: {e}"));
    }
}

#[test]
fn a_cpu_hog_is_held_back_and_the_normal_function_keeps_its_throughput() {
    let caps = MemoryCapabilities::default();
    let config = RuntimeConfig {
        cpu: budget(),
        ..config()
    };
    let mut rt = DeviceRuntime::new(config, caps.capabilities()).unwrap();
    let normal = fixture("passthrough");
    rt.load(spec("normal", &normal, ""), &normal, 0).unwrap();
    let hog = fixture("busy_loop");
    let mut s = spec("hog", &hog, "");
    s.limits.epoch_deadline = Duration::from_secs(1);
    rt.load(s, &hog, 0).unwrap();

    let mut t = Tally::default();
    for i in 1..=TICKS {
        step(&mut rt, i * TICK_MS, &mut t);
    }

    // The normal function processed every batch it was given.
    assert_eq!(t.normal_in, TICKS * BATCH as u64);
    assert_eq!(t.normal_out, t.normal_in, "passthrough delivers all input");

    // The hog was held back most of the time: its calls used about its
    // share of the (virtual) time, plus its burst and one overdrawing call
    // per hold.
    let elapsed = Duration::from_millis(TICKS * TICK_MS);
    let b = budget();
    assert!(
        t.hog_held > t.hog_calls,
        "{} held, {} ran",
        t.hog_held,
        t.hog_calls
    );
    let bound = elapsed * b.share_percent / 100 + b.burst + t.hog_longest * 12;
    assert!(
        t.hog_busy <= bound,
        "hog used {:?}, bound {bound:?} ({} calls, longest {:?})",
        t.hog_busy,
        t.hog_calls,
        t.hog_longest
    );
    // With holds of 200, 400, 800, 1600, 1600 ... ms in 20 s it gets at most
    // a dozen or so calls, whatever the machine's speed.
    assert!(t.hog_calls <= 20, "{} hog calls", t.hog_calls);

    let events = rt.drain_events();
    let throttled = events
        .iter()
        .filter(|e| matches!(e, RuntimeEvent::Throttled { function, .. } if function == "hog"))
        .count() as u64;
    assert!(throttled >= 2, "{events:?}");
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, RuntimeEvent::Throttled { function, .. } if function == "normal")),
        "the normal function is never held back"
    );
    let status = rt.status();
    let hog = status.iter().find(|s| s.name == "hog").unwrap();
    assert_eq!(hog.throttled, throttled);
    assert_eq!(hog.restarts, 0, "held back, not restarted: its state stays");
    let normal = status.iter().find(|s| s.name == "normal").unwrap();
    assert_eq!(normal.state, FunctionState::Running);
    assert_eq!(normal.throttled, 0);
}

#[test]
fn a_held_back_function_reports_throttled_until_its_release() {
    let caps = MemoryCapabilities::default();
    let config = RuntimeConfig {
        cpu: budget(),
        ..config()
    };
    let mut rt = DeviceRuntime::new(config, caps.capabilities()).unwrap();
    let hog = fixture("busy_loop");
    rt.load(spec("hog", &hog, ""), &hog, 0).unwrap();
    let batch = series(BATCH, 1, |i| i as f64);
    // Its first calls spend the 20 ms burst, then it is held back.
    let mut now = 0;
    while rt.process("hog", &batch, now).is_ok() {
        now += 1;
        assert!(
            now < 100,
            "a 10^8-iteration call must overdraw a 20 ms burst"
        );
    }
    let status = rt.status();
    let FunctionState::Throttled { until_ms, strikes } = status[0].state else {
        panic!("{:?}", status[0].state);
    };
    assert_eq!((until_ms, strikes), (now - 1 + 200, 1));
    let err = rt.process("hog", &batch, until_ms - 1).unwrap_err();
    assert!(
        matches!(err, CallError::Unavailable { until_ms: u, .. } if u == until_ms),
        "{err:?}"
    );
    assert!(rt.tick(until_ms - 1).is_empty(), "tick skips it too");
    // Released when due; it runs again (and, still in debt, is held again).
    assert!(rt.process("hog", &batch, until_ms).is_ok());
    assert!(matches!(
        rt.status()[0].state,
        FunctionState::Throttled { strikes: 2, .. }
    ));
}
