//! The service core: every operation of the wire contract as one async function.
//!
//! The engine drives workspaces through the declared state machine over a `Provider`, computes
//! layer keys, fills the host's Git mirrors and writes each workspace's record on every
//! transition. Transports call it with the wire types of `api` and turn its `Error` into a status.
//!
//! Invariant: the engine never names a provider implementation, and never holds a global lock
//! across an operation. Each workspace has its own operation lock, so operations on one workspace
//! are ordered and operations on different workspaces never wait on each other. Reset and destroy
//! kill the workspace's processes before they take that lock, so a long command cannot delay them.

pub mod cache;
mod create;
pub mod provider;
pub mod record;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tracing::{info, instrument};

use crate::api;
use crate::config::{self, WorkspaceConfig};
use crate::error::{Error, Result};
use crate::git::{Checkout, Mirrors};
use crate::keys::{LayerKey, LayerKeys};
use crate::states::StateMachine;
use record::{Failure, HistoryEntry, RecordStore, WorkspaceRecord};

pub use provider::{ExecOutput, ExecRequest, LayerInfo, LayerMeta, Provider, WorkspaceId};

/// Timeout of a command that gives none; long enough for a full build or test suite.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(600);

/// Largest `timeout` a request may give: one day, so that a typo cannot pin a process forever.
pub const MAX_COMMAND_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Largest file that `read_file` returns and `write_file` accepts. 64 MiB covers source files,
/// lock files and small artifacts while keeping one request's memory bounded.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// The outcome of `Engine::recover`: the workspaces of an earlier run it re-adopted and removed.
#[derive(Debug, Default)]
pub struct Recovery {
    pub adopted: Vec<WorkspaceId>,
    pub removed: Vec<WorkspaceId>,
}

/// Engine settings besides the provider.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub config: WorkspaceConfig,
    pub cache_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Limit for the setup script; `None` lets a quiet setup run as long as it needs.
    pub setup_timeout: Option<Duration>,
    /// Size above which least recently used layers are evicted; `None` keeps every layer.
    pub cache_max_bytes: Option<u64>,
    /// Largest number of workspaces, live and being created.
    pub max_workspaces: usize,
}

/// The service core.
pub struct Engine {
    config: WorkspaceConfig,
    keys: LayerKeys,
    provider: Arc<dyn Provider>,
    machine: StateMachine,
    mirrors: Mirrors,
    records: RecordStore,
    setup_timeout: Option<Duration>,
    workspaces: Mutex<HashMap<WorkspaceId, Arc<Workspace>>>,
    builds: Mutex<HashMap<LayerKey, Arc<tokio::sync::Mutex<()>>>>,
    usage: cache::Usage,
    /// Held shared for the engine's lifetime, so that `derrick cache prune` waits for it.
    _cache_lock: cache::CacheLock,
    cache_max_bytes: Option<u64>,
    /// Eviction locks it for writing. Steps that pick layers before a workspace's record names
    /// them (a create's cache lookup and provision, a snapshot) lock it for reading, so eviction
    /// never removes a layer between the two.
    cache_guard: tokio::sync::RwLock<()>,
    max_workspaces: usize,
    /// Creates between their slot reservation and their end.
    creating: std::sync::atomic::AtomicUsize,
}

/// One live workspace.
struct Workspace {
    id: WorkspaceId,
    /// Environment of the create request, given to every command.
    env: BTreeMap<String, String>,
    /// The record; locked only briefly, never across an `.await`.
    record: Mutex<WorkspaceRecord>,
    /// Orders the operations on this workspace.
    operations: tokio::sync::Mutex<()>,
    /// When a request last named the workspace, or a command of it ended.
    last_active: Mutex<Instant>,
    /// Set when a destroy or a shutdown kills the workspace's processes, so that a setup script
    /// that dies of it is not reported as a broken script.
    killed: std::sync::atomic::AtomicBool,
}

impl Workspace {
    fn new(id: WorkspaceId, env: BTreeMap<String, String>, record: WorkspaceRecord) -> Workspace {
        Workspace {
            id,
            env,
            record: Mutex::new(record),
            operations: tokio::sync::Mutex::new(()),
            last_active: Mutex::new(Instant::now()),
            killed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn mark_killed(&self) {
        self.killed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn was_killed(&self) -> bool {
        self.killed.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn mark_active(&self) {
        *self.last_active.lock().expect("activity lock") = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.last_active.lock().expect("activity lock").elapsed()
    }
}

/// A place for one workspace under `--max-workspaces`, held from the start of a create until the
/// create ends.
struct CreateSlot<'a> {
    creating: &'a std::sync::atomic::AtomicUsize,
}

impl Drop for CreateSlot<'_> {
    fn drop(&mut self) {
        self.creating
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Engine {
    /// Builds the engine over a provider.
    ///
    /// # Errors
    /// Fails when the state machine declaration is invalid or the state folder cannot be created.
    pub fn new(options: EngineOptions, provider: Arc<dyn Provider>) -> Result<Engine> {
        let machine = StateMachine::builtin()
            .map_err(|error| Error::internal("invalid state machine", error))?;
        let keys = LayerKeys::compute(&options.config, provider.kind());
        Ok(Engine {
            keys,
            machine,
            provider,
            mirrors: Mirrors::new(options.cache_dir.join("git")),
            _cache_lock: cache::CacheLock::shared(&options.cache_dir)?,
            records: RecordStore::open(&options.state_dir)?,
            setup_timeout: options.setup_timeout,
            usage: cache::Usage::new(&options.cache_dir),
            cache_max_bytes: options.cache_max_bytes,
            cache_guard: tokio::sync::RwLock::new(()),
            max_workspaces: options.max_workspaces,
            creating: std::sync::atomic::AtomicUsize::new(0),
            config: options.config,
            workspaces: Mutex::new(HashMap::new()),
            builds: Mutex::new(HashMap::new()),
        })
    }

    /// Returns the layer keys of the served configuration.
    pub fn keys(&self) -> &LayerKeys {
        &self.keys
    }

    /// Returns the provider kind, such as `local/overlay`.
    pub fn provider_kind(&self) -> &str {
        self.provider.kind()
    }

    /// Returns the declared state machine.
    pub fn states(&self) -> &StateMachine {
        &self.machine
    }

    /// Lists live workspaces, oldest first.
    pub fn list(&self) -> api::ListResponse {
        let workspaces = self.live_workspaces();
        let mut summaries: Vec<api::WorkspaceSummary> = workspaces
            .iter()
            .map(|workspace| {
                let record = workspace.record.lock().expect("record lock");
                api::WorkspaceSummary {
                    id: record.id.to_string(),
                    state: record.state.clone(),
                    name: record.name.clone(),
                    created_at: record.created_at.clone(),
                }
            })
            .collect();
        summaries.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        api::ListResponse {
            workspaces: summaries,
        }
    }

    /// Returns the record of one workspace.
    pub fn get(&self, id: &str) -> Result<WorkspaceRecord> {
        let workspace = self.workspace(id)?;
        let record = workspace.record.lock().expect("record lock").clone();
        Ok(record)
    }

    /// Runs a command and returns its output, whatever its exit code.
    #[instrument(skip_all, fields(workspace_id = %id))]
    pub async fn command(
        &self,
        id: &str,
        request: api::CommandRequest,
    ) -> Result<api::CommandOutput> {
        let workspace = self.workspace(id)?;
        let timeout = command_timeout(request.timeout)?;
        validate_env(&request.env)?;
        let _operations = workspace.operations.lock().await;
        self.transition(&workspace, "exec", Instant::now()).await?;

        let mut env = self.config.env.clone();
        env.extend(workspace.env.clone());
        env.extend(request.env);
        let exec = ExecRequest {
            cmd: request.cmd,
            working_dir: request.working_dir,
            env,
            timeout: Some(timeout),
        };
        let output = self.provider.exec(&workspace.id, exec).await;
        workspace.mark_active();
        let output = output?;
        Ok(api::CommandOutput {
            output: output.output,
            exit_code: output.exit_code,
            timed_out: output.timed_out,
            truncated: output.truncated,
            duration_ms: millis(output.duration),
        })
    }

    /// Runs a command and reports only its exit code.
    ///
    /// # Errors
    /// A non-zero exit is `command_failed` with the exit code and output.
    pub async fn command_checked(
        &self,
        id: &str,
        request: api::CommandRequest,
    ) -> Result<api::CommandResponse> {
        let output = self.command(id, request).await?;
        if output.exit_code != 0 {
            return Err(Error::CommandFailed {
                exit_code: output.exit_code,
                output: output.output,
                truncated: output.truncated,
            });
        }
        Ok(api::CommandResponse { exit_code: 0 })
    }

    /// Reads a file of the workspace.
    #[instrument(skip_all, fields(workspace_id = %id))]
    pub async fn read_file(&self, id: &str, request: api::ReadFileRequest) -> Result<Vec<u8>> {
        let workspace = self.workspace(id)?;
        let _operations = workspace.operations.lock().await;
        self.transition(&workspace, "read", Instant::now()).await?;
        let working_dir = request.working_dir.as_deref();
        self.provider
            .read_file(&workspace.id, &request.path, working_dir, MAX_FILE_BYTES)
            .await
    }

    /// Writes a file into the workspace, creating missing parent directories.
    #[instrument(skip_all, fields(workspace_id = %id))]
    pub async fn write_file(
        &self,
        id: &str,
        request: api::WriteFileRequest,
    ) -> Result<api::WriteFileResponse> {
        let workspace = self.workspace(id)?;
        let content = decode_base64(&request.content)?;
        let _operations = workspace.operations.lock().await;
        self.transition(&workspace, "write", Instant::now()).await?;
        let working_dir = request.working_dir.as_deref();
        self.provider
            .write_file(&workspace.id, &request.path, working_dir, &content)
            .await?;
        Ok(api::WriteFileResponse { success: true })
    }

    /// Restores the clean snapshot: kills the workspace's processes and discards every change.
    #[instrument(skip_all, fields(workspace_id = %id))]
    pub async fn reset(&self, id: &str) -> Result<api::ResetResponse> {
        let started = Instant::now();
        let workspace = self.workspace(id)?;
        // Checked before the kill as well, so that a reset sent during a create is refused
        // without killing its setup script.
        let state = workspace.record.lock().expect("record lock").state.clone();
        self.machine
            .next(&state, "reset")
            .map_err(|refusal| self.refused(&workspace, &state, "reset", refusal))?;
        self.provider.kill_processes(&workspace.id).await?;
        let _operations = workspace.operations.lock().await;
        self.transition(&workspace, "reset", started).await?;

        let restored = self.restore(&workspace).await;
        if let Err(error) = restored {
            self.fail(&workspace, "reset", &error).await;
            return Err(error);
        }
        self.transition(&workspace, "restore", started).await?;
        Ok(api::ResetResponse {
            id: workspace.id.to_string(),
            state: "clean_snapshotted".to_owned(),
            duration_ms: millis(started.elapsed()),
        })
    }

    /// Fetches new commits into the host mirrors and brings the workspace's checkouts to them.
    #[instrument(skip_all, fields(workspace_id = %id))]
    pub async fn fetch(&self, id: &str, request: api::FetchRequest) -> Result<api::FetchResponse> {
        let workspace = self.workspace(id)?;
        let selected = self.select_repositories(request.paths.as_deref())?;
        self.check_same_repositories(&workspace)?;
        let _operations = workspace.operations.lock().await;
        self.transition(&workspace, "fetch", Instant::now()).await?;

        let mut repositories = Vec::with_capacity(selected.len());
        for repository in selected {
            let state = self.mirrors.sync(repository).await?;
            let previous = self.commit_of(&workspace, &repository.path);
            let checkout = self.checkout_of(repository, &state, previous);
            let update = self
                .provider
                .update_checkout(&workspace.id, &checkout)
                .await?;
            // The record keeps the commit derrick checked out, never an agent's own commit: a
            // reset restores from the mirror, which has only upstream commits.
            if update.after == state.commit {
                self.set_commit(&workspace, &repository.path, &update.after);
            }
            repositories.push(api::FetchedRepository {
                path: repository.path.clone(),
                before: update.before,
                after: update.after,
                upstream: state.commit,
            });
        }
        self.persist(&workspace).await?;
        Ok(api::FetchResponse { repositories })
    }

    /// Destroys a workspace: kills its processes, removes its environment and drops its record.
    #[instrument(skip_all, fields(workspace_id = %id))]
    pub async fn destroy(&self, id: &str) -> Result<()> {
        let started = Instant::now();
        let workspace = self.workspace(id)?;
        workspace.mark_killed();
        self.provider.kill_processes(&workspace.id).await?;
        let _operations = workspace.operations.lock().await;
        let state = workspace.record.lock().expect("record lock").state.clone();
        self.machine
            .next(&state, "destroy")
            .map_err(|refusal| self.refused(&workspace, &state, "destroy", refusal))?;

        self.provider.destroy(&workspace.id).await?;
        self.transition(&workspace, "destroy", started).await?;
        self.workspaces
            .lock()
            .expect("workspace map lock")
            .remove(&workspace.id);
        self.records.remove(&workspace.id).await
    }

    /// Lets go of every live workspace at shutdown, keeping it for the next start: kills its
    /// processes, frees its mounts and leaves its record, so a restarted derrick re-adopts it.
    pub async fn shutdown(&self) {
        let ids = self.live_ids();
        for id in &ids {
            if let Err(error) = self.provider.release(id).await {
                tracing::error!(workspace_id = %id, error = %error, "cannot release at shutdown");
            }
        }
        if !ids.is_empty() {
            info!(
                workspaces = ids.len(),
                "kept the workspaces for the next start"
            );
        }
    }

    /// Kills the processes of every live workspace, so that running commands and setup scripts
    /// end and a shutdown does not wait for them.
    pub async fn interrupt(&self) {
        for workspace in self.live_workspaces() {
            workspace.mark_killed();
            let id = &workspace.id;
            if let Err(error) = self.provider.kill_processes(id).await {
                tracing::error!(workspace_id = %id, error = %error, "cannot kill processes at shutdown");
            }
        }
    }

    /// Takes back the workspaces that an earlier derrick left, after a shutdown or a crash, and
    /// removes those it cannot take back, logging each one either way.
    ///
    /// A workspace is re-adopted when its record, its stored create environment and its
    /// environment in the provider are intact and it was not in the middle of being created.
    /// Processes that it ran under the earlier derrick are killed: their requests are gone. A
    /// workspace caught in the middle of a reset finishes it.
    ///
    /// # Errors
    /// Fails, before touching anything, when a record names another provider kind (another
    /// layer format or provisioning mode): such workspaces need the derrick that made them.
    pub async fn recover(&self) -> Result<Recovery> {
        let ids = self.records.ids().await?;
        self.check_provider_of_records(&ids).await?;
        let mut recovery = Recovery::default();
        for id in ids {
            if let Err(error) = self.provider.kill_processes(&id).await {
                tracing::error!(workspace_id = %id, error = %error, "cannot kill the processes of a workspace left by an earlier run");
            }
            let reason = match self.readopt(&id).await {
                Ok(Ok(state)) => {
                    info!(workspace_id = %id, state = %state, "re-adopted a workspace left by an earlier run");
                    recovery.adopted.push(id);
                    continue;
                }
                Ok(Err(reason)) => reason,
                Err(error) => error.to_string(),
            };
            self.workspaces
                .lock()
                .expect("workspace map lock")
                .remove(&id);
            match self.provider.destroy(&id).await {
                Ok(()) => {
                    tracing::warn!(workspace_id = %id, reason = %reason, "removed a workspace left by an earlier run");
                    self.records.remove(&id).await?;
                    recovery.removed.push(id);
                }
                Err(error) => {
                    tracing::error!(workspace_id = %id, error = %error, "cannot remove a workspace left by an earlier run");
                }
            }
        }
        Ok(recovery)
    }

    /// Destroys, through this engine's provider, every workspace recorded in another state
    /// folder, and removes its records. Returns `None` when a running process locks that folder.
    pub async fn remove_recorded_workspaces(
        &self,
        state_dir: &std::path::Path,
    ) -> Result<Option<Vec<WorkspaceId>>> {
        let Ok(records) = RecordStore::open(state_dir) else {
            return Ok(None);
        };
        let mut removed = Vec::new();
        for id in records.ids().await? {
            self.provider.kill_processes(&id).await?;
            self.provider.destroy(&id).await?;
            records.remove(&id).await?;
            removed.push(id);
        }
        Ok(Some(removed))
    }

    /// Fails when a readable record names a provider kind other than this engine's.
    async fn check_provider_of_records(&self, ids: &[WorkspaceId]) -> Result<()> {
        let mut others = BTreeMap::<String, usize>::new();
        for id in ids {
            if let Ok(Some(record)) = self.records.read(id).await
                && record.provider != self.provider.kind()
            {
                *others.entry(record.provider).or_default() += 1;
            }
        }
        let Some((kind, _)) = others.iter().next() else {
            return Ok(());
        };
        let counts: Vec<String> = others
            .iter()
            .map(|(kind, count)| format!("{count} of provider `{kind}`"))
            .collect();
        Err(Error::Internal(format!(
            "the state folder {} has workspaces that this derrick cannot re-adopt: {}, while this \
             derrick runs `{}`; start derrick with the same -p and --layers as before (for \
             `{kind}`), destroy those workspaces, then switch",
            self.records.folder().display(),
            counts.join(", "),
            self.provider.kind()
        )))
    }

    /// Re-adopts one workspace, returning its state, or `Ok(Err(reason))` when it cannot be.
    async fn readopt(&self, id: &WorkspaceId) -> Result<std::result::Result<String, String>> {
        let Some(record) = self.records.read(id).await? else {
            return Ok(Err("its record is gone".to_owned()));
        };
        if !matches!(
            record.state.as_str(),
            "clean_snapshotted" | "running" | "reset" | "failed"
        ) {
            return Ok(Err(format!(
                "it was still being created (state {})",
                record.state
            )));
        }
        let Some(env) = self.records.read_env(id).await? else {
            return Ok(Err("its create environment was not stored".to_owned()));
        };

        let layers: Vec<LayerKey> = record
            .layers
            .iter()
            .map(|layer| layer.key.clone())
            .collect();
        // A failed create has already removed its environment; its record stays listed, with
        // the failure, until destroyed.
        let adopted = self.provider.adopt(id, &layers).await?;
        if !adopted && record.state != "failed" {
            return Ok(Err("its environment is gone".to_owned()));
        }

        let workspace = Arc::new(Workspace::new(id.clone(), env, record));
        self.workspaces
            .lock()
            .expect("workspace map lock")
            .insert(id.clone(), workspace.clone());

        let state = workspace.record.lock().expect("record lock").state.clone();
        if state == "reset" {
            let started = Instant::now();
            if let Err(error) = self.restore(&workspace).await {
                return Ok(Err(format!("its interrupted reset failed: {error}")));
            }
            self.transition(&workspace, "restore", started).await?;
        }
        let state = workspace.record.lock().expect("record lock").state.clone();
        Ok(Ok(state))
    }

    /// Lists the layers in the cache, most recently used first, marking those that live
    /// workspaces use.
    pub async fn cache_entries(&self) -> Result<Vec<cache::CacheEntry>> {
        cache::entries(self.provider.as_ref(), &self.usage, &self.layers_in_use()).await
    }

    /// Evicts least recently used layers that no workspace uses while the cache is above
    /// `--cache-max-bytes`, logging each one.
    pub async fn enforce_cache_limit(&self) {
        let Some(max_bytes) = self.cache_max_bytes else {
            return;
        };
        let _guard = self.cache_guard.write().await;
        let mut in_use = self.layers_in_use();
        match self.provider.environment_layers().await {
            Ok(layers) => in_use.extend(layers),
            Err(error) => {
                tracing::error!(error = %error, "cannot list the layers of environments; nothing evicted");
                return;
            }
        }
        match cache::evict(self.provider.as_ref(), &self.usage, &in_use, max_bytes).await {
            Ok(removed) => {
                for entry in removed {
                    info!(layer_key = %entry.key, kind = entry.kind.as_str(), size_bytes = entry.size_bytes, last_used = %entry.last_used, "evicted a layer from the cache");
                }
            }
            Err(error) => tracing::error!(error = %error, "cannot evict layers from the cache"),
        }
    }

    /// Returns the keys of every layer that a live workspace uses.
    fn layers_in_use(&self) -> std::collections::BTreeSet<LayerKey> {
        let workspaces = self.live_workspaces();
        workspaces
            .iter()
            .flat_map(|workspace| self.layers_of(workspace))
            .collect()
    }

    fn layers_of(&self, workspace: &Workspace) -> Vec<LayerKey> {
        let record = workspace.record.lock().expect("record lock");
        record
            .layers
            .iter()
            .map(|layer| layer.key.clone())
            .collect()
    }

    fn live_workspaces(&self) -> Vec<Arc<Workspace>> {
        let workspaces = self.workspaces.lock().expect("workspace map lock");
        workspaces.values().cloned().collect()
    }

    /// Returns the ids of every workspace record in the state folder, live or left by an
    /// earlier run.
    pub async fn record_ids(&self) -> Result<Vec<WorkspaceId>> {
        self.records.ids().await
    }

    fn live_ids(&self) -> Vec<WorkspaceId> {
        let workspaces = self.workspaces.lock().expect("workspace map lock");
        workspaces.keys().cloned().collect()
    }

    fn workspace(&self, id: &str) -> Result<Arc<Workspace>> {
        let not_found = || Error::WorkspaceNotFound { id: id.to_owned() };
        let id = WorkspaceId::parse(id).ok_or_else(not_found)?;
        let workspaces = self.workspaces.lock().expect("workspace map lock");
        let workspace = workspaces.get(&id).cloned().ok_or_else(not_found)?;
        workspace.mark_active();
        Ok(workspace)
    }

    /// Takes a place for a new workspace, or fails when live and starting workspaces already
    /// reach `--max-workspaces`.
    fn reserve_slot(&self) -> Result<CreateSlot<'_>> {
        use std::sync::atomic::Ordering;
        let workspaces = self.workspaces.lock().expect("workspace map lock");
        let creating = self.creating.load(Ordering::SeqCst);
        if workspaces.len() + creating >= self.max_workspaces {
            return Err(Error::WorkspaceLimitReached {
                limit: self.max_workspaces,
            });
        }
        self.creating.fetch_add(1, Ordering::SeqCst);
        Ok(CreateSlot {
            creating: &self.creating,
        })
    }

    /// Destroys every workspace that no request has named for `idle_timeout` and that runs no
    /// operation, logging each one.
    pub async fn destroy_idle(&self, idle_timeout: Duration) {
        let idle: Vec<(WorkspaceId, Duration)> = {
            let workspaces = self.workspaces.lock().expect("workspace map lock");
            workspaces
                .values()
                .filter(|workspace| workspace.operations.try_lock().is_ok())
                .map(|workspace| (workspace.id.clone(), workspace.idle_for()))
                .filter(|(_, idle)| *idle >= idle_timeout)
                .collect()
        };
        for (id, idle) in idle {
            match self.destroy(id.as_str()).await {
                Ok(()) => {
                    info!(workspace_id = %id, idle_seconds = idle.as_secs(), "destroyed an idle workspace")
                }
                Err(error) => {
                    tracing::error!(workspace_id = %id, error = %error, "cannot destroy an idle workspace")
                }
            }
        }
    }

    /// Checks `op` against the state machine, applies the state change it declares, and writes
    /// the record. `started` is when the step that ends here began.
    async fn transition(&self, workspace: &Workspace, op: &str, started: Instant) -> Result<()> {
        {
            let mut record = workspace.record.lock().expect("record lock");
            let next = self
                .machine
                .next(&record.state, op)
                .map_err(|refusal| self.refused(workspace, &record.state, op, refusal))?;
            let Some(next) = next.filter(|next| *next != record.state) else {
                return Ok(());
            };
            let duration_ms = millis(started.elapsed());
            info!(workspace_id = %workspace.id, from = %record.state, to = %next, op, duration_ms, "transition");
            record.state = next.to_owned();
            let entry = HistoryEntry {
                state: next.to_owned(),
                op: op.to_owned(),
                at: record::now_rfc3339(),
                duration_ms,
            };
            record.push_history(entry);
        }
        self.persist(workspace).await
    }

    fn refused(
        &self,
        workspace: &Workspace,
        state: &str,
        op: &str,
        refusal: crate::states::Refusal,
    ) -> Error {
        let allowed = if refusal.allowed.is_empty() {
            "none".to_owned()
        } else {
            refusal.allowed
        };
        Error::InvalidTransition {
            id: workspace.id.to_string(),
            state: state.to_owned(),
            op: op.to_owned(),
            allowed,
        }
    }

    /// Marks the workspace `failed` with the step and what it printed.
    async fn fail(&self, workspace: &Workspace, step: &str, error: &Error) {
        let (exit_code, output) = match error {
            Error::SetupFailed {
                exit_code, output, ..
            }
            | Error::CommandFailed {
                exit_code, output, ..
            } => (Some(*exit_code), output.clone()),
            other => (None, other.to_string()),
        };
        workspace.record.lock().expect("record lock").failure = Some(Failure {
            step: step.to_owned(),
            exit_code,
            output,
        });
        tracing::warn!(workspace_id = %workspace.id, op = step, error = %error, "workspace failed");
        if let Err(error) = self.transition(workspace, "fail", Instant::now()).await {
            tracing::error!(workspace_id = %workspace.id, error = %error, "cannot record failure");
        }
    }

    async fn persist(&self, workspace: &Workspace) -> Result<()> {
        let record = workspace.record.lock().expect("record lock").clone();
        self.records.write(&record).await
    }

    /// Brings a reset workspace's checkouts back to the commits it had before the reset, when a
    /// create or a fetch moved them past the commits of the snapshot. Only the host mirror is
    /// read; the remote is not contacted.
    async fn restore(&self, workspace: &Workspace) -> Result<()> {
        self.provider.reset(&workspace.id).await?;
        self.usage.touch(self.layers_of(workspace)).await;
        let top = workspace
            .record
            .lock()
            .expect("record lock")
            .layers
            .last()
            .map(|layer| layer.key.clone());
        let Some(top) = top else { return Ok(()) };
        let snapshot_commits = self
            .provider
            .layer(&top)
            .await?
            .map(|meta| meta.commits)
            .unwrap_or_default();
        let repositories = workspace
            .record
            .lock()
            .expect("record lock")
            .repositories
            .clone();
        for recorded in repositories {
            if snapshot_commits.get(&recorded.path) == Some(&recorded.commit) {
                continue;
            }
            let Some(repository) = self
                .config
                .repositories
                .iter()
                .find(|r| r.path == recorded.path)
            else {
                continue;
            };
            let checkout = Checkout {
                mirror: self.mirrors.mirror_dir(&repository.url),
                url: repository.url.clone(),
                path: repository.path.clone(),
                commit: recorded.commit.clone(),
                branch: recorded.branch.clone(),
                author: self.config.git_author.clone(),
                previous: snapshot_commits.get(&recorded.path).cloned(),
            };
            self.provider
                .update_checkout(&workspace.id, &checkout)
                .await?;
        }
        Ok(())
    }

    fn checkout_of(
        &self,
        repository: &config::Repository,
        state: &crate::git::MirrorState,
        previous: Option<String>,
    ) -> Checkout {
        Checkout {
            mirror: state.mirror.clone(),
            url: repository.url.clone(),
            path: repository.path.clone(),
            commit: state.commit.clone(),
            branch: state.branch.clone(),
            author: self.config.git_author.clone(),
            previous,
        }
    }

    fn commit_of(&self, workspace: &Workspace, path: &str) -> Option<String> {
        let record = workspace.record.lock().expect("record lock");
        let repository = record.repositories.iter().find(|r| r.path == path);
        repository.map(|repository| repository.commit.clone())
    }

    fn set_commit(&self, workspace: &Workspace, path: &str, commit: &str) {
        let mut record = workspace.record.lock().expect("record lock");
        if let Some(repository) = record.repositories.iter_mut().find(|r| r.path == path) {
            repository.commit = commit.to_owned();
        }
    }

    /// Fails when the workspace was created from a configuration with other repositories (a
    /// re-adopted workspace after a restart with a changed `-w`), since a fetch brings the
    /// configured repositories to the configured references.
    fn check_same_repositories(&self, workspace: &Workspace) -> Result<()> {
        let record = workspace.record.lock().expect("record lock");
        let recorded: std::collections::BTreeSet<(&str, &str)> = record
            .repositories
            .iter()
            .map(|repository| (repository.path.as_str(), repository.url.as_str()))
            .collect();
        let configured: Vec<(String, String)> = self
            .config
            .repositories
            .iter()
            .map(|repository| (repository.path.clone(), repository.url.to_string()))
            .collect();
        let same = recorded.len() == configured.len()
            && configured
                .iter()
                .all(|(path, url)| recorded.contains(&(path.as_str(), url.as_str())));
        if same {
            return Ok(());
        }
        Err(Error::invalid_request(format!(
            "workspace `{}` was created from configuration `{}` with other repositories than the \
             served configuration `{}`, so it cannot fetch; restart derrick with the configuration \
             it was created from, or create a new workspace",
            workspace.id, record.name, self.config.name
        )))
    }

    /// Returns the configured repositories at `paths`, in configuration order and each once;
    /// all of them when `paths` is absent.
    fn select_repositories(&self, paths: Option<&[String]>) -> Result<Vec<&config::Repository>> {
        let repositories = &self.config.repositories;
        let Some(paths) = paths else {
            return Ok(repositories.iter().collect());
        };
        let mut wanted = std::collections::BTreeSet::new();
        for path in paths {
            let normalized = format!("/{}", path.trim_matches('/'));
            if !repositories
                .iter()
                .any(|repository| repository.path == normalized)
            {
                let known: Vec<&str> = repositories.iter().map(|r| r.path.as_str()).collect();
                return Err(Error::invalid_request(format!(
                    "no repository at `{path}`; configured paths: {}",
                    known.join(", ")
                )));
            }
            wanted.insert(normalized);
        }
        Ok(repositories
            .iter()
            .filter(|repository| wanted.contains(&repository.path))
            .collect())
    }

    /// Returns the lock that makes concurrent builds of one layer run once.
    fn build_lock(&self, key: &LayerKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut builds = self.builds.lock().expect("build lock map");
        builds.entry(key.clone()).or_default().clone()
    }
}

fn command_timeout(seconds: Option<f64>) -> Result<Duration> {
    let Some(seconds) = seconds else {
        return Ok(DEFAULT_COMMAND_TIMEOUT);
    };
    if !seconds.is_finite() || seconds <= 0.0 || seconds > MAX_COMMAND_TIMEOUT.as_secs_f64() {
        return Err(Error::invalid_request(format!(
            "`timeout` must be a number of seconds above 0 and at most {}; got {seconds}",
            MAX_COMMAND_TIMEOUT.as_secs()
        )));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Largest `NAME=value` entry of a command's environment: Linux limits each one to
/// `MAX_ARG_STRLEN` (32 pages, 128 KiB), counting the terminating NUL.
const MAX_ENV_ENTRY_BYTES: usize = 128 * 1024 - 1;

/// Largest environment of a request in total. Linux allows a quarter of the stack limit (2 MiB
/// with the usual 8 MiB) for arguments and environment together; 1 MiB leaves room for the rest.
const MAX_ENV_TOTAL_BYTES: usize = 1024 * 1024;

fn validate_env(env: &BTreeMap<String, String>) -> Result<()> {
    let mut total = 0;
    for (key, value) in env {
        let shown: String = key.chars().take(64).collect();
        if !config::is_env_name(key) || value.contains('\0') {
            return Err(Error::invalid_request(format!(
                "invalid `env` entry `{shown}`; names are [A-Za-z_][A-Za-z0-9_]* and values contain no NUL bytes"
            )));
        }
        let entry = key.len() + 1 + value.len();
        if entry > MAX_ENV_ENTRY_BYTES {
            return Err(Error::invalid_request(format!(
                "`env` entry `{shown}` is {entry} bytes, over the limit of {MAX_ENV_ENTRY_BYTES}; write large values to a file with write_file"
            )));
        }
        total += entry + 1;
    }
    if total > MAX_ENV_TOTAL_BYTES {
        return Err(Error::invalid_request(format!(
            "the environment given in `env` is {total} bytes in all, over the limit of {MAX_ENV_TOTAL_BYTES}; write large values to a file with write_file"
        )));
    }
    Ok(())
}

fn decode_base64(content: &str) -> Result<Vec<u8>> {
    let compact: String = content
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let encoded_limit = MAX_FILE_BYTES.div_ceil(3) * 4;
    if compact.len() as u64 > encoded_limit {
        let size = compact.len() as u64 / 4 * 3;
        return Err(Error::PayloadTooLarge {
            what: "file content".to_owned(),
            size,
            limit: MAX_FILE_BYTES,
        });
    }
    let content = base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|error| Error::InvalidBase64 {
            field: "content",
            reason: error.to_string(),
        })?;
    if content.len() as u64 > MAX_FILE_BYTES {
        return Err(Error::PayloadTooLarge {
            what: "file content".to_owned(),
            size: content.len() as u64,
            limit: MAX_FILE_BYTES,
        });
    }
    Ok(content)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_env_is_rejected() {
        let long_value = BTreeMap::from([("A".to_owned(), "x".repeat(MAX_ENV_ENTRY_BYTES))]);
        assert_eq!(
            validate_env(&long_value).expect_err("too long").code(),
            "invalid_request"
        );
        let many = (0..20)
            .map(|index| (format!("V{index}"), "x".repeat(100_000)))
            .collect();
        assert_eq!(
            validate_env(&many).expect_err("too much").code(),
            "invalid_request"
        );
        let long_name = BTreeMap::from([("A".repeat(200_000), String::new())]);
        let message = validate_env(&long_name).expect_err("too long").to_string();
        assert!(message.len() < 400, "the message echoes the whole name");
        let fine = BTreeMap::from([("A".to_owned(), "x".repeat(100_000))]);
        validate_env(&fine).expect("within limits");
    }

    #[test]
    fn base64_with_line_breaks_decodes() {
        let encoded = "aGVs\nbG8g\r\nd29y bGQ=";
        assert_eq!(decode_base64(encoded).expect("valid"), b"hello world");
    }

    #[test]
    fn invalid_base64_is_named() {
        let error = decode_base64("not base64!").expect_err("invalid");
        assert_eq!(error.code(), "invalid_base64");
    }

    #[test]
    fn timeout_bounds_are_checked() {
        assert_eq!(
            command_timeout(None).expect("default"),
            DEFAULT_COMMAND_TIMEOUT
        );
        assert_eq!(
            command_timeout(Some(1.5)).expect("valid"),
            Duration::from_millis(1500)
        );
        for invalid in [0.0, -1.0, f64::NAN, 1e9] {
            assert_eq!(
                command_timeout(Some(invalid)).expect_err("invalid").code(),
                "invalid_request"
            );
        }
    }
}
