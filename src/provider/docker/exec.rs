//! Commands in a workspace container: one exec per command, without a TTY, its output kept as the
//! local provider keeps it.
//!
//! The exec runs a small wrapper that closes stdin, sends stderr into stdout (one stream, so the
//! output keeps the order in which it was written) and replaces itself with `/bin/sh -c CMD`. Each
//! exec is a session leader in the container, and its environment carries a marker unique to the
//! command (`DERRICK_COMMAND_ID`).
//!
//! The Docker API cannot kill an exec. So when the timeout expires, derrick replies at once and
//! starts a second exec. It finds the processes that carry the marker and every process in their
//! sessions and process groups, sends them SIGTERM, waits [`KILL_GRACE`], and sends SIGKILL to
//! what is left.
//! A process that both leaves the command's session and clears its environment escapes that
//! search; it ends at the next reset or destroy, which replace the container.
//!
//! The attached stream can stay open after the main process has ended, because a background
//! process (`server &`) may hold stdout. While it is open, the exec's state is polled every
//! [`EXIT_POLL_INTERVAL`], and once the main process has ended the stream is read for at most
//! `OUTPUT_DRAIN_GRACE` before the reply goes out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use futures_util::StreamExt;
use tokio::time::Instant;
use tracing::warn;

use super::WORKSPACE_ROOT;
use super::client::{API_TIMEOUT, TRANSFER_TIMEOUT, bounded, bounded_optional, failed};
use crate::engine::{ExecOutput, ExecRequest, WorkspaceId};
use crate::error::{Error, Result};
use crate::provider::output::{
    MAX_OUTPUT_BYTES, OUTPUT_DRAIN_GRACE, TIMEOUT_EXIT_CODE, TailBuffer,
};

/// Time between SIGTERM and SIGKILL for a timed-out command. One second lets a program that
/// handles SIGTERM remove its temporary files, and keeps the whole kill well within the two
/// seconds after the reply in which no process of the command may be left.
pub const KILL_GRACE: Duration = Duration::from_secs(1);

/// How often a command's state is read while its output stream is still open. The stream
/// usually ends with the main process, so this only sets how late the reply of a command that
/// leaves a background process holding stdout can be.
const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How often the state is read after the stream has ended; the engine records the exit code a
/// few milliseconds after the stream ends.
const EXIT_POLL_FAST: Duration = Duration::from_millis(5);

/// The exit code reported when the container went away under a running command (a reset or a
/// destroy): 128 + SIGKILL, as if the process had been killed, which it was.
const KILLED_EXIT_CODE: i32 = 137;

/// The variable that marks every process of one command.
const COMMAND_ID_VARIABLE: &str = "DERRICK_COMMAND_ID";

/// The variable that carries the workspace id into every command, as in the local provider.
const WORKSPACE_ID_VARIABLE: &str = "DERRICK_WORKSPACE_ID";

/// Variables passed on from derrick's environment when set; all others stay out of containers.
const PASSED_VARIABLES: [&str; 3] = ["LANG", "LC_ALL", "TZ"];

/// The wrapper around a command; `$1` is the command string.
const WRAPPER: &str = "exec </dev/null 2>&1; exec /bin/sh -c \"$1\"";

/// Largest command string, with its NUL: Linux's limit on one argument (`MAX_ARG_STRLEN`, 32
/// pages of 4 KiB), which `/bin/sh -c` inside the container is subject to.
const MAX_COMMAND_BYTES: usize = 128 * 1024 - 1;

/// Signals processes in a container, run as `sh -c KILL_SCRIPT sh MODE MARKER GRACE`.
///
/// MODE `command` selects the processes whose environment contains `DERRICK_COMMAND_ID=MARKER`
/// and every process in their sessions and process groups; MODE `all` selects every process
/// outside session 1 (PID 1 and the keep-alive shell). Both skip the script's own session. The
/// selection runs again before SIGKILL, so children started during the grace period are found.
const KILL_SCRIPT: &str = r#"mode=$1 marker=$2 grace=$3 own=$$
targets() {
    groups=" "
    if [ "$mode" = command ]; then
        for entry in /proc/[0-9]*; do
            grep -qxzF "DERRICK_COMMAND_ID=$marker" "$entry/environ" 2>/dev/null || continue
            read -r stat < "$entry/stat" 2>/dev/null || continue
            set -- ${stat##*) }
            groups="$groups$3 $4 "
        done
    fi
    for entry in /proc/[0-9]*; do
        read -r stat < "$entry/stat" 2>/dev/null || continue
        set -- ${stat##*) }
        [ "$4" = "$own" ] && continue
        if [ "$mode" = all ]; then
            [ "$4" = 1 ] || echo "${entry#/proc/}"
        else
            case "$groups" in *" $3 "*|*" $4 "*) echo "${entry#/proc/}" ;; esac
        fi
    done
}
pids=$(targets)
[ -n "$pids" ] && kill -TERM $pids 2>/dev/null
[ "$grace" = 0 ] || sleep "$grace"
pids=$(targets)
[ -n "$pids" ] && kill -KILL $pids 2>/dev/null
exit 0"#;

/// Counts a workspace's running commands; `kill_processes` has work to do only when one runs.
#[derive(Debug, Default)]
pub(super) struct Running(AtomicUsize);

impl Running {
    /// Tells whether a command of the workspace is running.
    pub(super) fn any(&self) -> bool {
        self.0.load(Ordering::SeqCst) > 0
    }
}

/// Runs `request` in `container`, in the folder `working_dir` of the container.
///
/// # Errors
/// `invalid_request` for a command over the argument limit; `provider_unavailable` when the
/// engine goes away; `internal` when the engine rejects the exec.
pub(super) async fn run(
    docker: &Docker,
    container: &str,
    id: &WorkspaceId,
    request: ExecRequest,
    working_dir: String,
    running: &Arc<Running>,
) -> Result<ExecOutput> {
    check_command(&request.cmd)?;
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let options = CreateExecOptions {
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        attach_stdin: Some(false),
        tty: Some(false),
        env: Some(environment(id, &marker, &request.env)),
        cmd: Some(vec![
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            WRAPPER.to_owned(),
            "sh".to_owned(),
            request.cmd,
        ]),
        working_dir: Some(working_dir),
        ..Default::default()
    };
    let created = bounded(
        "create exec",
        container,
        API_TIMEOUT,
        docker.create_exec(container, options),
    )
    .await?;
    let started = Instant::now();
    let attached = bounded(
        "start exec",
        container,
        API_TIMEOUT,
        docker.start_exec(&created.id, None::<StartExecOptions>),
    )
    .await?;
    let StartExecResults::Attached { mut output, .. } = attached else {
        return Err(Error::Internal(format!(
            "docker started exec {} detached although it was asked to attach",
            created.id
        )));
    };

    running.0.fetch_add(1, Ordering::SeqCst);
    let mut guard = KillOnDrop {
        docker: docker.clone(),
        container: container.to_owned(),
        marker: marker.clone(),
        running: Arc::clone(running),
        armed: true,
    };
    let mut buffer = TailBuffer::new(MAX_OUTPUT_BYTES);
    let deadline = request.timeout.map(|timeout| started + timeout);
    let ended = wait_for_exit(docker, &created.id, &mut output, &mut buffer, deadline).await;
    let (exit_code, timed_out) = match ended? {
        Some(exit_code) => {
            guard.armed = false;
            (exit_code, false)
        }
        // The guard starts the kill as it is dropped, so the reply does not wait for it.
        None => (TIMEOUT_EXIT_CODE, true),
    };
    drop(guard);

    let (text, truncated) = buffer.into_text();
    Ok(ExecOutput {
        output: text,
        exit_code,
        timed_out,
        truncated,
        duration: started.elapsed(),
    })
}

/// Sends signals to processes of `container` and waits for the signalling exec to end: every
/// process of the workspace's commands when `marker` is `None`, else those of one command.
pub(super) async fn kill(
    docker: &Docker,
    container: &str,
    marker: Option<&str>,
    grace: Duration,
) -> Result<()> {
    let (mode, marker) = match marker {
        Some(marker) => ("command", marker),
        None => ("all", ""),
    };
    let cmd = ["/bin/sh", "-c", KILL_SCRIPT, "sh", mode, marker];
    let mut cmd: Vec<String> = cmd.iter().map(|part| (*part).to_owned()).collect();
    cmd.push(grace.as_secs().to_string());
    // A container that is gone has no processes left to kill.
    helper(docker, container, cmd, API_TIMEOUT + grace).await?;
    Ok(())
}

/// Removes the folder `path` of the container with `rm -rf`.
///
/// # Errors
/// `internal` naming the folder when `rm` fails or the container is gone.
pub(super) async fn remove_tree(docker: &Docker, container: &str, path: &str) -> Result<()> {
    let cmd = ["rm", "-rf", "--", path].map(str::to_owned).to_vec();
    let Some((exec, message)) = helper(docker, container, cmd, TRANSFER_TIMEOUT).await? else {
        return Err(Error::Internal(format!(
            "cannot remove `{path}`: container {container} is gone"
        )));
    };
    if exit_code(docker, &exec).await? == Some(0) {
        return Ok(());
    }
    Err(Error::Internal(format!(
        "cannot remove `{path}` in container {container}: {}",
        String::from_utf8_lossy(&message).trim()
    )))
}

/// Runs one of derrick's own commands in `container` and waits up to `limit` for its output
/// to end. Returns the exec id and the output, or `None` when the container does not exist.
async fn helper(
    docker: &Docker,
    container: &str,
    cmd: Vec<String>,
    limit: Duration,
) -> Result<Option<(String, Vec<u8>)>> {
    let options = CreateExecOptions {
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        cmd: Some(cmd),
        ..Default::default()
    };
    let Some(created) = bounded_optional(
        "create exec",
        container,
        API_TIMEOUT,
        docker.create_exec(container, options),
    )
    .await?
    else {
        return Ok(None);
    };
    let started = bounded(
        "start exec",
        container,
        API_TIMEOUT,
        docker.start_exec(&created.id, None::<StartExecOptions>),
    )
    .await?;
    let mut message = Vec::new();
    if let StartExecResults::Attached { mut output, .. } = started {
        let read = async {
            while let Some(Ok(chunk)) = output.next().await {
                message.extend_from_slice(&chunk.into_bytes());
            }
        };
        if tokio::time::timeout(limit, read).await.is_err() {
            return Err(Error::ProviderUnavailable(format!(
                "a helper command in container {container} did not end within {} s; check \
                 that dockerd is responsive",
                limit.as_secs()
            )));
        }
    }
    Ok(Some((created.id, message)))
}

/// Kills a command whose reply was abandoned (a timeout, or a client that went away) unless
/// disarmed, and counts the command as ended.
struct KillOnDrop {
    docker: Docker,
    container: String,
    marker: String,
    running: Arc<Running>,
    armed: bool,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.running.0.fetch_sub(1, Ordering::SeqCst);
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (docker, container, marker) = (
            self.docker.clone(),
            self.container.clone(),
            self.marker.clone(),
        );
        runtime.spawn(async move {
            if let Err(error) = kill(&docker, &container, Some(&marker), KILL_GRACE).await {
                warn!(container = %container, error = %error, "cannot kill a timed-out command");
            }
        });
    }
}

/// Reads output until the main process has ended (returning its exit code) or the deadline has
/// passed (returning `None`).
async fn wait_for_exit(
    docker: &Docker,
    exec: &str,
    output: &mut (impl futures_util::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Unpin),
    buffer: &mut TailBuffer,
    deadline: Option<Instant>,
) -> Result<Option<i32>> {
    let expiry = async {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expiry);
    let mut open = true;
    let mut next_poll = Instant::now() + EXIT_POLL_INTERVAL;
    loop {
        tokio::select! {
            chunk = output.next(), if open => match chunk {
                Some(Ok(chunk)) => buffer.push(&chunk.into_bytes()),
                Some(Err(error)) => return Err(failed("read exec output", exec, error)),
                None => {
                    open = false;
                    next_poll = Instant::now();
                }
            },
            () = tokio::time::sleep_until(next_poll) => {
                if let Some(exit_code) = exit_code(docker, exec).await? {
                    if open {
                        drain(output, buffer).await;
                    }
                    return Ok(Some(exit_code));
                }
                let interval = if open { EXIT_POLL_INTERVAL } else { EXIT_POLL_FAST };
                next_poll = Instant::now() + interval;
            }
            () = &mut expiry => return Ok(None),
        }
    }
}

/// Returns the exit code of a finished exec, `None` while it runs, and [`KILLED_EXIT_CODE`]
/// when the exec is gone with its container.
async fn exit_code(docker: &Docker, exec: &str) -> Result<Option<i32>> {
    let inspected =
        bounded_optional("inspect exec", exec, API_TIMEOUT, docker.inspect_exec(exec)).await?;
    let Some(inspected) = inspected else {
        return Ok(Some(KILLED_EXIT_CODE));
    };
    if inspected.running == Some(true) {
        return Ok(None);
    }
    let code = inspected.exit_code.unwrap_or(i64::from(KILLED_EXIT_CODE));
    Ok(Some(i32::try_from(code).unwrap_or(KILLED_EXIT_CODE)))
}

/// Reads what is left of the stream for at most `OUTPUT_DRAIN_GRACE`. The rest belongs to
/// background processes and is dropped with the stream.
async fn drain(
    output: &mut (impl futures_util::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Unpin),
    buffer: &mut TailBuffer,
) {
    let deadline = Instant::now() + OUTPUT_DRAIN_GRACE;
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline, output.next()).await {
        buffer.push(&chunk.into_bytes());
    }
}

fn check_command(cmd: &str) -> Result<()> {
    if let Some(offset) = cmd.find('\0') {
        return Err(Error::invalid_request(format!(
            "`cmd` contains a NUL byte at byte {offset}; the shell cannot run it, so remove it"
        )));
    }
    // TODO: pass longer commands on the exec's stdin, as the local provider passes them through
    // a memory file. That needs a half-close of the attached connection, which bollard lacks.
    if cmd.len() > MAX_COMMAND_BYTES {
        return Err(Error::invalid_request(format!(
            "`cmd` is {} bytes, over the limit of {MAX_COMMAND_BYTES} bytes for one argument in \
             a docker workspace; write the script with write_file and run it",
            cmd.len()
        )));
    }
    Ok(())
}

/// Builds the exec's environment on top of the image's: the allowlist from derrick's own
/// environment, `HOME` at the workspace root, `GIT_TERMINAL_PROMPT=0`, the request's variables,
/// and last the two markers, which a request cannot override.
fn environment(
    id: &WorkspaceId,
    marker: &str,
    requested: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut environment = BTreeMap::new();
    for name in PASSED_VARIABLES {
        if let Ok(value) = std::env::var(name) {
            environment.insert(name.to_owned(), value);
        }
    }
    environment.insert("HOME".to_owned(), WORKSPACE_ROOT.to_owned());
    environment.insert("GIT_TERMINAL_PROMPT".to_owned(), "0".to_owned());
    environment.extend(requested.clone());
    environment.insert(WORKSPACE_ID_VARIABLE.to_owned(), id.to_string());
    environment.insert(COMMAND_ID_VARIABLE.to_owned(), marker.to_owned());
    environment
        .into_iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect()
}
