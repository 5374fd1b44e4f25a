//! cgroup v2 folders that hold every process a workspace's commands start.
//!
//! Each command runs in a cgroup of its own, below one per workspace:
//!
//! ```text
//! <cgroup2 mount>/<the provider's own cgroup>/derrick-<hash of the cache path>/<workspace id>/
//!     command-<random>/
//! ```
//!
//! A process cannot leave its cgroup by `setsid`, a double fork or a cleared environment, so
//! `cgroup.kill` of a command's cgroup ends everything that command started, and of a workspace's
//! cgroup everything of the workspace. The child enters its command's cgroup before `exec` (see
//! `exec`), so no process of the command ever runs outside it.
//!
//! The folder name comes from the cache path, not the provider's pid, so a provider restarted
//! on the same cache finds the cgroups of the workspaces it finds on disk.
//!
//! Invariant: a command's cgroup is removed by its command when it ends, or by a workspace kill
//! once it is no longer active. A workspace kill never removes the cgroup of a command that is
//! starting, because that would make the start fail.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use sha2::{Digest, Sha256};

use super::{exec, mounts};
use crate::engine::WorkspaceId;

/// How many times a command's cgroup is created again when a concurrent workspace kill removed
/// a parent folder in between. One retry is enough unless kills repeat; eight bounds the loop.
const CREATE_ATTEMPTS: usize = 8;

/// How long the probe waits for its exited process to leave the cgroup's count. The kernel
/// updates the count when the process exits, so this is a bound, not an expected wait.
const ENTER_PATIENCE: Duration = Duration::from_secs(1);

/// How often a killed cgroup is checked for remaining processes.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The cgroups of one provider's workspaces.
#[derive(Debug)]
pub(super) struct CgroupTree {
    /// `derrick-<hash>` below the provider's own cgroup.
    base: PathBuf,
    /// Cgroups of commands that are starting or running.
    active: Mutex<HashSet<PathBuf>>,
}

/// The cgroup of one command; removed when dropped, unless processes are left in it.
#[derive(Debug)]
pub(super) struct CommandCgroup {
    tree: Arc<CgroupTree>,
    path: PathBuf,
    /// Its `cgroup.procs`, open for writing, so the child can enter with one `write`.
    procs: OwnedFd,
}

impl CgroupTree {
    /// Finds the cgroup2 mount and the provider's own cgroup in it, and checks that a command
    /// cgroup can be created, entered and killed there (a short `bash` enters a probe cgroup).
    ///
    /// # Errors
    /// The reason cgroups cannot be used, for the log.
    pub(super) fn open_blocking(cache: &Path) -> Result<CgroupTree, String> {
        let own = own_cgroup_folder()?;
        let cache = cache
            .canonicalize()
            .map_err(|error| format!("cannot resolve {}: {error}", cache.display()))?;
        let digest = hex::encode(Sha256::digest(cache.as_os_str().as_encoded_bytes()));
        let tree = CgroupTree {
            base: own.join(format!("derrick-{}", &digest[..16])),
            active: Mutex::default(),
        };
        tree.probe()?;
        Ok(tree)
    }

    /// Returns the folder below which the workspaces' cgroups are.
    pub(super) fn base(&self) -> &Path {
        &self.base
    }

    /// Creates a cgroup for a new command of workspace `id`.
    pub(super) fn start_command_blocking(
        self: &Arc<Self>,
        id: &WorkspaceId,
    ) -> io::Result<CommandCgroup> {
        let name = format!("command-{}", uuid::Uuid::new_v4().simple());
        let path = self.base.join(id.as_str()).join(name);
        self.active_set().insert(path.clone());
        let cgroup = self.create(&path).and_then(|()| {
            let flags = OFlag::O_WRONLY | OFlag::O_CLOEXEC;
            let procs = nix::fcntl::open(&path.join("cgroup.procs"), flags, Mode::empty())?;
            Ok(CommandCgroup {
                tree: Arc::clone(self),
                path: path.clone(),
                procs,
            })
        });
        if cgroup.is_err() {
            self.active_set().remove(&path);
            let _ = remove_cgroup(&path);
        }
        cgroup
    }

    /// Kills every process in workspace `id`'s cgroups, waits until none is left, and removes
    /// the cgroups of commands that have ended. A workspace without cgroups has nothing to kill.
    ///
    /// # Errors
    /// `TimedOut` when processes remain after `patience`, or the error of a cgroup file.
    pub(super) fn kill_workspace_blocking(
        &self,
        id: &WorkspaceId,
        patience: Duration,
    ) -> io::Result<()> {
        let folder = self.base.join(id.as_str());
        let deadline = Instant::now() + patience;
        // `cgroup.kill` also kills what forks meanwhile; it is repeated because a command that
        // was starting may enter the cgroup after the first kill.
        while is_populated(&folder)? {
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "processes in {} survived SIGKILL for {} s",
                        folder.display(),
                        patience.as_secs()
                    ),
                ));
            }
            kill(&folder)?;
            thread::sleep(POLL_INTERVAL);
        }
        self.remove_ended(&folder)
    }

    /// Creates `path` and its missing parents. A workspace kill may remove the empty workspace
    /// folder (or a dropped provider the base) between two steps; the creation then starts over.
    fn create(&self, path: &Path) -> io::Result<()> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let created = [self.base.as_path(), path.parent().unwrap_or(path)]
                .into_iter()
                .try_for_each(create_folder)
                .and_then(|()| fs::create_dir(path));
            match created {
                Err(error)
                    if error.kind() == io::ErrorKind::NotFound && attempts < CREATE_ATTEMPTS => {}
                other => return other,
            }
        }
    }

    /// Removes the cgroups of ended commands of a killed workspace, then its folder if nothing
    /// is active in it. Folders that are still busy stay for the next kill.
    fn remove_ended(&self, folder: &Path) -> io::Result<()> {
        let entries = match fs::read_dir(folder) {
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            other => other?,
        };
        let active = self.active_set().clone();
        for entry in entries {
            let entry = entry?;
            let is_cgroup = entry.file_type()?.is_dir();
            if is_cgroup && !active.contains(&entry.path()) {
                busy_is_fine(remove_cgroup(&entry.path()))?;
            }
        }
        // Not `remove_cgroup`: it would also remove the cgroup of a command that is starting.
        match fs::remove_dir(folder) {
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            other => busy_is_fine(other),
        }
    }

    /// Creates a cgroup in the base, checks that it has the files this module uses, and removes
    /// it again.
    fn probe(&self) -> Result<(), String> {
        let probe = self
            .base
            .join(format!("probe-{}", uuid::Uuid::new_v4().simple()));
        let fail = |step: &str, path: &Path, error: &dyn std::fmt::Display| {
            format!("cannot {step} {}: {error}", path.display())
        };
        create_folder(&self.base).map_err(|error| fail("create", &self.base, &error))?;
        fs::create_dir(&probe).map_err(|error| fail("create", &probe, &error))?;
        let killable = probe.join("cgroup.kill");
        let checked = fs::OpenOptions::new()
            .write(true)
            .open(&killable)
            .map_err(|error| fail("open", &killable, &error))
            .and_then(|_| enter_once(&probe).map_err(|error| fail("enter", &probe, &error)));
        let removed = remove_cgroup(&probe).map_err(|error| fail("remove", &probe, &error));
        checked.and(removed)
    }

    fn active_set(&self) -> std::sync::MutexGuard<'_, HashSet<PathBuf>> {
        // Every change is one `HashSet` call, so a panic cannot leave the set half-changed.
        self.active.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for CgroupTree {
    /// Removes the base folder when no workspace cgroup is left in it; a busy one stays.
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.base);
    }
}

impl CommandCgroup {
    /// Returns the descriptor of `cgroup.procs`, open for writing, for the child's `pre_exec`.
    /// It stays open as long as `self`.
    pub(super) fn procs_descriptor(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    /// Kills every process of the command, also those that left its process group.
    pub(super) fn kill(&self) -> io::Result<()> {
        kill(&self.path)
    }
}

impl Drop for CommandCgroup {
    /// Removes the cgroup if the command left no process in it; otherwise the next workspace
    /// kill removes it.
    fn drop(&mut self) {
        self.tree.active_set().remove(&self.path);
        let _ = remove_cgroup(&self.path);
    }
}

/// Returns the folder of the provider's own cgroup in the cgroup2 hierarchy.
fn own_cgroup_folder() -> Result<PathBuf, String> {
    let membership = fs::read_to_string("/proc/self/cgroup")
        .map_err(|error| format!("cannot read /proc/self/cgroup: {error}"))?;
    let own = membership
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or("this process is in no cgroup2 hierarchy")?;
    let table = mounts::mount_table_blocking()
        .map_err(|error| format!("cannot read /proc/self/mountinfo: {error}"))?;
    table
        .iter()
        .filter(|mount| mount.file_system == "cgroup2")
        .find_map(|mount| {
            let relative = Path::new(own).strip_prefix(&mount.root).ok()?;
            Some(mount.point.join(relative))
        })
        .ok_or_else(|| format!("no cgroup2 mount shows this process's cgroup {own}"))
}

/// Runs `bash -c :` in `cgroup`, entering it as commands do, and waits until the cgroup is
/// empty again. Entering needs more rights than creating (write access to the common ancestor
/// of both cgroups), so a provider without them learns it here instead of at every command.
fn enter_once(cgroup: &Path) -> io::Result<()> {
    let flags = OFlag::O_WRONLY | OFlag::O_CLOEXEC;
    let procs = nix::fcntl::open(&cgroup.join("cgroup.procs"), flags, Mode::empty())?;
    let descriptor = procs.as_raw_fd();
    let mut command = Command::new(exec::bash());
    command
        .args(["-c", ":"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the closure runs in the forked child before `exec`. It allocates nothing and makes
    // one `write`, on a descriptor that `procs` keeps open until the child has exited.
    unsafe {
        command.pre_exec(move || enter(BorrowedFd::borrow_raw(descriptor)));
    }
    let status = command.status()?;
    if !status.success() {
        return Err(io::Error::other(format!("`bash -c :` ended with {status}")));
    }
    let deadline = Instant::now() + ENTER_PATIENCE;
    while is_populated(cgroup)? {
        if Instant::now() >= deadline {
            return Err(io::Error::other(
                "the exited probe process is still counted",
            ));
        }
        thread::sleep(POLL_INTERVAL);
    }
    Ok(())
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is open as `procs`.
///
/// It is async-signal-safe (one `write`, no allocation), so a forked child can call it before
/// `exec`.
pub(super) fn enter(procs: BorrowedFd<'_>) -> io::Result<()> {
    // `0` names the writing process itself.
    nix::unistd::write(procs, b"0")?;
    Ok(())
}

fn create_folder(path: &Path) -> io::Result<()> {
    match fs::create_dir(path) {
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// Writes `cgroup.kill`; a cgroup that is gone has nothing left to kill.
fn kill(cgroup: &Path) -> io::Result<()> {
    match fs::write(cgroup.join("cgroup.kill"), "1") {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Tells whether a process is left in the cgroup or below it (`populated` in `cgroup.events`
/// covers the whole subtree). A missing cgroup contains none.
fn is_populated(cgroup: &Path) -> io::Result<bool> {
    let events = match fs::read_to_string(cgroup.join("cgroup.events")) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(false),
        other => other?,
    };
    Ok(events.lines().any(|line| line == "populated 1"))
}

/// Removes a cgroup and the cgroups that a command created below it, deepest first. A missing
/// one is already removed; one with processes fails with `EBUSY`.
fn remove_cgroup(cgroup: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(cgroup) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup(&entry.path())?;
        }
    }
    match fs::remove_dir(cgroup) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Accepts `EBUSY` from a cgroup's removal: a process entered it since the kill (a command
/// that was starting), and the next kill removes it.
fn busy_is_fine(removed: io::Result<()>) -> io::Result<()> {
    match removed {
        Err(error) if error.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, Arc<CgroupTree>) {
        let cache = tempfile::tempdir().expect("temporary cache");
        let tree = CgroupTree::open_blocking(cache.path())
            .expect("cgroup v2 works on the test machine (root, cgroup2 mounted)");
        (cache, Arc::new(tree))
    }

    fn cgroups_in(folder: &Path) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(folder) else {
            return Vec::new();
        };
        let mut found: Vec<PathBuf> = entries
            .map(|entry| entry.expect("entry"))
            .filter(|entry| entry.file_type().expect("type").is_dir())
            .map(|entry| entry.path())
            .collect();
        found.sort();
        found
    }

    #[test]
    fn workspace_kill_spares_starting_commands() {
        let (_cache, tree) = tree();
        let id = WorkspaceId::generate();
        let workspace = tree.base().join(id.as_str());
        let ended = tree.start_command_blocking(&id).expect("cgroup");
        let starting = tree.start_command_blocking(&id).expect("cgroup");
        let escaped = format!(
            "echo {} > {}/cgroup.procs && exec env -i setsid sleep 621",
            "$$",
            ended.path.display()
        );
        let mut child = Command::new("bash")
            .args(["-c", &escaped])
            .stdin(Stdio::null())
            .spawn()
            .expect("bash starts");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !is_populated(&ended.path).expect("events") {
            assert!(
                Instant::now() < deadline,
                "the process did not enter the cgroup"
            );
            thread::sleep(POLL_INTERVAL);
        }
        let ended_path = ended.path.clone();
        drop(ended);
        assert!(ended_path.exists(), "a cgroup with processes stays");

        tree.kill_workspace_blocking(&id, Duration::from_secs(5))
            .expect("killed");
        assert_eq!(
            child.wait().expect("reaped").code(),
            None,
            "killed by a signal"
        );
        assert_eq!(cgroups_in(&workspace), vec![starting.path.clone()]);

        drop(starting);
        tree.kill_workspace_blocking(&id, Duration::from_secs(5))
            .expect("nothing left");
        assert!(!workspace.exists(), "the workspace cgroup is removed");
        tree.kill_workspace_blocking(&id, Duration::from_secs(5))
            .expect("nothing to kill");
    }

    #[test]
    fn base_name_follows_the_cache() {
        let (cache, first) = tree();
        let second = CgroupTree::open_blocking(cache.path()).expect("same cache");
        assert_eq!(first.base(), second.base());
        let other = CgroupTree::open_blocking(&cache.path().join("..")).expect("other cache");
        assert_ne!(first.base(), other.base());
        let base = first.base().to_path_buf();
        drop((first, second, other));
        assert!(!base.exists());
    }
}
