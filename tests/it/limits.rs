//! Operator limits: `--max-workspaces` and `--idle-timeout`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::derrick::{Derrick, config};
use crate::support::repos::TestRepo;

fn sample_repository() -> TestRepo {
    let repository = TestRepo::new();
    repository.write("README.md", "hello\n");
    repository.commit("initial");
    repository
}

async fn listed_ids(derrick: &Derrick) -> Vec<String> {
    let listed = derrick.get("/workspaces").await.body;
    listed["workspaces"]
        .as_array()
        .expect("workspaces")
        .iter()
        .map(|summary| summary["id"].as_str().expect("id").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_beyond_max_workspaces_is_429() {
    let repository = sample_repository();
    let derrick = Derrick::start_with(
        &config(repository.path().display(), ""),
        &["--max-workspaces", "2"],
        &[],
    );
    let first = derrick.create_id().await;
    derrick.create_id().await;

    let refused = derrick.post("/workspaces", json!({})).await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(refused.body["error"]["code"], "workspace_limit_reached");
    let message = refused.body["error"]["message"].as_str().expect("message");
    assert!(message.contains("2 workspaces"), "{message}");
    assert!(message.contains("--max-workspaces"), "{message}");
    assert_eq!(listed_ids(&derrick).await.len(), 2);

    let destroyed = derrick
        .request("DELETE", &format!("/workspaces/{first}"), None)
        .await;
    assert_eq!(destroyed.status, 200, "{}", destroyed.body);
    let created = derrick.post("/workspaces", json!({})).await;
    assert_eq!(created.status, 200, "{}", created.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_workspaces_are_destroyed() {
    let repository = sample_repository();
    let derrick = Derrick::start_with(
        &config(repository.path().display(), ""),
        &["--idle-timeout", "2"],
        &[],
    );
    let idle = derrick.create_id().await;
    let active = derrick.create_id().await;
    let busy = derrick.create_id().await;

    let long_command = {
        let url = format!("{}/workspaces/{busy}/cmd_with_output", derrick.base_url());
        tokio::spawn(async move {
            let body = json!({ "cmd": "sleep 4; echo done" });
            let response = reqwest::Client::new().post(url).json(&body).send().await;
            response
                .expect("reply")
                .json::<Value>()
                .await
                .expect("json")
        })
    };
    // `active` gets a command every 200 ms until the idle workspace is gone and the long
    // command has ended.
    let deadline = Instant::now() + Duration::from_secs(10);
    while listed_ids(&derrick).await.contains(&idle) || !long_command.is_finished() {
        assert!(Instant::now() < deadline, "the idle workspace was kept");
        assert_eq!(derrick.output(&active, "echo hi").await, "hi\n");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let reply = long_command.await.expect("request task");
    assert_eq!(reply["output"], "done\n", "{reply}");
    assert_eq!(reply["exit_code"], 0, "{reply}");
    let remaining = listed_ids(&derrick).await;
    assert!(remaining.contains(&active), "{remaining:?}");
    assert!(remaining.contains(&busy), "{remaining:?}");
    assert!(
        derrick
            .log()
            .lines()
            .any(|line| line.contains("destroyed an idle workspace") && line.contains(&idle)),
        "{}",
        derrick.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clock_starts_after_slow_create() {
    let repository = sample_repository();
    let derrick = Derrick::start_with(
        &config(repository.path().display(), "sleep 3"),
        &["--idle-timeout", "2"],
        &[],
    );
    let id = derrick.create_id().await;
    // Half the idle timeout: the reaper checks every 500 ms, twice in this wait, and would have
    // destroyed a workspace whose idle clock started with its 3-second create.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(derrick.output(&id, "echo kept").await, "kept\n");
}
