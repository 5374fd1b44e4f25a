//! Failure paths: force-pushed upstreams, clients that disconnect, and requests outside the
//! contract. Shutdowns, crashes and restarts are in `restarts`.

use std::time::Duration;

use serde_json::json;

use crate::support::derrick::{Derrick, config, wait_until};
use crate::support::repos::{TestRepo, git};

fn one_commit_repository() -> TestRepo {
    let repository = TestRepo::new();
    repository.write("a.txt", "one\n");
    repository.commit("one");
    repository
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_pushed_upstream_reaches_workspaces() {
    let repository = one_commit_repository();
    repository.write("a.txt", "two\n");
    repository.commit("two");
    let derrick = Derrick::start(&config(repository.path().display(), ""));
    let id = derrick.create_id().await;

    git(repository.path(), ["reset", "--hard", "--quiet", "HEAD~1"]);
    repository.write("a.txt", "rewritten\n");
    let rewritten = repository.commit("rewritten");

    let fetched = derrick
        .request("POST", &format!("/workspaces/{id}/fetch"), None)
        .await;
    assert_eq!(fetched.status, 200, "{}", fetched.body);
    assert_eq!(fetched.body["repositories"][0]["after"], rewritten.as_str());
    assert_eq!(
        derrick.output(&id, "cat code/app/a.txt").await,
        "rewritten\n"
    );

    assert_eq!(
        derrick
            .post(&format!("/workspaces/{id}/reset"), json!({}))
            .await
            .status,
        200
    );
    assert_eq!(
        derrick
            .output(&id, "git -C code/app rev-parse HEAD")
            .await
            .trim(),
        rewritten
    );
    assert_eq!(
        derrick
            .output(&id, "git -C code/app status --porcelain")
            .await,
        ""
    );

    let warm = derrick.create_id().await;
    assert_eq!(
        derrick.output(&warm, "cat code/app/a.txt").await,
        "rewritten\n"
    );

    derrick
        .output(
            &id,
            "cd code/app && echo mine > a.txt && git commit -qam mine",
        )
        .await;
    let local = derrick.output(&id, "git -C code/app rev-parse HEAD").await;
    repository.write("a.txt", "upstream\n");
    repository.commit("upstream");
    let kept = derrick
        .request("POST", &format!("/workspaces/{id}/fetch"), None)
        .await;
    assert_eq!(
        kept.body["repositories"][0]["after"],
        local.trim(),
        "a fetch dropped the agent's commit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnected_create_still_completes() {
    let repository = one_commit_repository();
    let derrick = Derrick::start(&config(
        repository.path().display(),
        "sleep 2; echo done > setup.txt",
    ));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .expect("client");
    let base = derrick.base_url().to_owned();
    let abandoned = client.post(format!("{base}/workspaces")).send().await;
    assert!(
        abandoned.is_err(),
        "the create should outlast the client's timeout"
    );

    let finished = wait_until(Duration::from_secs(20), || {
        std::fs::read_dir(derrick.state_dir().join("workspaces")).is_ok_and(|entries| {
            entries.filter_map(Result::ok).any(|entry| {
                std::fs::read_to_string(entry.path())
                    .is_ok_and(|text| text.contains("\"state\": \"clean_snapshotted\""))
            })
        })
    })
    .await;
    assert!(finished, "the abandoned create did not finish");
    let listed = derrick.get("/workspaces").await.body;
    assert_eq!(listed["workspaces"][0]["state"], "clean_snapshotted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_outside_contract_get_errors() {
    let repository = one_commit_repository();
    let derrick = Derrick::start(&config(repository.path().display(), ""));
    let id = derrick.create_id().await;

    let method = derrick.request("PUT", "/workspaces", None).await;
    assert_eq!(method.status, 405);
    assert_eq!(method.body["error"]["code"], "method_not_allowed");

    let array = derrick
        .post_raw(
            &format!("/workspaces/{id}/cmd"),
            br#"["echo positional"]"#.to_vec(),
        )
        .await;
    assert_eq!(array.status, 400);
    assert_eq!(array.body["error"]["code"], "invalid_request");

    let duplicate = derrick
        .post(
            &format!("/workspaces/{id}/fetch"),
            json!({ "paths": ["/code/app", "code/app/"] }),
        )
        .await;
    assert_eq!(duplicate.status, 200);
    assert_eq!(
        duplicate.body["repositories"]
            .as_array()
            .expect("list")
            .len(),
        1
    );

    let oversized = vec![b'a'; 64 * 1024 * 1024 + 3];
    let content = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &oversized);
    let write = derrick
        .post(
            &format!("/workspaces/{id}/write_file"),
            json!({ "path": "big", "content": content }),
        )
        .await;
    assert_eq!(write.status, 413, "{}", write.body);
    assert_eq!(write.body["error"]["code"], "payload_too_large");
    assert!(!derrick.workspace_root(&id).join("big").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_after_fetch_keeps_agent_commit_out() {
    let repository = one_commit_repository();
    let derrick = Derrick::start(&config(repository.path().display(), ""));
    let id = derrick.create_id().await;
    let clean = repository.head();

    derrick
        .output(
            &id,
            "cd code/app && echo local > local.txt && git add local.txt && git commit -qm local",
        )
        .await;
    let fetched = derrick
        .request("POST", &format!("/workspaces/{id}/fetch"), None)
        .await;
    assert_eq!(fetched.status, 200, "{}", fetched.body);
    assert_ne!(
        fetched.body["repositories"][0]["after"],
        clean.as_str(),
        "the agent's commit should stay checked out"
    );

    let reset = derrick
        .post(&format!("/workspaces/{id}/reset"), json!({}))
        .await;
    assert_eq!(reset.status, 200, "{}", reset.body);
    assert_eq!(
        derrick
            .output(&id, "git -C code/app rev-parse HEAD")
            .await
            .trim(),
        clean
    );
    assert_eq!(
        derrick
            .output(&id, "git -C code/app status --porcelain")
            .await,
        ""
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_derrick_on_same_state_is_refused() {
    let repository = one_commit_repository();
    let configuration = config(repository.path().display(), "");
    let derrick = Derrick::start(&configuration);
    let id = derrick.create_id().await;
    derrick.output(&id, "echo kept > kept.txt").await;

    let config_path = derrick
        .state_dir()
        .parent()
        .expect("folder")
        .join("config.json");
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_derrick"))
        .args(["--listen", "127.0.0.1:0", "-w"])
        .arg(&config_path)
        .arg("--cache-dir")
        .arg(derrick.cache_dir())
        .arg("--state-dir")
        .arg(derrick.state_dir())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run a second derrick");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("in use by another derrick"), "{stderr}");
    assert!(!stderr.contains("left by an earlier run"), "{stderr}");

    assert_eq!(derrick.output(&id, "cat kept.txt").await, "kept\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_create_env_is_rejected() {
    let repository = one_commit_repository();
    let derrick = Derrick::start(&config(repository.path().display(), ""));
    let reply = derrick
        .post(
            "/workspaces",
            json!({ "env": { "BIG": "x".repeat(200_000) } }),
        )
        .await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(reply.body["error"]["code"], "invalid_request");
    assert_eq!(
        derrick.get("/workspaces").await.body["workspaces"],
        json!([])
    );
}

/// A fetch runs on the host, so a checkout that a command pointed elsewhere (`core.worktree`,
/// alternates, a gitfile) is refused with a 400, and nothing is written outside the workspace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_refuses_redirected_checkouts() {
    let repository = one_commit_repository();
    let derrick = Derrick::start(&config(repository.path().display(), ""));
    let outside = tempfile::tempdir().expect("temporary folder");
    let outside_path = outside.path().display().to_string();
    repository.write("new-file.txt", "new\n");
    repository.commit("two");

    let cases = [
        (
            format!("git -C code/app config core.worktree {outside_path}"),
            "sets `core.worktree` to another folder",
        ),
        (
            format!("echo {outside_path} > code/app/.git/objects/info/alternates"),
            "has `.git/objects/info/alternates`",
        ),
        (
            format!("rm -rf code/app/.git && echo 'gitdir: {outside_path}' > code/app/.git"),
            "has no `.git` folder of its own",
        ),
    ];
    for (attack, reason) in cases {
        let id = derrick.create_id().await;
        derrick.output(&id, &attack).await;
        let fetched = derrick
            .request("POST", &format!("/workspaces/{id}/fetch"), None)
            .await;
        assert_eq!(fetched.status, 400, "{attack}: {}", fetched.body);
        let message = fetched.body["error"]["message"].as_str().expect("message");
        assert!(message.contains(reason), "{attack}: {message}");
        assert!(message.contains("`/code/app`"), "{attack}: {message}");
        assert!(!message.contains(&outside_path), "{message}");
        let written = std::fs::read_dir(outside.path()).expect("outside").count();
        assert_eq!(
            written, 0,
            "{attack}: the fetch wrote outside the workspace"
        );
    }
}
