//! `cloud-hub`: the control-plane binary. Parses flags and config, starts
//! tracing, runs [`cloud_hub::App`] until SIGINT / SIGTERM
//! ([`edgefleet_shell::shutdown_signal`]), then lets it drain (final sink
//! flush, last acks) and exits 0. Bad usage or configuration exits 64.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cloud_hub::HubConfig;
use tracing::info;

#[derive(Parser)]
#[command(name = "cloud-hub", version, about = "edgefleet control plane")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve: embedded broker (unless configured otherwise), registry, ingest, REST API.
    Serve {
        /// TOML config file (defaults are used for anything it leaves out).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Data directory (overrides file and EDGEFLEET_HUB_DATA_DIR).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// REST API address (overrides file and EDGEFLEET_HUB_HTTP_LISTEN).
        #[arg(long)]
        http: Option<SocketAddr>,
        /// Embedded broker address (overrides file and EDGEFLEET_HUB_MQTT_LISTEN).
        #[arg(long)]
        mqtt: Option<SocketAddr>,
    },
}

/// Log filter unless `RUST_LOG` says otherwise.
const DEFAULT_LOG: &str = "info,rumqttd=warn,rumqttc=warn,sled=warn";

fn main() -> ExitCode {
    edgefleet_shell::install_crypto_provider();
    edgefleet_shell::init_tracing(DEFAULT_LOG);
    let cfg = match config(Cli::parse().cmd) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cloud-hub: {e}");
            return ExitCode::from(edgefleet_shell::EX_USAGE);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cloud-hub: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(serve(cfg))
}

/// Defaults < file < environment < flags, validated.
fn config(cmd: Cmd) -> Result<HubConfig, String> {
    let Cmd::Serve {
        config,
        data_dir,
        http,
        mqtt,
    } = cmd;
    let mut c =
        HubConfig::load(config.as_deref(), |k| std::env::var(k).ok()).map_err(|e| e.to_string())?;
    if let Some(d) = data_dir {
        c.data_dir = d;
    }
    if let Some(h) = http {
        c.http_listen = h;
    }
    if let Some(m) = mqtt {
        c.embedded_broker
            .get_or_insert_with(Default::default)
            .listen = m;
    }
    c.validate()
        .map_err(|e| format!("invalid configuration: {e}"))?;
    Ok(c)
}

/// Runs the hub until SIGINT or SIGTERM, then lets it drain.
async fn serve(cfg: HubConfig) -> ExitCode {
    // Before the hub starts, so a signal during startup stops it cleanly.
    let stop = edgefleet_shell::shutdown_signal();
    let stop = async move {
        let signal = stop.await;
        info!(?signal, "signal received");
    };
    let started = |app: &cloud_hub::App| {
        println!(
            "cloud-hub: REST API on {}  MQTT on {}:{}",
            app.http_url(),
            app.mqtt_addr().0,
            app.mqtt_addr().1
        );
    };
    match cloud_hub::app::serve(cfg, stop, started).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloud-hub: {e}");
            ExitCode::FAILURE
        }
    }
}
