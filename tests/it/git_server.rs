//! Tests of the support code itself: repositories from `support::repos` served by
//! `support::git_server`, driven by the real `git` CLI and by raw HTTP requests.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use tempfile::TempDir;

use crate::support::git_server::GitHttpServer;
use crate::support::repos::{TestRepo, git, git_command, numbered_file};

const USER: &str = "agent";
const PASSWORD: &str = "s3cret-token-5f1c";

#[test]
fn anonymous_clone_checks_out_head() {
    let repository = TestRepo::new();
    repository.write("README.md", "hello\n");
    let commit = repository.commit("initial");
    let bare = repository.bare_clone();
    let server = GitHttpServer::start(bare.root(), None);

    let clone = clone_ok(&server.url(bare.name()));

    assert_eq!(git(clone.path(), ["rev-parse", "HEAD"]), commit);
    assert_eq!(
        fs::read_to_string(clone.path().join("README.md")).unwrap(),
        "hello\n"
    );
    // Protocol v2: the capability advertisement, then `ls-refs` and `fetch`.
    assert_eq!(
        server.request_lines(),
        [
            "GET /repo.git/info/refs?service=git-upload-pack HTTP/1.1",
            "POST /repo.git/git-upload-pack HTTP/1.1",
            "POST /repo.git/git-upload-pack HTTP/1.1",
        ]
    );
    assert_eq!(server.auth_attempts(), 0);
}

#[test]
fn bare_push_reaches_http_fetch() {
    let repository = TestRepo::new();
    repository.write("README.md", "one\n");
    repository.commit("first");
    let bare = repository.bare_clone();
    let server = GitHttpServer::start(bare.root(), None);
    let clone = clone_ok(&server.url(bare.name()));

    repository.write("README.md", "two\n");
    let second = repository.commit("second");
    repository.tag("v2");
    repository.push_to(&bare);
    git(clone.path(), ["fetch", "--quiet", "--tags", "origin"]);

    assert_eq!(bare.head(), second);
    assert_eq!(git(clone.path(), ["rev-parse", "origin/main"]), second);
    assert_eq!(git(clone.path(), ["rev-parse", "v2"]), second);
}

#[test]
fn http_push_sends_chunked_body() {
    let repository = TestRepo::new();
    repository.write("README.md", "one\n");
    repository.commit("first");
    let bare = repository.bare_clone();
    let server = GitHttpServer::start(bare.root(), None);
    let pusher = clone_ok(&server.url(bare.name()));

    // Git sends a request body larger than `http.postBuffer` (1 MiB) with chunked encoding;
    // incompressible content keeps the pack above that size.
    fs::write(pusher.path().join("noise.bin"), noise(2 * 1024 * 1024)).unwrap();
    git(pusher.path(), ["add", "noise.bin"]);
    git(
        pusher.path(),
        ["commit", "--quiet", "--message", "add noise"],
    );
    let pushed = git(pusher.path(), ["rev-parse", "HEAD"]);
    git(pusher.path(), ["push", "--quiet", "origin", "main"]);
    let fetcher = clone_ok(&server.url(bare.name()));

    assert_eq!(bare.head(), pushed);
    assert_eq!(git(fetcher.path(), ["rev-parse", "HEAD"]), pushed);
    assert_eq!(
        fs::read(fetcher.path().join("noise.bin")).unwrap(),
        noise(2 * 1024 * 1024)
    );
    assert!(server.saw("POST /repo.git/git-receive-pack HTTP/1.1"));
    assert!(server.saw("Transfer-Encoding: chunked"));
}

#[test]
fn right_password_clone_succeeds() {
    let repository = TestRepo::new();
    repository.write("README.md", "private\n");
    let commit = repository.commit("initial");
    let bare = repository.bare_clone();
    let server = GitHttpServer::start(bare.root(), Some((USER, PASSWORD)));

    let clone = clone_ok(&url_with_user_info(&server, bare.name(), PASSWORD));

    assert_eq!(git(clone.path(), ["rev-parse", "HEAD"]), commit);
    // curl sends the first request without credentials to learn the scheme, then sends them
    // with every request.
    assert_eq!(server.requests(), 4);
    assert_eq!(server.auth_attempts(), 3);
    assert!(!server.saw(PASSWORD));
}

#[test]
fn wrong_password_clone_fails_fast() {
    let repository = TestRepo::new();
    repository.commit("initial");
    let bare = repository.bare_clone();
    let server = GitHttpServer::start(bare.root(), Some((USER, PASSWORD)));
    let destination = TempDir::new().unwrap();
    let started = Instant::now();

    let output = clone(
        &url_with_user_info(&server, bare.name(), "wrong"),
        destination.path(),
    );

    assert!(!output.status.success());
    assert!(started.elapsed() < Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Authentication failed"), "stderr: {stderr}");
    assert_eq!(server.requests(), 2);
    assert_eq!(server.auth_attempts(), 1);
}

#[test]
fn missing_credentials_get_basic_challenge() {
    let bare = TestRepo::new().bare_clone();
    let server = GitHttpServer::start(bare.root(), Some((USER, PASSWORD)));

    let response = send_raw(
        &server,
        "GET /repo.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: localhost\r\n\r\n",
    );

    assert_eq!(
        response,
        "HTTP/1.1 401 Unauthorized\r\n\
         Content-Type: text/plain\r\n\
         WWW-Authenticate: Basic realm=\"derrick-test\"\r\n\
         Content-Length: 24\r\n\
         Connection: close\r\n\
         \r\n\
         authentication required\n"
    );
    assert_eq!(server.auth_attempts(), 0);
}

#[test]
fn secret_seen_only_outside_authorization() {
    let bare = TestRepo::new().bare_clone();
    let server = GitHttpServer::start(bare.root(), Some((USER, PASSWORD)));
    let encoded = BASE64.encode(format!("{USER}:{PASSWORD}"));
    let in_header = format!(
        "GET /repo.git/info/refs?service=git-upload-pack HTTP/1.1\r\n\
         Authorization: Basic {encoded}\r\n\r\n"
    );

    let response = send_raw(&server, &in_header);

    assert!(
        response.starts_with("HTTP/1.1 200 OK\r\n"),
        "response: {response}"
    );
    assert!(!server.saw(PASSWORD));
    assert!(!server.saw(&encoded));
    assert_eq!(server.auth_attempts(), 1);

    send_raw(
        &server,
        &format!("GET /repo.git/info/refs?token={PASSWORD} HTTP/1.1\r\n\r\n"),
    );

    assert!(server.saw(PASSWORD));
}

#[test]
fn with_files_commits_every_file() {
    let repository = TestRepo::with_files(5000);

    let listed = git(repository.path(), ["ls-tree", "-r", "--name-only", "HEAD"]);
    let names: Vec<&str> = listed.lines().collect();

    assert_eq!(names.len(), 5000);
    assert_eq!(names[0], "src/dir_00/sub_0/file_00000.txt");
    assert_eq!(names[4999], "src/dir_04/sub_9/file_04999.txt");
    assert_eq!(numbered_file(123), "src/dir_00/sub_1/file_00123.txt");
    let content = git(
        repository.path(),
        ["show", "HEAD:src/dir_00/sub_1/file_00123.txt"],
    );
    assert_eq!(content, "file 123");
    assert_eq!(git(repository.path(), ["status", "--porcelain"]), "");
    let described = git(
        repository.path(),
        ["log", "-1", "--format=%an <%ae> %at %cn %s"],
    );
    assert_eq!(
        described,
        "Derrick Test <test@derrick.invalid> 1704067200 Derrick Test add 5000 files"
    );
}

/// Clones `url` into a new temporary directory with the hermetic `git` and returns it.
fn clone_ok(url: &str) -> TempDir {
    let destination = TempDir::new().unwrap();
    let output = clone(url, destination.path());
    assert!(
        output.status.success(),
        "clone of {url} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    destination
}

fn clone(url: &str, destination: &Path) -> Output {
    git_command(destination)
        .args(["clone", "--quiet", url, "."])
        .output()
        .unwrap()
}

/// Returns the server's URL for `repository` with `agent:<password>@` as user info.
fn url_with_user_info(server: &GitHttpServer, repository: &str, password: &str) -> String {
    format!("http://{USER}:{password}@{}/{repository}", server.address())
}

/// Sends `request` on a new connection and returns everything the server sent back.
fn send_raw(server: &GitHttpServer, request: &str) -> String {
    let mut stream = TcpStream::connect(server.address()).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

/// Returns `length` bytes from a xorshift generator: reproducible and incompressible.
fn noise(length: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}
