//! The command line: parses flags, builds the provider, the engine and the transport, and serves.
//!
//! Invariant: this is the only module that names concrete providers and transports.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config;
use crate::engine::{Engine, EngineOptions};
use crate::provider::local::{LayerMode, LocalOptions, LocalProvider};
use crate::transport;

/// Default HTTP address: loopback only, the port of the original derrick.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50080";

/// Command-line flags.
#[derive(Debug, Parser)]
#[command(
    name = "derrick",
    version,
    about = "Provision isolated, snapshot-backed workspaces for AI coding agents"
)]
pub struct Cli {
    /// Where workspaces live.
    #[arg(
        short = 'p',
        long = "provisioning-mode",
        value_enum,
        default_value = "local"
    )]
    pub provisioning_mode: ProvisioningMode,

    /// How controllers reach derrick.
    #[arg(short = 's', long = "server-mode", value_enum, default_value = "http")]
    pub server_mode: ServerMode,

    /// Workspace configuration file (JSON).
    #[arg(short = 'w', long = "workspace-config-path")]
    pub workspace_config_path: PathBuf,

    /// Address of the HTTP server; only loopback addresses are accepted.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Folder for layers, Git mirrors and workspace scratch data [default: <user cache dir>/derrick].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,

    /// Folder for workspace records [default: <user state dir>/derrick].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,

    /// Layer storage of the local provider: overlay mounts, plain copies, or overlay when the
    /// system allows it.
    #[arg(long, value_enum, default_value = "auto")]
    pub layers: LayersFlag,

    /// Seconds after which a setup script is killed and the create fails [default: no limit].
    #[arg(long)]
    pub setup_timeout: Option<u64>,
}

/// `-p` values, as in the original derrick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum ProvisioningMode {
    Local,
    Docker,
    RemoteNats,
}

/// `-s` values, as in the original derrick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ServerMode {
    Http,
    Nats,
}

/// `--layers` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LayersFlag {
    Auto,
    Overlay,
    Copy,
}

/// Runs derrick as the flags say, until SIGTERM or Ctrl-C.
///
/// # Errors
/// Fails on an invalid configuration, a mode that this build lacks, or a server that cannot start.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.provisioning_mode != ProvisioningMode::Local {
        bail!(
            "provisioning mode `{}` is not available in this build; use `-p local`",
            mode_name(cli.provisioning_mode)
        );
    }
    if cli.server_mode != ServerMode::Http {
        bail!("server mode `nats` is not available in this build; use `-s http`");
    }
    if !cli.listen.ip().is_loopback() {
        bail!(
            "--listen {} is not a loopback address; derrick has no authentication yet, so it serves only 127.0.0.1 or ::1",
            cli.listen
        );
    }

    let config = config::load(&cli.workspace_config_path)?;
    let cache_dir = cli.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let state_dir = cli.state_dir.clone().unwrap_or_else(default_state_dir);
    let layer_mode = match cli.layers {
        LayersFlag::Auto => LayerMode::Auto,
        LayersFlag::Overlay => LayerMode::Overlay,
        LayersFlag::Copy => LayerMode::Copy,
    };
    let provider = LocalProvider::new(LocalOptions {
        cache_dir: cache_dir.clone(),
        layer_mode,
    })
    .with_context(|| format!("cannot start the local provider in {}", cache_dir.display()))?;
    info!(provider = %crate::engine::Provider::kind(&provider), cache_dir = %cache_dir.display(), state_dir = %state_dir.display(), "provider ready");

    let options = EngineOptions {
        config,
        cache_dir,
        state_dir,
        setup_timeout: cli.setup_timeout.map(Duration::from_secs),
    };
    let engine = Arc::new(Engine::new(options, Arc::new(provider))?);
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    transport::http::serve(engine.clone(), cli.listen, shutdown)
        .await
        .with_context(|| format!("cannot serve HTTP on {}", cli.listen))?;
    engine.shutdown().await;
    info!("stopped");
    Ok(())
}

fn mode_name(mode: ProvisioningMode) -> &'static str {
    match mode {
        ProvisioningMode::Local => "local",
        ProvisioningMode::Docker => "docker",
        ProvisioningMode::RemoteNats => "remote_nats",
    }
}

fn default_cache_dir() -> PathBuf {
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("derrick")
}

fn default_state_dir() -> PathBuf {
    dirs::state_dir()
        .unwrap_or_else(|| default_cache_dir().join("state"))
        .join("derrick")
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(error = %error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("interrupt received, shutting down"),
        () = terminate => info!("SIGTERM received, shutting down"),
    }
    shutdown.cancel();
}
