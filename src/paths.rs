//! Resolution of request paths inside a workspace root on the host.
//!
//! A request names a path as the workspace sees it: an absolute path starts at the workspace root,
//! a relative one at a working directory, which is itself absolute or relative to the root and
//! defaults to it. `WorkspacePath::resolve` turns such a path into one that stays inside the root:
//! it follows symbolic links one component at a time, as the kernel would, and refuses `..` or a
//! link that leaves the root. Missing trailing components are allowed, so a file can be created.
//!
//! Checking a path and then opening it by name would race with a command that swaps a symbolic
//! link in between. So the opening functions here open relative to the root's directory with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: the resolved path holds no links, and a link
//! that appears later makes the open fail instead of being followed.
//!
//! This module takes a host directory and knows nothing of providers or workspace states. Its
//! functions do blocking file system calls; async callers run them in `spawn_blocking`.
//!
//! Invariant: every host path built from a request path goes through `WorkspacePath::resolve`.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

use crate::error::{Error, Result};

/// Maximum number of symbolic links one resolution follows: the kernel's own limit
/// (`MAXSYMLINKS` in `include/linux/namei.h`).
pub const MAX_SYMBOLIC_LINKS: usize = 40;

/// The maximum length of a file name on Linux file systems (`NAME_MAX`), quoted in error
/// messages.
pub const MAX_NAME_BYTES: usize = 255;

/// The maximum length of a path that a Linux system call accepts (`PATH_MAX`), quoted in error
/// messages.
pub const MAX_PATH_BYTES: usize = 4096;

/// A path inside a workspace root, checked to stay inside it when it was resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspacePath {
    /// The canonical host path of the workspace root.
    root: PathBuf,
    /// Normal components only: no `.`, `..` or symbolic link at resolution time.
    components: Vec<OsString>,
}

/// Reason a resolution stopped, before the request's path text is attached.
enum Refusal {
    Outside,
    TooManyLinks,
    NulByte,
    TooLong,
    Io(io::Error),
}

/// One step of a path: `..` or a name. `.` and repeated slashes never become a step.
enum Step {
    Parent,
    Name(OsString),
}

impl WorkspacePath {
    /// Resolves `path` inside the host directory `root`.
    ///
    /// An absolute `path` starts at the root; a relative one starts at `working_dir`, which is
    /// resolved first with [`Self::resolve_directory`] and defaults to the root. A given
    /// `working_dir` must exist, even for an absolute `path`, so that a mistake in it is never
    /// silently ignored.
    ///
    /// # Errors
    /// `path_outside_workspace` when `..` or a symbolic link leaves the root (an absolute link is
    /// followed only when its target lies inside the root's host path). `invalid_request` for a
    /// NUL byte, more than [`MAX_SYMBOLIC_LINKS`] links, a name or path over the file system's
    /// limits, a `working_dir` that is missing or not a folder, or a root that a command
    /// removed. `internal` when the root or a folder on the way cannot be read.
    pub fn resolve(root: &Path, path: &str, working_dir: Option<&str>) -> Result<WorkspacePath> {
        let start = match working_dir {
            Some(working_dir) => Self::resolve_directory(root, working_dir)?,
            None => WorkspacePath {
                root: canonical_root(root)?,
                components: Vec::new(),
            },
        };
        let components = walk(&start.root, &start.components, path)
            .map_err(|refusal| refusal.into_error(path))?;
        Ok(WorkspacePath {
            root: start.root,
            components,
        })
    }

    /// Resolves `directory` (absolute, or relative to the root) and checks that it is an
    /// existing folder, as a `working_dir` must be.
    ///
    /// # Errors
    /// Those of [`Self::resolve`], and `invalid_request` naming the `working_dir` when it is
    /// missing or not a folder.
    pub fn resolve_directory(root: &Path, directory: &str) -> Result<WorkspacePath> {
        let root = canonical_root(root)?;
        let components =
            walk(&root, &[], directory).map_err(|refusal| refusal.into_error(directory))?;
        let resolved = WorkspacePath { root, components };
        let shown = abbreviated(directory);
        match std::fs::symlink_metadata(resolved.host_path()) {
            Ok(metadata) if metadata.is_dir() => Ok(resolved),
            Ok(_) => Err(Error::invalid_request(format!(
                "working_dir `{shown}` is not a directory in the workspace; name a folder or \
                 omit working_dir"
            ))),
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                Err(Error::invalid_request(format!(
                    "working_dir `{shown}` does not exist in the workspace; create it first or \
                     omit working_dir"
                )))
            }
            Err(error) => Err(Refusal::from_io(error).into_error(directory)),
        }
    }

    /// Returns the canonical host path of the workspace root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Returns the host path. Use it for commands and messages; open files with [`Self::open`].
    pub fn host_path(&self) -> PathBuf {
        self.root.join(self.relative())
    }

    /// Returns the path relative to the root; empty for the root itself.
    pub fn relative(&self) -> PathBuf {
        self.components.iter().collect()
    }

    /// Returns the path as the workspace sees it, such as `/code/app/README.md`.
    pub fn to_workspace_string(&self) -> String {
        let names: Vec<_> = self
            .components
            .iter()
            .map(|name| name.to_string_lossy())
            .collect();
        format!("/{}", names.join("/"))
    }

    /// Returns the last component, `None` for the root.
    pub fn file_name(&self) -> Option<&OsStr> {
        self.components.last().map(OsString::as_os_str)
    }

    /// Opens the path with `flags` (plus `O_CLOEXEC`) beneath the root, following no link.
    ///
    /// # Errors
    /// The open's `io::Error`; [`is_swapped_link`] tells a link that appeared since resolution.
    pub fn open(&self, flags: OFlag) -> io::Result<OwnedFd> {
        let root = open_directory(&self.root)?;
        let relative = self.relative();
        open_beneath(&root, relative_or_dot(&relative), flags)
    }

    /// Opens the parent directory, creating the missing ones beneath the root (mode 0755 before
    /// the umask); returns it with the file name to use in it.
    ///
    /// # Errors
    /// `EISDIR` for the root itself, `ENOTDIR` when a parent is a file, and the errors of
    /// [`Self::open`].
    pub fn create_parent(&self) -> io::Result<(OwnedFd, OsString)> {
        let Some((name, parents)) = self.components.split_last() else {
            return Err(io::Error::from(Errno::EISDIR));
        };
        let mut directory = open_directory(&self.root)?;
        for parent in parents {
            directory = open_or_create_directory(&directory, parent)?;
        }
        Ok((directory, name.clone()))
    }
}

/// Tells whether an error means that a name or a path is over the file system's limits
/// (`ENAMETOOLONG`): a client's mistake, not the provider's.
pub fn is_name_too_long(error: &io::Error) -> bool {
    error.raw_os_error() == Some(Errno::ENAMETOOLONG as i32)
}

/// Returns the `invalid_request` error for a path over the file system's limits.
pub fn name_too_long(path: &str) -> Error {
    Error::invalid_request(format!(
        "path `{}` is too long: the workspace's file system allows names of up to {MAX_NAME_BYTES} \
         bytes and paths of up to {MAX_PATH_BYTES} bytes (the workspace root's own path included)",
        abbreviated(path)
    ))
}

/// Shortens a path for an error message: a client that sent a 6,000-byte path needs its start
/// and its size, not all of it again.
pub fn abbreviated(path: &str) -> String {
    const SHOWN_CHARS: usize = 80;
    if path.chars().count() <= SHOWN_CHARS {
        return path.to_owned();
    }
    let start: String = path.chars().take(SHOWN_CHARS).collect();
    format!("{start}… ({} bytes)", path.len())
}

/// Tells whether an error of [`WorkspacePath::open`] or [`WorkspacePath::create_parent`] means
/// that a symbolic link or a mount leaving the root appeared after resolution.
pub fn is_swapped_link(error: &io::Error) -> bool {
    let code = error.raw_os_error();
    code == Some(Errno::ELOOP as i32) || code == Some(Errno::EXDEV as i32)
}

impl Refusal {
    fn from_io(error: io::Error) -> Refusal {
        if is_name_too_long(&error) {
            Refusal::TooLong
        } else {
            Refusal::Io(error)
        }
    }

    fn into_error(self, path: &str) -> Error {
        match self {
            Refusal::Outside => Error::PathOutsideWorkspace {
                path: path.to_owned(),
            },
            Refusal::TooManyLinks => Error::invalid_request(format!(
                "path `{path}` passes more than {MAX_SYMBOLIC_LINKS} symbolic links; \
                 remove the link loop or name the target directly"
            )),
            Refusal::NulByte => Error::invalid_request(format!(
                "invalid path `{}`: it contains a NUL byte",
                abbreviated(path).escape_debug()
            )),
            Refusal::TooLong => name_too_long(path),
            Refusal::Io(error) => Error::internal(
                format!("cannot resolve path `{}`", abbreviated(path)),
                error,
            ),
        }
    }
}

/// Resolves `text` from `start` (ignored for an absolute `text`) into normal components.
fn walk(root: &Path, start: &[OsString], text: &str) -> Result<Vec<OsString>, Refusal> {
    if text.contains('\0') {
        return Err(Refusal::NulByte);
    }
    let mut resolved = if text.starts_with('/') {
        Vec::new()
    } else {
        start.to_vec()
    };
    let mut pending = steps(Path::new(text));
    let mut links = 0;
    while let Some(step) = pending.pop_front() {
        let name = match step {
            Step::Parent => {
                resolved.pop().ok_or(Refusal::Outside)?;
                continue;
            }
            Step::Name(name) => name,
        };
        resolved.push(name);
        let Some(target) = link_target(root, &resolved).map_err(Refusal::from_io)? else {
            continue;
        };
        links += 1;
        if links > MAX_SYMBOLIC_LINKS {
            return Err(Refusal::TooManyLinks);
        }
        resolved.pop();
        let target = if target.is_absolute() {
            resolved.clear();
            target
                .strip_prefix(root)
                .map_err(|_| Refusal::Outside)?
                .to_path_buf()
        } else {
            target
        };
        for step in steps(&target).into_iter().rev() {
            pending.push_front(step);
        }
    }
    Ok(resolved)
}

/// Canonicalizes the workspace root. A missing root is the client's doing: a command can
/// remove the folder it runs in (`rm -rf ~` where the root is a plain folder).
fn canonical_root(root: &Path) -> Result<PathBuf> {
    root.canonicalize().map_err(|error| {
        if error.kind() == io::ErrorKind::NotFound {
            return Error::invalid_request(
                "the workspace root no longer exists (a command removed it); reset the \
                 workspace to restore it",
            );
        }
        Error::internal(
            format!("cannot open workspace root {}", root.display()),
            error,
        )
    })
}

fn steps(path: &Path) -> VecDeque<Step> {
    path.components()
        .filter_map(|component| match component {
            Component::ParentDir => Some(Step::Parent),
            Component::Normal(name) => Some(Step::Name(name.to_owned())),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// Returns the target when `root/components` is a symbolic link; a missing entry is no link.
fn link_target(root: &Path, components: &[OsString]) -> io::Result<Option<PathBuf>> {
    let path: PathBuf = root.join(components.iter().collect::<PathBuf>());
    match std::fs::symlink_metadata(&path) {
        Ok(metadata) if metadata.file_type().is_symlink() => std::fs::read_link(&path).map(Some),
        Ok(_) => Ok(None),
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

fn relative_or_dot(relative: &Path) -> &Path {
    if relative.as_os_str().is_empty() {
        Path::new(".")
    } else {
        relative
    }
}

fn open_directory(path: &Path) -> io::Result<OwnedFd> {
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    Ok(nix::fcntl::open(path, flags, Mode::empty())?)
}

/// Opens `relative` below `directory`. `RESOLVE_NO_SYMLINKS` makes any link, the last component
/// included, fail with `ELOOP`; adding `O_NOFOLLOW` would instead open a final link itself when
/// combined with `O_PATH`.
fn open_beneath(directory: &OwnedFd, relative: &Path, flags: OFlag) -> io::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    Ok(nix::fcntl::openat2(directory, relative, how)?)
}

fn open_or_create_directory(parent: &OwnedFd, name: &OsStr) -> io::Result<OwnedFd> {
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY;
    match open_beneath(parent, Path::new(name), flags) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        other => return other,
    }
    match nix::sys::stat::mkdirat(parent, name, Mode::from_bits_truncate(0o755)) {
        Ok(()) | Err(Errno::EEXIST) => open_beneath(parent, Path::new(name), flags),
        Err(errno) => Err(errno.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::Read;
    use std::os::unix::fs::symlink;

    use super::*;

    /// A workspace root inside a temporary directory that also holds an `outside` folder.
    struct Sandbox {
        _directory: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
    }

    fn sandbox() -> Sandbox {
        let directory = tempfile::tempdir().expect("temporary directory");
        let base = directory
            .path()
            .canonicalize()
            .expect("canonical temporary directory");
        let root = base.join("a").join("b").join("root");
        let outside = base.join("outside");
        fs::create_dir_all(root.join("sub/deeper")).expect("workspace folders");
        fs::create_dir_all(&outside).expect("outside folder");
        fs::write(root.join("sub/file.txt"), "inside").expect("inside file");
        fs::write(outside.join("secret.txt"), "outside").expect("outside file");
        Sandbox {
            _directory: directory,
            root,
            outside,
        }
    }

    /// Resolves and returns the path relative to the root, or the error code.
    fn check(
        sandbox: &Sandbox,
        path: &str,
        working_dir: Option<&str>,
        expected: Result<&str, &str>,
    ) {
        let actual = WorkspacePath::resolve(&sandbox.root, path, working_dir);
        let actual = actual
            .as_ref()
            .map(WorkspacePath::to_workspace_string)
            .map_err(Error::code);
        assert_eq!(
            actual.as_deref().map_err(|code| *code),
            expected,
            "path {path:?} in {working_dir:?}"
        );
    }

    #[test]
    fn resolve_starts_at_root_or_working_dir() {
        let sandbox = sandbox();
        check(&sandbox, "/sub/file.txt", None, Ok("/sub/file.txt"));
        check(&sandbox, "sub/file.txt", None, Ok("/sub/file.txt"));
        check(&sandbox, "file.txt", Some("sub"), Ok("/sub/file.txt"));
        check(
            &sandbox,
            "file.txt",
            Some("/sub/deeper/.."),
            Ok("/sub/file.txt"),
        );
        check(&sandbox, "/file.txt", Some("/sub"), Ok("/file.txt"));
        check(&sandbox, "./x//y/./z", Some("sub"), Ok("/sub/x/y/z"));
        check(&sandbox, "", None, Ok("/"));
        check(&sandbox, "/", Some("sub"), Ok("/"));
        check(&sandbox, "missing/new/../file", None, Ok("/missing/file"));
    }

    #[test]
    fn parent_steps_that_leave_the_root_are_refused() {
        let sandbox = sandbox();
        check(&sandbox, "..", None, Err("path_outside_workspace"));
        check(
            &sandbox,
            "../../etc/passwd",
            None,
            Err("path_outside_workspace"),
        );
        check(
            &sandbox,
            "/../../etc/passwd",
            None,
            Err("path_outside_workspace"),
        );
        check(
            &sandbox,
            "sub/../../root/sub/file.txt",
            None,
            Err("path_outside_workspace"),
        );
        check(
            &sandbox,
            "file.txt",
            Some("../.."),
            Err("path_outside_workspace"),
        );
        check(
            &sandbox,
            "../../../file.txt",
            Some("sub/deeper"),
            Err("path_outside_workspace"),
        );
        check(
            &sandbox,
            "../file.txt",
            Some("sub/deeper"),
            Ok("/sub/file.txt"),
        );
    }

    #[test]
    fn links_inside_the_root_are_followed() {
        let sandbox = sandbox();
        symlink("sub/deeper", sandbox.root.join("relative")).expect("link");
        symlink(sandbox.root.join("sub"), sandbox.root.join("absolute")).expect("link");
        symlink("../file.txt", sandbox.root.join("sub/deeper/up")).expect("link");
        symlink("missing-target", sandbox.root.join("dangling")).expect("link");
        check(&sandbox, "relative/../file.txt", None, Ok("/sub/file.txt"));
        check(&sandbox, "/absolute/file.txt", None, Ok("/sub/file.txt"));
        check(&sandbox, "sub/deeper/up", None, Ok("/sub/file.txt"));
        check(&sandbox, "relative", None, Ok("/sub/deeper"));
        check(&sandbox, "file.txt", Some("absolute"), Ok("/sub/file.txt"));
        check(&sandbox, "dangling", None, Ok("/missing-target"));
    }

    #[test]
    fn links_that_leave_the_root_are_refused() {
        let sandbox = sandbox();
        symlink("../../..", sandbox.root.join("sub/up")).expect("link");
        symlink("/etc", sandbox.root.join("etc")).expect("link");
        symlink(&sandbox.outside, sandbox.root.join("outside")).expect("link");
        symlink(
            sandbox.root.join("../root-sibling"),
            sandbox.root.join("sibling"),
        )
        .expect("link");
        check(
            &sandbox,
            "sub/up/outside/secret.txt",
            None,
            Err("path_outside_workspace"),
        );
        check(&sandbox, "sub/up", None, Err("path_outside_workspace"));
        check(&sandbox, "etc/passwd", None, Err("path_outside_workspace"));
        check(
            &sandbox,
            "/outside/secret.txt",
            None,
            Err("path_outside_workspace"),
        );
        check(&sandbox, "sibling", None, Err("path_outside_workspace"));
        check(&sandbox, "x", Some("etc"), Err("path_outside_workspace"));
    }

    #[test]
    fn link_loops_are_refused_after_the_limit() {
        let sandbox = sandbox();
        symlink("loop-b", sandbox.root.join("loop-a")).expect("link");
        symlink("loop-a", sandbox.root.join("loop-b")).expect("link");
        check(&sandbox, "loop-a/file", None, Err("invalid_request"));
        let mut previous = "sub".to_owned();
        for index in 0..MAX_SYMBOLIC_LINKS {
            let name = format!("chain-{index}");
            symlink(&previous, sandbox.root.join(&name)).expect("link");
            previous = name;
        }
        check(
            &sandbox,
            &format!("{previous}/file.txt"),
            None,
            Ok("/sub/file.txt"),
        );
        symlink(&previous, sandbox.root.join("one-more")).expect("link");
        check(&sandbox, "one-more/file.txt", None, Err("invalid_request"));
    }

    #[test]
    fn working_dir_must_be_existing_folder() {
        let sandbox = sandbox();
        check(&sandbox, "x", Some("sub/deeper"), Ok("/sub/deeper/x"));
        check(&sandbox, "x", Some("/missing"), Err("invalid_request"));
        check(
            &sandbox,
            "/sub/file.txt",
            Some("/missing"),
            Err("invalid_request"),
        );
        check(&sandbox, "x", Some("sub/file.txt"), Err("invalid_request"));
        check(
            &sandbox,
            "x",
            Some("sub/file.txt/below"),
            Err("invalid_request"),
        );
        let messages = [
            (
                "/missing",
                "working_dir `/missing` does not exist in the workspace",
            ),
            (
                "sub/file.txt",
                "working_dir `sub/file.txt` is not a directory in the workspace",
            ),
        ];
        for (working_dir, message) in messages {
            let error = WorkspacePath::resolve(&sandbox.root, "x", Some(working_dir))
                .expect_err(working_dir);
            assert!(error.to_string().starts_with(message), "{error}");
        }
    }

    #[test]
    fn names_and_paths_over_the_limits_are_invalid() {
        let sandbox = sandbox();
        let long_name = "n".repeat(MAX_NAME_BYTES + 1);
        let deep = format!("{}f", "d/".repeat(MAX_PATH_BYTES));
        check(&sandbox, &long_name, None, Err("invalid_request"));
        check(&sandbox, &deep, None, Err("invalid_request"));
        check(&sandbox, "x", Some(&long_name), Err("invalid_request"));
        check(&sandbox, "x", Some(&deep), Err("invalid_request"));
        check(
            &sandbox,
            &"n".repeat(MAX_NAME_BYTES),
            None,
            Ok(&format!("/{}", "n".repeat(255))),
        );
        let error = WorkspacePath::resolve(&sandbox.root, &deep, None).expect_err("too long");
        let shown = format!("path `{}… (8193 bytes)` is too long", "d/".repeat(40));
        assert!(error.to_string().starts_with(&shown), "{error}");
    }

    #[test]
    fn nul_bytes_are_invalid() {
        let sandbox = sandbox();
        let error = WorkspacePath::resolve(&sandbox.root, "a\0b", None).expect_err("NUL refused");
        assert_eq!(error.code(), "invalid_request");
    }

    #[test]
    fn open_reads_the_resolved_file() {
        let sandbox = sandbox();
        let path = WorkspacePath::resolve(&sandbox.root, "sub/file.txt", None).expect("inside");
        let mut text = String::new();
        fs::File::from(path.open(OFlag::O_RDONLY).expect("open"))
            .read_to_string(&mut text)
            .expect("read");
        assert_eq!(text, "inside");
        assert_eq!(path.host_path(), sandbox.root.join("sub/file.txt"));
    }

    #[test]
    fn link_swapped_after_resolution_is_rejected() {
        let sandbox = sandbox();
        let in_folder =
            WorkspacePath::resolve(&sandbox.root, "sub/secret.txt", None).expect("inside");
        let final_link =
            WorkspacePath::resolve(&sandbox.root, "sub/deeper/file.txt", None).expect("inside");
        fs::write(sandbox.root.join("sub/deeper/file.txt"), "inside").expect("file");
        fs::remove_file(sandbox.root.join("sub/deeper/file.txt")).expect("remove file");
        symlink(
            sandbox.outside.join("secret.txt"),
            sandbox.root.join("sub/deeper/file.txt"),
        )
        .expect("link");
        let error = final_link
            .open(OFlag::O_RDONLY)
            .expect_err("a swapped final link is refused");
        assert!(is_swapped_link(&error), "{error}");
        fs::rename(sandbox.root.join("sub"), sandbox.root.join("moved")).expect("move folder away");
        symlink(&sandbox.outside, sandbox.root.join("sub")).expect("swap in a folder link");
        let error = in_folder
            .open(OFlag::O_RDONLY)
            .expect_err("a swapped folder link is refused");
        assert!(is_swapped_link(&error), "{error}");
        let error = in_folder
            .create_parent()
            .expect_err("a swapped folder link is refused");
        assert!(is_swapped_link(&error), "{error}");
        assert_eq!(
            fs::read_to_string(sandbox.outside.join("secret.txt")).expect("outside file"),
            "outside"
        );
    }

    #[test]
    fn create_parent_makes_missing_folders_inside_the_root() {
        let sandbox = sandbox();
        let path = WorkspacePath::resolve(&sandbox.root, "new/nested/file.txt", Some("sub"))
            .expect("inside");
        let (_, name) = path.create_parent().expect("folders created");
        assert_eq!(name, "file.txt");
        assert!(sandbox.root.join("sub/new/nested").is_dir());
        let root = WorkspacePath::resolve(&sandbox.root, "/", None).expect("root");
        assert_eq!(root.file_name(), None);
        let error = root.create_parent().expect_err("the root has no parent");
        assert_eq!(error.raw_os_error(), Some(Errno::EISDIR as i32));
        let below_file = WorkspacePath::resolve(&sandbox.root, "sub/file.txt/x", None)
            .expect("lexically inside");
        let error = below_file.create_parent().expect_err("a file is no folder");
        assert_eq!(error.raw_os_error(), Some(Errno::ENOTDIR as i32));
    }
}
