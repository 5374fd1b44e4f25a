//! A real `derrick` process per test: its own cache and state folders, its log kept for
//! assertions, served over HTTP on a loopback port chosen by the kernel or over NATS through a
//! `nats-server` of its own.
//!
//! `Derrick::request(method, path, body)` is the one entry point for both transports. Over NATS it
//! turns the HTTP path into the subject and the payload, and the reply back into the HTTP status
//! and body, so a test states a case once and runs it over both.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tempfile::TempDir;

// The NATS server, worker and Docker helpers are child modules of this file, because the
// benchmark includes this file alone by `#[path]`. The tests reach them as `support::nats`,
// `support::remote` and `support::docker`.
#[path = "nats.rs"]
pub mod nats;
#[path = "remote.rs"]
pub mod remote;

#[path = "docker.rs"]
pub mod docker;

use nats::NatsServer;

/// How long derrick may take to start listening.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// How long a test waits for a NATS reply. Longer than any command a test runs, so that a
/// missing reply fails the test instead of hanging it; derrick itself sets no such bound.
const NATS_REPLY_DEADLINE: Duration = Duration::from_secs(300);

/// The log line after which derrick replies to NATS requests.
pub const NATS_READY: &str = "serving nats requests";

/// The scope label of a docker derrick's containers and its configuration name, which is unique
/// so that the derrick's layer images can be removed.
struct DockerCleanup {
    scope: String,
    config_name: String,
}

/// Where derrick creates workspaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    Local,
    /// Containers of the test image, on the machine's Docker engine.
    Docker,
}

/// How a test reaches derrick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Http,
    Nats,
    /// HTTP to a `-p remote_nats` controller, which forwards over NATS to one worker.
    Remote,
}

/// A running derrick and its folders; SIGTERM and wait on drop.
pub struct Derrick {
    child: Child,
    /// What a `remote_nats` controller depends on (its workers, and their NATS server unless
    /// `link` has it), stopped after the controller and before `link`'s NATS server.
    backend: Option<Box<dyn std::any::Any + Send + Sync>>,
    provider: ProviderKind,
    /// What a docker derrick leaves on the engine, removed when the test ends unless the
    /// derrick crashed and the test takes it over.
    docker_cleanup: Option<DockerCleanup>,
    link: Link,
    log: Arc<Mutex<String>>,
    folder: TempDir,
    /// The cache folder of the worker that contains the workspaces, for a `remote_nats`
    /// controller.
    worker_cache: Option<PathBuf>,
}

/// The transport side of a running derrick.
enum Link {
    Http {
        base_url: String,
        client: reqwest::Client,
    },
    Nats(Box<NatsLink>),
}

/// A NATS-served derrick's server, subject prefix and (lazily connected) client.
struct NatsLink {
    server: NatsServer,
    prefix: String,
    client: tokio::sync::OnceCell<async_nats::Client>,
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

    /// Starts derrick on a configuration file; `folder` contains the cache and state folders.
    pub fn start_in(
        folder: TempDir,
        config_path: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Derrick {
        Self::launch(folder, config_path, None, args, env)
    }

    /// Starts derrick over `transport`; over NATS it gets a `nats-server` of its own.
    pub fn start_over(transport: Transport, config: &Value) -> Derrick {
        match transport {
            Transport::Http => Self::start(config),
            Transport::Nats => Self::start_nats(NatsServer::start(), config, &[], &[]),
            Transport::Remote => remote::single_worker_controller(config),
        }
    }

    /// Starts derrick over `transport` with `provider`. A docker derrick gets the test image as
    /// its base image and a configuration name of its own.
    pub fn start_for(transport: Transport, provider: ProviderKind, config: &Value) -> Derrick {
        Self::start_provider(transport, provider, config, &[], &[])
    }

    /// Like `start_for`, with extra flags and environment variables.
    pub fn start_provider(
        transport: Transport,
        provider: ProviderKind,
        config: &Value,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Derrick {
        if provider == ProviderKind::Local {
            return match transport {
                Transport::Http => Self::start_with(config, args, env),
                Transport::Nats => Self::start_nats(NatsServer::start(), config, args, env),
                Transport::Remote => remote::single_worker_controller(config),
            };
        }
        let image = docker::test_image();
        let mut config = config.clone();
        let name = format!("it-{}", uuid_like());
        config["name"] = json!(name);
        let mut flags = vec!["-p", "docker", "--base-image", image];
        flags.extend_from_slice(args);
        let nats = (transport == Transport::Nats).then(NatsServer::start);
        let folder = tempfile::tempdir().expect("temporary folder");
        let config_path = folder.path().join("config.json");
        std::fs::write(
            &config_path,
            serde_json::to_vec_pretty(&config).expect("json"),
        )
        .expect("write config");
        let mut derrick = Self::launch(folder, &config_path, nats, &flags, env);
        derrick.provider = ProviderKind::Docker;
        derrick.docker_cleanup = Some(DockerCleanup {
            scope: derrick::provider::docker::scope_of(&derrick.state_dir()),
            config_name: name,
        });
        derrick
    }

    /// Returns where this derrick creates workspaces.
    pub fn provider(&self) -> ProviderKind {
        self.provider
    }

    /// Tells whether workspace `id` still has its folder (local) or container (docker).
    pub fn workspace_exists(&self, id: &str) -> bool {
        match self.provider {
            ProviderKind::Local => self.workspace_root(id).exists(),
            ProviderKind::Docker => docker::container_exists(id),
        }
    }

    /// Starts derrick with `-s nats` against `server`, with the server's token if it has one,
    /// and extra flags and environment variables. The derrick owns the server from now on.
    pub fn start_nats(
        server: NatsServer,
        config: &Value,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Derrick {
        let folder = tempfile::tempdir().expect("temporary folder");
        let config_path = folder.path().join("config.json");
        std::fs::write(
            &config_path,
            serde_json::to_vec_pretty(config).expect("json"),
        )
        .expect("write config");
        Self::launch(folder, &config_path, Some(server), args, env)
    }

    fn launch(
        folder: TempDir,
        config_path: &Path,
        nats: Option<NatsServer>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Derrick {
        let mut command = Command::new(env!("CARGO_BIN_EXE_derrick"));
        if !args.contains(&"-p") {
            command.args(["-p", "local"]);
        }
        match &nats {
            None => command.args(["-s", "http", "--listen", "127.0.0.1:0"]),
            Some(server) => command.args(nats_args(server)),
        };
        command
            .arg("-w")
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
        let ready_marker = if nats.is_some() {
            NATS_READY
        } else {
            "address="
        };
        let (log, address_rx) = read_log(stderr, ready_marker);

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

        let link = match nats {
            Some(server) => Link::Nats(Box::new(NatsLink {
                server,
                prefix: subject_prefix(args),
                client: tokio::sync::OnceCell::new(),
            })),
            None => Link::Http {
                base_url: format!("http://{address}"),
                client: reqwest::Client::builder()
                    .no_proxy()
                    .build()
                    .expect("http client"),
            },
        };
        Derrick {
            child,
            provider: ProviderKind::Local,
            docker_cleanup: None,
            link,
            log,
            folder,
            worker_cache: None,
            backend: None,
        }
    }

    /// Makes this derrick own `backend`, which it stops after itself, and look for workspace
    /// folders in `worker_cache`.
    pub fn attach(
        mut self,
        backend: Box<dyn std::any::Any + Send + Sync>,
        worker_cache: Option<PathBuf>,
    ) -> Derrick {
        self.backend = Some(backend);
        self.worker_cache = worker_cache;
        self
    }

    /// Returns the transport this derrick serves.
    pub fn transport(&self) -> Transport {
        match self.link {
            Link::Http { .. } if self.backend.is_some() => Transport::Remote,
            Link::Http { .. } => Transport::Http,
            Link::Nats(_) => Transport::Nats,
        }
    }

    /// Returns the `nats-server` of a NATS-served derrick.
    pub fn nats_server(&self) -> &NatsServer {
        &self.nats_link().server
    }

    /// Returns a client of the derrick's `nats-server`, connected on first use.
    pub async fn nats_client(&self) -> &async_nats::Client {
        let link = self.nats_link();
        link.client.get_or_init(|| link.server.client()).await
    }

    /// Sends `payload` to `<prefix>.<operation>` and returns the reply as HTTP would give it.
    pub async fn nats_request(&self, operation: &str, payload: Vec<u8>) -> Reply {
        self.nats_request_within(operation, payload, NATS_REPLY_DEADLINE)
            .await
    }

    /// Like `nats_request`, failing the test when no reply comes within `deadline`.
    pub async fn nats_request_within(
        &self,
        operation: &str,
        payload: Vec<u8>,
        deadline: Duration,
    ) -> Reply {
        let subject = format!("{}.{operation}", self.nats_link().prefix);
        let client = self.nats_client().await;
        let message =
            tokio::time::timeout(deadline, client.request(subject.clone(), payload.into()))
                .await
                .unwrap_or_else(|_| panic!("no NATS reply on {subject} within {deadline:?}"))
                .unwrap_or_else(|error| panic!("NATS request on {subject} failed: {error}"));
        nats_reply(operation, &message.payload)
    }

    fn nats_link(&self) -> &NatsLink {
        match &self.link {
            Link::Nats(link) => link,
            Link::Http { .. } => panic!("this derrick serves HTTP, not NATS"),
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

    /// Returns the host folder that a local workspace's commands see as their root; for a
    /// `remote_nats` controller, the one on its worker.
    pub fn workspace_root(&self, id: &str) -> PathBuf {
        let cache = self
            .worker_cache
            .clone()
            .unwrap_or_else(|| self.cache_dir());
        cache.join("workspaces").join(id).join("root")
    }

    /// Sends a request with an optional JSON body. Over NATS, the path names the subject and
    /// the workspace id joins the body.
    pub async fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Reply {
        let (base_url, client) = match &self.link {
            Link::Http { base_url, client } => (base_url, client),
            Link::Nats(_) => {
                let (operation, id) = nats_operation(method, path);
                let payload = nats_payload(id.as_deref(), body);
                return self.nats_request(&operation, payload).await;
            }
        };
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = client.request(method, format!("{base_url}{path}"));
        if let Some(body) = body {
            request = request.json(body);
        }
        Self::reply(request.send().await.expect("request reaches derrick")).await
    }

    /// Sends a raw body; over NATS it is the payload as is, without the workspace id.
    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> Reply {
        let (base_url, client) = match &self.link {
            Link::Http { base_url, client } => (base_url, client),
            Link::Nats(_) => {
                let (operation, _id) = nats_operation("POST", path);
                return self.nats_request(&operation, body).await;
            }
        };
        let request = client
            .post(format!("{base_url}{path}"))
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

    /// Sends SIGTERM and returns at once; `stop` also waits.
    pub fn terminate(&self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }

    /// Returns derrick's exit status once it has exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("wait for derrick")
    }

    /// Stops derrick over HTTP, with SIGTERM or, when `crash`, SIGKILL, and starts it again on
    /// the same folders, configuration and provider. A docker derrick's clean-up moves to the new
    /// process.
    pub fn restart(mut self, crash: bool) -> Derrick {
        let (provider, cleanup) = (self.provider, self.docker_cleanup.take());
        if crash {
            let _ = self.child.kill();
            let _ = self.child.wait();
        } else {
            self.stop();
        }
        let folder = std::mem::replace(
            &mut self.folder,
            tempfile::tempdir().expect("temporary folder"),
        );
        let config_path = folder.path().join("config.json");
        let args = match provider {
            ProviderKind::Local => vec![],
            ProviderKind::Docker => vec!["-p", "docker", "--base-image", docker::test_image()],
        };
        let mut restarted = Self::launch(folder, &config_path, None, &args, &[]);
        restarted.provider = provider;
        restarted.docker_cleanup = cleanup;
        restarted
    }

    /// Kills derrick with SIGKILL, as a crash would, and returns its folder for a restart. The
    /// containers and layer images of a docker derrick stay for the test to take over.
    pub fn crash(mut self) -> TempDir {
        self.docker_cleanup = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
        let folder = tempfile::tempdir().expect("temporary folder");
        std::mem::replace(&mut self.folder, folder)
    }

    /// Returns the HTTP base URL (`http://127.0.0.1:PORT`) of an HTTP-served derrick.
    pub fn base_url(&self) -> &str {
        match &self.link {
            Link::Http { base_url, .. } => base_url,
            Link::Nats(_) => panic!("derrick serves NATS, not HTTP"),
        }
    }

    /// Returns the process id of derrick.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.terminate();
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
        if let Some(cleanup) = &self.docker_cleanup {
            docker::remove_containers_of(&cleanup.scope);
            docker::remove_layers_of(&cleanup.config_name);
        }
    }
}

/// Returns 16 random hex digits, from the kernel's random source.
fn uuid_like() -> String {
    let bytes = std::fs::read("/proc/sys/kernel/random/uuid").expect("read a random uuid");
    String::from_utf8_lossy(&bytes).trim().replace('-', "")[..16].to_owned()
}

/// Collects derrick's stderr into the log on a thread, and sends what follows `ready_marker` on
/// the first line that contains it (the HTTP address, or nothing for NATS).
pub fn read_log(
    stderr: std::process::ChildStderr,
    ready_marker: &'static str,
) -> (Arc<Mutex<String>>, std::sync::mpsc::Receiver<String>) {
    let log = Arc::new(Mutex::new(String::new()));
    let (address_tx, address_rx) = std::sync::mpsc::channel();
    let log_writer = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(address) = line.split(ready_marker).nth(1) {
                let _ = address_tx.send(address.trim().to_owned());
            }
            let mut log = log_writer.lock().expect("log lock");
            log.push_str(&line);
            log.push('\n');
        }
    });
    (log, address_rx)
}

/// Returns the HTTP status of an error code, from derrick's own mapping.
pub fn status_of_code(code: &str) -> u16 {
    assert!(
        derrick::error::CODES.contains(&code),
        "unknown error code `{code}` in a reply"
    );
    derrick::transport::http::status_of_code(code).as_u16()
}

/// Turns an HTTP method and path into a NATS operation and the workspace id it names.
fn nats_operation(method: &str, path: &str) -> (String, Option<String>) {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        ("GET", ["health"]) => ("health".to_owned(), None),
        ("GET", ["states"]) => ("states".to_owned(), None),
        ("POST", ["workspaces"]) => ("workspaces.create".to_owned(), None),
        ("GET", ["workspaces"]) => ("workspaces.list".to_owned(), None),
        ("GET", ["workspaces", id]) => ("workspaces.get".to_owned(), Some((*id).to_owned())),
        ("DELETE", ["workspaces", id]) => ("workspaces.destroy".to_owned(), Some((*id).to_owned())),
        ("POST", ["workspaces", id, operation]) => {
            (format!("workspaces.{operation}"), Some((*id).to_owned()))
        }
        // Any other path becomes a subject derrick does not serve, as it is not an endpoint.
        _ => (segments.join("."), None),
    }
}

/// Builds a NATS payload: the HTTP body with the workspace id added.
fn nats_payload(id: Option<&str>, body: Option<&Value>) -> Vec<u8> {
    let mut body = body.cloned();
    if let Some(id) = id {
        let mut object = match body {
            Some(Value::Object(object)) => object,
            None => serde_json::Map::new(),
            Some(other) => panic!("a body with an id must be a JSON object, not {other}"),
        };
        object.insert("id".to_owned(), json!(id));
        body = Some(Value::Object(object));
    }
    body.map(|body| serde_json::to_vec(&body).expect("json"))
        .unwrap_or_default()
}

/// Turns a NATS reply into the reply HTTP would give: the status of its error code, the error
/// envelope as is, the `ok` value as the body, and `read_file`'s base64 content as the bytes.
fn nats_reply(operation: &str, payload: &[u8]) -> Reply {
    let envelope: Value = serde_json::from_slice(payload).unwrap_or_else(|error| {
        panic!(
            "NATS reply is not JSON ({error}): {}",
            String::from_utf8_lossy(payload)
        )
    });
    if let Some(code) = envelope["error"]["code"].as_str() {
        return Reply {
            status: status_of_code(code),
            body: envelope.clone(),
            bytes: payload.to_vec(),
            content_type: None,
        };
    }
    let ok = envelope
        .get("ok")
        .unwrap_or_else(|| panic!("NATS reply has neither `ok` nor `error`: {envelope}"));
    let bytes = if operation == "workspaces.read_file" {
        let content = ok["content"].as_str().expect("read_file reply has content");
        base64::engine::general_purpose::STANDARD
            .decode(content)
            .expect("read_file content is base64")
    } else {
        serde_json::to_vec(ok).expect("json")
    };
    Reply {
        status: 200,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        bytes,
        content_type: None,
    }
}

/// Flags that point derrick at `server`, with its token.
fn nats_args(server: &NatsServer) -> Vec<String> {
    let mut args = vec![
        "-s".to_owned(),
        "nats".to_owned(),
        "--nats-url".to_owned(),
        server.url(),
    ];
    if let Some(token) = server.token() {
        args.extend(["--nats-token".to_owned(), token.to_owned()]);
    }
    if let Some(tls) = server.tls() {
        for (flag, file) in [
            ("--nats-tls-ca", &tls.ca),
            ("--nats-tls-cert", &tls.client_certificate),
            ("--nats-tls-key", &tls.client_key),
        ] {
            args.extend([flag.to_owned(), file.display().to_string()]);
        }
    }
    args
}

/// Returns the subject prefix that `args` set, or derrick's default.
fn subject_prefix(args: &[&str]) -> String {
    args.iter()
        .position(|arg| *arg == "--nats-subject-prefix")
        .and_then(|index| args.get(index + 1))
        .map_or_else(|| "derrick".to_owned(), |prefix| (*prefix).to_owned())
}

/// Polls `condition` every 20 ms until it is true or `deadline` passes; returns the last result.
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

/// Waits until a process whose command line contains `needle` runs, failing the test after 20 s.
pub async fn wait_for_process(needle: &str) {
    let started = wait_until(Duration::from_secs(20), || {
        !processes_matching(needle).is_empty()
    });
    assert!(started.await, "`{needle}` did not start");
}

/// Builds a configuration with one repository at `/code/app` and a setup script.
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
