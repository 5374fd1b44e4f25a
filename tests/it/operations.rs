//! Operator commands: `derrick warm`, `derrick cache list` and `prune`, and `--cache-max-bytes`.

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::support::derrick::{Derrick, config, processes_matching};
use crate::support::repos::TestRepo;

/// What a finished derrick command printed.
struct Finished {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `derrick <args> --cache-dir <folder>/cache --state-dir <folder>/state` to completion.
fn run_in(folder: &Path, args: &[&str]) -> Finished {
    let cache_dir = folder.join("cache").display().to_string();
    let state_dir = folder.join("state").display().to_string();
    let all: Vec<&str> = [
        args,
        &["--cache-dir", &cache_dir, "--state-dir", &state_dir],
    ]
    .concat();
    run_derrick(&all)
}

/// Runs `derrick <args>` to completion.
fn run_derrick(args: &[&str]) -> Finished {
    let output = Command::new(env!("CARGO_BIN_EXE_derrick"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run derrick");
    Finished {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs `derrick warm` on a configuration written into `folder` and returns the result.
fn warm(folder: &Path, configuration: &Value) -> Finished {
    let path = folder.join(format!("warm-{}.json", unique_suffix()));
    std::fs::write(&path, configuration.to_string()).expect("write config");
    let path = path.display().to_string();
    run_in(folder, &["warm", "-p", "local", "-w", &path])
}

fn unique_suffix() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos()
    )
}

/// Returns the cached layers as `derrick cache list --json` prints them.
fn cache_list(folder: &Path) -> Vec<Value> {
    let listed = run_in(folder, &["cache", "list", "--json"]);
    assert_eq!(listed.code, Some(0), "{}", listed.stderr);
    let entries: Value = serde_json::from_str(&listed.stdout).expect("json");
    entries.as_array().expect("array").clone()
}

fn keys_of(entries: &[Value]) -> Vec<String> {
    let mut keys: Vec<String> = entries
        .iter()
        .map(|entry| entry["key"].as_str().expect("key").to_owned())
        .collect();
    keys.sort();
    keys
}

fn sample_repository() -> TestRepo {
    let repository = TestRepo::new();
    repository.write("README.md", "hello\n");
    repository.commit("initial");
    repository
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_builds_snapshot_for_server() {
    let repository = sample_repository();
    let configuration = config(repository.path().display(), "echo built > setup.txt");
    let folder = tempfile::tempdir().expect("temporary folder");

    let warmed = warm(folder.path(), &configuration);
    assert_eq!(warmed.code, Some(0), "{}", warmed.stderr);
    let setup_key = warmed.stdout.trim().to_owned();
    assert_eq!(setup_key.len(), 64, "{}", warmed.stdout);
    for progress in [
        "syncing mirror",
        "running the setup script",
        "clean snapshot ready",
    ] {
        assert!(warmed.stderr.contains(progress), "{}", warmed.stderr);
    }
    let entries = cache_list(folder.path());
    let states: Vec<&str> = entries
        .iter()
        .map(|entry| entry["state"].as_str().expect("state"))
        .collect();
    assert_eq!(states.len(), 3, "{entries:?}");
    for state in ["provisioned", "cloned", "clean_snapshotted"] {
        assert!(states.contains(&state), "{entries:?}");
    }
    assert!(entries.iter().all(|entry| entry["in_use"] == false));

    let derrick = Derrick::start_on(folder, &configuration, &[], &[]);
    let created = derrick.create().await;
    assert_eq!(created["cache"]["hit"], "setup", "{created}");
    let id = created["id"].as_str().expect("id");
    assert_eq!(derrick.output(id, "cat setup.txt").await, "built\n");
}

#[test]
fn warm_failure_names_step_and_output() {
    let repository = sample_repository();
    let configuration = config(repository.path().display(), "echo before; exit 3");
    let folder = tempfile::tempdir().expect("temporary folder");

    let warmed = warm(folder.path(), &configuration);
    assert_eq!(warmed.code, Some(1), "{}", warmed.stderr);
    assert!(
        warmed
            .stderr
            .contains("the setup step failed with exit code 3; its output:\nbefore"),
        "{}",
        warmed.stderr
    );
    assert_eq!(warmed.stdout, "");
    let entries = cache_list(folder.path());
    assert!(
        entries
            .iter()
            .all(|entry| entry["state"] != "clean_snapshotted"),
        "a failed setup was cached: {entries:?}"
    );
}

#[test]
fn prune_removes_least_recently_used_first() {
    let repository = sample_repository();
    let folder = tempfile::tempdir().expect("temporary folder");
    let older = config(
        repository.path().display(),
        "head -c 300000 /dev/urandom > older.bin",
    );
    let newer = config(
        repository.path().display(),
        "head -c 300000 /dev/urandom > newer.bin",
    );
    let older_key = warm(folder.path(), &older).stdout.trim().to_owned();
    let newer_key = warm(folder.path(), &newer).stdout.trim().to_owned();
    let entries = cache_list(folder.path());
    assert_eq!(
        entries.len(),
        4,
        "shared base and repositories: {entries:?}"
    );
    let total: u64 = entries
        .iter()
        .map(|entry| entry["size_bytes"].as_u64().expect("size"))
        .sum();

    let pruned = run_in(
        folder.path(),
        &["cache", "prune", "--max-bytes", &(total - 1).to_string()],
    );
    assert_eq!(pruned.code, Some(0), "{}", pruned.stderr);
    assert!(pruned.stdout.contains("in 1 layers"), "{}", pruned.stdout);
    let keys = keys_of(&cache_list(folder.path()));
    assert!(!keys.contains(&older_key), "{keys:?}");
    assert!(keys.contains(&newer_key), "{keys:?}");

    let emptied = run_in(folder.path(), &["cache", "prune"]);
    assert_eq!(emptied.code, Some(0), "{}", emptied.stderr);
    assert_eq!(cache_list(folder.path()), Vec::<Value>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_keeps_layers_of_kept_workspaces() {
    let repository = sample_repository();
    let configuration = config(repository.path().display(), "echo ready > setup.txt");
    let derrick = Derrick::start(&configuration);
    let id = derrick.create_id().await;

    let refused = run_in(
        derrick.cache_dir().parent().expect("folder"),
        &["cache", "prune"],
    );
    assert_eq!(refused.code, Some(1), "{}", refused.stdout);
    assert!(
        refused
            .stderr
            .contains("is in use by a running derrick, worker or warm job"),
        "{}",
        refused.stderr
    );
    let elsewhere = tempfile::tempdir().expect("temporary folder");
    let cache_dir = derrick.cache_dir().display().to_string();
    let wrong_state = run_derrick(&[
        "cache",
        "prune",
        "--cache-dir",
        &cache_dir,
        "--state-dir",
        &elsewhere.path().display().to_string(),
    ]);
    assert_eq!(wrong_state.code, Some(1), "{}", wrong_state.stdout);
    assert!(
        wrong_state.stderr.contains("is in use"),
        "{}",
        wrong_state.stderr
    );

    let folder = derrick.into_folder();
    // The workspace is kept on disk: its layers stay even for a state folder that lacks it.
    let unknown_state = run_derrick(&[
        "cache",
        "prune",
        "--cache-dir",
        &cache_dir,
        "--state-dir",
        &elsewhere.path().display().to_string(),
    ]);
    assert_eq!(unknown_state.code, Some(0), "{}", unknown_state.stderr);
    assert!(
        unknown_state.stdout.contains("freed 0 bytes in 0 layers"),
        "{}",
        unknown_state.stdout
    );
    let pruned = run_in(folder.path(), &["cache", "prune"]);
    assert_eq!(pruned.code, Some(0), "{}", pruned.stderr);
    assert!(
        pruned.stdout.contains("freed 0 bytes in 0 layers"),
        "{}",
        pruned.stdout
    );
    let entries = cache_list(folder.path());
    assert_eq!(entries.len(), 3, "{entries:?}");
    assert!(entries.iter().all(|entry| entry["in_use"] == true));

    let restarted = Derrick::start_on(folder, &configuration, &[], &[]);
    assert_eq!(restarted.output(&id, "cat setup.txt").await, "ready\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_max_bytes_evicts_unused_layers_only() {
    let repository = sample_repository();
    let folder = tempfile::tempdir().expect("temporary folder");
    let other = config(
        repository.path().display(),
        "head -c 300000 /dev/urandom > other.bin",
    );
    let other_key = warm(folder.path(), &other).stdout.trim().to_owned();
    assert_eq!(other_key.len(), 64);

    let served = config(repository.path().display(), "echo served > setup.txt");
    let derrick = Derrick::start_on(folder, &served, &["--cache-max-bytes", "1"], &[]);
    let evicted_at_start = derrick
        .log()
        .lines()
        .any(|line| line.contains("evicted a layer from the cache") && line.contains(&other_key));
    assert!(evicted_at_start, "{}", derrick.log());

    let id = derrick.create_id().await;
    let second = derrick.create_id().await;
    assert_eq!(derrick.output(&id, "cat setup.txt").await, "served\n");
    assert_eq!(derrick.output(&second, "cat setup.txt").await, "served\n");
    let folder = derrick.into_folder();
    let entries = cache_list(folder.path());
    assert_eq!(entries.len(), 3, "{entries:?}");
    assert!(entries.iter().all(|entry| entry["in_use"] == true));
}

/// Counts the mounts below `folder`.
fn mounts_under(folder: &Path) -> usize {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let folder = folder.to_str().expect("utf-8");
    mounts.lines().filter(|line| line.contains(folder)).count()
}

/// Starts `derrick warm` in the background on `folder`, and waits until its setup runs `marker`.
fn start_warm(folder: &Path, configuration: &Value, marker: &str) -> std::process::Child {
    let path = folder.join(format!("warm-{}.json", unique_suffix()));
    std::fs::write(&path, configuration.to_string()).expect("write config");
    let child = Command::new(env!("CARGO_BIN_EXE_derrick"))
        .args(["warm", "-p", "local", "-w"])
        .arg(&path)
        .arg("--cache-dir")
        .arg(folder.join("cache"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start warm");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while processes_matching(marker).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the setup never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child
}

#[test]
fn interrupted_warm_cleans_up() {
    let repository = sample_repository();
    let folder = tempfile::tempdir().expect("temporary folder");
    let cache_dir = folder.path().join("cache");
    let slow = config(repository.path().display(), "sleep 731");

    let interrupted = start_warm(folder.path(), &slow, "sleep 731");
    let pid = nix::unistd::Pid::from_raw(interrupted.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let output = interrupted.wait_with_output().expect("wait for warm");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("interrupted by a signal"), "{stderr}");
    assert!(processes_matching("sleep 731").is_empty());
    assert_eq!(mounts_under(&cache_dir), 0);
    assert_eq!(
        std::fs::read_dir(cache_dir.join("warm"))
            .expect("warm")
            .count(),
        0
    );

    // A killed warm job leaves its workspace; the next warm job on the cache removes it.
    let mut killed = start_warm(folder.path(), &slow, "sleep 731");
    killed.kill().expect("SIGKILL");
    killed.wait().expect("wait for warm");
    assert_eq!(
        mounts_under(&cache_dir),
        1,
        "the killed warm job left no mount"
    );
    let fast = config(repository.path().display(), "true");
    let next = warm(folder.path(), &fast);
    assert_eq!(next.code, Some(0), "{}", next.stderr);
    assert!(
        next.stderr
            .contains("removed a workspace left by a killed warm job"),
        "{}",
        next.stderr
    );
    assert!(processes_matching("sleep 731").is_empty());
    assert_eq!(mounts_under(&cache_dir), 0);
    assert_eq!(
        std::fs::read_dir(cache_dir.join("warm"))
            .expect("warm")
            .count(),
        0
    );
}
