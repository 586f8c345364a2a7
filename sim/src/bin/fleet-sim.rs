//! `fleet-sim`: the edgefleet fleet simulator.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

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
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                // The OPC UA client logs every refused reconnect at ERROR;
                // devices going down is part of the plan here.
                "warn,opcua_client=off,opcua_server=off,opcua_core=off".into()
            }),
        )
        .init();
    let cli = Cli::parse();
    // Validate scenarios before starting a runtime: bad input exits 64.
    let scenario = if let Cmd::Run { scenario, .. } = &cli.cmd {
        match sim::scenario::Scenario::load(scenario) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("fleet-sim: {e}");
                return ExitCode::from(64);
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
        Cmd::Hub { config } => rt.block_on(serve_hub(config)),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_hub(config: PathBuf) -> anyhow::Result<()> {
    let cfg = cloud_hub::HubConfig::load(Some(&config), |k| std::env::var(k).ok())?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let app = cloud_hub::App::start(cfg, cancel.clone()).await?;
    let task = tokio::spawn(app.run());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    cancel.cancel();
    task.await??;
    Ok(())
}
