//! The wire contract, run over HTTP, over NATS, and through a `remote_nats` controller alike.
//!
//! Each case is one async function that takes the transport and the provider, and `contract!`
//! makes four tests of it: `contract::<case>::http`, `contract::<case>::nats` and
//! `contract::<case>::remote` with the local provider (the last over HTTP to a controller that
//! forwards every operation over NATS to one worker), and `contract::<case>::docker` with the
//! docker provider over HTTP. The cases send HTTP paths through
//! `Derrick::request`. Over NATS, it sends the same operation to its subject and returns the reply
//! with the HTTP status of its error code, so both transports must give the same statuses, codes
//! and bodies.

use serde_json::{Value, json};

use crate::support::derrick::{Derrick, ProviderKind, Reply, Transport, config};
use crate::support::repos::TestRepo;

/// Makes an HTTP, a NATS, a remote and a docker test of each case.
macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                use crate::support::derrick::{ProviderKind, Transport};

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn http() {
                    super::$case(Transport::Http, ProviderKind::Local).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn nats() {
                    super::$case(Transport::Nats, ProviderKind::Local).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn docker() {
                    super::$case(Transport::Http, ProviderKind::Docker).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn remote() {
                    super::$case(Transport::Remote, ProviderKind::Local).await;
                }
            }
        )*
    };
}

contract!(
    health_and_states,
    lifecycle,
    files_round_trip_exact_bytes,
    request_errors_have_codes,
    command_failure_carries_exit_code_and_output,
    failed_workspace_refuses_operations,
);

fn sample_repository() -> TestRepo {
    let repository = TestRepo::new();
    repository.write("README.md", "hello\n");
    repository.write("src/main.rs", "fn main() {}\n");
    repository.commit("initial");
    repository
}

/// Asserts a success reply and returns its body.
fn check_ok(reply: Reply, label: &str) -> Value {
    assert_eq!(reply.status, 200, "{label}: {}", reply.body);
    reply.body
}

/// Asserts an error reply: its status, its code and a non-empty message.
fn check_error(reply: &Reply, status: u16, code: &str, label: &str) {
    assert_eq!(reply.status, status, "{label}: {}", reply.body);
    assert_eq!(reply.body["error"]["code"], code, "{label}: {}", reply.body);
    let message = reply.body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{label}: no message in {}", reply.body);
}

async fn health_and_states(transport: Transport, provider: ProviderKind) {
    let repository = sample_repository();
    let derrick = Derrick::start_for(
        transport,
        provider,
        &config(repository.path().display(), ""),
    );

    let health = check_ok(derrick.get("/health").await, "health");
    assert_eq!(health, json!({ "healthy": true }));

    let states = check_ok(derrick.get("/states").await, "states");
    assert_eq!(states["initial"], "provisioned");
    assert_eq!(states["final"], json!(["destroyed"]));
    assert!(
        states["states"]["clean_snapshotted"].is_string(),
        "{states}"
    );
}

async fn lifecycle(transport: Transport, provider: ProviderKind) {
    let repository = sample_repository();
    let head = repository.head();
    let derrick = Derrick::start_for(
        transport,
        provider,
        &config(repository.path().display(), "echo set > setup.txt"),
    );

    let created = derrick.create().await;
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(created["state"], "clean_snapshotted");
    assert_eq!(created["cache"]["hit"], "none");
    for step in ["provision", "clone", "setup", "snapshot"] {
        assert!(
            created["durations_ms"][step].is_u64(),
            "missing {step} in {created}"
        );
    }
    let on = |operation: &str| format!("/workspaces/{id}/{operation}");

    let listed = check_ok(derrick.get("/workspaces").await, "list");
    assert_eq!(listed["workspaces"][0]["id"], id.as_str());
    assert_eq!(listed["workspaces"][0]["state"], "clean_snapshotted");

    let record = check_ok(derrick.get(&format!("/workspaces/{id}")).await, "get");
    let states: Vec<&str> = record["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|entry| entry["state"].as_str().expect("state"))
        .collect();
    assert_eq!(
        states,
        ["provisioned", "cloned", "setup", "clean_snapshotted"]
    );
    let kinds: Vec<&str> = record["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|layer| layer["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(kinds, ["base", "repositories", "setup"]);
    assert!(record["history"][1]["duration_ms"].is_u64(), "{record}");
    assert_eq!(record["repositories"][0]["commit"], head.as_str());

    let command = derrick
        .post(&on("cmd"), json!({ "cmd": "test -f setup.txt" }))
        .await;
    assert_eq!(check_ok(command, "cmd"), json!({ "exit_code": 0 }));

    let output = derrick
        .run(
            &id,
            "cat code/app/README.md; git -C code/app rev-parse HEAD",
        )
        .await;
    assert_eq!(output["output"], format!("hello\n{head}\n"));
    assert_eq!(output["exit_code"], 0);
    assert_eq!(output["timed_out"], false);
    assert_eq!(output["truncated"], false);
    assert!(output["duration_ms"].is_u64(), "{output}");

    let written = derrick
        .post(
            &on("write_file"),
            json!({ "path": "/code/app/new/dir/file.txt", "content": "aGk=" }),
        )
        .await;
    assert_eq!(check_ok(written, "write_file"), json!({ "success": true }));
    let read = derrick
        .post(
            &on("read_file"),
            json!({ "path": "dir/file.txt", "working_dir": "/code/app/new" }),
        )
        .await;
    assert_eq!(read.status, 200, "{}", read.body);
    assert_eq!(read.bytes, b"hi");
    if transport != Transport::Nats {
        assert_eq!(
            read.content_type.as_deref(),
            Some("application/octet-stream")
        );
    }
    let record = check_ok(derrick.get(&format!("/workspaces/{id}")).await, "get");
    assert_eq!(record["state"], "running");

    let reset = check_ok(derrick.post(&on("reset"), json!({})).await, "reset");
    assert_eq!(reset["id"], id.as_str());
    assert_eq!(reset["state"], "clean_snapshotted");
    assert!(reset["duration_ms"].is_u64(), "{reset}");
    assert_eq!(
        derrick
            .output(&id, "test -e code/app/new || echo gone")
            .await,
        "gone\n"
    );

    let fetched = derrick.request("POST", &on("fetch"), None).await;
    assert_eq!(
        check_ok(fetched, "fetch")["repositories"],
        json!([{ "path": "/code/app", "before": head, "after": head, "upstream": head }])
    );

    let destroyed = derrick
        .request("DELETE", &format!("/workspaces/{id}"), None)
        .await;
    assert_eq!(check_ok(destroyed, "destroy"), json!(true));
    let gone = derrick.get(&format!("/workspaces/{id}")).await;
    check_error(&gone, 404, "workspace_not_found", "get after destroy");
    assert_eq!(
        check_ok(derrick.get("/workspaces").await, "list"),
        json!({ "workspaces": [] })
    );
    assert!(
        !derrick.workspace_exists(&id),
        "destroy leaves the workspace's folder or container"
    );
}

async fn files_round_trip_exact_bytes(transport: Transport, provider: ProviderKind) {
    use base64::Engine as _;

    let repository = sample_repository();
    let derrick = Derrick::start_for(
        transport,
        provider,
        &config(repository.path().display(), ""),
    );
    let id = derrick.create_id().await;
    // Every byte value four times, with MIME line breaks in the base64 text.
    let content: Vec<u8> = (0..1024).map(|index| (index % 256) as u8).collect();
    let encoded = base64::engine::general_purpose::STANDARD.encode(&content);
    let wrapped: Vec<&str> = encoded
        .as_bytes()
        .chunks(76)
        .map(|line| std::str::from_utf8(line).expect("base64 is ASCII"))
        .collect();

    let written = derrick
        .post(
            &format!("/workspaces/{id}/write_file"),
            json!({ "path": "bin/all.bytes", "content": wrapped.join("\r\n") }),
        )
        .await;
    check_ok(written, "write_file");
    let read = derrick
        .post(
            &format!("/workspaces/{id}/read_file"),
            json!({ "path": "/bin/all.bytes" }),
        )
        .await;
    assert_eq!(read.status, 200, "{}", read.body);
    assert_eq!(read.bytes, content);
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&content));
    assert_eq!(
        derrick.output(&id, "sha256sum < bin/all.bytes").await,
        format!("{digest}  -\n")
    );
}

async fn request_errors_have_codes(transport: Transport, provider: ProviderKind) {
    let repository = sample_repository();
    let derrick = Derrick::start_for(
        transport,
        provider,
        &config(repository.path().display(), ""),
    );
    let id = derrick.create_id().await;
    let on = |operation: &str| format!("/workspaces/{id}/{operation}");
    let missing = "/workspaces/ws-00000000000000000000000000000000";

    let cases = [
        (
            "malformed JSON",
            derrick.post_raw(&on("cmd"), b"{not json".to_vec()).await,
            400,
            "invalid_request",
        ),
        (
            "unknown field",
            derrick.post(&on("cmd"), json!({ "command": "true" })).await,
            400,
            "invalid_request",
        ),
        (
            "missing working_dir",
            derrick
                .post(
                    &on("cmd"),
                    json!({ "cmd": "true", "working_dir": "/missing" }),
                )
                .await,
            400,
            "invalid_request",
        ),
        (
            "negative timeout",
            derrick
                .post(&on("cmd"), json!({ "cmd": "true", "timeout": -1 }))
                .await,
            400,
            "invalid_request",
        ),
        (
            "invalid base64",
            derrick
                .post(&on("write_file"), json!({ "path": "a", "content": "***" }))
                .await,
            400,
            "invalid_base64",
        ),
        (
            "path outside",
            derrick
                .post(&on("read_file"), json!({ "path": "/../outside" }))
                .await,
            400,
            "path_outside_workspace",
        ),
        (
            "write outside",
            derrick
                .post(
                    &on("write_file"),
                    json!({ "path": "../../escape.txt", "content": "aGk=" }),
                )
                .await,
            400,
            "path_outside_workspace",
        ),
        (
            "missing file",
            derrick
                .post(&on("read_file"), json!({ "path": "missing.txt" }))
                .await,
            404,
            "file_not_found",
        ),
        (
            "directory as file",
            derrick
                .post(&on("read_file"), json!({ "path": "/code/app" }))
                .await,
            400,
            "invalid_request",
        ),
        (
            "unknown repository",
            derrick
                .post(&on("fetch"), json!({ "paths": ["/nope"] }))
                .await,
            400,
            "invalid_request",
        ),
        (
            "unknown workspace",
            derrick
                .post(&format!("{missing}/cmd"), json!({ "cmd": "true" }))
                .await,
            404,
            "workspace_not_found",
        ),
        (
            "malformed id",
            derrick.get("/workspaces/not-an-id").await,
            404,
            "workspace_not_found",
        ),
        (
            "destroy unknown workspace",
            derrick.request("DELETE", missing, None).await,
            404,
            "workspace_not_found",
        ),
        (
            "unknown endpoint",
            derrick.get("/no/such/endpoint").await,
            404,
            "not_found",
        ),
    ];
    for (label, reply, status, code) in &cases {
        check_error(reply, *status, code, label);
    }
}

async fn command_failure_carries_exit_code_and_output(
    transport: Transport,
    provider: ProviderKind,
) {
    let repository = sample_repository();
    let derrick = Derrick::start_for(
        transport,
        provider,
        &config(repository.path().display(), ""),
    );
    let id = derrick.create_id().await;
    let cmd = json!({ "cmd": "echo out; echo err >&2; exit 3" });

    let failed = derrick
        .post(&format!("/workspaces/{id}/cmd"), cmd.clone())
        .await;
    check_error(&failed, 422, "command_failed", "cmd");
    assert_eq!(failed.body["error"]["exit_code"], 3);
    assert_eq!(failed.body["error"]["output"], "out\nerr\n");
    assert_eq!(failed.body["error"]["truncated"], false);

    let output = derrick
        .post(&format!("/workspaces/{id}/cmd_with_output"), cmd)
        .await;
    let output = check_ok(output, "cmd_with_output");
    assert_eq!(output["exit_code"], 3);
    assert_eq!(output["output"], "out\nerr\n");

    let timed_out = derrick
        .post(
            &format!("/workspaces/{id}/cmd_with_output"),
            json!({ "cmd": "echo started; sleep 47", "timeout": 1 }),
        )
        .await;
    let timed_out = check_ok(timed_out, "timeout");
    assert_eq!(timed_out["exit_code"], 124);
    assert_eq!(timed_out["timed_out"], true);
    assert_eq!(timed_out["output"], "started\n");
}

async fn failed_workspace_refuses_operations(transport: Transport, provider: ProviderKind) {
    let repository = sample_repository();
    let derrick = Derrick::start_for(
        transport,
        provider,
        &config(repository.path().display(), "echo before; exit 5"),
    );
    let failed = derrick.request("POST", "/workspaces", None).await;
    check_error(&failed, 422, "setup_failed", "create");
    assert_eq!(failed.body["error"]["exit_code"], 5);
    assert_eq!(failed.body["error"]["output"], "before\n");
    let id = failed.body["error"]["workspace_id"]
        .as_str()
        .expect("a failed create names its workspace")
        .to_owned();

    let refusals = [
        (
            "cmd",
            derrick
                .post(&format!("/workspaces/{id}/cmd"), json!({ "cmd": "true" }))
                .await,
            "exec",
        ),
        (
            "reset",
            derrick
                .post(&format!("/workspaces/{id}/reset"), json!({}))
                .await,
            "reset",
        ),
    ];
    for (label, reply, op) in &refusals {
        check_error(reply, 409, "invalid_transition", label);
        let message = reply.body["error"]["message"].as_str().expect("message");
        assert!(
            message.contains("`failed`") && message.contains(op),
            "{label}: {message}"
        );
    }

    let destroyed = derrick
        .request("DELETE", &format!("/workspaces/{id}"), None)
        .await;
    assert_eq!(check_ok(destroyed, "destroy"), json!(true));
}
