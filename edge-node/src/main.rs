//! `edge-node`: the agent binary. Parses flags and config, starts tracing,
//! runs [`edge_node::Agent`] until SIGINT / SIGTERM
//! ([`edgefleet_shell::shutdown_signal`]). Bad usage or configuration exits 64.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edge_node::{Clock, EdgeConfig};

#[derive(Parser)]
#[command(
    name = "edge-node",
    version,
    about = "edgefleet agent for factory gateways"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent.
    Run {
        /// TOML config file (defaults are used for anything it leaves out).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Node name (overrides file and EDGEFLEET_NODE).
        #[arg(long)]
        node: Option<String>,
        /// Data directory (overrides file and EDGEFLEET_DATA_DIR).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Broker as host:port (overrides file and EDGEFLEET_MQTT_HOST/PORT).
        #[arg(long)]
        mqtt: Option<String>,
    },
    /// Print the effective configuration (defaults < file < env < flags) and exit.
    Config {
        /// TOML config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Join a hub with a one-time token (from `POST /v1/nodes/{node}/bootstrap`):
    /// makes this gateway's key, gets its certificate, writes
    /// `{data_dir}/identity/`.
    Join {
        /// The hub's REST API, `https://HOST:PORT`.
        #[arg(long)]
        hub: String,
        /// The join token `<secret>.<ca sha256>`.
        #[arg(long, env = "EDGEFLEET_JOIN_TOKEN")]
        token: String,
        /// Data directory (defaults to the config's `data_dir`).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// TOML config file (for `data_dir`).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

/// `edge-node join`.
fn join(
    hub: &str,
    token: &str,
    data_dir: Option<PathBuf>,
    config: Option<&std::path::Path>,
) -> ExitCode {
    let dir = match data_dir.map_or_else(|| load(config).map(|c| c.data_dir), Ok) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("edge-node: {e}");
            return ExitCode::from(edgefleet_shell::EX_USAGE);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edge-node: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(edge_node::identity::join(hub, token, &dir)) {
        Ok(node) => {
            println!(
                "edge-node: joined as {node}; identity in {}",
                edge_node::identity::dir(&dir).display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("edge-node: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(config: Option<&std::path::Path>) -> Result<EdgeConfig, String> {
    EdgeConfig::load(config, |k| std::env::var(k).ok()).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    edgefleet_shell::install_crypto_provider();
    edgefleet_shell::init_tracing("info,rumqttc=warn,sled=warn");
    let cli = Cli::parse();
    let (cfg, run) = match cli.cmd {
        Cmd::Join {
            hub,
            token,
            data_dir,
            config,
        } => return join(&hub, &token, data_dir, config.as_deref()),
        Cmd::Config { config } => (load(config.as_deref()), false),
        Cmd::Run {
            config,
            node,
            data_dir,
            mqtt,
        } => {
            let cfg = load(config.as_deref()).and_then(|mut c| {
                if let Some(n) = node {
                    c.node = n;
                }
                if let Some(d) = data_dir {
                    c.data_dir = d;
                }
                if let Some(m) = mqtt {
                    let (h, p) = m
                        .rsplit_once(':')
                        .ok_or_else(|| format!("--mqtt {m:?}: expected host:port"))?;
                    h.clone_into(&mut c.mqtt.host);
                    c.mqtt.port = p.parse().map_err(|e| format!("--mqtt {m:?}: port: {e}"))?;
                }
                Ok(c)
            });
            (cfg, true)
        }
    };
    let cfg = match cfg.and_then(|c| {
        c.validate()
            .map(|()| c)
            .map_err(|e| format!("invalid configuration: {e}"))
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edge-node: {e}");
            return ExitCode::from(edgefleet_shell::EX_USAGE);
        }
    };
    if !run {
        println!("{}", toml::to_string_pretty(&cfg).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edge-node: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        // Before the agent starts, so a signal during startup stops it cleanly.
        let stop = edgefleet_shell::shutdown_signal();
        let stop = async move {
            stop.await;
        };
        match edge_node::agent::serve(cfg, Clock::system(), stop).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("edge-node: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
