//! `-p remote_nats` in front of `derrick worker` processes. Creates spread over the workers and
//! operations reach the owner. A killed worker fails its workspaces within 10 s while the others
//! keep working. Oversized messages get an explicit error, and a restarted controller finds the
//! owners again. The contract suite runs through one worker too (`contract::<case>::remote`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::derrick::{
    Derrick, Reply, config, processes_matching, wait_for_process, wait_until,
};
use crate::support::nats::NatsServer;
use crate::support::remote::{Cluster, Worker};
use crate::support::repos::TestRepo;

/// The bound within which a stopped worker's workspaces must fail.
const FAILURE_BOUND: Duration = Duration::from_secs(10);

fn sample_config() -> (TestRepo, Value) {
    let repository = TestRepo::new();
    repository.write("README.md", "hello\n");
    repository.commit("initial");
    let config = config(repository.path().display(), "echo set > setup.txt");
    (repository, config)
}

/// Returns the id of the worker whose cache contains workspace `id`, asserting there is one.
fn owner_of(cluster: &Cluster, id: &str) -> String {
    let owners: Vec<&str> = cluster
        .workers
        .iter()
        .filter(|worker| worker.workspace_root(id).exists())
        .map(Worker::id)
        .collect();
    assert_eq!(owners.len(), 1, "workspace {id} is on {owners:?}");
    owners[0].to_owned()
}

fn check_error(reply: &Reply, status: u16, code: &str, label: &str) -> String {
    assert_eq!(reply.status, status, "{label}: {}", reply.body);
    assert_eq!(reply.body["error"]["code"], code, "{label}: {}", reply.body);
    reply.body["error"]["message"]
        .as_str()
        .expect("message")
        .to_owned()
}

/// Twenty creates through the controller land on both workers, because the queue group picks a
/// worker at random for each. All twenty land on one worker with a chance of 2^-19. Every later
/// operation reaches the owner, and the list merges both workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_spread_over_two_workers() {
    let (_repository, config) = sample_config();
    let cluster = Cluster::start(&config, 2);
    let controller = cluster.controller(&config);

    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(controller.create_id().await);
    }
    let owners: Vec<String> = ids.iter().map(|id| owner_of(&cluster, id)).collect();
    for worker in ["worker-1", "worker-2"] {
        assert!(
            owners.iter().any(|owner| owner == worker),
            "no create reached {worker}: {owners:?}"
        );
    }

    for (id, owner) in ids.iter().zip(&owners) {
        let output = controller
            .output(id, "cat setup.txt && echo $DERRICK_WORKSPACE_ID")
            .await;
        assert_eq!(output, format!("set\n{id}\n"));
        let marker = cluster.worker(owner).workspace_root(id).join("setup.txt");
        assert_eq!(
            std::fs::read_to_string(marker).expect("on the owner"),
            "set\n"
        );
    }

    let listed = controller.get("/workspaces").await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    let mut listed_ids: Vec<&str> = listed.body["workspaces"]
        .as_array()
        .expect("workspaces")
        .iter()
        .map(|workspace| workspace["id"].as_str().expect("id"))
        .collect();
    listed_ids.sort_unstable();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(listed_ids, expected);

    let record = controller.get(&format!("/workspaces/{}", ids[0])).await;
    assert_eq!(record.status, 200, "{}", record.body);
    assert_eq!(record.body["state"], "running");
    let destroyed = controller
        .request("DELETE", &format!("/workspaces/{}", ids[0]), None)
        .await;
    assert_eq!(destroyed.body, json!(true));
    assert!(!cluster.worker(&owners[0]).workspace_root(&ids[0]).exists());
}

/// A worker killed during a command: that request and every later one on its workspaces fail
/// with `provider_unavailable` within 10 s, while the other worker's workspaces keep working and
/// new creates go to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_fails_its_workspaces_only() {
    let (_repository, config) = sample_config();
    let mut cluster = Cluster::start(&config, 2);
    let controller = Arc::new(cluster.controller(&config));
    let mut by_worker: Vec<(String, String)> = Vec::new();
    for _ in 0..40 {
        let id = controller.create_id().await;
        let owner = owner_of(&cluster, &id);
        if !by_worker.iter().any(|(worker, _)| *worker == owner) {
            by_worker.push((owner, id));
        }
        if by_worker.len() == 2 {
            break;
        }
    }
    assert_eq!(by_worker.len(), 2, "40 creates reached one worker only");
    let victim = by_worker.iter().find(|(worker, _)| worker == "worker-1");
    let survivor = by_worker.iter().find(|(worker, _)| worker == "worker-2");
    let (_, doomed) = victim.expect("worker-1 has a workspace").clone();
    let (_, kept) = survivor.expect("worker-2 has a workspace").clone();

    let running = {
        let controller = controller.clone();
        let doomed = doomed.clone();
        tokio::spawn(async move {
            let body = json!({ "cmd": "sleep 83; echo finished", "timeout": 120 });
            controller
                .post(&format!("/workspaces/{doomed}/cmd_with_output"), body)
                .await
        })
    };
    wait_for_process("sleep 83; echo finished").await;
    let killed_at = Instant::now();
    cluster.workers[0].kill();

    let reply = running.await.expect("request task");
    let took = killed_at.elapsed();
    let message = check_error(&reply, 503, "provider_unavailable", "in-flight command");
    assert!(took < FAILURE_BOUND, "the in-flight request took {took:?}");
    assert!(message.contains("`worker-1`"), "{message}");
    assert!(message.contains(&doomed), "{message}");

    let started = Instant::now();
    let later = controller
        .post(
            &format!("/workspaces/{doomed}/cmd_with_output"),
            json!({ "cmd": "true" }),
        )
        .await;
    check_error(&later, 503, "provider_unavailable", "later command");
    let reset = controller
        .post(&format!("/workspaces/{doomed}/reset"), json!({}))
        .await;
    check_error(&reset, 503, "provider_unavailable", "later reset");
    assert!(started.elapsed() < FAILURE_BOUND, "{:?}", started.elapsed());

    assert_eq!(controller.output(&kept, "cat setup.txt").await, "set\n");
    for _ in 0..5 {
        let id = controller.create_id().await;
        assert_eq!(owner_of(&cluster, &id), "worker-2");
    }
    let listed = controller.get("/workspaces").await;
    let listed = listed.body["workspaces"].as_array().expect("workspaces");
    assert!(
        listed
            .iter()
            .all(|workspace| workspace["id"] != doomed.as_str()),
        "the killed worker's workspace is listed"
    );
    assert!(
        listed
            .iter()
            .any(|workspace| workspace["id"] == kept.as_str()),
        "the live worker's workspace is missing"
    );

    // A new process on the killed worker's folders removes the mounts and the orphaned sleep.
    let killed = cluster.workers.remove(0);
    cluster
        .workers
        .insert(0, killed.restart(&cluster.server, &config));
    assert!(
        wait_until(Duration::from_secs(10), || processes_matching(
            "sleep 83; echo finished"
        )
        .is_empty())
        .await,
        "the orphaned command survived the worker's restart"
    );
}

/// A reply over the NATS server's maximum payload, such as a 2 MB `read_file`, reaches the
/// controller's HTTP client as `413 payload_too_large` at once; so does a request that is too
/// large for NATS. Smaller files pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_get_explicit_errors() {
    use base64::Engine as _;

    let (_repository, config) = sample_config();
    let cluster = Cluster::start(&config, 1);
    let controller = cluster.controller(&config);
    let id = controller.create_id().await;
    controller
        .output(
            &id,
            "head -c 2000000 /dev/urandom > big.bin && head -c 600000 /dev/urandom > small.bin",
        )
        .await;

    let started = Instant::now();
    let big = controller
        .post(
            &format!("/workspaces/{id}/read_file"),
            json!({ "path": "big.bin" }),
        )
        .await;
    let message = check_error(&big, 413, "payload_too_large", "read_file");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    for expected in [
        "`derrick.worker.worker-1.workspaces.read_file`",
        "over the limit of 1048576 bytes",
        "max_payload",
    ] {
        assert!(message.contains(expected), "{expected} missing: {message}");
    }

    let small = controller
        .post(
            &format!("/workspaces/{id}/read_file"),
            json!({ "path": "small.bin" }),
        )
        .await;
    assert_eq!(small.status, 200, "{}", small.body);
    let on_disk =
        std::fs::read(cluster.workers[0].workspace_root(&id).join("small.bin")).expect("small.bin");
    assert_eq!(small.bytes, on_disk);

    let content = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 2_000_000]);
    let written = controller
        .post(
            &format!("/workspaces/{id}/write_file"),
            json!({ "path": "upload.bin", "content": content }),
        )
        .await;
    let message = check_error(&written, 413, "payload_too_large", "write_file");
    assert!(message.contains("max_payload"), "{message}");
    assert!(
        !cluster.workers[0]
            .workspace_root(&id)
            .join("upload.bin")
            .exists()
    );
}

/// A controller started after the workspaces were created finds their owner by asking the
/// workers, so a controller restart loses no workspace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_controller_finds_owners() {
    let (_repository, config) = sample_config();
    let cluster = Cluster::start(&config, 2);
    let first = cluster.controller(&config);
    let ids = [first.create_id().await, first.create_id().await];
    drop(first);

    let second: Derrick = cluster.controller(&config);
    for id in &ids {
        assert_eq!(second.output(id, "cat setup.txt").await, "set\n");
    }
    let missing = second
        .post(
            "/workspaces/ws-00000000000000000000000000000000/cmd",
            json!({ "cmd": "true" }),
        )
        .await;
    check_error(&missing, 404, "workspace_not_found", "unknown id");
}

/// A worker stopped with SIGTERM announces it in a last heartbeat, so its workspaces fail at once
/// instead of after the silence bound, and creates fail with a clear error once no worker runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_worker_is_unavailable_at_once() {
    let (_repository, config) = sample_config();
    let mut cluster = Cluster::start(&config, 1);
    let controller = cluster.controller(&config);
    let id = controller.create_id().await;

    drop(cluster.workers.remove(0));
    assert!(
        wait_until(Duration::from_secs(5), || controller
            .log()
            .contains("worker stopping"))
        .await,
        "no stopping heartbeat; log:\n{}",
        controller.log()
    );
    let reply = controller
        .post(&format!("/workspaces/{id}/cmd"), json!({ "cmd": "true" }))
        .await;
    let message = check_error(&reply, 503, "provider_unavailable", "command");
    assert!(
        message.contains("`worker-1` (the owner of workspace"),
        "{message}"
    );
    assert!(message.contains(") stopped;"), "{message}");

    let create = controller.request("POST", "/workspaces", None).await;
    let message = check_error(&create, 503, "provider_unavailable", "create");
    assert!(message.contains("derrick worker"), "{message}");

    // The stopped worker keeps its workspace, so an empty list would be wrong.
    let listed = controller.get("/workspaces").await;
    let message = check_error(&listed, 503, "provider_unavailable", "list");
    assert!(
        message.contains("no derrick worker replied to `derrick.worker.list`"),
        "{message}"
    );
}

/// With the NATS server down, the controller replies `503 provider_unavailable` naming NATS,
/// for a list as for an operation on a known workspace, instead of an empty list, and a worker
/// stopped with SIGTERM exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_without_nats_is_unavailable() {
    let (_repository, config) = sample_config();
    let mut cluster = Cluster::start(&config, 1);
    let controller = cluster.controller(&config);
    let id = controller.create_id().await;

    cluster.server.kill();
    // Until the controller's client notices the closed connection, a list goes out and gets no
    // answer, which is `provider_unavailable` as well.
    let deadline = Instant::now() + FAILURE_BOUND;
    let message = loop {
        let listed = controller.get("/workspaces").await;
        let message = check_error(&listed, 503, "provider_unavailable", "list");
        if message.contains("not connected to NATS") || Instant::now() > deadline {
            break message;
        }
        assert!(
            message.contains("no derrick worker replied to"),
            "{message}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        message.contains("the controller is not connected to NATS at nats://127.0.0.1:"),
        "{message}"
    );

    let started = Instant::now();
    let command = controller
        .post(&format!("/workspaces/{id}/cmd"), json!({ "cmd": "true" }))
        .await;
    let message = check_error(&command, 503, "provider_unavailable", "command");
    assert!(message.contains("not connected to NATS"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // The worker's shutdown bounds its waits for NATS, so SIGTERM still stops it.
    let status = cluster.workers[0].stop(Duration::from_secs(20));
    assert!(
        status.is_some_and(|status| status.success()),
        "{status:?}; log:\n{}",
        cluster.logs()
    );
}

/// A controller that serves `-s nats` on the workers' subject prefix leaves the worker subjects
/// to the workers, and forwards its own requests to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_controller_shares_the_prefix() {
    let (_repository, config) = sample_config();
    let server = NatsServer::start();
    let worker = Worker::start(&server, &config, "worker-1");
    let controller = Derrick::start_nats(server, &config, &["-p", "remote_nats"], &[]);
    let controller = controller.attach(Box::new(worker), None);

    let id = controller.create_id().await;
    assert_eq!(controller.output(&id, "cat setup.txt").await, "set\n");
    let listed = controller.get("/workspaces").await;
    assert_eq!(listed.body["workspaces"][0]["id"], id.as_str());
    assert!(
        !controller.log().contains("derrick.worker.create"),
        "the controller handled worker traffic; log:\n{}",
        controller.log()
    );
}

/// `sleep 75; echo ok` with a 120-second timeout replies `ok` through a worker: neither the
/// controller nor the worker puts a shorter bound on a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_command_replies_through_a_worker() {
    let (_repository, config) = sample_config();
    let cluster = Cluster::start(&config, 1);
    let controller = cluster.controller(&config);
    let id = controller.create_id().await;

    let reply = controller
        .post(
            &format!("/workspaces/{id}/cmd_with_output"),
            json!({ "cmd": "sleep 75; echo ok", "timeout": 120 }),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["output"], "ok\n");
    assert_eq!(reply.body["exit_code"], 0);
    assert_eq!(reply.body["timed_out"], false);
}

/// Two workers with `--max-workspaces 1`: the second create reaches the worker that still has
/// room, whichever worker the queue group picks, and the third is `429 workspace_limit_reached`
/// naming both workers, as a full local derrick replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_worker_passes_create_on() {
    let (_repository, config) = sample_config();
    let cluster = Cluster::start_with(&config, 2, &["--max-workspaces", "1"]);
    let controller = cluster.controller(&config);

    let first = controller.create_id().await;
    let second = controller.create_id().await;
    let mut owners = [owner_of(&cluster, &first), owner_of(&cluster, &second)];
    owners.sort_unstable();
    assert_eq!(owners, ["worker-1", "worker-2"]);

    let refused = controller.request("POST", "/workspaces", None).await;
    let message = check_error(&refused, 429, "workspace_limit_reached", "third create");
    for expected in ["worker-1", "worker-2", "--max-workspaces"] {
        assert!(message.contains(expected), "{expected} missing: {message}");
    }
    let listed = controller.get("/workspaces").await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(listed.body["workspaces"].as_array().expect("list").len(), 2);

    let freed = owner_of(&cluster, &first);
    controller
        .request("DELETE", &format!("/workspaces/{first}"), None)
        .await;
    let third = controller.create_id().await;
    assert_eq!(owner_of(&cluster, &third), freed);
}

/// A worker started with the id of a live worker exits with an error that names the id, and the
/// first worker's workspaces stay reachable and listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_worker_id_is_refused() {
    let (_repository, config) = sample_config();
    let cluster = Cluster::start(&config, 1);
    let controller = cluster.controller(&config);
    let id = controller.create_id().await;

    let (status, log) = Worker::run_to_exit(&cluster.server, &config, "worker-1", &[]);
    assert!(
        !status.success(),
        "the duplicate worker served; log:\n{log}"
    );
    assert!(
        log.contains("worker id `worker-1` is already in use: a live worker answered"),
        "{log}"
    );
    assert!(log.contains("--worker-id"), "{log}");

    assert_eq!(controller.output(&id, "cat setup.txt").await, "set\n");
    let listed = controller.get("/workspaces").await;
    assert_eq!(
        listed.body["workspaces"][0]["id"],
        id.as_str(),
        "{}",
        listed.body
    );
}

/// A controller stopped with SIGTERM answers a forwarded command that outlives
/// `--shutdown-grace` with `503 provider_unavailable` and exits, while the worker goes on with
/// the command. At start it names the flags that only workers use in one warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_shutdown_honours_grace() {
    let (_repository, config) = sample_config();
    let cluster = Cluster::start(&config, 1);
    let flags = [
        "--shutdown-grace",
        "1",
        "--max-workspaces",
        "5",
        "--idle-timeout",
        "60",
    ];
    let mut controller = cluster.controller_with(&config, &flags);
    let log = controller.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("ignores these flags"))
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("flags=--cache-dir --state-dir --max-workspaces --idle-timeout"),
        "{}",
        warnings[0]
    );

    let id = controller.create_id().await;
    let command = "sleep 47; echo finished";
    let request = {
        let url = format!("{}/workspaces/{id}/cmd_with_output", controller.base_url());
        tokio::spawn(async move {
            let body = json!({ "cmd": command, "timeout": 120 });
            let reply = reqwest::Client::new().post(url).json(&body).send().await;
            let reply = reply.expect("the controller replies before it exits");
            let status = reply.status().as_u16();
            (status, reply.json::<Value>().await.expect("json body"))
        })
    };
    wait_for_process(command).await;

    let stopped_at = Instant::now();
    controller.terminate();
    let (status, body) = request.await.expect("request task");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "provider_unavailable", "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("the controller stopped before worker `worker-1`"),
        "{message}"
    );
    assert!(
        wait_until(FAILURE_BOUND, || controller.exit_status().is_some()).await,
        "the controller did not exit; log:\n{}",
        controller.log()
    );
    assert!(
        stopped_at.elapsed() < FAILURE_BOUND,
        "{:?}",
        stopped_at.elapsed()
    );
    assert!(
        !processes_matching(command).is_empty(),
        "the worker's command stopped"
    );

    let second = cluster.controller(&config);
    let destroyed = second
        .request("DELETE", &format!("/workspaces/{id}"), None)
        .await;
    assert_eq!(destroyed.body, json!(true));
}
