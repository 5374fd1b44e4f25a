//! Credentials through `credentials_env`: clone and fetch work, the token stays out of the
//! workspace and the log, and a wrong or missing token fails fast with `git_failed`.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::derrick::{Derrick, config};
use crate::support::git_server::GitHttpServer;
use crate::support::repos::TestRepo;

const USER: &str = "agent";
const VARIABLE: &str = "IT_GIT_TOKEN";

fn token() -> String {
    format!("tok-{}", uuid::Uuid::new_v4().simple())
}

fn credential_config(url: &str) -> serde_json::Value {
    let mut configuration = config(url, "");
    configuration["repositories"][0]["credentials_env"] = json!(VARIABLE);
    configuration
}

/// Returns the files under `root` whose bytes contain `needle`.
fn files_containing(root: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(directory) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&directory) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            if file_type.is_dir() {
                pending.push(path);
            } else if file_type.is_file() {
                let bytes = std::fs::read(&path).unwrap_or_default();
                if bytes
                    .windows(needle.len())
                    .any(|window| window == needle.as_bytes())
                {
                    found.push(path.display().to_string());
                }
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_clones_and_fetches_without_leaking() {
    let repository = TestRepo::new();
    repository.write("a.txt", "one\n");
    repository.commit("one");
    let bare = repository.bare_clone();
    let token = token();
    let server = GitHttpServer::start(bare.root(), Some((USER, &token)));
    let url = server.url(bare.name());
    let token_value = format!("{USER}:{token}");
    let derrick = Derrick::start_with(&credential_config(&url), &[], &[(VARIABLE, &token_value)]);

    let id = derrick.create_id().await;
    assert_eq!(derrick.output(&id, "cat code/app/a.txt").await, "one\n");
    let environment = derrick.output(&id, "env").await;
    assert!(
        !environment.contains(&token),
        "the token is in the command environment"
    );
    assert_eq!(
        derrick
            .output(&id, "git -C code/app remote get-url origin")
            .await
            .trim(),
        url
    );

    repository.write("a.txt", "two\n");
    let second = repository.commit("two");
    repository.push_to(&bare);
    let fetched = derrick
        .request("POST", &format!("/workspaces/{id}/fetch"), None)
        .await;
    assert_eq!(fetched.status, 200, "{}", fetched.body);
    assert_eq!(fetched.body["repositories"][0]["after"], second.as_str());

    let started = Instant::now();
    let agent_fetch = derrick.run(&id, "git -C code/app fetch origin").await;
    assert_ne!(
        agent_fetch["exit_code"], 0,
        "an agent fetch without credentials must fail: {agent_fetch}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the agent's git fetch waited for a prompt"
    );

    assert_eq!(
        files_containing(&derrick.workspace_root(&id), &token),
        Vec::<String>::new()
    );
    assert_eq!(
        files_containing(&derrick.cache_dir(), &token),
        Vec::<String>::new()
    );
    assert_eq!(
        files_containing(&derrick.state_dir(), &token),
        Vec::<String>::new()
    );
    assert!(
        !server
            .request_lines()
            .iter()
            .any(|line| line.contains(&token)),
        "the token went into a URL"
    );
    assert!(!derrick.log().contains(&token), "the token is in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_token_works_on_next_fetch() {
    let repository = TestRepo::new();
    repository.write("a.txt", "one\n");
    repository.commit("one");
    let bare = repository.bare_clone();
    let old = token();
    let server = GitHttpServer::start(bare.root(), Some((USER, &old)));
    let configuration = credential_config(&server.url(bare.name()));
    let derrick = Derrick::start_with(&configuration, &[], &[(VARIABLE, &format!("{USER}:{old}"))]);
    let id = derrick.create_id().await;

    let new = token();
    server.set_credentials(Some((USER, &new)));
    let refused = derrick
        .request("POST", &format!("/workspaces/{id}/fetch"), None)
        .await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert_eq!(refused.body["error"]["code"], "git_failed");

    repository.write("a.txt", "two\n");
    let second = repository.commit("two");
    repository.push_to(&bare);
    let folder = derrick.into_folder();
    let derrick = Derrick::start_on(
        folder,
        &configuration,
        &[],
        &[(VARIABLE, &format!("{USER}:{new}"))],
    );
    let created = derrick.create().await;
    assert_eq!(created["cache"]["hit"], "setup");
    let id = created["id"].as_str().expect("id");
    assert_eq!(
        derrick
            .output(id, "git -C code/app rev-parse HEAD")
            .await
            .trim(),
        second
    );
    assert!(
        !derrick.log().contains(&new) && !derrick.log().contains(&old),
        "a token is in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_token_fails_fast() {
    let repository = TestRepo::new();
    repository.write("a.txt", "one\n");
    repository.commit("one");
    let bare = repository.bare_clone();
    let server = GitHttpServer::start(bare.root(), Some((USER, "right-token")));
    let url = server.url(bare.name());

    let cases: [(&str, &[(&str, &str)]); 3] = [
        ("wrong token", &[(VARIABLE, "agent:wrong-token")]),
        ("unset variable", &[]),
        ("empty variable", &[(VARIABLE, "")]),
    ];
    for (case, env) in cases {
        let attempts_before = server.auth_attempts();
        let derrick = Derrick::start_with(&credential_config(&url), &[], env);
        let started = Instant::now();
        let reply = derrick.request("POST", "/workspaces", None).await;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{case}: took {:?}",
            started.elapsed()
        );
        assert_eq!(reply.status, 422, "{case}: {}", reply.body);
        assert_eq!(reply.body["error"]["code"], "git_failed", "{case}");
        let message = reply.body["error"]["message"].as_str().expect("message");
        assert!(
            message.contains(VARIABLE),
            "{case}: the message does not name the variable: {message}"
        );
        assert!(
            !message.contains("wrong-token"),
            "{case}: the message shows the token"
        );
        assert!(
            server.auth_attempts() - attempts_before <= 3,
            "{case}: {} authenticated attempts",
            server.auth_attempts() - attempts_before
        );
        assert!(
            !derrick.log().contains("wrong-token"),
            "{case}: the log shows the token"
        );
    }

    let anonymous = Derrick::start(&config(&url, ""));
    let reply = anonymous.request("POST", "/workspaces", None).await;
    assert_eq!(reply.body["error"]["code"], "git_failed");
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("credentials_env"),
        "{}",
        reply.body
    );
}
