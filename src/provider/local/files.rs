//! `read_file` and `write_file` inside a workspace root.
//!
//! Paths are resolved and opened through `paths`, so neither `..` nor a symbolic link, not even
//! one swapped in by a running command, reaches outside the root. A write goes to a temporary file
//! in the target's folder and is renamed over the target, so a reader never sees half a file.
//!
//! A mistake in a request is a client error (`invalid_request`, `file_not_found`,
//! `path_outside_workspace` or `payload_too_large`), never `internal`. The mistakes include a
//! missing or non-folder `working_dir`, a path that names a folder (ending in `/`, `/.` or `/..`),
//! names or paths over the file system's limits, and files that are not regular files.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::UnlinkatFlags;

use crate::engine::WorkspaceId;
use crate::error::{Error, Result};
use crate::paths::{WorkspacePath, abbreviated, is_name_too_long, is_swapped_link, name_too_long};

/// Mode of a new file before the umask, as a shell's `>` would create it.
const NEW_FILE_MODE: u32 = 0o666;

/// Reads the file `path` (relative paths start at `working_dir`), at most `max_bytes` of it.
pub(super) fn read_blocking(
    root: &Path,
    id: &WorkspaceId,
    path: &str,
    working_dir: Option<&str>,
    max_bytes: u64,
) -> Result<Vec<u8>> {
    let resolved = WorkspacePath::resolve(root, path, working_dir)?;
    if names_folder(path) {
        return Err(Error::invalid_request(format!(
            "`{}` names a directory (it is empty or ends in `/`, `.` or `..`); read_file reads \
             files",
            abbreviated(path)
        )));
    }
    let (file, size) = open_regular_file(&resolved, id, path)?;
    let too_large = |size| Error::PayloadTooLarge {
        what: format!("file `{path}`"),
        size,
        limit: max_bytes,
    };
    if size > max_bytes {
        return Err(too_large(size));
    }
    // The file may grow between the check and the read; reading one byte past the limit notices
    // that without an unbounded read.
    let mut content = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut content)
        .map_err(|error| Error::internal(format!("cannot read `{path}`"), error))?;
    let read = u64::try_from(content.len()).unwrap_or(u64::MAX);
    if read > max_bytes {
        return Err(too_large(read));
    }
    Ok(content)
}

/// Writes `content` to `path`, creating missing parent folders inside the root. An existing file
/// keeps its mode; a new one gets `0666` minus the umask.
pub(super) fn write_blocking(
    root: &Path,
    path: &str,
    working_dir: Option<&str>,
    content: &[u8],
) -> Result<()> {
    let resolved = WorkspacePath::resolve(root, path, working_dir)?;
    if names_folder(path) {
        return Err(Error::invalid_request(format!(
            "`{}` names a directory (it is empty or ends in `/`, `.` or `..`); write_file \
             writes files",
            abbreviated(path)
        )));
    }
    let (folder, name) = resolved
        .create_parent()
        .map_err(|error| write_error(error, path))?;
    let mode =
        match nix::sys::stat::fstatat(&folder, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat)
                if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR =>
            {
                return Err(Error::invalid_request(format!(
                    "`{path}` is a directory; write_file writes files"
                )));
            }
            Ok(stat)
                if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG =>
            {
                Some(Mode::from_bits_truncate(stat.st_mode))
            }
            Ok(_) | Err(Errno::ENOENT) => None,
            Err(errno) => return Err(write_error(errno.into(), path)),
        };
    let mut temporary = OsString::from(".derrick-write-");
    temporary.push(uuid::Uuid::new_v4().simple().to_string());
    let written = write_and_rename(&folder, &temporary, &name, content, mode);
    if written.is_err() {
        // Best effort: the write already failed, and a leftover temporary file is only clutter.
        let _ = nix::unistd::unlinkat(&folder, temporary.as_os_str(), UnlinkatFlags::NoRemoveDir);
    }
    written.map_err(|error| write_error(error, path))
}

/// Opens a regular file for reading; returns it with its size.
fn open_regular_file(
    resolved: &WorkspacePath,
    id: &WorkspaceId,
    path: &str,
) -> Result<(File, u64)> {
    // O_NONBLOCK keeps the open of a FIFO from waiting for a writer, and O_NOCTTY keeps a
    // terminal device from becoming the provider's terminal. The type check then rejects both.
    let file = resolved
        .open(OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY)
        .map_err(|error| read_error(error, id, path))?;
    let file = File::from(file);
    let metadata = file
        .metadata()
        .map_err(|error| Error::internal(format!("cannot inspect `{path}`"), error))?;
    if metadata.is_dir() {
        let message = format!("`{path}` is a directory; read_file reads files");
        return Err(Error::invalid_request(message));
    }
    if !metadata.is_file() {
        let message = format!("`{path}` is not a regular file; read_file reads files");
        return Err(Error::invalid_request(message));
    }
    Ok((file, metadata.len()))
}

fn write_and_rename(
    folder: &OwnedFd,
    temporary: &OsString,
    name: &OsString,
    content: &[u8],
    mode: Option<Mode>,
) -> io::Result<()> {
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    let file = nix::fcntl::openat(
        folder,
        temporary.as_os_str(),
        flags,
        Mode::from_bits_truncate(NEW_FILE_MODE),
    )?;
    if let Some(mode) = mode {
        nix::sys::stat::fchmod(&file, mode)?;
    }
    File::from(file).write_all(content)?;
    Ok(nix::fcntl::renameat(
        folder,
        temporary.as_os_str(),
        folder,
        name.as_os_str(),
    )?)
}

/// Tells whether the path text names a folder whatever exists there: it ends in `/`, `/.` or
/// `/..`, or is `.` or `..`. Resolution drops such endings, so they are checked on the text.
fn names_folder(path: &str) -> bool {
    let last = path.rsplit('/').next().unwrap_or_default();
    matches!(last, "" | "." | "..")
}

fn read_error(error: io::Error, id: &WorkspaceId, path: &str) -> Error {
    if is_swapped_link(&error) {
        return Error::PathOutsideWorkspace {
            path: path.to_owned(),
        };
    }
    if is_name_too_long(&error) {
        return name_too_long(path);
    }
    // A socket cannot be opened as a file.
    if error.raw_os_error() == Some(Errno::ENXIO as i32) {
        let message = format!("`{path}` is not a regular file; read_file reads files");
        return Error::invalid_request(message);
    }
    match error.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => Error::FileNotFound {
            id: id.to_string(),
            path: abbreviated(path),
        },
        _ => Error::internal(format!("cannot open `{}`", abbreviated(path)), error),
    }
}

fn write_error(error: io::Error, path: &str) -> Error {
    if is_swapped_link(&error) {
        return Error::PathOutsideWorkspace {
            path: path.to_owned(),
        };
    }
    if is_name_too_long(&error) {
        return name_too_long(path);
    }
    let shown = abbreviated(path);
    match error.raw_os_error().map(Errno::from_raw) {
        Some(Errno::ENOTDIR) => Error::invalid_request(format!(
            "a parent of `{shown}` is a file; write_file needs folders there"
        )),
        Some(Errno::EISDIR) => {
            Error::invalid_request(format!("`{shown}` is a directory; write_file writes files"))
        }
        // A command may have mounted something read-only, or something on the target, in the
        // workspace; the write cannot replace either.
        Some(Errno::EROFS) => Error::invalid_request(format!(
            "`{shown}` is on a read-only file system in the workspace"
        )),
        Some(Errno::EBUSY) => Error::invalid_request(format!(
            "`{shown}` is a mount point in the workspace; write_file cannot replace it"
        )),
        // A command removed or replaced a folder on the path while the write ran.
        Some(Errno::ENOENT) => Error::invalid_request(format!(
            "a folder on the path of `{shown}` was removed or replaced during the write; retry \
             when the workspace's commands leave it alone"
        )),
        _ => Error::internal(format!("cannot write `{shown}`"), error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_errors_of_the_workspace_are_client_errors() {
        for errno in [
            Errno::ENOTDIR,
            Errno::EISDIR,
            Errno::EROFS,
            Errno::EBUSY,
            Errno::ENOENT,
        ] {
            let error = write_error(io::Error::from_raw_os_error(errno as i32), "a/b.txt");
            assert_eq!(error.code(), "invalid_request", "{errno}: {error}");
        }
        let error = write_error(io::Error::from_raw_os_error(Errno::EIO as i32), "a/b.txt");
        assert_eq!(error.code(), "internal");
    }
}
