//! The command line: refusals before start-up, and the README's quickstart.

use std::process::{Command, Stdio};

use serde_json::json;

use crate::support::derrick::Derrick;

/// Runs derrick to completion and returns its exit code and stderr.
fn run_derrick(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_derrick"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run derrick");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn invalid_config_names_file_and_field() {
    let folder = tempfile::tempdir().expect("temporary folder");
    let cases = [
        (
            r#"{"name": "bad name", "repositories": [], "setup_script": ""}"#,
            "field `name`",
            "[A-Za-z0-9_.-]",
        ),
        (
            r#"{"name": "a", "repositories": [], "setup_script": "", "colour": 1}"#,
            "field `colour`",
            "unknown field",
        ),
        (
            r#"{"name": "a", "repositories": [{"url": "ftp://x/y"}], "setup_script": ""}"#,
            "field `repositories[0].url`",
            "not supported",
        ),
        (
            r#"{"name": "a", "repositories": [], "setup_script": ["x"]}"#,
            "field `setup_script`",
            "invalid type",
        ),
        ("{", "(file)", "EOF"),
    ];
    for (text, field, allowed) in cases {
        let path = folder.path().join("config.json");
        std::fs::write(&path, text).expect("write config");
        let path = path.display().to_string();
        let (code, stderr) = run_derrick(&[
            "-p",
            "local",
            "-s",
            "http",
            "-w",
            &path,
            "--listen",
            "127.0.0.1:0",
        ]);
        assert_eq!(code, Some(1), "{text}: {stderr}");
        assert!(
            stderr.contains(&path),
            "{text}: the file is not named: {stderr}"
        );
        assert!(
            stderr.contains(field),
            "{text}: {field} is not named: {stderr}"
        );
        assert!(
            stderr.contains(allowed),
            "{text}: {allowed} is not said: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn unusable_modes_exit_cleanly() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/quickstart.json");
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    };
    let closed_url = format!("nats://127.0.0.1:{closed_port}");
    let cases = [
        (
            vec![
                "-p",
                "remote_nats",
                "-w",
                fixture,
                "--nats-url",
                &closed_url,
            ],
            "cannot connect to NATS at nats://127.0.0.1:",
        ),
        (
            vec!["worker", "-p", "remote_nats", "-w", fixture],
            "give the worker `-p local` or `-p docker`",
        ),
        (
            vec!["worker", "-w", fixture, "--worker-id", "a.b"],
            "invalid --worker-id `a.b`",
        ),
        (vec!["worker", "-p", "local"], "--workspace-config-path"),
        (vec!["-s", "http"], "--workspace-config-path"),
        (
            vec!["--listen", "0.0.0.0:50080", "-w", fixture],
            "not a loopback address",
        ),
        (vec!["-p", "lxc", "-w", fixture], "invalid value 'lxc'"),
    ];
    for (args, message) in cases {
        let (code, stderr) = run_derrick(&args);
        assert_ne!(code, Some(0), "{args:?}");
        assert!(code.is_some(), "{args:?} ended by a signal");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_fixture_serves_this_repository() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/quickstart.json");
    let folder = tempfile::tempdir().expect("temporary folder");
    let derrick = Derrick::start_in(folder, &fixture, &[], &[]);
    let head = Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "HEAD"])
        .output()
        .expect("git rev-parse");
    let head = String::from_utf8(head.stdout).expect("utf-8");

    let id = derrick.create_id().await;
    assert_eq!(derrick.output(&id, "cat setup-commit.txt").await, head);
    assert_eq!(
        derrick.output(&id, "git -C derrick rev-parse HEAD").await,
        head
    );
    let read = derrick
        .post(
            &format!("/workspaces/{id}/read_file"),
            json!({ "path": "/derrick/Cargo.toml" }),
        )
        .await;
    assert!(String::from_utf8_lossy(&read.bytes).contains("name = \"derrick\""));
    assert_eq!(derrick.create().await["cache"]["hit"], "setup");
}

#[test]
fn setup_timeout_out_of_range_is_rejected() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/quickstart.json");
    for seconds in ["0", "18446744073709551615"] {
        let (code, stderr) = run_derrick(&["-w", fixture, "--setup-timeout", seconds]);
        assert_eq!(code, Some(2), "{seconds}: {stderr}");
        assert!(stderr.contains("--setup-timeout"), "{seconds}: {stderr}");
    }
}
