//! What only the NATS transport has: the server's maximum payload, undecodable requests and
//! unknown subjects, messages without a reply subject, authentication at start-up, concurrency,
//! and shutdown. The operations themselves are in `contract`, which runs over NATS too.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::derrick::{Derrick, Reply, config, wait_for_process, wait_until};
use crate::support::nats::{NatsServer, NatsServerOptions};
use crate::support::repos::TestRepo;

/// The maximum payload of the servers in these tests: 1 MiB, as `nats-server` has by default,
/// set explicitly so that the limit in the replies is known.
const MAX_PAYLOAD: usize = 1024 * 1024;

fn sample_config() -> (TestRepo, Value) {
    let repository = TestRepo::new();
    repository.write("README.md", "hello\n");
    repository.commit("initial");
    let config = config(repository.path().display(), "");
    (repository, config)
}

fn start(config: &Value) -> Derrick {
    let server = NatsServer::start_with(NatsServerOptions {
        max_payload: Some(MAX_PAYLOAD),
        ..NatsServerOptions::default()
    });
    Derrick::start_nats(server, config, &[], &[])
}

/// Sends `{"id", ...body}` to `workspaces.<operation>`.
async fn on(derrick: &Derrick, id: &str, operation: &str, body: Value) -> Reply {
    let mut payload = body;
    payload["id"] = json!(id);
    let payload = serde_json::to_vec(&payload).expect("json");
    derrick
        .nats_request(&format!("workspaces.{operation}"), payload)
        .await
}

fn check_error(reply: &Reply, code: &str, label: &str) -> String {
    assert_eq!(reply.body["error"]["code"], code, "{label}: {}", reply.body);
    reply.body["error"]["message"]
        .as_str()
        .expect("message")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_reply_is_payload_too_large_at_once() {
    let (_repository, config) = sample_config();
    let derrick = start(&config);
    let id = derrick.create_id().await;
    derrick
        .output(
            &id,
            "head -c 2000000 /dev/urandom > big.bin && head -c 600000 /dev/urandom > small.bin",
        )
        .await;

    let payload = serde_json::to_vec(&json!({ "id": id, "path": "big.bin" })).expect("json");
    let big = derrick
        .nats_request_within("workspaces.read_file", payload, Duration::from_secs(5))
        .await;
    assert_eq!(big.status, 413);
    let message = check_error(&big, "payload_too_large", "read_file");
    for expected in [
        "`derrick.workspaces.read_file`",
        "over the limit of 1048576 bytes",
        "max_payload",
        "HTTP",
    ] {
        assert!(message.contains(expected), "{expected} missing: {message}");
    }

    let small = on(&derrick, &id, "read_file", json!({ "path": "small.bin" })).await;
    assert_eq!(small.status, 200, "{}", small.body);
    let on_disk = std::fs::read(derrick.workspace_root(&id).join("small.bin")).expect("small.bin");
    assert_eq!(small.bytes, on_disk);

    let output = on(
        &derrick,
        &id,
        "cmd_with_output",
        json!({ "cmd": "head -c 1100000 /dev/zero | tr '\\0' a" }),
    )
    .await;
    check_error(&output, "payload_too_large", "cmd_with_output");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_and_unknown_requests_get_error_replies() {
    let (_repository, config) = sample_config();
    let derrick = start(&config);
    let id = derrick.create_id().await;

    let cases: [(&str, &[u8], &str, &str); 8] = [
        (
            "workspaces.cmd",
            b"{not json",
            "invalid_request",
            "invalid JSON",
        ),
        (
            "workspaces.cmd",
            b"[1, 2]",
            "invalid_request",
            "JSON object",
        ),
        (
            "workspaces.cmd",
            br#"{"cmd": "true"}"#,
            "invalid_request",
            "missing `id`",
        ),
        (
            "workspaces.get",
            br#"{"id": 7}"#,
            "invalid_request",
            "`id` must be a string",
        ),
        (
            "workspaces.create",
            b"\xff\xfe",
            "invalid_request",
            "invalid JSON",
        ),
        (
            "workspaces.create",
            br#"{"id": "x"}"#,
            "invalid_request",
            "unknown field",
        ),
        (
            "workspaces.nope",
            b"{}",
            "not_found",
            "derrick.workspaces.nope",
        ),
        ("nope", b"", "not_found", "derrick.nope"),
    ];
    for (operation, payload, code, expected) in cases {
        let reply = derrick.nats_request(operation, payload.to_vec()).await;
        let message = check_error(&reply, code, operation);
        assert!(message.contains(expected), "{operation}: {message}");
    }

    let command = on(&derrick, &id, "cmd", json!({ "cmd": "true" })).await;
    assert_eq!(command.body, json!({ "exit_code": 0 }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_without_reply_subject_is_logged_and_dropped() {
    let (_repository, config) = sample_config();
    let derrick = start(&config);
    let client = derrick.nats_client().await;
    client
        .publish("derrick.health", "".into())
        .await
        .expect("publish");
    client.flush().await.expect("flush");

    assert!(
        wait_until(Duration::from_secs(5), || derrick
            .log()
            .contains("without a reply subject dropped"))
        .await,
        "no log line for the dropped message; log:\n{}",
        derrick.log()
    );
    assert_eq!(
        derrick.get("/health").await.body,
        json!({ "healthy": true })
    );
}

/// A command longer than async-nats's default request timeout (10 s) still gets its reply,
/// because derrick's NATS side adds no deadline to the command's own `timeout`.
/// A 75-second command with a 120-second timeout replies `ok` over NATS and over HTTP alike,
/// because neither transport nor client may end it early. The default request timeout of
/// async-nats is 10 seconds, and many HTTP clients give up after 30 or 60.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_command_replies_over_both_transports() {
    let (_repository, config) = sample_config();
    let over_nats = start(&config);
    let over_http = Derrick::start(&config);
    let nats_id = over_nats.create_id().await;
    let http_id = over_http.create_id().await;
    let body = json!({ "cmd": "sleep 75; echo ok", "timeout": 120 });

    let nats_reply = on(&over_nats, &nats_id, "cmd_with_output", body.clone());
    let http_path = format!("/workspaces/{http_id}/cmd_with_output");
    let http_reply = over_http.post(&http_path, body);
    let (nats_reply, http_reply) = tokio::join!(nats_reply, http_reply);
    for (transport, reply) in [("nats", nats_reply), ("http", http_reply)] {
        assert_eq!(reply.status, 200, "{transport}: {}", reply.body);
        assert_eq!(reply.body["output"], "ok\n", "{transport}");
        assert_eq!(reply.body["exit_code"], 0, "{transport}");
        assert_eq!(reply.body["timed_out"], false, "{transport}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_served_concurrently() {
    let (_repository, config) = sample_config();
    let derrick = Arc::new(start(&config));
    let busy = derrick.create_id().await;
    let other = derrick.create_id().await;

    let sleeper = {
        let derrick = derrick.clone();
        let busy = busy.clone();
        tokio::spawn(async move {
            on(
                &derrick,
                &busy,
                "cmd_with_output",
                json!({ "cmd": "sleep 5; echo done" }),
            )
            .await
        })
    };
    wait_for_process("sleep 5; echo done").await;

    let probe = Instant::now();
    assert_eq!(
        derrick.get("/health").await.body,
        json!({ "healthy": true })
    );
    let health_took = probe.elapsed();
    assert_eq!(derrick.get("/workspaces").await.status, 200);
    assert_eq!(derrick.output(&other, "echo free").await, "free\n");
    assert!(
        health_took < Duration::from_secs(1),
        "health took {health_took:?}"
    );
    assert!(
        probe.elapsed() < Duration::from_secs(2),
        "other requests took {:?}",
        probe.elapsed()
    );

    let slept = sleeper.await.expect("sleeper task");
    assert_eq!(slept.body["output"], "done\n", "{}", slept.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_subject_prefix_is_served() {
    let (_repository, config) = sample_config();
    let derrick = Derrick::start_nats(
        NatsServer::start(),
        &config,
        &["--nats-subject-prefix", "team.agents"],
        &[],
    );
    assert_eq!(
        derrick.get("/health").await.body,
        json!({ "healthy": true })
    );

    let client = derrick.nats_client().await;
    let default_subject = client.request("derrick.health", "".into()).await;
    assert!(
        default_subject.is_err(),
        "derrick.health answered under prefix team.agents"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_required_and_never_printed() {
    let (_repository, config) = sample_config();
    let token = "right-token-5f1c9a";
    let server = NatsServer::start_with(NatsServerOptions {
        token: Some(token.to_owned()),
        ..NatsServerOptions::default()
    });
    let url = server.url();
    let derrick = Derrick::start_nats(server, &config, &[], &[]);
    assert_eq!(
        derrick.get("/health").await.body,
        json!({ "healthy": true })
    );
    assert!(!derrick.log().contains(token), "{}", derrick.log());

    let wrong = "wrong-token-93b7e2";
    let folder = tempfile::tempdir().expect("temporary folder");
    let cases = [
        (vec!["--nats-token", wrong], vec![]),
        (vec![], vec![("DERRICK_NATS_TOKEN", wrong)]),
        (vec![], vec![]),
    ];
    for (args, env) in cases {
        let (code, stderr, took) = run_derrick(folder.path(), &config, &url, &args, &env);
        let label = format!("{args:?} {env:?}");
        assert_eq!(code, Some(1), "{label}: {stderr}");
        assert!(took < Duration::from_secs(15), "{label}: took {took:?}");
        let expected = format!("cannot connect to NATS at {url}: authorization violation");
        assert!(stderr.contains(&expected), "{label}: {stderr}");
        assert!(stderr.contains("--nats-token"), "{label}: {stderr}");
        assert!(
            !stderr.contains(wrong) && !stderr.contains(token),
            "{label}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{label}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_from_environment() {
    let (_repository, config) = sample_config();
    let password = "pass-7d41c0";
    let server = NatsServer::start_with(NatsServerOptions {
        user: Some(("agent".to_owned(), password.to_owned())),
        ..NatsServerOptions::default()
    });
    let url = server.url();
    let derrick = Derrick::start_nats(
        server,
        &config,
        &["--nats-user", "agent"],
        &[("DERRICK_NATS_PASSWORD", password)],
    );
    assert_eq!(
        derrick.get("/health").await.body,
        json!({ "healthy": true })
    );
    assert!(!derrick.log().contains(password), "{}", derrick.log());

    let folder = tempfile::tempdir().expect("temporary folder");
    let wrong = "wrong-pass-0b2f";
    let (code, stderr, _took) = run_derrick(
        folder.path(),
        &config,
        &url,
        &["--nats-user", "agent", "--nats-password", wrong],
        &[],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("authorization violation"), "{stderr}");
    assert!(!stderr.contains(wrong), "{stderr}");
}

/// A TLS-only server that verifies client certificates: derrick serves with the CA and a client
/// certificate, and refuses to start, naming the TLS flags, without either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificate() {
    let (_repository, config) = sample_config();
    let server = NatsServer::start_with(NatsServerOptions {
        tls: true,
        ..NatsServerOptions::default()
    });
    let url = server.url();
    let tls = server.tls().expect("TLS files").clone();
    let derrick = Derrick::start_nats(server, &config, &[], &[]);
    let id = derrick.create_id().await;
    assert_eq!(derrick.output(&id, "echo over tls").await, "over tls\n");

    let folder = tempfile::tempdir().expect("temporary folder");
    let ca = tls.ca.display().to_string();
    let certificate = tls.client_certificate.display().to_string();
    let key = tls.client_key.display().to_string();
    let cases: [(&str, Vec<&str>); 2] = [
        (
            "no CA",
            vec!["--nats-tls-cert", &certificate, "--nats-tls-key", &key],
        ),
        ("no client certificate", vec!["--nats-tls-ca", &ca]),
    ];
    for (label, args) in cases {
        let (code, stderr, took) = run_derrick(folder.path(), &config, &url, &args, &[]);
        assert_eq!(code, Some(1), "{label}: {stderr}");
        assert!(took < Duration::from_secs(15), "{label}: took {took:?}");
        assert!(
            stderr.contains(&format!("cannot connect to NATS at {url}")),
            "{label}: {stderr}"
        );
        assert!(stderr.contains("--nats-tls-ca"), "{label}: {stderr}");
        assert!(!stderr.contains("panicked"), "{label}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_fails_start_up() {
    let (_repository, config) = sample_config();
    let folder = tempfile::tempdir().expect("temporary folder");
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    };
    let url = format!("nats://user:hunter2@127.0.0.1:{closed_port}");

    let (code, stderr, took) = run_derrick(folder.path(), &config, &url, &[], &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    let expected = format!("cannot connect to NATS at nats://***@127.0.0.1:{closed_port}");
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(
        stderr.contains("check that nats-server runs there"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// Shutdown kills the workspaces' running commands after its grace, and the request that ran one
/// still gets its reply, with the killed command's exit code, before derrick exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_still_replies_to_running_requests() {
    let (_repository, config) = sample_config();
    let server = NatsServer::start();
    let derrick = Derrick::start_nats(server, &config, &["--shutdown-grace", "1"], &[]);
    let derrick = Arc::new(derrick);
    let id = derrick.create_id().await;

    let running = {
        let derrick = derrick.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let payload = json!({ "id": id, "cmd": "sleep 37; echo finished" });
            let payload = serde_json::to_vec(&payload).expect("json");
            derrick
                .nats_request_within(
                    "workspaces.cmd_with_output",
                    payload,
                    Duration::from_secs(15),
                )
                .await
        })
    };
    wait_for_process("sleep 37; echo finished").await;
    derrick.terminate();

    let reply = running.await.expect("request task");
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["exit_code"], 137, "{}", reply.body);
    assert_eq!(reply.body["output"], "", "{}", reply.body);

    let mut derrick = Arc::into_inner(derrick).expect("no other owner");
    let exited = wait_until(Duration::from_secs(30), || derrick.exit_status().is_some()).await;
    assert!(exited, "derrick did not stop; log:\n{}", derrick.log());
    assert_eq!(
        derrick.exit_status().map(|status| status.code()),
        Some(Some(0))
    );
    assert!(derrick.log().contains("stopped"), "{}", derrick.log());
}

/// Runs derrick with `-s nats` until it exits; returns its exit code, stderr and run time.
fn run_derrick(
    folder: &std::path::Path,
    config: &Value,
    url: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Option<i32>, String, Duration) {
    let config_path = folder.join("config.json");
    std::fs::write(&config_path, serde_json::to_vec(config).expect("json")).expect("config");
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_derrick"))
        .args(["-p", "local", "-s", "nats", "--nats-url", url, "-w"])
        .arg(&config_path)
        .arg("--cache-dir")
        .arg(folder.join("cache"))
        .arg("--state-dir")
        .arg(folder.join("state"))
        .args(args)
        .env_remove("DERRICK_NATS_TOKEN")
        .env_remove("DERRICK_NATS_PASSWORD")
        .envs(env.iter().copied())
        .env("RUST_LOG", "derrick=debug")
        .stdin(Stdio::null())
        .output()
        .expect("run derrick");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        started.elapsed(),
    )
}
