//! Real Git repositories built with the `git` CLI in temporary directories.
//!
//! Every command runs with a cleared environment, without system or global Git configuration,
//! with terminal prompts disabled, and with a fixed author, committer and date. Results then do
//! not depend on the machine's Git setup, and the same sequence of calls gives the same commit
//! ids on every run. Each repository owns its `TempDir`, so it is deleted when the value drops.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tempfile::TempDir;

/// The author and committer name of every commit made by these helpers.
pub const AUTHOR_NAME: &str = "Derrick Test";

/// The author and committer email of every commit made by these helpers.
pub const AUTHOR_EMAIL: &str = "test@derrick.invalid";

/// The author and committer date of every commit (2024-01-01T00:00:00Z, Git's raw format).
///
/// A fixed date makes commit ids reproducible, so tests and snapshots can pin them.
pub const COMMIT_DATE: &str = "1704067200 +0000";

/// The branch that `TestRepo::new` creates.
pub const DEFAULT_BRANCH: &str = "main";

/// The repository name that `TestRepo::bare_clone` uses inside its project root.
pub const DEFAULT_BARE_NAME: &str = "repo.git";

/// A non-bare Git repository with a working tree in a temporary directory.
pub struct TestRepo {
    directory: TempDir,
}

/// A bare Git repository at `<root>/<name>`, where `root` is a temporary directory that can be
/// served as a project root by `GitHttpServer`.
pub struct BareRepo {
    root: TempDir,
    name: String,
}

impl TestRepo {
    /// Creates an empty repository whose unborn branch is `main`; it has no commits yet.
    pub fn new() -> TestRepo {
        let directory = TempDir::new().expect("create a temporary directory for a test repository");
        git(
            directory.path(),
            ["init", "--quiet", "--initial-branch", DEFAULT_BRANCH],
        );
        TestRepo { directory }
    }

    /// Creates a repository with one commit holding `count` files, laid out by `numbered_file`;
    /// file `i` contains `file {i}\n`, and the working tree and index match the commit.
    ///
    /// The files are written with `std::fs`, and one `git fast-import` builds the commit in a
    /// single pack. `git add -A` writes one loose object per file instead: for 50,000 files it
    /// took over ten seconds on the development machine, where fast-import took about three.
    pub fn with_files(count: usize) -> TestRepo {
        let repository = TestRepo::new();
        let message = format!("add {count} files\n");
        let mut stream = format!(
            "commit refs/heads/{DEFAULT_BRANCH}\n\
             author {AUTHOR_NAME} <{AUTHOR_EMAIL}> {COMMIT_DATE}\n\
             committer {AUTHOR_NAME} <{AUTHOR_EMAIL}> {COMMIT_DATE}\n\
             data {}\n{message}",
            message.len()
        );
        for index in 0..count {
            let path = numbered_file(index);
            let content = format!("file {index}\n");
            repository.write(&path, &content);
            let length = content.len();
            stream.push_str(&format!("M 100644 inline {path}\ndata {length}\n{content}"));
        }

        fast_import(repository.path(), stream.as_bytes());
        git(repository.path(), ["reset", "--quiet"]);
        repository
    }

    /// Returns the working tree directory (the parent of `.git`).
    pub fn path(&self) -> &Path {
        self.directory.path()
    }

    /// Writes `content` to `relative_path` in the working tree, creating parent directories.
    pub fn write(&self, relative_path: &str, content: impl AsRef<[u8]>) {
        let path = self.path().join(relative_path);
        let parent = path
            .parent()
            .expect("a path joined onto a directory has a parent");
        fs::create_dir_all(parent).expect("create the parent directories of a test file");
        fs::write(&path, content).expect("write a test file");
    }

    /// Deletes `relative_path` from the working tree; the next `commit` records the deletion.
    pub fn remove(&self, relative_path: &str) {
        fs::remove_file(self.path().join(relative_path)).expect("remove a test file");
    }

    /// Stages every change (`git add -A`), commits it and returns the full commit id.
    ///
    /// The commit is made even when nothing changed, so tests can move a branch at will.
    pub fn commit(&self, message: &str) -> String {
        git(self.path(), ["add", "-A"]);
        git(
            self.path(),
            ["commit", "--quiet", "--allow-empty", "--message", message],
        );
        self.head()
    }

    /// Creates branch `name` at `HEAD` and switches to it (`git switch -c`).
    pub fn branch(&self, name: &str) {
        git(self.path(), ["switch", "--quiet", "--create", name]);
    }

    /// Switches the working tree to the existing branch `name`.
    pub fn checkout(&self, name: &str) {
        git(self.path(), ["switch", "--quiet", name]);
    }

    /// Creates the lightweight tag `name` at `HEAD`.
    pub fn tag(&self, name: &str) {
        git(self.path(), ["tag", name]);
    }

    /// Creates the annotated tag `name` at `HEAD`; it peels to `HEAD`'s commit.
    pub fn annotated_tag(&self, name: &str, message: &str) {
        git(
            self.path(),
            ["tag", "--annotate", "--message", message, name],
        );
    }

    /// Returns the full id of the commit at `HEAD`.
    pub fn head(&self) -> String {
        self.rev_parse("HEAD")
    }

    /// Returns the full object id that `revision` names (`git rev-parse --verify`).
    pub fn rev_parse(&self, revision: &str) -> String {
        git(self.path(), ["rev-parse", "--verify", revision])
    }

    /// Makes a bare copy named `repo.git` in a new project root, ready to serve over HTTP.
    pub fn bare_clone(&self) -> BareRepo {
        self.bare_clone_named(DEFAULT_BARE_NAME)
    }

    /// Makes a bare copy named `name` (for example `service.git`) in a new project root.
    ///
    /// The copy has every branch and tag, `HEAD` on the branch checked out here, no remote,
    /// and `http.receivepack` enabled so anonymous clients may push to it over HTTP.
    pub fn bare_clone_named(&self, name: &str) -> BareRepo {
        let root = TempDir::new().expect("create a temporary project root");
        let bare = BareRepo {
            root,
            name: name.to_owned(),
        };
        let source = self.path().as_os_str();
        git(
            self.path(),
            [
                OsStr::new("clone"),
                OsStr::new("--quiet"),
                OsStr::new("--bare"),
                source,
                bare.path().as_os_str(),
            ],
        );
        git(&bare.path(), ["remote", "remove", "origin"]);
        git(&bare.path(), ["config", "http.receivepack", "true"]);
        bare
    }

    /// Pushes every branch and tag to `bare`, replacing and pruning refs so it mirrors this one.
    pub fn push_to(&self, bare: &BareRepo) {
        let destination = bare.path();
        git(
            self.path(),
            [
                OsStr::new("push"),
                OsStr::new("--quiet"),
                OsStr::new("--force"),
                OsStr::new("--prune"),
                destination.as_os_str(),
                OsStr::new("refs/heads/*:refs/heads/*"),
                OsStr::new("refs/tags/*:refs/tags/*"),
            ],
        );
    }
}

impl Default for TestRepo {
    fn default() -> TestRepo {
        TestRepo::new()
    }
}

impl BareRepo {
    /// Returns the project root that contains this repository (`GIT_PROJECT_ROOT` for a server).
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Returns the repository's name inside its root, for `GitHttpServer::url`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Returns the repository's directory, `<root>/<name>`.
    pub fn path(&self) -> PathBuf {
        self.root().join(&self.name)
    }

    /// Returns a `file://` URL for the repository, for clones that need no server.
    pub fn file_url(&self) -> String {
        format!("file://{}", self.path().display())
    }

    /// Returns the full id of the commit that `HEAD` points to.
    pub fn head(&self) -> String {
        self.rev_parse("HEAD")
    }

    /// Returns the full object id that `revision` names (`git rev-parse --verify`).
    pub fn rev_parse(&self, revision: &str) -> String {
        git(&self.path(), ["rev-parse", "--verify", revision])
    }
}

/// Returns the relative path of file `index` in `TestRepo::with_files`.
///
/// Each directory contains 100 files and ten subdirectories make a top directory, so
/// `numbered_file(123)` is `src/dir_00/sub_1/file_00123.txt`.
pub fn numbered_file(index: usize) -> String {
    format!(
        "src/dir_{:02}/sub_{}/file_{index:05}.txt",
        index / 1000,
        index / 100 % 10
    )
}

/// Runs `git` with `arguments` in `directory` and returns its standard output without the
/// trailing newline.
///
/// # Panics
///
/// Panics with the command and Git's standard error when Git exits with a failure.
pub fn git<I, S>(directory: &Path, arguments: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let arguments: Vec<OsString> = arguments
        .into_iter()
        .map(|argument| argument.as_ref().to_owned())
        .collect();
    let output = git_command(directory)
        .args(&arguments)
        .output()
        .expect("run the git CLI (is git on PATH?)");
    assert!(
        output.status.success(),
        "git {arguments:?} failed in {}: {}",
        directory.display(),
        String::from_utf8_lossy(&output.stderr)
    );

    let stdout = String::from_utf8(output.stdout).expect("git prints UTF-8");
    stdout.trim_end_matches('\n').to_owned()
}

/// Returns a `git` command for `directory` with the hermetic environment described in the
/// module documentation; use it for commands that are expected to fail.
///
/// Only `PATH` and `HOME` are kept from the test's environment. `LC_ALL=C` keeps messages in
/// English for assertions, and an empty `GIT_ASKPASS` with `GIT_TERMINAL_PROMPT=0` makes a
/// missing or rejected credential fail at once instead of prompting.
pub fn git_command(directory: &Path) -> Command {
    let mut command = Command::new("git");
    command.current_dir(directory).env_clear();
    for inherited in ["PATH", "HOME"] {
        if let Some(value) = std::env::var_os(inherited) {
            command.env(inherited, value);
        }
    }

    command
        .env("LC_ALL", "C")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "")
        .env("GIT_AUTHOR_NAME", AUTHOR_NAME)
        .env("GIT_AUTHOR_EMAIL", AUTHOR_EMAIL)
        .env("GIT_AUTHOR_DATE", COMMIT_DATE)
        .env("GIT_COMMITTER_NAME", AUTHOR_NAME)
        .env("GIT_COMMITTER_EMAIL", AUTHOR_EMAIL)
        .env("GIT_COMMITTER_DATE", COMMIT_DATE);
    command
}

/// Feeds `stream` to `git fast-import` in the repository at `directory`.
fn fast_import(directory: &Path, stream: &[u8]) {
    let mut child = git_command(directory)
        .args(["fast-import", "--quiet"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run git fast-import (is git on PATH?)");
    let mut stdin = child.stdin.take().expect("fast-import's stdin is piped");
    stdin
        .write_all(stream)
        .expect("write the fast-import stream");
    drop(stdin);

    let output = child.wait_with_output().expect("wait for git fast-import");
    assert!(
        output.status.success(),
        "git fast-import failed in {}: {}",
        directory.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}
