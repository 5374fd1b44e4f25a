//! The processes of a workspace and how they are killed.
//!
//! Where cgroup v2 works, every command runs in a cgroup of its own below its workspace's
//! (`cgroup`). No process can leave it by `setsid`, a double fork or a cleared environment, so a
//! timeout kills the command's cgroup, and a reset or destroy the workspace's.
//!
//! Without cgroups (no cgroup2 mount, or one the provider may not write), the provider falls back
//! to what plain processes offer. Every command starts a process group of its own, which the
//! provider records. Processes that leave their group (`setsid`, daemons that double fork) keep
//! the environment they inherited, so they are also found by the `DERRICK_WORKSPACE_ID` variable
//! in `/proc/<pid>/environ`; on a timeout, the command's descendants are found through their
//! parents. A detached process that also clears its environment escapes the fallback; that is
//! the limit of isolation without a cgroup. The scan also runs with cgroups, for a process that
//! a command moved out of its cgroup.
//!
//! A recorded group id could, after its processes are gone, be reused by an unrelated group. A
//! new group always starts with its leader, whose pid is the group id, so a group is trusted only
//! while its leader is absent or is still the process that was recorded (same start time).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tracing::{info, warn};

use super::cgroup::{CgroupTree, CommandCgroup};
use crate::engine::WorkspaceId;
use crate::error::{Error, Result};

/// The variable that marks every process a workspace's commands start.
pub(super) const WORKSPACE_ID_VARIABLE: &str = "DERRICK_WORKSPACE_ID";

/// How long `kill_blocking` waits for killed processes to disappear. SIGKILL takes effect at
/// once except for a process stuck in uninterruptible I/O; five seconds covers a slow disk
/// without letting a reset hang on a process that will never die.
pub(super) const KILL_PATIENCE: Duration = Duration::from_secs(5);

/// How often `kill_blocking` looks again for survivors, short next to a reset's other work.
const KILL_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The mechanism by which the provider finds and kills the processes of a workspace.
#[derive(Debug)]
pub(super) enum Tracker {
    /// A cgroup per command below one per workspace, plus the scan.
    Cgroups(Arc<CgroupTree>),
    /// Process groups, the environment marker and, on a timeout, the command's descendants.
    Scan,
}

/// A process group that one command of a workspace started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ProcessGroup {
    id: i32,
    /// Start time of the leader in clock ticks after boot (`/proc/<pid>/stat`, field 22).
    leader_start: u64,
}

/// Fields of `/proc/<pid>/stat` that the provider reads.
struct ProcessStat {
    state: char,
    parent: i32,
    group: i32,
    start: u64,
}

impl Tracker {
    /// Uses cgroups when a command cgroup can be created below the provider's own cgroup, the
    /// scan otherwise, and logs which (a warning for the scan, with the reason).
    pub(super) fn choose_blocking(cache: &Path) -> Tracker {
        match CgroupTree::open_blocking(cache) {
            Ok(tree) => {
                let cgroup = tree.base().display().to_string();
                info!(
                    provider = "local",
                    cgroup, "commands run in cgroups of their own"
                );
                Tracker::Cgroups(Arc::new(tree))
            }
            Err(reason) => {
                warn!(
                    provider = "local",
                    reason,
                    "cgroup v2 unavailable; finding a workspace's processes by process group \
                     and environment, which a detached process with a cleared environment escapes"
                );
                Tracker::Scan
            }
        }
    }

    /// Creates the cgroup of a new command of workspace `id`; `None` without cgroups.
    ///
    /// # Errors
    /// `internal` when the cgroup cannot be created.
    pub(super) fn start_command_blocking(&self, id: &WorkspaceId) -> Result<Option<CommandCgroup>> {
        let Tracker::Cgroups(tree) = self else {
            return Ok(None);
        };
        let cgroup = tree.start_command_blocking(id).map_err(|error| {
            Error::internal(
                format!(
                    "cannot create a command cgroup in {}",
                    tree.base().display()
                ),
                error,
            )
        })?;
        Ok(Some(cgroup))
    }

    /// Kills every process of workspace `id`: its cgroups, the recorded `groups` and the
    /// processes marked with its id, and waits until none of them is left.
    ///
    /// # Errors
    /// `internal` when a process survives SIGKILL for [`KILL_PATIENCE`] or the cgroup files or
    /// `/proc` cannot be read.
    pub(super) fn kill_workspace_blocking(
        &self,
        id: &WorkspaceId,
        groups: &[ProcessGroup],
    ) -> Result<()> {
        if let Tracker::Cgroups(tree) = self {
            tree.kill_workspace_blocking(id, KILL_PATIENCE)
                .map_err(|error| {
                    Error::internal(
                        format!("cannot kill the processes of workspace {id}"),
                        error,
                    )
                })?;
        }
        kill_blocking(id, groups)
    }
}

impl ProcessGroup {
    /// Records the group that the process `leader` leads (it was started with `process_group(0)`).
    ///
    /// Call it while the leader is not yet reaped, so its pid cannot have been reused.
    pub(super) fn of_leader(leader: u32) -> io::Result<ProcessGroup> {
        let id = i32::try_from(leader)
            .map_err(|_| io::Error::other(format!("pid {leader} out of range")))?;
        let stat = read_stat(id)?;
        Ok(ProcessGroup {
            id,
            leader_start: stat.start,
        })
    }

    /// Sends SIGKILL to every process of the group. Use it only while the leader is unreaped;
    /// otherwise `kill_blocking` checks that the group is still this one.
    pub(super) fn kill_now(&self) {
        // ESRCH means the group is already gone, which is what the caller wants.
        let _ = killpg(Pid::from_raw(self.id), Signal::SIGKILL);
    }

    /// Tells whether processes of this group may still run.
    pub(super) fn is_active(&self) -> bool {
        self.is_ours() && killpg(Pid::from_raw(self.id), None).is_ok()
    }

    fn is_ours(&self) -> bool {
        match read_stat(self.id) {
            Ok(stat) => stat.start == self.leader_start,
            Err(_) => true,
        }
    }
}

/// Kills the processes of `groups` and every process marked with the workspace id, and waits
/// until none of them is left (zombies count as gone).
///
/// # Errors
/// `internal` when a process survives SIGKILL for [`KILL_PATIENCE`] or `/proc` cannot be read.
pub(super) fn kill_blocking(id: &WorkspaceId, groups: &[ProcessGroup]) -> Result<()> {
    let marker = format!("{WORKSPACE_ID_VARIABLE}={id}");
    let groups: Vec<i32> = groups
        .iter()
        .filter(|group| group.is_ours())
        .map(|group| group.id)
        .collect();
    let deadline = Instant::now() + KILL_PATIENCE;
    loop {
        let survivors = find_blocking(marker.as_bytes(), &groups)
            .map_err(|error| Error::internal("cannot list processes in /proc", error))?;
        if survivors.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::internal(
                format!("cannot kill the processes of workspace {id}"),
                format!(
                    "pids {survivors:?} survived SIGKILL for {} s",
                    KILL_PATIENCE.as_secs()
                ),
            ));
        }
        for pid in survivors {
            match kill(Pid::from_raw(pid), Signal::SIGKILL) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(errno) => {
                    return Err(Error::internal(format!("cannot kill process {pid}"), errno));
                }
            }
        }
        thread::sleep(KILL_POLL_INTERVAL);
    }
}

/// Kills a timed-out command without a cgroup: its group and every descendant of its leader,
/// also those that left the group.
///
/// The processes found are stopped first and the search repeats until it finds no new one, so
/// a process cannot escape by forking a child that the kill would orphan. Call it while the
/// leader is not yet reaped. A descendant whose parent had already exited when the search began
/// is no longer linked to the leader. The workspace's environment marker still finds it at a
/// reset.
///
/// # Errors
/// `internal` when `/proc` cannot be read.
pub(super) fn kill_tree_blocking(group: ProcessGroup) -> Result<()> {
    let mut stopped = BTreeSet::new();
    loop {
        let table = process_table()
            .map_err(|error| Error::internal("cannot list processes in /proc", error))?;
        let found = tree_of(&table, group.id, &stopped);
        let fresh: Vec<i32> = found.difference(&stopped).copied().collect();
        if fresh.is_empty() {
            break;
        }
        for pid in fresh {
            // ESRCH: the process exited meanwhile, which is what the kill is for.
            let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
            stopped.insert(pid);
        }
    }
    group.kill_now();
    for pid in stopped {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    Ok(())
}

/// Returns the live members of `group` and of `known`, and all their descendants and those of
/// the group's leader, following the parent links of `table` (pid to parent and group).
fn tree_of(table: &HashMap<i32, (i32, i32)>, group: i32, known: &BTreeSet<i32>) -> BTreeSet<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (pid, (parent, _)) in table {
        children.entry(*parent).or_default().push(*pid);
    }
    let members = table
        .iter()
        .filter(|(_, (_, member_of))| *member_of == group)
        .map(|(pid, _)| *pid);
    let mut pending: Vec<i32> = members
        .chain(known.iter().copied())
        .chain([group])
        .collect();
    let mut found = BTreeSet::new();
    while let Some(pid) = pending.pop() {
        if table.contains_key(&pid) && found.insert(pid) {
            pending.extend(children.get(&pid).into_iter().flatten());
        }
    }
    found
}

/// Maps every live process (not zombies) except this one to its parent and group.
fn process_table() -> io::Result<HashMap<i32, (i32, i32)>> {
    let own = std::process::id();
    let mut table = HashMap::new();
    for pid in pids()? {
        if pid.unsigned_abs() == own {
            continue;
        }
        // A process that exits while we look has no stat any more: it is gone, not an error.
        let Ok(stat) = read_stat(pid) else { continue };
        if !matches!(stat.state, 'Z' | 'X') {
            table.insert(pid, (stat.parent, stat.group));
        }
    }
    Ok(table)
}

/// Lists the pids in `/proc`.
fn pids() -> io::Result<Vec<i32>> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let name = entry?.file_name();
        if let Some(pid) = name.to_str().and_then(|name| name.parse::<i32>().ok()) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// Lists the live processes (not zombies) that are in `groups` or carry `marker` in their
/// environment, except this process.
fn find_blocking(marker: &[u8], groups: &[i32]) -> io::Result<Vec<i32>> {
    let own = std::process::id();
    let mut found = Vec::new();
    for pid in pids()? {
        if pid.unsigned_abs() == own {
            continue;
        }
        // A process that exits while we look has no stat any more: it is gone, not an error.
        let Ok(stat) = read_stat(pid) else { continue };
        if matches!(stat.state, 'Z' | 'X') {
            continue;
        }
        if groups.contains(&stat.group) || has_marker(pid, marker) {
            found.push(pid);
        }
    }
    Ok(found)
}

fn has_marker(pid: i32, marker: &[u8]) -> bool {
    match fs::read(format!("/proc/{pid}/environ")) {
        Ok(environment) => environment
            .split(|byte| *byte == 0)
            .any(|entry| entry == marker),
        // Unreadable: another user's process (when derrick is not root) or one that just exited.
        Err(_) => false,
    }
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may hold spaces and parentheses, so
/// the fields are counted from the last `)`.
fn read_stat(pid: i32) -> io::Result<ProcessStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let malformed = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed /proc/{pid}/stat"),
        )
    };
    let (_, fields) = text.rsplit_once(')').ok_or_else(malformed)?;
    let fields: Vec<&str> = fields.split_whitespace().collect();
    // After the name: state is field 3, the parent field 4, the process group field 5, the
    // start time field 22.
    let state = fields
        .first()
        .and_then(|state| state.chars().next())
        .ok_or_else(malformed)?;
    let parent = fields
        .get(1)
        .and_then(|parent| parent.parse().ok())
        .ok_or_else(malformed)?;
    let group = fields
        .get(2)
        .and_then(|group| group.parse().ok())
        .ok_or_else(malformed)?;
    let start = fields
        .get(19)
        .and_then(|start| start.parse().ok())
        .ok_or_else(malformed)?;
    Ok(ProcessStat {
        state,
        parent,
        group,
        start,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command, Stdio};

    use super::*;

    fn spawn(id: &WorkspaceId, script: &str, own_group: bool) -> Child {
        let mut command = Command::new("bash");
        command
            .args(["-c", script])
            .env(WORKSPACE_ID_VARIABLE, id.as_str())
            .stdin(Stdio::null());
        if own_group {
            command.process_group(0);
        }
        command.spawn().expect("bash starts")
    }

    fn wait_for(mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(Instant::now() < deadline, "condition not met within 5 s");
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn stat_fields_are_read_after_the_name() {
        // The command name in /proc/<pid>/stat is the executable's file name, here one that
        // looks like the fields after it.
        let directory = tempfile::tempdir().expect("temporary directory");
        let program = directory.path().join("a) Z 1 (b");
        std::os::unix::fs::symlink("/bin/sleep", &program).expect("link to sleep");
        let mut child = Command::new(&program)
            .arg("616")
            .process_group(0)
            .spawn()
            .expect("sleep starts");
        let pid = i32::try_from(child.id()).expect("pid fits");
        wait_for(|| read_stat(pid).is_ok_and(|stat| stat.state == 'S'));
        let stat = read_stat(pid).expect("stat");
        assert_eq!(stat.group, pid, "the child leads its own group");
        assert_eq!(
            ProcessGroup::of_leader(child.id())
                .expect("group")
                .leader_start,
            stat.start
        );
        child.kill().expect("kill");
        wait_for(|| read_stat(pid).is_ok_and(|stat| stat.state == 'Z'));
        child.wait().expect("reaped");
    }

    #[test]
    fn kill_blocking_kills_groups_and_marked_processes() {
        let id = WorkspaceId::generate();
        let mut grouped = spawn(&WorkspaceId::generate(), "sleep 611 & sleep 612", true);
        let mut marked = spawn(&id, "sleep 613", false);
        let group = ProcessGroup::of_leader(grouped.id()).expect("group");
        let unrelated = WorkspaceId::generate();
        let mut other = spawn(&unrelated, "sleep 614", true);
        kill_blocking(&id, &[group]).expect("killed");
        assert_eq!(grouped.wait().expect("reaped").code(), None);
        assert_eq!(marked.wait().expect("reaped").code(), None);
        // The background sleep's zombie waits for init to reap it; until then the group exists.
        wait_for(|| !group.is_active());
        assert_eq!(
            other.try_wait().expect("status"),
            None,
            "another workspace's process lives"
        );
        kill_blocking(&unrelated, &[]).expect("killed");
        assert_eq!(other.wait().expect("reaped").code(), None);
    }

    #[test]
    fn reused_group_id_is_not_trusted() {
        let mut child = spawn(&WorkspaceId::generate(), "sleep 615", true);
        let group = ProcessGroup::of_leader(child.id()).expect("group");
        let reused = ProcessGroup {
            leader_start: group.leader_start + 1,
            ..group
        };
        assert!(group.is_active());
        assert!(!reused.is_active());
        kill_blocking(&WorkspaceId::generate(), &[reused]).expect("nothing to kill");
        assert_eq!(
            child.try_wait().expect("status"),
            None,
            "an untrusted group is left alone"
        );
        group.kill_now();
        wait_for(|| child.try_wait().expect("status").is_some());
    }
}
