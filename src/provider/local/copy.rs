//! Workspaces as plain copies, where overlay mounts are not permitted.
//!
//! Each layer holds a full tree, and a workspace's root is a copy of its top layer. A reset walks
//! the root against that layer and restores only what differs: an entry counts as unchanged when
//! its type, mode, owner, size and modification time (to the nanosecond) match, the same quick
//! check `rsync` makes. A change that keeps all of these (a same-size rewrite followed by
//! `touch -d` to the old time) goes unnoticed; overlay mode has no such gap.
//!
//! Copies keep modes, modification times and symbolic links; owners only when the provider runs
//! as root (otherwise every file belongs to the provider's user anyway). Hard links become
//! separate files; sockets and device files are skipped, since no setup needs them preserved.
//!
//! A reset never crosses into another file system in the workspace: the caller has detached the
//! mounts that commands made there, and an entry on another device that is still found stops the
//! reset with an error instead of being restored, or deleted, through the mount.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, lchown, symlink};
use std::path::Path;

use nix::fcntl::AT_FDCWD;
use nix::sys::stat::{Mode, UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;

use super::cannot;
use super::layers::{Staging, remove_tree};
use super::layout::Layout;
use crate::engine::{LayerMeta, WorkspaceId};
use crate::error::Result;
use crate::keys::LayerKey;

/// Copies the top layer's tree into the workspace root.
pub(super) fn provision_blocking(
    layout: &Layout,
    id: &WorkspaceId,
    layers: &[LayerKey],
) -> Result<()> {
    let root = layout.root(id);
    let Some(top) = layers.last() else {
        return Ok(());
    };
    copy_tree(&layout.layer_tree(top), &root)
        .map_err(cannot(format!("copy layer {top} into {}", root.display())))
}

/// Copies the workspace root into layer `meta.key`; returns the new layer stack.
pub(super) fn snapshot_blocking(
    layout: &Layout,
    id: &WorkspaceId,
    layers: &[LayerKey],
    meta: &LayerMeta,
) -> Result<Vec<LayerKey>> {
    let root = layout.root(id);
    let staging = Staging::create_blocking(layout)?;
    if let Err(error) = copy_tree(&root, &staging.tree()) {
        staging.discard_blocking()?;
        return Err(cannot(format!("copy {} into a layer", root.display()))(
            error,
        ));
    }
    staging.publish_blocking(layout, meta)?;
    let mut stack = layers.to_vec();
    stack.push(meta.key.clone());
    Ok(stack)
}

/// Restores the workspace root to its top layer, touching only what differs. The caller has
/// detached the mounts below the workspace folder.
pub(super) fn reset_blocking(layout: &Layout, id: &WorkspaceId, layers: &[LayerKey]) -> Result<()> {
    let root = layout.root(id);
    let Some(top) = layers.last() else {
        return Ok(());
    };
    let folder = layout.workspace(id);
    let device = fs::symlink_metadata(&folder)
        .map_err(cannot(format!("inspect {}", folder.display())))?
        .dev();
    restore_tree(&layout.layer_tree(top), &root, device).map_err(cannot(format!(
        "restore {} from layer {top}",
        root.display()
    )))
}

/// Copies `source` (a folder, file, link or FIFO) to `destination`, which must not exist.
pub(super) fn copy_tree(source: &Path, destination: &Path) -> io::Result<()> {
    let metadata = fs::symlink_metadata(source)?;
    let file_type = metadata.file_type();
    if file_type.is_dir() {
        fs::create_dir(destination)?;
        for entry in fs::read_dir(source)? {
            let entry = entry?;
            copy_tree(&entry.path(), &destination.join(entry.file_name()))?;
        }
    } else if file_type.is_file() {
        fs::copy(source, destination)?;
    } else if file_type.is_symlink() {
        symlink(fs::read_link(source)?, destination)?;
    } else if file_type.is_fifo() {
        nix::unistd::mkfifo(destination, Mode::from_bits_truncate(metadata.mode()))?;
    } else {
        return Ok(());
    }
    apply_attributes(destination, &metadata)
}

/// Makes `target` equal to `layer`: removes what the layer lacks, restores what differs, and
/// recreates what is missing. Every entry of `target` must be on `device`.
pub(super) fn restore_tree(layer: &Path, target: &Path, device: u64) -> io::Result<()> {
    let wanted = fs::symlink_metadata(layer)?;
    let current = match fs::symlink_metadata(target) {
        Ok(current) => current,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return copy_tree(layer, target),
        Err(error) => return Err(error),
    };
    if current.dev() != device {
        return Err(io::Error::other(format!(
            "{} is on another file system (a mount is left there); it is not restored, so \
             nothing is deleted through the mount",
            target.display()
        )));
    }
    let both_folders = wanted.is_dir() && current.is_dir();
    if both_folders {
        restore_folder(layer, target, device)?;
        let current = fs::symlink_metadata(target)?;
        if !same_attributes(&wanted, &current) {
            apply_attributes(target, &wanted)?;
        }
        return Ok(());
    }
    if is_unchanged(layer, &wanted, target, &current)? {
        return Ok(());
    }
    remove_tree(target)?;
    copy_tree(layer, target)
}

fn restore_folder(layer: &Path, target: &Path, device: u64) -> io::Result<()> {
    for entry in fs::read_dir(target)? {
        let entry = entry?;
        let in_layer = match fs::symlink_metadata(layer.join(entry.file_name())) {
            Ok(_) => true,
            Err(error) if error.kind() == io::ErrorKind::NotFound => false,
            Err(error) => return Err(error),
        };
        if !in_layer {
            remove_tree(&entry.path())?;
        }
    }
    for entry in fs::read_dir(layer)? {
        let entry = entry?;
        restore_tree(&entry.path(), &target.join(entry.file_name()), device)?;
    }
    Ok(())
}

/// Compares two entries that are not both folders.
fn is_unchanged(
    layer: &Path,
    wanted: &fs::Metadata,
    target: &Path,
    current: &fs::Metadata,
) -> io::Result<bool> {
    if wanted.file_type() != current.file_type() {
        return Ok(false);
    }
    if wanted.file_type().is_symlink() {
        return Ok(fs::read_link(layer)? == fs::read_link(target)?);
    }
    Ok(same_attributes(wanted, current) && wanted.size() == current.size())
}

fn same_attributes(wanted: &fs::Metadata, current: &fs::Metadata) -> bool {
    let owner_matters = nix::unistd::geteuid().is_root();
    let same_owner =
        !owner_matters || (wanted.uid(), wanted.gid()) == (current.uid(), current.gid());
    same_owner
        && wanted.mode() == current.mode()
        && (wanted.mtime(), wanted.mtime_nsec()) == (current.mtime(), current.mtime_nsec())
}

/// Gives `path` the owner (as root), mode and times of `metadata`. The owner comes first
/// because `chown` clears set-user-id bits, and the times last because the folder's content
/// was written before this call.
fn apply_attributes(path: &Path, metadata: &fs::Metadata) -> io::Result<()> {
    if nix::unistd::geteuid().is_root() {
        lchown(path, Some(metadata.uid()), Some(metadata.gid()))?;
    }
    if !metadata.file_type().is_symlink() {
        fs::set_permissions(path, fs::Permissions::from_mode(metadata.mode()))?;
    }
    let accessed = TimeSpec::new(metadata.atime(), metadata.atime_nsec());
    let modified = TimeSpec::new(metadata.mtime(), metadata.mtime_nsec());
    Ok(utimensat(
        AT_FDCWD,
        path,
        &accessed,
        &modified,
        UtimensatFlags::NoFollowSymlink,
    )?)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;
    use std::time::{Duration, SystemTime};

    use super::*;

    /// Lists every entry under `root` with its type, mode, size, mtime and link target or
    /// content, sorted by path.
    fn describe(root: &Path) -> Vec<String> {
        let mut lines = Vec::new();
        describe_into(root, root, &mut lines);
        lines.sort();
        lines
    }

    fn describe_into(root: &Path, path: &Path, lines: &mut Vec<String>) {
        let metadata = fs::symlink_metadata(path).expect("metadata");
        let name = path
            .strip_prefix(root)
            .expect("under root")
            .display()
            .to_string();
        let detail = if metadata.is_file() {
            fs::read_to_string(path).unwrap_or_else(|_| "<binary>".to_owned())
        } else if metadata.file_type().is_symlink() {
            fs::read_link(path).expect("link").display().to_string()
        } else {
            String::new()
        };
        let times = (metadata.mtime(), metadata.mtime_nsec());
        lines.push(format!("{name} {:o} {times:?} {detail}", metadata.mode()));
        if metadata.is_dir() {
            for entry in fs::read_dir(path).expect("folder") {
                describe_into(root, &entry.expect("entry").path(), lines);
            }
        }
    }

    fn device_of(path: &Path) -> u64 {
        fs::symlink_metadata(path).expect("metadata").dev()
    }

    fn sample_tree(path: &Path) {
        fs::create_dir_all(path.join("src/nested")).expect("folders");
        fs::write(path.join("README.md"), "readme").expect("file");
        fs::write(path.join("src/main.rs"), "fn main() {}").expect("file");
        fs::write(path.join("src/nested/data.bin"), [0u8, 1, 2, 255]).expect("file");
        fs::set_permissions(path.join("src/main.rs"), fs::Permissions::from_mode(0o751))
            .expect("mode");
        symlink("../README.md", path.join("src/readme-link")).expect("link");
        nix::unistd::mkfifo(&path.join("pipe"), Mode::from_bits_truncate(0o640)).expect("fifo");
        let old = SystemTime::now() - Duration::from_secs(86_400);
        fs::File::options()
            .write(true)
            .open(path.join("README.md"))
            .and_then(|file| file.set_modified(old))
            .expect("mtime");
    }

    #[test]
    fn copies_keep_modes_times_links_and_fifos() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let source = directory.path().join("source");
        sample_tree(&source);
        copy_tree(&source, &directory.path().join("copy")).expect("copy");
        assert_eq!(describe(&directory.path().join("copy")), describe(&source));
    }

    #[test]
    fn restore_undoes_every_kind_of_change() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let layer = directory.path().join("layer");
        let target = directory.path().join("target");
        sample_tree(&layer);
        copy_tree(&layer, &target).expect("copy");
        fs::write(target.join("README.md"), "READme").expect("same size, new content and time");
        fs::remove_file(target.join("src/main.rs")).expect("delete");
        fs::remove_dir_all(target.join("src/nested")).expect("delete folder");
        fs::write(target.join("added.txt"), "added").expect("add");
        fs::create_dir_all(target.join("added/deep")).expect("add folder");
        fs::remove_file(target.join("src/readme-link")).expect("remove link");
        symlink("elsewhere", target.join("src/readme-link")).expect("retarget link");
        fs::remove_file(target.join("pipe")).expect("remove fifo");
        fs::create_dir(target.join("pipe")).expect("folder in place of fifo");
        fs::set_permissions(target.join("src"), fs::Permissions::from_mode(0o700)).expect("mode");
        restore_tree(&layer, &target, device_of(&target)).expect("restore");
        assert_eq!(describe(&target), describe(&layer));
    }

    #[test]
    fn restore_leaves_unchanged_files_alone() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let layer = directory.path().join("layer");
        let target = directory.path().join("target");
        sample_tree(&layer);
        copy_tree(&layer, &target).expect("copy");
        let inode = fs::metadata(target.join("src/main.rs"))
            .expect("file")
            .ino();
        restore_tree(&layer, &target, device_of(&target)).expect("restore");
        assert_eq!(
            fs::metadata(target.join("src/main.rs"))
                .expect("file")
                .ino(),
            inode
        );
    }

    #[test]
    fn restore_never_crosses_into_a_mount() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let layer = directory.path().join("layer");
        let target = directory.path().join("target");
        sample_tree(&layer);
        copy_tree(&layer, &target).expect("copy");
        let device = device_of(&target);
        for mounted in ["src/nested", "mnt"] {
            let point = target.join(mounted);
            fs::create_dir_all(&point).expect("mount point");
            nix::mount::mount(
                Some("tmpfs"),
                &point,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .expect("tmpfs mount (tests run as root)");
            fs::write(point.join("host.txt"), "host").expect("file in the mount");
            let error = restore_tree(&layer, &target, device).expect_err("a mount stops it");
            let content = fs::read_to_string(point.join("host.txt"));
            nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH).expect("unmount");
            assert!(error.to_string().contains("another file system"), "{error}");
            assert_eq!(content.expect("file in the mount"), "host", "{mounted}");
        }
        restore_tree(&layer, &target, device).expect("restore without mounts");
        assert_eq!(describe(&target), describe(&layer));
    }
}
