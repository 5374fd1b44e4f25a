//! The workspace record: state, history, layers and commits, written atomically on every change.
//!
//! Invariant: the record is a persisted format that a restarted derrick reads, and the body of
//! `GET /workspaces/{id}`. It never holds environment values, which may carry secrets.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::provider::WorkspaceId;
use crate::error::{Error, Result};
use crate::keys::{LayerKey, LayerKind};

/// Everything derrick knows about one workspace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkspaceRecord {
    pub id: WorkspaceId,
    pub state: String,
    /// Name of the configuration the workspace was created from.
    pub name: String,
    /// Provider kind, such as `local/overlay`.
    pub provider: String,
    pub created_at: String,
    /// Which cached layer the create started from: `setup`, `repositories` or `none`.
    pub cache_hit: String,
    pub history: Vec<HistoryEntry>,
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

/// Why a workspace is `failed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// The operation that failed (`clone`, `setup`, `reset`, ...).
    pub step: String,
    pub exit_code: Option<i32>,
    /// The last part of the step's output, or the error message.
    pub output: String,
}

/// The folder that holds one JSON file per workspace.
#[derive(Debug, Clone)]
pub struct RecordStore {
    directory: PathBuf,
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
        Ok(RecordStore { directory })
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

    /// Removes the record of a destroyed workspace.
    pub async fn remove(&self, id: &WorkspaceId) -> Result<()> {
        match tokio::fs::remove_file(self.path(id)).await {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::internal(format!("remove record of {id}"), error))
            }
            _ => Ok(()),
        }
    }

    fn path(&self, id: &WorkspaceId) -> PathBuf {
        self.directory.join(format!("{id}.json"))
    }
}

/// Returns the current time in RFC 3339.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("a current UTC time always formats as RFC 3339")
}
