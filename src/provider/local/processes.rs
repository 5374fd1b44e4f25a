//! The processes of a workspace and how they are killed.
//!
//! Every command starts a process group of its own, which the provider records. Processes that
//! leave their group (`setsid`, daemons that double fork) keep the environment they inherited, so
//! they are also found by the `DERRICK_WORKSPACE_ID` variable in `/proc/<pid>/environ`. A process
//! that also clears its environment escapes both; that is the limit of isolation without a
//! container or a cgroup.
//!
//! A recorded group id could, after its processes are gone, be reused by an unrelated group. A
//! new group always starts with its leader, whose pid is the group id, so a group is trusted only
//! while its leader is absent or is still the process that was recorded (same start time).

use std::fs;
use std::io;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use crate::engine::WorkspaceId;
use crate::error::{Error, Result};

/// The variable that marks every process a workspace's commands start.
pub(super) const WORKSPACE_ID_VARIABLE: &str = "DERRICK_WORKSPACE_ID";

/// How long `kill_blocking` waits for killed processes to disappear. SIGKILL takes effect at
/// once except for a process stuck in uninterruptible I/O; five seconds covers a slow disk
/// without letting a reset hang on a process that will never die.
const KILL_PATIENCE: Duration = Duration::from_secs(5);

/// How often `kill_blocking` looks again for survivors, short next to a reset's other work.
const KILL_POLL_INTERVAL: Duration = Duration::from_millis(10);

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
    group: i32,
    start: u64,
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

/// Lists the live processes (not zombies) that are in `groups` or carry `marker` in their
/// environment, except this process.
fn find_blocking(marker: &[u8], groups: &[i32]) -> io::Result<Vec<i32>> {
    let own = std::process::id();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(pid) = i32::try_from(pid) else {
            continue;
        };
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
    // After the name: state is field 3, the process group field 5, the start time field 22.
    let state = fields
        .first()
        .and_then(|state| state.chars().next())
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
    fn a_reused_group_id_is_not_trusted() {
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
