//! Load and process hygiene: 50 workspaces with 20 commands each, all at once over HTTP, leave no
//! file descriptor, mount or process behind, and orphans of commands never stay zombies.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::derrick::{Derrick, ProviderKind, Transport, config, wait_until};
use crate::support::repos::TestRepo;

const WORKSPACES: usize = 50;
const COMMANDS_PER_WORKSPACE: usize = 20;

/// What derrick holds: open file descriptors, mounts under its folder, descendant processes and
/// the containers of its scope (docker).
#[derive(Debug, PartialEq, Eq)]
struct Holdings {
    descriptors: usize,
    mounts: usize,
    processes: usize,
    containers: usize,
    /// Whether the docker provider has a started spare container; always true for local.
    spare_ready: bool,
}

fn holdings(derrick: &Derrick) -> Holdings {
    let pid = derrick.pid();
    let descriptors = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("descriptors")
        .count();
    let folder = derrick.cache_dir();
    let folder = folder.parent().expect("folder").to_str().expect("utf-8");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter(|line| line.contains(folder))
        .count();
    let (containers, spare_ready) = match derrick.provider() {
        ProviderKind::Local => (0, true),
        ProviderKind::Docker => {
            let scope = derrick::provider::docker::scope_of(&derrick.state_dir());
            let listed = std::process::Command::new("docker")
                .args(["ps", "-a", "--format", "{{.Names}} {{.State}}", "--filter"])
                .arg(format!("label=dev.derrick.scope={scope}"))
                .output()
                .expect("docker ps");
            let text = String::from_utf8_lossy(&listed.stdout).into_owned();
            let spare = text
                .lines()
                .any(|line| line.starts_with("derrick-spare-") && line.ends_with(" running"));
            (text.lines().count(), spare)
        }
    };
    Holdings {
        descriptors,
        mounts,
        processes: descendants(pid).len(),
        containers,
        spare_ready,
    }
}

/// Lists every process as (pid, state, parent pid), from `/proc/*/stat`.
fn process_table() -> Vec<(u32, String, u32)> {
    std::fs::read_dir("/proc")
        .expect("proc")
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name in parentheses may contain spaces; fields follow the last `)`.
            let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
            Some((
                pid,
                fields.first()?.to_string(),
                fields.get(1)?.parse().ok()?,
            ))
        })
        .collect()
}

/// Lists the processes below `pid`.
fn descendants(pid: u32) -> BTreeSet<u32> {
    let parents: Vec<(u32, u32)> = process_table()
        .into_iter()
        .map(|(child, _, parent)| (child, parent))
        .collect();
    let mut found = BTreeSet::from([pid]);
    loop {
        let before = found.len();
        for (child, parent) in &parents {
            if found.contains(parent) {
                found.insert(*child);
            }
        }
        if found.len() == before {
            break;
        }
    }
    found.remove(&pid);
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_workspaces_twenty_commands_each() {
    load(ProviderKind::Local, WORKSPACES, COMMANDS_PER_WORKSPACE).await;
}

/// The same load, smaller because each docker command costs tens of milliseconds, also counts
/// the containers of the derrick's scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_workspaces_under_load() {
    load(ProviderKind::Docker, 20, 10).await;
}

async fn load(provider: ProviderKind, workspaces: usize, commands: usize) {
    let repository = TestRepo::new();
    repository.write("README.md", "hello\n");
    repository.commit("initial");
    let configuration = config(repository.path().display(), "echo ready > setup.txt");
    let derrick = Derrick::start_for(Transport::Http, provider, &configuration);
    // A first workspace builds the layers (and, for docker, starts a spare), so that the counts
    // before the load include what stays between requests. The harness's own client keeps one
    // connection open from its first request on.
    let first = derrick.create_id().await;
    let destroyed = derrick
        .request("DELETE", &format!("/workspaces/{first}"), None)
        .await;
    assert_eq!(destroyed.status, 200, "{}", destroyed.body);
    let settle = Duration::from_secs(30);
    let steady = wait_until(settle, || holdings(&derrick).spare_ready).await;
    assert!(steady, "no spare container started");
    let before = holdings(&derrick);
    let client = reqwest::Client::new();
    let base = derrick.base_url().to_owned();

    let mut agents = tokio::task::JoinSet::new();
    for agent in 0..workspaces {
        let (client, base) = (client.clone(), base.clone());
        agents.spawn(async move {
            let created: Value = client
                .post(format!("{base}/workspaces"))
                .send()
                .await
                .expect("create")
                .json()
                .await
                .expect("create reply");
            let id = created["id"].as_str().expect("workspace id").to_owned();
            for command in 0..commands {
                let cmd = format!("echo {agent}-{command} >> log.txt; tail -n 1 log.txt");
                let reply: Value = client
                    .post(format!("{base}/workspaces/{id}/cmd_with_output"))
                    .json(&json!({ "cmd": cmd }))
                    .send()
                    .await
                    .expect("command")
                    .json()
                    .await
                    .expect("command reply");
                assert_eq!(reply["exit_code"], 0, "{reply}");
                assert_eq!(reply["output"], format!("{agent}-{command}\n"), "{reply}");
            }
            let lines: Value = client
                .post(format!("{base}/workspaces/{id}/cmd_with_output"))
                .json(&json!({ "cmd": "wc -l < log.txt; cat setup.txt" }))
                .send()
                .await
                .expect("count")
                .json()
                .await
                .expect("count reply");
            let counted = lines["output"]
                .as_str()
                .expect("output")
                .trim_start()
                .to_owned();
            assert_eq!(counted, format!("{commands}\nready\n"));
            let destroyed = client
                .delete(format!("{base}/workspaces/{id}"))
                .send()
                .await
                .expect("destroy");
            assert_eq!(destroyed.status(), 200);
        });
    }
    while let Some(finished) = agents.join_next().await {
        finished.expect("agent");
    }
    drop(client);

    let listed = derrick.get("/workspaces").await.body;
    assert_eq!(listed["workspaces"], json!([]));
    // Keep-alive connections of the dropped client close shortly after it, and removed
    // containers go in the background.
    let settled = wait_until(settle, || holdings(&derrick) == before).await;
    assert!(
        settled,
        "before {before:?}, after {:?}; log:\n{}",
        holdings(&derrick),
        derrick.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_of_commands_are_reaped() {
    let repository = TestRepo::new();
    repository.write("README.md", "hello\n");
    repository.commit("initial");
    let derrick = Derrick::start(&config(repository.path().display(), ""));
    let id = derrick.create_id().await;

    // Each subshell starts a sleep and exits at once, so the sleeps are orphans.
    let orphans =
        "for n in 1 2 3 4 5; do (exec -a derrick-orphan-$n sleep 1 &); done; echo started";
    assert_eq!(derrick.output(&id, orphans).await, "started\n");
    let pid = derrick.pid();
    let adopted = crate::support::derrick::processes_matching("derrick-orphan-");
    assert_eq!(adopted.len(), 5, "{adopted:?}");
    let parents: BTreeSet<u32> = process_table()
        .into_iter()
        .filter(|(child, _, _)| adopted.contains(&(*child as i32)))
        .map(|(_, _, parent)| parent)
        .collect();
    assert_eq!(
        parents,
        BTreeSet::from([pid]),
        "derrick is not their subreaper"
    );

    let zombies = || {
        process_table()
            .into_iter()
            .filter(|(_, state, parent)| state == "Z" && *parent == pid)
            .count()
    };
    let reaped = wait_until(Duration::from_secs(10), || {
        crate::support::derrick::processes_matching("derrick-orphan-").is_empty() && zombies() == 0
    });
    assert!(reaped.await, "{} zombies of derrick remain", zombies());
}
