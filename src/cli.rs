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
use crate::nats_client::{ClientCertificate, NatsAuth, NatsOptions, NatsTls, Secret};
use crate::provider::local::{LayerMode, LocalOptions, LocalProvider};
use crate::provider::remote_nats::RemoteNats;
use crate::service::Service;
use crate::transport;
use crate::transport::nats::WorkerIdentity;

/// Largest `--setup-timeout`: one week, far beyond any real setup, and small enough that adding it
/// to a clock reading cannot overflow.
const MAX_SETUP_TIMEOUT_SECONDS: u64 = 7 * 24 * 3600;

/// Default HTTP address: loopback only, the port of the original derrick.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50080";

/// Environment variable that may hold the NATS token instead of `--nats-token`.
pub const NATS_TOKEN_VARIABLE: &str = "DERRICK_NATS_TOKEN";

/// Environment variable that contains the HTTP API token, an alternative to `--auth-token`.
pub const AUTH_TOKEN_VARIABLE: &str = "DERRICK_AUTH_TOKEN";

/// Environment variable that may hold the NATS password instead of `--nats-password`.
pub const NATS_PASSWORD_VARIABLE: &str = "DERRICK_NATS_PASSWORD";

/// Help heading of the NATS flags.
const NATS_HEADING: &str = "NATS (-s nats, -p remote_nats and derrick worker)";

/// Command-line flags. Without a subcommand derrick serves controllers; `derrick worker` serves
/// a `remote_nats` controller.
#[derive(Debug, Parser)]
#[command(
    name = "derrick",
    version,
    about = "Provision isolated, snapshot-backed workspaces for AI coding agents",
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// The provisioning mode, which decides where workspaces are created: on this machine, or on
    /// `derrick worker` processes reached over NATS (`remote_nats`).
    #[arg(
        short = 'p',
        long = "provisioning-mode",
        value_enum,
        default_value = "local"
    )]
    pub provisioning_mode: ProvisioningMode,

    /// The transport that controllers use.
    #[arg(short = 's', long = "server-mode", value_enum, default_value = "http")]
    pub server_mode: ServerMode,

    /// Workspace configuration file (JSON).
    #[arg(short = 'w', long = "workspace-config-path", required = true)]
    pub workspace_config_path: Option<PathBuf>,

    /// Address of the HTTP server; only loopback addresses are accepted.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Bearer token that HTTP clients must send (`Authorization: Bearer <token>`) on every
    /// endpoint but `/health`; required to listen on a non-loopback address.
    #[arg(long, env = AUTH_TOKEN_VARIABLE, hide_env_values = true)]
    pub auth_token: Option<String>,

    #[command(flatten)]
    pub engine: EngineFlags,

    #[command(flatten)]
    pub nats: NatsFlags,
}

/// Subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Serve provisioning over NATS for a controller started with `-p remote_nats`.
    Worker(WorkerArgs),
}

/// Flags of `derrick worker`.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// The provider that runs this worker's workspaces: `local` or `docker`.
    #[arg(
        short = 'p',
        long = "provisioning-mode",
        value_enum,
        default_value = "local"
    )]
    pub provisioning_mode: ProvisioningMode,

    /// Workspace configuration file (JSON); every worker of a controller serves the same one.
    #[arg(short = 'w', long = "workspace-config-path")]
    pub workspace_config_path: PathBuf,

    /// Id of this worker in subjects and logs: letters, digits, `-` and `_`, unique among the
    /// workers of one subject prefix [default: `worker-` and 12 random hexadecimal digits].
    #[arg(long)]
    pub worker_id: Option<String>,

    #[command(flatten)]
    pub engine: EngineFlags,

    #[command(flatten)]
    pub nats: NatsFlags,
}

/// Flags of the engine that runs workspaces on this machine.
#[derive(Debug, clap::Args)]
pub struct EngineFlags {
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
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_SETUP_TIMEOUT_SECONDS))]
    pub setup_timeout: Option<u64>,
}

/// Flags of the NATS transport. Secrets are `Secret`s, so printing the flags never shows them.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = NATS_HEADING)]
pub struct NatsFlags {
    /// NATS server URL; several servers are separated by commas.
    #[arg(long = "nats-url", default_value = crate::nats_client::DEFAULT_URL)]
    pub url: String,

    /// First token(s) of every subject: requests go to `<prefix>.health`,
    /// `<prefix>.workspaces.create`, and so on.
    #[arg(long = "nats-subject-prefix", default_value = crate::nats_client::DEFAULT_SUBJECT_PREFIX)]
    pub subject_prefix: String,

    /// Token for a server started with `--auth` (or `authorization { token }`).
    #[arg(
        long = "nats-token",
        env = NATS_TOKEN_VARIABLE,
        hide_env_values = true,
        conflicts_with_all = ["user", "credentials"]
    )]
    pub token: Option<Secret>,

    /// User name; needs `--nats-password`.
    #[arg(
        long = "nats-user",
        requires = "password",
        conflicts_with = "credentials"
    )]
    pub user: Option<String>,

    /// Password of `--nats-user`.
    #[arg(
        long = "nats-password",
        env = NATS_PASSWORD_VARIABLE,
        hide_env_values = true,
        requires = "user"
    )]
    pub password: Option<Secret>,

    /// Credentials file (user JWT and NKey seed) as `nsc` writes it.
    #[arg(long = "nats-credentials", value_name = "FILE")]
    pub credentials: Option<PathBuf>,

    /// PEM file of the CA that signed the server's certificate; implies TLS.
    #[arg(long = "nats-tls-ca", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,

    /// PEM client certificate for servers that verify clients; needs `--nats-tls-key`.
    #[arg(long = "nats-tls-cert", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of `--nats-tls-cert`.
    #[arg(long = "nats-tls-key", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Refuse to connect without TLS.
    #[arg(long = "nats-tls-required")]
    pub tls_required: bool,
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

/// Runs derrick with the given flags until SIGTERM or Ctrl-C.
///
/// # Errors
/// Fails on an invalid configuration, a mode that this build lacks, or a server that cannot start.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::Worker(worker)) = cli.command {
        return run_worker(worker).await;
    }
    let Some(config_path) = cli.workspace_config_path.clone() else {
        bail!("missing -w/--workspace-config-path; give the workspace configuration file");
    };
    if cli.provisioning_mode == ProvisioningMode::Docker {
        bail!(
            "provisioning mode `docker` is not available in this build; use `-p local` or `-p remote_nats`"
        );
    }
    if cli
        .auth_token
        .as_deref()
        .is_some_and(|token| token.trim().is_empty())
    {
        bail!(
            "--auth-token (or {AUTH_TOKEN_VARIABLE}) is empty; give a non-empty secret or leave it unset"
        );
    }
    if cli.server_mode == ServerMode::Http
        && !cli.listen.ip().is_loopback()
        && cli.auth_token.is_none()
    {
        bail!(
            "--listen {} is not a loopback address; set --auth-token (or {AUTH_TOKEN_VARIABLE}) so that clients must authenticate, or listen on 127.0.0.1 or ::1",
            cli.listen
        );
    }

    let remote = cli.provisioning_mode == ProvisioningMode::RemoteNats;
    if cli.server_mode == ServerMode::Nats || remote {
        cli.nats.to_options().validate()?;
    }
    let config = config::load(&config_path)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    if remote {
        // The workers own the workspaces, so a stopping controller leaves them as they are.
        let remote = RemoteNats::connect(&cli.nats.to_options(), &config.name).await?;
        serve(&cli, Arc::new(remote), shutdown).await?;
        info!("stopped");
        return Ok(());
    }

    let engine = Arc::new(build_engine(config, &cli.engine)?);
    engine.remove_leftovers().await?;
    tokio::spawn(interrupt_on_shutdown(engine.clone(), shutdown.clone()));
    let served = serve(&cli, engine.clone(), shutdown).await;
    engine.shutdown().await;
    served?;
    info!("stopped");
    Ok(())
}

/// Runs `derrick worker` until SIGTERM or Ctrl-C, then destroys the worker's workspaces.
async fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    match args.provisioning_mode {
        ProvisioningMode::Local => {}
        ProvisioningMode::Docker => {
            bail!("provisioning mode `docker` is not available in this build; use `-p local`")
        }
        ProvisioningMode::RemoteNats => bail!(
            "a worker runs workspaces itself, so `-p remote_nats` is for controllers; give the worker `-p local` or `-p docker`"
        ),
    }
    let options = args.nats.to_options();
    options.validate()?;
    let id = args
        .worker_id
        .clone()
        .unwrap_or_else(WorkerIdentity::generate_id);
    if !crate::api::worker::is_valid_id(&id) {
        bail!(
            "invalid --worker-id `{id}`; use letters, digits, `-` and `_` (not `create`, `list` or `heartbeat`)"
        );
    }
    let config = config::load(&args.workspace_config_path)?;
    let config_name = config.name.clone();
    let engine = Arc::new(build_engine(config, &args.engine)?);
    let identity = WorkerIdentity {
        id,
        config: config_name,
        provider: engine.provider_kind().to_owned(),
    };
    engine.remove_leftovers().await?;

    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    tokio::spawn(interrupt_on_shutdown(engine.clone(), shutdown.clone()));
    let served = transport::nats::serve_worker(engine.clone(), options, identity, shutdown).await;
    engine.shutdown().await;
    served?;
    info!("stopped");
    Ok(())
}

impl NatsFlags {
    /// Converts the flags into the transport's options.
    pub fn to_options(&self) -> NatsOptions {
        let auth = match (&self.token, &self.user, &self.password, &self.credentials) {
            (Some(token), ..) => NatsAuth::Token(token.clone()),
            (None, Some(user), Some(password), _) => NatsAuth::UserPassword {
                user: user.clone(),
                password: password.clone(),
            },
            (None, _, _, Some(path)) => NatsAuth::CredentialsFile(path.clone()),
            _ => NatsAuth::None,
        };
        let client_certificate = match (&self.tls_cert, &self.tls_key) {
            (Some(certificate), Some(key)) => Some(ClientCertificate {
                certificate: certificate.clone(),
                key: key.clone(),
            }),
            _ => None,
        };
        NatsOptions {
            url: self.url.clone(),
            subject_prefix: self.subject_prefix.clone(),
            auth,
            tls: NatsTls {
                ca_file: self.tls_ca.clone(),
                client_certificate,
                required: self.tls_required,
            },
        }
    }
}

/// Builds the local provider and the engine over it.
fn build_engine(config: config::WorkspaceConfig, flags: &EngineFlags) -> anyhow::Result<Engine> {
    let cache_dir = flags.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let state_dir = flags.state_dir.clone().unwrap_or_else(default_state_dir);
    let layer_mode = match flags.layers {
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
        setup_timeout: flags.setup_timeout.map(Duration::from_secs),
    };
    Ok(Engine::new(options, Arc::new(provider))?)
}

/// Serves `service` over the chosen transport until `shutdown`.
async fn serve(
    cli: &Cli,
    service: Arc<dyn Service>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    match cli.server_mode {
        ServerMode::Http => transport::http::serve(
            transport::http::AppState {
                service,
                auth_token: cli.auth_token.as_deref().map(Arc::from),
            },
            cli.listen,
            shutdown,
        )
        .await
        .with_context(|| format!("cannot serve HTTP on {}", cli.listen)),
        // The error names the URL (without user info) and what to check.
        ServerMode::Nats => {
            Ok(transport::nats::serve(service, cli.nats.to_options(), shutdown).await?)
        }
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

/// Kills the workspaces' running commands and setup scripts once shutdown starts, so that the
/// transports' graceful shutdown, which waits for running requests, ends promptly.
async fn interrupt_on_shutdown(engine: Arc<Engine>, shutdown: CancellationToken) {
    shutdown.cancelled().await;
    engine.interrupt().await;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(flags: &[&str]) -> Result<Cli, clap::Error> {
        let mut args = vec!["derrick", "-s", "nats", "-w", "config.json"];
        args.extend_from_slice(flags);
        Cli::try_parse_from(args)
    }

    #[test]
    fn nats_defaults() {
        let options = parse(&[]).expect("valid flags").nats.to_options();
        assert_eq!(options.url, "nats://127.0.0.1:4222");
        assert_eq!(options.subject_prefix, "derrick");
        assert!(matches!(options.auth, NatsAuth::None));
        assert!(!options.tls.required);
    }

    #[test]
    fn nats_authentication_flags() {
        let token = parse(&["--nats-token", "t0ken"]).expect("token");
        let NatsAuth::Token(secret) = token.nats.to_options().auth else {
            panic!("not token authentication: {token:?}");
        };
        assert_eq!(secret.expose(), "t0ken");
        assert!(!format!("{token:?}").contains("t0ken"));

        let user = parse(&["--nats-user", "agent", "--nats-password", "pa55"]).expect("user");
        let NatsAuth::UserPassword {
            user: name,
            password,
        } = user.nats.to_options().auth
        else {
            panic!("not user authentication: {user:?}");
        };
        assert_eq!((name.as_str(), password.expose()), ("agent", "pa55"));
        assert!(!format!("{user:?}").contains("pa55"));

        let credentials = parse(&["--nats-credentials", "/etc/derrick.creds"]).expect("creds");
        assert!(matches!(
            credentials.nats.to_options().auth,
            NatsAuth::CredentialsFile(path) if path == std::path::Path::new("/etc/derrick.creds")
        ));
    }

    #[test]
    fn nats_tls_flags() {
        let flags = [
            "--nats-tls-ca",
            "ca.pem",
            "--nats-tls-cert",
            "client.pem",
            "--nats-tls-key",
            "client.key",
            "--nats-tls-required",
        ];
        let tls = parse(&flags).expect("tls").nats.to_options().tls;
        assert_eq!(tls.ca_file, Some(PathBuf::from("ca.pem")));
        let client = tls.client_certificate.expect("client certificate");
        assert_eq!(client.certificate, PathBuf::from("client.pem"));
        assert_eq!(client.key, PathBuf::from("client.key"));
        assert!(tls.required);
    }

    #[test]
    fn inconsistent_nats_flags_are_refused() {
        let cases: [(&[&str], clap::error::ErrorKind); 4] = [
            (
                &[
                    "--nats-token",
                    "t",
                    "--nats-user",
                    "u",
                    "--nats-password",
                    "p",
                ],
                clap::error::ErrorKind::ArgumentConflict,
            ),
            (
                &["--nats-token", "t", "--nats-credentials", "c"],
                clap::error::ErrorKind::ArgumentConflict,
            ),
            (
                &["--nats-user", "u"],
                clap::error::ErrorKind::MissingRequiredArgument,
            ),
            (
                &["--nats-tls-cert", "c.pem"],
                clap::error::ErrorKind::MissingRequiredArgument,
            ),
        ];
        for (flags, kind) in cases {
            let error = parse(flags).expect_err("refused");
            assert_eq!(error.kind(), kind, "{flags:?}");
        }
    }
}
