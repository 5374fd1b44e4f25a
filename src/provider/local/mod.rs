//! The `local` provider: workspaces are folders on this host, layers are folders in the cache.
//!
//! Two layer formats exist, chosen once when the provider starts ([`LayerMode`]):
//!
//! - overlay: a workspace is an overlayfs mount whose lower folders are its layers' trees and
//!   whose upper folder is its scratch layer. A reset empties the scratch layer, so its cost
//!   follows the size of the changes. Needs root (or `CAP_SYS_ADMIN`) and a file system that
//!   overlayfs accepts as upper.
//! - copy: a layer is a full tree and a workspace is a copy of its top layer. A reset restores
//!   only the entries that differ from the layer. Works anywhere.
//!
//! The format is part of [`Provider::kind`] and therefore of every layer key, so the two formats
//! never read each other's layers.
//!
//! Disk layout under the cache folder:
//!
//! ```text
//! layers/<key>/meta.json        LayerMeta of a complete layer
//! layers/<key>/tree/            its content (overlay: a former upper folder; copy: a full tree)
//! tmp/<random>/                 layers being built; renamed into layers/ once complete
//! workspaces/<id>/root/         what commands and file requests see (the overlay mount point)
//! workspaces/<id>/upper/        overlay only: the scratch layer
//! workspaces/<id>/work/         overlay only: overlayfs's work folder
//! workspaces/<id>/layers.json   the workspace's layer keys, bottom first
//! ```
//!
//! Everything sits on one file system, so moving an upper folder or a finished build into
//! `layers/` is an atomic `rename`, and a crash never leaves a half layer there.
//!
//! The provider isolates files, not the system: commands run as the provider's user on the host,
//! with the workspace root as their working folder and `HOME`. Such a command (as root) can mount
//! host folders into its workspace; before a snapshot, reset or destroy the provider detaches
//! every mount below the workspace folder (`mounts`), and its deleting walks never cross into
//! another file system. Each command runs in a cgroup of its own where cgroup v2 works
//! (`cgroup`, `processes`), so a reset, destroy or timeout kills every process it started.
//!
//! Invariant: the workspace state map is locked only for lookups, never across an `.await`;
//! operations on different workspaces never wait for each other. Blocking file work runs in
//! `spawn_blocking`.

mod cgroup;
mod copy;
mod exec;
mod files;
mod layers;
mod layout;
mod mounts;
mod overlay;
mod processes;
mod reaper;
mod state;
mod workspace;

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::task;
use tracing::warn;

pub use crate::provider::output::{MAX_OUTPUT_BYTES, OUTPUT_DRAIN_GRACE, TIMEOUT_EXIT_CODE};
pub use reaper::start_reaping_orphans;

use self::layout::Layout;
use self::processes::Tracker;
use self::state::Workspaces;
use crate::engine::{ExecOutput, ExecRequest, LayerInfo, LayerMeta, Provider, WorkspaceId};
use crate::error::{Error, Result};
use crate::git::{self, Checkout, CheckoutUpdate};
use crate::keys::LayerKey;
use crate::paths::WorkspacePath;

/// Options of the local provider.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Holds layers, workspaces and temporary builds; created if missing.
    pub cache_dir: PathBuf,
    pub layer_mode: LayerMode,
}

/// The layer format of the local provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerMode {
    /// Overlay when a probe mount in the cache folder works, copy otherwise (with a warning).
    Auto,
    /// Overlay mounts; the provider fails to start when they do not work.
    Overlay,
    /// Plain copies.
    Copy,
}

/// The local provider.
#[derive(Debug)]
pub struct LocalProvider {
    layout: Layout,
    format: Format,
    workspaces: Workspaces,
    tracker: Arc<Tracker>,
}

/// The resolved layer mode: what [`LayerMode::Auto`] became.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Overlay,
    Copy,
}

impl LocalProvider {
    /// Creates the cache folders, removes what crashed builds left in them, and settles the
    /// layer mode (probing an overlay mount for `Auto` and `Overlay`).
    ///
    /// # Errors
    /// `internal` when the cache folders cannot be created; `provider_unavailable` when
    /// `Overlay` was asked for and overlay mounts do not work in the cache folder.
    pub fn new(options: LocalOptions) -> Result<LocalProvider> {
        let layout = Layout::new(options.cache_dir);
        layout.create_blocking().map_err(cannot(format!(
            "create the cache folders in {}",
            layout.cache().display()
        )))?;
        layers::remove_stale_staging_blocking(&layout)
            .map_err(cannot(format!("clean {}", layout.tmp().display())))?;
        let format = Format::choose(&layout, options.layer_mode)?;
        let tracker = Arc::new(Tracker::choose_blocking(layout.cache()));
        Ok(LocalProvider {
            layout,
            format,
            workspaces: Workspaces::default(),
            tracker,
        })
    }

    /// Opens an existing cache to list or remove layers, changing nothing else: no folder is
    /// created, no mount or cgroup probed, so it is safe beside a running derrick.
    ///
    /// # Errors
    /// `invalid_request` when `cache_dir` contains no derrick cache.
    pub fn inspect(cache_dir: PathBuf) -> Result<LocalProvider> {
        let layout = Layout::new(cache_dir);
        if !layout.layers().is_dir() || !layout.tmp().is_dir() {
            return Err(Error::invalid_request(format!(
                "{} is not a derrick cache (it has no layers and tmp folders); give the --cache-dir of a derrick, and -p docker for a docker cache",
                layout.cache().display()
            )));
        }
        Ok(LocalProvider {
            layout,
            format: Format::Overlay,
            workspaces: Workspaces::default(),
            tracker: Arc::new(Tracker::Scan),
        })
    }

    /// Finds processes by process group and environment even where cgroups work, as on a host
    /// without them, so tests can check that fallback.
    #[cfg(test)]
    fn without_cgroups(mut self) -> LocalProvider {
        self.tracker = Arc::new(Tracker::Scan);
        self
    }

    /// Returns the layer mode in use: `Overlay` or `Copy`, never `Auto`.
    pub fn layer_mode(&self) -> LayerMode {
        match self.format {
            Format::Overlay => LayerMode::Overlay,
            Format::Copy => LayerMode::Copy,
        }
    }

    /// Returns the host folder that a workspace's commands see as their root.
    pub fn workspace_root(&self, id: &WorkspaceId) -> PathBuf {
        self.layout.root(id)
    }

    /// Runs `work` on a blocking thread with the cache layout.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Layout) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let layout = self.layout.clone();
        task::spawn_blocking(move || work(&layout)).await?
    }

    /// Returns the workspace's layer stack, finding a workspace of an earlier provider process
    /// on disk (and mounting it again) when this one does not know it yet.
    async fn loaded_layers(&self, id: &WorkspaceId) -> Result<Vec<LayerKey>> {
        if let Some(layers) = self.workspaces.layers(id) {
            return Ok(layers);
        }
        let (format, owned) = (self.format, id.clone());
        let layers = self
            .blocking(move |layout| workspace::load_blocking(layout, format, &owned))
            .await?;
        self.workspaces.adopt(id, layers.clone());
        Ok(layers)
    }

    /// Resolves the host folder of a checkout's workspace path.
    async fn checkout_destination(&self, id: &WorkspaceId, path: &str) -> Result<PathBuf> {
        let (root, path) = (self.layout.root(id), path.to_owned());
        task::spawn_blocking(move || Ok(WorkspacePath::resolve(&root, &path, None)?.host_path()))
            .await?
    }
}

#[async_trait]
impl Provider for LocalProvider {
    fn kind(&self) -> &str {
        match self.format {
            Format::Overlay => "local/overlay",
            Format::Copy => "local/copy",
        }
    }

    async fn layer(&self, key: &LayerKey) -> Result<Option<LayerMeta>> {
        let key = key.clone();
        self.blocking(move |layout| layers::read_meta_blocking(layout, &key))
            .await
    }

    async fn layers(&self) -> Result<Vec<LayerInfo>> {
        self.blocking(layers::list_blocking).await
    }

    async fn environment_layers(&self) -> Result<BTreeSet<LayerKey>> {
        self.blocking(workspace::all_stacks_blocking).await
    }

    async fn remove_layer(&self, key: &LayerKey) -> Result<()> {
        let key = key.clone();
        self.blocking(move |layout| layers::remove_blocking(layout, &key))
            .await
    }

    async fn ensure_base(&self, key: &LayerKey, config_name: &str) -> Result<()> {
        let (key, config_name) = (key.clone(), config_name.to_owned());
        self.blocking(move |layout| layers::ensure_base_blocking(layout, &key, &config_name))
            .await
    }

    /// Creates the workspace; a workspace left by an earlier attempt with the same id is
    /// destroyed first, so a retried provision starts clean.
    async fn provision(&self, id: &WorkspaceId, layers: &[LayerKey]) -> Result<()> {
        if layers.is_empty() {
            return Err(Error::invalid_request(format!(
                "workspace {id} needs at least a base layer"
            )));
        }
        self.destroy(id).await?;
        let (format, owned, stack) = (self.format, id.clone(), layers.to_vec());
        self.blocking(move |layout| workspace::provision_blocking(layout, format, &owned, &stack))
            .await?;
        self.workspaces.insert(id, layers.to_vec());
        Ok(())
    }

    async fn checkout(&self, id: &WorkspaceId, checkouts: &[Checkout]) -> Result<()> {
        self.loaded_layers(id).await?;
        for checkout in checkouts {
            let destination = self.checkout_destination(id, &checkout.path).await?;
            git::checkout(checkout.clone(), destination).await?;
        }
        Ok(())
    }

    async fn update_checkout(
        &self,
        id: &WorkspaceId,
        checkout: &Checkout,
    ) -> Result<CheckoutUpdate> {
        self.loaded_layers(id).await?;
        let destination = self.checkout_destination(id, &checkout.path).await?;
        git::update_checkout(checkout.clone(), destination).await
    }

    async fn snapshot(&self, id: &WorkspaceId, meta: &LayerMeta) -> Result<()> {
        let layers = self.loaded_layers(id).await?;
        self.kill_processes(id).await?;
        let (format, owned, meta) = (self.format, id.clone(), meta.clone());
        let stack = self
            .blocking(move |layout| {
                workspace::snapshot_blocking(layout, format, &owned, &layers, &meta)
            })
            .await?;
        self.workspaces.set_layers(id, stack);
        Ok(())
    }

    async fn exec(&self, id: &WorkspaceId, request: ExecRequest) -> Result<ExecOutput> {
        self.loaded_layers(id).await?;
        let root = self.layout.root(id);
        exec::run(&root, id, request, &self.tracker, |group| {
            self.workspaces.record_group(id, group)
        })
        .await
    }

    async fn read_file(
        &self,
        id: &WorkspaceId,
        path: &str,
        working_dir: Option<&str>,
        max_bytes: u64,
    ) -> Result<Vec<u8>> {
        self.loaded_layers(id).await?;
        let (root, owned) = (self.layout.root(id), id.clone());
        let (path, working_dir) = (path.to_owned(), working_dir.map(str::to_owned));
        task::spawn_blocking(move || {
            files::read_blocking(&root, &owned, &path, working_dir.as_deref(), max_bytes)
        })
        .await?
    }

    async fn write_file(
        &self,
        id: &WorkspaceId,
        path: &str,
        working_dir: Option<&str>,
        content: &[u8],
    ) -> Result<()> {
        self.loaded_layers(id).await?;
        let root = self.layout.root(id);
        let (path, working_dir, content) = (
            path.to_owned(),
            working_dir.map(str::to_owned),
            content.to_vec(),
        );
        task::spawn_blocking(move || {
            files::write_blocking(&root, &path, working_dir.as_deref(), &content)
        })
        .await?
    }

    /// Kills the workspace's cgroups, the recorded process groups and every process whose
    /// environment carries the workspace id. Works for unknown workspaces too, as a clean-up
    /// after a restart: the cgroup folder's name depends only on the cache path.
    async fn kill_processes(&self, id: &WorkspaceId) -> Result<()> {
        let groups = self.workspaces.groups(id);
        let (owned, killed, tracker) = (id.clone(), groups.clone(), Arc::clone(&self.tracker));
        self.blocking(move |_| tracker.kill_workspace_blocking(&owned, &killed))
            .await?;
        self.workspaces.forget_groups(id, &groups);
        Ok(())
    }

    async fn reset(&self, id: &WorkspaceId) -> Result<()> {
        let layers = self.loaded_layers(id).await?;
        self.kill_processes(id).await?;
        let (format, owned) = (self.format, id.clone());
        self.blocking(move |layout| workspace::reset_blocking(layout, format, &owned, &layers))
            .await
    }

    /// Destroys the workspace; destroying one that does not exist succeeds.
    async fn destroy(&self, id: &WorkspaceId) -> Result<()> {
        self.kill_processes(id).await?;
        let owned = id.clone();
        self.blocking(move |layout| workspace::destroy_blocking(layout, &owned))
            .await?;
        self.workspaces.remove(id);
        Ok(())
    }

    /// Mounts the workspace again (overlay) when a reboot or a shutdown unmounted it.
    async fn adopt(&self, id: &WorkspaceId, layers: &[LayerKey]) -> Result<bool> {
        match self.loaded_layers(id).await {
            Ok(stack) if stack == layers => Ok(true),
            Ok(_) | Err(Error::WorkspaceNotFound { .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Unmounts the workspace, so that no mount stays while derrick is stopped; its folder keeps
    /// the scratch layer and `layers.json` for `adopt`.
    async fn release(&self, id: &WorkspaceId) -> Result<()> {
        self.kill_processes(id).await?;
        let owned = id.clone();
        self.blocking(move |layout| workspace::release_blocking(layout, &owned))
            .await?;
        self.workspaces.remove(id);
        Ok(())
    }
}

impl Format {
    fn choose(layout: &Layout, mode: LayerMode) -> Result<Format> {
        if mode == LayerMode::Copy {
            return Ok(Format::Copy);
        }
        let Err(reason) = overlay::probe_blocking(&layout.tmp()) else {
            return Ok(Format::Overlay);
        };
        if mode == LayerMode::Overlay {
            return Err(Error::ProviderUnavailable(format!(
                "overlay mounts do not work in {}: {reason}; run as root on a file system \
                 that overlayfs accepts, or choose the copy layer mode",
                layout.cache().display()
            )));
        }
        let provider = "local/copy";
        warn!(provider, reason = %reason, "overlay mounts unavailable; using copies");
        Ok(Format::Copy)
    }
}

/// Wraps an `io::Error` of the operation `what` as an internal error ("cannot <what>: <error>").
fn cannot(what: impl fmt::Display) -> impl FnOnce(io::Error) -> Error {
    move |error| Error::internal(format!("cannot {what}"), error)
}
