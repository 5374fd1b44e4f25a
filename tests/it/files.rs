//! File reads and writes: exact bytes, and no way out of the workspace.

use base64::Engine as _;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::support::derrick::{Derrick, config};
use crate::support::repos::TestRepo;

fn encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_file_round_trips() {
    let repository = TestRepo::new();
    repository.write("a.txt", "a\n");
    repository.commit("initial");
    let derrick = Derrick::start(&config(repository.path().display(), ""));
    let id = derrick.create_id().await;
    let bytes: Vec<u8> = (0..4).flat_map(|_| 0..=255u8).collect();

    let mime = encode(&bytes)
        .as_bytes()
        .chunks(76)
        .map(|line| std::str::from_utf8(line).expect("ascii"))
        .collect::<Vec<_>>()
        .join("\r\n");
    let written = derrick
        .post(
            &format!("/workspaces/{id}/write_file"),
            json!({ "path": "bin/all.bytes", "content": mime }),
        )
        .await;
    assert_eq!(written.status, 200, "{}", written.body);
    let on_disk = derrick
        .output(&id, "sha256sum bin/all.bytes | cut -d' ' -f1")
        .await;
    assert_eq!(on_disk.trim(), hex::encode(Sha256::digest(&bytes)));

    derrick.output(&id, "cp bin/all.bytes copy.bytes").await;
    let read = derrick
        .post(
            &format!("/workspaces/{id}/read_file"),
            json!({ "path": "/copy.bytes" }),
        )
        .await;
    assert_eq!(read.status, 200);
    assert_eq!(read.bytes, bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escapes_are_refused() {
    let repository = TestRepo::new();
    repository.write("a.txt", "a\n");
    repository.commit("initial");
    let derrick = Derrick::start(&config(repository.path().display(), ""));
    let id = derrick.create_id().await;
    let outside = tempfile::tempdir().expect("outside folder");
    let secret = outside.path().join("secret.txt");
    std::fs::write(&secret, "outside\n").expect("write outside file");
    let setup = format!(
        "mkdir -p code/links && ln -s {0} code/links/absolute-dir && ln -s {1} code/links/absolute-file && ln -s ../../../../../../../.. code/links/up",
        outside.path().display(),
        secret.display()
    );
    derrick.output(&id, &setup).await;

    let reads = [
        json!({ "path": "../secret.txt" }),
        json!({ "path": "/../../../../etc/passwd" }),
        json!({ "path": "a/../../../x", "working_dir": "/code" }),
        json!({ "path": "secret.txt", "working_dir": "/code/links/absolute-dir" }),
        json!({ "path": "/code/links/absolute-file" }),
        json!({ "path": "/code/links/up/etc/passwd" }),
        json!({ "path": "x", "working_dir": "/../.." }),
    ];
    for request in reads {
        let reply = derrick
            .post(&format!("/workspaces/{id}/read_file"), request.clone())
            .await;
        assert_eq!(reply.status, 400, "{request}: {}", reply.body);
        assert_eq!(
            reply.body["error"]["code"], "path_outside_workspace",
            "{request}"
        );
    }

    let writes = [
        json!({ "path": "/code/links/absolute-file", "content": encode(b"pwned") }),
        json!({ "path": "/code/links/absolute-dir/new.txt", "content": encode(b"pwned") }),
        json!({ "path": "../../escape.txt", "content": encode(b"pwned") }),
        json!({ "path": "/code/links/up/tmp/escape.txt", "content": encode(b"pwned") }),
    ];
    for request in writes {
        let reply = derrick
            .post(&format!("/workspaces/{id}/write_file"), request.clone())
            .await;
        assert_eq!(reply.status, 400, "{request}: {}", reply.body);
        assert_eq!(
            reply.body["error"]["code"], "path_outside_workspace",
            "{request}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(&secret).expect("outside file"),
        "outside\n"
    );
    let entries: Vec<_> = std::fs::read_dir(outside.path())
        .expect("outside folder")
        .collect();
    assert_eq!(entries.len(), 1, "a file appeared outside the workspace");
    assert!(!std::path::Path::new("/tmp/escape.txt").exists());

    let inside = json!({ "path": "/code/links/inner", "content": encode(b"fine") });
    assert_eq!(
        derrick
            .post(&format!("/workspaces/{id}/write_file"), inside)
            .await
            .status,
        200
    );
    derrick.output(&id, "ln -s inner code/links/relative").await;
    let through_link = derrick
        .post(
            &format!("/workspaces/{id}/read_file"),
            json!({ "path": "/code/links/relative" }),
        )
        .await;
    assert_eq!(through_link.bytes, b"fine");
}
