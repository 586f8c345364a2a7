//! `cloud-hub`: the control-plane binary. Parses flags and config, starts
//! tracing, runs [`cloud_hub::App`] until Ctrl-C / SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cloud_hub::{App, HubConfig};
use tokio_util::sync::CancellationToken;

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

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=warn,rumqttc=warn,sled=warn".into()),
        )
        .init();
    let Cmd::Serve {
        config,
        data_dir,
        http,
        mqtt,
    } = Cli::parse().cmd;
    let cfg = HubConfig::load(config.as_deref(), |k| std::env::var(k).ok())
        .map_err(|e| e.to_string())
        .map(|mut c| {
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
            c
        })
        .and_then(|c| {
            c.validate()
                .map(|()| c)
                .map_err(|e| format!("invalid configuration: {e}"))
        });
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cloud-hub: {e}");
            return ExitCode::from(64);
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
    rt.block_on(async move {
        let cancel = CancellationToken::new();
        let app = match App::start(cfg, cancel.clone()).await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("cloud-hub: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!(
            "cloud-hub: REST API on http://{}  MQTT on {}:{}",
            app.http_addr(),
            app.mqtt_addr().0,
            app.mqtt_addr().1
        );
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            cancel.cancel();
        });
        match app.run().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cloud-hub: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
