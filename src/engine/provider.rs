//! The provider trait: the operations the engine needs from a place that contains workspaces.
//!
//! A provider owns environments (a mounted directory, a container) and layers (directories,
//! images). It never decides whether an operation is allowed; the engine checks the state machine
//! first. It never talks to a Git remote either: the engine fills the host's mirrors, and a
//! provider copies checkouts out of them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::git::{Checkout, CheckoutUpdate};
use crate::keys::{LayerKey, LayerKind};

/// A workspace id: `ws-` and 32 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkspaceId(String);

impl WorkspaceId {
    /// Generates a new random id.
    pub fn generate() -> WorkspaceId {
        WorkspaceId(format!("ws-{}", uuid::Uuid::new_v4().simple()))
    }

    /// Parses an id from a request; `None` for anything that no workspace could have.
    pub fn parse(text: &str) -> Option<WorkspaceId> {
        let hex = text.strip_prefix("ws-")?;
        let valid = hex.len() == 32
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        valid.then(|| WorkspaceId(text.to_owned()))
    }

    /// Returns the id text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for WorkspaceId {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// Metadata of a complete layer, stored beside its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMeta {
    pub key: LayerKey,
    pub kind: LayerKind,
    pub parent: Option<LayerKey>,
    /// Name of the configuration that built the layer.
    pub config_name: String,
    /// The commit of each repository in the layer, by workspace path.
    pub commits: BTreeMap<String, String>,
    /// RFC 3339 time of completion.
    pub created_at: String,
}

/// A complete layer in the cache and the disk space it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    pub meta: LayerMeta,
    /// Bytes of the layer's own content, without its parents.
    pub size_bytes: u64,
}

/// A command to run in a workspace.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub cmd: String,
    /// Directory inside the workspace, absolute or relative to the root; `None` is the root.
    pub working_dir: Option<String>,
    /// Environment on top of the provider's allowlist; later entries of the merge win.
    pub env: BTreeMap<String, String>,
    /// `None` runs without a limit (setup scripts without an operator timeout).
    pub timeout: Option<Duration>,
}

/// The result of a finished command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// stdout and stderr interleaved, invalid UTF-8 replaced, the tail kept when capped.
    pub output: String,
    /// The exit code, 128 + signal for a killed command, 124 for a timeout.
    pub exit_code: i32,
    pub timed_out: bool,
    pub truncated: bool,
    pub duration: Duration,
}

/// A place that contains workspaces and their layers.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Names the provider and its layer format (`local/overlay`, `local/copy`, `docker`); it is
    /// part of the base layer key, so layers of different formats never mix.
    fn kind(&self) -> &str;

    /// Returns the metadata of a complete layer, or `None` when the cache lacks it.
    async fn layer(&self, key: &LayerKey) -> Result<Option<LayerMeta>>;

    /// Lists the complete layers in the cache.
    async fn layers(&self) -> Result<Vec<LayerInfo>>;

    /// Removes a layer from the cache; removing a missing one succeeds. The caller makes sure
    /// that no workspace uses it and no other layer has it as parent.
    async fn remove_layer(&self, key: &LayerKey) -> Result<()>;

    /// Returns the layers that the environments in this provider stand on, whether the engine
    /// knows them or not (workspaces of another state folder, those of a killed `warm`), so that
    /// eviction never removes a layer under one of them.
    async fn environment_layers(&self) -> Result<BTreeSet<LayerKey>>;

    /// Creates the base layer if it does not exist yet.
    async fn ensure_base(&self, key: &LayerKey, config_name: &str) -> Result<()>;

    /// Creates the environment of a workspace on top of `layers`, bottom first.
    async fn provision(&self, id: &WorkspaceId, layers: &[LayerKey]) -> Result<()>;

    /// Checks repositories out of host mirrors into the workspace.
    async fn checkout(&self, id: &WorkspaceId, checkouts: &[Checkout]) -> Result<()>;

    /// Brings a checkout in the workspace to `checkout.commit`, fetching from the host mirror.
    ///
    /// The checkout moves only when it can do so without losing local commits or changes;
    /// otherwise only its remote-tracking refs move, and `after` equals `before`.
    async fn update_checkout(
        &self,
        id: &WorkspaceId,
        checkout: &Checkout,
    ) -> Result<CheckoutUpdate>;

    /// Records the workspace's current content as layer `meta.key` on top of its layers, and
    /// makes the workspace continue from it. The layer appears in the cache only once complete.
    async fn snapshot(&self, id: &WorkspaceId, meta: &LayerMeta) -> Result<()>;

    /// Runs a command in the workspace.
    async fn exec(&self, id: &WorkspaceId, request: ExecRequest) -> Result<ExecOutput>;

    /// Reads a file; `path` is absolute inside the workspace or relative to `working_dir`.
    ///
    /// # Errors
    /// `path_outside_workspace`, `file_not_found`, `invalid_request` for a directory and
    /// `payload_too_large` above `max_bytes`.
    async fn read_file(
        &self,
        id: &WorkspaceId,
        path: &str,
        working_dir: Option<&str>,
        max_bytes: u64,
    ) -> Result<Vec<u8>>;

    /// Writes a file, creating missing parent directories.
    async fn write_file(
        &self,
        id: &WorkspaceId,
        path: &str,
        working_dir: Option<&str>,
        content: &[u8],
    ) -> Result<()>;

    /// Kills every process that the workspace's commands started, including detached ones.
    async fn kill_processes(&self, id: &WorkspaceId) -> Result<()>;

    /// Restores the workspace to its top layer: kills its processes and discards every change.
    async fn reset(&self, id: &WorkspaceId) -> Result<()>;

    /// Kills the workspace's processes and removes its environment and scratch data. Layers stay.
    async fn destroy(&self, id: &WorkspaceId) -> Result<()>;

    /// Takes back a workspace that an earlier derrick process left (after a restart or a crash),
    /// expecting `layers`, bottom first. The caller has killed its processes.
    ///
    /// Returns `false` when its environment is gone or uses other layers; the engine then
    /// destroys it.
    async fn adopt(&self, id: &WorkspaceId, layers: &[LayerKey]) -> Result<bool>;

    /// Lets go of a workspace at shutdown without losing it: kills its processes and frees what
    /// only a running derrick should hold (such as mounts), keeping its content for `adopt`.
    async fn release(&self, id: &WorkspaceId) -> Result<()>;
}
