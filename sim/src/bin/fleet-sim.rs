//! `fleet-sim`: the edgefleet fleet simulator.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use sim::hollow::{BrokerKind, HollowOptions, HubEndpoint, MosquittoOptions, Stack, StackOptions};

#[derive(Parser)]
#[command(name = "fleet-sim", version, about = "edgefleet fleet simulator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a hub and one edge node on embedded defaults and show data flowing.
    Demo {
        /// Hub config (TOML); embedded defaults when omitted.
        #[arg(long)]
        hub_config: Option<PathBuf>,
        /// Edge config (TOML); node `line-1` with defaults when omitted.
        #[arg(long)]
        edge_config: Option<PathBuf>,
        /// Desired state (JSON) to push; the built-in example when omitted.
        #[arg(long)]
        desired: Option<PathBuf>,
        /// Seconds to run; 0 runs until Ctrl-C.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Run a scenario (TOML) against the real hub and real edge agents and
    /// write a JSON report computed from the devices' ground truth.
    Run {
        /// Scenario file, e.g. sim/scenarios/smoke.toml.
        scenario: PathBuf,
        /// Where to write the JSON report (also printed to stdout).
        #[arg(long)]
        report: Option<PathBuf>,
        /// Keep hub and node data here instead of a temporary directory.
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// No live progress.
        #[arg(long)]
        quiet: bool,
    },
    /// Serve a cloud-hub (used by `run` for its hub child process).
    #[command(hide = true)]
    Hub {
        /// Hub config (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Measure the hub with hollow nodes: lightweight edge-node stand-ins
    /// that speak the real sync protocol without devices.
    Hollow(Box<HollowArgs>),
    /// Run one edge agent (used by `run` with `edge.mode = "process"`).
    #[command(hide = true)]
    Agent {
        /// Edge config (TOML).
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Args)]
struct HollowArgs {
    /// Hollow nodes to run.
    #[arg(long, default_value_t = 1_000)]
    nodes: usize,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Desired-state changes to push to every node, one after the other.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Most nodes connecting at once.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Most PUT /v1/nodes/{node}/desired requests in flight.
    #[arg(long, default_value_t = 32)]
    put_concurrency: usize,
    /// report_interval_ms of the pushed desired state (how often each node
    /// re-publishes its reported state).
    #[arg(long, default_value_t = 5_000)]
    report_interval_ms: u64,
    /// MQTT keep-alive of each node, seconds.
    #[arg(long, default_value_t = 15)]
    keep_alive_s: u64,
    /// Seconds a node waits for CONNACK before it retries (rumqttc and
    /// agent default: 5).
    #[arg(long, default_value_t = 5)]
    mqtt_connect_timeout_s: u64,
    /// Hub registry poll interval during a round, ms.
    #[arg(long, default_value_t = 500)]
    registry_poll_ms: u64,
    /// Longest wait for all nodes to connect and show online, seconds.
    #[arg(long, default_value_t = 600)]
    connect_timeout_s: u64,
    /// Longest wait for one round to converge, seconds.
    #[arg(long, default_value_t = 600)]
    round_timeout_s: u64,
    /// Node name prefix.
    #[arg(long, default_value = "hollow-")]
    node_prefix: String,
    /// Use an already running hub at this REST base URL (with --mqtt)
    /// instead of starting one.
    #[arg(long, requires = "mqtt")]
    hub_url: Option<String>,
    /// Broker address of the running hub (with --hub-url).
    #[arg(long, requires = "hub_url")]
    mqtt: Option<SocketAddr>,
    /// Process id of the running hub, to sample its memory (with --hub-url).
    #[arg(long, requires = "hub_url")]
    hub_pid: Option<u32>,
    /// Start this `cloud-hub` binary (`BIN serve --config …`) instead of
    /// this executable's hidden `hub` subcommand.
    #[arg(long, conflicts_with = "hub_url")]
    hub_bin: Option<PathBuf>,
    /// Broker of the started hub: its embedded rumqttd, or a Mosquitto
    /// process started on 127.0.0.1 for the run (needs `mosquitto`: apt-get
    /// install mosquitto) that the hub uses as an external broker.
    #[arg(long, value_enum, default_value_t = BrokerArg::Embedded, conflicts_with = "hub_url")]
    broker: BrokerArg,
    /// The mosquitto executable (default: found on PATH or in /usr/sbin).
    #[arg(long)]
    mosquitto_bin: Option<PathBuf>,
    /// Plain MQTT for the started stack (the embedded broker's lab mode, or
    /// an anonymous loopback Mosquitto), to measure beside the mTLS
    /// default; every node gets its own certificate otherwise.
    #[arg(long, conflicts_with = "hub_url")]
    plain_mqtt: bool,
    /// Mosquitto max_queued_messages per client (default: 8 per node, at
    /// least 10000; the hub's subscriptions queue 2 messages per node per
    /// desired-state change).
    #[arg(long)]
    mosquitto_max_queued: Option<usize>,
    /// Base hub config (TOML) for the started hub; data dir and listen
    /// addresses are chosen by fleet-sim.
    #[arg(long, conflicts_with = "hub_url")]
    hub_config: Option<PathBuf>,
    /// RUST_LOG of the started hub.
    #[arg(long, default_value = "warn")]
    hub_log: String,
    /// Keep the started hub's (and broker's) directory (config, data, log)
    /// afterwards.
    #[arg(long)]
    keep_hub_dir: bool,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
    /// After the rounds, measure a staged rollout to every node in these
    /// cumulative waves, percent (e.g. `1,10,50,100`).
    #[arg(long, value_delimiter = ',')]
    rollout_waves: Option<Vec<u8>>,
    /// Bake time of each node in the rollout, ms.
    #[arg(long, default_value_t = 2_000)]
    rollout_bake_ms: u64,
    /// Most nodes in flight at once in the rollout.
    #[arg(long, default_value_t = 10_000)]
    rollout_max_concurrent: u32,
}

/// `--broker`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BrokerArg {
    /// The hub's embedded rumqttd.
    Embedded,
    /// A Mosquitto process started for the run.
    Mosquitto,
}

fn main() -> ExitCode {
    edgefleet_shell::install_crypto_provider();
    // The OPC UA client logs every refused reconnect at ERROR; devices going
    // down is part of the plan here.
    edgefleet_shell::init_tracing_to_stderr(
        "warn,opcua_client=off,opcua_server=off,opcua_core=off",
    );
    let cli = Cli::parse();
    // Validate scenarios before starting a runtime: bad input exits 64.
    let scenario = if let Cmd::Run { scenario, .. } = &cli.cmd {
        match sim::scenario::Scenario::load(scenario) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("fleet-sim: {e}");
                return ExitCode::from(edgefleet_shell::EX_USAGE);
            }
        }
    } else {
        None
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleet-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = match cli.cmd {
        Cmd::Demo {
            hub_config,
            edge_config,
            desired,
            seconds,
        } => {
            let opts = sim::demo::DemoOptions {
                hub_config,
                edge_config,
                desired,
                duration: (seconds > 0).then(|| Duration::from_secs(seconds)),
            };
            rt.block_on(sim::demo::run(opts))
        }
        Cmd::Run {
            report,
            work_dir,
            quiet,
            ..
        } => rt.block_on(async {
            let Some(scenario) = scenario else {
                anyhow::bail!("scenario missing");
            };
            let r = sim::run::run(sim::run::RunOptions {
                scenario,
                work_dir,
                progress: !quiet,
                hub_exe: None,
            })
            .await?;
            let json = serde_json::to_string_pretty(&r)?;
            if let Some(p) = report {
                std::fs::write(&p, &json)
                    .map_err(|e| anyhow::anyhow!("writing {}: {e}", p.display()))?;
            }
            println!("{json}");
            Ok(())
        }),
        Cmd::Hollow(args) => match rt.block_on(hollow(*args)) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
        Cmd::Hub { config } => rt.block_on(serve_hub(config)),
        Cmd::Agent { config } => rt.block_on(serve_agent(config)),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `fleet-sim agent`: the agent as the `edge-node` binary runs it.
async fn serve_agent(config: PathBuf) -> anyhow::Result<()> {
    let stop = edgefleet_shell::shutdown_signal();
    let cfg = edge_node::EdgeConfig::load(Some(&config), |k| std::env::var(k).ok())?;
    let stop = async move {
        stop.await;
    };
    edge_node::agent::serve(cfg, edge_node::Clock::system(), stop).await?;
    Ok(())
}

/// `fleet-sim hub`: the hub as the `cloud-hub` binary runs it.
async fn serve_hub(config: PathBuf) -> anyhow::Result<()> {
    let stop = edgefleet_shell::shutdown_signal();
    let cfg = cloud_hub::HubConfig::load(Some(&config), |k| std::env::var(k).ok())?;
    cfg.validate()?;
    let stop = async move {
        stop.await;
    };
    cloud_hub::app::serve(cfg, stop, |_| {}).await?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn interrupted() {
    edgefleet_shell::shutdown_signal().await;
}

/// `fleet-sim hollow`: against a running hub (`--hub-url`) or a started
/// stack; writes the report and exits non-zero unless every round converged.
async fn hollow(a: HollowArgs) -> anyhow::Result<ExitCode> {
    let opts = hollow_options(&a);
    opts.validate()?;
    // Before the hub starts, so it inherits the raised limit.
    let limit = sim::hollow::raise_fd_limit()?;
    if !a.quiet {
        eprintln!("file descriptor limit: {limit}");
    }
    let (report, hub) = if let (Some(url), Some(mqtt)) = (&a.hub_url, a.mqtt) {
        // An external hub: its admin token and CA, when its data
        // directory is on this machine; the nodes then connect with
        // certificates from that CA (the hub's secure default broker).
        let data_dir = std::env::var_os("EDGEFLEET_HUB_DATA_DIR").map(std::path::PathBuf::from);
        let ep = HubEndpoint {
            http_base: url.clone(),
            mqtt_host: mqtt.ip().to_string(),
            mqtt_port: mqtt.port(),
            mqtt_tls: data_dir.is_some(),
            pid: a.hub_pid,
            broker_pid: None,
            broker: BrokerKind::External,
            in_process: false,
            data_dir,
        };
        (sim::hollow::run(&opts, &ep).await, None)
    } else {
        hollow_on_stack(&a, &opts).await?
    };
    let report = report?;
    if let Some(path) = &a.report {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{}", report.summary());
    if let Some(bin) = hub {
        println!("hub process: {}", bin.display());
    }
    Ok(if report.all_converged {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The hollow run's options from the command line.
fn hollow_options(a: &HollowArgs) -> HollowOptions {
    HollowOptions {
        nodes: a.nodes,
        node_prefix: a.node_prefix.clone(),
        connect_concurrency: a.connect_concurrency,
        put_concurrency: a.put_concurrency,
        rounds: a.rounds,
        report_interval: Duration::from_millis(a.report_interval_ms),
        keep_alive: Duration::from_secs(a.keep_alive_s),
        mqtt_connect_timeout: Duration::from_secs(a.mqtt_connect_timeout_s),
        registry_poll: Duration::from_millis(a.registry_poll_ms),
        connect_timeout: Duration::from_secs(a.connect_timeout_s),
        round_timeout: Duration::from_secs(a.round_timeout_s),
        progress: !a.quiet,
        rollout: a
            .rollout_waves
            .clone()
            .map(|waves| sim::hollow::rollout::RolloutOptions {
                waves,
                bake: Duration::from_millis(a.rollout_bake_ms),
                max_concurrent: a.rollout_max_concurrent,
                ..sim::hollow::rollout::RolloutOptions::default()
            }),
    }
}

/// The stack (hub process, and Mosquitto with `--broker mosquitto`) to start
/// for `nodes` hollow nodes.
fn stack_options(a: &HollowArgs, nodes: usize) -> anyhow::Result<StackOptions> {
    let (hub_bin, hub_args) = match &a.hub_bin {
        Some(b) => (b.clone(), vec!["serve".to_owned()]),
        None => (
            std::env::current_exe().context("locating fleet-sim itself")?,
            vec!["hub".to_owned()],
        ),
    };
    if a.broker != BrokerArg::Mosquitto
        && (a.mosquitto_bin.is_some() || a.mosquitto_max_queued.is_some())
    {
        anyhow::bail!("--mosquitto-bin and --mosquitto-max-queued need --broker mosquitto");
    }
    let mut mosquitto = MosquittoOptions::for_fleet(nodes);
    mosquitto.bin.clone_from(&a.mosquitto_bin);
    if let Some(q) = a.mosquitto_max_queued {
        mosquitto.max_queued_messages = q;
    }
    Ok(StackOptions {
        hub_bin,
        hub_args,
        hub_config: cloud_hub::HubConfig::load(a.hub_config.as_deref(), |_| None)?,
        hub_log: a.hub_log.clone(),
        hub_ready_timeout: Duration::from_secs(30),
        broker: match a.broker {
            BrokerArg::Embedded => BrokerKind::Embedded,
            BrokerArg::Mosquitto => BrokerKind::Mosquitto,
        },
        mosquitto,
        nodes,
        mqtt_tls: !a.plain_mqtt,
    })
}

/// What a hollow run against a started stack gives: the run's outcome and
/// the hub binary.
type StackOutcome = (
    Result<sim::hollow::HollowReport, sim::hollow::HollowError>,
    Option<PathBuf>,
);

/// Starts the stack, runs the hollow fleet against it (Ctrl-C or SIGTERM
/// stop it), and stops the stack again.
async fn hollow_on_stack(a: &HollowArgs, opts: &HollowOptions) -> anyhow::Result<StackOutcome> {
    let so = stack_options(a, opts.nodes)?;
    let mut stack = Stack::start(&so).await?;
    let so_broker_version = stack.broker_version().map(str::to_owned);
    if !a.quiet {
        print_stack(&stack, &so);
    }
    // Ctrl-C or SIGTERM stop the run, and then hub and broker: a process
    // that died of the signal would leave both running.
    let outcome = tokio::select! {
        r = sim::hollow::run(opts, stack.endpoint()) => Some(r),
        () = interrupted() => None,
    };
    let alive = stack.check_alive();
    let keep = a.keep_hub_dir || matches!(outcome, Some(Err(_))) || alive.is_err();
    for d in stack.stop(keep).await {
        eprintln!("directory kept: {}", d.display());
    }
    let Some(mut r) = outcome else {
        anyhow::bail!("interrupted; hub and broker stopped");
    };
    if let Ok(report) = &mut r {
        report.broker_version = so_broker_version;
    }
    alive?;
    Ok((r, Some(so.hub_bin)))
}

/// The started hub and broker, on stderr.
fn print_stack(stack: &Stack, so: &StackOptions) {
    let ep = stack.endpoint();
    eprintln!(
        "hub: {} {} (pid {:?}), REST {}, MQTT {}:{}, log {}",
        so.hub_bin.display(),
        so.hub_args.join(" "),
        ep.pid,
        ep.http_base,
        ep.mqtt_host,
        ep.mqtt_port,
        stack.hub_log().display()
    );
    if let Some(m) = stack.mosquitto() {
        eprintln!(
            "broker: {} (pid {:?}), {}, log {}",
            m.bin().display(),
            m.pid(),
            stack.broker_version().unwrap_or("version unknown"),
            m.log().display()
        );
    }
}
