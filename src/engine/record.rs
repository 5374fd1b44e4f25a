//! The workspace record: state, history, layers and commits, written atomically on every change.
//!
//! Invariant: the record is a persisted format that a restarted derrick reads, and the body of
//! `GET /workspaces/{id}`. It never contains environment values, which may carry secrets: the
//! environment of the create request, which a restarted derrick needs to re-adopt the workspace,
//! sits in a file of its own beside the record, readable only by derrick's user.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::engine::provider::WorkspaceId;
use crate::error::{Error, Result};
use crate::keys::{LayerKey, LayerKind};

/// The stored state of one workspace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkspaceRecord {
    pub id: WorkspaceId,
    pub state: String,
    /// Name of the configuration the workspace was created from.
    pub name: String,
    /// Provider kind, such as `local/overlay`.
    pub provider: String,
    pub created_at: String,
    /// The cached layer the create started from: `setup`, `repositories` or `none`.
    pub cache_hit: String,
    /// The latest transitions, oldest first; at most `MAX_HISTORY_ENTRIES`.
    pub history: Vec<HistoryEntry>,
    /// How many older transitions were dropped to keep `history` bounded.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub history_dropped: u64,
    /// The workspace's layers, bottom first.
    pub layers: Vec<LayerRecord>,
    pub repositories: Vec<RepositoryRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
}

/// One transition: the state entered, the operation that entered it, when, and how long it took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub state: String,
    pub op: String,
    pub at: String,
    pub duration_ms: u64,
}

/// One layer under the workspace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub kind: LayerKind,
    pub key: LayerKey,
    /// Whether the layer came from the cache rather than being built for this workspace.
    pub cache_hit: bool,
}

/// The checkout of one repository.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepositoryRecord {
    pub path: String,
    pub url: String,
    pub reference: Option<String>,
    /// The local branch of the checkout; `None` for a detached HEAD (a tag or a commit id).
    pub branch: Option<String>,
    /// The commit checked out now.
    pub commit: String,
}

/// The cause of a `failed` state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// The operation that failed (`clone`, `setup`, `reset`, ...).
    pub step: String,
    pub exit_code: Option<i32>,
    /// The last part of the step's output, or the error message.
    pub output: String,
}

/// The folder with one JSON file per workspace.
#[derive(Debug, Clone)]
pub struct RecordStore {
    directory: PathBuf,
    /// An exclusive lock on `<state_dir>/lock`, held for the store's lifetime, because a second
    /// derrick on the same records would remove the first one's live workspaces as leftovers.
    _lock: Arc<nix::fcntl::Flock<std::fs::File>>,
}

impl RecordStore {
    /// Stores records in `<state_dir>/workspaces`, creating it.
    ///
    /// # Errors
    /// Fails when the folder cannot be created.
    pub fn open(state_dir: &Path) -> Result<RecordStore> {
        let directory = state_dir.join("workspaces");
        std::fs::create_dir_all(&directory).map_err(|error| {
            Error::internal(
                format!("cannot create state folder {}", directory.display()),
                error,
            )
        })?;
        let lock_path = state_dir.join("lock");
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|error| {
                Error::internal(format!("cannot open {}", lock_path.display()), error)
            })?;
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
            Error::ProviderUnavailable(format!(
                "state folder {} is in use by another derrick ({errno}); give each derrick its own --state-dir",
                state_dir.display()
            ))
        })?;
        Ok(RecordStore {
            directory,
            _lock: Arc::new(lock),
        })
    }

    /// Writes a record atomically: a temporary file in the same folder, then a rename.
    pub async fn write(&self, record: &WorkspaceRecord) -> Result<()> {
        let path = self.path(&record.id);
        let temporary = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(record)
            .map_err(|error| Error::internal("serialize record", error))?;
        tokio::fs::write(&temporary, bytes)
            .await
            .map_err(|error| Error::internal(format!("write {}", temporary.display()), error))?;
        tokio::fs::rename(&temporary, &path)
            .await
            .map_err(|error| Error::internal(format!("rename {}", temporary.display()), error))
    }

    /// Reads a stored record; `None` when there is none.
    pub async fn read(&self, id: &WorkspaceId) -> Result<Option<WorkspaceRecord>> {
        let path = self.path(id);
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(Error::internal(format!("read {}", path.display()), error)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|error| Error::internal(format!("parse {}", path.display()), error))
    }

    /// Stores the environment of a workspace's create request, readable only by this user.
    pub async fn write_env(&self, id: &WorkspaceId, env: &BTreeMap<String, String>) -> Result<()> {
        let path = self.env_path(id);
        let bytes =
            serde_json::to_vec(env).map_err(|error| Error::internal("serialize env", error))?;
        tokio::task::spawn_blocking(move || {
            let temporary = path.with_extension("env.tmp");
            let written = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(&temporary)
                .and_then(|mut file| file.write_all(&bytes))
                .and_then(|()| std::fs::rename(&temporary, &path));
            written.map_err(|error| Error::internal(format!("write {}", path.display()), error))
        })
        .await?
    }

    /// Reads the stored environment of a workspace's create request; `None` when there is none.
    pub async fn read_env(&self, id: &WorkspaceId) -> Result<Option<BTreeMap<String, String>>> {
        let path = self.env_path(id);
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(Error::internal(format!("read {}", path.display()), error)),
        };
        // The error names the file only: serde's message could quote a value.
        serde_json::from_slice(&bytes).map(Some).map_err(|_| {
            Error::internal(
                format!("parse {}", path.display()),
                "not a JSON object of strings",
            )
        })
    }

    /// Removes the record of a destroyed workspace and its stored environment.
    pub async fn remove(&self, id: &WorkspaceId) -> Result<()> {
        for path in [self.env_path(id), self.path(id)] {
            match tokio::fs::remove_file(&path).await {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::internal(format!("remove {}", path.display()), error));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Lists the ids of the stored records.
    pub async fn ids(&self) -> Result<Vec<WorkspaceId>> {
        let mut entries = tokio::fs::read_dir(&self.directory)
            .await
            .map_err(|error| {
                Error::internal(format!("list {}", self.directory.display()), error)
            })?;
        let mut ids = Vec::new();
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(|error| Error::internal(format!("list {}", self.directory.display()), error))?
        {
            let name = entry.file_name();
            let name = name.to_str().unwrap_or_default();
            if name.ends_with(".env") || name.ends_with(".tmp") {
                continue;
            }
            let id = name.strip_suffix(".json").and_then(WorkspaceId::parse);
            match id {
                Some(id) => ids.push(id),
                None => tracing::warn!(
                    file = %entry.path().display(),
                    "ignoring a file in the state folder that is not a workspace record"
                ),
            }
        }
        Ok(ids)
    }

    /// Returns the folder of the records.
    pub fn folder(&self) -> &Path {
        &self.directory
    }

    fn path(&self, id: &WorkspaceId) -> PathBuf {
        self.directory.join(format!("{id}.json"))
    }

    fn env_path(&self, id: &WorkspaceId) -> PathBuf {
        self.directory.join(format!("{id}.env"))
    }
}

/// Returns the layers that the workspaces recorded in `state_dir` stand on, without taking the
/// folder's lock, so that it works while a derrick runs there. Unreadable records are skipped.
pub async fn recorded_layers(state_dir: &Path) -> Result<std::collections::BTreeSet<LayerKey>> {
    let directory = state_dir.join("workspaces");
    let mut layers = std::collections::BTreeSet::new();
    let mut entries = match tokio::fs::read_dir(&directory).await {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(layers),
        Err(error) => {
            return Err(Error::internal(
                format!("list {}", directory.display()),
                error,
            ));
        }
    };
    while let Some(entry) = entries
        .next_entry()
        .await
        .map_err(|error| Error::internal(format!("list {}", directory.display()), error))?
    {
        if entry
            .path()
            .extension()
            .is_none_or(|extension| extension != "json")
        {
            continue;
        }
        let Ok(bytes) = tokio::fs::read(entry.path()).await else {
            continue;
        };
        if let Ok(record) = serde_json::from_slice::<WorkspaceRecord>(&bytes) {
            layers.extend(record.layers.into_iter().map(|layer| layer.key));
        }
    }
    Ok(layers)
}

/// Transitions kept in a record. A workspace reset many times a day would otherwise grow its
/// record, rewritten on every transition, without bound; 256 entries cover days of a busy agent.
pub const MAX_HISTORY_ENTRIES: usize = 256;

impl WorkspaceRecord {
    /// Appends a transition, dropping the oldest ones beyond `MAX_HISTORY_ENTRIES`.
    pub fn push_history(&mut self, entry: HistoryEntry) {
        self.history.push(entry);
        let excess = self.history.len().saturating_sub(MAX_HISTORY_ENTRIES);
        if excess > 0 {
            self.history.drain(..excess);
            self.history_dropped += excess as u64;
        }
    }
}

fn is_zero(count: &u64) -> bool {
    *count == 0
}

/// Returns the current time in RFC 3339.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("a current UTC time always formats as RFC 3339")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_latest_entries() {
        let id = WorkspaceId::parse("ws-0123456789abcdef0123456789abcdef").expect("valid id");
        let mut record = WorkspaceRecord {
            id,
            state: "running".to_owned(),
            name: "n".to_owned(),
            provider: "local/overlay".to_owned(),
            created_at: now_rfc3339(),
            cache_hit: "none".to_owned(),
            history: Vec::new(),
            history_dropped: 0,
            layers: Vec::new(),
            repositories: Vec::new(),
            failure: None,
        };
        for index in 0..MAX_HISTORY_ENTRIES + 10 {
            let entry = HistoryEntry {
                state: "running".to_owned(),
                op: format!("op{index}"),
                at: now_rfc3339(),
                duration_ms: 0,
            };
            record.push_history(entry);
        }
        assert_eq!(record.history.len(), MAX_HISTORY_ENTRIES);
        assert_eq!(record.history_dropped, 10);
        assert_eq!(record.history[0].op, "op10");
    }
}
