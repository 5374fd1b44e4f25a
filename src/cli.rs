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
use crate::engine::{Engine, EngineOptions, Provider};
use crate::provider::docker::{DockerOptions, DockerProvider};
use crate::provider::local::{LayerMode, LocalOptions, LocalProvider};
use crate::transport;
use crate::transport::nats::{ClientCertificate, NatsAuth, NatsOptions, NatsTls, Secret};

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

/// Base image of docker workspaces when the configuration names none.
pub const DEFAULT_BASE_IMAGE: &str = "debian:bookworm-slim";

/// Most spare containers per layer image; each one is a started container that uses memory.
const MAX_SPARE_CONTAINERS: u64 = 8;

/// Help heading of the flags that only `-s nats` reads.
const NATS_HEADING: &str = "NATS server mode (-s nats)";

/// Command-line flags.
#[derive(Debug, Parser)]
#[command(
    name = "derrick",
    version,
    about = "Provision isolated, snapshot-backed workspaces for AI coding agents"
)]
pub struct Cli {
    /// The provisioning mode, which decides where workspaces are created.
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

    /// Bearer token that HTTP clients must send (`Authorization: Bearer <token>`) on every
    /// endpoint but `/health`; required to listen on a non-loopback address.
    #[arg(long, env = AUTH_TOKEN_VARIABLE, hide_env_values = true)]
    pub auth_token: Option<String>,

    /// Seconds after which a setup script is killed and the create fails [default: no limit].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_SETUP_TIMEOUT_SECONDS))]
    pub setup_timeout: Option<u64>,

    /// Base image of docker workspaces when the configuration has no `base_image`.
    #[arg(long, default_value = DEFAULT_BASE_IMAGE)]
    pub base_image: String,

    /// Started containers kept ready per layer image (docker), so that a reset or a warm create
    /// does not wait for a container to start; 0 turns them off.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=MAX_SPARE_CONTAINERS))]
    pub spare_containers: u64,

    #[command(flatten)]
    pub nats: NatsFlags,
}

/// Flags of the NATS transport. Secrets are `Secret`s, so printing the flags never shows them.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = NATS_HEADING)]
pub struct NatsFlags {
    /// NATS server URL; several servers are separated by commas.
    #[arg(long = "nats-url", default_value = transport::nats::DEFAULT_URL)]
    pub url: String,

    /// First token(s) of every subject: requests go to `<prefix>.health`,
    /// `<prefix>.workspaces.create`, and so on.
    #[arg(long = "nats-subject-prefix", default_value = transport::nats::DEFAULT_SUBJECT_PREFIX)]
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
    if cli.provisioning_mode == ProvisioningMode::RemoteNats {
        bail!(
            "provisioning mode `{}` is not available in this build; use `-p local` or `-p docker`",
            mode_name(cli.provisioning_mode)
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

    if cli.server_mode == ServerMode::Nats {
        cli.nats.to_options().validate()?;
    }

    let (engine, docker) = build_engine(&cli).await?;
    let engine = Arc::new(engine);
    if let Some(docker) = &docker {
        // Containers whose workspace has no record belong to no one; spares of a stopped
        // derrick are among them.
        let known = engine.record_ids().await?;
        for name in docker.remove_unknown(&known).await? {
            tracing::warn!(container = %name, "removed a container left by an earlier run");
        }
    }
    engine.remove_leftovers().await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    tokio::spawn(interrupt_on_shutdown(engine.clone(), shutdown.clone()));
    let served = serve(&cli, engine.clone(), shutdown).await;
    engine.shutdown().await;
    if let Some(docker) = &docker {
        docker.remove_spares().await;
    }
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

/// Loads the configuration and builds the provider and the engine over it. The docker provider
/// comes back too, for its start-up and shutdown clean-ups.
async fn build_engine(cli: &Cli) -> anyhow::Result<(Engine, Option<Arc<DockerProvider>>)> {
    let mut config = config::load(&cli.workspace_config_path)?;
    let cache_dir = cli.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let state_dir = cli.state_dir.clone().unwrap_or_else(default_state_dir);
    let (provider, docker): (Arc<dyn Provider>, _) = match cli.provisioning_mode {
        ProvisioningMode::Docker => {
            // The default image enters the configuration, and with it the base layer key, so
            // derricks with different defaults never share layers.
            let base_image = config
                .base_image
                .get_or_insert_with(|| cli.base_image.clone());
            let options = DockerOptions {
                cache_dir: cache_dir.clone(),
                state_dir: state_dir.clone(),
                base_image: base_image.clone(),
                settings: config.docker.clone(),
                spare_containers: usize::try_from(cli.spare_containers).unwrap_or(1),
            };
            let docker = Arc::new(
                DockerProvider::connect(options)
                    .await
                    .context("cannot start the docker provider")?,
            );
            (docker.clone() as Arc<dyn Provider>, Some(docker))
        }
        _ => (
            Arc::new(local_provider(cli, &cache_dir)?) as Arc<dyn Provider>,
            None,
        ),
    };
    info!(provider = %provider.kind(), cache_dir = %cache_dir.display(), state_dir = %state_dir.display(), "provider ready");

    let options = EngineOptions {
        config,
        cache_dir,
        state_dir,
        setup_timeout: cli.setup_timeout.map(Duration::from_secs),
    };
    Ok((Engine::new(options, provider)?, docker))
}

fn local_provider(cli: &Cli, cache_dir: &std::path::Path) -> anyhow::Result<LocalProvider> {
    let layer_mode = match cli.layers {
        LayersFlag::Auto => LayerMode::Auto,
        LayersFlag::Overlay => LayerMode::Overlay,
        LayersFlag::Copy => LayerMode::Copy,
    };
    LocalProvider::new(LocalOptions {
        cache_dir: cache_dir.to_path_buf(),
        layer_mode,
    })
    .with_context(|| format!("cannot start the local provider in {}", cache_dir.display()))
}

/// Serves the engine over the chosen transport until `shutdown`.
async fn serve(cli: &Cli, engine: Arc<Engine>, shutdown: CancellationToken) -> anyhow::Result<()> {
    match cli.server_mode {
        ServerMode::Http => transport::http::serve(
            transport::http::AppState {
                engine,
                auth_token: cli.auth_token.as_deref().map(Arc::from),
            },
            cli.listen,
            shutdown,
        )
        .await
        .with_context(|| format!("cannot serve HTTP on {}", cli.listen)),
        // The error names the URL (without user info) and what to check.
        ServerMode::Nats => {
            Ok(transport::nats::serve(engine, cli.nats.to_options(), shutdown).await?)
        }
    }
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
