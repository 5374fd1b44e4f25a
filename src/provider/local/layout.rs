//! The paths of the local provider's data under the cache folder.
//!
//! Every path the provider touches is built here. The disk layout described in the module doc
//! of `provider::local` has this one implementation.

use std::io;
use std::path::{Path, PathBuf};

use crate::engine::WorkspaceId;
use crate::keys::LayerKey;

/// The folders of one cache.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    cache: PathBuf,
}

impl Layout {
    pub(super) fn new(cache: PathBuf) -> Layout {
        Layout { cache }
    }

    /// Creates the top folders if they are missing.
    pub(super) fn create_blocking(&self) -> io::Result<()> {
        for folder in [self.layers(), self.tmp(), self.workspaces()] {
            std::fs::create_dir_all(folder)?;
        }
        Ok(())
    }

    pub(super) fn cache(&self) -> &Path {
        &self.cache
    }

    pub(super) fn layers(&self) -> PathBuf {
        self.cache.join("layers")
    }

    pub(super) fn layer(&self, key: &LayerKey) -> PathBuf {
        self.layers().join(key.as_str())
    }

    pub(super) fn layer_meta(&self, key: &LayerKey) -> PathBuf {
        self.layer(key).join("meta.json")
    }

    pub(super) fn layer_tree(&self, key: &LayerKey) -> PathBuf {
        self.layer(key).join("tree")
    }

    /// Returns the folder where layers are built and probes run. It is on the same file system
    /// as `layers` and `workspaces`, so a `rename` moves a finished build into place atomically.
    pub(super) fn tmp(&self) -> PathBuf {
        self.cache.join("tmp")
    }

    pub(super) fn workspaces(&self) -> PathBuf {
        self.cache.join("workspaces")
    }

    pub(super) fn workspace(&self, id: &WorkspaceId) -> PathBuf {
        self.workspaces().join(id.as_str())
    }

    /// Returns the folder that the workspace's commands and file requests use as their root.
    pub(super) fn root(&self, id: &WorkspaceId) -> PathBuf {
        self.workspace(id).join("root")
    }

    /// Returns the overlay's upper folder, which is the scratch layer.
    pub(super) fn upper(&self, id: &WorkspaceId) -> PathBuf {
        self.workspace(id).join("upper")
    }

    /// Returns the overlay's work folder, which overlayfs needs beside the upper one.
    pub(super) fn work(&self, id: &WorkspaceId) -> PathBuf {
        self.workspace(id).join("work")
    }

    /// Returns the file with the workspace's layer keys, bottom first, as JSON.
    pub(super) fn stack_file(&self, id: &WorkspaceId) -> PathBuf {
        self.workspace(id).join("layers.json")
    }
}
