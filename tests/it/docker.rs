//! The docker provider beyond the contract suite: exact exit codes, timeouts that leave no
//! process in the container, re-adoption after a crash, fetches without credentials inside, and
//! clear errors when the engine or the base image is missing.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use derrick::config::DockerSettings;
use derrick::engine::{ExecRequest, Provider, WorkspaceId};
use derrick::keys::LayerKey;
use derrick::provider::docker::{DockerOptions, DockerProvider};

use crate::support::derrick::{Derrick, ProviderKind, Transport, config, wait_until};
use crate::support::docker;
use crate::support::repos::TestRepo;

fn sample_repository() -> TestRepo {
    let repository = TestRepo::new();
    repository.write("README.md", "hello\n");
    repository.commit("initial");
    repository
}

async fn started(repository: &TestRepo) -> (Derrick, String) {
    let derrick = Derrick::start_for(
        Transport::Http,
        ProviderKind::Docker,
        &config(repository.path().display(), ""),
    );
    let id = derrick.create_id().await;
    (derrick, id)
}

async fn run(derrick: &Derrick, id: &str, body: Value) -> (Value, Duration) {
    let start = Instant::now();
    let reply = derrick
        .post(&format!("/workspaces/{id}/cmd_with_output"), body)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    (reply.body, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_output_are_exact() {
    let repository = sample_repository();
    let (derrick, id) = started(&repository).await;

    for round in 0..100 {
        let (failed, _) = run(&derrick, &id, json!({ "cmd": "exit 7" })).await;
        assert_eq!(failed["exit_code"], 7, "round {round}: {failed}");
        assert_eq!(failed["output"], "", "round {round}: {failed}");
        let (echoed, _) = run(&derrick, &id, json!({ "cmd": "echo x" })).await;
        assert_eq!(echoed["exit_code"], 0, "round {round}: {echoed}");
        assert_eq!(echoed["output"], "x\n", "round {round}: {echoed}");
    }

    let cases = [
        ("exit 126", 126),
        ("no-such-command-here", 127),
        ("kill -9 $$", 137),
        ("kill -15 $$", 143),
    ];
    for (cmd, expected) in cases {
        let (body, _) = run(&derrick, &id, json!({ "cmd": cmd })).await;
        assert_eq!(body["exit_code"], expected, "`{cmd}`: {body}");
        assert_eq!(body["timed_out"], false, "`{cmd}`: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_interleaves_streams_without_terminal() {
    let repository = sample_repository();
    let (derrick, id) = started(&repository).await;
    let cmd = "echo 1; echo 2 >&2; echo 3; echo 4 >&2; test -t 1 || echo notty; cat; \
               read -r line || echo eof; head -c 1 | wc -c; pwd; echo $HOME";
    let (body, _) = run(
        &derrick,
        &id,
        json!({ "cmd": cmd, "working_dir": "/code/app" }),
    )
    .await;
    assert_eq!(
        body["output"],
        "1\n2\n3\n4\nnotty\neof\n0\n/workspace/code/app\n/workspace\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_output_keeps_tail() {
    let repository = sample_repository();
    let (derrick, id) = started(&repository).await;
    let cmd = "head -c 20000000 /dev/zero | tr '\\0' 'a'; echo end";
    let (body, _) = run(&derrick, &id, json!({ "cmd": cmd })).await;
    let output = body["output"].as_str().expect("output");
    assert_eq!(body["truncated"], true);
    assert_eq!(output.len(), derrick::provider::local::MAX_OUTPUT_BYTES);
    assert!(
        output.ends_with("aaaend\n"),
        "{}",
        &output[output.len() - 20..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_errors_are_client_errors() {
    let repository = sample_repository();
    let (derrick, id) = started(&repository).await;
    derrick
        .output(&id, "head -c 67108865 /dev/zero > big.bin; mkfifo pipe")
        .await;
    let read_path = format!("/workspaces/{id}/read_file");
    let cases = [
        ("big.bin", 413, "payload_too_large"),
        ("code", 400, "invalid_request"),
        ("pipe", 400, "invalid_request"),
        ("missing.txt", 404, "file_not_found"),
    ];
    for (path, status, code) in cases {
        let reply = derrick.post(&read_path, json!({ "path": path })).await;
        assert_eq!(reply.status, status, "{path}: {}", reply.body);
        assert_eq!(reply.body["error"]["code"], code, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_leaves_no_process_in_container() {
    let repository = sample_repository();
    let (derrick, id) = started(&repository).await;

    let cmd = "sh -c 'trap \"\" TERM; sleep 605'";
    let (body, elapsed) = run(&derrick, &id, json!({ "cmd": cmd, "timeout": 1 })).await;
    assert_eq!(body["exit_code"], 124);
    assert_eq!(body["timed_out"], true);
    assert!(elapsed < Duration::from_secs(3), "reply took {elapsed:?}");
    assert!(
        elapsed >= Duration::from_secs(1),
        "reply came before the timeout: {elapsed:?}"
    );
    let gone = wait_until(Duration::from_secs(2), || {
        !docker::exec(&id, &["ps"]).contains("sleep 605")
    })
    .await;
    assert!(gone, "sleep 605 survived: {}", docker::exec(&id, &["ps"]));

    // A background loop holding the output open ends too, and the reply still comes on time.
    let cmd = "(while true; do date >> tick.log; sleep 0.2; done) & sleep 601";
    let (body, elapsed) = run(&derrick, &id, json!({ "cmd": cmd, "timeout": 2 })).await;
    assert_eq!(body["exit_code"], 124);
    assert!(elapsed < Duration::from_secs(4), "reply took {elapsed:?}");
    let gone = wait_until(Duration::from_secs(3), || {
        !docker::exec(&id, &["ps"]).contains("sleep 601")
    })
    .await;
    assert!(gone, "sleep 601 survived: {}", docker::exec(&id, &["ps"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_process_does_not_delay_reply() {
    let repository = sample_repository();
    let (derrick, id) = started(&repository).await;
    let (body, elapsed) = run(&derrick, &id, json!({ "cmd": "sleep 30 & echo started" })).await;
    assert_eq!(body["output"], "started\n");
    assert_eq!(body["exit_code"], 0);
    assert!(elapsed < Duration::from_secs(2), "reply took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_restores_files_under_same_id() {
    let repository = sample_repository();
    let (derrick, id) = started(&repository).await;
    derrick
        .output(
            &id,
            "echo changed > code/app/README.md; touch extra; sleep 300 &",
        )
        .await;

    let reset = derrick
        .post(&format!("/workspaces/{id}/reset"), json!({}))
        .await;
    assert_eq!(reset.status, 200, "{}", reset.body);
    assert_eq!(
        derrick
            .output(&id, "cat code/app/README.md; test -e extra || echo gone")
            .await,
        "hello\ngone\n"
    );
    assert!(
        !docker::exec(&id, &["ps"]).contains("sleep 300"),
        "the reset container runs the old process"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_brings_new_commit_without_credentials() {
    let repository = sample_repository();
    let (derrick, id) = started(&repository).await;
    repository.write("README.md", "second\n");
    let second = repository.commit("second");

    let fetched = derrick
        .post(&format!("/workspaces/{id}/fetch"), json!({}))
        .await;
    assert_eq!(fetched.status, 200, "{}", fetched.body);
    assert_eq!(fetched.body["repositories"][0]["after"], second.as_str());
    assert_eq!(
        derrick
            .output(
                &id,
                "cat code/app/README.md; git -C code/app rev-parse HEAD"
            )
            .await,
        format!("second\n{second}\n")
    );

    // The container has no access to the host's repository, so an agent's own fetch fails.
    let (own, _) = run(
        &derrick,
        &id,
        json!({ "cmd": "git -C code/app fetch", "timeout": 30 }),
    )
    .await;
    assert_ne!(own["exit_code"], 0, "{own}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symbolic_links_cannot_leave_workspace() {
    let repository = sample_repository();
    let (derrick, id) = started(&repository).await;
    derrick
        .output(
            &id,
            "ln -s /etc etc-link; ln -s code/app app-link; ln -s ../.. up",
        )
        .await;

    let read_path = format!("/workspaces/{id}/read_file");
    let read = |path: &str| derrick.post(&read_path, json!({ "path": path }));
    for path in ["etc-link/passwd", "up/etc/passwd", "/code/../../etc/passwd"] {
        let reply = read(path).await;
        assert_eq!(reply.status, 400, "{path}: {}", reply.body);
        assert_eq!(
            reply.body["error"]["code"], "path_outside_workspace",
            "{path}"
        );
    }
    let inside = read("app-link/README.md").await;
    assert_eq!(inside.status, 200, "{}", inside.body);
    assert_eq!(inside.bytes, b"hello\n");

    let written = derrick
        .post(
            &format!("/workspaces/{id}/write_file"),
            json!({ "path": "etc-link/escape", "content": "aGk=" }),
        )
        .await;
    assert_eq!(written.body["error"]["code"], "path_outside_workspace");
    assert_eq!(docker::exec(&id, &["ls", "/etc/escape"]), "");

    // A file used as a folder: nothing to read there, and nothing can be written.
    let below_file = read("code/app/README.md/x").await;
    assert_eq!(below_file.status, 404, "{}", below_file.body);
    assert_eq!(below_file.body["error"]["code"], "file_not_found");
    let written = derrick
        .post(
            &format!("/workspaces/{id}/write_file"),
            json!({ "path": "code/app/README.md/x", "content": "aGk=" }),
        )
        .await;
    assert_eq!(written.status, 400, "{}", written.body);
    assert_eq!(written.body["error"]["code"], "invalid_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopt_takes_back_crashed_workspace() {
    let repository = sample_repository();
    let (derrick, id) = started(&repository).await;
    derrick.output(&id, "echo kept > notes.txt").await;
    let state_dir = derrick.state_dir();
    let cache_dir = derrick.cache_dir();
    let record: Value = serde_json::from_slice(
        &std::fs::read(state_dir.join("workspaces").join(format!("{id}.json")))
            .expect("workspace record"),
    )
    .expect("record is JSON");
    let layers: Vec<LayerKey> = record["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|layer| LayerKey::parse(layer["key"].as_str().expect("key")).expect("valid key"))
        .collect();
    let folder = derrick.crash();

    let provider = DockerProvider::connect(DockerOptions {
        cache_dir: folder.path().join("cache2"),
        state_dir: state_dir.clone(),
        base_image: docker::test_image().to_owned(),
        settings: DockerSettings::default(),
        spare_containers: 0,
    })
    .await
    .expect("connect");
    let workspace = WorkspaceId::parse(&id).expect("id");
    assert!(provider.adopt(&workspace, &layers).await.expect("adopt"));
    let output = provider
        .exec(
            &workspace,
            ExecRequest {
                cmd: "cat notes.txt".to_owned(),
                working_dir: None,
                env: Default::default(),
                timeout: Some(Duration::from_secs(30)),
            },
        )
        .await
        .expect("exec in the adopted workspace");
    assert_eq!(output.output, "kept\n");

    // The crashed derrick's spare belongs to no workspace and goes; the workspace stays.
    let removed = provider
        .remove_unknown(std::slice::from_ref(&workspace))
        .await
        .expect("remove unknown");
    assert!(
        removed
            .iter()
            .all(|name| name.starts_with("derrick-spare-")),
        "{removed:?}"
    );
    assert!(docker::container_exists(&id));
    let unknown = WorkspaceId::generate();
    assert!(!provider.adopt(&unknown, &layers).await.expect("adopt"));

    provider.destroy(&workspace).await.expect("destroy");
    assert!(!docker::container_exists(&id));

    // The cache lists the workspace's layers with their sizes and drops one on request.
    let setup = layers.last().expect("setup layer");
    let listed = provider.layers().await.expect("layers");
    let info = listed.iter().find(|info| info.meta.key == *setup);
    let info = info.expect("the setup layer is listed");
    assert_eq!(info.meta.parent.as_ref(), Some(&layers[1]));
    assert!(info.size_bytes > 0, "size {}", info.size_bytes);
    provider.remove_layer(setup).await.expect("remove layer");
    assert_eq!(provider.layer(setup).await.expect("layer"), None);
    drop(cache_dir);
    docker::remove_containers_of(&derrick::provider::docker::scope_of(&state_dir));
    let name = record["name"].as_str().expect("name").to_owned();
    docker::remove_layers_of(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_engine_is_start_up_error() {
    let folder = tempfile::tempdir().expect("temporary folder");
    let repository = sample_repository();
    let stderr = failed_start(
        folder.path(),
        &config(repository.path().display(), ""),
        &["--base-image", docker::test_image()],
        &format!("unix://{}/no-such.sock", folder.path().display()),
    );
    assert!(
        stderr.contains("cannot reach the docker engine at unix://"),
        "{stderr}"
    );
    assert!(stderr.contains("DOCKER_HOST"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_base_image_names_fix() {
    // A registry on a loopback port of this test that closes every connection, so the pull
    // fails at once without leaving the machine.
    let registry = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = registry.local_addr().expect("address").port();
    std::thread::spawn(move || {
        for connection in registry.incoming() {
            drop(connection);
        }
    });
    let image = format!("127.0.0.1:{port}/derrick-missing:1");
    let folder = tempfile::tempdir().expect("temporary folder");
    let repository = sample_repository();
    let stderr = failed_start(
        folder.path(),
        &config(repository.path().display(), ""),
        &["--base-image", &image],
        "unix:///var/run/docker.sock",
    );
    assert!(
        stderr.contains(&format!("base image `{image}`")),
        "{stderr}"
    );
    assert!(stderr.contains("docker load"), "{stderr}");
    assert!(stderr.contains("docker import"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_gone_gives_provider_unavailable() {
    let folder = tempfile::tempdir().expect("temporary folder");
    let socket = folder.path().join("docker.sock");
    let proxy = EngineProxy::start(&socket);
    let repository = sample_repository();
    let host = format!("unix://{}", socket.display());
    let derrick = Derrick::start_provider(
        Transport::Http,
        ProviderKind::Docker,
        &config(repository.path().display(), ""),
        &[],
        &[("DOCKER_HOST", &host)],
    );
    let id = derrick.create_id().await;
    assert_eq!(derrick.output(&id, "echo up").await, "up\n");

    proxy.stop();
    let started = Instant::now();
    let reply = derrick
        .post(
            &format!("/workspaces/{id}/cmd_with_output"),
            json!({ "cmd": "echo down" }),
        )
        .await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.body["error"]["code"], "provider_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

/// Starts derrick with the docker provider, expects it to exit with an error, and returns its
/// stderr.
fn failed_start(folder: &Path, config: &Value, args: &[&str], docker_host: &str) -> String {
    let config_path = folder.join("config.json");
    std::fs::write(&config_path, serde_json::to_vec(config).expect("json")).expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_derrick"))
        .args([
            "-p",
            "docker",
            "-s",
            "http",
            "--listen",
            "127.0.0.1:0",
            "-w",
        ])
        .arg(&config_path)
        .arg("--cache-dir")
        .arg(folder.join("cache"))
        .arg("--state-dir")
        .arg(folder.join("state"))
        .args(args)
        .env("DOCKER_HOST", docker_host)
        .stdin(Stdio::null())
        .output()
        .expect("run derrick");
    assert!(!output.status.success(), "derrick started");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A Unix socket that forwards every connection to the machine's Docker socket, until stopped:
/// then the socket file goes and open connections close, as when an engine stops.
struct EngineProxy {
    shutdown: tokio::sync::watch::Sender<bool>,
    socket: std::path::PathBuf,
}

impl EngineProxy {
    fn start(socket: &Path) -> EngineProxy {
        let listener = tokio::net::UnixListener::bind(socket).expect("bind proxy socket");
        let (shutdown, watch) = tokio::sync::watch::channel(false);
        let mut accept_watch = watch.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = accept_watch.changed() => return,
                };
                let Ok((mut client, _)) = accepted else {
                    return;
                };
                let mut connection_watch = watch.clone();
                tokio::spawn(async move {
                    let Ok(mut engine) =
                        tokio::net::UnixStream::connect("/var/run/docker.sock").await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut engine) => {}
                        _ = connection_watch.changed() => {}
                    }
                });
            }
        });
        EngineProxy {
            shutdown,
            socket: socket.to_path_buf(),
        }
    }

    fn stop(&self) {
        let _ = self.shutdown.send(true);
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A restarted docker derrick re-adopts its workspace containers with their changes, after a
/// SIGTERM (which keeps the containers) and after a SIGKILL, whose leftover processes it kills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_re_adopts_workspace_containers() {
    let repository = sample_repository();
    let (derrick, id) = started(&repository).await;
    derrick.output(&id, "echo kept > notes.txt").await;

    let restarted = derrick.restart(false);
    assert!(
        restarted
            .log()
            .lines()
            .any(|line| line.contains(&id) && line.contains("re-adopted")),
        "{}",
        restarted.log()
    );
    assert_eq!(restarted.output(&id, "cat notes.txt").await, "kept\n");

    restarted
        .output(&id, "echo again >> notes.txt; sleep 919 > /dev/null 2>&1 &")
        .await;
    let crashed = restarted.restart(true);
    assert_eq!(crashed.output(&id, "cat notes.txt").await, "kept\nagain\n");
    let processes = crashed.output(&id, "ps").await;
    assert!(!processes.contains("sleep 919"), "{processes}");
    let reset = crashed
        .request("POST", &format!("/workspaces/{id}/reset"), None)
        .await;
    assert_eq!(reset.status, 200, "{}", reset.body);
    assert_eq!(
        crashed.output(&id, "test -e notes.txt || echo reset").await,
        "reset\n"
    );
}

/// A `derrick worker -p docker` serves a `remote_nats` controller: its workspaces are containers,
/// and the worker's shutdown removes its spare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_worker_serves_a_controller() {
    let repository = sample_repository();
    let name = format!(
        "it-worker-{}",
        WorkspaceId::generate().as_str().trim_start_matches("ws-")
    );
    let mut configuration = config(repository.path().display(), "echo ready > setup.txt");
    configuration["name"] = json!(name);
    let flags = ["-p", "docker", "--base-image", docker::test_image()];
    let cluster = crate::support::remote::Cluster::start_with(&configuration, 1, &flags);
    let controller = cluster.controller(&configuration);

    let id = controller.create_id().await;
    assert!(docker::container_exists(&id), "no container for {id}");
    assert_eq!(
        controller
            .output(&id, "cat setup.txt; cat code/app/README.md")
            .await,
        "ready\nhello\n"
    );
    let destroyed = controller
        .request("DELETE", &format!("/workspaces/{id}"), None)
        .await;
    assert_eq!(destroyed.status, 200, "{}", destroyed.body);
    assert!(!docker::container_exists(&id));

    drop(controller);
    drop(cluster);
    docker::remove_layers_of(&name);
}

/// A checkout that a command replaced with a link to a host path is refused by fetch: the fetch
/// runs on the host and must never open, update or copy in a host repository.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_refuses_a_linked_checkout() {
    let repository = sample_repository();
    let (derrick, id) = started(&repository).await;
    let host = tempfile::tempdir().expect("temporary folder");
    let host_repository = host.path().join("repository");
    let cloned = Command::new("git")
        .args(["clone", "-q"])
        .arg(repository.path())
        .arg(&host_repository)
        .status()
        .expect("git clone");
    assert!(cloned.success());
    std::fs::write(host_repository.join("secret.txt"), "host secret\n").expect("secret");
    let host_head = repository.head();
    repository.write("later.txt", "later\n");
    repository.commit("later");

    let link = format!(
        "rm -rf code/app && ln -s {} code/app",
        host_repository.display()
    );
    derrick.output(&id, &link).await;
    let fetched = derrick
        .request("POST", &format!("/workspaces/{id}/fetch"), None)
        .await;
    assert_eq!(fetched.status, 400, "{}", fetched.body);
    let message = fetched.body["error"]["message"].as_str().expect("message");
    assert!(message.contains("is not a folder"), "{message}");
    assert!(
        !message.contains(&host.path().display().to_string()),
        "{message}"
    );
    let head = Command::new("git")
        .arg("-C")
        .arg(&host_repository)
        .args(["rev-parse", "HEAD"])
        .output()
        .expect("git rev-parse");
    assert_eq!(String::from_utf8_lossy(&head.stdout).trim(), host_head);
    let listing = derrick.output(&id, "ls code/app/ 2>&1 || true").await;
    assert!(!listing.contains("secret.txt"), "{listing}");
}

#[test]
fn cpus_beyond_the_engine_stop_start_up() {
    let folder = tempfile::tempdir().expect("temporary folder");
    let repository = sample_repository();
    let mut configuration = config(repository.path().display(), "");
    configuration["docker"] = json!({ "cpus": 1000 });
    let host =
        std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".to_owned());
    let stderr = failed_start(
        folder.path(),
        &configuration,
        &["--base-image", docker::test_image()],
        &host,
    );
    assert!(stderr.contains("`docker.cpus` is 1000"), "{stderr}");
    assert!(stderr.contains("give at most"), "{stderr}");
}

/// Derricks on one engine share layer images, so one that evicts (`--cache-max-bytes`) keeps
/// every layer that another derrick's container runs, and that derrick can still reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_other_derricks_layers() {
    let repository = sample_repository();
    let (other, id) = started(&repository).await;
    let record = other.get(&format!("/workspaces/{id}")).await.body;
    let setup_key = record["layers"][2]["key"]
        .as_str()
        .expect("setup key")
        .to_owned();

    let evicting = Derrick::start_provider(
        Transport::Http,
        ProviderKind::Docker,
        &config(repository.path().display(), "echo other setup"),
        &["--cache-max-bytes", "1"],
        &[],
    );
    let created = evicting.create_id().await;
    assert!(!created.is_empty());
    let image = Command::new("docker")
        .args(["image", "inspect", &format!("derrick-layer:{setup_key}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("docker image inspect");
    assert!(
        image.success(),
        "the other derrick's setup layer was evicted"
    );
    let reset = other
        .request("POST", &format!("/workspaces/{id}/reset"), None)
        .await;
    assert_eq!(reset.status, 200, "{}", reset.body);
}
