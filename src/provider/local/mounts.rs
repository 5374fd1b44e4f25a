//! Mounts that commands made inside a workspace, and their removal before the provider deletes
//! or restores files there.
//!
//! Commands run as the provider's user, which is root wherever overlays work, so a command can
//! `mount --bind /some/host/folder mnt` inside its workspace. A reset or destroy that walked into
//! such a mount would delete the host's files. So before either, every mount at or below the
//! workspace folder is detached, deepest first, and the tree walks in `layers` and `copy` refuse
//! to cross into another file system in case one is left.
//!
//! The mount table is this process's `/proc/self/mountinfo`; commands share the provider's mount
//! namespace. A mount made in a namespace of the command's own (`unshare -m`) is invisible here,
//! and equally invisible to the provider's deletions.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::MntFlags;

use crate::error::{Error, Result};

/// How many times the mount table is read and the mounts found are detached. One pass removes
/// every mount that existed; more passes catch mounts that propagation or a process that
/// survived added meanwhile. Eight passes is far more than either needs.
const UNMOUNT_PASSES: usize = 8;

/// Detaches every mount at or below `folder`, deepest first, and checks that none is left.
///
/// The last component of `folder` is not resolved, so a symbolic link put in place of the
/// workspace folder cannot point this function at another part of the host.
///
/// # Errors
/// `internal` when the mount table cannot be read, a mount cannot be detached, or mounts remain
/// after [`UNMOUNT_PASSES`] passes.
pub(super) fn unmount_below_blocking(folder: &Path) -> Result<()> {
    let Some(folder) = resolved_parent(folder)? else {
        return Ok(());
    };
    for _ in 0..UNMOUNT_PASSES {
        let mounts = mounts_below(&folder)?;
        if mounts.is_empty() {
            return Ok(());
        }
        for mount in mounts {
            match nix::mount::umount2(&mount, MntFlags::MNT_DETACH) {
                // EINVAL: no longer a mount point, because detaching a parent took it along.
                Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => {}
                Err(errno) => {
                    return Err(Error::internal(
                        format!("cannot detach the mount at {}", mount.display()),
                        errno,
                    ));
                }
            }
        }
    }
    Err(Error::internal(
        format!("cannot detach the mounts below {}", folder.display()),
        format!("mounts remain after {UNMOUNT_PASSES} passes"),
    ))
}

/// Returns `folder` with its parent canonicalized, because the mount table shows resolved paths.
/// Returns `None` when the parent does not exist, since nothing can be mounted below it then.
fn resolved_parent(folder: &Path) -> Result<Option<PathBuf>> {
    let (Some(parent), Some(name)) = (folder.parent(), folder.file_name()) else {
        return Err(Error::internal(
            format!("cannot look for mounts below {}", folder.display()),
            "it has no parent folder",
        ));
    };
    match parent.canonicalize() {
        Ok(parent) => Ok(Some(parent.join(name))),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(Error::internal(
            format!("cannot resolve {}", parent.display()),
            error,
        )),
    }
}

/// One line of `/proc/self/mountinfo`, the fields the provider reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Mount {
    /// The folder of the mounted file system that appears at `point` (field 4).
    pub(super) root: PathBuf,
    /// The mount point (field 5).
    pub(super) point: PathBuf,
    /// The file system type, the first field after the ` - ` separator.
    pub(super) file_system: String,
}

/// Reads this process's mount table, in the kernel's order (a mount after its parent, and
/// mounts stacked on one point in the order they were made).
///
/// # Errors
/// The read's error; a line that does not parse is skipped.
pub(super) fn mount_table_blocking() -> io::Result<Vec<Mount>> {
    let table = fs::read("/proc/self/mountinfo")?;
    Ok(table
        .split(|byte| *byte == b'\n')
        .filter_map(parse_line)
        .collect())
}

/// Lists the mount points at or below `folder`: deepest first, and among mounts stacked on one
/// point the most recent first.
fn mounts_below(folder: &Path) -> Result<Vec<PathBuf>> {
    let table = mount_table_blocking()
        .map_err(|error| Error::internal("cannot read /proc/self/mountinfo", error))?;
    let mut mounts: Vec<PathBuf> = table
        .into_iter()
        .map(|mount| mount.point)
        .filter(|point| point.starts_with(folder))
        .collect();
    mounts.reverse();
    // A stable sort keeps the reversed table order among mounts of equal depth.
    mounts.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    Ok(mounts)
}

/// Parses one line of `mountinfo`: `id parent major:minor root point options [tags] - type
/// source super-options`.
fn parse_line(line: &[u8]) -> Option<Mount> {
    let separator = line.windows(3).position(|window| window == b" - ")?;
    let (fields, tail) = (&line[..separator], &line[separator + 3..]);
    let mut fields = fields.split(|byte| *byte == b' ').skip(3);
    let (root, point) = (fields.next()?, fields.next()?);
    let file_system = tail.split(|byte| *byte == b' ').next()?;
    Some(Mount {
        root: unescaped_path(root),
        point: unescaped_path(point),
        file_system: String::from_utf8_lossy(&unescape(file_system)).into_owned(),
    })
}

fn unescaped_path(field: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(unescape(field)))
}

/// Undoes the kernel's octal escapes in `mountinfo` (`\040` for a space, `\011` for a tab,
/// `\012` for a newline, `\134` for a backslash). Anything else is kept as it is.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(field.len());
    let mut rest = field;
    while let Some((&byte, tail)) = rest.split_first() {
        let octal = tail
            .get(..3)
            .filter(|digits| {
                byte == b'\\' && digits.iter().all(|digit| (b'0'..=b'7').contains(digit))
            })
            .map(|digits| {
                digits
                    .iter()
                    .fold(0u32, |value, digit| value * 8 + u32::from(digit - b'0'))
            })
            .and_then(|value| u8::try_from(value).ok());
        match octal {
            Some(value) => {
                bytes.push(value);
                rest = &tail[3..];
            }
            None => {
                bytes.push(byte);
                rest = tail;
            }
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(line: &str, expected: Option<(&str, &str, &str)>) {
        let expected = expected.map(|(root, point, file_system)| Mount {
            root: PathBuf::from(root),
            point: PathBuf::from(point),
            file_system: file_system.to_owned(),
        });
        assert_eq!(parse_line(line.as_bytes()), expected, "{line}");
    }

    #[test]
    fn mount_lines_are_parsed_and_unescaped() {
        check(
            "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw",
            Some(("/mnt1", "/mnt/with space", "ext3")),
        );
        check(
            "41 31 0:38 / /a\\011tab\\012newline\\134backslash rw - cgroup2 cgroup2 rw",
            Some(("/", "/a\ttab\nnewline\\backslash", "cgroup2")),
        );
        check(
            "36 35 98:0 /x /odd\\9x\\04 rw - tmpfs tmpfs rw",
            Some(("/x", "/odd\\9x\\04", "tmpfs")),
        );
        check("36 35 98:0 / /no-separator rw tmpfs tmpfs rw", None);
        check("36 35 - tmpfs tmpfs rw", None);
        check("", None);
    }

    #[test]
    fn nested_and_stacked_mounts_are_detached_deepest_first() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let base = directory.path().canonicalize().expect("canonical folder");
        let (workspace, host) = (base.join("workspace"), base.join("host"));
        fs::create_dir_all(workspace.join("a b/deeper")).expect("folders");
        fs::create_dir_all(&host).expect("host folder");
        fs::write(host.join("keep.txt"), "host").expect("host file");
        let mount = |target: &Path| {
            nix::mount::mount(
                Some(host.as_path()),
                target,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .expect("bind mount (tests run as root)");
        };
        mount(&workspace.join("a b"));
        mount(&workspace.join("a b"));
        fs::create_dir_all(workspace.join("a b/nested")).expect("folder in the mount");
        mount(&workspace.join("a b/nested"));
        mount(&workspace);
        assert_eq!(mounts_below(&workspace).expect("table").len(), 4);

        unmount_below_blocking(&workspace).expect("detached");
        assert_eq!(
            mounts_below(&workspace).expect("table"),
            Vec::<PathBuf>::new()
        );
        fs::remove_dir(host.join("nested")).expect("the host folder is untouched");
        assert_eq!(
            fs::read_to_string(host.join("keep.txt")).expect("host file"),
            "host"
        );
        unmount_below_blocking(&base.join("missing/workspace")).expect("nothing");
    }
}
