//! `derrick worker` processes and `remote_nats` controllers in front of them, on a `nats-server`
//! of their own. Each worker has its own cache and state folders, because the state folder is
//! locked per process.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use super::nats::NatsServer;
use super::{Derrick, NATS_READY, read_log};

/// How long a worker may take to start serving.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// A running `derrick worker -p local`; SIGTERM and wait on drop.
pub struct Worker {
    child: Child,
    id: String,
    log: Arc<Mutex<String>>,
    folder: TempDir,
    flags: Vec<String>,
}

/// A NATS server, the workers on it, and (with `controller`) an HTTP controller in front.
pub struct Cluster {
    pub workers: Vec<Worker>,
    pub server: NatsServer,
}

impl Worker {
    /// Starts worker `id` on `server` with `config` and waits until it serves.
    pub fn start(server: &NatsServer, config: &Value, id: &str) -> Worker {
        Self::start_with(server, config, id, &[])
    }

    /// Starts worker `id` with extra flags, such as `--max-workspaces 1`.
    pub fn start_with(server: &NatsServer, config: &Value, id: &str, flags: &[&str]) -> Worker {
        let folder = tempfile::tempdir().expect("temporary folder");
        Self::start_in(folder, server, config, id, flags)
    }

    /// Starts worker `id` with `flags` on new folders and returns its exit status and log once
    /// it exits, for a worker that must refuse to start.
    pub fn run_to_exit(
        server: &NatsServer,
        config: &Value,
        id: &str,
        flags: &[&str],
    ) -> (ExitStatus, String) {
        let folder = tempfile::tempdir().expect("temporary folder");
        let mut child = Self::spawn(&folder, server, config, id, flags);
        let stderr = child.stderr.take().expect("stderr is piped");
        let (log, _ready_rx) = read_log(stderr, NATS_READY);
        let deadline = Instant::now() + START_DEADLINE;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for the worker") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "worker {id} did not exit; log:\n{}",
                    log.lock().expect("log lock")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The log reader drops its handle when the pipe closes, a moment after the exit.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&log) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = log.lock().expect("log lock").clone();
        (status, log)
    }

    /// Starts worker `id` on the cache and state folders in `folder`.
    fn start_in(
        folder: TempDir,
        server: &NatsServer,
        config: &Value,
        id: &str,
        flags: &[&str],
    ) -> Worker {
        let mut child = Self::spawn(&folder, server, config, id, flags);
        let stderr = child.stderr.take().expect("stderr is piped");
        let (log, ready_rx) = read_log(stderr, NATS_READY);
        if ready_rx.recv_timeout(START_DEADLINE).is_err() {
            let _ = child.kill();
            panic!(
                "worker {id} did not start serving; log:\n{}",
                log.lock().expect("log lock")
            );
        }
        Worker {
            child,
            id: id.to_owned(),
            log,
            folder,
            flags: flags.iter().map(|flag| (*flag).to_owned()).collect(),
        }
    }

    fn spawn(
        folder: &TempDir,
        server: &NatsServer,
        config: &Value,
        id: &str,
        flags: &[&str],
    ) -> Child {
        let config_path = folder.path().join("config.json");
        std::fs::write(
            &config_path,
            serde_json::to_vec_pretty(config).expect("json"),
        )
        .expect("write config");
        let provider: &[&str] = if flags.contains(&"-p") {
            &[]
        } else {
            &["-p", "local"]
        };
        Command::new(env!("CARGO_BIN_EXE_derrick"))
            .arg("worker")
            .args(provider)
            .args(["--worker-id", id, "-w"])
            .arg(&config_path)
            .arg("--cache-dir")
            .arg(folder.path().join("cache"))
            .arg("--state-dir")
            .arg(folder.path().join("state"))
            .args(["--nats-url", &server.url()])
            .args(flags)
            .env("RUST_LOG", "derrick=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start derrick worker")
    }

    /// Returns the worker id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Returns everything the worker logged so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// Returns the worker's cache folder.
    pub fn cache_dir(&self) -> PathBuf {
        self.folder.path().join("cache")
    }

    /// Returns the host folder of a workspace that this worker holds.
    pub fn workspace_root(&self, id: &str) -> PathBuf {
        self.cache_dir().join("workspaces").join(id).join("root")
    }

    /// Sends SIGTERM and returns the exit status once the worker exits, or `None` when it is
    /// still running after `within`.
    pub fn stop(&mut self, within: Duration) -> Option<ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Kills the worker with SIGKILL, as a crash or a lost machine would, and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the worker and starts it again on the same folders, so that the new process removes
    /// what the old one left (processes, mounts, records).
    pub fn restart(self, server: &NatsServer, config: &Value) -> Worker {
        let mut worker = self;
        worker.kill();
        let folder = std::mem::replace(
            &mut worker.folder,
            tempfile::tempdir().expect("temporary folder"),
        );
        let id = worker.id.clone();
        let flags = std::mem::take(&mut worker.flags);
        drop(worker);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Self::start_in(folder, server, config, &id, &flags)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        if self.stop(Duration::from_secs(30)).is_none() {
            self.kill();
        }
    }
}

impl Cluster {
    /// Starts a NATS server and workers `worker-1` to `worker-<count>` with `config`.
    pub fn start(config: &Value, count: usize) -> Cluster {
        Self::start_with(config, count, &[])
    }

    /// Starts a NATS server and `count` workers, each with the extra `flags`.
    pub fn start_with(config: &Value, count: usize, flags: &[&str]) -> Cluster {
        let server = NatsServer::start();
        let workers = (1..=count)
            .map(|index| Worker::start_with(&server, config, &format!("worker-{index}"), flags))
            .collect();
        Cluster { workers, server }
    }

    /// Starts an HTTP controller with `-p remote_nats` in front of the workers.
    pub fn controller(&self, config: &Value) -> Derrick {
        self.controller_with(config, &[])
    }

    /// Starts an HTTP controller with extra flags, such as `--shutdown-grace 1`.
    pub fn controller_with(&self, config: &Value, flags: &[&str]) -> Derrick {
        let url = self.server.url();
        let mut args = vec!["-p", "remote_nats", "--nats-url", &url];
        args.extend_from_slice(flags);
        Derrick::start_with(config, &args, &[])
    }

    /// Returns the worker with this id.
    pub fn worker(&self, id: &str) -> &Worker {
        self.workers
            .iter()
            .find(|worker| worker.id() == id)
            .unwrap_or_else(|| panic!("no worker {id}"))
    }

    /// Returns every worker's log, for failure messages.
    pub fn logs(&self) -> String {
        self.workers
            .iter()
            .map(|worker| format!("--- {}\n{}", worker.id(), worker.log()))
            .collect()
    }
}

/// Starts one worker and an HTTP controller that owns it, for the contract suite.
pub fn single_worker_controller(config: &Value) -> Derrick {
    let cluster = Cluster::start(config, 1);
    let controller = cluster.controller(config);
    let worker_cache = cluster.workers[0].cache_dir();
    controller.attach(Box::new(cluster), Some(worker_cache))
}
