//! Reaping orphans: derrick becomes the subreaper of the commands it starts, and waits for the
//! orphans that end up as its children, so that no zombies accumulate.
//!
//! A command that double-forks or detaches a process leaves an orphan. Linux hands orphans to the
//! nearest ancestor that is a subreaper (`PR_SET_CHILD_SUBREAPER`), else to PID 1. derrick may run
//! as PID 1 of a container, or under an init that never waits, so it takes them itself.
//!
//! Invariant: the reaper never waits for a process that derrick spawned through tokio, because
//! tokio waits for those and would otherwise get `ECHILD` and lose the exit status. Spawning a
//! command and registering its pid happen under the same lock that a reaping pass takes.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use tracing::{debug, info, warn};

/// Time between two reaping passes. Zombies hold only a process table entry, so a second's delay
/// costs nothing, while a pass reads every `/proc/<pid>/stat`.
const REAP_PERIOD: Duration = Duration::from_secs(1);

/// Returns the set of pids of the commands that tokio waits for.
fn registry() -> &'static Mutex<HashSet<i32>> {
    static REGISTRY: OnceLock<Mutex<HashSet<i32>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashSet::new()))
}

fn lock() -> MutexGuard<'static, HashSet<i32>> {
    registry()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Makes this process the subreaper of its descendants and starts a thread that reaps the
/// orphans among its children. Call once, from the binary: in a test process the reaper would
/// wait for the tests' own children.
pub fn start_reaping_orphans() {
    if let Err(error) = nix::sys::prctl::set_child_subreaper(true) {
        warn!(error = %error, "cannot become the subreaper of commands; their orphans go to PID 1");
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("derrick-reaper".to_owned())
        .spawn(|| {
            loop {
                std::thread::sleep(REAP_PERIOD);
                reap_orphans();
            }
        });
    match spawned {
        Ok(_) => info!("reaping orphaned processes of commands"),
        Err(error) => warn!(error = %error, "cannot start the orphan reaper"),
    }
}

/// Spawns a command through `spawn` and registers its pid, so that the reaper leaves it to tokio.
/// The returned registration removes the pid when dropped, after tokio has waited.
pub(super) fn spawn_registered<T, E>(
    spawn: impl FnOnce() -> Result<T, E>,
    pid_of: impl FnOnce(&T) -> Option<u32>,
) -> Result<(T, Registration), E> {
    let mut registered = lock();
    let child = spawn()?;
    let pid = pid_of(&child).and_then(|pid| i32::try_from(pid).ok());
    if let Some(pid) = pid {
        registered.insert(pid);
    }
    Ok((child, Registration(pid)))
}

/// Keeps a spawned command's pid away from the reaper until dropped.
#[derive(Debug)]
pub(super) struct Registration(Option<i32>);

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            lock().remove(&pid);
        }
    }
}

/// Waits for every zombie child of this process that tokio does not wait for.
fn reap_orphans() {
    let registered = lock();
    let own = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        if registered.contains(&pid) || !is_zombie_child(pid, &own) {
            continue;
        }
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(status) => debug!(pid, status = ?status, "reaped an orphan"),
            Err(error) => debug!(pid, error = %error, "cannot reap an orphan"),
        }
    }
}

/// Tells whether `/proc/<pid>/stat` shows a zombie whose parent is `parent`.
fn is_zombie_child(pid: i32, parent: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The command name in parentheses may contain spaces; state and parent follow the last `)`.
    let Some(close) = stat.rfind(')') else {
        return false;
    };
    let mut fields = stat[close + 1..].split_whitespace();
    fields.next() == Some("Z") && fields.next() == Some(parent)
}
