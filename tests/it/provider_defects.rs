//! Defects that a hostile-user test found in the local provider: reset and destroy deleting host
//! files through a bind mount, processes that escaped cleanup, command strings over the kernel's
//! argument limit, and file path mistakes that came back as `500 internal`.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::support::derrick::{Derrick, config, processes_matching, wait_until};
use crate::support::repos::TestRepo;

/// How long a test waits for a background process to appear or disappear.
const PROCESS_DEADLINE: Duration = Duration::from_secs(5);

/// Starts a derrick with `--layers <mode>` and one workspace whose repository has
/// `/code/app/a.txt`.
async fn started(mode: &str) -> (TestRepo, Derrick, String) {
    let repository = TestRepo::new();
    repository.write("a.txt", "a\n");
    repository.commit("initial");
    let derrick = Derrick::start_with(
        &config(repository.path().display(), ""),
        &["--layers", mode],
        &[],
    );
    let id = derrick.create_id().await;
    (repository, derrick, id)
}

/// Lists the mount points at or below `folder` in this process's mount table, which derrick
/// shares. `folder` is canonicalized because the table contains resolved paths.
fn mounts_below(folder: &Path) -> Vec<PathBuf> {
    let folder = folder
        .canonicalize()
        .unwrap_or_else(|_| folder.to_path_buf());
    let table = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(point.replace("\\040", " ")))
        .filter(|point| point.starts_with(&folder))
        .collect()
}

/// Returns `sleep <8 random digits>`, a command line that no other test, nor another run of
/// this one, starts: `processes_matching` looks at every process of the machine.
fn unique_sleep() -> String {
    let random = uuid::Uuid::new_v4().as_u128() as u32;
    format!("sleep {}", 10_000_000 + random % 90_000_000)
}

/// Creates a host folder with one file, standing for data that must survive anything a
/// workspace does.
fn host_folder() -> (tempfile::TempDir, PathBuf) {
    let folder = tempfile::tempdir().expect("host folder");
    let file = folder.path().join("keep.txt");
    std::fs::write(&file, "host data\n").expect("host file");
    (folder, file)
}

async fn expect_status(derrick: &Derrick, method: &str, path: &str, body: Option<&Value>) {
    let reply = derrick.request(method, path, body).await;
    assert_eq!(
        reply.status,
        200,
        "{method} {path}: {}\nlog:\n{}",
        reply.body,
        derrick.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_and_destroy_spare_bind_mounted_files() {
    for mode in ["copy", "overlay"] {
        let (_repository, derrick, id) = started(mode).await;
        let (host, file) = host_folder();
        let workspace = derrick.workspace_root(&id).join("..");
        let root_mounts: Vec<PathBuf> = mounts_below(&workspace);
        let mount = format!(
            "mkdir -p mnt 'with space' code/app/nested && mount --bind {host} mnt \
             && mount --bind {host} 'with space' && mount --bind {host} mnt \
             && mount --bind {host} code/app/nested && cat mnt/keep.txt",
            host = host.path().display()
        );
        assert_eq!(derrick.output(&id, &mount).await, "host data\n", "{mode}");
        assert_eq!(mounts_below(&workspace).len(), root_mounts.len() + 4);

        expect_status(&derrick, "POST", &format!("/workspaces/{id}/reset"), None).await;
        assert_eq!(
            std::fs::read_to_string(&file).expect("host file after reset"),
            "host data\n",
            "{mode}: reset deleted through the mount"
        );
        assert_eq!(mounts_below(&workspace), root_mounts, "{mode}: after reset");
        assert_eq!(
            derrick
                .output(&id, "ls -A code/app; ls mnt 2>&1 | wc -l")
                .await,
            ".git\na.txt\n1\n",
            "{mode}: the workspace is clean"
        );

        derrick.output(&id, &mount).await;
        expect_status(&derrick, "DELETE", &format!("/workspaces/{id}"), None).await;
        assert_eq!(
            std::fs::read_to_string(&file).expect("host file after destroy"),
            "host data\n",
            "{mode}: destroy deleted through the mount"
        );
        assert_eq!(mounts_below(&workspace), Vec::<PathBuf>::new(), "{mode}");
        assert!(!workspace.exists(), "{mode}: the workspace folder is gone");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_processes_die_on_every_cleanup() {
    let (_repository, mut derrick, id) = started("overlay").await;
    let other = derrick.create_id().await;
    let escape = async |id: &str, step: &str| {
        let marker = unique_sleep();
        let cmd = format!("env -i setsid {marker} > /dev/null 2>&1 &");
        derrick.output(id, &cmd).await;
        let started = wait_until(PROCESS_DEADLINE, || processes_matching(&marker).len() == 1);
        assert!(started.await, "{step}: `{marker}` did not start");
        marker
    };

    let marker = escape(&id, "reset").await;
    expect_status(&derrick, "POST", &format!("/workspaces/{id}/reset"), None).await;
    assert_eq!(processes_matching(&marker), Vec::<i32>::new(), "reset");

    let marker = escape(&id, "destroy").await;
    expect_status(&derrick, "DELETE", &format!("/workspaces/{id}"), None).await;
    assert_eq!(processes_matching(&marker), Vec::<i32>::new(), "destroy");

    let marker = escape(&other, "shutdown").await;
    assert!(derrick.stop().success(), "derrick exits cleanly");
    assert_eq!(processes_matching(&marker), Vec::<i32>::new(), "shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_setsid_children() {
    let (_repository, derrick, id) = started("overlay").await;
    let marker = unique_sleep();
    let reply = derrick
        .post(
            &format!("/workspaces/{id}/cmd_with_output"),
            json!({ "cmd": format!("setsid {marker} & sleep 100"), "timeout": 2 }),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        (&reply.body["exit_code"], &reply.body["timed_out"]),
        (&json!(124), &json!(true))
    );
    assert!(
        wait_until(PROCESS_DEADLINE, || processes_matching(&marker).is_empty()).await,
        "the detached `{marker}` survived the timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_processes_live_until_reset() {
    let (_repository, derrick, id) = started("copy").await;
    let marker = unique_sleep();
    derrick.output(&id, &format!("{marker} &")).await;
    assert!(
        wait_until(PROCESS_DEADLINE, || processes_matching(&marker).len() == 1).await,
        "`{marker}` did not start"
    );
    assert_eq!(derrick.output(&id, "echo later").await, "later\n");
    assert_eq!(processes_matching(&marker).len(), 1, "the server lives on");
    expect_status(&derrick, "POST", &format!("/workspaces/{id}/reset"), None).await;
    assert_eq!(processes_matching(&marker), Vec::<i32>::new());
}

/// Sends `cmd_with_output` and returns the status, the error code (or `ok`) and the output or
/// error message.
async fn command(derrick: &Derrick, id: &str, body: Value) -> (u16, String, String) {
    let reply = derrick
        .post(&format!("/workspaces/{id}/cmd_with_output"), body)
        .await;
    let code = reply.body["error"]["code"]
        .as_str()
        .unwrap_or("ok")
        .to_owned();
    let text = match reply.body["error"]["message"].as_str() {
        Some(message) => message.to_owned(),
        None => reply.body["output"].as_str().unwrap_or_default().to_owned(),
    };
    (reply.status, code, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_commands_run_or_fail_clearly() {
    let (_repository, derrick, id) = started("overlay").await;
    let identity = "echo \"$0 $# [$*]\"; cat; echo stdin closed";
    let (_, _, small) = command(&derrick, &id, json!({ "cmd": identity })).await;
    let large = format!("X='{}'; echo ${{#X}}; {identity}", "a".repeat(300_000));
    let (status, code, output) = command(&derrick, &id, json!({ "cmd": large })).await;
    assert_eq!((status, code.as_str()), (200, "ok"), "{output}");
    assert_eq!(
        output,
        format!("300000\n{small}"),
        "$0, $@ and stdin as usual"
    );
    // derrick passes on what it inherited itself; the script's descriptor is not among them.
    // No pipeline: bash would hold the pipe's ends while `ls` looks.
    let descriptors = "ls /proc/$$/fd > fds.txt && tr '\\n' ' ' < fds.txt";
    let (_, _, expected) = command(&derrick, &id, json!({ "cmd": descriptors })).await;
    let large = format!("X='{}'; {descriptors}", "b".repeat(200_000));
    let (_, _, actual) = command(&derrick, &id, json!({ "cmd": large })).await;
    assert_eq!(actual, expected, "the script's descriptor is closed");

    let value = "v".repeat(200 * 1024);
    let body = json!({ "cmd": "true", "env": { "BIG_VALUE": value } });
    let (status, code, message) = command(&derrick, &id, body).await;
    assert_eq!(
        (status, code.as_str()),
        (400, "invalid_request"),
        "{message}"
    );
    assert!(message.contains("BIG_VALUE"), "{message}");

    // 64 variables of 120 KiB exceed the total limit even with an unlimited stack (6 MiB).
    let many: serde_json::Map<String, Value> = (0..64)
        .map(|index| (format!("PART_{index}"), json!("p".repeat(120 * 1024))))
        .collect();
    let body = json!({ "cmd": "true", "env": many });
    let (status, code, message) = command(&derrick, &id, body).await;
    assert_eq!(
        (status, code.as_str()),
        (400, "invalid_request"),
        "{message}"
    );
    assert!(message.contains("environment"), "{message}");

    let body = json!({ "cmd": "echo a\u{0}b" });
    let (status, code, message) = command(&derrick, &id, body).await;
    assert_eq!(
        (status, code.as_str()),
        (400, "invalid_request"),
        "{message}"
    );
    assert!(message.contains("NUL"), "{message}");
}

/// Sends a file request and returns the status and the error code (`ok` on success).
async fn file_request(derrick: &Derrick, id: &str, operation: &str, body: &Value) -> (u16, String) {
    let reply = derrick
        .post(&format!("/workspaces/{id}/{operation}"), body.clone())
        .await;
    let code = reply.body["error"]["code"]
        .as_str()
        .unwrap_or("ok")
        .to_owned();
    (reply.status, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_path_mistakes_are_client_errors() {
    let (_repository, derrick, id) = started("overlay").await;
    let root = derrick.workspace_root(&id);
    let _socket = UnixListener::bind(root.join("code/app/socket")).expect("socket in workspace");
    let content = base64::engine::general_purpose::STANDARD.encode("x");
    let long_name = "n".repeat(300);
    let deep = format!("{}f", "d/".repeat(3000));
    let cases = [
        json!({ "path": long_name }),
        json!({ "path": deep }),
        json!({ "path": "a.txt", "working_dir": "/missing" }),
        json!({ "path": "/code/app/a.txt", "working_dir": "/missing" }),
        json!({ "path": "a.txt", "working_dir": "/code/app/a.txt" }),
        json!({ "path": "x", "working_dir": "/code/app/a.txt/below" }),
        json!({ "path": "x", "working_dir": long_name }),
        json!({ "path": "new-folder/" }),
        json!({ "path": "/code/app/" }),
        json!({ "path": "/code/app/." }),
        json!({ "path": "/code/app" }),
    ];
    for case in cases {
        let read = file_request(&derrick, &id, "read_file", &case).await;
        assert_eq!(read, (400, "invalid_request".to_owned()), "read {case}");
        let mut write = case.clone();
        write["content"] = json!(content);
        let written = file_request(&derrick, &id, "write_file", &write).await;
        assert_eq!(written, (400, "invalid_request".to_owned()), "write {case}");
    }
    let socket = json!({ "path": "/code/app/socket" });
    let read = file_request(&derrick, &id, "read_file", &socket).await;
    assert_eq!(read, (400, "invalid_request".to_owned()), "read a socket");
    assert!(!root.join("missing").exists(), "no working_dir was created");
    assert!(
        !root.join("new-folder").exists(),
        "no file named by a folder path"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("code/app/a.txt")).expect("a.txt"),
        "a\n"
    );

    let reply = derrick
        .post(
            &format!("/workspaces/{id}/read_file"),
            json!({ "path": "a.txt", "working_dir": "/missing" }),
        )
        .await;
    let message = reply.body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("working_dir `/missing` does not exist"),
        "{message}"
    );

    for working_dir in [long_name.as_str(), "/code/app/a.txt/below"] {
        let body = json!({ "cmd": "pwd", "working_dir": working_dir });
        let (status, code, message) = command(&derrick, &id, body).await;
        assert_eq!(
            (status, code.as_str()),
            (400, "invalid_request"),
            "{message}"
        );
    }
}
