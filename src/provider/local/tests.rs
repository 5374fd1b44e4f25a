//! Tests of the local provider with real overlay mounts, copies and processes, in both layer
//! formats. Overlay mounts need root: without it the overlay tests fail, they never skip.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::*;
use crate::keys::LayerKind;

/// The `max_bytes` the file tests pass to `read_file`.
const READ_LIMIT: u64 = 4096;

/// A provider in a temporary cache with one workspace provisioned on an empty base layer.
struct Fixture {
    cache: tempfile::TempDir,
    provider: LocalProvider,
    id: WorkspaceId,
    base: LayerKey,
}

impl Fixture {
    async fn new(mode: LayerMode) -> Fixture {
        Self::with(mode, |provider| provider).await
    }

    /// Like `new`, with the provider changed by `adapt` (to `without_cgroups`) before use.
    async fn with(mode: LayerMode, adapt: fn(LocalProvider) -> LocalProvider) -> Fixture {
        let cache = tempfile::tempdir().expect("temporary cache");
        let provider = adapt(provider_in(cache.path(), mode));
        let base = key(1);
        provider
            .ensure_base(&base, "test")
            .await
            .expect("base layer");
        let id = WorkspaceId::generate();
        provider
            .provision(&id, std::slice::from_ref(&base))
            .await
            .expect("provision");
        Fixture {
            cache,
            provider,
            id,
            base,
        }
    }

    fn root(&self) -> PathBuf {
        self.provider.workspace_root(&self.id)
    }

    async fn run(&self, cmd: &str) -> ExecOutput {
        self.run_request(request(cmd)).await
    }

    async fn run_request(&self, request: ExecRequest) -> ExecOutput {
        let cmd = request.cmd.clone();
        self.provider
            .exec(&self.id, request)
            .await
            .unwrap_or_else(|error| panic!("`{cmd}` failed: {error}"))
    }

    async fn write(&self, path: &str, content: &str) {
        self.provider
            .write_file(&self.id, path, None, content.as_bytes())
            .await
            .expect("write");
    }

    async fn read(&self, path: &str) -> Result<Vec<u8>> {
        self.provider
            .read_file(&self.id, path, None, READ_LIMIT)
            .await
    }

    async fn snapshot(&self, key: &LayerKey, parent: &LayerKey) -> LayerMeta {
        let meta = LayerMeta {
            key: key.clone(),
            kind: LayerKind::Setup,
            parent: Some(parent.clone()),
            config_name: "test".to_owned(),
            commits: BTreeMap::from([("/code/app".to_owned(), "0".repeat(40))]),
            created_at: "2024-01-01T00:00:00Z".to_owned(),
        };
        self.provider
            .snapshot(&self.id, &meta)
            .await
            .expect("snapshot");
        meta
    }
}

impl Drop for Fixture {
    /// Kills processes and unmounts overlays even when a test fails half-way, so that no mount
    /// or process outlives the temporary cache.
    fn drop(&mut self) {
        let Ok(entries) = fs::read_dir(self.cache.path().join("workspaces")) else {
            return;
        };
        for entry in entries.flatten() {
            let Some(id) = entry.file_name().to_str().and_then(WorkspaceId::parse) else {
                continue;
            };
            let killed = self.provider.tracker.kill_workspace_blocking(&id, &[]);
            let unmounted = mounts::unmount_below_blocking(&entry.path());
            if let Err(error) = killed.and(unmounted) {
                eprintln!("cleaning up workspace {id}: {error}");
            }
        }
    }
}

fn provider_in(cache: &Path, mode: LayerMode) -> LocalProvider {
    let options = LocalOptions {
        cache_dir: cache.to_path_buf(),
        layer_mode: mode,
    };
    let provider = LocalProvider::new(options).expect("provider starts");
    assert_eq!(
        provider.layer_mode(),
        mode,
        "tests run as root, where overlay mounts work"
    );
    provider
}

fn key(number: u32) -> LayerKey {
    LayerKey::parse(&format!("{number:064x}")).expect("64 hex digits")
}

fn request(cmd: &str) -> ExecRequest {
    ExecRequest {
        cmd: cmd.to_owned(),
        working_dir: None,
        env: BTreeMap::new(),
        timeout: None,
    }
}

fn with_timeout(cmd: &str, seconds: u64) -> ExecRequest {
    ExecRequest {
        timeout: Some(Duration::from_secs(seconds)),
        ..request(cmd)
    }
}

/// Lists every entry below `root` with its type, mode, size, modification time and content.
fn describe(root: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in fs::read_dir(&folder).expect("folder") {
            let path = entry.expect("entry").path();
            let metadata = fs::symlink_metadata(&path).expect("metadata");
            let content = if metadata.is_file() {
                String::from_utf8_lossy(&fs::read(&path).expect("file")).into_owned()
            } else if metadata.is_symlink() {
                fs::read_link(&path).expect("link").display().to_string()
            } else {
                pending.push(path.clone());
                String::new()
            };
            let name = path
                .strip_prefix(root)
                .expect("below root")
                .display()
                .to_string();
            let mode = metadata.mode();
            let mtime = (metadata.mtime(), metadata.mtime_nsec());
            lines.push(format!(
                "{name} {mode:o} {} {mtime:?} {content:?}",
                metadata.size()
            ));
        }
    }
    lines.sort();
    lines
}

/// Returns the pids of live processes of workspace `id` whose command line is `command`.
fn processes_of(id: &WorkspaceId, command: &[&str]) -> Vec<i32> {
    let marker = format!("DERRICK_WORKSPACE_ID={id}");
    let wanted: Vec<u8> = command
        .iter()
        .flat_map(|part| part.bytes().chain([0]))
        .collect();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let environ = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'));
        let marked = environ
            .split(|byte| *byte == 0)
            .any(|entry| entry == marker.as_bytes());
        if cmdline == wanted && marked && !zombie {
            found.push(pid);
        }
    }
    found
}

/// Returns `["sleep", <8 random digits>]`: a command line that no other test starts.
fn unique_sleep() -> [String; 2] {
    let random = uuid::Uuid::new_v4().as_u128() as u32;
    [
        "sleep".to_owned(),
        (10_000_000 + random % 90_000_000).to_string(),
    ]
}

/// Returns the pids of live processes whose command line is `command`, whatever their
/// environment (`processes_of` finds only those that kept the workspace marker).
fn processes_running(command: &[String]) -> Vec<i32> {
    let wanted: Vec<u8> = command
        .iter()
        .flat_map(|part| part.bytes().chain([0]))
        .collect();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        if fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default() == wanted {
            found.push(pid);
        }
    }
    found
}

/// Polls `condition` every 20 ms until it holds, failing after 5 s.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod with_overlay {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::LayerMode::Overlay).await
            })*
        }
        mod with_copies {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::LayerMode::Copy).await
            })*
        }
    };
}

in_both_modes!(
    reset_restores_the_clean_snapshot,
    snapshots_stack_and_new_workspaces_start_from_them,
    destroy_removes_the_workspace_but_keeps_layers,
    a_restarted_provider_finds_its_workspaces,
    timeout_kills_the_whole_group_and_frees_the_pipe,
    timeout_is_neither_early_nor_late,
    background_processes_do_not_delay_the_reply,
    kill_processes_finds_processes_that_left_their_group,
    stdin_is_closed_and_there_is_no_terminal,
    exit_codes_are_exact,
    large_output_keeps_the_tail_within_the_cap,
    output_is_interleaved_in_order_with_invalid_bytes_replaced,
    environment_is_the_allowlist_plus_the_request,
    working_dir_must_be_an_existing_folder_inside,
    files_round_trip_every_byte_value,
    file_errors_are_client_errors,
    escapes_are_refused_and_change_nothing_outside,
    one_workspace_never_blocks_another,
);

#[test]
fn auto_mode_uses_overlays_where_they_work() {
    let cache = tempfile::tempdir().expect("temporary cache");
    let options = LocalOptions {
        cache_dir: cache.path().to_path_buf(),
        layer_mode: LayerMode::Auto,
    };
    let provider = LocalProvider::new(options).expect("provider starts");
    assert_eq!(
        (provider.layer_mode(), provider.kind()),
        (LayerMode::Overlay, "local/overlay")
    );
}

#[test]
fn auto_mode_falls_back_to_copies_when_the_probe_fails() {
    // A `:` in the cache path cannot be passed in overlay mount options, so the probe fails.
    let cache = tempfile::tempdir().expect("temporary cache");
    let cache_dir = cache.path().join("with:colon");
    let options = LocalOptions {
        cache_dir: cache_dir.clone(),
        layer_mode: LayerMode::Auto,
    };
    let provider = LocalProvider::new(options).expect("provider starts");
    assert_eq!(
        (provider.layer_mode(), provider.kind()),
        (LayerMode::Copy, "local/copy")
    );
    let options = LocalOptions {
        cache_dir,
        layer_mode: LayerMode::Overlay,
    };
    let error = LocalProvider::new(options).expect_err("overlay cannot work here");
    assert_eq!(error.code(), "provider_unavailable");
    assert_eq!(
        fs::read_dir(cache.path().join("with:colon/tmp"))
            .expect("tmp")
            .count(),
        0
    );
}

async fn reset_restores_the_clean_snapshot(mode: LayerMode) {
    let fixture = Fixture::new(mode).await;
    fixture.write("/code/app/README.md", "readme\n").await;
    fixture
        .write("/code/app/src/lib.rs", "pub fn lib() {}\n")
        .await;
    let setup = "mkdir -p data/cache && echo cached > data/cache/entry && chmod 700 data \
                 && ln -s code/app app";
    let setup = fixture.run(setup).await;
    assert_eq!(setup.exit_code, 0, "{}", setup.output);
    let clean = key(2);
    let meta = fixture.snapshot(&clean, &fixture.base).await;
    assert_eq!(
        fixture.provider.layer(&clean).await.expect("layer"),
        Some(meta)
    );
    let snapshotted = describe(&fixture.root());

    fixture.write("/code/app/README.md", "changed\n").await;
    let change = "rm code/app/src/lib.rs data/cache/entry && mkdir -p added/deep \
                  && echo new > added/deep/file && echo new > new.txt && chmod 755 data \
                  && rm app && ln -s elsewhere app";
    assert_eq!(fixture.run(change).await.exit_code, 0);
    let started = fixture.run("sleep 631 &").await;
    assert_eq!(started.exit_code, 0);
    assert_eq!(processes_of(&fixture.id, &["sleep", "631"]).len(), 1);
    assert_ne!(describe(&fixture.root()), snapshotted);

    fixture.provider.reset(&fixture.id).await.expect("reset");
    assert_eq!(describe(&fixture.root()), snapshotted);
    assert_eq!(
        fixture.read("code/app/README.md").await.expect("restored"),
        b"readme\n"
    );
    assert!(
        processes_of(&fixture.id, &["sleep", "631"]).is_empty(),
        "reset kills background processes"
    );
    let after = fixture.run("cat code/app/src/lib.rs && ls").await;
    assert_eq!(after.output, "pub fn lib() {}\napp\ncode\ndata\n");
}

async fn snapshots_stack_and_new_workspaces_start_from_them(mode: LayerMode) {
    let fixture = Fixture::new(mode).await;
    fixture.write("/code/app/one.txt", "one").await;
    fixture.write("/code/app/two.txt", "two").await;
    let (first, second) = (key(2), key(3));
    fixture.snapshot(&first, &fixture.base).await;
    let delete = fixture
        .run("rm code/app/one.txt && echo three > code/app/three.txt")
        .await;
    assert_eq!(delete.exit_code, 0);
    fixture.snapshot(&second, &first).await;
    let expected = describe(&fixture.root());
    assert_eq!(
        fixture.run("ls code/app").await.output,
        "three.txt\ntwo.txt\n"
    );

    fixture.write("/code/app/one.txt", "back").await;
    fixture.provider.reset(&fixture.id).await.expect("reset");
    assert_eq!(
        describe(&fixture.root()),
        expected,
        "a deletion recorded in a layer stays deleted"
    );

    let other = WorkspaceId::generate();
    let stack = [fixture.base.clone(), first, second];
    fixture
        .provider
        .provision(&other, &stack)
        .await
        .expect("provision from layers");
    assert_eq!(describe(&fixture.provider.workspace_root(&other)), expected);
    fixture.provider.destroy(&other).await.expect("destroy");
}

async fn destroy_removes_the_workspace_but_keeps_layers(mode: LayerMode) {
    let fixture = Fixture::new(mode).await;
    fixture.write("/file.txt", "content").await;
    fixture.run("sleep 632 &").await;
    fixture
        .provider
        .destroy(&fixture.id)
        .await
        .expect("destroy");
    assert!(!fixture.provider.layout.workspace(&fixture.id).exists());
    assert!(processes_of(&fixture.id, &["sleep", "632"]).is_empty());
    let error = fixture
        .provider
        .exec(&fixture.id, request("true"))
        .await
        .expect_err("gone");
    assert_eq!(error.code(), "workspace_not_found");
    assert!(
        fixture
            .provider
            .layer(&fixture.base)
            .await
            .expect("layer")
            .is_some()
    );
    fixture
        .provider
        .destroy(&fixture.id)
        .await
        .expect("destroying twice succeeds");
}

async fn a_restarted_provider_finds_its_workspaces(mode: LayerMode) {
    let fixture = Fixture::new(mode).await;
    fixture.write("/file.txt", "content").await;
    fixture.snapshot(&key(2), &fixture.base).await;
    fixture.write("/scratch.txt", "scratch").await;
    overlay::unmount_blocking(&fixture.root()).expect("simulate a reboot, which drops mounts");

    let restarted = provider_in(fixture.cache.path(), mode);
    let listing = restarted
        .exec(&fixture.id, request("cat file.txt; ls"))
        .await
        .expect("exec");
    assert_eq!(listing.output, "contentfile.txt\nscratch.txt\n");
    restarted
        .reset(&fixture.id)
        .await
        .expect("reset with the stack read from disk");
    assert_eq!(
        restarted
            .read_file(&fixture.id, "/scratch.txt", None, READ_LIMIT)
            .await
            .expect_err("reset")
            .code(),
        "file_not_found"
    );
    let unknown = WorkspaceId::generate();
    assert_eq!(
        restarted
            .exec(&unknown, request("true"))
            .await
            .expect_err("unknown")
            .code(),
        "workspace_not_found"
    );
}

async fn timeout_kills_the_whole_group_and_frees_the_pipe(mode: LayerMode) {
    let fixture = Fixture::new(mode).await;
    let started = Instant::now();
    let cmd = "(while true; do date >> tick.log; sleep 0.2; done) & sleep 601";
    let output = fixture.run_request(with_timeout(cmd, 2)).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(4),
        "replied after {elapsed:?}"
    );
    assert_eq!((output.exit_code, output.timed_out), (124, true));
    eventually("sleep 601 is gone", || {
        processes_of(&fixture.id, &["sleep", "601"]).is_empty()
    })
    .await;
    let size = fs::metadata(fixture.root().join("tick.log"))
        .expect("tick.log")
        .len();
    // Observing that a file no longer grows needs a window of time; nothing is awaited here.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        fs::metadata(fixture.root().join("tick.log"))
            .expect("tick.log")
            .len(),
        size
    );

    let started = Instant::now();
    let fifo = "mkfifo f && ((while true; do echo x; sleep 0.1; done) > f &) && cat f";
    let output = fixture.run_request(with_timeout(fifo, 2)).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "FIFO variant replied after {:?}",
        started.elapsed()
    );
    assert_eq!((output.exit_code, output.timed_out), (124, true));
    assert!(output.output.starts_with("x\n"), "{:?}", output.output);
}

async fn timeout_is_neither_early_nor_late(mode: LayerMode) {
    let fixture = Fixture::new(mode).await;
    let started = Instant::now();
    let output = fixture
        .run_request(with_timeout("sleep 5; echo done", 2))
        .await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(3),
        "replied after {elapsed:?}"
    );
    assert_eq!(
        (output.output.as_str(), output.exit_code, output.timed_out),
        ("", 124, true)
    );

    let output = fixture
        .run_request(with_timeout("while true; do echo .; sleep 0.1; done", 1))
        .await;
    assert!(output.timed_out);
    assert!(
        output.output.len() >= 4 && output.output.chars().all(|c| c == '.' || c == '\n'),
        "{:?}",
        output.output
    );

    let output = fixture
        .run_request(with_timeout("sleep 1; echo ok", 5))
        .await;
    assert_eq!(
        (output.output.as_str(), output.exit_code, output.timed_out),
        ("ok\n", 0, false)
    );
}

async fn background_processes_do_not_delay_the_reply(mode: LayerMode) {
    let fixture = Fixture::new(mode).await;
    let started = Instant::now();
    let output = fixture.run("sleep 633 & echo started").await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "replied after {:?}",
        started.elapsed()
    );
    assert_eq!((output.output.as_str(), output.exit_code), ("started\n", 0));
    assert_eq!(
        processes_of(&fixture.id, &["sleep", "633"]).len(),
        1,
        "a background process keeps running"
    );
    fixture
        .provider
        .kill_processes(&fixture.id)
        .await
        .expect("kill");
    assert!(processes_of(&fixture.id, &["sleep", "633"]).is_empty());
}

async fn kill_processes_finds_processes_that_left_their_group(mode: LayerMode) {
    let fixture = Fixture::new(mode).await;
    let escape = "setsid sleep 634 > /dev/null 2>&1 & (sleep 635 > /dev/null 2>&1 &); echo ok";
    let output = fixture.run(escape).await;
    assert_eq!(output.output, "ok\n");
    eventually("both sleeps started", || {
        processes_of(&fixture.id, &["sleep", "634"]).len() == 1
            && processes_of(&fixture.id, &["sleep", "635"]).len() == 1
    })
    .await;
    fixture
        .provider
        .kill_processes(&fixture.id)
        .await
        .expect("kill");
    assert!(
        processes_of(&fixture.id, &["sleep", "634"]).is_empty(),
        "setsid does not escape"
    );
    assert!(
        processes_of(&fixture.id, &["sleep", "635"]).is_empty(),
        "a double fork does not escape"
    );
}

async fn stdin_is_closed_and_there_is_no_terminal(mode: LayerMode) {
    let fixture = Fixture::new(mode).await;
    let cases = [
        ("cat", ""),
        ("read -r line || echo eof", "eof\n"),
        ("head -c 1 | wc -c", "0\n"),
        (
            "test -t 0 || test -t 1 || test -t 2 || echo notty",
            "notty\n",
        ),
        ("printf 'a\\nb\\n'", "a\nb\n"),
    ];
    for (cmd, expected) in cases {
        let started = Instant::now();
        let output = fixture.run_request(with_timeout(cmd, 10)).await;
        assert_eq!(
            (output.output.as_str(), output.timed_out),
            (expected, false),
            "{cmd}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "`{cmd}` took {:?}",
            started.elapsed()
        );
    }
}

async fn exit_codes_are_exact(mode: LayerMode) {
    let fixture = Fixture::new(mode).await;
    let cases = [
        ("true", 0),
        ("exit 7", 7),
        ("exit 126", 126),
        ("no-such-command-for-derrick", 127),
        ("kill -9 $$", 137),
        ("kill -15 $$", 143),
    ];
    for (cmd, expected) in cases {
        assert_eq!(fixture.run(cmd).await.exit_code, expected, "{cmd}");
    }
    for _ in 0..50 {
        let (seven, echo) = (fixture.run("exit 7").await, fixture.run("echo x").await);
        assert_eq!(
            (seven.exit_code, echo.output.as_str(), echo.exit_code),
            (7, "x\n", 0)
        );
    }
}

async fn large_output_keeps_the_tail_within_the_cap(mode: LayerMode) {
    let fixture = Fixture::new(mode).await;
    let output = fixture
        .run("head -c 20000000 /dev/zero | tr '\\0' a; printf END")
        .await;
    assert_eq!(
        (output.exit_code, output.truncated, output.output.len()),
        (0, true, MAX_OUTPUT_BYTES)
    );
    assert!(output.output.ends_with("aaaEND"));
    assert!(output.output.bytes().rev().skip(3).all(|byte| byte == b'a'));
    let small = fixture.run("head -c 1000 /dev/zero | tr '\\0' a").await;
    assert_eq!((small.output.len(), small.truncated), (1000, false));
}

async fn output_is_interleaved_in_order_with_invalid_bytes_replaced(mode: LayerMode) {
    let fixture = Fixture::new(mode).await;
    assert_eq!(
        fixture.run("echo a; echo b >&2; echo c").await.output,
        "a\nb\nc\n"
    );
    assert_eq!(
        fixture.run("printf 'a\\377b\\n'").await.output,
        "a\u{fffd}b\n"
    );
    assert_eq!(fixture.run("printf 'last line'").await.output, "last line");
    assert_eq!(fixture.run("printf 'line\\r\\n'").await.output, "line\r\n");
}

async fn environment_is_the_allowlist_plus_the_request(mode: LayerMode) {
    let fixture = Fixture::new(mode).await;
    let env = BTreeMap::from([
        ("CUSTOM".to_owned(), "value".to_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ("DERRICK_WORKSPACE_ID".to_owned(), "ws-other".to_owned()),
    ]);
    let names = ExecRequest {
        env,
        ..request("env | cut -d= -f1 | sort | tr '\\n' ' '")
    };
    let mut expected = vec![
        "CUSTOM",
        "DERRICK_WORKSPACE_ID",
        "GIT_TERMINAL_PROMPT",
        "HOME",
        "LANG",
        "PATH",
        "PWD",
        "SHLVL",
        "_",
    ];
    for name in ["LC_ALL", "TZ"] {
        if std::env::var_os(name).is_some() {
            expected.push(name);
        }
    }
    expected.sort_unstable();
    let expected: String = expected.iter().map(|name| format!("{name} ")).collect();
    assert_eq!(fixture.run_request(names.clone()).await.output, expected);

    let values = ExecRequest {
        cmd: "echo \"$HOME|$GIT_TERMINAL_PROMPT|$CUSTOM|$LANG|$DERRICK_WORKSPACE_ID\"".to_owned(),
        ..names
    };
    let root = fixture.root();
    let expected = format!("{}|0|value|C.UTF-8|{}\n", root.display(), fixture.id);
    assert_eq!(fixture.run_request(values).await.output, expected);
    assert_eq!(
        fixture.run("cd && pwd").await.output,
        format!("{}\n", root.display()),
        "~ is the workspace root"
    );

    let env = BTreeMap::from([("PATH".to_owned(), "/nowhere".to_owned())]);
    let own_path = ExecRequest {
        env,
        ..request("echo \"$PATH\"")
    };
    let output = fixture.run_request(own_path).await;
    assert_eq!(
        (output.output.as_str(), output.exit_code),
        ("/nowhere\n", 0),
        "bash starts without PATH"
    );
}

async fn working_dir_must_be_an_existing_folder_inside(mode: LayerMode) {
    let fixture = Fixture::new(mode).await;
    fixture.write("/code/app/file.txt", "x").await;
    let root = fixture.root().canonicalize().expect("root");
    let cases = [
        ("code/app", Ok(format!("{}/code/app\n", root.display()))),
        ("/code", Ok(format!("{}/code\n", root.display()))),
        ("/code/missing", Err("invalid_request")),
        ("code/app/file.txt", Err("invalid_request")),
        ("../..", Err("path_outside_workspace")),
    ];
    for (working_dir, expected) in cases {
        let request = ExecRequest {
            working_dir: Some(working_dir.to_owned()),
            ..request("pwd")
        };
        let actual = fixture.provider.exec(&fixture.id, request).await;
        let actual = actual
            .map(|output| output.output)
            .map_err(|error| error.code());
        assert_eq!(actual, expected, "working_dir {working_dir}");
    }
}

async fn files_round_trip_every_byte_value(mode: LayerMode) {
    let fixture = Fixture::new(mode).await;
    let content: Vec<u8> = (0..4).flat_map(|_| 0..=255u8).collect();
    // The working_dir must exist; the file's own missing parents are created.
    fixture.run("mkdir data").await;
    fixture
        .provider
        .write_file(&fixture.id, "bin/all.bin", Some("/data"), &content)
        .await
        .expect("write");
    assert_eq!(
        fs::read(fixture.root().join("data/bin/all.bin")).expect("on disk"),
        content
    );
    assert_eq!(
        fixture.read("/data/bin/all.bin").await.expect("read"),
        content
    );
    let read = fixture
        .provider
        .read_file(&fixture.id, "all.bin", Some("data/bin"), READ_LIMIT)
        .await;
    assert_eq!(read.expect("read relative"), content);

    let sum = fixture.run("sha256sum data/bin/all.bin | cut -c1-16").await;
    assert_eq!(sum.output, "785b0751fc2c53dc\n");
    fixture.run("chmod 751 data/bin/all.bin").await;
    fixture
        .provider
        .write_file(&fixture.id, "/data/bin/all.bin", None, b"new")
        .await
        .expect("overwrite");
    let metadata = fs::metadata(fixture.root().join("data/bin/all.bin")).expect("file");
    assert_eq!(
        (metadata.mode() & 0o7777, metadata.len()),
        (0o751, 3),
        "an overwrite keeps the mode"
    );
}

async fn file_errors_are_client_errors(mode: LayerMode) {
    let fixture = Fixture::new(mode).await;
    fixture.write("/folder/file.txt", "x").await;
    let too_large = vec![b'x'; usize::try_from(READ_LIMIT).expect("small") + 1];
    fixture
        .provider
        .write_file(&fixture.id, "/large.bin", None, &too_large)
        .await
        .expect("write");
    fixture.run("mkfifo fifo").await;
    let reads = [
        ("/missing.txt", "file_not_found"),
        ("/folder/file.txt/below", "file_not_found"),
        ("/folder", "invalid_request"),
        ("/", "invalid_request"),
        ("/fifo", "invalid_request"),
        ("/large.bin", "payload_too_large"),
    ];
    for (path, expected) in reads {
        assert_eq!(
            fixture.read(path).await.expect_err(path).code(),
            expected,
            "read {path}"
        );
    }
    let writes = [
        ("/folder", "invalid_request"),
        ("/", "invalid_request"),
        ("/folder/file.txt/below", "invalid_request"),
        ("/new-folder/", "invalid_request"),
        ("/folder/.", "invalid_request"),
        ("/folder/new/..", "invalid_request"),
        ("", "invalid_request"),
    ];
    for (path, expected) in writes {
        let error = fixture
            .provider
            .write_file(&fixture.id, path, None, b"x")
            .await
            .expect_err(path);
        assert_eq!(error.code(), expected, "write {path}");
    }
    assert!(!fixture.root().join("new-folder").exists());
    let long_name = "n".repeat(300);
    let deep = format!("{}f", "d/".repeat(3000));
    let anywhere = [
        (long_name.as_str(), None),
        (deep.as_str(), None),
        ("file.txt", Some("/missing")),
        ("/folder/file.txt", Some("/missing")),
        ("x", Some("/folder/file.txt")),
        ("x", Some("/folder/file.txt/below")),
        ("/folder/file.txt/", None),
        ("/folder/", None),
    ];
    for (path, working_dir) in anywhere {
        let read = fixture
            .provider
            .read_file(&fixture.id, path, working_dir, READ_LIMIT)
            .await;
        let written = fixture
            .provider
            .write_file(&fixture.id, path, working_dir, b"x")
            .await;
        let codes = (
            read.map(drop).map_err(|error| error.code()),
            written.map_err(|error| error.code()),
        );
        let expected = (Err("invalid_request"), Err("invalid_request"));
        assert_eq!(codes, expected, "{path:.40} in {working_dir:?}");
    }
    assert!(
        !fixture.root().join("missing").exists(),
        "no working_dir is created"
    );
    assert_eq!(
        fixture.read("/folder/file.txt").await.expect("unchanged"),
        b"x"
    );
}

async fn escapes_are_refused_and_change_nothing_outside(mode: LayerMode) {
    let fixture = Fixture::new(mode).await;
    let outside = tempfile::tempdir().expect("outside folder");
    fs::write(outside.path().join("secret.txt"), "secret").expect("outside file");
    symlink("../../..", fixture.root().join("up")).expect("relative link");
    symlink("/etc", fixture.root().join("etc")).expect("absolute link");
    symlink(outside.path(), fixture.root().join("outside")).expect("absolute link");
    let before = (
        describe(outside.path()),
        describe(fixture.cache.path().join("layers").as_path()),
    );
    let paths = [
        "../escape.txt",
        "/../../etc/passwd",
        "up/escape.txt",
        "up/layers/x",
        "etc/passwd",
        "etc/derrick-escape",
        "outside/secret.txt",
        "/outside/new.txt",
    ];
    for path in paths {
        assert_eq!(
            fixture.read(path).await.expect_err(path).code(),
            "path_outside_workspace",
            "read {path}"
        );
        let error = fixture
            .provider
            .write_file(&fixture.id, path, None, b"changed")
            .await
            .expect_err(path);
        assert_eq!(error.code(), "path_outside_workspace", "write {path}");
        let error = fixture
            .provider
            .write_file(&fixture.id, "file", Some(path), b"changed")
            .await
            .expect_err(path);
        assert_eq!(
            error.code(),
            "path_outside_workspace",
            "write in working_dir {path}"
        );
    }
    assert_eq!(
        (
            describe(outside.path()),
            describe(fixture.cache.path().join("layers").as_path())
        ),
        before
    );
    assert!(!Path::new("/etc/derrick-escape").exists());
    assert!(!fixture.cache.path().join("workspaces/escape.txt").exists());
}

async fn one_workspace_never_blocks_another(mode: LayerMode) {
    let fixture = Fixture::new(mode).await;
    let other = WorkspaceId::generate();
    fixture
        .provider
        .provision(&other, std::slice::from_ref(&fixture.base))
        .await
        .expect("provision");
    let slow = fixture.run("sleep 3");
    let quick = async {
        let started = Instant::now();
        let output = fixture
            .provider
            .exec(&other, request("echo quick"))
            .await
            .expect("exec");
        fixture
            .provider
            .write_file(&other, "/file", None, b"x")
            .await
            .expect("write");
        fixture
            .provider
            .read_file(&other, "/file", None, READ_LIMIT)
            .await
            .expect("read");
        (output.output, started.elapsed())
    };
    let (slow, (quick, elapsed)) = tokio::join!(slow, quick);
    assert_eq!((slow.exit_code, quick.as_str()), (0, "quick\n"));
    assert!(
        elapsed < Duration::from_secs(1),
        "the other workspace waited {elapsed:?}"
    );
    fixture.provider.destroy(&other).await.expect("destroy");
}

/// Returns the cgroup folder of the fixture's workspace, asserting that cgroups are in use.
fn workspace_cgroup(fixture: &Fixture) -> PathBuf {
    match fixture.provider.tracker.as_ref() {
        Tracker::Cgroups(tree) => tree.base().join(fixture.id.as_str()),
        Tracker::Scan => panic!("cgroup v2 works on the test machine (root, cgroup2 mounted)"),
    }
}

#[tokio::test]
async fn cgroups_catch_detached_processes() {
    let fixture = Fixture::new(LayerMode::Copy).await;
    let cgroup = workspace_cgroup(&fixture);
    let [detached, orphaned] = [unique_sleep(), unique_sleep()];
    let cmd = format!(
        "env -i setsid {} > /dev/null 2>&1 & (env -i setsid {} > /dev/null 2>&1 &); echo ok",
        detached.join(" "),
        orphaned.join(" ")
    );
    assert_eq!(fixture.run(&cmd).await.output, "ok\n");
    eventually("both sleeps started", || {
        processes_running(&detached).len() == 1 && processes_running(&orphaned).len() == 1
    })
    .await;
    let commands = fs::read_dir(&cgroup).expect("workspace cgroup");
    assert_eq!(
        commands
            .filter_map(Result::ok)
            .filter(|entry| entry.path().is_dir())
            .count(),
        1
    );

    fixture
        .provider
        .kill_processes(&fixture.id)
        .await
        .expect("kill");
    assert_eq!(processes_running(&detached), Vec::<i32>::new());
    assert_eq!(processes_running(&orphaned), Vec::<i32>::new());
    assert!(
        !cgroup.exists(),
        "the killed workspace's cgroups are removed"
    );

    assert_eq!(fixture.run("echo done").await.output, "done\n");
    let left = fs::read_dir(&cgroup).map(|entries| {
        entries
            .filter_map(Result::ok)
            .filter(|entry| entry.path().is_dir())
            .count()
    });
    assert_eq!(
        left.unwrap_or(0),
        0,
        "a finished command's empty cgroup is removed"
    );
}

async fn timeout_kills_setsid_children(fixture: Fixture) {
    let sleep = unique_sleep();
    let cmd = format!("setsid {} & sleep 100", sleep.join(" "));
    let started = Instant::now();
    let output = fixture.run_request(with_timeout(&cmd, 1)).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "replied after {:?}",
        started.elapsed()
    );
    assert_eq!((output.exit_code, output.timed_out), (124, true));
    eventually("the detached sleep is gone", || {
        processes_running(&sleep).is_empty()
    })
    .await;

    let background = unique_sleep();
    let cmd = format!("{} > /dev/null 2>&1 & echo started", background.join(" "));
    assert_eq!(fixture.run(&cmd).await.output, "started\n");
    eventually("a finished command's server runs", || {
        processes_running(&background).len() == 1
    })
    .await;
    assert_eq!(fixture.run("echo later").await.output, "later\n");
    assert_eq!(
        processes_running(&background).len(),
        1,
        "the server lives on"
    );
    fixture
        .provider
        .kill_processes(&fixture.id)
        .await
        .expect("kill");
    assert_eq!(processes_running(&background), Vec::<i32>::new());
}

#[tokio::test]
async fn timeout_kills_setsid_children_with_cgroups() {
    timeout_kills_setsid_children(Fixture::new(LayerMode::Copy).await).await;
}

#[tokio::test]
async fn timeout_kills_setsid_children_without_cgroups() {
    let fixture = Fixture::with(LayerMode::Copy, LocalProvider::without_cgroups).await;
    timeout_kills_setsid_children(fixture).await;
}

#[tokio::test]
async fn scan_fallback_finds_marked_processes() {
    let fixture = Fixture::with(LayerMode::Copy, LocalProvider::without_cgroups).await;
    let sleep = unique_sleep();
    let cmd = format!("(setsid {} > /dev/null 2>&1 &); echo ok", sleep.join(" "));
    assert_eq!(fixture.run(&cmd).await.output, "ok\n");
    eventually("the sleep started", || processes_running(&sleep).len() == 1).await;
    fixture
        .provider
        .kill_processes(&fixture.id)
        .await
        .expect("kill");
    assert_eq!(processes_running(&sleep), Vec::<i32>::new());
}

#[tokio::test]
async fn large_commands_run_like_bash_c() {
    let fixture = Fixture::new(LayerMode::Copy).await;
    let identity = "echo \"$0|$#|$*|$LINENO\"; cat; echo \"${__derrick_script-unset}\"";
    let small = fixture.run(identity).await;
    assert_eq!(
        small.output,
        format!("{}|0||1\nunset\n", exec::bash().display())
    );
    let padding = "#".repeat(1024 * 1024);
    let large = fixture.run(&format!("{identity}\n{padding}")).await;
    assert_eq!(large.output, small.output);

    let bash = exec::bash().display();
    let cases = [
        (
            "echo a\nfoo-missing\necho b\nexit 7",
            format!("a\n{bash}: line 2: foo-missing: command not found\nb\n"),
            7,
        ),
        (
            "echo a\n(( \necho c",
            format!("a\n{bash}: -c: line 2: unexpected EOF while looking for matching `)'\n"),
            2,
        ),
        ("printf 'no newline'", "no newline".to_owned(), 0),
        ("set -e; false; echo not reached", String::new(), 1),
        (
            "trap 'echo trapped' EXIT; exit 3",
            "trapped\n".to_owned(),
            3,
        ),
        (
            "echo \"$1\" \"${#}\"; shift && echo shifted",
            " 0\n".to_owned(),
            1,
        ),
        ("kill -9 $$", String::new(), 137),
    ];
    for (cmd, output, exit_code) in cases {
        let small = fixture.run(cmd).await;
        assert_eq!(
            (small.output, small.exit_code),
            (output.clone(), exit_code),
            "{cmd:?}"
        );
        // Only the prefix of a syntax error differs: `eval` runs a script over the limit.
        let large = fixture.run(&format!("{cmd} #{padding}")).await;
        let output = output.replace(": -c: ", ": eval: ");
        assert_eq!(
            (large.output, large.exit_code),
            (output, exit_code),
            "{cmd:?} over the argument limit"
        );
    }

    let limit = exec::max_argument_bytes();
    for length in [limit - 1, limit] {
        let cmd = format!(": {}; echo fits", "x".repeat(length - 13));
        assert_eq!(cmd.len(), length);
        assert_eq!(fixture.run(&cmd).await.output, "fits\n", "{length} bytes");
    }
    let errexit = ExecRequest {
        env: BTreeMap::from([("SHELLOPTS".to_owned(), "errexit".to_owned())]),
        ..request("false; echo not reached")
    };
    let actual = fixture.run_request(errexit).await;
    assert_eq!((actual.output.as_str(), actual.exit_code), ("", 1));
}

#[tokio::test]
async fn kernel_limits_are_invalid_requests() {
    let fixture = Fixture::new(LayerMode::Copy).await;
    let over_limit = "v".repeat(128 * 1024);
    let many: BTreeMap<String, String> = (0..64)
        .map(|index| (format!("PART_{index}"), "p".repeat(120 * 1024)))
        .collect();
    let cases = [
        (request("echo a\0b"), "`cmd` contains a NUL byte at byte 6"),
        (
            ExecRequest {
                env: BTreeMap::from([("BIG_VALUE".to_owned(), over_limit)]),
                ..request("true")
            },
            "`env` variable `BIG_VALUE` is 131083 bytes, over the kernel's limit of 131072",
        ),
        (
            ExecRequest {
                env: many,
                ..request("true")
            },
            "the command's environment and arguments are",
        ),
        (
            ExecRequest {
                env: BTreeMap::from([("A=B".to_owned(), "x".to_owned())]),
                ..request("true")
            },
            "invalid `env` entry `A=B`",
        ),
    ];
    for (request, message) in cases {
        let error = fixture
            .provider
            .exec(&fixture.id, request)
            .await
            .expect_err(message);
        assert_eq!(error.code(), "invalid_request", "{error}");
        assert!(error.to_string().starts_with(message), "{error}");
    }
    let fits = ExecRequest {
        env: BTreeMap::from([("FITS".to_owned(), "f".repeat(128 * 1024 - 7))]),
        ..request("echo ${#FITS}")
    };
    assert_eq!(fixture.run_request(fits).await.output, "131065\n");
}

#[tokio::test]
async fn removed_root_is_client_error_until_reset() {
    let fixture = Fixture::new(LayerMode::Copy).await;
    fixture.write("/file.txt", "x").await;
    fixture.run("cd / && rm -rf \"$HOME\"").await;
    assert!(!fixture.root().exists());
    let ran = fixture.provider.exec(&fixture.id, request("true")).await;
    let read = fixture.read("/file.txt").await;
    let written = fixture
        .provider
        .write_file(&fixture.id, "/other.txt", None, b"y")
        .await;
    let codes = (
        ran.map(drop).map_err(|error| error.code()),
        read.map(drop).map_err(|error| error.code()),
        written.map_err(|error| error.code()),
    );
    let invalid = Err("invalid_request");
    assert_eq!(codes, (invalid, invalid, invalid));

    fixture.provider.reset(&fixture.id).await.expect("reset");
    assert_eq!(fixture.run("ls -A").await.output, "");
}
