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
use crate::engine::cache::{self, CacheLock, Usage};
use crate::engine::record::RecordStore;
use crate::engine::{Engine, EngineOptions, Provider};
use crate::nats_client::{ClientCertificate, NatsAuth, NatsOptions, NatsTls, Secret};
use crate::provider::docker::{DockerOptions, DockerProvider};
use crate::provider::local::{LayerMode, LocalOptions, LocalProvider};
use crate::provider::remote_nats::RemoteNats;
use crate::service::Service;
use crate::transport;
use crate::transport::nats::WorkerIdentity;

/// Largest `--setup-timeout`: one week, far beyond any real setup, and small enough that adding it
/// to a clock reading cannot overflow.
const MAX_SETUP_TIMEOUT_SECONDS: u64 = 7 * 24 * 3600;

/// Default `--max-workspaces`. Each workspace costs a mount, a folder and a record, so the limit
/// keeps a runaway controller from filling the host. Hosts built for more can raise it.
const DEFAULT_MAX_WORKSPACES: u64 = 256;

/// Largest `--idle-timeout`: thirty days.
const MAX_IDLE_TIMEOUT_SECONDS: u64 = 30 * 24 * 3600;

/// Default `--shutdown-grace`: as long as `docker stop` waits before it kills.
const DEFAULT_SHUTDOWN_GRACE_SECONDS: u64 = 10;

/// Largest `--shutdown-grace`: an hour, longer than a supervisor waits before SIGKILL anyway.
const MAX_SHUTDOWN_GRACE_SECONDS: u64 = 3600;

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

/// Base image of docker workspaces when the configuration names none.
pub const DEFAULT_BASE_IMAGE: &str = "debian:bookworm-slim";

/// Most spare containers per layer image; each one is a started container that uses memory.
const MAX_SPARE_CONTAINERS: u64 = 8;

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
    /// An operator command, or a worker, instead of serving controllers.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// The transport that controllers use.
    #[arg(short = 's', long = "server-mode", value_enum, default_value = "http")]
    pub server_mode: ServerMode,

    /// Workspace configuration file (JSON).
    #[arg(short = 'w', long = "workspace-config-path", required = true)]
    pub workspace_config_path: Option<PathBuf>,

    #[command(flatten)]
    pub store: StoreFlags,

    #[command(flatten)]
    pub engine: EngineFlags,

    /// Address of the HTTP server; a non-loopback address needs --auth-token.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Bearer token that HTTP clients must send (`Authorization: Bearer <token>`) on every
    /// endpoint but `/health`; required to listen on a non-loopback address.
    #[arg(long, env = AUTH_TOKEN_VARIABLE, hide_env_values = true)]
    pub auth_token: Option<String>,

    #[command(flatten)]
    pub nats: NatsFlags,
}

/// Storage flags: the provider and the folders of workspaces and layers. Shared by serving,
/// `worker`, `warm` and `cache`.
#[derive(Debug, clap::Args)]
pub struct StoreFlags {
    /// The provisioning mode, which decides where workspaces are created: on this machine, or on
    /// `derrick worker` processes reached over NATS (`remote_nats`, for serving only).
    #[arg(
        short = 'p',
        long = "provisioning-mode",
        value_enum,
        default_value = "local"
    )]
    pub provisioning_mode: ProvisioningMode,

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

    /// Size in bytes above which the least recently used layers that no workspace uses are
    /// evicted after each new layer [default: no limit].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub cache_max_bytes: Option<u64>,

    /// Base image of docker workspaces when the configuration has no `base_image`.
    #[arg(long, default_value = DEFAULT_BASE_IMAGE)]
    pub base_image: String,

    /// Started containers kept ready per layer image (docker), so that a reset or a warm create
    /// does not wait for a container to start; 0 turns them off.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=MAX_SPARE_CONTAINERS))]
    pub spare_containers: u64,
}

/// Settings of an engine that serves workspaces: derrick serving locally, or a worker.
#[derive(Debug, clap::Args)]
pub struct EngineFlags {
    /// Seconds after which a setup script is killed and the create fails [default: no limit].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_SETUP_TIMEOUT_SECONDS))]
    pub setup_timeout: Option<u64>,

    /// Largest number of workspaces; a create beyond it gets `429 workspace_limit_reached`.
    #[arg(long, default_value_t = DEFAULT_MAX_WORKSPACES, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_workspaces: u64,

    /// Seconds after which a workspace that no request has named is destroyed [default: never].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_IDLE_TIMEOUT_SECONDS))]
    pub idle_timeout: Option<u64>,

    /// Seconds that a shutdown (SIGTERM, Ctrl-C) lets running requests finish before it kills
    /// their commands.
    #[arg(long, default_value_t = DEFAULT_SHUTDOWN_GRACE_SECONDS, value_parser = clap::value_parser!(u64).range(0..=MAX_SHUTDOWN_GRACE_SECONDS))]
    pub shutdown_grace: u64,
}

/// Subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Serve provisioning over NATS for a controller started with `-p remote_nats`.
    Worker(Box<WorkerArgs>),
    /// Build the clean snapshot of a configuration and exit, for cache-warming jobs.
    Warm(WarmArgs),
    /// Inspect or prune the layer cache.
    #[command(subcommand)]
    Cache(CacheCommand),
}

/// Flags of `derrick worker`.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Workspace configuration file (JSON); every worker of a controller serves the same one.
    #[arg(short = 'w', long = "workspace-config-path")]
    pub workspace_config_path: PathBuf,

    /// Id of this worker in subjects and logs: letters, digits, `-` and `_`, unique among the
    /// workers of one subject prefix [default: `worker-` and 12 random hexadecimal digits].
    #[arg(long)]
    pub worker_id: Option<String>,

    #[command(flatten)]
    pub store: StoreFlags,

    #[command(flatten)]
    pub engine: EngineFlags,

    #[command(flatten)]
    pub nats: NatsFlags,
}

/// Flags of `derrick warm`.
#[derive(Debug, clap::Args)]
pub struct WarmArgs {
    /// Workspace configuration file (JSON).
    #[arg(short = 'w', long = "workspace-config-path")]
    pub workspace_config_path: PathBuf,

    #[command(flatten)]
    pub store: StoreFlags,

    /// Seconds after which the setup script is killed and the warm fails [default: no limit].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_SETUP_TIMEOUT_SECONDS))]
    pub setup_timeout: Option<u64>,
}

/// `derrick cache` commands.
#[derive(Debug, clap::Subcommand)]
pub enum CacheCommand {
    /// List the cached layers, most recently used first.
    List {
        #[command(flatten)]
        store: StoreFlags,
        /// Print one JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove least recently used layers that no workspace uses, down to --max-bytes (every
    /// such layer without it). Refused while a derrick runs on the same --state-dir.
    Prune {
        #[command(flatten)]
        store: StoreFlags,
        /// Size in bytes to prune the cache down to [default: 0].
        #[arg(long, default_value_t = 0)]
        max_bytes: u64,
    },
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
    match &cli.command {
        None => serve_command(&cli).await,
        Some(Command::Worker(args)) => run_worker(args).await,
        Some(Command::Warm(args)) => warm(args).await,
        Some(Command::Cache(CacheCommand::List { store, json })) => cache_list(store, *json).await,
        Some(Command::Cache(CacheCommand::Prune { store, max_bytes })) => {
            cache_prune(store, *max_bytes).await
        }
    }
}

/// Serves controllers until SIGTERM or Ctrl-C.
async fn serve_command(cli: &Cli) -> anyhow::Result<()> {
    let Some(config_path) = cli.workspace_config_path.as_deref() else {
        bail!("missing -w/--workspace-config-path; give the workspace configuration file");
    };
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

    let remote = cli.store.provisioning_mode == ProvisioningMode::RemoteNats;
    if cli.server_mode == ServerMode::Nats || remote {
        cli.nats.to_options().validate()?;
    }
    let config = config::load(config_path)?;
    let (shutdown, force) = watch_signals();
    if remote {
        // The workers own the workspaces, so a stopping controller leaves them as they are.
        warn_ignored_by_controller(cli);
        let grace = Duration::from_secs(cli.engine.shutdown_grace);
        let remote = RemoteNats::connect(
            &cli.nats.to_options(),
            &config.name,
            shutdown.clone(),
            grace,
        )
        .await?;
        serve(cli, Arc::new(remote), shutdown).await?;
        info!("stopped");
        return Ok(());
    }

    let running = start_engine(config, &cli.store, &cli.engine, &shutdown, &force).await?;
    let served = serve(cli, running.engine.clone(), shutdown).await;
    running.stop().await;
    served?;
    info!("stopped");
    Ok(())
}

/// Logs one warning naming the flags that a `-p remote_nats` controller ignores because the
/// workers run the workspaces.
///
/// NOTE: a flag counts as set when its value differs from the default, so one set to its default
/// value is not named. clap's `value_source` would tell, but it needs the `ArgMatches` that
/// `Cli::parse` does not keep.
fn warn_ignored_by_controller(cli: &Cli) {
    let store = &cli.store;
    let engine = &cli.engine;
    let flags = [
        ("--cache-dir", store.cache_dir.is_some()),
        ("--state-dir", store.state_dir.is_some()),
        ("--layers", store.layers != LayersFlag::Auto),
        ("--cache-max-bytes", store.cache_max_bytes.is_some()),
        ("--setup-timeout", engine.setup_timeout.is_some()),
        (
            "--max-workspaces",
            engine.max_workspaces != DEFAULT_MAX_WORKSPACES,
        ),
        ("--idle-timeout", engine.idle_timeout.is_some()),
    ];
    let given: Vec<&str> = flags
        .iter()
        .filter(|(_, given)| *given)
        .map(|(flag, _)| *flag)
        .collect();
    if !given.is_empty() {
        tracing::warn!(
            flags = %given.join(" "),
            "-p remote_nats ignores these flags because the workers run the workspaces; set them on each `derrick worker`"
        );
    }
}

/// Runs `derrick worker` until SIGTERM or Ctrl-C; its workspaces stay for the next start.
async fn run_worker(args: &WorkerArgs) -> anyhow::Result<()> {
    match args.store.provisioning_mode {
        ProvisioningMode::Local | ProvisioningMode::Docker => {}
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
    let (shutdown, force) = watch_signals();
    let running = start_engine(config, &args.store, &args.engine, &shutdown, &force).await?;
    let engine = running.engine.clone();
    let identity = WorkerIdentity {
        id,
        config: config_name,
        provider: engine.provider_kind().to_owned(),
    };
    let served = transport::nats::serve_worker(engine, options, identity, shutdown).await;
    running.stop().await;
    served?;
    info!("stopped");
    Ok(())
}

/// Builds the engine that serves workspaces on this machine, re-adopts the workspaces of an
/// earlier run, and starts its background work: orphan reaping, idle destruction, and the kill of
/// running commands once a shutdown's grace has passed.
async fn start_engine(
    config: config::WorkspaceConfig,
    store: &StoreFlags,
    flags: &EngineFlags,
    shutdown: &CancellationToken,
    force: &CancellationToken,
) -> anyhow::Result<Running> {
    crate::provider::local::start_reaping_orphans();
    let limits = Limits {
        setup_timeout: flags.setup_timeout,
        max_workspaces: usize::try_from(flags.max_workspaces)?,
    };
    let built = build_engine(config, store, &store.state_dir(), limits).await?;
    let engine = Arc::new(built.engine);
    if let Some(docker) = &built.docker {
        // Containers whose workspace has no record belong to no one; spares of a stopped
        // derrick are among them.
        let known = engine.record_ids().await?;
        for name in docker.remove_unknown(&known).await? {
            tracing::warn!(container = %name, "removed a container left by an earlier run");
        }
    }
    engine.recover().await?;
    engine.enforce_cache_limit().await;
    if let Some(seconds) = flags.idle_timeout {
        let idle_timeout = Duration::from_secs(seconds);
        tokio::spawn(destroy_idle_workspaces(
            engine.clone(),
            idle_timeout,
            shutdown.clone(),
        ));
    }
    let grace = Duration::from_secs(flags.shutdown_grace);
    tokio::spawn(interrupt_on_shutdown(
        engine.clone(),
        shutdown.clone(),
        force.clone(),
        grace,
    ));
    Ok(Running {
        engine,
        docker: built.docker,
    })
}

/// A serving engine and, for `-p docker`, its provider.
struct Running {
    engine: Arc<Engine>,
    docker: Option<Arc<DockerProvider>>,
}

impl Running {
    /// Keeps the workspaces for the next start and removes the docker provider's spares.
    async fn stop(&self) {
        self.engine.shutdown().await;
        if let Some(docker) = &self.docker {
            docker.remove_spares().await;
        }
    }
}

/// Builds the clean snapshot of a configuration through one workspace, which it destroys.
///
/// The workspace's record goes to a state folder of its own under `<cache>/warm/`, so a warm job
/// can run while a derrick serves the same cache. A warm job killed before it cleaned up leaves
/// that folder, and the next warm job on the cache removes the workspace it names.
async fn warm(args: &WarmArgs) -> anyhow::Result<()> {
    let warm_folder = args.store.cache_dir().join("warm");
    let state_dir = warm_folder.join(uuid::Uuid::new_v4().simple().to_string());
    let warmed = warm_in(args, &warm_folder, &state_dir).await;
    if let Err(error) = std::fs::remove_dir_all(&state_dir) {
        tracing::warn!(folder = %state_dir.display(), error = %error, "cannot remove the warm job's state folder");
    }
    warmed
}

async fn warm_in(
    args: &WarmArgs,
    warm_folder: &std::path::Path,
    state_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let limits = Limits {
        setup_timeout: args.setup_timeout,
        max_workspaces: 1,
    };
    let config = config::load(&args.workspace_config_path)?;
    let built = build_engine(config, &args.store, state_dir, limits).await?;
    let running = Running {
        engine: Arc::new(built.engine),
        docker: built.docker,
    };
    let warmed = warm_with(&running.engine, warm_folder, state_dir).await;
    if let Some(docker) = &running.docker {
        docker.remove_spares().await;
    }
    warmed
}

async fn warm_with(
    engine: &Arc<Engine>,
    warm_folder: &std::path::Path,
    state_dir: &std::path::Path,
) -> anyhow::Result<()> {
    remove_stale_warm_jobs(engine, warm_folder, state_dir).await;
    let setup_key = engine.keys().setup.clone();
    info!(layer_key = %setup_key, "warming the clean snapshot");

    // SIGTERM or Ctrl-C kills the setup script (again, until the create returns, since a clone
    // may still be running when the signal comes) and ends the warm job without a snapshot.
    let (shutdown, _force) = watch_signals();
    let killer = tokio::spawn({
        let (engine, shutdown) = (engine.clone(), shutdown.clone());
        async move {
            shutdown.cancelled().await;
            loop {
                engine.interrupt().await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    let created = engine.create(crate::api::CreateRequest::default()).await;
    killer.abort();
    if shutdown.is_cancelled() {
        if let Ok(created) = &created {
            engine.destroy(&created.id).await?;
        }
        bail!("interrupted by a signal; the clean snapshot was not built");
    }
    let created = match created {
        Ok(created) => created,
        Err(error) => return Err(warm_failure(engine, error)),
    };
    engine.destroy(&created.id).await?;
    let durations: Vec<String> = created
        .durations_ms
        .iter()
        .map(|(step, ms)| format!("{step} {ms} ms"))
        .collect();
    info!(layer_key = %setup_key, cache_hit = %created.cache.hit, durations = %durations.join(", "), "clean snapshot ready");
    println!("{setup_key}");
    Ok(())
}

/// Removes what warm jobs that were killed left in `warm_folder`: each state folder that no
/// running job locks, with the workspaces its records name.
async fn remove_stale_warm_jobs(
    engine: &Engine,
    warm_folder: &std::path::Path,
    own: &std::path::Path,
) {
    let Ok(entries) = std::fs::read_dir(warm_folder) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let folder = entry.path();
        if folder == own {
            continue;
        }
        match engine.remove_recorded_workspaces(&folder).await {
            Ok(Some(removed)) => {
                for id in removed {
                    tracing::warn!(workspace_id = %id, folder = %folder.display(), "removed a workspace left by a killed warm job");
                }
                if let Err(error) = std::fs::remove_dir_all(&folder) {
                    tracing::warn!(folder = %folder.display(), error = %error, "cannot remove a killed warm job's state folder");
                }
            }
            // A running warm job holds the folder's lock.
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(folder = %folder.display(), error = %error, "cannot clean up after a killed warm job");
            }
        }
    }
}

/// Describes a failed warm with the failing step, its exit code and its output.
fn warm_failure(engine: &Engine, error: crate::error::Error) -> anyhow::Error {
    let failure = engine
        .list()
        .workspaces
        .first()
        .and_then(|summary| engine.get(&summary.id).ok())
        .and_then(|record| record.failure);
    let Some(failure) = failure else {
        return anyhow::Error::new(error).context("cannot build the clean snapshot");
    };
    let exit_code = failure
        .exit_code
        .map_or_else(String::new, |code| format!(" with exit code {code}"));
    anyhow::anyhow!(
        "the {} step failed{exit_code}; its output:\n{}",
        failure.step,
        failure.output.trim_end()
    )
}

/// Prints the cached layers; works while a derrick serves the same folders.
async fn cache_list(store: &StoreFlags, json: bool) -> anyhow::Result<()> {
    let provider = inspect_provider(store).await?;
    let usage = Usage::new(&store.cache_dir());
    let mut in_use = crate::engine::record::recorded_layers(&store.state_dir()).await?;
    in_use.extend(provider.environment_layers().await?);
    let entries = cache::entries(provider.as_ref(), &usage, &in_use).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<18} {:>12} {:<25} {:<6} CONFIGURATION",
        "KEY", "STATE", "BYTES", "LAST USED", "IN USE"
    );
    for entry in &entries {
        println!(
            "{:<16} {:<18} {:>12} {:<25} {:<6} {}",
            entry.key.short(),
            entry.state,
            entry.size_bytes,
            entry.last_used,
            if entry.in_use { "yes" } else { "no" },
            entry.config_name
        );
    }
    Ok(())
}

/// Removes least recently used layers that no workspace uses: neither one recorded in the state
/// folder nor any environment in the cache. Holds the cache's lock exclusively and the state
/// folder's lock, so no derrick can start a workspace on a layer while it goes.
async fn cache_prune(store: &StoreFlags, max_bytes: u64) -> anyhow::Result<()> {
    let state_dir = store.state_dir();
    let provider = inspect_provider(store).await?;
    let _cache = CacheLock::exclusive(&store.cache_dir())?;
    let _records = RecordStore::open(&state_dir).context(
        "stop the derrick that uses this state folder first, or let it evict with --cache-max-bytes",
    )?;
    let usage = Usage::new(&store.cache_dir());
    let mut in_use = crate::engine::record::recorded_layers(&state_dir).await?;
    in_use.extend(provider.environment_layers().await?);
    let removed = cache::evict(provider.as_ref(), &usage, &in_use, max_bytes).await?;
    let freed: u64 = removed.iter().map(|entry| entry.size_bytes).sum();
    for entry in &removed {
        println!(
            "removed {} {} {} bytes",
            entry.key.short(),
            entry.state,
            entry.size_bytes
        );
    }
    println!("freed {freed} bytes in {} layers", removed.len());
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

/// Engine limits that differ between serving and `warm`.
struct Limits {
    setup_timeout: Option<u64>,
    max_workspaces: usize,
}

/// An engine and, for `-p docker`, its provider, which has start-up and shutdown clean-ups of its
/// own.
struct Built {
    engine: Engine,
    docker: Option<Arc<DockerProvider>>,
}

/// Builds the provider and the engine over it.
async fn build_engine(
    mut config: config::WorkspaceConfig,
    store: &StoreFlags,
    state_dir: &std::path::Path,
    limits: Limits,
) -> anyhow::Result<Built> {
    let (provider, docker) = build_provider(store, &mut config, state_dir).await?;
    let cache_dir = store.cache_dir();
    info!(provider = %provider.kind(), cache_dir = %cache_dir.display(), state_dir = %state_dir.display(), "provider ready");
    let options = EngineOptions {
        config,
        cache_dir,
        state_dir: state_dir.to_owned(),
        setup_timeout: limits.setup_timeout.map(Duration::from_secs),
        cache_max_bytes: store.cache_max_bytes,
        max_workspaces: limits.max_workspaces,
    };
    Ok(Built {
        engine: Engine::new(options, provider)?,
        docker,
    })
}

/// Builds the provider that `-p` names. For docker, the default base image enters the
/// configuration, and with it the base layer key, so derricks with different defaults never
/// share layers.
async fn build_provider(
    store: &StoreFlags,
    config: &mut config::WorkspaceConfig,
    state_dir: &std::path::Path,
) -> anyhow::Result<(Arc<dyn Provider>, Option<Arc<DockerProvider>>)> {
    let cache_dir = store.cache_dir();
    match store.provisioning_mode {
        ProvisioningMode::Local => {
            let layer_mode = match store.layers {
                LayersFlag::Auto => LayerMode::Auto,
                LayersFlag::Overlay => LayerMode::Overlay,
                LayersFlag::Copy => LayerMode::Copy,
            };
            let provider = LocalProvider::new(LocalOptions {
                cache_dir: cache_dir.clone(),
                layer_mode,
            })
            .with_context(|| {
                format!("cannot start the local provider in {}", cache_dir.display())
            })?;
            Ok((Arc::new(provider), None))
        }
        ProvisioningMode::Docker => {
            let base_image = config
                .base_image
                .get_or_insert_with(|| store.base_image.clone());
            let options = DockerOptions {
                cache_dir,
                state_dir: state_dir.to_owned(),
                base_image: base_image.clone(),
                settings: config.docker.clone(),
                spare_containers: usize::try_from(store.spare_containers).unwrap_or(1),
            };
            let docker = Arc::new(
                DockerProvider::connect(options)
                    .await
                    .context("cannot start the docker provider")?,
            );
            Ok((docker.clone(), Some(docker)))
        }
        ProvisioningMode::RemoteNats => bail!(
            "provisioning mode `remote_nats` forwards to workers and has no provider of its own here; use `-p local` or `-p docker`"
        ),
    }
}

/// Opens the layer cache of the provider that `-p` names for listing and removing layers only.
async fn inspect_provider(store: &StoreFlags) -> anyhow::Result<Arc<dyn Provider>> {
    match store.provisioning_mode {
        ProvisioningMode::Local => Ok(Arc::new(LocalProvider::inspect(store.cache_dir())?)),
        ProvisioningMode::Docker => {
            let provider = DockerProvider::inspect(&store.state_dir())
                .await
                .context("cannot reach the docker engine")?;
            Ok(Arc::new(provider))
        }
        ProvisioningMode::RemoteNats => bail!(
            "provisioning mode `remote_nats` has no layer cache; run derrick cache on the workers"
        ),
    }
}

impl StoreFlags {
    fn cache_dir(&self) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(default_cache_dir)
    }

    fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(default_state_dir)
    }
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

/// Kills the workspaces' running commands and setup scripts once shutdown has let them run for
/// `grace`, so that the transports' graceful shutdown, which waits for running requests, ends in
/// bounded time. A shutdown whose requests all finish sooner exits before this fires.
async fn interrupt_on_shutdown(
    engine: Arc<Engine>,
    shutdown: CancellationToken,
    force: CancellationToken,
    grace: Duration,
) {
    shutdown.cancelled().await;
    info!(
        grace_seconds = grace.as_secs(),
        "shutting down; a second signal kills running commands at once"
    );
    tokio::select! {
        () = tokio::time::sleep(grace) => {}
        () = force.cancelled() => {}
    }
    info!(
        grace_seconds = grace.as_secs(),
        "killing the commands still running at shutdown"
    );
    engine.interrupt().await;
}

/// Destroys idle workspaces until shutdown, checking several times per `idle_timeout`.
async fn destroy_idle_workspaces(
    engine: Arc<Engine>,
    idle_timeout: Duration,
    shutdown: CancellationToken,
) {
    let period = (idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => engine.destroy_idle(idle_timeout).await,
        }
    }
}

/// Cancels `shutdown` at the first SIGTERM or Ctrl-C, and `force` at the second, which ends the
/// grace of running requests at once.
async fn cancel_on_signal(shutdown: CancellationToken, force: CancellationToken) {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => Some(signal),
            Err(error) => {
                tracing::error!(error = %error, "cannot listen for SIGTERM");
                None
            }
        };
    for token in [shutdown, force] {
        let terminated = async {
            match terminate.as_mut() {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => info!("interrupt received"),
            () = terminated => info!("SIGTERM received"),
        }
        token.cancel();
    }
}

/// Starts watching for SIGTERM and Ctrl-C; returns the shutdown token and the token of a second
/// signal, which cuts the grace short.
fn watch_signals() -> (CancellationToken, CancellationToken) {
    let (shutdown, force) = (CancellationToken::new(), CancellationToken::new());
    tokio::spawn(cancel_on_signal(shutdown.clone(), force.clone()));
    (shutdown, force)
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
