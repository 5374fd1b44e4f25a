//! Workspaces as overlay mounts: the layers' trees are the lower folders, `upper` is the scratch
//! layer.
//!
//! A reset unmounts, empties `upper` and `work`, and mounts again, so its cost follows the size
//! of the changes, not of the repositories. A snapshot turns `upper` into a layer by renaming it:
//! the whiteouts and opaque-folder marks that overlayfs keeps there work the same way when the
//! folder becomes a lower one.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use tracing::warn;

use super::cannot;
use super::layers::{Staging, remove_tree};
use super::layout::Layout;
use crate::engine::{LayerMeta, WorkspaceId};
use crate::error::{Error, Result};
use crate::keys::LayerKey;

/// How long a plain unmount is retried while it fails with `EBUSY`. Right after SIGKILL, the
/// killed processes may keep the mount busy for a few milliseconds while they exit. A second
/// covers that, and a lazy unmount handles what remains.
const UNMOUNT_PATIENCE: Duration = Duration::from_secs(1);

/// How often a busy unmount is retried.
const UNMOUNT_RETRY_INTERVAL: Duration = Duration::from_millis(10);

/// Mounts a tiny overlay under `tmp` and unmounts it, to learn whether overlays work here.
///
/// # Errors
/// The reason overlays cannot be used, for the log.
pub(super) fn probe_blocking(tmp: &Path) -> Result<(), String> {
    let folder = tmp.join(format!("probe-{}", uuid::Uuid::new_v4().simple()));
    let probed = try_probe(&folder);
    let removed = remove_tree(&folder)
        .map_err(|error| format!("cannot remove {}: {error}", folder.display()));
    probed.and(removed)
}

/// Creates `root`, `upper` and `work` and mounts the overlay of `layers` (bottom first).
pub(super) fn provision_blocking(
    layout: &Layout,
    id: &WorkspaceId,
    layers: &[LayerKey],
) -> Result<()> {
    for folder in [layout.root(id), layout.upper(id), layout.work(id)] {
        fs::create_dir_all(&folder).map_err(cannot(format!("create {}", folder.display())))?;
    }
    mount_blocking(layout, id, layers)
}

/// Mounts the workspace's overlay unless it is mounted already (after a provider restart, the
/// mount may have outlived the process or not).
pub(super) fn ensure_mounted_blocking(
    layout: &Layout,
    id: &WorkspaceId,
    layers: &[LayerKey],
) -> Result<()> {
    let root = layout.root(id);
    if is_mounted(&root).map_err(cannot(format!("inspect {}", root.display())))? {
        return Ok(());
    }
    mount_blocking(layout, id, layers)
}

/// Turns the scratch layer into layer `meta.key` and mounts the workspace again on top of it.
///
/// Returns the new layer stack. The caller has killed the workspace's processes.
pub(super) fn snapshot_blocking(
    layout: &Layout,
    id: &WorkspaceId,
    layers: &[LayerKey],
    meta: &LayerMeta,
) -> Result<Vec<LayerKey>> {
    let upper = layout.upper(id);
    unmount_blocking(&layout.root(id))?;
    let staging = Staging::create_blocking(layout)?;
    if let Err(error) = fs::rename(&upper, staging.tree()) {
        staging.discard_blocking()?;
        return Err(Error::internal(
            format!("cannot move {} into a layer", upper.display()),
            error,
        ));
    }
    staging.publish_blocking(layout, meta)?;
    let mut stack = layers.to_vec();
    stack.push(meta.key.clone());
    fs::create_dir(&upper).map_err(cannot(format!("create {}", upper.display())))?;
    empty_folder(&layout.work(id))?;
    mount_blocking(layout, id, &stack)?;
    Ok(stack)
}

/// Discards the scratch layer: unmount, empty `upper` and `work`, mount again.
pub(super) fn reset_blocking(layout: &Layout, id: &WorkspaceId, layers: &[LayerKey]) -> Result<()> {
    unmount_blocking(&layout.root(id))?;
    empty_folder(&layout.upper(id))?;
    empty_folder(&layout.work(id))?;
    mount_blocking(layout, id, layers)
}

/// Unmounts `target` if it is a mount point. A mount that stays busy past
/// [`UNMOUNT_PATIENCE`] is detached lazily, with a warning.
pub(super) fn unmount_blocking(target: &Path) -> Result<()> {
    if !is_mounted(target).map_err(cannot(format!("inspect {}", target.display())))? {
        return Ok(());
    }
    let deadline = Instant::now() + UNMOUNT_PATIENCE;
    loop {
        match nix::mount::umount2(target, MntFlags::empty()) {
            Ok(()) | Err(Errno::EINVAL) => return Ok(()),
            Err(Errno::EBUSY) if Instant::now() < deadline => thread::sleep(UNMOUNT_RETRY_INTERVAL),
            Err(Errno::EBUSY) => break,
            Err(errno) => {
                return Err(Error::internal(
                    format!("cannot unmount {}", target.display()),
                    errno,
                ));
            }
        }
    }
    warn!(
        provider = "local/overlay",
        "workspace mount {} stayed busy; detaching it lazily",
        target.display()
    );
    nix::mount::umount2(target, MntFlags::MNT_DETACH)
        .map_err(|errno| Error::internal(format!("cannot detach {}", target.display()), errno))
}

/// Tells whether `path` is a mount point: its device differs from its parent's.
pub(super) fn is_mounted(path: &Path) -> io::Result<bool> {
    let parent = path.parent().unwrap_or(path);
    let own = match fs::symlink_metadata(path) {
        Ok(metadata) => metadata.dev(),
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(error),
    };
    Ok(own != fs::symlink_metadata(parent)?.dev())
}

fn mount_blocking(layout: &Layout, id: &WorkspaceId, layers: &[LayerKey]) -> Result<()> {
    let lowers: Vec<PathBuf> = layers
        .iter()
        .rev()
        .map(|key| layout.layer_tree(key))
        .collect();
    mount(
        &lowers,
        &layout.upper(id),
        &layout.work(id),
        &layout.root(id),
    )
    .map_err(|reason| Error::internal(format!("cannot mount workspace {id}"), reason))
}

/// Mounts an overlay of `lowers` (top first) with `upper` and `work` at `target`.
fn mount(lowers: &[PathBuf], upper: &Path, work: &Path, target: &Path) -> Result<(), String> {
    let lowers: Vec<&str> = lowers
        .iter()
        .map(|lower| option_path(lower))
        .collect::<Result<_, _>>()?;
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowers.join(":"),
        option_path(upper)?,
        option_path(work)?
    );
    nix::mount::mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|errno| format!("mount -t overlay on {}: {errno}", target.display()))
}

/// Checks that a path can stand in the mount options, whose separators are `,` and `:`.
fn option_path(path: &Path) -> Result<&str, String> {
    match path.to_str() {
        Some(text) if !text.contains([',', ':', '\\']) => Ok(text),
        _ => Err(format!(
            "path {} holds a character that overlay mount options cannot carry",
            path.display()
        )),
    }
}

fn try_probe(folder: &Path) -> Result<(), String> {
    let [lower, upper, work, merged] =
        ["lower", "upper", "work", "merged"].map(|name| folder.join(name));
    for path in [&lower, &upper, &work, &merged] {
        fs::create_dir_all(path)
            .map_err(|error| format!("cannot create {}: {error}", path.display()))?;
    }
    fs::write(lower.join("probe"), "probe")
        .map_err(|error| format!("cannot write in {}: {error}", lower.display()))?;
    mount(&[lower], &upper, &work, &merged)?;
    let visible = merged.join("probe").exists();
    nix::mount::umount2(&merged, MntFlags::empty())
        .map_err(|errno| format!("cannot unmount the probe: {errno}"))?;
    visible
        .then_some(())
        .ok_or_else(|| "the probe overlay does not show its lower folder".to_owned())
}

fn empty_folder(path: &Path) -> Result<()> {
    remove_tree(path).map_err(cannot(format!("empty {}", path.display())))?;
    fs::create_dir(path).map_err(cannot(format!("create {}", path.display())))
}
