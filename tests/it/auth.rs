//! The HTTP API token: every endpoint but `/health` requires it, and a non-loopback listener
//! requires one to be set.

use serde_json::json;

use crate::support::derrick::{Derrick, config};
use crate::support::repos::TestRepo;

const TOKEN: &str = "it-token-5f1b2c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guards_every_endpoint_but_health() {
    let repository = TestRepo::new();
    repository.write("a.txt", "a\n");
    repository.commit("initial");
    let derrick = Derrick::start_with(
        &config(repository.path().display(), ""),
        &[],
        &[("DERRICK_AUTH_TOKEN", TOKEN)],
    );
    let client = reqwest::Client::new();
    let url = |path: &str| format!("{}{path}", derrick.base_url());

    let health = client.get(url("/health")).send().await.expect("health");
    assert_eq!(health.status(), 200);

    let cases = [(None, 401), (Some("wrong-token"), 401), (Some(TOKEN), 200)];
    for (token, status) in cases {
        let mut request = client.get(url("/workspaces"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let reply = request.send().await.expect("list");
        assert_eq!(reply.status(), status, "token {token:?}");
        if status == 401 {
            assert_eq!(reply.headers()["www-authenticate"], "Bearer");
            let body: serde_json::Value = reply.json().await.expect("json body");
            assert_eq!(body["error"]["code"], "unauthorized");
        }
    }

    let unauthorized = client
        .post(url("/workspaces"))
        .send()
        .await
        .expect("create");
    assert_eq!(unauthorized.status(), 401);
    let created = client
        .post(url("/workspaces"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), 200);
    let id = created.json::<serde_json::Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let command = client
        .post(url(&format!("/workspaces/{id}/cmd_with_output")))
        .json(&json!({ "cmd": "env" }))
        .send()
        .await
        .expect("command without token");
    assert_eq!(command.status(), 401);
    let listed = client
        .get(url("/workspaces"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("list");
    assert_eq!(
        listed.json::<serde_json::Value>().await.expect("json")["workspaces"][0]["id"],
        id.as_str()
    );
    assert!(!derrick.log().contains(TOKEN), "the token is in the log");
}

#[test]
fn non_loopback_listener_needs_token() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/quickstart.json");
    let cases: [(&[&str], &str); 2] = [
        (&["--listen", "0.0.0.0:0"], "set --auth-token"),
        (
            &["--listen", "127.0.0.1:0", "--auth-token", " "],
            "is empty",
        ),
    ];
    for (args, message) in cases {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_derrick"))
            .args(["-w", fixture])
            .args(args)
            .env_remove("DERRICK_AUTH_TOKEN")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run derrick");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}
