//! A real `derrick` process per test: its own cache and state folders, a loopback port chosen by
//! the kernel, and its log kept for assertions.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;

/// How long derrick may take to start listening.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// A running derrick and its folders; SIGTERM and wait on drop.
pub struct Derrick {
    child: Child,
    base_url: String,
    client: reqwest::Client,
    log: Arc<Mutex<String>>,
    folder: TempDir,
}

/// A reply: status and JSON body (`Value::Null` for a body that is not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub bytes: Vec<u8>,
    pub content_type: Option<String>,
}

impl Derrick {
    /// Starts derrick on a configuration given as JSON text.
    pub fn start(config: &Value) -> Derrick {
        Self::start_with(config, &[], &[])
    }

    /// Starts derrick with extra flags and environment variables.
    pub fn start_with(config: &Value, args: &[&str], env: &[(&str, &str)]) -> Derrick {
        let folder = tempfile::tempdir().expect("temporary folder");
        Self::start_on(folder, config, args, env)
    }

    /// Starts derrick with a new configuration on the cache and state folders of `folder`.
    pub fn start_on(
        folder: TempDir,
        config: &Value,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Derrick {
        let config_path = folder.path().join("config.json");
        std::fs::write(
            &config_path,
            serde_json::to_vec_pretty(config).expect("json"),
        )
        .expect("write config");
        Self::start_in(folder, &config_path, args, env)
    }

    /// Starts derrick on a configuration file; `folder` holds the cache and state folders.
    pub fn start_in(
        folder: TempDir,
        config_path: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Derrick {
        let mut command = Command::new(env!("CARGO_BIN_EXE_derrick"));
        command
            .args(["-p", "local", "-s", "http", "--listen", "127.0.0.1:0", "-w"])
            .arg(config_path)
            .arg("--cache-dir")
            .arg(folder.path().join("cache"))
            .arg("--state-dir")
            .arg(folder.path().join("state"))
            .args(args)
            .env("RUST_LOG", "derrick=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start derrick");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(String::new()));
        let (address_tx, address_rx) = std::sync::mpsc::channel();
        let log_writer = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(address) = line.split("address=").nth(1) {
                    let _ = address_tx.send(address.trim().to_owned());
                }
                let mut log = log_writer.lock().expect("log lock");
                log.push_str(&line);
                log.push('\n');
            }
        });
        let address = match address_rx.recv_timeout(START_DEADLINE) {
            Ok(address) => address,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "derrick did not start listening; log:\n{}",
                    log.lock().expect("log lock")
                );
            }
        };
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("http client");
        Derrick {
            child,
            base_url: format!("http://{address}"),
            client,
            log,
            folder,
        }
    }

    /// Returns everything derrick logged so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// Returns the cache folder.
    pub fn cache_dir(&self) -> PathBuf {
        self.folder.path().join("cache")
    }

    /// Returns the state folder.
    pub fn state_dir(&self) -> PathBuf {
        self.folder.path().join("state")
    }

    /// Returns the host folder that a local workspace's commands see as their root.
    pub fn workspace_root(&self, id: &str) -> PathBuf {
        self.cache_dir().join("workspaces").join(id).join("root")
    }

    /// Sends a request with an optional JSON body.
    pub async fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Reply {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base_url));
        if let Some(body) = body {
            request = request.json(body);
        }
        Self::reply(request.send().await.expect("request reaches derrick")).await
    }

    /// Sends a raw body.
    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> Reply {
        let request = self
            .client
            .post(format!("{}{path}", self.base_url))
            .header("content-type", "application/json")
            .body(body);
        Self::reply(request.send().await.expect("request reaches derrick")).await
    }

    async fn reply(response: reqwest::Response) -> Reply {
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|value| value.to_str().unwrap_or_default().to_owned());
        let bytes = response.bytes().await.expect("response body").to_vec();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            body,
            bytes,
            content_type,
        }
    }

    /// `POST` with a JSON body.
    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.request("POST", path, Some(&body)).await
    }

    /// `GET`.
    pub async fn get(&self, path: &str) -> Reply {
        self.request("GET", path, None).await
    }

    /// Creates a workspace and returns the whole reply, asserting success.
    pub async fn create(&self) -> Value {
        let reply = self.request("POST", "/workspaces", None).await;
        assert_eq!(
            reply.status,
            200,
            "create failed: {}\nlog:\n{}",
            reply.body,
            self.log()
        );
        reply.body
    }

    /// Creates a workspace and returns its id.
    pub async fn create_id(&self) -> String {
        self.create().await["id"]
            .as_str()
            .expect("id is a string")
            .to_owned()
    }

    /// Runs `cmd_with_output` and returns the body, asserting a 200.
    pub async fn run(&self, id: &str, cmd: &str) -> Value {
        let reply = self
            .post(
                &format!("/workspaces/{id}/cmd_with_output"),
                json!({ "cmd": cmd }),
            )
            .await;
        assert_eq!(
            reply.status, 200,
            "cmd_with_output `{cmd}` failed: {}",
            reply.body
        );
        reply.body
    }

    /// Runs a command and returns its output, asserting exit code 0.
    pub async fn output(&self, id: &str, cmd: &str) -> String {
        let body = self.run(id, cmd).await;
        assert_eq!(body["exit_code"], 0, "`{cmd}` failed: {body}");
        body["output"]
            .as_str()
            .expect("output is a string")
            .to_owned()
    }

    /// Stops derrick and returns its folder, so a new derrick can start on the same cache.
    pub fn into_folder(mut self) -> TempDir {
        self.stop();
        let folder = tempfile::tempdir().expect("temporary folder");
        std::mem::replace(&mut self.folder, folder)
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for derrick") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().expect("wait for killed derrick");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Derrick {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

/// Polls `condition` every 20 ms until it holds or `deadline` passes; returns whether it held.
pub async fn wait_until(deadline: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    condition()
}

/// A configuration with one repository at `/code/app` and a setup script.
pub fn config(url: impl std::fmt::Display, setup_script: &str) -> Value {
    json!({
        "name": "it",
        "repositories": [{ "url": url.to_string(), "path": "/code/app" }],
        "setup_script": setup_script,
    })
}

/// Lists the pids of processes whose command line contains `needle`.
pub fn processes_matching(needle: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let command_line = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let text = String::from_utf8_lossy(&command_line).replace('\0', " ");
            text.contains(needle) && !text.contains("cargo") && *pid != std::process::id() as i32
        })
        .collect()
}
