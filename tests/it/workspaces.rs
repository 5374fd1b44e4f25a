//! HTTP checks beyond the contract suite: the file size limit and the independence of
//! workspaces.

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
