//! Load: 50 workspaces with 20 commands each, all at once over HTTP, and afterwards no leaked file
//! descriptor, mount or process.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::derrick::{Derrick, config, wait_until};
use crate::support::repos::TestRepo;

const WORKSPACES: usize = 50;
const COMMANDS_PER_WORKSPACE: usize = 20;

/// What derrick holds: open file descriptors, mounts under its folder, and descendant processes.
#[derive(Debug, PartialEq, Eq)]
struct Holdings {
    descriptors: usize,
    mounts: usize,
    processes: usize,
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
    Holdings {
        descriptors,
        mounts,
        processes: descendants(pid).len(),
    }
}

/// Lists the processes below `pid`, from the parent ids in `/proc/*/stat`.
fn descendants(pid: u32) -> BTreeSet<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .expect("proc")
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|child| {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
            // The command name in parentheses may contain spaces; fields follow the last `)`.
            let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
            Some((child, fields.get(1)?.parse().ok()?))
        })
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
    let repository = TestRepo::new();
    repository.write("README.md", "hello\n");
    repository.commit("initial");
    let derrick = Derrick::start(&config(
        repository.path().display(),
        "echo ready > setup.txt",
    ));
    // The harness's own client keeps one connection open from its first request on.
    assert_eq!(derrick.get("/health").await.status, 200);
    let before = holdings(&derrick);
    let client = reqwest::Client::new();
    let base = derrick.base_url().to_owned();

    let mut agents = tokio::task::JoinSet::new();
    for agent in 0..WORKSPACES {
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
            for command in 0..COMMANDS_PER_WORKSPACE {
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
            assert_eq!(
                lines["output"],
                format!("{COMMANDS_PER_WORKSPACE}\nready\n")
            );
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
    // Keep-alive connections of the dropped client close shortly after it.
    let settled = wait_until(Duration::from_secs(10), || holdings(&derrick) == before).await;
    assert!(
        settled,
        "before {before:?}, after {:?}; log:\n{}",
        holdings(&derrick),
        derrick.log()
    );
}
