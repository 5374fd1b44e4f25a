//! Commands in a workspace: `bash -c` in a process group of its own, with one output pipe.
//!
//! stdout and stderr share one pipe, so the output keeps the order in which it was written. stdin
//! is `/dev/null` and there is no terminal. The environment is cleared and rebuilt from an
//! allowlist, the workspace's own values and the request's. A timeout kills the whole group.
//!
//! The main process ending does not end the pipe: a background process (`server &`) may hold it
//! open for as long as it runs. So after the main process ends, the pipe is read for at most
//! [`OUTPUT_DRAIN_GRACE`] and the reply is sent with what arrived.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe::{self, Receiver};
use tokio::process::{Child, Command};
use tokio::task;
use tokio::time::Instant;

use super::cannot;
use super::processes::{ProcessGroup, WORKSPACE_ID_VARIABLE};
use crate::engine::{ExecOutput, ExecRequest, WorkspaceId};
use crate::error::{Error, Result};
use crate::paths::WorkspacePath;

/// Maximum output of one reply: the last 1 MiB of what the command wrote.
///
/// An agent needs the end of a long log (the failing test, the compiler's summary). 1 MiB is
/// tens of thousands of lines, by estimate more text than an agent's context takes in at once.
/// The cap also bounds memory, because a command's buffer never grows past it.
pub const MAX_OUTPUT_BYTES: usize = 1024 * 1024;

/// How long output is still collected after the main process has ended (or was killed).
///
/// What the ended processes wrote is already in the pipe and is read at once. Later output comes
/// from background processes that outlive the command, and waiting for them would delay every
/// reply of a command that starts a server. 100 ms collects the former and bounds the latter.
pub const OUTPUT_DRAIN_GRACE: Duration = Duration::from_millis(100);

/// The exit code of a command killed by its timeout, as `timeout(1)` reports it.
pub const TIMEOUT_EXIT_CODE: i32 = 124;

/// `PATH` for commands when the provider process has none: the usual system folders.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Variables passed on from the provider's environment when set; all others are dropped, so no
/// credential of the provider process reaches a workspace.
const PASSED_VARIABLES: [&str; 3] = ["LANG", "LC_ALL", "TZ"];

/// How much is read from the pipe at once.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Runs `request` in the workspace whose root is `root`; `on_spawn` records the new group.
///
/// # Errors
/// `invalid_request` when `working_dir` is missing or not a folder; `internal` when bash cannot
/// be started or the pipe fails.
pub(super) async fn run(
    root: &Path,
    id: &WorkspaceId,
    request: ExecRequest,
    on_spawn: impl FnOnce(ProcessGroup),
) -> Result<ExecOutput> {
    let working_dir = resolve_working_dir(root, request.working_dir.clone()).await?;
    let started = Instant::now();
    let (mut child, mut receiver, group) = start(root, &working_dir, id, &request)?;
    on_spawn(group);
    let mut guard = KillOnDrop(Some(group));

    let mut output = TailBuffer::new(MAX_OUTPUT_BYTES);
    let deadline = request.timeout.map(|timeout| started + timeout);
    let ended = read_until_exit(&mut child, &mut receiver, &mut output, deadline).await?;
    let (exit_code, timed_out) = match ended {
        Some(status) => (exit_code(status), false),
        None => {
            group.kill_now();
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

/// Guard that kills the command's group when the caller drops the reply's future while the main
/// process runs. Processes that a finished command left in the background stay until a reset.
struct KillOnDrop(Option<ProcessGroup>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(group) = self.0 {
            group.kill_now();
        }
    }
}

/// The last `limit` bytes of a stream, and whether earlier ones were dropped.
#[derive(Debug)]
struct TailBuffer {
    bytes: VecDeque<u8>,
    limit: usize,
    truncated: bool,
}

impl TailBuffer {
    fn new(limit: usize) -> TailBuffer {
        TailBuffer {
            bytes: VecDeque::new(),
            limit,
            truncated: false,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend(chunk);
        let excess = self.bytes.len().saturating_sub(self.limit);
        if excess > 0 {
            self.bytes.drain(..excess);
            self.truncated = true;
        }
    }

    /// Decodes the bytes, replacing invalid UTF-8 with U+FFFD, and keeps the result within the
    /// limit; returns it with the truncation flag.
    fn into_text(self) -> (String, bool) {
        let mut bytes = Vec::from(self.bytes);
        let mut truncated = self.truncated;
        if truncated {
            // The cut may have split a character: drop its remaining bytes rather than show
            // U+FFFD for them.
            let partial = bytes
                .iter()
                .take(3)
                .take_while(|byte| **byte & 0xC0 == 0x80)
                .count();
            bytes.drain(..partial);
        }
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if text.len() > self.limit {
            // Each invalid byte became three bytes of U+FFFD; cut at a character boundary.
            let mut cut = text.len() - self.limit;
            while !text.is_char_boundary(cut) {
                cut += 1;
            }
            text.drain(..cut);
            truncated = true;
        }
        (text, truncated)
    }
}

/// Resolves `working_dir` inside the root and checks that it is an existing folder.
async fn resolve_working_dir(root: &Path, working_dir: Option<String>) -> Result<PathBuf> {
    let Some(working_dir) = working_dir else {
        return Ok(root.to_path_buf());
    };
    let root = root.to_path_buf();
    task::spawn_blocking(move || working_dir_blocking(&root, &working_dir)).await?
}

fn working_dir_blocking(root: &Path, working_dir: &str) -> Result<PathBuf> {
    let host = WorkspacePath::resolve(root, working_dir, None)?.host_path();
    match std::fs::metadata(&host) {
        Ok(metadata) if metadata.is_dir() => Ok(host),
        Ok(_) => Err(Error::invalid_request(format!(
            "working_dir `{working_dir}` is not a directory in the workspace; \
             name a folder or omit working_dir"
        ))),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            Err(Error::invalid_request(format!(
                "working_dir `{working_dir}` does not exist in the workspace; \
                 create it first or omit working_dir"
            )))
        }
        Err(error) => Err(cannot(format!("inspect working_dir `{working_dir}`"))(
            error,
        )),
    }
}

/// Starts the command with its output pipe and records its process group.
fn start(
    root: &Path,
    working_dir: &Path,
    id: &WorkspaceId,
    request: &ExecRequest,
) -> Result<(Child, Receiver, ProcessGroup)> {
    let (sender, receiver) = pipe::pipe().map_err(cannot("create an output pipe"))?;
    let child = spawn(root, working_dir, id, request, sender)?;
    let leader = child.id().ok_or_else(|| {
        Error::internal(
            "cannot record the command's process",
            "it was already reaped",
        )
    })?;
    // Reading /proc touches no disk, so this read does not block the runtime thread.
    let group = ProcessGroup::of_leader(leader).map_err(cannot("record the command's process"))?;
    Ok((child, receiver, group))
}

fn spawn(
    root: &Path,
    working_dir: &Path,
    id: &WorkspaceId,
    request: &ExecRequest,
    sender: pipe::Sender,
) -> Result<Child> {
    let stdout = sender
        .into_blocking_fd()
        .map_err(cannot("connect the command's output"))?;
    let stderr = stdout
        .try_clone()
        .map_err(cannot("connect the command's output"))?;
    // The command owns our copies of the pipe's write ends and is dropped when this function
    // returns. After that, the pipe ends when the command's processes close their copies.
    Command::new(bash())
        .arg("-c")
        .arg(&request.cmd)
        .current_dir(working_dir)
        .env_clear()
        .envs(environment(root, id, &request.env))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .map_err(cannot("start bash"))
}

/// Returns the path of bash, looked up once in the provider's `PATH` and then the default one.
/// A request's own `PATH` then cannot keep the command from starting.
fn bash() -> &'static Path {
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
fn environment(
    root: &Path,
    id: &WorkspaceId,
    requested: &BTreeMap<String, String>,
) -> BTreeMap<OsString, OsString> {
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
        environment.insert(name.into(), value.into());
    }
    environment.insert(WORKSPACE_ID_VARIABLE.into(), id.as_str().into());
    environment
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

    // A background process (`server &`) still holds the pipe. Reading on and discarding keeps
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

#[cfg(test)]
mod tests {
    use super::*;

    fn check(limit: usize, chunks: &[&[u8]], expected: (&str, bool)) {
        let mut buffer = TailBuffer::new(limit);
        for chunk in chunks {
            buffer.push(chunk);
        }
        let (text, truncated) = buffer.into_text();
        assert_eq!((text.as_str(), truncated), expected, "chunks {chunks:?}");
    }

    #[test]
    fn tail_buffer_keeps_the_end() {
        check(4, &[b"ab", b"cd"], ("abcd", false));
        check(4, &[b"ab", b"cde"], ("bcde", true));
        check(4, &[b"abcdefgh"], ("efgh", true));
        check(4, &[b"ab", b"", b"cdefgh", b"i"], ("fghi", true));
        check(4, &[], ("", false));
    }

    #[test]
    fn tail_buffer_replaces_invalid_utf8() {
        check(8, &[b"a\xffb\n"], ("a\u{fffd}b\n", false));
        check(8, &[b"no newline"], (" newline", true));
        check(4, &["\u{e9}\u{e9}".as_bytes()], ("\u{e9}\u{e9}", false));
        check(3, &["x\u{e9}\u{e9}".as_bytes()], ("\u{e9}", true));
        check(4, &["x\u{20ac}yz".as_bytes()], ("yz", true));
        check(4, &[b"\xff\xff\xff"], ("\u{fffd}", true));
    }
}
