//! Git mirrors on the host and checkouts out of them, through git2.
//!
//! A bare mirror per repository URL lives under `<cache>/git/<sha256 of URL>.git`. The first use
//! clones it, later uses fetch into it; checkouts into workspaces come from the mirror and never
//! touch the remote. Every git2 call runs in `spawn_blocking`.
//!
//! A new mirror is filled in a temporary sibling folder and renamed into place, so a crash never
//! leaves a half mirror that a later sync trusts. Syncs of one URL are serialized; syncs of
//! different URLs run in parallel.
//!
//! Invariant: only this module uses git2. Tokens are read from the provider process's environment
//! when a remote is contacted and reach git2 only through its credential callback; no URL, config
//! file, log line or error carries them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Once, PoisonError};

use git2::build::CheckoutBuilder;
use git2::{
    AutotagOption, Cred, CredentialType, ErrorCode, FetchOptions, FetchPrune, Oid, RemoteCallbacks,
};
use sha2::{Digest, Sha256};
use tokio::task;
use tracing::debug;

use crate::config::{GitAuthor, RepoUrl, Repository};
use crate::error::{Error, Result};

/// Maximum number of credentials the callback returns during one remote operation.
///
/// libgit2 calls the callback again each time the server rejects a credential, without a limit
/// of its own. SSH needs two (the user name, then the agent's keys). A token over HTTP needs
/// one, and a second request for it means the server rejected it, so that request fails at once.
/// Past this bound every request is rejected, so wrong credentials fail after one round trip.
pub const MAX_CREDENTIAL_ATTEMPTS: u32 = 2;

/// User name sent with a bare token over HTTP, the one GitHub documents for app installation
/// tokens. A token that needs another user name is written `user:token`.
pub const TOKEN_USERNAME: &str = "x-access-token";

/// SSH user when the URL names none, as on GitHub, GitLab and Bitbucket.
const SSH_DEFAULT_USER: &str = "git";

/// Time libgit2 waits for a TCP connection to a remote. Thirty seconds leaves room for a slow
/// proxy, and a host that has not accepted the connection by then is taken as down.
const CONNECT_TIMEOUT_MILLISECONDS: i32 = 30_000;

/// Time libgit2 waits for one read or write on a remote's socket. Servers send progress while
/// they pack, so five minutes of silence is taken as a dead peer (an estimate with a wide
/// margin). The fetch then fails instead of hanging a workspace.
const SERVER_TIMEOUT_MILLISECONDS: i32 = 300_000;

/// Refspecs of a mirror fetch: every branch and tag as is (pruned), and the remote's HEAD, so
/// that a detached HEAD and its objects reach the mirror too.
const MIRROR_REFSPECS: [&str; 3] = [
    "+refs/heads/*:refs/heads/*",
    "+refs/tags/*:refs/tags/*",
    "+HEAD:refs/derrick/remote-head",
];

/// Refspecs of a checkout's fetch from its mirror: branches as remote-tracking refs, and tags.
const CHECKOUT_REFSPECS: [&str; 2] = [
    "+refs/heads/*:refs/remotes/origin/*",
    "+refs/tags/*:refs/tags/*",
];

/// The fetch refspec of a checkout's `origin`, as `git clone` writes it.
const ORIGIN_REFSPEC: &str = "+refs/heads/*:refs/remotes/origin/*";

/// The mirror ref that keeps a detached remote HEAD.
const REMOTE_HEAD_REF: &str = "refs/derrick/remote-head";

/// The mirror refs that keep commits configured by id, so checkouts can fetch them.
const COMMIT_REF_PREFIX: &str = "refs/derrick/commits/";

/// One repository to check out of a host mirror into a workspace.
#[derive(Debug, Clone)]
pub struct Checkout {
    /// The bare mirror on the host.
    pub mirror: PathBuf,
    /// The remote URL (credential-free) that becomes the checkout's `origin`.
    pub url: RepoUrl,
    /// Absolute path inside the workspace (`/code/app`).
    pub path: String,
    /// Full commit id to check out.
    pub commit: String,
    /// Local branch to create and check out; `None` leaves a detached HEAD (tags, commit ids).
    pub branch: Option<String>,
    /// The identity written to the checkout's `user.name` and `user.email`.
    pub author: GitAuthor,
    /// The commit derrick itself last checked out here. When HEAD is still on it and no tracked
    /// file changed, an update may move HEAD to a commit that is not a fast-forward (after an
    /// upstream force-push), because no agent work sits on that commit.
    pub previous: Option<String>,
}

/// Result of bringing an existing checkout to a newer commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutUpdate {
    /// The HEAD commit before the update.
    pub before: String,
    /// The HEAD commit after the update; equal to `before` when the checkout could not move.
    pub after: String,
}

/// The state of a mirror after `Mirrors::sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorState {
    /// The bare mirror on the host.
    pub mirror: PathBuf,
    /// The commit the configured reference points to now.
    pub commit: String,
    /// The branch of the reference (the remote's default branch when none is configured);
    /// `None` for a tag, a commit id or a detached remote HEAD.
    pub branch: Option<String>,
    /// Whether this sync created the mirror (a clone) rather than fetching into it.
    pub cloned: bool,
}

/// The mirrors of one cache directory.
pub struct Mirrors {
    root: PathBuf,
    /// One lock per URL, so that syncs of one mirror never overlap.
    locks: Mutex<HashMap<RepoUrl, Arc<tokio::sync::Mutex<()>>>>,
}

/// Reason the credential callback rejected a request for credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CredentialFailure {
    /// The server requests a token and the configuration names none.
    NotConfigured,
    /// The server rejected the token of this environment variable.
    Rejected { variable: String },
    /// The server rejected the keys of the SSH agent.
    SshRejected,
    /// The server requests a kind of credential that derrick does not support.
    Unsupported,
}

impl fmt::Display for CredentialFailure {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialFailure::NotConfigured => formatter.write_str(
                "the server requires credentials; set `credentials_env` in the configuration to \
                 the name of an environment variable of derrick that contains a token",
            ),
            CredentialFailure::Rejected { variable } => write!(
                formatter,
                "authentication failed; check the token in the environment variable `{variable}` \
                 named by `credentials_env`"
            ),
            CredentialFailure::SshRejected => formatter.write_str(
                "authentication failed; the SSH agent (SSH_AUTH_SOCK) has no key that the \
                 server accepts",
            ),
            CredentialFailure::Unsupported => formatter.write_str(
                "the server requests a kind of credential that derrick does not support; use a \
                 token over HTTPS or an SSH agent",
            ),
        }
    }
}

impl Mirrors {
    /// Keeps mirrors under `root` (`<cache>/git`).
    pub fn new(root: PathBuf) -> Mirrors {
        set_network_timeouts();
        Mirrors {
            root,
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// Returns the mirror folder of `url`: `<root>/<sha256 hex of the URL>.git`.
    pub fn mirror_dir(&self, url: &RepoUrl) -> PathBuf {
        self.root.join(format!("{}.git", url_digest(url)))
    }

    /// Clones the mirror of `repository` or fetches into it, then resolves its reference.
    ///
    /// The token named by `credentials_env` is read from the environment on every call, so a
    /// rotated token works on the next sync.
    ///
    /// # Errors
    /// Returns `GitFailed` when the credentials are missing or rejected, the remote cannot be
    /// fetched, or the reference names no branch, tag or commit of the remote.
    pub async fn sync(&self, repository: &Repository) -> Result<MirrorState> {
        let guard = self.lock(&repository.url).lock_owned().await;
        let request = SyncRequest {
            root: self.root.clone(),
            mirror: self.mirror_dir(&repository.url),
            url: repository.url.clone(),
            reference: repository.reference.clone(),
            credentials: Credentials::from_env(repository)?,
        };

        // The guard moves into the blocking task: if this future is dropped, the task still runs
        // to its end, and no other sync of the URL may start before it does.
        task::spawn_blocking(move || {
            let _guard = guard;
            sync_blocking(&request)
        })
        .await?
    }

    fn lock(&self, url: &RepoUrl) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(locks.entry(url.clone()).or_default())
    }
}

/// Checks `checkout` out of its mirror into the host folder `destination`.
///
/// The checkout has its own copy of every object, its `origin` is the upstream URL, its
/// identity is `checkout.author`, and its working tree matches `checkout.commit`, on the local
/// branch `checkout.branch` (tracking `origin/<branch>`) or on a detached HEAD.
///
/// # Errors
/// Returns `GitFailed` when `destination` is not empty, the mirror lacks the commit, or a file
/// cannot be written.
pub async fn checkout(checkout: Checkout, destination: PathBuf) -> Result<()> {
    task::spawn_blocking(move || checkout_blocking(&checkout, &destination)).await?
}

/// Brings the checkout in `destination` to `checkout.commit`, fetching from the mirror.
///
/// The checkout moves only by a fast-forward of its configured branch (or of a detached HEAD),
/// and only when that keeps the local changes. Local commits that the target lacks, or changes
/// that the new files would overwrite, leave HEAD where it was (`after == before`).
///
/// # Errors
/// Returns `GitFailed` when the checkout cannot be opened or the mirror lacks the commit.
pub async fn update_checkout(checkout: Checkout, destination: PathBuf) -> Result<CheckoutUpdate> {
    task::spawn_blocking(move || update_checkout_blocking(&checkout, &destination)).await?
}

/// Returns the HEAD commit id of the checkout in `destination`.
///
/// # Errors
/// Returns `GitFailed` when `destination` contains no repository or its HEAD has no commit.
pub async fn head_commit(destination: PathBuf) -> Result<String> {
    task::spawn_blocking(move || head_commit_blocking(&destination)).await?
}

/// A token from the provider's environment; its `Debug` form never shows the value.
#[derive(Clone, PartialEq, Eq)]
struct Token(String);

impl fmt::Debug for Token {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("Token(<redacted>)")
    }
}

/// The credentials configured for one repository.
#[derive(Debug, Clone, Default)]
struct Credentials {
    /// The name of the environment variable (`credentials_env`).
    variable: Option<String>,
    /// Its value, read when the sync started.
    token: Option<Token>,
}

impl Credentials {
    /// Reads the variable named by `credentials_env`, if any.
    fn from_env(repository: &Repository) -> Result<Credentials> {
        let Some(variable) = &repository.credentials_env else {
            return Ok(Credentials::default());
        };
        match std::env::var(variable) {
            Ok(value) if !value.is_empty() => Ok(Credentials {
                variable: Some(variable.clone()),
                token: Some(Token(value)),
            }),
            _ => Err(git_failed(
                "credentials",
                &repository.url,
                format!(
                    "the environment variable `{variable}` named by `credentials_env` is unset, \
                     empty or not UTF-8; set it in the environment of the derrick process"
                ),
            )),
        }
    }

    /// Replaces the token, and its parts, wherever it appears in `text`.
    fn redact(&self, text: &str) -> String {
        let Some(Token(token)) = &self.token else {
            return text.to_owned();
        };
        let mut redacted = text.replace(token.as_str(), "<redacted>");
        if let Some((_, password)) = token.split_once(':')
            && !password.is_empty()
        {
            redacted = redacted.replace(password, "<redacted>");
        }
        redacted
    }
}

/// Response of the credential callback to one request from libgit2.
#[derive(Clone, PartialEq, Eq)]
enum CredentialResponse {
    Username(String),
    SshAgent(String),
    UserPassword { username: String, password: String },
    Reject(CredentialFailure),
}

impl fmt::Debug for CredentialResponse {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialResponse::Username(username) => write!(formatter, "Username({username:?})"),
            CredentialResponse::SshAgent(username) => write!(formatter, "SshAgent({username:?})"),
            CredentialResponse::UserPassword { username, .. } => {
                write!(
                    formatter,
                    "UserPassword {{ username: {username:?}, password: <redacted> }}"
                )
            }
            CredentialResponse::Reject(failure) => write!(formatter, "Reject({failure:?})"),
        }
    }
}

/// State of the credential callback over one remote operation.
#[derive(Debug)]
struct CredentialState<'a> {
    credentials: &'a Credentials,
    /// How many times libgit2 has called the callback.
    calls: u32,
    token_sent: bool,
    agent_used: bool,
    /// Reason of the last rejection, which explains the failed fetch.
    failure: Option<CredentialFailure>,
}

impl<'a> CredentialState<'a> {
    fn new(credentials: &'a Credentials) -> Self {
        CredentialState {
            credentials,
            calls: 0,
            token_sent: false,
            agent_used: false,
            failure: None,
        }
    }

    /// Decides the response to one request of libgit2's credential callback.
    fn respond(
        &mut self,
        allowed: CredentialType,
        username_from_url: Option<&str>,
    ) -> CredentialResponse {
        self.calls += 1;
        let username = username_from_url.unwrap_or(SSH_DEFAULT_USER).to_owned();
        let response = if self.calls > MAX_CREDENTIAL_ATTEMPTS {
            CredentialResponse::Reject(self.rejection())
        } else if allowed.contains(CredentialType::USERNAME) {
            CredentialResponse::Username(username)
        } else if allowed.contains(CredentialType::SSH_KEY) {
            self.respond_ssh(username)
        } else if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
            self.respond_token()
        } else {
            CredentialResponse::Reject(CredentialFailure::Unsupported)
        };
        if let CredentialResponse::Reject(failure) = &response {
            self.failure = Some(failure.clone());
        }
        response
    }

    fn respond_ssh(&mut self, username: String) -> CredentialResponse {
        if self.agent_used {
            return CredentialResponse::Reject(CredentialFailure::SshRejected);
        }
        self.agent_used = true;
        CredentialResponse::SshAgent(username)
    }

    fn respond_token(&mut self) -> CredentialResponse {
        let (Some(variable), Some(Token(token))) =
            (&self.credentials.variable, &self.credentials.token)
        else {
            return CredentialResponse::Reject(CredentialFailure::NotConfigured);
        };
        if self.token_sent {
            return CredentialResponse::Reject(CredentialFailure::Rejected {
                variable: variable.clone(),
            });
        }
        self.token_sent = true;
        let (username, password) = split_token(token);
        CredentialResponse::UserPassword {
            username: username.to_owned(),
            password: password.to_owned(),
        }
    }

    /// Returns the failure to report once the bound is reached, because the server rejected the
    /// last credential.
    fn rejection(&self) -> CredentialFailure {
        match (&self.credentials.variable, self.token_sent) {
            _ if self.agent_used => CredentialFailure::SshRejected,
            (Some(variable), true) => CredentialFailure::Rejected {
                variable: variable.clone(),
            },
            (None, _) => CredentialFailure::NotConfigured,
            (Some(_), false) => CredentialFailure::Unsupported,
        }
    }
}

/// Splits a token into the user name and password of HTTP basic authentication: `user:password`
/// at its first `:`, anything else as the password of `TOKEN_USERNAME`.
fn split_token(token: &str) -> (&str, &str) {
    match token.split_once(':') {
        Some((username, password)) if !username.is_empty() => (username, password),
        _ => (TOKEN_USERNAME, token),
    }
}

fn to_cred(response: CredentialResponse) -> std::result::Result<Cred, git2::Error> {
    match response {
        CredentialResponse::Username(username) => Cred::username(&username),
        CredentialResponse::SshAgent(username) => Cred::ssh_key_from_agent(&username),
        CredentialResponse::UserPassword { username, password } => {
            Cred::userpass_plaintext(&username, &password)
        }
        CredentialResponse::Reject(failure) => Err(git2::Error::from_str(&failure.to_string())),
    }
}

/// Everything a sync needs, owned, for the blocking task.
struct SyncRequest {
    root: PathBuf,
    mirror: PathBuf,
    url: RepoUrl,
    reference: Option<String>,
    credentials: Credentials,
}

/// Sets libgit2's socket timeouts once per process, so no fetch waits forever on a silent peer.
fn set_network_timeouts() {
    static TIMEOUTS: Once = Once::new();
    TIMEOUTS.call_once(|| {
        // SAFETY: libgit2 keeps these values in plain `int` globals that its socket streams read
        // when they open a connection. `Once` makes this the only write. It runs when the engine
        // creates its `Mirrors` at start-up, before any remote is contacted.
        let result = unsafe {
            git2::opts::set_server_connect_timeout_in_milliseconds(CONNECT_TIMEOUT_MILLISECONDS)
                .and_then(|()| {
                    git2::opts::set_server_timeout_in_milliseconds(SERVER_TIMEOUT_MILLISECONDS)
                })
        };
        if let Err(error) = result {
            tracing::warn!(
                error = %error.message(),
                "cannot set git network timeouts; a silent remote may hang a fetch"
            );
        }
    });
}

fn url_digest(url: &RepoUrl) -> String {
    hex::encode(Sha256::digest(url.as_str().as_bytes()))
}

fn git_failed(step: &'static str, url: &RepoUrl, reason: impl fmt::Display) -> Error {
    Error::GitFailed {
        step,
        url: url.to_string(),
        reason: reason.to_string(),
    }
}

/// Wraps a git2 error, naming the step; `Display` of git2 errors adds class and code noise.
fn git2_failed<'u>(step: &'static str, url: &'u RepoUrl) -> impl FnOnce(git2::Error) -> Error + 'u {
    move |error| git_failed(step, url, error.message())
}

fn sync_blocking(request: &SyncRequest) -> Result<MirrorState> {
    let cloned = !request.mirror.exists();
    let repository = if cloned {
        clone_mirror(request)?
    } else {
        let repository = open_mirror(request)?;
        fetch_mirror(&repository, request)?;
        repository
    };

    let (commit, branch) = resolve(&repository, request)?;
    debug!(url = %request.url, commit = %commit, cloned, "mirror synced");
    Ok(MirrorState {
        mirror: request.mirror.clone(),
        commit: commit.to_string(),
        branch,
        cloned,
    })
}

fn open_mirror(request: &SyncRequest) -> Result<git2::Repository> {
    git2::Repository::open_bare(&request.mirror).map_err(|error| {
        git_failed(
            "open",
            &request.url,
            format!(
                "cannot open the mirror `{}`: {}; remove that folder to clone the mirror again",
                request.mirror.display(),
                error.message()
            ),
        )
    })
}

/// Fills a new mirror in a temporary sibling folder, then renames it into place.
fn clone_mirror(request: &SyncRequest) -> Result<git2::Repository> {
    let io_failed = |error: std::io::Error| git_failed("clone", &request.url, error);
    std::fs::create_dir_all(&request.root).map_err(io_failed)?;
    remove_stale_temporaries(request);

    let prefix = format!("tmp-{}-", url_digest(&request.url));
    let temporary = request
        .root
        .join(format!("{prefix}{}", uuid::Uuid::new_v4().simple()));
    let filled = git2::Repository::init_bare(&temporary)
        .map_err(git2_failed("clone", &request.url))
        .and_then(|repository| fetch_mirror(&repository, request));
    let renamed =
        filled.and_then(|()| std::fs::rename(&temporary, &request.mirror).map_err(io_failed));
    if let Err(error) = renamed {
        // Best effort: a leftover temporary folder is never trusted and is removed by the next
        // clone of this URL.
        let _ = std::fs::remove_dir_all(&temporary);
        return Err(error);
    }
    open_mirror(request)
}

/// Removes the temporary folders that an interrupted clone of this URL left behind.
///
/// Only folders of this URL are touched: the per-URL lock guarantees no clone of it is running,
/// while clones of other URLs may be.
fn remove_stale_temporaries(request: &SyncRequest) {
    let prefix = format!("tmp-{}-", url_digest(&request.url));
    let Ok(entries) = std::fs::read_dir(&request.root) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Fetches every branch and tag of the remote into the mirror and records its HEAD.
fn fetch_mirror(repository: &git2::Repository, request: &SyncRequest) -> Result<()> {
    let mut remote = repository
        .remote_anonymous(request.url.as_str())
        .map_err(git2_failed("fetch", &request.url))?;
    fetch_with_credentials(&mut remote, &MIRROR_REFSPECS, request, FetchPrune::On)?;
    record_remote_head(repository, &remote).map_err(git2_failed("fetch", &request.url))
}

/// Fetches `refspecs` through the credential callback, explaining a refused credential.
fn fetch_with_credentials(
    remote: &mut git2::Remote<'_>,
    refspecs: &[&str],
    request: &SyncRequest,
    prune: FetchPrune,
) -> Result<()> {
    let state = RefCell::new(CredentialState::new(&request.credentials));
    let mut callbacks = RemoteCallbacks::new();
    callbacks.credentials(|_url, username_from_url, allowed| {
        to_cred(state.borrow_mut().respond(allowed, username_from_url))
    });
    let mut options = FetchOptions::new();
    options
        .remote_callbacks(callbacks)
        .prune(prune)
        .download_tags(AutotagOption::None)
        .update_fetchhead(false);

    let fetched = remote.fetch(refspecs, Some(&mut options), None);
    drop(options);
    fetched.map_err(|error| {
        let reason = match &state.borrow().failure {
            Some(failure) => failure.to_string(),
            None => request.credentials.redact(error.message()),
        };
        git_failed("fetch", &request.url, reason)
    })
}

/// Points the mirror's HEAD at the remote's default branch, or at its commit when the remote's
/// HEAD is detached. A remote without HEAD (empty, or HEAD on an unborn branch) leaves it as is.
///
/// The fetch stored the remote's HEAD commit in `REMOTE_HEAD_REF`; it is kept only when no
/// branch names that commit. (`Remote::list` would tell the same, but git2 0.20 builds a slice
/// from a null pointer when the remote has no refs.)
fn record_remote_head(
    repository: &git2::Repository,
    remote: &git2::Remote<'_>,
) -> std::result::Result<(), git2::Error> {
    let remote_head = repository.find_reference(REMOTE_HEAD_REF).ok();
    match remote.default_branch() {
        Ok(branch) => {
            if let Some(mut duplicate) = remote_head {
                duplicate.delete()?;
            }
            repository.set_head(branch.as_str().unwrap_or_default())
        }
        Err(error) if error.code() == ErrorCode::NotFound => {
            match remote_head.and_then(|reference| reference.target()) {
                Some(oid) => repository.set_head_detached(oid),
                None => Ok(()),
            }
        }
        Err(error) => Err(error),
    }
}

/// Resolves the configured reference in the mirror: branch, then tag, then full commit id.
fn resolve(repository: &git2::Repository, request: &SyncRequest) -> Result<(Oid, Option<String>)> {
    let Some(reference) = request.reference.as_deref() else {
        return resolve_default(repository, request);
    };
    let peel = |name: &str| {
        repository
            .find_reference(name)
            .and_then(|found| found.peel_to_commit())
            .ok()
    };

    if let Some(commit) = peel(&format!("refs/heads/{reference}")) {
        return Ok((commit.id(), Some(reference.to_owned())));
    }
    if let Some(commit) = peel(&format!("refs/tags/{reference}")) {
        return Ok((commit.id(), None));
    }
    if is_full_commit_id(reference) {
        return resolve_commit_id(repository, request, reference).map(|oid| (oid, None));
    }
    Err(git_failed(
        "resolve",
        &request.url,
        format!(
            "reference `{reference}` is no branch, tag or full 40-character commit id of the \
             remote; fix `reference` in the configuration"
        ),
    ))
}

fn resolve_default(
    repository: &git2::Repository,
    request: &SyncRequest,
) -> Result<(Oid, Option<String>)> {
    let no_default = || {
        git_failed(
            "resolve",
            &request.url,
            "the remote has no default branch (it is empty or its HEAD is unborn); set \
             `reference` in the configuration",
        )
    };
    let head = repository
        .find_reference("HEAD")
        .map_err(|_| no_default())?;
    let branch = head
        .symbolic_target()
        .and_then(|target| target.strip_prefix("refs/heads/"))
        .map(str::to_owned);
    let commit = head.peel_to_commit().map_err(|_| no_default())?;
    Ok((commit.id(), branch))
}

fn is_full_commit_id(reference: &str) -> bool {
    reference.len() == 40 && reference.bytes().all(|byte| byte.is_ascii_hexdigit())
}

/// Finds a commit by id in the mirror, fetching it by id when no ref of the remote reaches it,
/// and keeps it under `refs/derrick/commits/` so that checkouts can fetch it from the mirror.
fn resolve_commit_id(
    repository: &git2::Repository,
    request: &SyncRequest,
    reference: &str,
) -> Result<Oid> {
    let oid = Oid::from_str(reference).map_err(git2_failed("resolve", &request.url))?;
    let keep = format!("{COMMIT_REF_PREFIX}{oid}");
    if repository.find_commit(oid).is_err() {
        // Servers may reject a fetch by object id. The reason (a rejected token, say) goes into
        // the message, because a missing commit is the error either way.
        let refspec = format!("+{oid}:{keep}");
        let detail = match fetch_refspec(repository, request, &refspec) {
            Err(Error::GitFailed { reason, .. }) => format!(" ({reason})"),
            _ => String::new(),
        };
        if repository.find_commit(oid).is_err() {
            let reason = format!(
                "commit `{oid}` is not in the remote{detail}; fix `reference` in the configuration"
            );
            return Err(git_failed("resolve", &request.url, reason));
        }
    }
    repository
        .reference(&keep, oid, true, "derrick: configured commit")
        .map_err(git2_failed("resolve", &request.url))?;
    Ok(oid)
}

fn fetch_refspec(
    repository: &git2::Repository,
    request: &SyncRequest,
    refspec: &str,
) -> Result<()> {
    let mut remote = repository
        .remote_anonymous(request.url.as_str())
        .map_err(git2_failed("fetch", &request.url))?;
    fetch_with_credentials(&mut remote, &[refspec], request, FetchPrune::Off)
}

fn checkout_blocking(checkout: &Checkout, destination: &Path) -> Result<()> {
    prepare_destination(checkout, destination)?;
    let repository =
        init_checkout(checkout, destination).map_err(git2_failed("checkout", &checkout.url))?;
    fetch_from_mirror(&repository, checkout)?;

    let commit = find_commit(&repository, checkout)?;
    point_head(&repository, checkout, commit)
        .and_then(|()| repository.checkout_head(Some(CheckoutBuilder::new().force())))
        .map_err(git2_failed("checkout", &checkout.url))?;
    debug!(url = %checkout.url, commit = %commit, "checked out");
    Ok(())
}

/// Creates the checkout's repository with `origin` at the upstream URL and the author's identity
/// in its own configuration.
fn init_checkout(
    checkout: &Checkout,
    destination: &Path,
) -> std::result::Result<git2::Repository, git2::Error> {
    let repository = git2::Repository::init(destination)?;
    repository.remote_with_fetch("origin", checkout.url.as_str(), ORIGIN_REFSPEC)?;
    let mut config = repository.config()?.open_level(git2::ConfigLevel::Local)?;
    config.set_str("user.name", &checkout.author.name)?;
    config.set_str("user.email", &checkout.author.email)?;
    drop(config);
    Ok(repository)
}

/// Creates `destination` and its parents; refuses a folder that already has entries.
fn prepare_destination(checkout: &Checkout, destination: &Path) -> Result<()> {
    let io_failed = |error: std::io::Error| {
        git_failed(
            "checkout",
            &checkout.url,
            format!("cannot create `{}`: {error}", destination.display()),
        )
    };
    std::fs::create_dir_all(destination).map_err(io_failed)?;
    let mut entries = std::fs::read_dir(destination).map_err(io_failed)?;
    if entries.next().is_some() {
        return Err(git_failed(
            "checkout",
            &checkout.url,
            format!(
                "`{}` is not empty; a checkout needs an empty or missing folder",
                destination.display()
            ),
        ));
    }
    Ok(())
}

/// Fetches the mirror's branches and tags into a checkout, and the commit itself when no branch
/// or tag reaches it. The mirror is a local path, so objects are copied, never linked.
fn fetch_from_mirror(repository: &git2::Repository, checkout: &Checkout) -> Result<()> {
    let failed = git2_failed("fetch", &checkout.url);
    let mirror = checkout.mirror.to_str().ok_or_else(|| {
        git_failed(
            "fetch",
            &checkout.url,
            format!("mirror path `{}` is not UTF-8", checkout.mirror.display()),
        )
    })?;
    let mut remote = repository
        .remote_anonymous(mirror)
        .map_err(git2_failed("fetch", &checkout.url))?;
    let mut options = FetchOptions::new();
    options
        .download_tags(AutotagOption::None)
        .update_fetchhead(false);
    remote
        .fetch(&CHECKOUT_REFSPECS, Some(&mut options), None)
        .map_err(git2_failed("fetch", &checkout.url))?;
    record_origin_head(repository, &remote).map_err(git2_failed("fetch", &checkout.url))?;

    let Ok(oid) = Oid::from_str(&checkout.commit) else {
        return Ok(());
    };
    if repository.find_commit(oid).is_ok() {
        return Ok(());
    }
    // Refspecs without a destination bring the objects and create no ref in the checkout.
    let detached_refs = [
        format!("{COMMIT_REF_PREFIX}{oid}"),
        REMOTE_HEAD_REF.to_owned(),
    ];
    let mut options = FetchOptions::new();
    options
        .download_tags(AutotagOption::None)
        .update_fetchhead(false);
    remote
        .fetch(&detached_refs, Some(&mut options), None)
        .map_err(failed)
}

/// Points `refs/remotes/origin/HEAD` at the mirror's default branch, as `git clone` does.
fn record_origin_head(
    repository: &git2::Repository,
    remote: &git2::Remote<'_>,
) -> std::result::Result<(), git2::Error> {
    let Ok(branch) = remote.default_branch() else {
        return Ok(());
    };
    let Some(name) = branch
        .as_str()
        .and_then(|name| name.strip_prefix("refs/heads/"))
    else {
        return Ok(());
    };
    let target = format!("refs/remotes/origin/{name}");
    if repository.find_reference(&target).is_err() {
        return Ok(());
    }
    repository.reference_symbolic(
        "refs/remotes/origin/HEAD",
        &target,
        true,
        "derrick: origin HEAD",
    )?;
    Ok(())
}

fn find_commit(repository: &git2::Repository, checkout: &Checkout) -> Result<Oid> {
    let missing = || {
        git_failed(
            "checkout",
            &checkout.url,
            format!(
                "commit `{}` is not in the mirror `{}`",
                checkout.commit,
                checkout.mirror.display()
            ),
        )
    };
    let oid = Oid::from_str(&checkout.commit).map_err(|_| missing())?;
    repository
        .find_commit(oid)
        .map(|commit| commit.id())
        .map_err(|_| missing())
}

/// Creates the local branch at `commit` tracking `origin/<branch>` and attaches HEAD to it, or
/// detaches HEAD at `commit` when no branch is configured.
fn point_head(
    repository: &git2::Repository,
    checkout: &Checkout,
    commit: Oid,
) -> std::result::Result<(), git2::Error> {
    let Some(name) = &checkout.branch else {
        return repository.set_head_detached(commit);
    };
    let mut branch = repository.branch(name, &repository.find_commit(commit)?, true)?;
    let upstream = format!("origin/{name}");
    if repository
        .find_branch(&upstream, git2::BranchType::Remote)
        .is_ok()
    {
        branch.set_upstream(Some(&upstream))?;
    }
    repository.set_head(&format!("refs/heads/{name}"))
}

fn update_checkout_blocking(checkout: &Checkout, destination: &Path) -> Result<CheckoutUpdate> {
    let repository = open_checkout(checkout, destination)?;
    let before = head_oid(&repository).map_err(git2_failed("update", &checkout.url))?;
    fetch_from_mirror(&repository, checkout)?;
    let target = find_commit(&repository, checkout)?;

    let moved = fast_forward(&repository, checkout, before, target)
        .map_err(git2_failed("update", &checkout.url))?;
    let after = if moved { target } else { before };
    debug!(url = %checkout.url, before = %before, after = %after, "checkout updated");
    Ok(CheckoutUpdate {
        before: before.to_string(),
        after: after.to_string(),
    })
}

/// Moves HEAD from `before` to `target` by a fast-forward of the configured branch or of a
/// detached HEAD, unless a local change would be lost. Returns whether HEAD moved.
fn fast_forward(
    repository: &git2::Repository,
    checkout: &Checkout,
    before: Oid,
    target: Oid,
) -> std::result::Result<bool, git2::Error> {
    let head = repository.head()?;
    let on_configured_branch = checkout
        .branch
        .as_ref()
        .is_some_and(|branch| head.name() == Some(format!("refs/heads/{branch}").as_str()));
    let detached = repository.head_detached()?;
    let is_fast_forward = before != target && repository.graph_descendant_of(target, before)?;
    let untouched = before != target
        && checkout.previous.as_deref() == Some(before.to_string().as_str())
        && tracked_files_unchanged(repository)?;
    if !(on_configured_branch || detached) || !(is_fast_forward || untouched) {
        return Ok(false);
    }

    // A safe checkout fails before it writes anything when a local change would be lost. The ref
    // moves only after the files did, so a failure leaves the checkout as it was.
    let tree = repository.find_commit(target)?.into_object();
    match repository.checkout_tree(&tree, Some(CheckoutBuilder::new().safe())) {
        Ok(()) => {}
        Err(error) if error.code() == ErrorCode::Conflict => return Ok(false),
        Err(error) => return Err(error),
    }
    if detached {
        repository.set_head_detached(target)?;
    } else {
        let mut reference = repository.head()?;
        reference.set_target(target, "derrick: fast-forward from the mirror")?;
    }
    Ok(true)
}

/// Tells whether the index and the tracked files of the working tree match HEAD.
fn tracked_files_unchanged(
    repository: &git2::Repository,
) -> std::result::Result<bool, git2::Error> {
    let mut options = git2::StatusOptions::new();
    options.include_untracked(false).include_ignored(false);
    Ok(repository.statuses(Some(&mut options))?.is_empty())
}

/// Opens the checkout at `destination` (a host path) for an update, rejecting one that a command
/// in the workspace redirected. derrick runs this on the host, often as root, so the checkout must
/// be the plain folder with its own `.git` folder that derrick made, and its Git configuration must
/// point nowhere else (no `core.worktree`, gitfile, `commondir` or alternates).
///
/// # Errors
/// `invalid_request` naming the checkout's workspace path, never the host path.
fn open_checkout(checkout: &Checkout, destination: &Path) -> Result<git2::Repository> {
    let rejected = |reason: &str| {
        Error::invalid_request(format!(
            "the checkout at `{}` {reason}, so derrick will not update it; restore it (a reset \
             does) or leave it as derrick checked it out",
            checkout.path
        ))
    };
    let is_plain_folder = |path: &Path| {
        std::fs::symlink_metadata(path).is_ok_and(|metadata| metadata.file_type().is_dir())
    };

    let git_dir = destination.join(".git");
    if !is_plain_folder(destination) {
        return Err(rejected(
            "is not a folder (a command replaced it, with a link for example)",
        ));
    }
    if !is_plain_folder(&git_dir) {
        return Err(rejected("has no `.git` folder of its own"));
    }
    for redirect in ["commondir", "objects/info/alternates"] {
        if std::fs::symlink_metadata(git_dir.join(redirect)).is_ok() {
            return Err(rejected(&format!(
                "has `.git/{redirect}`, which points to other repositories"
            )));
        }
    }

    let repository = git2::Repository::open_ext(
        destination,
        git2::RepositoryOpenFlags::NO_SEARCH,
        std::iter::empty::<&std::ffi::OsStr>(),
    )
    .map_err(|_| rejected("is not a Git repository any more"))?;
    let canonical = |path: &Path| std::fs::canonicalize(path).ok();
    let work_tree = repository.workdir().and_then(canonical);
    if work_tree.is_none() || work_tree != canonical(destination) {
        return Err(rejected("sets `core.worktree` to another folder"));
    }
    if canonical(repository.path()) != canonical(&git_dir) {
        return Err(rejected("uses a Git folder elsewhere"));
    }
    Ok(repository)
}

fn head_oid(repository: &git2::Repository) -> std::result::Result<Oid, git2::Error> {
    Ok(repository.head()?.peel_to_commit()?.id())
}

fn head_commit_blocking(destination: &Path) -> Result<String> {
    let url = RepoUrl::from_trusted(destination.to_string_lossy());
    let repository = git2::Repository::open(destination).map_err(git2_failed("head", &url))?;
    let oid = head_oid(&repository).map_err(git2_failed("head", &url))?;
    Ok(oid.to_string())
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use tempfile::TempDir;

    use super::*;

    const TOKEN: &str = "s3cr3t-t0ken-value";

    /// Runs the `git` CLI in `dir` as the upstream's author; returns its stdout.
    fn git(dir: &Path, args: &[&str]) -> String {
        let identity = [
            "-c",
            "init.defaultBranch=main",
            "-c",
            "user.name=Upstream",
            "-c",
            "user.email=up@example.com",
        ];
        run(git_command(dir).args(identity).args(args))
    }

    /// Runs the `git` CLI in `dir` with only the repository's own configuration.
    fn git_in_checkout(dir: &Path, args: &[&str]) -> String {
        run(git_command(dir).args(args))
    }

    /// Builds a `git` command that ignores the host's system and global configuration.
    fn git_command(dir: &Path) -> Command {
        let mut command = Command::new("git");
        command
            .current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null");
        command
    }

    fn run(command: &mut Command) -> String {
        let output = command.output().expect("run git");
        assert!(
            output.status.success(),
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout)
            .expect("utf-8 output")
            .trim_end()
            .to_owned()
    }

    /// Writes `file` and commits it; returns the new commit id.
    fn commit(dir: &Path, file: &str, content: &str) -> String {
        std::fs::write(dir.join(file), content).expect("write file");
        git(dir, &["add", file]);
        git(dir, &["commit", "-q", "-m", &format!("write {file}")]);
        git(dir, &["rev-parse", "HEAD"])
    }

    /// A temporary upstream repository and a cache root for mirrors.
    struct Fixture {
        _directory: TempDir,
        upstream: PathBuf,
        root: PathBuf,
        workspaces: PathBuf,
    }

    impl Fixture {
        /// Creates an upstream with `main` (two commits), `feature` (one more), and the
        /// annotated tag `v1` on the first commit of `main`.
        fn new() -> Fixture {
            let directory = tempfile::tempdir().expect("temporary directory");
            let upstream = directory.path().join("upstream");
            std::fs::create_dir(&upstream).expect("create upstream");
            git(&upstream, &["init", "-q"]);
            commit(&upstream, "a.txt", "one\n");
            git(&upstream, &["tag", "-a", "v1", "-m", "version 1"]);
            commit(&upstream, "b.txt", "two\n");
            git(&upstream, &["checkout", "-q", "-b", "feature"]);
            commit(&upstream, "c.txt", "three\n");
            git(&upstream, &["checkout", "-q", "main"]);
            let root = directory.path().join("cache/git");
            let workspaces = directory.path().join("workspaces");
            Fixture {
                upstream,
                root,
                workspaces,
                _directory: directory,
            }
        }

        fn url(&self) -> RepoUrl {
            RepoUrl::from_trusted(self.upstream.to_str().expect("utf-8 path"))
        }

        fn repository(&self, reference: Option<&str>) -> Repository {
            Repository {
                url: self.url(),
                path: "/code/app".to_owned(),
                reference: reference.map(str::to_owned),
                credentials_env: None,
            }
        }

        fn rev(&self, revision: &str) -> String {
            git(
                &self.upstream,
                &["rev-parse", &format!("{revision}^{{commit}}")],
            )
        }

        fn checkout(&self, state: &MirrorState) -> Checkout {
            Checkout {
                mirror: state.mirror.clone(),
                url: self.url(),
                path: "/code/app".to_owned(),
                commit: state.commit.clone(),
                branch: state.branch.clone(),
                author: GitAuthor {
                    name: "Agent Smith".to_owned(),
                    email: "smith@example.com".to_owned(),
                },
                previous: None,
            }
        }
    }

    async fn sync(fixture: &Fixture, reference: Option<&str>) -> Result<MirrorState> {
        Mirrors::new(fixture.root.clone())
            .sync(&fixture.repository(reference))
            .await
    }

    /// Syncs `reference` and asserts the commit (an upstream revision) and branch it resolves to.
    async fn check_resolution(
        fixture: &Fixture,
        reference: Option<&str>,
        revision: &str,
        branch: Option<&str>,
    ) {
        let state = sync(fixture, reference).await.expect("sync");
        assert_eq!(
            state.commit,
            fixture.rev(revision),
            "commit of {reference:?}"
        );
        assert_eq!(state.branch.as_deref(), branch, "branch of {reference:?}");
    }

    fn git_failure(result: Result<impl fmt::Debug>) -> (&'static str, String, String) {
        match result {
            Err(Error::GitFailed { step, url, reason }) => (step, url, reason),
            other => panic!("expected GitFailed, got {other:?}"),
        }
    }

    fn files_under(directory: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        let mut pending = vec![directory.to_path_buf()];
        while let Some(folder) = pending.pop() {
            for entry in std::fs::read_dir(&folder).expect("read folder").flatten() {
                let path = entry.path();
                if entry.file_type().expect("file type").is_dir() {
                    pending.push(path)
                } else {
                    files.push(path)
                }
            }
        }
        files
    }

    #[tokio::test]
    async fn first_sync_clones_and_later_syncs_fetch() {
        let fixture = Fixture::new();
        let mirrors = Mirrors::new(fixture.root.clone());
        let first = mirrors
            .sync(&fixture.repository(None))
            .await
            .expect("first sync");
        let mirror = fixture
            .root
            .join(format!("{}.git", url_digest(&fixture.url())));
        assert_eq!(
            first,
            MirrorState {
                mirror: mirror.clone(),
                commit: fixture.rev("main"),
                branch: Some("main".to_owned()),
                cloned: true
            }
        );
        assert_eq!(mirrors.mirror_dir(&fixture.url()), mirror);
        assert_eq!(git(&mirror, &["rev-parse", "--is-bare-repository"]), "true");
        assert_eq!(
            git(
                &mirror,
                &[
                    "for-each-ref",
                    "--format=%(refname)",
                    "refs/heads",
                    "refs/tags"
                ]
            ),
            "refs/heads/feature\nrefs/heads/main\nrefs/tags/v1"
        );

        let new_commit = commit(&fixture.upstream, "d.txt", "four\n");
        git(&fixture.upstream, &["branch", "-D", "feature"]);
        let second = mirrors
            .sync(&fixture.repository(None))
            .await
            .expect("second sync");
        assert_eq!(
            second,
            MirrorState {
                mirror: mirror.clone(),
                commit: new_commit,
                branch: Some("main".to_owned()),
                cloned: false
            }
        );
        assert_eq!(
            git(
                &mirror,
                &["for-each-ref", "--format=%(refname)", "refs/heads"]
            ),
            "refs/heads/main",
            "deleted branches are pruned"
        );
        let entries: Vec<_> = std::fs::read_dir(&fixture.root)
            .expect("read root")
            .flatten()
            .map(|entry| entry.file_name())
            .collect();
        assert_eq!(
            entries,
            vec![mirror.file_name().expect("mirror name").to_owned()],
            "no temporary folder is left"
        );
    }

    #[tokio::test]
    async fn leftover_temporary_clone_is_removed() {
        let fixture = Fixture::new();
        let leftover = fixture
            .root
            .join(format!("tmp-{}-interrupted", url_digest(&fixture.url())));
        std::fs::create_dir_all(leftover.join("objects")).expect("create leftover");
        let state = sync(&fixture, None).await.expect("sync");
        assert!(state.cloned);
        assert!(!leftover.exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_syncs_of_one_url_clone_once() {
        let fixture = Fixture::new();
        let mirrors = Mirrors::new(fixture.root.clone());
        let repository = fixture.repository(None);
        let (first, second) = tokio::join!(mirrors.sync(&repository), mirrors.sync(&repository));
        let mut cloned = [
            first.expect("first sync").cloned,
            second.expect("second sync").cloned,
        ];
        cloned.sort();
        assert_eq!(cloned, [false, true]);
    }

    #[tokio::test]
    async fn references_resolve_in_priority_order() {
        let fixture = Fixture::new();
        git(&fixture.upstream, &["tag", "feature", "main~1"]);
        git(&fixture.upstream, &["branch", "v2", "main~1"]);
        git(&fixture.upstream, &["tag", "v2", "feature"]);
        let first = fixture.rev("main~1");

        check_resolution(&fixture, None, "main", Some("main")).await;
        check_resolution(&fixture, Some("main"), "main", Some("main")).await;
        check_resolution(
            &fixture,
            Some("feature"),
            "refs/heads/feature",
            Some("feature"),
        )
        .await;
        check_resolution(&fixture, Some("v1"), "v1", None).await;
        check_resolution(&fixture, Some("v2"), "refs/heads/v2", Some("v2")).await;
        check_resolution(&fixture, Some(&first), &first, None).await;
    }

    #[tokio::test]
    async fn default_branch_follows_the_remote_head() {
        let fixture = Fixture::new();
        git(&fixture.upstream, &["checkout", "-q", "feature"]);
        check_resolution(&fixture, None, "feature", Some("feature")).await;
    }

    #[tokio::test]
    async fn detached_remote_head_stays_detached() {
        let fixture = Fixture::new();
        git(&fixture.upstream, &["checkout", "-q", "--detach"]);
        let detached = commit(&fixture.upstream, "e.txt", "five\n");
        let state = sync(&fixture, None).await.expect("sync");
        assert_eq!(
            (state.commit.as_str(), state.branch.as_deref()),
            (detached.as_str(), None)
        );

        let destination = fixture.workspaces.join("detached");
        checkout(fixture.checkout(&state), destination.clone())
            .await
            .expect("checkout");
        assert_eq!(git(&destination, &["rev-parse", "HEAD"]), detached);
        assert_eq!(
            git(&destination, &["rev-parse", "--abbrev-ref", "HEAD"]),
            "HEAD"
        );
        assert_eq!(git(&destination, &["status", "--porcelain"]), "");
        assert_eq!(
            git(
                &destination,
                &["for-each-ref", "--format=%(refname)", "refs/derrick"]
            ),
            ""
        );
    }

    #[tokio::test]
    async fn unreferenced_commit_id_checks_out() {
        let fixture = Fixture::new();
        git(&fixture.upstream, &["checkout", "-q", "-b", "gone"]);
        let orphaned = commit(&fixture.upstream, "f.txt", "six\n");
        git(&fixture.upstream, &["checkout", "-q", "main"]);
        let state = sync(&fixture, Some(&orphaned))
            .await
            .expect("sync while the branch exists");
        assert_eq!(state.branch, None);

        git(&fixture.upstream, &["branch", "-q", "-D", "gone"]);
        let state = sync(&fixture, Some(&orphaned))
            .await
            .expect("sync after the branch is gone");
        assert_eq!(
            (state.commit.as_str(), state.cloned),
            (orphaned.as_str(), false)
        );
        let destination = fixture.workspaces.join("orphaned");
        checkout(fixture.checkout(&state), destination.clone())
            .await
            .expect("checkout");
        assert_eq!(git(&destination, &["rev-parse", "HEAD"]), orphaned);
        assert_eq!(
            std::fs::read_to_string(destination.join("f.txt")).expect("read f.txt"),
            "six\n"
        );
    }

    #[tokio::test]
    async fn unknown_references_fail() {
        let fixture = Fixture::new();
        let (step, url, reason) = git_failure(sync(&fixture, Some("no-such-branch")).await);
        assert_eq!((step, url.as_str()), ("resolve", fixture.url().as_str()));
        assert!(
            reason.contains("`no-such-branch` is no branch, tag or full 40-character commit id"),
            "{reason}"
        );

        let short = &fixture.rev("main")[..12];
        let (step, _, reason) = git_failure(sync(&fixture, Some(short)).await);
        assert_eq!(step, "resolve");
        assert!(reason.contains(short), "{reason}");

        let absent = "0123456789abcdef0123456789abcdef01234567";
        let (step, _, reason) = git_failure(sync(&fixture, Some(absent)).await);
        assert_eq!(step, "resolve");
        assert!(
            reason.starts_with(&format!("commit `{absent}` is not in the remote")),
            "{reason}"
        );
    }

    #[tokio::test]
    async fn empty_remote_has_no_default_branch() {
        let fixture = Fixture::new();
        let empty = fixture.upstream.with_file_name("empty");
        std::fs::create_dir(&empty).expect("create empty");
        git(&empty, &["init", "-q"]);
        let repository = Repository {
            url: RepoUrl::from_trusted(empty.to_str().expect("utf-8 path")),
            ..fixture.repository(None)
        };
        let result = Mirrors::new(fixture.root.clone()).sync(&repository).await;
        let (step, _, reason) = git_failure(result);
        assert_eq!(step, "resolve");
        assert!(
            reason.starts_with("the remote has no default branch"),
            "{reason}"
        );
    }

    #[tokio::test]
    async fn unset_credentials_variable_fails() {
        let fixture = Fixture::new();
        let mut repository = fixture.repository(None);
        repository.credentials_env = Some("DERRICK_TEST_TOKEN_THAT_IS_NEVER_SET".to_owned());
        let result = Mirrors::new(fixture.root.clone()).sync(&repository).await;
        let (step, _, reason) = git_failure(result);
        assert_eq!(step, "credentials");
        let expected = "the environment variable `DERRICK_TEST_TOKEN_THAT_IS_NEVER_SET` named by \
                        `credentials_env` is unset";
        assert!(reason.starts_with(expected), "{reason}");
        assert!(
            !fixture.root.exists()
                || std::fs::read_dir(&fixture.root)
                    .expect("read root")
                    .next()
                    .is_none()
        );
    }

    #[tokio::test]
    async fn checkout_is_clean_and_token_free() {
        let fixture = Fixture::new();
        let credentials = Credentials {
            variable: Some("APP_TOKEN".to_owned()),
            token: Some(Token(TOKEN.to_owned())),
        };
        let request = SyncRequest {
            root: fixture.root.clone(),
            mirror: Mirrors::new(fixture.root.clone()).mirror_dir(&fixture.url()),
            url: fixture.url(),
            reference: None,
            credentials,
        };
        let state = task::spawn_blocking(move || sync_blocking(&request))
            .await
            .expect("join")
            .expect("sync");
        let destination = fixture.workspaces.join("code/app");
        checkout(fixture.checkout(&state), destination.clone())
            .await
            .expect("checkout");

        assert_eq!(
            git(
                &destination,
                &["status", "--porcelain", "--untracked-files=all"]
            ),
            ""
        );
        assert_eq!(
            git(&destination, &["rev-parse", "HEAD"]),
            fixture.rev("main")
        );
        assert_eq!(
            head_commit(destination.clone()).await.expect("head commit"),
            fixture.rev("main")
        );
        assert_eq!(
            git(&destination, &["symbolic-ref", "HEAD"]),
            "refs/heads/main"
        );
        assert_eq!(
            git(
                &destination,
                &["rev-parse", "--abbrev-ref", "main@{upstream}"]
            ),
            "origin/main"
        );
        assert_eq!(
            git(&destination, &["symbolic-ref", "refs/remotes/origin/HEAD"]),
            "refs/remotes/origin/main"
        );
        assert_eq!(
            git(&destination, &["remote", "get-url", "origin"]),
            fixture.url().as_str()
        );
        assert_eq!(
            git_in_checkout(&destination, &["config", "user.name"]),
            "Agent Smith"
        );
        assert_eq!(
            git_in_checkout(&destination, &["config", "user.email"]),
            "smith@example.com"
        );
        assert_eq!(git(&destination, &["tag"]), "v1");
        assert_eq!(
            git(&destination, &["branch", "-r"]),
            "  origin/HEAD -> origin/main\n  origin/feature\n  origin/main"
        );
        assert!(!destination.join(".git/objects/info/alternates").exists());

        for file in files_under(&destination)
            .into_iter()
            .chain(files_under(&state.mirror))
        {
            let bytes = std::fs::read(&file).expect("read file");
            assert!(
                !bytes
                    .windows(TOKEN.len())
                    .any(|window| window == TOKEN.as_bytes()),
                "token in {}",
                file.display()
            );
        }
        std::fs::write(destination.join("agent.txt"), "work\n").expect("write");
        git_in_checkout(&destination, &["add", "agent.txt"]);
        git_in_checkout(&destination, &["commit", "-q", "-m", "agent work"]);
        assert_eq!(
            git(&destination, &["log", "-1", "--format=%an <%ae>"]),
            "Agent Smith <smith@example.com>"
        );
    }

    #[tokio::test]
    async fn tag_checkout_is_detached() {
        let fixture = Fixture::new();
        let state = sync(&fixture, Some("v1")).await.expect("sync");
        let destination = fixture.workspaces.join("tagged");
        checkout(fixture.checkout(&state), destination.clone())
            .await
            .expect("checkout");

        assert_eq!(git(&destination, &["rev-parse", "HEAD"]), fixture.rev("v1"));
        assert_eq!(
            git(&destination, &["rev-parse", "--abbrev-ref", "HEAD"]),
            "HEAD"
        );
        assert_eq!(
            git(
                &destination,
                &["status", "--porcelain", "--untracked-files=all"]
            ),
            ""
        );
    }

    #[tokio::test]
    async fn checkout_rejects_non_empty_folder() {
        let fixture = Fixture::new();
        let state = sync(&fixture, None).await.expect("sync");
        let destination = fixture.workspaces.join("occupied");
        std::fs::create_dir_all(&destination).expect("create folder");
        std::fs::write(
            destination.join("keep.txt"),
            "mine
",
        )
        .expect("write");

        let (step, _, reason) =
            git_failure(checkout(fixture.checkout(&state), destination.clone()).await);
        assert_eq!(step, "checkout");
        assert!(
            reason.ends_with("is not empty; a checkout needs an empty or missing folder"),
            "{reason}"
        );
        assert_eq!(
            std::fs::read_to_string(destination.join("keep.txt")).expect("read"),
            "mine\n"
        );
    }

    /// Checks `main` out, lets `change` edit the checkout, commits `b.txt` upstream, syncs and
    /// updates. Returns the commit checked out first, the new upstream commit, the update and
    /// the checkout folder.
    async fn update_after(
        fixture: &Fixture,
        change: impl FnOnce(&Path),
    ) -> (String, String, CheckoutUpdate, PathBuf) {
        let first = sync(fixture, Some("main")).await.expect("first sync");
        let destination = fixture.workspaces.join("app");
        checkout(fixture.checkout(&first), destination.clone())
            .await
            .expect("checkout");
        change(&destination);

        let upstream = commit(&fixture.upstream, "b.txt", "two, updated\n");
        let second = sync(fixture, Some("main")).await.expect("second sync");
        let update = update_checkout(fixture.checkout(&second), destination.clone())
            .await
            .expect("update");
        (first.commit, upstream, update, destination)
    }

    #[tokio::test]
    async fn update_fast_forwards_keeping_changes() {
        let fixture = Fixture::new();
        let (first, upstream, update, destination) = update_after(&fixture, |destination| {
            std::fs::write(destination.join("a.txt"), "local edit\n").expect("edit");
            std::fs::write(destination.join("notes.txt"), "untracked\n").expect("write");
        })
        .await;

        assert_eq!(
            update,
            CheckoutUpdate {
                before: first,
                after: upstream.clone()
            }
        );
        assert_eq!(
            git(&destination, &["rev-parse", "main", "origin/main"]),
            format!("{upstream}\n{upstream}")
        );
        assert_eq!(
            git(&destination, &["symbolic-ref", "HEAD"]),
            "refs/heads/main"
        );
        assert_eq!(
            git(&destination, &["status", "--porcelain"]),
            " M a.txt\n?? notes.txt"
        );
        assert_eq!(
            std::fs::read_to_string(destination.join("b.txt")).expect("read"),
            "two, updated\n"
        );

        let state = sync(&fixture, Some("main")).await.expect("third sync");
        let again = update_checkout(fixture.checkout(&state), destination)
            .await
            .expect("update again");
        assert_eq!(
            again,
            CheckoutUpdate {
                before: upstream.clone(),
                after: upstream
            }
        );
    }

    #[tokio::test]
    async fn update_keeps_diverged_branch() {
        let fixture = Fixture::new();
        let local = std::sync::OnceLock::new();
        let (_, upstream, update, destination) = update_after(&fixture, |destination| {
            local
                .set(commit(destination, "local.txt", "agent\n"))
                .expect("set once");
        })
        .await;
        let local = local.get().expect("local commit").clone();

        assert_eq!(
            update,
            CheckoutUpdate {
                before: local.clone(),
                after: local.clone()
            }
        );
        assert_eq!(git(&destination, &["rev-parse", "main"]), local);
        assert_eq!(
            git(&destination, &["rev-parse", "origin/main"]),
            upstream,
            "the fetch still happened"
        );
    }

    #[tokio::test]
    async fn update_keeps_conflicting_change() {
        let fixture = Fixture::new();
        let (first, _, update, destination) = update_after(&fixture, |destination| {
            std::fs::write(destination.join("b.txt"), "agent edit\n").expect("edit");
        })
        .await;

        assert_eq!(
            update,
            CheckoutUpdate {
                before: first.clone(),
                after: first.clone()
            }
        );
        assert_eq!(git(&destination, &["rev-parse", "main"]), first);
        assert_eq!(
            std::fs::read_to_string(destination.join("b.txt")).expect("read"),
            "agent edit\n"
        );
        assert_eq!(git(&destination, &["status", "--porcelain"]), " M b.txt");
    }

    #[test]
    fn token_is_sent_once() {
        let credentials = Credentials {
            variable: Some("APP_TOKEN".to_owned()),
            token: Some(Token(TOKEN.to_owned())),
        };
        let mut state = CredentialState::new(&credentials);
        let rejected = CredentialResponse::Reject(CredentialFailure::Rejected {
            variable: "APP_TOKEN".to_owned(),
        });
        let expected = [
            CredentialResponse::UserPassword {
                username: TOKEN_USERNAME.to_owned(),
                password: TOKEN.to_owned(),
            },
            rejected.clone(),
            rejected.clone(),
            rejected,
        ];
        for answer in expected {
            assert_eq!(
                state.respond(CredentialType::USER_PASS_PLAINTEXT, None),
                answer
            );
        }
        let message = state.failure.expect("failure recorded").to_string();
        assert_eq!(
            message,
            "authentication failed; check the token in the environment variable `APP_TOKEN` named \
             by `credentials_env`"
        );
        assert!(!message.contains(TOKEN));
    }

    #[test]
    fn token_splits_at_first_colon() {
        assert_eq!(split_token("deploy:pa:ss"), ("deploy", "pa:ss"));
        assert_eq!(split_token("ghp_abc"), (TOKEN_USERNAME, "ghp_abc"));
        assert_eq!(split_token(":abc"), (TOKEN_USERNAME, ":abc"));
        let credentials = Credentials {
            variable: Some("T".to_owned()),
            token: Some(Token("deploy:pa:ss".to_owned())),
        };
        let answer =
            CredentialState::new(&credentials).respond(CredentialType::USER_PASS_PLAINTEXT, None);
        assert_eq!(
            answer,
            CredentialResponse::UserPassword {
                username: "deploy".to_owned(),
                password: "pa:ss".to_owned()
            }
        );
        assert_eq!(
            credentials.redact("x deploy:pa:ss y pa:ss"),
            "x <redacted> y <redacted>"
        );
    }

    #[test]
    fn request_without_credentials_env_fails() {
        let credentials = Credentials::default();
        let mut state = CredentialState::new(&credentials);
        let answer = state.respond(CredentialType::USER_PASS_PLAINTEXT, None);
        assert_eq!(
            answer,
            CredentialResponse::Reject(CredentialFailure::NotConfigured)
        );
        assert!(
            state
                .failure
                .expect("failure recorded")
                .to_string()
                .contains("set `credentials_env`")
        );
    }

    #[test]
    fn ssh_uses_the_agent_once() {
        let credentials = Credentials::default();
        let mut state = CredentialState::new(&credentials);
        assert_eq!(
            state.respond(CredentialType::USERNAME, None),
            CredentialResponse::Username("git".to_owned())
        );
        assert_eq!(
            state.respond(CredentialType::SSH_KEY, Some("deploy")),
            CredentialResponse::SshAgent("deploy".to_owned())
        );
        assert_eq!(
            state.respond(CredentialType::SSH_KEY, Some("deploy")),
            CredentialResponse::Reject(CredentialFailure::SshRejected)
        );
    }

    #[test]
    fn callback_responses_are_bounded() {
        let credentials = Credentials {
            variable: Some("T".to_owned()),
            token: Some(Token(TOKEN.to_owned())),
        };
        let mut state = CredentialState::new(&credentials);
        let everything = CredentialType::all();
        let returned = (0..50)
            .filter(|_| {
                !matches!(
                    state.respond(everything, None),
                    CredentialResponse::Reject(_)
                )
            })
            .count();
        assert_eq!(returned, MAX_CREDENTIAL_ATTEMPTS as usize);
        assert_eq!(state.calls, 50);
        assert_eq!(
            format!("{:?}", credentials.token),
            "Some(Token(<redacted>))"
        );
    }
}
