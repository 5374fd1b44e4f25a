//! Complete layers in the cache, and the staging folders where new ones are built.
//!
//! A layer is built as `tmp/<random>/{tree,meta.json}` and appears as `layers/<key>` through one
//! `rename`, so a reader either sees a complete layer or none. When two builds of one key race,
//! the first rename wins and the other build is discarded: equal keys mean equal content.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::cannot;
use super::layout::Layout;
use crate::engine::{LayerInfo, LayerMeta};
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

/// Lists the complete layers with the bytes their trees take on disk. Folders without
/// `meta.json` are skipped: `layers/` only ever receives complete layers, through a rename.
pub(super) fn list_blocking(layout: &Layout) -> Result<Vec<LayerInfo>> {
    let folder = layout.layers();
    let entries = fs::read_dir(&folder).map_err(cannot(format!("list {}", folder.display())))?;
    let mut layers = Vec::new();
    for entry in entries {
        let entry = entry.map_err(cannot(format!("list {}", folder.display())))?;
        let Some(key) = entry.file_name().to_str().and_then(LayerKey::parse) else {
            continue;
        };
        let Some(meta) = read_meta_blocking(layout, &key)? else {
            continue;
        };
        let tree = layout.layer_tree(&key);
        let size_bytes =
            disk_usage(&tree).map_err(cannot(format!("measure {}", tree.display())))?;
        layers.push(LayerInfo { meta, size_bytes });
    }
    Ok(layers)
}

/// Removes a complete layer: its folder leaves `layers/` through one rename into `tmp/`, so no
/// reader sees half a layer, and is deleted there.
pub(super) fn remove_blocking(layout: &Layout, key: &LayerKey) -> Result<()> {
    let staging = Staging::create_blocking(layout)?;
    let doomed = staging.folder.join("layer");
    match fs::rename(layout.layer(key), &doomed) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => {
            staging.discard_blocking()?;
            return Err(Error::internal(format!("cannot remove layer {key}"), error));
        }
    }
    staging.discard_blocking()
}

/// Returns the bytes that the files and folders under `path` take on disk, without following
/// symbolic links or crossing into other file systems.
fn disk_usage(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let root = fs::symlink_metadata(path)?;
    let mut total = root.blocks() * 512;
    let mut pending = vec![path.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in fs::read_dir(&folder)? {
            let entry = entry?;
            let metadata = entry.metadata()?;
            total += metadata.blocks() * 512;
            if metadata.is_dir() && metadata.dev() == root.dev() {
                pending.push(entry.path());
            }
        }
    }
    Ok(total)
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

/// Removes a folder tree, or a single entry; a missing one is already removed.
///
/// The walk never leaves the file system of `path`'s parent: an entry on another device (a mount
/// that a command made and that is still there) stops it with an error before anything on that
/// device is touched. It works through descriptors and keeps one folder open at a time, so neither
/// the depth of the tree nor the length of its paths limits it, and a symbolic link swapped in
/// for a folder is removed, never followed.
///
/// # Errors
/// `path` has no parent, an entry lies on another file system, a folder moved during the walk,
/// or a system call failed.
pub(super) fn remove_tree(path: &Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        let message = format!("{} has no parent folder to remove it from", path.display());
        return Err(io::Error::new(io::ErrorKind::InvalidInput, message));
    };
    let parent_path = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let parent = match open_folder(AT_FDCWD, parent_path) {
        Err(Errno::ENOENT) => return Ok(()),
        other => other?,
    };
    let device = fstat(&parent)?.st_dev;
    let stat = match fstatat(&parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(Errno::ENOENT) => return Ok(()),
        other => other?,
    };
    ensure_same_device(&stat, device, path)?;
    if !is_folder(&stat) {
        return Ok(unlinkat(&parent, name, UnlinkatFlags::NoRemoveDir)?);
    }
    empty_folder(&parent, name, &stat, path)?;
    Ok(unlinkat(&parent, name, UnlinkatFlags::RemoveDir)?)
}

/// A folder on the way down in `empty_folder`.
struct Level {
    /// Its inode, to check that `..` leads back to it.
    inode: u64,
    /// Its entries that are still to be removed.
    names: Vec<OsString>,
}

/// Removes everything inside the folder `name` of `parent`, whose `lstat` is `stat`.
///
/// Only the current folder is open. Going up opens `..` and checks its inode, so a folder moved
/// away meanwhile stops the walk instead of sending it elsewhere.
fn empty_folder(parent: &OwnedFd, name: &OsStr, stat: &FileStat, path: &Path) -> io::Result<()> {
    let device = stat.st_dev;
    let mut shown = path.to_path_buf();
    let mut folder = open_child_folder(parent, name, stat, &shown)?;
    let mut levels = vec![Level {
        inode: stat.st_ino,
        names: folder_names(&folder)?,
    }];
    while let Some(level) = levels.last_mut() {
        if let Some(entry) = level.names.pop() {
            let entry_path = shown.join(&entry);
            let stat = match fstatat(&folder, entry.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Err(Errno::ENOENT) => continue,
                other => other?,
            };
            ensure_same_device(&stat, device, &entry_path)?;
            if !is_folder(&stat) {
                unlink_missing_ok(&folder, &entry, UnlinkatFlags::NoRemoveDir)?;
                continue;
            }
            folder = open_child_folder(&folder, &entry, &stat, &entry_path)?;
            levels.push(Level {
                inode: stat.st_ino,
                names: folder_names(&folder)?,
            });
            shown = entry_path;
            continue;
        }
        levels.pop();
        let Some(parent_level) = levels.last() else {
            return Ok(());
        };
        let up = open_folder(&folder, "..")?;
        let up_stat = fstat(&up)?;
        if (up_stat.st_dev, up_stat.st_ino) != (device, parent_level.inode) {
            return Err(moved(&shown));
        }
        let finished = shown.file_name().map(OsStr::to_owned).unwrap_or_default();
        unlink_missing_ok(&up, &finished, UnlinkatFlags::RemoveDir)?;
        folder = up;
        shown.pop();
    }
    Ok(())
}

/// Opens a folder for reading its entries, never following a final symbolic link.
fn open_folder<Fd: AsFd>(directory: Fd, path: impl AsRef<Path>) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    nix::fcntl::openat(directory, path.as_ref(), flags, Mode::empty())
}

/// Opens the folder `name` of `parent` and checks that it is the one `stat` describes.
fn open_child_folder(
    parent: &OwnedFd,
    name: &OsStr,
    stat: &FileStat,
    path: &Path,
) -> io::Result<OwnedFd> {
    let folder = open_folder(parent, name)?;
    let opened = fstat(&folder)?;
    if (opened.st_dev, opened.st_ino) != (stat.st_dev, stat.st_ino) {
        return Err(moved(path));
    }
    Ok(folder)
}

/// Lists the entries of an open folder. std reads folders by path only; `/proc/self/fd/<fd>`
/// names the open folder itself, whatever the length of its real path.
fn folder_names(folder: &OwnedFd) -> io::Result<Vec<OsString>> {
    let path = format!("/proc/self/fd/{}", folder.as_raw_fd());
    fs::read_dir(path)?
        .map(|entry| entry.map(|entry| entry.file_name()))
        .collect()
}

fn unlink_missing_ok(folder: &OwnedFd, name: &OsStr, flags: UnlinkatFlags) -> io::Result<()> {
    match unlinkat(folder, name, flags) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(errno) => Err(errno.into()),
    }
}

fn is_folder(stat: &FileStat) -> bool {
    SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

fn ensure_same_device(stat: &FileStat, device: u64, path: &Path) -> io::Result<()> {
    if stat.st_dev == device {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{} is on another file system (a mount is left there); it is not removed, so nothing \
         is deleted through the mount",
        path.display()
    )))
}

fn moved(path: &Path) -> io::Error {
    io::Error::other(format!(
        "{} was moved while it was being removed",
        path.display()
    ))
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
    fn layer_appears_only_when_published() {
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
    fn first_build_of_key_wins() {
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
    fn base_layer_is_empty_tree() {
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

    #[test]
    fn remove_tree_handles_deep_trees_and_links() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let tree = directory.path().join("tree");
        let outside = directory.path().join("outside");
        fs::create_dir_all(&outside).expect("outside folder");
        fs::write(outside.join("keep.txt"), "outside").expect("outside file");
        fs::create_dir_all(tree.join("links")).expect("folder");
        std::os::unix::fs::symlink(&outside, tree.join("links/folder")).expect("link");
        std::os::unix::fs::symlink(outside.join("keep.txt"), tree.join("links/file"))
            .expect("link");
        // 3,000 levels make paths far longer than PATH_MAX, which path-based calls refuse.
        let mut deepest = fs::File::open(&tree).map(OwnedFd::from).expect("tree");
        for _ in 0..3000 {
            nix::sys::stat::mkdirat(&deepest, "level", Mode::from_bits_truncate(0o755))
                .expect("level");
            deepest = open_folder(&deepest, "level").expect("open level");
        }
        nix::fcntl::openat(
            &deepest,
            "file",
            OFlag::O_CREAT | OFlag::O_WRONLY,
            Mode::empty(),
        )
        .expect("deepest file");

        remove_tree(&tree).expect("removed");
        assert!(!tree.exists());
        assert_eq!(
            fs::read_to_string(outside.join("keep.txt")).expect("outside file"),
            "outside"
        );
        remove_tree(&tree).expect("a missing tree is removed");
        remove_tree(&directory.path().join("missing/tree")).expect("a missing parent too");
    }

    #[test]
    fn remove_tree_stops_at_mounts() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let tree = directory.path().join("tree");
        let mounted = tree.join("a/mounted");
        fs::create_dir_all(&mounted).expect("folders");
        fs::write(tree.join("a/before.txt"), "x").expect("file");
        nix::mount::mount(
            Some("tmpfs"),
            &mounted,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("tmpfs mount (tests run as root)");
        fs::write(mounted.join("host.txt"), "host").expect("file in the mount");

        let error = remove_tree(&tree).expect_err("the mount stops the removal");
        let content = fs::read_to_string(mounted.join("host.txt"));
        let error_on_top = remove_tree(&mounted).expect_err("a mount point itself too");
        nix::mount::umount2(&mounted, nix::mount::MntFlags::MNT_DETACH).expect("unmount");
        assert!(error.to_string().contains("another file system"), "{error}");
        assert!(
            error_on_top.to_string().contains("another file system"),
            "{error_on_top}"
        );
        assert_eq!(content.expect("file in the mount"), "host");
        remove_tree(&tree).expect("removed once unmounted");
        assert!(!tree.exists());
    }
}
