//! `read_file` and `write_file` in a workspace container, through the engine's archive API.
//!
//! A request path is resolved one component at a time with the engine's path stat (`HEAD
//! /containers/{id}/archive`), which reports a symbolic link with its target fully resolved
//! inside the container. A target outside the workspace root is `path_outside_workspace`, as is
//! a `..` that climbs above the root. The resolved path contains no link, and only then is the
//! file downloaded or uploaded as a tar archive, so content is bytes and never passes a shell.
//!
//! NOTE: a command running at the same time could swap a link in between the check and the
//! transfer. The engine resolves links inside the container's root file system, so such a race
//! reaches other files of the same container, never the host.

use std::collections::VecDeque;

use bollard::Docker;
use bollard::body_full;
use bollard::query_parameters::{
    ContainerArchiveInfoOptions, DownloadFromContainerOptions, UploadToContainerOptions,
};
use bytes::Bytes;
use futures_util::StreamExt;

use super::WORKSPACE_ROOT;
use super::archive;
use super::client::{API_TIMEOUT, TRANSFER_TIMEOUT, bounded, bounded_optional, failed};
use crate::engine::WorkspaceId;
use crate::error::{Error, Result};
use crate::paths::{
    MAX_NAME_BYTES, MAX_PATH_BYTES, MAX_SYMBOLIC_LINKS, abbreviated, name_too_long,
};

/// Go's `os.FileMode` bits in the engine's path stat.
const MODE_DIRECTORY: u32 = 1 << 31;
const MODE_SYMLINK: u32 = 1 << 27;
/// The bits of `os.FileMode` that mark anything but a regular file: directory, symbolic link,
/// device, named pipe, socket, character device and irregular.
const MODE_TYPE: u32 =
    MODE_DIRECTORY | MODE_SYMLINK | (1 << 26) | (1 << 25) | (1 << 24) | (1 << 21) | (1 << 19);

/// Mode of a new file: what a shell's `>` creates under the usual umask 022.
const NEW_FILE_MODE: u32 = 0o644;

/// Mode of a folder that `write_file` creates, as `mkdir -p` does under umask 022.
const NEW_FOLDER_MODE: u32 = 0o755;

/// A request path resolved inside the workspace root: link-free components and how many of
/// them exist, with the stat of the last one when it exists.
#[derive(Debug)]
pub(super) struct Resolved {
    components: Vec<String>,
    existing: usize,
    last: Option<Stat>,
    /// Whether a component before the last is a file, so the path cannot exist.
    under_file: bool,
}

/// The parts of the engine's path stat that derrick uses.
#[derive(Debug, Clone, Copy)]
struct Stat {
    mode: u32,
    size: u64,
}

enum Step {
    Parent,
    Name(String),
}

impl Stat {
    fn is_directory(self) -> bool {
        self.mode & MODE_DIRECTORY != 0
    }

    fn is_regular(self) -> bool {
        self.mode & MODE_TYPE == 0
    }

    /// Returns the Unix permission bits. `os.FileMode` keeps the low nine where Unix does but
    /// moves setuid, setgid and sticky to bits 23, 22 and 20.
    fn permissions(self) -> u32 {
        let special = [(1 << 23, 0o4000), (1 << 22, 0o2000), (1 << 20, 0o1000)];
        special
            .iter()
            .filter(|(go_bit, _)| self.mode & go_bit != 0)
            .fold(self.mode & 0o777, |mode, (_, unix_bit)| mode | unix_bit)
    }
}

impl Resolved {
    /// Returns the path inside the container.
    pub(super) fn container_path(&self) -> String {
        container_path(&self.components)
    }
}

/// Resolves a `working_dir` and checks that it is an existing folder.
///
/// # Errors
/// Those of [`resolve`], and `invalid_request` naming the folder when it is missing or a file.
pub(super) async fn resolve_directory(
    docker: &Docker,
    container: &str,
    directory: &str,
) -> Result<Resolved> {
    let resolved = walk(docker, container, &[], directory).await?;
    let shown = abbreviated(directory);
    match resolved.last {
        Some(stat) if stat.is_directory() => Ok(resolved),
        Some(_) => Err(Error::invalid_request(format!(
            "working_dir `{shown}` is not a directory in the workspace; name a folder or omit \
             working_dir"
        ))),
        None => Err(Error::invalid_request(format!(
            "working_dir `{shown}` does not exist in the workspace; create it first or omit \
             working_dir"
        ))),
    }
}

/// Reads the file `path`, at most `max_bytes` of it.
pub(super) async fn read(
    docker: &Docker,
    container: &str,
    id: &WorkspaceId,
    path: &str,
    working_dir: Option<&str>,
    max_bytes: u64,
) -> Result<Vec<u8>> {
    let resolved = resolve(docker, container, path, working_dir).await?;
    check_names_file(path, "read_file reads files")?;
    let Some(stat) = resolved.last.filter(|_| !resolved.under_file) else {
        return Err(Error::FileNotFound {
            id: id.to_string(),
            path: abbreviated(path),
        });
    };
    if stat.is_directory() {
        let message = format!("`{path}` is a directory; read_file reads files");
        return Err(Error::invalid_request(message));
    }
    if !stat.is_regular() {
        let message = format!("`{path}` is not a regular file; read_file reads files");
        return Err(Error::invalid_request(message));
    }
    let too_large = |size| Error::PayloadTooLarge {
        what: format!("file `{path}`"),
        size,
        limit: max_bytes,
    };
    if stat.size > max_bytes {
        return Err(too_large(stat.size));
    }

    let target = resolved.container_path();
    let options = DownloadFromContainerOptions {
        path: target.clone(),
    };
    // A tar archive of one file is the file plus headers and padding of a few KiB; the bound
    // stops a file that grew after the stat from being read without a limit.
    let limit = max_bytes.saturating_add(archive::OVERHEAD_BYTES);
    let stream = docker.download_from_container(container, Some(options));
    let archived = collect(stream, limit, &target).await?;
    let content =
        tokio::task::spawn_blocking(move || archive::single_file_blocking(&archived, max_bytes))
            .await??;
    match content {
        archive::SingleFile::Content(content) => Ok(content),
        archive::SingleFile::TooLarge(size) => Err(too_large(size)),
        archive::SingleFile::NotRegular => Err(Error::invalid_request(format!(
            "`{path}` is not a regular file; read_file reads files"
        ))),
    }
}

/// Writes `content` to `path`, creating missing parent folders. An existing file keeps its
/// permission bits; a new one gets `0644`.
pub(super) async fn write(
    docker: &Docker,
    container: &str,
    path: &str,
    working_dir: Option<&str>,
    content: Vec<u8>,
) -> Result<()> {
    let resolved = resolve(docker, container, path, working_dir).await?;
    check_names_file(path, "write_file writes files")?;
    if resolved.under_file {
        return Err(Error::invalid_request(format!(
            "a parent of `{}` is a file; write_file needs folders there",
            abbreviated(path)
        )));
    }
    let mode = match resolved.last {
        Some(stat) if stat.is_directory() => {
            return Err(Error::invalid_request(format!(
                "`{path}` is a directory; write_file writes files"
            )));
        }
        Some(stat) if stat.is_regular() => stat.permissions(),
        Some(_) => {
            return Err(Error::invalid_request(format!(
                "`{path}` is not a regular file; write_file replaces only regular files"
            )));
        }
        None => NEW_FILE_MODE,
    };

    // The archive is unpacked in the deepest folder that exists and creates the rest.
    let parents = resolved.components.len() - 1;
    let existing = resolved.existing.min(parents);
    let destination = container_path(&resolved.components[..existing]);
    let relative = resolved.components[existing..].to_vec();
    let archived = tokio::task::spawn_blocking(move || {
        archive::file_blocking(&relative, &content, mode, NEW_FOLDER_MODE)
    })
    .await??;
    upload(docker, container, &destination, archived).await
}

/// Uploads a tar archive and unpacks it in the folder `destination` of the container.
pub(super) async fn upload(
    docker: &Docker,
    container: &str,
    destination: &str,
    archived: Vec<u8>,
) -> Result<()> {
    let options = UploadToContainerOptions {
        path: destination.to_owned(),
        no_overwrite_dir_non_dir: Some("true".to_owned()),
        ..Default::default()
    };
    bounded(
        "upload archive",
        &format!("{container}:{destination}"),
        TRANSFER_TIMEOUT,
        docker.upload_to_container(container, Some(options), body_full(Bytes::from(archived))),
    )
    .await
}

/// Downloads the tar archive of `source` in the container; `None` when it does not exist.
pub(super) async fn download(
    docker: &Docker,
    container: &str,
    source: &str,
) -> Result<Option<Vec<u8>>> {
    let options = DownloadFromContainerOptions {
        path: source.to_owned(),
    };
    let stream = docker.download_from_container(container, Some(options));
    match collect(stream, u64::MAX, source).await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(Error::FileNotFound { .. }) => Ok(None),
        Err(error) => Err(error),
    }
}

/// Resolves `path` (absolute from the workspace root, or relative to `working_dir`).
///
/// # Errors
/// `path_outside_workspace` when `..` or a symbolic link leaves the root. `invalid_request` for
/// a NUL byte, too many links, names or paths over Linux's limits, or a `working_dir` that is
/// missing or not a folder. A path below a file resolves, marked as under a file.
pub(super) async fn resolve(
    docker: &Docker,
    container: &str,
    path: &str,
    working_dir: Option<&str>,
) -> Result<Resolved> {
    let start = match working_dir {
        Some(directory) => {
            resolve_directory(docker, container, directory)
                .await?
                .components
        }
        None => Vec::new(),
    };
    walk(docker, container, &start, path).await
}

async fn walk(docker: &Docker, container: &str, start: &[String], path: &str) -> Result<Resolved> {
    check_text(path)?;
    let mut components: Vec<String> = if path.starts_with('/') {
        Vec::new()
    } else {
        start.to_vec()
    };
    let mut steps: VecDeque<Step> = path
        .split('/')
        .filter(|part| !part.is_empty() && *part != ".")
        .map(|part| match part {
            ".." => Step::Parent,
            name => Step::Name(name.to_owned()),
        })
        .collect();
    let outside = || Error::PathOutsideWorkspace {
        path: abbreviated(path),
    };
    let mut links = 0;
    // Once a component is missing, the rest is resolved by text: nothing below it exists.
    let mut missing = false;
    let mut existing = components.len();
    let mut last = Some(Stat {
        mode: MODE_DIRECTORY,
        size: 0,
    });
    let mut under_file = false;
    while let Some(step) = steps.pop_front() {
        let name = match step {
            Step::Parent => {
                components.pop().ok_or_else(outside)?;
                existing = existing.min(components.len());
                continue;
            }
            Step::Name(name) => name,
        };
        if last.is_some_and(|stat| !stat.is_directory()) && !missing {
            under_file = true;
            missing = true;
        }
        components.push(name);
        if missing {
            last = None;
            continue;
        }
        let Some(stat) = stat(docker, container, &container_path(&components)).await? else {
            missing = true;
            last = None;
            continue;
        };
        if stat.0.mode & MODE_SYMLINK == 0 {
            existing = components.len();
            last = Some(stat.0);
            continue;
        }
        links += 1;
        if links > MAX_SYMBOLIC_LINKS {
            return Err(Error::invalid_request(format!(
                "`{}` passes more than {MAX_SYMBOLIC_LINKS} symbolic links",
                abbreviated(path)
            )));
        }
        // The engine reports the target with every link on its way resolved.
        components = inside_root(&stat.1).ok_or_else(outside)?;
        match self::stat(docker, container, &container_path(&components)).await? {
            Some((target, _)) => {
                existing = components.len();
                last = Some(target);
            }
            None => {
                existing = existing.min(components.len().saturating_sub(1));
                missing = true;
                last = None;
            }
        }
    }
    Ok(Resolved {
        existing: existing.min(components.len()),
        components,
        last,
        under_file,
    })
}

/// Stats a path of the container; `None` when it does not exist. A symbolic link comes with its
/// fully resolved target.
async fn stat(docker: &Docker, container: &str, path: &str) -> Result<Option<(Stat, String)>> {
    let options = ContainerArchiveInfoOptions {
        path: path.to_owned(),
    };
    let info = bounded_optional(
        "stat path",
        &format!("{container}:{path}"),
        API_TIMEOUT,
        docker.get_container_archive_info(container, Some(options)),
    )
    .await?;
    Ok(info.map(|info| {
        let stat = Stat {
            mode: info.file_mode,
            size: u64::try_from(info.size).unwrap_or(0),
        };
        (stat, info.link_target)
    }))
}

/// Returns the components of a container path below the workspace root, `None` outside it.
fn inside_root(target: &str) -> Option<Vec<String>> {
    let rest = target.strip_prefix(WORKSPACE_ROOT)?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    Some(
        rest.split('/')
            .filter(|part| !part.is_empty())
            .map(str::to_owned)
            .collect(),
    )
}

fn container_path(components: &[String]) -> String {
    let mut path = WORKSPACE_ROOT.to_owned();
    for component in components {
        path.push('/');
        path.push_str(component);
    }
    path
}

/// Rejects what Linux would reject: NUL bytes, names over `NAME_MAX` and paths over `PATH_MAX`
/// once the workspace root is in front.
fn check_text(path: &str) -> Result<()> {
    if path.contains('\0') {
        return Err(Error::invalid_request(format!(
            "path `{}` contains a NUL byte",
            abbreviated(&path.replace('\0', "\\0"))
        )));
    }
    let too_long = path.len() + WORKSPACE_ROOT.len() + 1 > MAX_PATH_BYTES
        || path.split('/').any(|name| name.len() > MAX_NAME_BYTES);
    if too_long {
        return Err(name_too_long(path));
    }
    Ok(())
}

/// Rejects a path whose text names a folder: empty, or ending in `/`, `.` or `..`.
fn check_names_file(path: &str, purpose: &str) -> Result<()> {
    let last = path.rsplit('/').next().unwrap_or_default();
    if matches!(last, "" | "." | "..") {
        return Err(Error::invalid_request(format!(
            "`{}` names a directory (it is empty or ends in `/`, `.` or `..`); {purpose}",
            abbreviated(path)
        )));
    }
    Ok(())
}

/// Collects a download into memory, failing above `limit` bytes; a missing source is
/// `file_not_found`.
async fn collect(
    mut stream: impl futures_util::Stream<Item = Result<Bytes, bollard::errors::Error>> + Unpin,
    limit: u64,
    source: &str,
) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let read = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|error| {
                if super::client::is_not_found(&error) {
                    Error::FileNotFound {
                        id: String::new(),
                        path: source.to_owned(),
                    }
                } else {
                    failed("download archive", source, error)
                }
            })?;
            bytes.extend_from_slice(&chunk);
            if bytes.len() as u64 > limit {
                return Err(Error::PayloadTooLarge {
                    what: format!("archive of `{source}`"),
                    size: bytes.len() as u64,
                    limit,
                });
            }
        }
        Ok(())
    };
    tokio::time::timeout(TRANSFER_TIMEOUT, read)
        .await
        .map_err(|_| {
            Error::ProviderUnavailable(format!(
                "the docker engine did not send `{source}` within {} s",
                TRANSFER_TIMEOUT.as_secs()
            ))
        })??;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_targets_inside_the_root_only() {
        assert_eq!(inside_root("/workspace"), Some(vec![]));
        assert_eq!(
            inside_root("/workspace/a/b"),
            Some(vec!["a".to_owned(), "b".to_owned()])
        );
        assert_eq!(inside_root("/workspace2/a"), None);
        assert_eq!(inside_root("/etc/passwd"), None);
    }

    #[test]
    fn file_modes_are_classified() {
        let regular = Stat {
            mode: 0o644,
            size: 1,
        };
        let directory = Stat {
            mode: MODE_DIRECTORY | 0o755,
            size: 0,
        };
        let fifo = Stat {
            mode: (1 << 25) | 0o644,
            size: 0,
        };
        assert!(regular.is_regular());
        assert!(!regular.is_directory());
        assert!(directory.is_directory());
        assert!(!directory.is_regular());
        assert!(!fifo.is_regular());
        assert!(!fifo.is_directory());

        let setuid = Stat {
            mode: (1 << 23) | 0o755,
            size: 1,
        };
        assert!(setuid.is_regular());
        assert_eq!(setuid.permissions(), 0o4755);
        assert_eq!(regular.permissions(), 0o644);
    }
}
