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
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let Cmd::Demo {
        hub_config,
        edge_config,
        desired,
        seconds,
    } = Cli::parse().cmd;
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
    let opts = sim::demo::DemoOptions {
        hub_config,
        edge_config,
        desired,
        duration: (seconds > 0).then(|| Duration::from_secs(seconds)),
    };
    match rt.block_on(sim::demo::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}
