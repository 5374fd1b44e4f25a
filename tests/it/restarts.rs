//! Shutdowns, crashes and restarts: running requests get a bounded grace, and a restarted
//! derrick re-adopts the workspaces it can and removes, with a log line, those it cannot.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::derrick::{Derrick, config, processes_matching, wait_for_process, wait_until};
use crate::support::repos::TestRepo;

fn one_commit_repository() -> TestRepo {
    let repository = TestRepo::new();
    repository.write("a.txt", "one\n");
    repository.commit("one");
    repository
}

fn mounts_under(path: &std::path::Path) -> usize {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    mounts
        .lines()
        .filter(|line| line.contains(path.to_str().expect("utf-8")))
        .count()
}

/// Sends `cmd_with_output` on a task of its own and returns the reply body, or `None` when the
/// request failed.
fn command_in_background(
    derrick: &Derrick,
    id: &str,
    cmd: &str,
) -> tokio::task::JoinHandle<Option<Value>> {
    let url = format!("{}/workspaces/{id}/cmd_with_output", derrick.base_url());
    let body = json!({ "cmd": cmd, "timeout": 300 });
    tokio::spawn(async move {
        let request = reqwest::Client::new().post(url).json(&body).send();
        let response = tokio::time::timeout(Duration::from_secs(60), request)
            .await
            .ok()?
            .ok()?;
        response.json().await.ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_running_commands_finish_within_the_grace() {
    let repository = one_commit_repository();
    let mut derrick = Derrick::start_with(
        &config(repository.path().display(), ""),
        &["--shutdown-grace", "20"],
        &[],
    );
    let id = derrick.create_id().await;
    let running = command_in_background(&derrick, &id, "sleep 2.5; echo finished");
    wait_for_process("sleep 2.5").await;

    let status = derrick.stop();
    assert!(status.success(), "derrick exited with {status}");
    let reply = running.await.expect("request task").expect("a reply");
    assert_eq!(reply["output"], "finished\n", "{reply}");
    assert_eq!(reply["exit_code"], 0, "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_kills_commands_after_the_grace() {
    let repository = one_commit_repository();
    let mut derrick = Derrick::start_with(
        &config(repository.path().display(), ""),
        &["--shutdown-grace", "1"],
        &[],
    );
    let id = derrick.create_id().await;
    let root = derrick.workspace_root(&id);
    let running = command_in_background(&derrick, &id, "sleep 313");
    wait_for_process("sleep 313").await;

    let started = Instant::now();
    let status = derrick.stop();
    assert!(status.success(), "derrick exited with {status}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown waited {:?} for the command",
        started.elapsed()
    );
    let reply = running.await.expect("request task").expect("a reply");
    assert_eq!(reply["exit_code"], 137, "{reply}");
    assert!(processes_matching("sleep 313").is_empty());
    assert_eq!(mounts_under(&root), 0, "a stopped derrick left a mount");
    assert!(
        derrick
            .log()
            .contains("killing the commands still running at shutdown")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_re_adopts_workspaces_with_their_changes() {
    let repository = one_commit_repository();
    let configuration = config(repository.path().display(), "");
    let derrick = Derrick::start(&configuration);
    let clean = derrick.create_id().await;
    let changed = derrick.create_id().await;
    derrick.output(&changed, "echo mine > notes.txt").await;
    let create_env = json!({ "env": { "AGENT_NAME": "first" } });
    let reply = derrick.post("/workspaces", create_env).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let with_env = reply.body["id"].as_str().expect("id").to_owned();
    let root = derrick.workspace_root(&changed);
    let state_dir = derrick.state_dir();

    let folder = derrick.into_folder();
    assert_eq!(mounts_under(&root), 0, "a stopped derrick left a mount");
    let restarted = Derrick::start_on(folder, &configuration, &[], &[]);

    let listed = restarted.get("/workspaces").await.body;
    let states: Vec<(String, String)> = listed["workspaces"]
        .as_array()
        .expect("workspaces")
        .iter()
        .map(|summary| {
            let id = summary["id"].as_str().expect("id").to_owned();
            let state = summary["state"].as_str().expect("state").to_owned();
            (id, state)
        })
        .collect();
    let mut expected = vec![
        (clean.clone(), "clean_snapshotted".to_owned()),
        (changed.clone(), "running".to_owned()),
        (with_env.clone(), "clean_snapshotted".to_owned()),
    ];
    let mut states_sorted = states.clone();
    states_sorted.sort();
    expected.sort();
    assert_eq!(states_sorted, expected);
    for id in [&clean, &changed, &with_env] {
        assert!(
            restarted
                .log()
                .lines()
                .any(|line| line.contains(id.as_str()) && line.contains("re-adopted")),
            "no re-adoption line for {id}:\n{}",
            restarted.log()
        );
    }

    assert_eq!(restarted.output(&changed, "cat notes.txt").await, "mine\n");
    assert_eq!(
        restarted.output(&with_env, "echo $AGENT_NAME").await,
        "first\n"
    );
    let env_file = state_dir.join("workspaces").join(format!("{with_env}.env"));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&env_file)
            .expect("env file")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the stored env is readable by others");

    let reset = restarted
        .request("POST", &format!("/workspaces/{changed}/reset"), None)
        .await;
    assert_eq!(reset.status, 200, "{}", reset.body);
    assert_eq!(
        restarted
            .output(&changed, "test -e notes.txt || echo reset")
            .await,
        "reset\n"
    );
    let destroyed = restarted
        .request("DELETE", &format!("/workspaces/{with_env}"), None)
        .await;
    assert_eq!(destroyed.status, 200, "{}", destroyed.body);
    assert!(!env_file.exists(), "destroy left the stored env");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_restart_kills_old_processes() {
    let repository = one_commit_repository();
    let configuration = config(repository.path().display(), "");
    let derrick = Derrick::start(&configuration);
    let id = derrick.create_id().await;
    derrick
        .output(
            &id,
            "echo kept > notes.txt; setsid sleep 929 > /dev/null 2>&1 &",
        )
        .await;
    wait_for_process("sleep 929").await;
    let root = derrick.workspace_root(&id);

    let folder = derrick.crash();
    assert_eq!(mounts_under(&root), 1, "the crash should leave the mount");
    let restarted = Derrick::start_on(folder, &configuration, &[], &[]);
    assert!(
        wait_until(Duration::from_secs(5), || processes_matching("sleep 929")
            .is_empty())
        .await,
        "a process of the earlier run survived"
    );
    assert_eq!(mounts_under(&root), 1, "the workspace is mounted once");
    assert!(
        restarted.log().contains(&id) && restarted.log().contains("re-adopted"),
        "{}",
        restarted.log()
    );
    assert_eq!(restarted.output(&id, "cat notes.txt").await, "kept\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_removes_workspaces_it_cannot_re_adopt() {
    let repository = one_commit_repository();
    let configuration = config(repository.path().display(), "");
    let derrick = Derrick::start(&configuration);
    let interrupted = derrick.create_id().await;
    let vanished = derrick.create_id().await;
    let interrupted_root = derrick.workspace_root(&interrupted);
    let records = derrick.state_dir().join("workspaces");
    let cache_dir = derrick.cache_dir();

    let folder = derrick.crash();
    // A crash in the middle of a create leaves the record in a creating state.
    let record_path = records.join(format!("{interrupted}.json"));
    let record = std::fs::read_to_string(&record_path).expect("record");
    let record = record.replace("\"state\": \"clean_snapshotted\"", "\"state\": \"setup\"");
    std::fs::write(&record_path, record).expect("rewrite record");
    // A workspace whose folder an operator deleted while derrick was down.
    let vanished_folder = cache_dir.join("workspaces").join(&vanished);
    let unmounted = std::process::Command::new("umount")
        .arg(vanished_folder.join("root"))
        .status()
        .expect("umount");
    assert!(unmounted.success());
    std::fs::remove_dir_all(&vanished_folder).expect("remove the workspace folder");

    let restarted = Derrick::start_on(folder, &configuration, &[], &[]);
    let listed = restarted.get("/workspaces").await.body;
    assert_eq!(listed["workspaces"], json!([]), "{listed}");
    for (id, reason) in [
        (&interrupted, "it was still being created (state setup)"),
        (&vanished, "its environment is gone"),
    ] {
        assert!(
            restarted
                .log()
                .lines()
                .any(|line| line.contains(id.as_str())
                    && line.contains("removed a workspace left by an earlier run")
                    && line.contains(reason)),
            "no removal line for {id}:\n{}",
            restarted.log()
        );
        assert!(!records.join(format!("{id}.json")).exists());
        assert!(!records.join(format!("{id}.env")).exists());
    }
    assert_eq!(mounts_under(&interrupted_root), 0);
    assert!(!interrupted_root.exists());
    assert_eq!(restarted.create().await["cache"]["hit"], "setup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_other_layer_format_is_refused() {
    let repository = one_commit_repository();
    let configuration = config(repository.path().display(), "");
    let derrick = Derrick::start(&configuration);
    let id = derrick.create_id().await;
    let folder = derrick.into_folder();

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_derrick"))
        .args([
            "-p",
            "local",
            "-s",
            "http",
            "--listen",
            "127.0.0.1:0",
            "--layers",
            "copy",
        ])
        .arg("-w")
        .arg(folder.path().join("config.json"))
        .arg("--cache-dir")
        .arg(folder.path().join("cache"))
        .arg("--state-dir")
        .arg(folder.path().join("state"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run derrick");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("1 of provider `local/overlay`, while this derrick runs `local/copy`"),
        "{stderr}"
    );

    let restarted = Derrick::start_on(folder, &configuration, &[], &[]);
    assert_eq!(restarted.output(&id, "echo back").await, "back\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_workspace_survives_restart() {
    let repository = one_commit_repository();
    let configuration = config(repository.path().display(), "echo broken; exit 3");
    let derrick = Derrick::start(&configuration);
    let refused = derrick.post("/workspaces", json!({})).await;
    assert_eq!(
        refused.body["error"]["code"], "setup_failed",
        "{}",
        refused.body
    );
    let id = refused.body["error"]["workspace_id"]
        .as_str()
        .expect("workspace id")
        .to_owned();

    let restarted = Derrick::start_on(derrick.into_folder(), &configuration, &[], &[]);
    let record = restarted.get(&format!("/workspaces/{id}")).await;
    assert_eq!(record.status, 200, "{}", record.body);
    assert_eq!(record.body["state"], "failed");
    assert_eq!(record.body["failure"]["output"], "broken\n");
    let destroyed = restarted
        .request("DELETE", &format!("/workspaces/{id}"), None)
        .await;
    assert_eq!(destroyed.status, 200, "{}", destroyed.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_after_config_change_names_the_configuration() {
    let repository = one_commit_repository();
    let derrick = Derrick::start(&config(repository.path().display(), ""));
    let id = derrick.create_id().await;

    let other = one_commit_repository();
    let changed = json!({
        "name": "changed",
        "repositories": [{ "url": other.path().display().to_string(), "path": "/elsewhere" }],
        "setup_script": "",
    });
    let restarted = Derrick::start_on(derrick.into_folder(), &changed, &[], &[]);
    assert_eq!(restarted.output(&id, "cat code/app/a.txt").await, "one\n");
    let fetched = restarted
        .request("POST", &format!("/workspaces/{id}/fetch"), None)
        .await;
    assert_eq!(fetched.status, 400, "{}", fetched.body);
    let message = fetched.body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("was created from configuration `it`")
            && message.contains("served configuration `changed`"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_ends_the_grace() {
    let repository = one_commit_repository();
    let mut derrick = Derrick::start_with(
        &config(repository.path().display(), ""),
        &["--shutdown-grace", "60"],
        &[],
    );
    let id = derrick.create_id().await;
    let running = command_in_background(&derrick, &id, "sleep 317");
    wait_for_process("sleep 317").await;

    let started = Instant::now();
    derrick.terminate();
    let graced = wait_until(Duration::from_secs(10), || {
        derrick
            .log()
            .contains("a second signal kills running commands")
    });
    assert!(graced.await, "{}", derrick.log());
    derrick.terminate();
    let status = derrick.stop();
    assert!(status.success(), "derrick exited with {status}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let reply = running.await.expect("request task").expect("a reply");
    assert_eq!(reply["exit_code"], 137, "{reply}");
}
