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

pub use provider::{ExecOutput, ExecRequest, LayerMeta, Provider, WorkspaceId};

/// Timeout of a command that gives none; long enough for a full build or test suite.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(600);

/// Largest `timeout` a request may give: one day, so that a typo cannot pin a process forever.
pub const MAX_COMMAND_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Largest file that `read_file` returns and `write_file` accepts. 64 MiB covers source files,
/// lock files and small artifacts while keeping one request's memory bounded.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Engine settings besides the provider.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub config: WorkspaceConfig,
    pub cache_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Limit for the setup script; `None` lets a quiet setup run as long as it needs.
    pub setup_timeout: Option<Duration>,
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
            records: RecordStore::open(&options.state_dir)?,
            setup_timeout: options.setup_timeout,
            config: options.config,
            workspaces: Mutex::new(HashMap::new()),
            builds: Mutex::new(HashMap::new()),
        })
    }

    /// Returns the layer keys of the served configuration.
    pub fn keys(&self) -> &LayerKeys {
        &self.keys
    }

    /// Returns the declared state machine.
    pub fn states(&self) -> &StateMachine {
        &self.machine
    }

    /// Lists live workspaces, oldest first.
    pub fn list(&self) -> api::ListResponse {
        let workspaces: Vec<Arc<Workspace>> = self
            .workspaces
            .lock()
            .expect("workspace map lock")
            .values()
            .cloned()
            .collect();
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
        let output = self.provider.exec(&workspace.id, exec).await?;
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

    /// Destroys every live workspace, logging each, so that stopping derrick leaves no mount or
    /// process behind.
    // TODO: a restarted derrick cannot re-adopt workspaces yet, so shutdown destroys them. Once
    // start-up loads the records, shutdown should keep the workspaces and only record their state.
    pub async fn shutdown(&self) {
        for id in self.live_ids() {
            match self.destroy(id.as_str()).await {
                Ok(()) => info!(workspace_id = %id, "destroyed at shutdown"),
                Err(error) => {
                    tracing::error!(workspace_id = %id, error = %error, "cannot destroy at shutdown")
                }
            }
        }
    }

    /// Kills the processes of every live workspace, so that running commands and setup scripts
    /// end and a shutdown does not wait for them.
    pub async fn interrupt(&self) {
        for id in self.live_ids() {
            if let Err(error) = self.provider.kill_processes(&id).await {
                tracing::error!(workspace_id = %id, error = %error, "cannot kill processes at shutdown");
            }
        }
    }

    /// Removes the workspaces that an earlier derrick left behind (after a crash or SIGKILL):
    /// their processes, mounts, scratch folders and records, logging each one.
    // TODO: re-adopt live workspaces instead of removing them. Their records and layer stacks are
    // on disk, but the create request's env is not, so re-adoption needs it stored safely first.
    pub async fn remove_leftovers(&self) -> Result<()> {
        for id in self.records.ids().await? {
            match self.provider.destroy(&id).await {
                Ok(()) => {
                    tracing::warn!(workspace_id = %id, "removed a workspace left by an earlier run");
                    self.records.remove(&id).await?;
                }
                Err(error) => {
                    tracing::error!(workspace_id = %id, error = %error, "cannot remove a workspace left by an earlier run");
                }
            }
        }
        Ok(())
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
        workspaces.get(&id).cloned().ok_or_else(not_found)
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
