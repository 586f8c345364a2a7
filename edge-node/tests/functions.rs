//! WASM device functions end to end: a real hub (embedded broker, artifact
//! store, REST API) and a real edge node in one process. The committed
//! `deadband` guest is uploaded with `PUT /v1/artifacts`, named by digest in
//! desired state, downloaded and verified by the edge, and filters a
//! synthetic device's samples before they reach the outbox.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::path::PathBuf;
use std::time::Duration;

use cloud_hub::api::{NodeView, SamplePage, SampleQuery};
use cloud_hub::artifacts::ArtifactInfo;
use edge_node::Clock;
use edgefleet_testkit::{EdgeHarness, HubHarness, eventually};
use protocols::{Event, EventKind, FunctionState, FunctionStatus};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(90);

fn guest(name: &str, file: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../device-runtime/guests")
        .join(name)
        .join(file);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Points 0 and 1 feed function `f`; point 2 is not a function input and
/// goes to the raw stream.
fn desired(revision: u64, module: &ArtifactInfo, config: &str) -> serde_json::Value {
    let pts: Vec<_> = (0..3)
        .map(|i| {
            json!({"index": i, "name": format!("p{i}"),
                   "address": {"kind": "synthetic", "signal": {"shape": "sine", "amplitude": 10.0, "period_s": 10.0}}})
        })
        .collect();
    json!({
        "node": "n1",
        "revision": revision,
        "devices": [{"id": "gen", "protocol": {"kind": "synthetic"},
                     "groups": [{"name": "fast", "interval_ms": 20, "points": pts}]}],
        "functions": [{
            "name": "f",
            "module_sha256": module.sha256,
            "module_size": module.size,
            "config": config,
            "inputs": [0, 1],
            "outputs": ["filtered"],
        }],
        "config": {"batch_max_samples": 100, "batch_max_age_ms": 200, "report_interval_ms": 200, "raw_stream": "raw"}
    })
}

struct Rig {
    hub: HubHarness,
    edge: EdgeHarness,
    dir: tempfile::TempDir,
}

impl Rig {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A rig whose edge config `edit` changed first.
    async fn start_with(edit: impl FnOnce(&mut edge_node::EdgeConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let hub = HubHarness::start(HubHarness::config(&dir.path().join("hub")))
            .await
            .unwrap();
        let mut cfg = hub.edge_config("n1", &dir.path().join("edge"));
        edit(&mut cfg);
        let edge = EdgeHarness::start(cfg, Clock::system()).await.unwrap();
        Self { hub, edge, dir }
    }

    async fn upload(&self, bytes: Vec<u8>) -> ArtifactInfo {
        self.hub.client.put_artifact(bytes).await.unwrap()
    }

    async fn put_desired(&self, body: serde_json::Value) {
        self.hub.client.put_desired_json("n1", &body).await.unwrap();
    }

    async fn node(&self) -> Option<NodeView> {
        self.hub.client.node("n1").await.ok().flatten()
    }

    async fn function(&self) -> Option<(u64, FunctionStatus, NodeView)> {
        let n = self.node().await?;
        let r = n.reported.as_ref()?;
        let f = r.functions.get("f")?.clone();
        Some((r.applied_revision, f, n))
    }

    async fn samples(&self, stream: &str) -> SamplePage {
        let q = SampleQuery {
            limit: Some(SampleQuery::MAX_LIMIT),
            ..SampleQuery::default()
        };
        self.hub.client.samples("n1", stream, &q).await.unwrap()
    }

    async fn events(&self) -> Vec<Event> {
        self.hub.client.events("n1").await.unwrap()
    }

    async fn stop(self) -> tempfile::TempDir {
        tokio::time::timeout(Duration::from_secs(20), self.edge.stop())
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.hub.stop())
            .await
            .unwrap()
            .unwrap();
        self.dir
    }
}

/// A WAT fixture of `tests/fixtures`, componentized against the
/// `device-function` world.
fn fixture(name: &str) -> Vec<u8> {
    fixture_in("tests/fixtures", name)
}

/// A WAT fixture of `dir` (relative to this crate), componentized.
fn fixture_in(dir: &str, name: &str) -> Vec<u8> {
    use wit_component::{ComponentEncoder, StringEncoding, embed_component_metadata};
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let wat = std::fs::read_to_string(root.join(dir).join(format!("{name}.wat"))).unwrap();
    let mut resolve = wit_parser::Resolve::default();
    let (pkg, _) = resolve
        .push_dir(root.join("../device-runtime/wit"))
        .unwrap();
    let world = resolve
        .select_world(&[pkg], Some("device-function"))
        .unwrap();
    let mut module = wat::parse_str(&wat).unwrap();
    embed_component_metadata(&mut module, &resolve, world, StringEncoding::UTF8).unwrap();
    ComponentEncoder::default()
        .module(&module)
        .unwrap()
        .validate(true)
        .encode()
        .unwrap()
}

fn counter(f: &FunctionStatus, name: &str) -> u64 {
    f.counters.get(name).copied().unwrap_or(0)
}

fn assert_gap_free(page: &SamplePage, stream: &str) {
    for (i, s) in page.samples.iter().enumerate() {
        assert_eq!(
            s.seq,
            i as u64 + 1,
            "{stream}: gap or duplicate at position {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadband_filters_and_hot_swaps_without_gaps() {
    let rig = Rig::start().await;
    let module = rig.upload(guest("deadband", "deadband.wasm")).await;
    rig.put_desired(desired(1, &module, "deadband=2")).await;

    // The function runs the uploaded module and has seen a good amount of input.
    let (_, f, _) = eventually("deadband running with input", DEADLINE, || async {
        rig.function().await.filter(|(rev, f, _)| {
            *rev == 1 && f.state == FunctionState::Running && counter(f, "samples_in") >= 600
        })
    })
    .await;
    assert_eq!(f.module_sha256, module.sha256);
    assert_eq!(counter(&f, "errors"), 0, "{f:?}");

    // What the hub stored on `filtered` is the function's output: far fewer
    // samples than went in, only from the function's input points.
    let (f, filtered) = eventually(
        "hub has every filtered sample the edge emitted",
        DEADLINE,
        || async {
            let (_, f, _) = rig.function().await?;
            let page = rig.samples("filtered").await;
            (page.samples.len() as u64 >= counter(&f, "samples_out") && !page.samples.is_empty())
                .then_some((f, page))
        },
    )
    .await;
    let (inp, out) = (counter(&f, "samples_in"), counter(&f, "samples_out"));
    assert!(out * 4 < inp, "deadband passed {out} of {inp} samples");
    assert!(
        filtered
            .samples
            .iter()
            .all(|s| s.point == 0 || s.point == 1),
        "only function inputs on the filtered stream"
    );
    assert_gap_free(&filtered, "filtered");
    let raw = rig.samples("raw").await;
    assert!(!raw.samples.is_empty());
    assert!(
        raw.samples.iter().all(|s| s.point == 2),
        "function inputs must not also go raw"
    );
    let n = rig.node().await.unwrap();
    let counters = &n.reported.unwrap().counters;
    assert_eq!(counters.get("artifacts_fetched"), Some(&1), "{counters:?}");
    assert!(counters["samples_in"] >= inp, "{counters:?}");

    // Hot swap: a new revision with a different config, same module.
    let before = rig.samples("filtered").await.samples.len();
    rig.put_desired(desired(2, &module, "deadband=0.5")).await;
    let (_, f2, _) = eventually(
        "revision 2 applied and the function running",
        DEADLINE,
        || async {
            rig.function().await.filter(|(rev, f, _)| {
                *rev == 2
                    && f.state == FunctionState::Running
                    && counter(f, "samples_in") > inp + 1_000
            })
        },
    )
    .await;
    assert_eq!(counter(&f2, "errors"), 0, "{f2:?}");
    let after = eventually(
        "hub has every filtered sample after the swap",
        DEADLINE,
        || async {
            let (_, f, _) = rig.function().await?;
            let page = rig.samples("filtered").await;
            (page.samples.len() as u64 >= counter(&f, "samples_out")).then_some(page)
        },
    )
    .await;
    assert!(
        after.samples.len() > before + 50,
        "stream continues after the swap: {before} -> {}",
        after.samples.len()
    );
    assert_gap_free(&after, "filtered");
    // No sample emitted twice: per point, timestamps strictly increase across the swap.
    for p in [0, 1] {
        let ts: Vec<u64> = after
            .samples
            .iter()
            .filter(|s| s.point == p)
            .map(|s| s.ts_ms)
            .collect();
        assert!(
            ts.windows(2).all(|w| w[0] < w[1]),
            "point {p}: timestamps not strictly increasing"
        );
    }
    // The tighter deadband passes more per input sample.
    let rate1 = out as f64 / inp as f64;
    let rate2 =
        (counter(&f2, "samples_out") - out) as f64 / (counter(&f2, "samples_in") - inp) as f64;
    assert!(
        rate2 > rate1,
        "deadband 0.5 passes {rate2:.3}, deadband 2 passes {rate1:.3}"
    );
    assert_gap_free(&rig.samples("raw").await, "raw");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_without_hub_runs_functions_from_disk() {
    let rig = Rig::start().await;
    let module = rig.upload(guest("deadband", "deadband.wasm")).await;
    rig.put_desired(desired(1, &module, "deadband=2")).await;
    eventually("deadband running", DEADLINE, || async {
        rig.function()
            .await
            .filter(|(_, f, _)| f.state == FunctionState::Running && counter(f, "samples_out") > 0)
    })
    .await;
    let hub_key = rig.hub.public_key.clone();
    let dir = rig.stop().await;

    // No hub at all: nothing listens on the broker or HTTP port.
    let port = edgefleet_testkit::free_port().unwrap();
    let mut cfg = edgefleet_testkit::edge_config("n1", &dir.path().join("edge"), port, &hub_key);
    cfg.hub.http_url = format!("http://127.0.0.1:{port}");
    let edge = EdgeHarness::start(cfg, Clock::system()).await.unwrap();
    let view = edge.functions.clone();
    let f = eventually(
        "function running again from the local artifact",
        DEADLINE,
        || async {
            view.snapshot()
                .get("f")
                .filter(|f| f.state == FunctionState::Running && counter(f, "samples_out") > 0)
                .cloned()
        },
    )
    .await;
    assert_eq!(f.module_sha256, module.sha256);
    tokio::time::timeout(Duration::from_secs(20), edge.stop())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_artifact_is_refused_and_the_old_version_keeps_running() {
    let rig = Rig::start().await;
    let good = rig.upload(guest("deadband", "deadband.wasm")).await;
    rig.put_desired(desired(1, &good, "deadband=2")).await;
    eventually("deadband running", DEADLINE, || async {
        rig.function().await.filter(|(rev, f, _)| {
            *rev == 1 && f.state == FunctionState::Running && counter(f, "samples_out") > 0
        })
    })
    .await;

    // A second module, whose copy on the hub's disk then rots: same size,
    // different bytes. The edge must refuse it (digest mismatch).
    let other = rig
        .upload(guest("swinging-door", "swinging-door.wasm"))
        .await;
    let path = rig.hub.data_dir.join("artifacts").join(&other.sha256);
    let mut bytes = std::fs::read(&path).unwrap();
    for b in bytes.iter_mut().skip(100).take(64) {
        *b ^= 0xff;
    }
    std::fs::write(&path, &bytes).unwrap();
    rig.put_desired(desired(2, &other, "deviation=1")).await;

    let (_, f, n) = eventually(
        "the corrupt module is refused and counted",
        DEADLINE,
        || async {
            let (rev, f, n) = rig.function().await?;
            let rejected = n
                .reported
                .as_ref()?
                .counters
                .get("artifacts_rejected")
                .copied()?;
            (rev == 2 && rejected >= 1).then_some((rev, f, n))
        },
    )
    .await;
    // The previous version keeps running.
    assert_eq!(f.module_sha256, good.sha256, "{f:?}");
    assert_eq!(f.state, FunctionState::Running);
    let events = eventually(
        "a function-failed event reaches the hub",
        DEADLINE,
        || async {
            let evs = rig.events().await;
            evs.iter()
                .any(|e| {
                    matches!(&e.kind, EventKind::FunctionFailed { function } if function == "f")
                        && e.message.contains("refused")
                })
                .then_some(evs)
        },
    )
    .await;
    assert!(!events.is_empty());
    let out_then = counter(&f, "samples_out");
    let seen = rig.samples("filtered").await.samples.len();
    eventually(
        "filtered data keeps flowing from the old version",
        DEADLINE,
        || async {
            let (_, f, _) = rig.function().await?;
            let page = rig.samples("filtered").await;
            (counter(&f, "samples_out") > out_then + 20 && page.samples.len() > seen + 20)
                .then_some(())
        },
    )
    .await;
    assert!(
        n.status
            .is_some_and(|s| s.state == protocols::NodeState::Online)
    );
    assert_gap_free(&rig.samples("filtered").await, "filtered");
    rig.stop().await;
}

/// A guest that fills its kv store, floods the log and emits samples for a
/// point it does not declare is bounded by the gateway (M9, L5, L3): its
/// puts fail past the quota, its lines are dropped past the rate, its
/// undeclared samples never reach the hub; everything is counted in
/// reported state and the function keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_guest_is_bounded_by_the_gateway() {
    let rig = Rig::start_with(|cfg| cfg.functions.kv_max_keys = 3).await;
    let module = rig.upload(fixture("hostile_edge")).await;
    rig.put_desired(desired(1, &module, "")).await;
    let (_, f, _) = eventually(
        "the bounds refused something of each kind",
        DEADLINE,
        || async {
            rig.function().await.filter(|(rev, f, _)| {
                *rev == 1
                    && counter(f, "kv_refused") >= 2
                    && counter(f, "log_dropped") >= 100
                    && counter(f, "samples_bad_point") >= 10
                    && counter(f, "samples_out") >= 10
            })
        },
    )
    .await;
    assert_eq!(f.state, FunctionState::Running, "{f:?}");
    assert_eq!(counter(&f, "kv_keys"), 3, "{f:?}");
    assert_eq!(counter(&f, "kv_bytes"), 3 * (8 + 100), "{f:?}");
    assert_eq!(
        counter(&f, "errors"),
        0,
        "refusals are not call failures: {f:?}"
    );
    assert!(
        f.last_error
            .as_deref()
            .is_some_and(|e| e.contains("outside its 2 input(s)")),
        "{f:?}"
    );
    let n = rig.node().await.unwrap();
    let node = &n.reported.unwrap().counters;
    assert!(node["function_kv_refused"] >= 2, "{node:?}");
    assert!(node["function_samples_bad_point"] >= 10, "{node:?}");
    // Local 0 -> 1 became input 1 (point 1); local 1 -> 2 is outside the
    // inputs and was dropped. Without the check it went out as point 2, a
    // point of the device that the function does not read.
    let page = eventually("filtered samples at the hub", DEADLINE, || async {
        let page = rig.samples("filtered").await;
        (!page.samples.is_empty()).then_some(page)
    })
    .await;
    assert!(
        page.samples.iter().all(|s| s.point == 1),
        "only declared points on the function's stream"
    );
    rig.stop().await;
}

/// A function that burns a long stretch of CPU in every call without ever
/// trapping (M8) runs beside a normal one: the gateway's CPU budget holds
/// the hog back (reported as `backoff`, counted), and the normal function
/// keeps processing all of its input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_hog_is_held_back_and_the_other_function_keeps_its_input_flowing() {
    let rig = Rig::start_with(|cfg| {
        cfg.functions.cpu_share_percent = 5;
        cfg.functions.cpu_burst = Duration::from_millis(50);
    })
    .await;
    let normal = rig
        .upload(fixture_in(
            "../device-runtime/tests/fixtures",
            "passthrough",
        ))
        .await;
    let hog = rig
        .upload(fixture_in("../device-runtime/tests/fixtures", "busy_loop"))
        .await;
    let mut body = desired(1, &normal, "");
    body["functions"] = json!([
        {"name": "f", "module_sha256": normal.sha256, "module_size": normal.size,
         "inputs": [0, 1], "outputs": ["filtered"]},
        {"name": "hog", "module_sha256": hog.sha256, "module_size": hog.size,
         "inputs": [2], "outputs": ["hogged"],
         "limits": {"fuel_per_call": 5_000_000_000_u64}},
    ]);
    rig.put_desired(body).await;
    let (f, h, node) = eventually("the hog held back, f busy", DEADLINE, || async {
        let n = rig.node().await?;
        let r = n.reported.as_ref()?;
        let f = r.functions.get("f")?.clone();
        let h = r.functions.get("hog")?.clone();
        (r.applied_revision == 1
            && counter(&h, "throttled") >= 2
            && h.state == FunctionState::Backoff
            && counter(&f, "samples_in") >= 1_000)
            .then(|| (f, h, r.counters.clone()))
    })
    .await;
    assert!(
        h.last_error
            .as_deref()
            .is_some_and(|e| e.contains("CPU budget")),
        "{h:?}"
    );
    assert_eq!(counter(&h, "restarts"), 0, "held back, not crashed: {h:?}");
    assert!(node["function_throttled"] >= 2, "{node:?}");
    // The normal function lost nothing and keeps up with its input: the
    // synthetic device makes as many samples of each of its three points,
    // so f's two points are two thirds of what the drivers delivered, less
    // what is still in flight (at most a few batches).
    assert_eq!(f.state, FunctionState::Running, "{f:?}");
    assert_eq!(counter(&f, "input_dropped"), 0, "{f:?}");
    assert_eq!(counter(&f, "samples_failed"), 0, "{f:?}");
    assert_eq!(
        counter(&f, "samples_out"),
        counter(&f, "samples_in"),
        "passthrough emits all its input: {f:?}"
    );
    let fed = counter(&f, "samples_in") + counter(&f, "input_buffered");
    let routed = node["samples_in"] * 2 / 3;
    assert!(
        fed + 300 >= routed,
        "f got {fed} of the {routed} samples of its points: {f:?} {node:?}"
    );
    eventually("a CPU-budget event for the hog", DEADLINE, || async {
        rig.events().await.into_iter().find(|e| {
            matches!(&e.kind, EventKind::FunctionFailed { function } if function == "hog")
                && e.message.contains("CPU budget")
        })
    })
    .await;
    rig.stop().await;
}
