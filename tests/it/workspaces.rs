//! HTTP-only checks beyond the contract suite: the full record after a lifecycle, the removal of
//! a destroyed workspace's folder, the file size limit and independence of workspaces.

use serde_json::json;

use crate::support::derrick::{Derrick, config};
use crate::support::repos::TestRepo;

fn sample_repository() -> TestRepo {
    let repository = TestRepo::new();
    repository.write("README.md", "hello\n");
    repository.write("src/main.rs", "fn main() {}\n");
    repository.commit("initial");
    repository
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_over_every_endpoint() {
    let repository = sample_repository();
    let head = repository.head();
    let derrick = Derrick::start(&config(repository.path().display(), "echo set > setup.txt"));

    let created = derrick.create().await;
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(created["state"], "clean_snapshotted");
    assert_eq!(created["cache"]["hit"], "none");
    for step in ["provision", "clone", "setup", "snapshot"] {
        assert!(
            created["durations_ms"][step].is_u64(),
            "missing {step} in {created}"
        );
    }

    let listed = derrick.get("/workspaces").await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.body["workspaces"][0]["id"], id.as_str());
    assert_eq!(listed.body["workspaces"][0]["state"], "clean_snapshotted");

    let record = derrick.get(&format!("/workspaces/{id}")).await;
    assert_eq!(record.status, 200);
    let states: Vec<&str> = record.body["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|h| h["state"].as_str().expect("state"))
        .collect();
    assert_eq!(
        states,
        ["provisioned", "cloned", "setup", "clean_snapshotted"]
    );
    let kinds: Vec<&str> = record.body["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(kinds, ["base", "repositories", "setup"]);
    assert_eq!(record.body["repositories"][0]["commit"], head.as_str());
    assert!(record.body["history"][1]["duration_ms"].is_u64());

    let command = derrick
        .post(
            &format!("/workspaces/{id}/cmd"),
            json!({ "cmd": "test -f setup.txt" }),
        )
        .await;
    assert_eq!(
        (command.status, command.body.clone()),
        (200, json!({ "exit_code": 0 }))
    );

    let output = derrick
        .run(
            &id,
            "cat code/app/README.md; git -C code/app rev-parse HEAD",
        )
        .await;
    assert_eq!(output["output"], format!("hello\n{head}\n"));
    assert_eq!(output["exit_code"], 0);
    assert_eq!(output["timed_out"], false);
    assert_eq!(output["truncated"], false);
    assert!(output["duration_ms"].is_u64());

    let written = derrick
        .post(
            &format!("/workspaces/{id}/write_file"),
            json!({ "path": "/code/app/new/dir/file.txt", "content": "aGk=" }),
        )
        .await;
    assert_eq!(
        (written.status, written.body.clone()),
        (200, json!({ "success": true }))
    );
    let read = derrick
        .post(
            &format!("/workspaces/{id}/read_file"),
            json!({ "path": "dir/file.txt", "working_dir": "/code/app/new" }),
        )
        .await;
    assert_eq!(read.status, 200);
    assert_eq!(read.bytes, b"hi");
    assert_eq!(
        read.content_type.as_deref(),
        Some("application/octet-stream")
    );
    assert_eq!(
        derrick.get(&format!("/workspaces/{id}")).await.body["state"],
        "running"
    );

    let reset = derrick
        .post(&format!("/workspaces/{id}/reset"), json!({}))
        .await;
    assert_eq!(reset.status, 200, "{}", reset.body);
    assert_eq!(reset.body["id"], id.as_str());
    assert_eq!(reset.body["state"], "clean_snapshotted");
    assert!(reset.body["duration_ms"].is_u64());

    let fetched = derrick
        .request("POST", &format!("/workspaces/{id}/fetch"), None)
        .await;
    assert_eq!(fetched.status, 200, "{}", fetched.body);
    assert_eq!(
        fetched.body["repositories"],
        json!([{ "path": "/code/app", "before": head, "after": head, "upstream": head }])
    );

    let destroyed = derrick
        .request("DELETE", &format!("/workspaces/{id}"), None)
        .await;
    assert_eq!((destroyed.status, destroyed.body), (200, json!(true)));
    let gone = derrick.get(&format!("/workspaces/{id}")).await;
    assert_eq!(gone.status, 404);
    assert_eq!(gone.body["error"]["code"], "workspace_not_found");
    assert_eq!(
        derrick.get("/workspaces").await.body,
        json!({ "workspaces": [] })
    );
    assert!(
        !derrick.workspace_root(&id).exists(),
        "destroy leaves the workspace folder"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_file_read_is_413() {
    let repository = sample_repository();
    let derrick = Derrick::start(&config(repository.path().display(), ""));
    let id = derrick.create_id().await;
    derrick.output(&id, "truncate -s 65M big.bin").await;

    let reply = derrick
        .post(
            &format!("/workspaces/{id}/read_file"),
            json!({ "path": "big.bin" }),
        )
        .await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.body["error"]["code"], "payload_too_large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_workspace_never_blocks_another() {
    let repository = sample_repository();
    let derrick = std::sync::Arc::new(Derrick::start(&config(repository.path().display(), "")));
    let busy = derrick.create_id().await;
    let other = derrick.create_id().await;
    derrick.output(&other, "echo data > data.txt").await;

    let sleeper = {
        let derrick = derrick.clone();
        let busy = busy.clone();
        tokio::spawn(async move { derrick.run(&busy, "sleep 30").await })
    };
    let started = std::time::Instant::now();
    assert!(
        crate::support::derrick::wait_until(std::time::Duration::from_secs(10), || {
            !crate::support::derrick::processes_matching("sleep 30").is_empty()
        })
        .await,
        "the sleep never started"
    );

    let probe = std::time::Instant::now();
    assert_eq!(derrick.get("/health").await.status, 200);
    assert_eq!(derrick.get("/workspaces").await.status, 200);
    assert_eq!(
        derrick.get(&format!("/workspaces/{busy}")).await.status,
        200
    );
    assert_eq!(derrick.output(&other, "cat data.txt").await, "data\n");
    let read = derrick
        .post(
            &format!("/workspaces/{other}/read_file"),
            json!({ "path": "data.txt" }),
        )
        .await;
    assert_eq!(read.bytes, b"data\n");
    assert!(
        probe.elapsed() < std::time::Duration::from_secs(1),
        "other operations took {:?}",
        probe.elapsed()
    );

    let reset = derrick
        .post(&format!("/workspaces/{busy}/reset"), json!({}))
        .await;
    assert_eq!(reset.status, 200, "{}", reset.body);
    let interrupted = sleeper.await.expect("sleeper task");
    assert_ne!(interrupted["exit_code"], 0);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "reset waited for the sleep"
    );
}
