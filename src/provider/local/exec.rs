//! Commands in a workspace: bash in a process group (and, where it works, a cgroup) of its own,
//! with one output pipe.
//!
//! stdout and stderr share one pipe, so the output keeps the order in which it was written. stdin
//! is `/dev/null` and there is no terminal. The environment is cleared and rebuilt from an
//! allowlist, the workspace's own values and the request's. A timeout kills the command's cgroup
//! (or, without cgroups, its group and descendants).
//!
//! The command string is the argument of `bash -c`, so `ps` shows it, unless it is over the
//! kernel's limit on one argument (`MAX_ARG_STRLEN`, 128 KiB with 4 KiB pages). A longer one is
//! written to a memory file that bash reads on a descriptor of its own, closes, and runs with
//! `eval`. `eval` runs its string as `bash -c` does: one command after another, with the same
//! line numbers, `$0` the path of bash and no positional parameters. Only the prefix of a syntax
//! error differs (`bash: eval: line 2:` for `bash: -c: line 2:`). Environment values still
//! travel in the environment, so one over the limit is rejected, naming the variable.
//!
//! The main process ending does not end the pipe: a background process (`server &`) may hold it
//! open for as long as it runs. So after the main process ends, the pipe is read for at most
//! [`OUTPUT_DRAIN_GRACE`] and the reply is sent with what arrived.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Seek, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, OnceLock};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag};
use nix::sys::memfd::MFdFlags;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe::{self, Receiver};
use tokio::process::{Child, Command};
use tokio::task;
use tokio::time::Instant;

use super::cgroup::{self, CommandCgroup};
use super::processes::{self, ProcessGroup, Tracker, WORKSPACE_ID_VARIABLE};
use super::{cannot, reaper};
use crate::engine::{ExecOutput, ExecRequest, WorkspaceId};
use crate::error::{Error, Result};
use crate::paths::WorkspacePath;
use crate::provider::output::{
    MAX_OUTPUT_BYTES, OUTPUT_DRAIN_GRACE, TIMEOUT_EXIT_CODE, TailBuffer,
};

/// `PATH` for commands when the provider process has none: the usual system folders.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Variables passed on from the provider's environment when set; all others are dropped, so no
/// credential of the provider process reaches a workspace.
const PASSED_VARIABLES: [&str; 3] = ["LANG", "LC_ALL", "TZ"];

/// How much is read from the pipe at once.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// The shell variable that contains the command string between its read and its `eval`. It is
/// unset before the command runs, so the command never sees it.
const SCRIPT_VARIABLE: &str = "__derrick_script";

/// Pages in the kernel's limit on one argument or environment entry (`NAME=value`), its NUL
/// included (`MAX_ARG_STRLEN` is 32 pages in `include/uapi/linux/binfmts.h`).
const MAX_ARGUMENT_PAGES: usize = 32;

/// The page size to assume when `sysconf` cannot tell it.
const FALLBACK_PAGE_BYTES: usize = 4096;

/// Runs `request` in the workspace whose root is `root`; `on_spawn` records the new group.
///
/// # Errors
/// `invalid_request` when `working_dir` is missing or not a folder, `cmd` contains a NUL byte, or
/// the environment is over the kernel's limits; `internal` when bash cannot be started or the
/// pipe fails.
pub(super) async fn run(
    root: &Path,
    id: &WorkspaceId,
    request: ExecRequest,
    tracker: &Arc<Tracker>,
    on_spawn: impl FnOnce(ProcessGroup),
) -> Result<ExecOutput> {
    let ExecRequest {
        cmd,
        working_dir,
        env,
        timeout,
    } = request;
    check_script(&cmd)?;
    let environment = environment(root, id, &env)?;
    let prepared = prepare(root, id, working_dir, cmd, Arc::clone(tracker)).await?;
    let started = Instant::now();
    // Dropped last but one, after `child` has been waited for on every path that returns Ok.
    let (mut child, mut receiver, group, _registration) = start(&prepared, environment)?;
    on_spawn(group);
    // bash has its own descriptor of a script file; the memory goes when bash closes that one.
    let Prepared { script, cgroup, .. } = prepared;
    drop(script);
    let cgroup = cgroup.as_ref();
    let mut guard = KillOnDrop(Some((group, cgroup)));

    let mut output = TailBuffer::new(MAX_OUTPUT_BYTES);
    let deadline = timeout.map(|timeout| started + timeout);
    let ended = read_until_exit(&mut child, &mut receiver, &mut output, deadline).await?;
    let (exit_code, timed_out) = match ended {
        Some(status) => (exit_code(status), false),
        None => {
            kill_timed_out(group, cgroup).await?;
            child
                .wait()
                .await
                .map_err(cannot("reap the killed command"))?;
            (TIMEOUT_EXIT_CODE, true)
        }
    };
    guard.0 = None;
    drain(receiver, &mut output).await;

    let (output, truncated) = output.into_text();
    let duration = started.elapsed();
    Ok(ExecOutput {
        output,
        exit_code,
        timed_out,
        truncated,
        duration,
    })
}

/// The inputs of a command that are made ready before it starts: folder, script and cgroup.
struct Prepared {
    working_dir: PathBuf,
    script: Script,
    /// Removed when dropped, after the command ended.
    cgroup: Option<CommandCgroup>,
}

/// The way the command string reaches bash.
enum Script {
    /// As the argument of `bash -c`, where it fits the kernel's limit on one argument.
    Argument(String),
    /// In a memory file, read from its start. It is close-on-exec, so only the child that clears
    /// the flag inherits it.
    File(File),
}

/// Guard that kills the command when the caller drops the reply's future while the main
/// process runs. Processes that a finished command left in the background stay until a reset.
struct KillOnDrop<'a>(Option<(ProcessGroup, Option<&'a CommandCgroup>)>);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let Some((group, cgroup)) = self.0 else {
            return;
        };
        group.kill_now();
        if let Some(cgroup) = cgroup {
            // The drop cannot report; a failed kill leaves the processes to the next reset.
            let _ = cgroup.kill();
        }
    }
}

/// Refuses a command string that bash cannot hold: a NUL byte would end it early.
fn check_script(cmd: &str) -> Result<()> {
    match cmd.find('\0') {
        Some(offset) => Err(Error::invalid_request(format!(
            "`cmd` contains a NUL byte at byte {offset}; bash cannot run it, so remove it"
        ))),
        None => Ok(()),
    }
}

/// Resolves the working folder, writes a long script to a memory file and creates the command's
/// cgroup, on a blocking thread.
async fn prepare(
    root: &Path,
    id: &WorkspaceId,
    working_dir: Option<String>,
    cmd: String,
    tracker: Arc<Tracker>,
) -> Result<Prepared> {
    let (root, id) = (root.to_path_buf(), id.clone());
    task::spawn_blocking(move || {
        // The root, too, is checked: a command may have removed it.
        let working_dir = working_dir.as_deref().unwrap_or("/");
        let working_dir = WorkspacePath::resolve_directory(&root, working_dir)?.host_path();
        // `MAX_ARG_STRLEN` counts the terminating NUL.
        let script = if cmd.len() < max_argument_bytes() {
            Script::Argument(cmd)
        } else {
            let file = script_file(&cmd).map_err(cannot("write the command to a memory file"))?;
            Script::File(file)
        };
        let cgroup = tracker.start_command_blocking(&id)?;
        Ok(Prepared {
            working_dir,
            script,
            cgroup,
        })
    })
    .await?
}

/// Writes `cmd` to a close-on-exec memory file, numbered 3 or above so that the child's
/// standard streams cannot take its number, and rewinds it.
fn script_file(cmd: &str) -> io::Result<File> {
    let memory = nix::sys::memfd::memfd_create("derrick-command", MFdFlags::MFD_CLOEXEC)?;
    let memory = if memory.as_raw_fd() < 3 {
        let duplicate = nix::fcntl::fcntl(&memory, FcntlArg::F_DUPFD_CLOEXEC(3))?;
        // SAFETY: `F_DUPFD_CLOEXEC` returned a new descriptor that nothing else owns.
        unsafe { OwnedFd::from_raw_fd(duplicate) }
    } else {
        memory
    };
    let mut file = File::from(memory);
    file.write_all(cmd.as_bytes())?;
    file.rewind()?;
    Ok(file)
}

/// Starts the command with its output pipe, records its process group, and registers it so that
/// the orphan reaper leaves it to tokio.
fn start(
    prepared: &Prepared,
    environment: BTreeMap<OsString, OsString>,
) -> Result<(Child, Receiver, ProcessGroup, reaper::Registration)> {
    let (sender, receiver) = pipe::pipe().map_err(cannot("create an output pipe"))?;
    let (child, registration) =
        reaper::spawn_registered(|| spawn(prepared, environment, sender), Child::id)?;
    let leader = child.id().ok_or_else(|| {
        Error::internal(
            "cannot record the command's process",
            "it was already reaped",
        )
    })?;
    // Reading /proc touches no disk, so this read does not block the runtime thread.
    let group = ProcessGroup::of_leader(leader).map_err(cannot("record the command's process"))?;
    Ok((child, receiver, group, registration))
}

fn spawn(
    prepared: &Prepared,
    environment: BTreeMap<OsString, OsString>,
    sender: pipe::Sender,
) -> Result<Child> {
    let stdout = sender
        .into_blocking_fd()
        .map_err(cannot("connect the command's output"))?;
    let stderr = stdout
        .try_clone()
        .map_err(cannot("connect the command's output"))?;

    let (arguments, script) = bash_arguments(&prepared.script);
    let size = arguments_size(&arguments, &environment);
    let procs = prepared
        .cgroup
        .as_ref()
        .map(CommandCgroup::procs_descriptor);

    let mut command = Command::new(bash());
    command
        .args(arguments)
        .current_dir(&prepared.working_dir)
        .env_clear()
        .envs(environment)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);

    // SAFETY: the closure runs in the forked child before `exec`, where only async-signal-safe
    // calls are allowed. It allocates nothing and makes two system calls, `write` and `fcntl`, on
    // descriptors that `prepared` keeps open in the parent until `spawn` has returned, which is
    // what `enter_child` requires.
    unsafe {
        command.pre_exec(move || enter_child(procs, script));
    }

    // The command owns our copies of the pipe's write ends and is dropped when this function
    // returns. After that, the pipe ends when the command's processes close their copies.
    command.spawn().map_err(|error| spawn_error(error, size))
}

/// Returns bash's arguments for `script`, and the descriptor that the child must inherit.
fn bash_arguments(script: &Script) -> ([OsString; 2], Option<RawFd>) {
    match script {
        Script::Argument(cmd) => (["-c".into(), cmd.into()], None),
        Script::File(file) => {
            let descriptor = file.as_raw_fd();
            (["-c".into(), launcher(descriptor).into()], Some(descriptor))
        }
    }
}

/// Returns the bytes that the kernel counts against `ARG_MAX` for these arguments and this
/// environment, for the error message: each string with its NUL.
fn arguments_size(arguments: &[OsString], environment: &BTreeMap<OsString, OsString>) -> usize {
    let arguments: usize = arguments.iter().map(|argument| argument.len() + 1).sum();
    let variables: usize = environment
        .iter()
        .map(|(name, value)| name.len() + value.len() + 2)
        .sum();
    arguments + variables
}

/// Runs in the child before `exec`: enters the command's cgroup, so that every process the
/// command starts is in it from the first instruction on, and lets bash inherit a script file.
///
/// # Safety
/// `procs` and `script` are open descriptors, and stay open until the call has returned.
unsafe fn enter_child(procs: Option<RawFd>, script: Option<RawFd>) -> io::Result<()> {
    if let Some(procs) = procs {
        // SAFETY: the caller keeps `procs` open, see above.
        cgroup::enter(unsafe { BorrowedFd::borrow_raw(procs) })?;
    }
    if let Some(script) = script {
        // SAFETY: as above for `script`. Clearing close-on-exec here, in the child, keeps other
        // commands that start at the same time from inheriting it.
        let script = unsafe { BorrowedFd::borrow_raw(script) };
        nix::fcntl::fcntl(script, FcntlArg::F_SETFD(FdFlag::empty()))?;
    }
    Ok(())
}

/// Returns the `bash -c` string that reads the command from descriptor `script`, closes it so
/// that no process of the command inherits it, and runs the command with `eval`. `|| :` keeps an
/// `errexit` from the request's `SHELLOPTS` from ending the launcher at the end of the file.
fn launcher(script: RawFd) -> String {
    format!(
        "IFS= read -r -d '' -u {script} {SCRIPT_VARIABLE} || :; exec {script}<&-; \
         eval \"unset {SCRIPT_VARIABLE}; ${SCRIPT_VARIABLE}\""
    )
}

/// Maps a failed start: arguments and environment over the kernel's total limit (`E2BIG`)
/// are the request's mistake; anything else is internal.
fn spawn_error(error: io::Error, size: usize) -> Error {
    if error.raw_os_error() == Some(Errno::E2BIG as i32) {
        return Error::invalid_request(format!(
            "the command's environment and arguments are {size} bytes, over the kernel's limit \
             for a new process (`getconf ARG_MAX`); pass large values in a file written with \
             write_file"
        ));
    }
    cannot("start bash")(error)
}

/// Kills a timed-out command: its cgroup, or without one its group and descendants. The group
/// is not killed before the descendants are found: its processes are their parents.
async fn kill_timed_out(group: ProcessGroup, cgroup: Option<&CommandCgroup>) -> Result<()> {
    let Some(cgroup) = cgroup else {
        return task::spawn_blocking(move || processes::kill_tree_blocking(group)).await?;
    };
    group.kill_now();
    // Writing one cgroup file touches no disk, so it does not block the runtime thread.
    cgroup
        .kill()
        .map_err(cannot("kill the timed-out command's cgroup"))
}

/// Returns the path of bash, looked up once in the provider's `PATH` and then the default one.
/// A request's own `PATH` then cannot keep the command from starting.
pub(super) fn bash() -> &'static Path {
    static BASH: OnceLock<PathBuf> = OnceLock::new();
    BASH.get_or_init(|| {
        let own = std::env::var_os("PATH").unwrap_or_default();
        let folders = std::env::split_paths(&own).chain(std::env::split_paths(DEFAULT_PATH));
        let mut candidates = folders.map(|folder| folder.join("bash"));
        candidates
            .find(|candidate| candidate.is_file())
            .unwrap_or_else(|| PathBuf::from("bash"))
    })
}

/// Builds the command's environment: the allowlist, `HOME` at the workspace root,
/// `GIT_TERMINAL_PROMPT=0`, the request's variables, and last the workspace id marker, which a
/// request cannot override because `kill_processes` finds escaped processes by it.
///
/// # Errors
/// `invalid_request` for a variable that the kernel would reject: an empty name, a name with `=`
/// or NUL, a value with NUL, or an entry over `MAX_ARG_STRLEN`.
fn environment(
    root: &Path,
    id: &WorkspaceId,
    requested: &BTreeMap<String, String>,
) -> Result<BTreeMap<OsString, OsString>> {
    let mut environment = BTreeMap::new();
    let path = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    environment.insert("PATH".into(), path);
    for name in PASSED_VARIABLES {
        if let Some(value) = std::env::var_os(name) {
            environment.insert(name.into(), value);
        }
    }
    environment.insert("HOME".into(), root.into());
    environment.insert("GIT_TERMINAL_PROMPT".into(), "0".into());
    for (name, value) in requested {
        check_variable(name, value)?;
        environment.insert(name.into(), value.into());
    }
    environment.insert(WORKSPACE_ID_VARIABLE.into(), id.as_str().into());
    Ok(environment)
}

fn check_variable(name: &str, value: &str) -> Result<()> {
    if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
        return Err(Error::invalid_request(format!(
            "invalid `env` entry `{}`: names are not empty and hold no `=` or NUL, values hold \
             no NUL",
            name.escape_debug()
        )));
    }
    let size = name.len() + value.len() + 2;
    let limit = max_argument_bytes();
    if size > limit {
        return Err(Error::invalid_request(format!(
            "`env` variable `{name}` is {size} bytes, over the kernel's limit of {limit} bytes \
             for one variable; pass large values in a file written with write_file"
        )));
    }
    Ok(())
}

/// Returns the kernel's limit on one argument or environment entry, its NUL included:
/// `MAX_ARG_STRLEN`, 32 pages.
pub(super) fn max_argument_bytes() -> usize {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|page| usize::try_from(page).ok())
        .unwrap_or(FALLBACK_PAGE_BYTES);
    MAX_ARGUMENT_PAGES * page
}

/// Reads output until the main process exits (returning its status) or the deadline passes
/// (returning `None`).
async fn read_until_exit(
    child: &mut Child,
    receiver: &mut Receiver,
    output: &mut TailBuffer,
    deadline: Option<Instant>,
) -> Result<Option<ExitStatus>> {
    let mut chunk = vec![0; READ_CHUNK_BYTES];
    let mut pipe_open = true;
    let expiry = async {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expiry);
    loop {
        tokio::select! {
            read = receiver.read(&mut chunk), if pipe_open => {
                match read.map_err(cannot("read the command's output"))? {
                    0 => pipe_open = false,
                    count => output.push(&chunk[..count]),
                }
            }
            status = child.wait() => {
                return Ok(Some(status.map_err(cannot("wait for the command"))?));
            }
            () = &mut expiry => return Ok(None),
        }
    }
}

/// Reads what is left in the pipe, for at most [`OUTPUT_DRAIN_GRACE`].
async fn drain(mut receiver: Receiver, output: &mut TailBuffer) {
    let deadline = Instant::now() + OUTPUT_DRAIN_GRACE;
    let mut chunk = vec![0; READ_CHUNK_BYTES];
    loop {
        match tokio::time::timeout_at(deadline, receiver.read(&mut chunk)).await {
            Ok(Ok(count @ 1..)) => output.push(&chunk[..count]),
            // The end of the pipe or a read error: the output so far is what the reply gets.
            Ok(_) => return,
            Err(_) => break,
        }
    }

    // A background process (`server &`) still has the pipe open. Reading on and discarding keeps
    // its writes from failing with SIGPIPE, which would kill it; the task ends with the last
    // writer, at the latest when a reset or destroy kills the workspace's processes.
    tokio::spawn(async move { while let Ok(1..) = receiver.read(&mut chunk).await {} });
}

/// Returns the exit code, or 128 + the signal for a process killed by one, as shells do.
fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}
