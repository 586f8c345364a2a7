//! `fleet-sim run`: executes a [`Scenario`] against the real hub and real
//! edge agents and reports from ground truth.
//!
//! Order of a run:
//! 1. start the simulated device servers of every node (Modbus servers with
//!    many unit ids, OPC UA servers with one variable folder per device,
//!    MQTT-native devices publishing to a device broker — an embedded
//!    rumqttd shared by the run, separate from the hub's);
//! 2. start the hub (child process `fleet-sim hub`, or in-process), one TCP
//!    [`Proxy`] per node in front of the broker, and one real
//!    `edge_node::Agent` per node (in this process, own sled directory);
//! 3. upload the WASM guests and put every node's desired state through
//!    the hub's REST API; wait until every node reports it applied;
//! 4. let devices run for `duration` while the fault plan executes and a
//!    monitor polls `GET /v1/nodes` (convergence, backlog, progress);
//! 5. stop the device servers, wait (bounded) until every node has
//!    uploaded everything stamped before that moment, read every stored
//!    stream back through `GET …/samples`, and compare point by point with
//!    the servers' logs ([`crate::report`]).
//!
//! A node with a virtual-time partition (`clock = "virtual"`) runs its
//! device servers and agent on its own paused-clock runtime and reaches the
//! devices in memory ([`crate::virtual_time`]); its partition heals when
//! the virtual duration has passed, and comparisons with its timestamps are
//! shifted by its clock's offset from the wall clock.
//!
//! Everything listens on 127.0.0.1 with ephemeral ports. Work files (hub
//! and node data) go to a temporary directory unless one is given.

mod compare;
mod faults;
mod fleet;
mod hub;
mod monitor;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail};
use edge_node::{Clock, EdgeConfig};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::devices::modbus::ModbusSim;
use crate::proxy::{LinkMode, Proxy};
use crate::report::{self, FilterError, Obs, PointFilter, Report, Totals};
use crate::scenario::{EdgeMode, Fault, HubMode, Protocol, Scenario};
use crate::virtual_time::{Outage, VirtualNode};
use compare::{RESTART_SLACK, compare_segmented};
use faults::{Action, timeline};
use fleet::{NodeRt, Source, desired_for, kill_agent, start_agent, start_devices, stop_agent};
use hub::HubCtl;
pub use monitor::rss_bytes;
use monitor::{Monitor, Progress, drained, monitor_loop};

/// Options of a run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The scenario.
    pub scenario: Scenario,
    /// Where hub and node data go; a temporary directory when `None`.
    pub work_dir: Option<PathBuf>,
    /// Show live progress on stderr.
    pub progress: bool,
    /// The `fleet-sim` executable that serves the hub in process mode
    /// (`fleet-sim hub --config …`); the current executable when `None`.
    pub hub_exe: Option<PathBuf>,
}

/// How long after the desired state is applied everywhere (the start of
/// device time) every OPC UA and MQTT subscription must be active. Values
/// served before the first one a point delivered, and before this, went to
/// no subscriber and are not compared.
const SUBSCRIBE_GRACE: Duration = Duration::from_secs(10);

/// A moment a node's function instances may have restarted with fresh state
/// (an agent restart, or a new desired revision that re-deploys them).
#[derive(Debug, Clone, Copy)]
pub(super) struct Restart {
    pub(super) node: usize,
    /// Wall ms before the restart could begin.
    pub(super) lo_ms: u64,
    /// For a re-deploy: the revision, whose applied time (seen by the
    /// monitor) bounds when it happened.
    pub(super) revision: Option<u64>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(super) fn now_ms() -> u64 {
    Clock::system().now_ms()
}

/// Runs a scenario and returns its report.
pub async fn run(opts: RunOptions) -> anyhow::Result<Report> {
    let s = opts.scenario.clone();
    let wall = Instant::now();
    let tmp;
    let dir = if let Some(d) = &opts.work_dir {
        d.clone()
    } else {
        tmp = tempfile::tempdir().context("creating a temporary directory")?;
        tmp.path().to_owned()
    };
    std::fs::create_dir_all(&dir).context("creating the work directory")?;
    let cancel = CancellationToken::new();
    let mut progress = Progress::new(opts.progress, s.duration.as_secs());
    progress.println(s.summary());

    // 1. Devices.
    let layouts = s.nodes();
    let broker = if s.nodes.iter().any(|g| g.devices.mqtt > 0) {
        Some(
            crate::devices::mqtt::start_broker()
                .await
                .context("starting the MQTT device broker")?,
        )
    } else {
        None
    };
    let virtual_nodes = s.virtual_partitions();
    let mut pre = Vec::with_capacity(layouts.len());
    for l in &layouts {
        if virtual_nodes.iter().any(|(n, _)| *n == l.index) {
            let vn = VirtualNode::start(&l.name)?;
            let (s2, l2, d2, clock) = (s.clone(), l.clone(), dir.clone(), vn.clock());
            let devs = vn
                .run(async move { start_devices(&s2, &l2, &d2, broker, clock).await })
                .await??;
            pre.push((l.clone(), devs, Some(vn)));
        } else {
            pre.push((
                l.clone(),
                start_devices(&s, l, &dir, broker, Clock::system()).await?,
                None,
            ));
        }
    }
    let device_connections: usize = pre.iter().map(|(_, d, _)| d.connections).sum();
    progress.println(format!(
        "devices up: {} devices, {} driver connections",
        s.device_count(),
        device_connections
    ));

    // 2. Hub, proxies, agents.
    let mut hub = HubCtl::start(&s, &dir, opts.hub_exe.clone(), &cancel).await?;
    let agent_exe = match s.edge.mode {
        EdgeMode::Process => Some(match &opts.hub_exe {
            Some(e) => e.clone(),
            None => std::env::current_exe().context("locating the fleet-sim executable")?,
        }),
        EdgeMode::InProcess => None,
    };
    let hub_pid = Arc::new(Mutex::new(hub.pid()));
    let mut nodes: Vec<NodeRt> = Vec::with_capacity(pre.len());
    for (layout, nd, vnode) in pre {
        let modbus: Vec<Arc<ModbusSim>> = nd.modbus.into_iter().map(Arc::new).collect();
        let mut devices = nd.devices;
        let transports = if vnode.is_some() {
            crate::virtual_time::in_memory_routes(&layout.name, &modbus, &mut devices)
        } else {
            edge_node::drivers::transport::DeviceTransports::default()
        };
        let proxy = Proxy::start(hub.mqtt).await.context("starting a proxy")?;
        let mut cfg = EdgeConfig {
            node: layout.name.clone(),
            data_dir: dir.join("nodes").join(&layout.name),
            cache_capacity_bytes: s.edge.cache_capacity_bytes,
            ..EdgeConfig::default()
        };
        cfg.mqtt.host = "127.0.0.1".into();
        cfg.mqtt.port = proxy.local_addr().port();
        cfg.mqtt.reconnect_max = s.edge.reconnect_max;
        cfg.mqtt.keep_alive = Duration::from_secs(5);
        cfg.hub.public_key = Some(hub.public_key.clone());
        cfg.hub.http_url.clone_from(&hub.base);
        cfg.outbox.flush_interval = s.edge.flush_interval;
        cfg.uplink.drain_rate = s.edge.drain_rate;
        cfg.uplink.ack_timeout = Duration::from_secs(10);
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("edge config of {}: {e}", layout.name))?;
        let mut n = NodeRt {
            layout,
            cfg,
            proxy,
            agent: None,
            agent_exe: agent_exe.clone(),
            modbus,
            opcua: nd.opcua,
            mqtt: nd.mqtt,
            points: nd.points,
            devices,
            vnode,
            transports,
            clock_offset_ms: 0,
        };
        start_agent(&mut n, &cancel).await?;
        nodes.push(n);
    }
    let monitor = Arc::new(Mutex::new(Monitor::default()));
    let mon_cancel = cancel.child_token();
    let mon_task = tokio::spawn(monitor_loop(
        hub.base.clone(),
        hub_pid.clone(),
        monitor.clone(),
        mon_cancel.clone(),
    ));

    // 3. Deploy.
    let mut modules = HashMap::new();
    for f in &s.functions {
        if let std::collections::hash_map::Entry::Vacant(e) = modules.entry(f.guest) {
            e.insert(hub.upload(f.guest.wasm()).await?);
        }
    }
    let mut overrides: HashMap<String, String> = HashMap::new();
    let mut max_error_of: HashMap<String, f64> = s
        .functions
        .iter()
        .map(|f| (f.name.clone(), f.max_error))
        .collect();
    let mut revision = 1u64;
    for n in &nodes {
        let d = desired_for(&s, n, revision, &modules, &overrides)?;
        lock(&monitor)
            .pending
            .insert((n.layout.name.clone(), revision), Instant::now());
        hub.put_desired(&d).await?;
    }
    let conv_start = Instant::now();
    loop {
        let left = lock(&monitor).pending.len();
        if left == 0 {
            break;
        }
        if conv_start.elapsed() > s.converge_timeout {
            bail!(
                "{left} of {} nodes did not apply their desired state within {:?}",
                nodes.len(),
                s.converge_timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    progress.println(format!(
        "desired state applied on {} nodes in {:.1} s",
        nodes.len(),
        conv_start.elapsed().as_secs_f64()
    ));

    // 4. Live phase with the fault plan.
    let live = Instant::now();
    // By then every subscription (OPC UA, MQTT) must be active: values
    // served later count against the agent even if it stored none at all.
    let subscribed_by_ms = now_ms() + SUBSCRIBE_GRACE.as_millis() as u64;
    let steps = timeline(&s);
    let mut restarts: Vec<Restart> = Vec::new();
    // (wall ms, function, config) of every re-deploy.
    let mut config_log: Vec<(u64, String, String)> = Vec::new();
    let mut next = 0usize;
    let mut fault_log = Vec::new();
    let mut outage_since: HashMap<String, Instant> = HashMap::new();
    let mut outage = Duration::ZERO;
    let mut drain_watch: Vec<(Instant, u64)> = Vec::new(); // outage ends
    let mut drain_max = 0.0f64;
    let mut had_outage = false;
    let fresh_ms = (s.edge.batch_max_age + s.hub.ack_interval + s.edge.report_interval).as_millis()
        as u64
        + 2_000;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // Virtual-time outages in progress, and the wall time finished ones
    // took: the live phase is extended by it (`duration` counts wall time
    // outside virtual outages).
    let mut virtual_outages: Vec<(usize, Outage)> = Vec::new();
    let mut virtual_wall = Duration::ZERO;
    let mut live_for = s.duration;
    loop {
        let elapsed = live.elapsed();
        if elapsed >= live_for && next >= steps.len() && virtual_outages.is_empty() {
            break;
        }
        if elapsed >= live_for {
            // Run the remaining (healing) steps now; wait for virtual outages.
            if next >= steps.len() {
                tick.tick().await;
            }
        } else if next < steps.len() && steps[next].0 > elapsed {
            let wait = steps[next]
                .0
                .saturating_sub(elapsed)
                .min(Duration::from_millis(500));
            tokio::select! {
                _ = tick.tick() => {}
                () = tokio::time::sleep(wait) => {}
            }
        } else if next >= steps.len() {
            tick.tick().await;
        }
        // Progress and drain watches.
        {
            let st = lock(&monitor);
            let stored: u64 = st.nodes.values().map(|n| n.stored).sum();
            let backlog: u64 = st
                .nodes
                .values()
                .filter_map(|n| n.reported.as_ref())
                .map(|r| r.backlog.samples)
                .sum();
            progress
                .bar
                .set_position(live.elapsed().as_secs().min(live_for.as_secs()));
            let mut msg = format!(
                "hub stored {stored}  edge backlog {backlog}  rss {} MiB",
                rss_bytes("self").unwrap_or(0) >> 20
            );
            for (node, o) in &virtual_outages {
                use std::fmt::Write as _;
                let _ = write!(
                    msg,
                    "  node {node} virtual outage {:.1}/{:.1} h",
                    o.progress().as_secs_f64() / 3600.0,
                    o.duration().as_secs_f64() / 3600.0
                );
            }
            progress.status(live.elapsed().as_secs(), &msg);
            progress.bar.set_message(msg);
            let open_outages = !outage_since.is_empty() || !virtual_outages.is_empty();
            drain_watch.retain(|(end, end_ms)| {
                if !open_outages && drained(&st, &nodes, *end_ms, None, fresh_ms) {
                    drain_max = drain_max.max(end.elapsed().as_secs_f64());
                    false
                } else {
                    true
                }
            });
        }
        // Virtual-time outages that ended: heal the link.
        let mut k = 0;
        while k < virtual_outages.len() {
            if !virtual_outages[k].1.is_finished() {
                k += 1;
                continue;
            }
            let (node, o) = virtual_outages.remove(k);
            let virtual_for = o.duration();
            let took = o.finish().await?;
            let n = &mut nodes[node];
            if let Some(vn) = &n.vnode {
                n.clock_offset_ms = vn.clock_offset_ms().await?;
            }
            n.proxy.set_mode(LinkMode::Pass);
            outage += virtual_for;
            virtual_wall += took;
            live_for += took;
            had_outage = true;
            drain_watch.push((Instant::now(), now_ms()));
            let t = live.elapsed().as_secs_f64();
            let line = format!(
                "{t:>7.1}s virtual outage of node {node} ended: {:.1} h virtual in {:.1} s wall; node clock now {:+.1} s from wall clock; link healed",
                virtual_for.as_secs_f64() / 3600.0,
                took.as_secs_f64(),
                n.clock_offset_ms as f64 / 1000.0
            );
            progress.println(&line);
            fault_log.push(line);
        }
        // Due steps.
        while next < steps.len() && (steps[next].0 <= live.elapsed() || live.elapsed() >= live_for)
        {
            let (at, action) = steps[next].clone();
            next += 1;
            let t = live.elapsed().as_secs_f64();
            fault_log.push(format!(
                "{t:>7.1}s (planned {:.1}s) {action:?}",
                at.as_secs_f64()
            ));
            progress.println(format!("[{t:>6.1}s] {action:?}"));
            match action {
                Action::Link {
                    node,
                    mode,
                    outage: is_outage,
                } => {
                    let n = &nodes[node];
                    n.proxy.set_mode(mode);
                    let key = format!("link{node}");
                    if is_outage && mode != LinkMode::Pass {
                        outage_since.entry(key).or_insert_with(Instant::now);
                    } else if let Some(since) = outage_since.remove(&key) {
                        outage += since.elapsed();
                        had_outage = true;
                        drain_watch.push((Instant::now(), now_ms()));
                    }
                }
                Action::HubDown => {
                    hub.kill().await?;
                    *lock(&hub_pid) = None;
                    outage_since
                        .entry("hub".into())
                        .or_insert_with(Instant::now);
                }
                Action::HubUp => {
                    hub.restart().await?;
                    *lock(&hub_pid) = hub.pid();
                    if let Some(since) = outage_since.remove("hub") {
                        outage += since.elapsed();
                        had_outage = true;
                        drain_watch.push((Instant::now(), now_ms()));
                    }
                }
                Action::AgentDown(node) => kill_agent(&mut nodes[node]).await?,
                Action::AgentUp(node) => {
                    let lo_ms = now_ms();
                    start_agent(&mut nodes[node], &cancel).await?;
                    restarts.push(Restart {
                        node,
                        lo_ms,
                        revision: None,
                    });
                }
                Action::Devices {
                    node,
                    protocol,
                    server,
                    up,
                } => {
                    let n = &nodes[node];
                    match protocol {
                        Protocol::Modbus => {
                            for (i, m) in n.modbus.iter().enumerate() {
                                if server.is_none_or(|s| s == i) {
                                    if up {
                                        m.come_up().await?;
                                    } else {
                                        m.go_down();
                                    }
                                }
                            }
                        }
                        Protocol::Opcua => {
                            for (i, o) in n.opcua.iter().enumerate() {
                                if server.is_none_or(|s| s == i) {
                                    if up {
                                        o.come_up().await?;
                                    } else {
                                        o.go_down().await;
                                    }
                                }
                            }
                        }
                        Protocol::Mqtt => {
                            for (i, m) in n.mqtt.iter().enumerate() {
                                if server.is_none_or(|s| s == i) {
                                    if up {
                                        m.come_up();
                                    } else {
                                        m.go_down().await;
                                    }
                                }
                            }
                        }
                    }
                }
                Action::VirtualOutage { node, duration } => {
                    let n = &nodes[node];
                    let vn = n
                        .vnode
                        .as_ref()
                        .with_context(|| format!("node {node} has no virtual-time runtime"))?;
                    n.proxy.set_mode(LinkMode::Cut);
                    virtual_outages.push((node, vn.begin_outage(duration)));
                }
                Action::Redeploy { function, config } => {
                    if let Some(f) = s.faults.iter().find_map(|f| match f {
                        Fault::Redeploy {
                            function: ff,
                            config: c,
                            max_error,
                            ..
                        } if *ff == function && *c == config => Some(*max_error),
                        _ => None,
                    }) {
                        // The bound that applies from now on is the looser one.
                        let e = max_error_of.entry(function.clone()).or_insert(0.0);
                        *e = e.max(f);
                    }
                    config_log.push((now_ms(), function.clone(), config.clone()));
                    overrides.insert(function, config);
                    revision += 1;
                    for n in &nodes {
                        let d = desired_for(&s, n, revision, &modules, &overrides)?;
                        lock(&monitor)
                            .pending
                            .insert((n.layout.name.clone(), revision), Instant::now());
                        restarts.push(Restart {
                            node: n.layout.index,
                            lo_ms: now_ms(),
                            revision: Some(revision),
                        });
                        hub.put_desired(&d).await?;
                    }
                }
            }
        }
    }
    let device_seconds = live.elapsed().as_secs_f64();

    // 5. Stop devices, drain, compare.
    let end_ms = now_ms();
    let drain_start = Instant::now();
    for n in &nodes {
        for m in &n.modbus {
            m.stop().await;
        }
        for o in &n.opcua {
            o.stop().await;
        }
        for m in &n.mqtt {
            m.stop().await;
        }
    }
    progress.bar.finish_and_clear();
    progress.println(format!(
        "devices stopped after {device_seconds:.1} s; waiting for the edge nodes to drain"
    ));
    let margin_ms = s.edge.batch_max_age.as_millis() as u64 + 1_000;
    let mut is_drained = false;
    while drain_start.elapsed() < s.drain_timeout {
        if drained(
            &lock(&monitor),
            &nodes,
            end_ms + margin_ms,
            Some(end_ms + margin_ms),
            0,
        ) {
            is_drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let final_drain = drain_start.elapsed().as_secs_f64();
    // Outage drains still open at the end count up to now.
    for (end, _) in &drain_watch {
        drain_max = drain_max.max(end.elapsed().as_secs_f64());
    }
    let drain_seconds = if had_outage { drain_max } else { final_drain };
    progress.println(format!(
        "drain {} after {final_drain:.1} s; comparing with ground truth",
        if is_drained { "complete" } else { "TIMED OUT" }
    ));

    // Values served in the last moments before the devices stopped may not
    // have been delivered (an OPC UA publish cycle, a Modbus reply in
    // flight): the comparison window ends two sampling intervals earlier.
    let interval_ms = s.sampling_interval.as_millis() as u64;
    let cut_ms = end_ms.saturating_sub(2 * interval_ms);
    let mut totals = Totals::default();
    let mut flagged = [0u32; 4]; // points logged at debug level, per kind
    for n in &nodes {
        // In the node's time (shifted after a virtual-time outage).
        let cut_ms = cut_ms.saturating_add_signed(n.clock_offset_ms);
        let mut stored: HashMap<u32, Vec<Obs>> = HashMap::new();
        for stream in hub.streams(&n.layout.name).await? {
            let samples = hub.samples(&n.layout.name, &stream).await?;
            let seqs: Vec<u64> = samples.iter().map(|x| x.seq).collect();
            totals.add_stream(&report::seq_analysis(&seqs));
            for x in samples {
                if x.ts_ms <= cut_ms + interval_ms {
                    stored.entry(x.point).or_default().push(Obs {
                        ts_ms: x.ts_ms,
                        value: x.value,
                        quality: x.quality,
                    });
                }
            }
        }
        // Restart windows of this node: [lo, hi]. An agent restart is over
        // when `start_agent` returns. A re-deploy is reported applied when
        // the agent has handed the new functions to its function host, which
        // swaps the instances asynchronously right after (a cached module
        // instantiates in well under a millisecond): hi is when the monitor
        // saw it applied plus RESTART_SLACK.
        let mut node_restarts: Vec<(u64, u64)> = restarts
            .iter()
            .filter(|r| r.node == n.layout.index)
            .map(|r| {
                let hi = r.revision.map_or(r.lo_ms, |rev| {
                    lock(&monitor)
                        .applied_at_ms
                        .get(&(n.layout.name.clone(), rev))
                        .map_or(end_ms, |t| t + RESTART_SLACK.as_millis() as u64)
                });
                (r.lo_ms, hi.max(r.lo_ms))
            })
            .collect();
        // After a crash (SIGKILL) the agent reports the window in which
        // samples not yet committed may be lost; the restarted instance
        // begins at its end.
        if let Some(rep) = lock(&monitor)
            .nodes
            .get(&n.layout.name)
            .and_then(|v| v.reported.as_ref())
        {
            node_restarts.extend(rep.loss_windows.iter().map(|w| (w.from_ms, w.to_ms)));
        }
        node_restarts.sort_unstable();
        for p in &n.points {
            let mut st = stored.remove(&p.index).unwrap_or_default();
            st.sort_by_key(|o| o.ts_ms);
            let raw = match p.source {
                Source::Modbus { server, unit } => n.modbus[server].served(unit, p.index),
                Source::Opcua { server } => n.opcua[server].served(p.index),
                Source::Mqtt { client } => n.mqtt[client].served(p.index),
            };
            let mut served: Vec<Obs> = raw
                .into_iter()
                .filter(|(ts, _)| *ts <= cut_ms)
                .map(|(ts_ms, value)| Obs {
                    ts_ms,
                    value,
                    quality: 0,
                })
                .collect();
            // Subscriptions (OPC UA, MQTT): values served before the first
            // one a point delivered (or before every subscription had to be
            // active) reached no subscriber.
            let t0 = st
                .first()
                .map_or(subscribed_by_ms, |f| f.ts_ms.min(subscribed_by_ms));
            match p.source {
                Source::Opcua { .. } => {
                    // The first notification carries the value current at
                    // subscription time, stamped with the latest tick (the
                    // log has it at the tick that changed it): keep that
                    // entry, with the source timestamp the subscriber got.
                    let keep_from = served.partition_point(|o| o.ts_ms <= t0).saturating_sub(1);
                    served.drain(..keep_from);
                    if let (Some(f), Some(first)) = (st.first(), served.first_mut())
                        && f.value.to_bits() == first.value.to_bits()
                        && f.ts_ms > first.ts_ms
                        && f.ts_ms <= t0
                    {
                        first.ts_ms = f.ts_ms;
                    }
                }
                // Payload timestamps are exact: start at the first delivered.
                Source::Mqtt { .. } => {
                    served.drain(..served.partition_point(|o| o.ts_ms < t0));
                }
                Source::Modbus { .. } => {}
            }
            // The compared window ends at the last served value: a Modbus
            // sample is stamped after its read (by less than half an
            // interval), so stored samples up to there belong to it; later
            // ones belong to reads after the cut.
            let window_end = served.last().map_or(cut_ms, |o| o.ts_ms + interval_ms / 2);
            st.retain(|o| o.ts_ms <= window_end);
            let func = s.function_of(p.slot, p.source.protocol());
            let fname = func.map_or_else(String::new, |f| f.name.clone());
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
                &node_restarts,
                interval_ms,
                &mut totals.in_restart_windows,
            );
            let bound = func.map_or(0.0, |f| {
                max_error_of.get(&f.name).copied().unwrap_or(f.max_error)
            });
            let kind = if v.duplicates > 0 {
                0
            } else if v.unexpected > 0 {
                1
            } else if v.lost.is_some_and(|l| l > 0) {
                2
            } else if v.max_abs_error > bound {
                3
            } else {
                4
            };
            if kind < 4 && flagged[kind] < 10 {
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
            totals.add_point_of(p.source.protocol().name(), &fname, &v);
        }
    }

    // Shut down.
    mon_cancel.cancel();
    let _ = mon_task.await;
    for n in &mut nodes {
        stop_agent(n).await?;
    }
    for mut n in nodes.drain(..) {
        n.proxy.stop().await;
        if let Some(vn) = n.vnode.take() {
            tokio::task::spawn_blocking(move || vn.shutdown())
                .await
                .context("stopping a virtual-time node")?;
        }
    }
    let mon = std::mem::take(&mut *lock(&monitor));
    hub.stop().await?;

    let mut filter_errors = Vec::new();
    let mut max_err = 0.0f64;
    for (name, e) in &totals.max_abs_error {
        let (function, configured) = if name.is_empty() {
            ("raw".to_owned(), 0.0)
        } else {
            (name.clone(), max_error_of.get(name).copied().unwrap_or(0.0))
        };
        if !name.is_empty() {
            max_err = max_err.max(*e);
        }
        filter_errors.push(FilterError {
            function,
            configured,
            max_abs_error: *e,
            within: *e <= configured * (1.0 + 1e-9) + 1e-9,
        });
    }
    let mut conv = mon.convergence_ms.clone();
    let p50 = report::percentile(&mut conv, 50.0);
    let p99 = report::percentile(&mut conv, 99.0);
    let rss_note = match s.hub.mode {
        HubMode::Process => "hub_rss_bytes_max: VmRSS of the hub child process (fleet-sim hub), sampled every 0.5 s; edge_rss_bytes_max: VmRSS of the fleet-sim process, which holds every edge agent AND the simulated device servers, so it over-states the agents".into(),
        HubMode::InProcess => "hub and edge share this process: both figures are the VmRSS of the fleet-sim process (agents, hub and device servers together), sampled every 0.5 s".into(),
    };
    let rss_note: String = if s.edge.mode == EdgeMode::Process {
        format!(
            "{rss_note}; the edge agents ran as separate processes (edge.mode = \"process\") and are not in edge_rss_bytes_max"
        )
    } else {
        rss_note
    };
    let hub_rss = match s.hub.mode {
        HubMode::Process => mon.hub_rss_max,
        HubMode::InProcess => mon.edge_rss_max,
    };
    Ok(Report {
        scenario: s.name.clone(),
        devices: s.device_count() as u64,
        edge_nodes: s.node_count() as u64,
        device_connections: device_connections as u64,
        points: totals.points,
        samples_generated: totals.served,
        samples_upstream: totals.stored,
        reduction_ratio: if totals.served == 0 {
            0.0
        } else {
            1.0 - totals.stored as f64 / totals.served as f64
        },
        max_abs_error: max_err,
        filter_errors,
        by_source: totals.by_source.values().cloned().collect(),
        samples_in_restart_windows: totals.in_restart_windows,
        samples_lost: totals.lost + totals.seq_missing,
        duplicates: totals.duplicates,
        unexpected: totals.unexpected,
        seq_missing: totals.seq_missing,
        points_unverified: totals.points_unverified,
        desired_convergence_ms_p50: p50,
        desired_convergence_ms_p99: p99,
        desired_convergence_samples: mon.convergence_ms.len() as u64,
        outage_seconds: outage.as_secs_f64(),
        outage_virtual: !virtual_nodes.is_empty(),
        virtual_outage_wall_seconds: virtual_wall.as_secs_f64(),
        drain_seconds,
        final_drain_seconds: final_drain,
        drained: is_drained,
        edge_rss_bytes_max: mon.edge_rss_max,
        hub_rss_bytes_max: hub_rss,
        rss_note,
        wall_seconds: wall.elapsed().as_secs_f64(),
        device_seconds,
        faults: fault_log,
    })
}
