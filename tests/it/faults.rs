//! Faults during a layer build: a full disk and a killed setup leave no partial layer and a clear
//! `failed` record.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::support::derrick::{Derrick, config};
use crate::support::repos::TestRepo;

fn sample_repository() -> TestRepo {
    let repository = TestRepo::new();
    repository.write("README.md", "hello\n");
    repository.commit("initial");
    repository
}

/// Names the kinds of the complete layers in a local cache (`base`, `repositories`, `setup`).
fn layer_kinds(cache_dir: &Path) -> Vec<String> {
    let mut kinds: Vec<String> = std::fs::read_dir(cache_dir.join("layers"))
        .expect("layers folder")
        .filter_map(Result::ok)
        .map(|entry| {
            let meta = std::fs::read(entry.path().join("meta.json")).expect("meta.json");
            let meta: Value = serde_json::from_slice(&meta).expect("meta json");
            meta["kind"].as_str().expect("kind").to_owned()
        })
        .collect();
    kinds.sort();
    kinds
}

fn entries_in(folder: &Path) -> usize {
    std::fs::read_dir(folder).map_or(0, |entries| entries.count())
}

/// Asserts a create that failed at `step` with `code`: the workspace is listed as `failed` with
/// that step, and neither the setup layer nor a staging folder is in the cache.
async fn assert_failed_build(derrick: &Derrick, step: &str, code: &str) -> Value {
    let reply = derrick.post("/workspaces", serde_json::json!({})).await;
    assert_eq!(reply.body["error"]["code"], code, "{}", reply.body);
    let listed = derrick.get("/workspaces").await.body;
    let id = listed["workspaces"][0]["id"]
        .as_str()
        .expect("a failed workspace");
    let record = derrick.get(&format!("/workspaces/{id}")).await.body;
    assert_eq!(record["state"], "failed", "{record}");
    assert_eq!(record["failure"]["step"], step, "{record}");
    let cache_dir = derrick.cache_dir();
    assert_eq!(layer_kinds(&cache_dir), ["base", "repositories"]);
    assert_eq!(
        entries_in(&cache_dir.join("tmp")),
        0,
        "a staging folder stayed"
    );
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_during_snapshot_caches_nothing() {
    let repository = sample_repository();
    let folder = tempfile::tempdir().expect("temporary folder");
    let cache_dir = folder.path().join("cache");
    std::fs::create_dir(&cache_dir).expect("cache folder");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(&cache_dir)
        .status()
        .expect("mount");
    assert!(mounted.success(), "mounting a tmpfs needs root");

    // In the copy format the snapshot copies the workspace: 4 MB of setup output fit once in
    // the 6 MB file system, not twice.
    let setup = "head -c 4000000 /dev/zero > big.bin";
    let derrick = Derrick::start_on(
        folder,
        &config(repository.path().display(), setup),
        &["--layers", "copy"],
        &[],
    );
    let record = assert_failed_build(&derrick, "snapshot", "internal").await;
    assert!(
        derrick.log().contains("No space left on device"),
        "{record}\n{}",
        derrick.log()
    );

    let folder = derrick.into_folder();
    let unmounted = Command::new("umount")
        .arg("-l")
        .arg(folder.path().join("cache"))
        .status()
        .expect("umount");
    assert!(unmounted.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_setup_caches_nothing() {
    let repository = sample_repository();
    let setup = "echo started; kill -9 $$";
    let derrick = Derrick::start(&config(repository.path().display(), setup));
    let record = assert_failed_build(&derrick, "setup", "setup_failed").await;
    assert_eq!(record["failure"]["exit_code"], 137, "{record}");
    assert_eq!(record["failure"]["output"], "started\n", "{record}");
}

/// Starts a create on a task of its own and returns its id once the setup script runs `marker`.
async fn create_in_background(
    derrick: &Derrick,
    marker: &str,
) -> (String, tokio::task::JoinHandle<(u16, Value)>) {
    let url = format!("{}/workspaces", derrick.base_url());
    let creating = tokio::spawn(async move {
        let response = reqwest::Client::new()
            .post(url)
            .send()
            .await
            .expect("create");
        let status = response.status().as_u16();
        (status, response.json().await.expect("json"))
    });
    crate::support::derrick::wait_for_process(marker).await;
    let listed = derrick.get("/workspaces").await.body;
    let id = listed["workspaces"][0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    (id, creating)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_during_create_keeps_the_setup_running() {
    let repository = sample_repository();
    let setup = "sleep 3.1; echo done > setup.txt";
    let derrick = Derrick::start(&config(repository.path().display(), setup));
    let (id, creating) = create_in_background(&derrick, "sleep 3.1").await;

    let reset = derrick
        .request("POST", &format!("/workspaces/{id}/reset"), None)
        .await;
    assert_eq!(reset.status, 409, "{}", reset.body);
    let (status, created) = creating.await.expect("create task");
    assert_eq!(status, 200, "{created}");
    assert_eq!(derrick.output(&id, "cat setup.txt").await, "done\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_during_create_is_not_a_setup_failure() {
    let repository = sample_repository();
    let derrick = Derrick::start(&config(repository.path().display(), "sleep 733"));
    let (id, creating) = create_in_background(&derrick, "sleep 733").await;

    let destroyed = derrick
        .request("DELETE", &format!("/workspaces/{id}"), None)
        .await;
    assert_eq!(destroyed.status, 200, "{}", destroyed.body);
    let (status, created) = creating.await.expect("create task");
    assert_eq!(status, 503, "{created}");
    assert_eq!(created["error"]["code"], "provider_unavailable");
    let message = created["error"]["message"].as_str().expect("message");
    assert!(message.contains("the workspace was destroyed"), "{message}");
    assert!(
        crate::support::derrick::processes_matching("sleep 733").is_empty(),
        "the setup script survived the destroy"
    );
}
