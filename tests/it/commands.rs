//! Commands: timeouts that kill the whole tree, closed stdin, exact exit codes, bounded output.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::derrick::{Derrick, config, processes_matching, wait_until};
use crate::support::repos::TestRepo;

async fn started() -> (TestRepo, Derrick, String) {
    let repository = TestRepo::new();
    repository.write("a.txt", "a\n");
    repository.commit("initial");
    let derrick = Derrick::start(&config(repository.path().display(), ""));
    let id = derrick.create_id().await;
    (repository, derrick, id)
}

async fn run_with_timeout(
    derrick: &Derrick,
    id: &str,
    cmd: &str,
    timeout: f64,
) -> (Value, Duration) {
    let start = Instant::now();
    let reply = derrick
        .post(
            &format!("/workspaces/{id}/cmd_with_output"),
            json!({ "cmd": cmd, "timeout": timeout }),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    (reply.body, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_background_grandchild() {
    let (_repository, derrick, id) = started().await;
    let cmd = "(while true; do date >> tick.log; sleep 0.2; done) & sleep 601";
    let (body, elapsed) = run_with_timeout(&derrick, &id, cmd, 2.0).await;
    assert_eq!(body["exit_code"], 124);
    assert_eq!(body["timed_out"], true);
    assert!(elapsed < Duration::from_secs(4), "reply took {elapsed:?}");
    assert!(
        elapsed >= Duration::from_secs(2),
        "reply came before the timeout: {elapsed:?}"
    );
    assert!(
        wait_until(Duration::from_secs(3), || processes_matching("sleep 601")
            .is_empty())
        .await,
        "sleep 601 survived"
    );

    let size = || {
        std::fs::metadata(derrick.workspace_root(&id).join("tick.log"))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let before = size();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        size(),
        before,
        "tick.log still grows: the background loop survived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_with_fifo_reader_replies_fast() {
    let (_repository, derrick, id) = started().await;
    let cmd =
        "mkfifo pipe && (while true; do echo tick; sleep 0.2; done > pipe) & sleep 0.1; cat pipe";
    let (body, elapsed) = run_with_timeout(&derrick, &id, cmd, 2.0).await;
    assert_eq!(body["exit_code"], 124);
    assert!(elapsed < Duration::from_secs(4), "reply took {elapsed:?}");
    assert!(
        body["output"]
            .as_str()
            .expect("output")
            .starts_with("tick\n"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_is_exact_and_keeps_partial_output() {
    let (_repository, derrick, id) = started().await;
    let (body, elapsed) = run_with_timeout(&derrick, &id, "sleep 5; echo done", 2.0).await;
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert_eq!(body["output"], "");
    assert_eq!(body["exit_code"], 124);

    let (body, _) =
        run_with_timeout(&derrick, &id, "while true; do echo .; sleep 0.1; done", 2.0).await;
    let output = body["output"].as_str().expect("output");
    assert!(
        output.len() >= 20 && output.chars().all(|c| c == '.' || c == '\n'),
        "{output:?}"
    );

    let (body, elapsed) = run_with_timeout(&derrick, &id, "sleep 3; echo ok", 10.0).await;
    assert_eq!(
        (
            body["output"].clone(),
            body["exit_code"].clone(),
            body["timed_out"].clone()
        ),
        (json!("ok\n"), json!(0), json!(false))
    );
    assert!(elapsed >= Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_is_closed_and_no_tty() {
    let (_repository, derrick, id) = started().await;
    let cases = [
        ("cat", "", 0),
        ("read -r line || echo eof", "eof\n", 0),
        ("head -c 1 | wc -c", "0\n", 0),
        ("test -t 0 || test -t 1 || echo notty", "notty\n", 0),
        ("printf 'a\\nb\\n'", "a\nb\n", 0),
    ];
    for (cmd, output, exit_code) in cases {
        let (body, elapsed) = run_with_timeout(&derrick, &id, cmd, 10.0).await;
        assert_eq!(body["output"], output, "{cmd}");
        assert_eq!(body["exit_code"], exit_code, "{cmd}");
        assert!(
            elapsed < Duration::from_secs(2),
            "`{cmd}` waited for input: {elapsed:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_are_exact() {
    let (_repository, derrick, id) = started().await;
    let cases = [
        ("exit 7", 7),
        ("exit 126", 126),
        ("no-such-command-xyz", 127),
        ("kill -9 $$", 137),
        ("kill -15 $$", 143),
        ("true", 0),
    ];
    for (cmd, exit_code) in cases {
        assert_eq!(derrick.run(&id, cmd).await["exit_code"], exit_code, "{cmd}");
    }
    for round in 0..250 {
        assert_eq!(
            derrick.run(&id, "exit 7").await["exit_code"],
            7,
            "round {round}"
        );
        assert_eq!(
            derrick.run(&id, "echo x").await["output"],
            "x\n",
            "round {round}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_decoded_interleaved_and_capped() {
    let (_repository, derrick, id) = started().await;
    assert_eq!(
        derrick.run(&id, "printf 'ok \\377\\376 end'").await["output"],
        "ok \u{FFFD}\u{FFFD} end"
    );
    assert_eq!(
        derrick
            .run(&id, "printf 'first\\nlast without newline'")
            .await["output"],
        "first\nlast without newline"
    );
    assert_eq!(
        derrick.run(&id, "echo a; echo b >&2; echo c").await["output"],
        "a\nb\nc\n"
    );

    let big = derrick
        .run(
            &id,
            "head -c 20000000 /dev/zero | tr '\\0' 'a'; echo; echo THE-END",
        )
        .await;
    let output = big["output"].as_str().expect("output");
    assert_eq!(big["truncated"], true);
    assert_eq!(big["exit_code"], 0);
    assert!(
        output.len() <= derrick::provider::local::MAX_OUTPUT_BYTES,
        "{} bytes",
        output.len()
    );
    assert!(output.ends_with("aaaa\nTHE-END\n"), "the tail was not kept");

    let small = derrick.run(&id, "echo small").await;
    assert_eq!(small["truncated"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_is_cleared_and_layered() {
    let repository = TestRepo::new();
    repository.write("a.txt", "a\n");
    repository.commit("initial");
    let mut configuration = config(repository.path().display(), "");
    configuration["env"] = json!({ "FROM_CONFIG": "c", "OVERRIDE": "config" });
    let derrick = Derrick::start_with(&configuration, &[], &[("DERRICK_TEST_LEAK", "host-secret")]);
    let created = derrick
        .post(
            "/workspaces",
            json!({ "env": { "FROM_CREATE": "w", "OVERRIDE": "create" } }),
        )
        .await;
    assert_eq!(created.status, 200, "{}", created.body);
    let id = created.body["id"].as_str().expect("id");

    let request = json!({ "cmd": "env", "env": { "FROM_REQUEST": "r" } });
    let reply = derrick
        .post(&format!("/workspaces/{id}/cmd_with_output"), request)
        .await;
    let output = reply.body["output"].as_str().expect("output");
    for expected in [
        "FROM_CONFIG=c",
        "FROM_CREATE=w",
        "FROM_REQUEST=r",
        "OVERRIDE=create",
        "GIT_TERMINAL_PROMPT=0",
    ] {
        assert!(
            output.lines().any(|line| line == expected),
            "missing {expected} in:\n{output}"
        );
    }
    assert!(
        !output.contains("host-secret"),
        "derrick's own environment leaked:\n{output}"
    );
    let home = derrick.output(id, "echo $HOME; pwd").await;
    let root = derrick.workspace_root(id);
    assert_eq!(home, format!("{0}\n{0}\n", root.display()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_writer_outlives_its_command() {
    let (_repository, derrick, id) = started().await;
    let cmd = "(sleep 0.5; echo late; sleep 0.2; echo alive > background.txt) & echo started";
    let (body, elapsed) = run_with_timeout(&derrick, &id, cmd, 10.0).await;
    assert_eq!(body["output"], "started\n");
    assert!(
        elapsed < Duration::from_millis(500),
        "the reply waited for the background process: {elapsed:?}"
    );

    let marker = derrick.workspace_root(&id).join("background.txt");
    let written = wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&marker).is_ok_and(|text| text == "alive\n")
    })
    .await;
    assert!(
        written,
        "the background process died when its output pipe closed"
    );
}
