//! Reset restores the clean snapshot and ends the workspace's processes, in both layer modes.

use std::time::Duration;

use serde_json::json;

use crate::support::derrick::{Derrick, config, processes_matching, wait_until};
use crate::support::repos::TestRepo;

/// Lists every entry with its type and mode, and the size of everything but directories (whose
/// size depends on the file system's history, not on their content).
const TREE_LISTING: &str =
    r"find . \( -type d -printf '%p d %m\n' \) -o -printf '%p %y %m %s\n' | LC_ALL=C sort";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_restores_clean_snapshot() {
    for mode in ["overlay", "copy"] {
        let repository = TestRepo::with_files(300);
        repository.write("keep.txt", "original\n");
        repository.write("delete-me.txt", "bye\n");
        repository.commit("more");
        let derrick = Derrick::start_with(
            &config(
                repository.path().display(),
                "mkdir -p deps && echo dep > deps/lib.txt",
            ),
            &["--layers", mode],
            &[],
        );
        let id = derrick.create_id().await;
        let clean = derrick.output(&id, TREE_LISTING).await;

        let marker = format!("sleep 98{}", if mode == "overlay" { 1 } else { 2 });
        let changes = format!(
            "echo changed > code/app/keep.txt && rm code/app/delete-me.txt && rm -r code/app/src \
             && mkdir -p code/app/added/dir && echo x > code/app/added/dir/f && echo junk > deps/lib.txt \
             && echo top > top.txt; ({marker} &); setsid {marker} > /dev/null 2>&1 &"
        );
        derrick.output(&id, &changes).await;
        assert!(
            wait_until(Duration::from_secs(10), || processes_matching(&marker)
                .len()
                == 2)
            .await,
            "{mode}: background sleeps did not start"
        );

        let reset = derrick
            .post(&format!("/workspaces/{id}/reset"), json!({}))
            .await;
        assert_eq!(reset.status, 200, "{mode}: {}", reset.body);
        assert_eq!(reset.body["state"], "clean_snapshotted");
        let record = derrick.get(&format!("/workspaces/{id}")).await.body;
        let states: Vec<&str> = record["history"]
            .as_array()
            .expect("history")
            .iter()
            .map(|h| h["state"].as_str().expect("state"))
            .collect();
        assert_eq!(
            &states[states.len() - 3..],
            ["running", "reset", "clean_snapshotted"],
            "{mode}"
        );

        let restored = derrick.output(&id, TREE_LISTING).await;
        assert_eq!(
            restored, clean,
            "{mode}: the tree differs from the clean snapshot"
        );
        assert_eq!(
            derrick
                .output(
                    &id,
                    "cat code/app/keep.txt code/app/delete-me.txt deps/lib.txt"
                )
                .await,
            "original\nbye\ndep\n",
            "{mode}"
        );
        assert_eq!(
            derrick
                .output(&id, "git -C code/app status --porcelain")
                .await,
            "",
            "{mode}"
        );
        assert!(
            wait_until(Duration::from_secs(5), || processes_matching(&marker)
                .is_empty())
            .await,
            "{mode}: background processes survived the reset"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_ends_processes_and_unmounts() {
    let repository = TestRepo::new();
    repository.write("a.txt", "a\n");
    repository.commit("initial");
    let derrick = Derrick::start(&config(repository.path().display(), ""));
    let id = derrick.create_id().await;
    derrick
        .output(&id, "setsid sleep 983 > /dev/null 2>&1 &")
        .await;
    assert!(
        wait_until(Duration::from_secs(10), || processes_matching("sleep 983")
            .len()
            == 1)
        .await
    );

    let root = derrick.workspace_root(&id);
    let destroyed = derrick
        .request("DELETE", &format!("/workspaces/{id}"), None)
        .await;
    assert_eq!(destroyed.status, 200, "{}", destroyed.body);
    assert!(
        wait_until(Duration::from_secs(5), || processes_matching("sleep 983")
            .is_empty())
        .await,
        "a detached process survived destroy"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(root.to_str().expect("utf-8")),
        "the overlay is still mounted"
    );
    assert!(!root.exists());
}
