//! Snapshot reuse: warm creates skip clone and setup, never serve stale code, and failed setups
//! are never cached. Each case runs with overlay layers and with the copy fallback.

use std::path::Path;

use serde_json::json;

use crate::support::derrick::{Derrick, config};
use crate::support::repos::TestRepo;

const LAYER_MODES: [&str; 2] = ["overlay", "copy"];

fn counting_setup(counter: &Path) -> String {
    format!(
        "echo run >> {} && echo built > built.txt",
        counter.display()
    )
}

fn layer_kinds(cache_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(cache_dir.join("layers")) else {
        return Vec::new();
    };
    let mut kinds: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| std::fs::read(entry.path().join("meta.json")).ok())
        .map(|meta| {
            serde_json::from_slice::<serde_json::Value>(&meta).expect("meta.json is JSON")["kind"]
                .as_str()
                .expect("kind")
                .to_owned()
        })
        .collect();
    kinds.sort();
    kinds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_create_hits_setup_cache() {
    for mode in LAYER_MODES {
        let repository = TestRepo::new();
        repository.write("a.txt", "a\n");
        repository.commit("initial");
        let counter = tempfile::tempdir().expect("counter folder");
        let counter_file = counter.path().join("count");
        let derrick = Derrick::start_with(
            &config(repository.path().display(), &counting_setup(&counter_file)),
            &["--layers", mode],
            &[],
        );

        let cold = derrick.create().await;
        assert_eq!(cold["cache"]["hit"], "none", "{mode}");
        let mirror_marker = std::fs::read_dir(derrick.cache_dir().join("git"))
            .expect("git folder")
            .filter_map(Result::ok)
            .find(|entry| entry.path().extension().is_some_and(|ext| ext == "git"))
            .expect("a mirror exists")
            .path()
            .join("derrick-test-marker");
        std::fs::write(&mirror_marker, "kept").expect("write marker");

        let warm = derrick.create().await;
        assert_eq!(warm["cache"]["hit"], "setup", "{mode}: {warm}");
        assert!(
            warm["durations_ms"].get("setup").is_none(),
            "{mode}: setup ran again: {warm}"
        );
        assert!(
            warm["durations_ms"].get("clone").is_none(),
            "{mode}: clone ran again: {warm}"
        );
        assert_eq!(
            std::fs::read_to_string(&counter_file).expect("counter"),
            "run\n",
            "{mode}: the setup script ran twice"
        );
        assert!(
            mirror_marker.exists(),
            "{mode}: the mirror was cloned again instead of fetched"
        );

        let id = warm["id"].as_str().expect("id");
        assert_eq!(
            derrick.output(id, "cat built.txt code/app/a.txt").await,
            "built\na\n",
            "{mode}"
        );
        let record = derrick.get(&format!("/workspaces/{id}")).await.body;
        let states: Vec<&str> = record["history"]
            .as_array()
            .expect("history")
            .iter()
            .map(|h| h["state"].as_str().expect("state"))
            .collect();
        assert_eq!(
            states,
            ["provisioned", "clean_snapshotted", "running"],
            "{mode}"
        );
        assert_eq!(record["cache_hit"], "setup");
        assert_eq!(
            layer_kinds(&derrick.cache_dir()),
            ["base", "repositories", "setup"],
            "{mode}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordered_config_hits_cache() {
    let repository = TestRepo::new();
    repository.write("a.txt", "a\n");
    repository.commit("initial");
    let url = repository.path().display().to_string();
    let first = json!({ "name": "x", "repositories": [{ "url": url, "path": "/app" }], "setup_script": "true", "env": { "A": "1", "B": "2" } });
    let derrick = Derrick::start(&first);
    assert_eq!(derrick.create().await["cache"]["hit"], "none");

    let folder = derrick.into_folder();
    let reordered = format!(
        r#"{{"env": {{"B": "2", "A": "1"}}, "setup_script": "true", "repositories": [{{"path": "/app", "url": "{url}"}}], "name": "x"}}"#
    );
    std::fs::write(folder.path().join("config.json"), reordered).expect("write config");
    let config_path = folder.path().join("config.json");
    let derrick = Derrick::start_in(folder, &config_path, &[], &[]);
    assert_eq!(derrick.create().await["cache"]["hit"], "setup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_upstream_commit_reaches_workspaces() {
    for mode in LAYER_MODES {
        let repository = TestRepo::new();
        repository.write("version.txt", "1\n");
        let first = repository.commit("v1");
        let derrick = Derrick::start_with(
            &config(repository.path().display(), "true"),
            &["--layers", mode],
            &[],
        );
        let existing = derrick.create_id().await;

        repository.write("version.txt", "2\n");
        repository.write("added/new.txt", "new\n");
        let second = repository.commit("v2");

        let warm = derrick.create().await;
        assert_eq!(warm["cache"]["hit"], "setup", "{mode}");
        let id = warm["id"].as_str().expect("id");
        assert_eq!(
            derrick
                .output(id, "git -C code/app rev-parse HEAD")
                .await
                .trim(),
            second,
            "{mode}"
        );
        assert_eq!(
            derrick
                .output(id, "cat code/app/version.txt code/app/added/new.txt")
                .await,
            "2\nnew\n",
            "{mode}"
        );
        assert_eq!(
            derrick
                .output(id, "git -C code/app status --porcelain")
                .await,
            "",
            "{mode}"
        );
        assert_eq!(
            derrick
                .output(id, "git -C code/app branch --show-current")
                .await,
            "main\n",
            "{mode}"
        );

        let fetched = derrick
            .request("POST", &format!("/workspaces/{existing}/fetch"), None)
            .await;
        assert_eq!(fetched.status, 200, "{mode}: {}", fetched.body);
        assert_eq!(
            fetched.body["repositories"],
            json!([{ "path": "/code/app", "before": first, "after": second, "upstream": second }])
        );
        assert_eq!(
            derrick.output(&existing, "cat code/app/version.txt").await,
            "2\n",
            "{mode}"
        );
        assert_eq!(
            derrick
                .output(&existing, "git -C code/app status --porcelain")
                .await,
            "",
            "{mode}"
        );

        let reset = derrick
            .post(&format!("/workspaces/{existing}/reset"), json!({}))
            .await;
        assert_eq!(reset.status, 200, "{mode}: {}", reset.body);
        assert_eq!(
            derrick
                .output(&existing, "git -C code/app rev-parse HEAD")
                .await
                .trim(),
            second,
            "{mode}: reset went back to stale code"
        );
        assert_eq!(
            derrick
                .output(&existing, "git -C code/app status --porcelain")
                .await,
            "",
            "{mode}"
        );

        let log = derrick.log();
        assert_eq!(
            log.matches("how=\"cloned\"").count(),
            1,
            "{mode}: the mirror was cloned more than once:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_setup_is_not_cached() {
    let repository = TestRepo::new();
    repository.write("a.txt", "a\n");
    repository.commit("initial");
    let url = repository.path().display().to_string();
    let derrick = Derrick::start(&config(&url, "echo before; exit 3"));

    let failed = derrick.request("POST", "/workspaces", None).await;
    assert_eq!(failed.status, 422);
    assert_eq!(failed.body["error"]["code"], "setup_failed");
    assert_eq!(failed.body["error"]["exit_code"], 3);
    assert_eq!(failed.body["error"]["output"], "before\n");
    let id = failed.body["error"]["workspace_id"]
        .as_str()
        .expect("workspace id");
    let record = derrick.get(&format!("/workspaces/{id}")).await.body;
    assert_eq!(record["state"], "failed");
    assert_eq!(
        record["failure"],
        json!({ "step": "setup", "exit_code": 3, "output": "before\n" })
    );
    assert_eq!(
        layer_kinds(&derrick.cache_dir()),
        ["base", "repositories"],
        "a failed setup left a setup layer"
    );
    let temporary = derrick.cache_dir().join("tmp");
    let leftovers = std::fs::read_dir(&temporary)
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert_eq!(
        leftovers,
        0,
        "half-built layers left in {}",
        temporary.display()
    );

    let folder = derrick.into_folder();
    let derrick = Derrick::start_on(folder, &config(&url, "echo fixed > fixed.txt"), &[], &[]);
    let created = derrick.create().await;
    assert_eq!(created["cache"]["hit"], "repositories");
    let id = created["id"].as_str().expect("id");
    assert_eq!(derrick.output(id, "cat fixed.txt").await, "fixed\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_setup_script_gets_new_snapshot() {
    let repository = TestRepo::new();
    repository.write("a.txt", "a\n");
    repository.commit("initial");
    let url = repository.path().display().to_string();
    let derrick = Derrick::start(&config(&url, "echo one > result.txt"));
    let first = derrick.create_id().await;
    assert_eq!(derrick.output(&first, "cat result.txt").await, "one\n");

    let folder = derrick.into_folder();
    let derrick = Derrick::start_on(folder, &config(&url, "echo two > result.txt"), &[], &[]);
    let created = derrick.create().await;
    assert_eq!(created["cache"]["hit"], "repositories");
    assert_eq!(
        derrick
            .output(created["id"].as_str().expect("id"), "cat result.txt")
            .await,
        "two\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branch_tag_and_commit_references() {
    let repository = TestRepo::new();
    repository.write("file.txt", "one\n");
    let first = repository.commit("one");
    repository.tag("v1");
    repository.branch("feature");
    repository.checkout("feature");
    repository.write("file.txt", "feature\n");
    let feature = repository.commit("feature");
    repository.checkout("main");
    let url = repository.path().display().to_string();

    let cases = [
        ("feature", feature.clone(), "feature\n"),
        ("v1", first.clone(), ""),
        (first.as_str(), first.clone(), ""),
    ];
    for (reference, commit, branch) in cases {
        let config = json!({ "name": "refs", "repositories": [{ "url": url, "path": "/r", "reference": reference }], "setup_script": "" });
        let derrick = Derrick::start(&config);
        let id = derrick.create_id().await;
        assert_eq!(
            derrick.output(&id, "git -C r rev-parse HEAD").await.trim(),
            commit,
            "{reference}"
        );
        assert_eq!(
            derrick.output(&id, "git -C r branch --show-current").await,
            branch,
            "{reference}"
        );
        assert_eq!(
            derrick.output(&id, "git -C r status --porcelain").await,
            "",
            "{reference}"
        );
    }

    let missing = json!({ "name": "refs", "repositories": [{ "url": url, "path": "/r", "reference": "no-such-ref" }], "setup_script": "" });
    let derrick = Derrick::start(&missing);
    let reply = derrick.request("POST", "/workspaces", None).await;
    assert_eq!(reply.status, 422);
    assert_eq!(reply.body["error"]["code"], "git_failed");
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("no-such-ref"),
        "{}",
        reply.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_build_once() {
    let repository = TestRepo::new();
    repository.write("a.txt", "a\n");
    repository.commit("initial");
    let counter = tempfile::tempdir().expect("counter folder");
    let counter_file = counter.path().join("count");
    let setup = format!("sleep 1 && {}", counting_setup(&counter_file));
    let derrick = std::sync::Arc::new(Derrick::start(&config(repository.path().display(), &setup)));

    let creates = (0..20).map(|_| {
        let derrick = derrick.clone();
        tokio::spawn(async move { derrick.request("POST", "/workspaces", None).await })
    });
    let replies = futures_util::future::join_all(creates).await;
    let mut hits = Vec::new();
    for reply in replies {
        let reply = reply.expect("create task");
        assert_eq!(reply.status, 200, "{}", reply.body);
        hits.push(reply.body["cache"]["hit"].as_str().expect("hit").to_owned());
    }
    hits.sort();
    assert_eq!(
        hits.iter().filter(|hit| *hit == "none").count(),
        1,
        "{hits:?}"
    );
    assert_eq!(
        hits.iter().filter(|hit| *hit == "setup").count(),
        19,
        "{hits:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&counter_file).expect("counter"),
        "run\n",
        "the setup ran more than once"
    );
    assert_eq!(
        derrick.log().matches("how=\"cloned\"").count(),
        1,
        "the mirror was cloned more than once"
    );
    assert_eq!(
        derrick.get("/workspaces").await.body["workspaces"]
            .as_array()
            .expect("list")
            .len(),
        20
    );
}
