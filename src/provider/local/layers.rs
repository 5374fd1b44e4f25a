//! Complete layers in the cache, and the staging folders where new ones are built.
//!
//! A layer is built as `tmp/<random>/{tree,meta.json}` and appears as `layers/<key>` through one
//! `rename`, so a reader either sees a complete layer or none. When two builds of one key race,
//! the first rename wins and the other build is discarded: equal keys mean equal content.

use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::cannot;
use super::layout::Layout;
use crate::engine::LayerMeta;
use crate::error::{Error, Result};
use crate::keys::{LayerKey, LayerKind};

/// Age after which a folder in `tmp` is taken for the leftover of a crashed build. A build is one
/// tree copy or rename, minutes at most, so no running build has a folder this old.
const STALE_STAGING_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// A folder under `tmp` in which one layer is built.
#[derive(Debug)]
pub(super) struct Staging {
    folder: PathBuf,
}

impl Staging {
    /// Creates a fresh staging folder.
    pub(super) fn create_blocking(layout: &Layout) -> Result<Staging> {
        let folder = layout
            .tmp()
            .join(format!("layer-{}", uuid::Uuid::new_v4().simple()));
        fs::create_dir_all(&folder).map_err(cannot(format!(
            "create staging folder {}",
            folder.display()
        )))?;
        Ok(Staging { folder })
    }

    /// Returns the folder for the layer's content. The caller creates it.
    pub(super) fn tree(&self) -> PathBuf {
        self.folder.join("tree")
    }

    /// Writes `meta.json`, flushes the file system, and renames the build to `layers/<key>`.
    ///
    /// The flush comes first so that a crash after the rename cannot leave a layer whose files
    /// were never written to disk. If the key already exists, this build is discarded.
    pub(super) fn publish_blocking(self, layout: &Layout, meta: &LayerMeta) -> Result<()> {
        let published = self.try_publish(layout, meta);
        if !self.folder.exists() {
            return published;
        }
        let discarded = self.discard_blocking();
        published.and(discarded)
    }

    /// Removes the staging folder and everything in it.
    pub(super) fn discard_blocking(self) -> Result<()> {
        remove_tree(&self.folder).map_err(cannot(format!(
            "remove staging folder {}",
            self.folder.display()
        )))
    }

    fn try_publish(&self, layout: &Layout, meta: &LayerMeta) -> Result<()> {
        let json = serde_json::to_vec_pretty(meta)
            .map_err(|error| Error::internal("cannot encode layer metadata", error))?;
        let meta_path = self.folder.join("meta.json");
        fs::write(&meta_path, json).map_err(cannot(format!("write {}", meta_path.display())))?;
        sync_file_system(&self.folder).map_err(cannot(format!(
            "flush the file system of {}",
            self.folder.display()
        )))?;
        let target = layout.layer(&meta.key);
        match fs::rename(&self.folder, &target) {
            Ok(()) => Ok(()),
            Err(error) if is_existing_target(&error) => Ok(()),
            Err(error) => Err(Error::internal(
                format!("cannot move layer into {}", target.display()),
                error,
            )),
        }
    }
}

/// Reads the metadata of a complete layer; `None` when the cache lacks it.
pub(super) fn read_meta_blocking(layout: &Layout, key: &LayerKey) -> Result<Option<LayerMeta>> {
    let path = layout.layer_meta(key);
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
    let meta = serde_json::from_slice(&bytes)
        .map_err(|error| Error::internal(format!("cannot parse {}", path.display()), error))?;
    Ok(Some(meta))
}

/// Checks that every layer in `layers` is complete in the cache.
pub(super) fn require_blocking(layout: &Layout, layers: &[LayerKey]) -> Result<()> {
    for key in layers {
        if !layout.layer_meta(key).exists() {
            return Err(Error::internal(
                format!("cannot use layer {key}"),
                "it is not in the cache",
            ));
        }
    }
    Ok(())
}

/// Creates the base layer, an empty tree, unless it exists.
pub(super) fn ensure_base_blocking(
    layout: &Layout,
    key: &LayerKey,
    config_name: &str,
) -> Result<()> {
    if layout.layer_meta(key).exists() {
        return Ok(());
    }
    let created_at = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .map_err(|error| Error::internal("cannot format the current time", error))?;
    let meta = LayerMeta {
        key: key.clone(),
        kind: LayerKind::Base,
        parent: None,
        config_name: config_name.to_owned(),
        commits: Default::default(),
        created_at,
    };
    let staging = Staging::create_blocking(layout)?;
    if let Err(error) = fs::create_dir(staging.tree()) {
        staging.discard_blocking()?;
        return Err(Error::internal(
            "cannot create the base layer's tree",
            error,
        ));
    }
    staging.publish_blocking(layout, &meta)
}

/// Removes the folders that crashed builds and probes left in `tmp`.
pub(super) fn remove_stale_staging_blocking(layout: &Layout) -> io::Result<()> {
    for entry in fs::read_dir(layout.tmp())? {
        let entry = entry?;
        let modified = entry.metadata()?.modified()?;
        if modified.elapsed().is_ok_and(|age| age > STALE_STAGING_AGE) {
            remove_tree(&entry.path())?;
        }
    }
    Ok(())
}

/// Removes a folder tree; a missing one is already removed.
pub(super) fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn sync_file_system(path: &Path) -> io::Result<()> {
    let folder = fs::File::open(path)?;
    Ok(nix::unistd::syncfs(folder.as_fd())?)
}

/// `rename` of a folder onto an existing non-empty folder fails with `ENOTEMPTY` or `EEXIST`.
fn is_existing_target(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::DirectoryNotEmpty | io::ErrorKind::AlreadyExists
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(digit: char) -> LayerKey {
        LayerKey::parse(&digit.to_string().repeat(64)).expect("64 hex digits")
    }

    fn meta(key: &LayerKey, config_name: &str) -> LayerMeta {
        LayerMeta {
            key: key.clone(),
            kind: LayerKind::Setup,
            parent: None,
            config_name: config_name.to_owned(),
            commits: Default::default(),
            created_at: "2024-01-01T00:00:00Z".to_owned(),
        }
    }

    fn layout() -> (tempfile::TempDir, Layout) {
        let directory = tempfile::tempdir().expect("temporary directory");
        let layout = Layout::new(directory.path().to_path_buf());
        layout.create_blocking().expect("cache folders");
        (directory, layout)
    }

    fn staged(layout: &Layout, content: &str) -> Staging {
        let staging = Staging::create_blocking(layout).expect("staging");
        fs::create_dir(staging.tree()).expect("tree");
        fs::write(staging.tree().join("file"), content).expect("file");
        staging
    }

    #[test]
    fn a_layer_appears_only_when_published() {
        let (_directory, layout) = layout();
        let key = key('a');
        let staging = staged(&layout, "first");
        assert_eq!(read_meta_blocking(&layout, &key).expect("read"), None);
        staging
            .publish_blocking(&layout, &meta(&key, "first"))
            .expect("publish");
        assert_eq!(
            read_meta_blocking(&layout, &key).expect("read"),
            Some(meta(&key, "first"))
        );
        assert_eq!(
            fs::read_to_string(layout.layer_tree(&key).join("file")).expect("content"),
            "first"
        );
        assert_eq!(fs::read_dir(layout.tmp()).expect("tmp").count(), 0);
    }

    #[test]
    fn the_first_build_of_a_key_wins() {
        let (_directory, layout) = layout();
        let key = key('b');
        let first = staged(&layout, "first");
        let second = staged(&layout, "second");
        first
            .publish_blocking(&layout, &meta(&key, "first"))
            .expect("publish first");
        second
            .publish_blocking(&layout, &meta(&key, "second"))
            .expect("publish second");
        assert_eq!(
            read_meta_blocking(&layout, &key).expect("read"),
            Some(meta(&key, "first"))
        );
        assert_eq!(
            fs::read_to_string(layout.layer_tree(&key).join("file")).expect("content"),
            "first"
        );
        assert_eq!(fs::read_dir(layout.tmp()).expect("tmp").count(), 0);
    }

    #[test]
    fn stale_staging_folders_are_removed() {
        let (_directory, layout) = layout();
        let stale = staged(&layout, "crashed");
        let fresh = staged(&layout, "running");
        let two_days_ago = std::time::SystemTime::now() - 2 * STALE_STAGING_AGE;
        fs::File::open(&stale.folder)
            .and_then(|folder| folder.set_modified(two_days_ago))
            .expect("age the folder");
        remove_stale_staging_blocking(&layout).expect("clean");
        assert!(!stale.folder.exists());
        assert!(fresh.tree().join("file").exists());
    }

    #[test]
    fn the_base_layer_is_an_empty_tree() {
        let (_directory, layout) = layout();
        let key = key('c');
        ensure_base_blocking(&layout, &key, "app").expect("base");
        ensure_base_blocking(&layout, &key, "other").expect("base exists");
        let meta = read_meta_blocking(&layout, &key)
            .expect("read")
            .expect("complete");
        assert_eq!(
            (meta.kind, meta.parent, meta.config_name.as_str()),
            (LayerKind::Base, None, "app")
        );
        assert_eq!(
            fs::read_dir(layout.layer_tree(&key)).expect("tree").count(),
            0
        );
        require_blocking(&layout, &[key]).expect("present");
        let error = require_blocking(&layout, &[self::key('d')]).expect_err("missing");
        assert_eq!(error.code(), "internal");
    }
}
