//! The environment of one workspace on disk: creating it, recording its layer stack, snapshots,
//! resets and removal, in either layer format.
//!
//! The layer stack is written to `layers.json` beside the root (atomically, through a rename), so
//! a restarted provider can mount the workspace again with the layers it had.

use std::fs;
use std::io;

use serde::{Deserialize, Serialize};

use super::layers::{self, remove_tree};
use super::layout::Layout;
use super::{Format, cannot, copy, mounts, overlay};
use crate::engine::{LayerMeta, WorkspaceId};
use crate::error::{Error, Result};
use crate::keys::LayerKey;

/// The content of `layers.json`. A persisted format: a restarted provider reads it.
#[derive(Debug, Serialize, Deserialize)]
struct StackFile {
    /// Layer keys, bottom first.
    layers: Vec<LayerKey>,
}

/// Creates the workspace on top of `layers` (bottom first); the folder must not exist yet.
pub(super) fn provision_blocking(
    layout: &Layout,
    format: Format,
    id: &WorkspaceId,
    layers: &[LayerKey],
) -> Result<()> {
    layers::require_blocking(layout, layers)?;
    let folder = layout.workspace(id);
    fs::create_dir_all(&folder).map_err(cannot(format!("create {}", folder.display())))?;
    write_stack_blocking(layout, id, layers)?;
    match format {
        Format::Overlay => overlay::provision_blocking(layout, id, layers),
        Format::Copy => copy::provision_blocking(layout, id, layers),
    }
}

/// Finds a workspace that an earlier provider process created, mounts it again if needed, and
/// returns its layer stack.
///
/// # Errors
/// `workspace_not_found` when the workspace has no `layers.json`.
pub(super) fn load_blocking(
    layout: &Layout,
    format: Format,
    id: &WorkspaceId,
) -> Result<Vec<LayerKey>> {
    let Some(layers) = read_stack_blocking(layout, id)? else {
        return Err(Error::WorkspaceNotFound { id: id.to_string() });
    };
    if format == Format::Overlay {
        overlay::ensure_mounted_blocking(layout, id, &layers)?;
    }
    Ok(layers)
}

/// Records the workspace as layer `meta.key` and returns the new stack. The caller has killed
/// the workspace's processes.
///
/// Mounts that commands made in the workspace are detached first, in both formats, so the layer
/// holds the workspace's own files and never a copy of what a mount showed.
pub(super) fn snapshot_blocking(
    layout: &Layout,
    format: Format,
    id: &WorkspaceId,
    layers: &[LayerKey],
    meta: &LayerMeta,
) -> Result<Vec<LayerKey>> {
    mounts::unmount_below_blocking(&layout.workspace(id))?;
    let stack = match format {
        Format::Overlay => overlay::snapshot_blocking(layout, id, layers, meta)?,
        Format::Copy => copy::snapshot_blocking(layout, id, layers, meta)?,
    };
    write_stack_blocking(layout, id, &stack)?;
    Ok(stack)
}

/// Discards every change since the top layer. The caller has killed the workspace's processes.
///
/// Every mount below the workspace folder is detached first (the overlay at the root too, which
/// the overlay reset mounts again), so that discarding changes never deletes through a mount that
/// a command made.
pub(super) fn reset_blocking(
    layout: &Layout,
    format: Format,
    id: &WorkspaceId,
    layers: &[LayerKey],
) -> Result<()> {
    mounts::unmount_below_blocking(&layout.workspace(id))?;
    match format {
        Format::Overlay => overlay::reset_blocking(layout, id, layers),
        Format::Copy => copy::reset_blocking(layout, id, layers),
    }
}

/// Unmounts the workspace and removes its folder; a missing workspace is already destroyed.
///
/// Every mount below the workspace folder is detached in both formats: removing a folder that
/// still has an overlay or a command's bind mount inside would delete through the mount. The
/// removal itself also stops at any other file system that is still found.
pub(super) fn destroy_blocking(layout: &Layout, id: &WorkspaceId) -> Result<()> {
    mounts::unmount_below_blocking(&layout.workspace(id))?;
    overlay::unmount_blocking(&layout.root(id))?;
    let folder = layout.workspace(id);
    remove_tree(&folder).map_err(cannot(format!("remove {}", folder.display())))
}

/// Detaches every mount below the workspace folder, its overlay included, and keeps its files.
pub(super) fn release_blocking(layout: &Layout, id: &WorkspaceId) -> Result<()> {
    mounts::unmount_below_blocking(&layout.workspace(id))?;
    overlay::unmount_blocking(&layout.root(id))
}

/// Returns the layers of every workspace folder in the cache, from their `layers.json`.
pub(super) fn all_stacks_blocking(layout: &Layout) -> Result<std::collections::BTreeSet<LayerKey>> {
    let folder = layout.workspaces();
    let entries = match fs::read_dir(&folder) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(error) => return Err(cannot(format!("list {}", folder.display()))(error)),
    };
    let mut layers = std::collections::BTreeSet::new();
    for entry in entries {
        let entry = entry.map_err(cannot(format!("list {}", folder.display())))?;
        let Some(id) = entry.file_name().to_str().and_then(WorkspaceId::parse) else {
            continue;
        };
        if let Some(stack) = read_stack_blocking(layout, &id)? {
            layers.extend(stack);
        }
    }
    Ok(layers)
}

fn write_stack_blocking(layout: &Layout, id: &WorkspaceId, layers: &[LayerKey]) -> Result<()> {
    let path = layout.stack_file(id);
    let json = serde_json::to_vec_pretty(&StackFile {
        layers: layers.to_vec(),
    })
    .map_err(|error| Error::internal("cannot encode the layer stack", error))?;
    let temporary = path.with_extension("json.tmp");
    fs::write(&temporary, json).map_err(cannot(format!("write {}", temporary.display())))?;
    fs::rename(&temporary, &path).map_err(cannot(format!("replace {}", path.display())))
}

fn read_stack_blocking(layout: &Layout, id: &WorkspaceId) -> Result<Option<Vec<LayerKey>>> {
    let path = layout.stack_file(id);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(Error::internal(
                format!("cannot read {}", path.display()),
                error,
            ));
        }
    };
    let stack: StackFile = serde_json::from_slice(&bytes)
        .map_err(|error| Error::internal(format!("cannot parse {}", path.display()), error))?;
    Ok(Some(stack.layers))
}
