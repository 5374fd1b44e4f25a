//! The workspace configuration file (`-w FILE`): parsing and validation.
//!
//! Parsing runs in two stages. `RawConfig` mirrors the file with `deny_unknown_fields`, and
//! `validate` turns it into `WorkspaceConfig`, whose fields hold only checked values. Every error
//! names the file, the field and what is allowed, so derrick refuses to start on a bad file.
//!
//! Invariant: `RawConfig` and its parts are the file format that users write; changing a field is
//! a compatibility decision. No type here contains a credential: tokens stay in the environment of
//! the provider process and are read by `git` when it talks to a remote.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Maximum length of a configuration `name`.
const MAX_NAME_CHARS: usize = 64;

/// A configuration file that failed to parse or validate.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration {file}: field `{field}`: {message}")]
pub struct ConfigError {
    /// The file, as given on the command line.
    pub file: String,
    /// The JSON path of the offending field (`repositories[0].url`), or `(file)` for the whole.
    pub field: String,
    /// The problem and the allowed values.
    pub message: String,
}

/// A validated workspace configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceConfig {
    pub name: String,
    pub repositories: Vec<Repository>,
    pub setup_script: String,
    pub env: BTreeMap<String, String>,
    pub base_image: Option<String>,
    pub git_author: GitAuthor,
    /// Container settings of the docker provider; the local provider ignores them.
    pub docker: DockerSettings,
}

/// Container settings of the docker provider (`"docker"` in the file).
///
/// They shape the containers, not the images, so they are not part of any layer key: changing
/// them applies to new workspaces and reuses the cached layers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DockerSettings {
    pub network: DockerNetwork,
    /// CPU limit in billionths of a core (`"cpus": 1.5` is 1,500,000,000), the engine's unit;
    /// `None` leaves the engine's default (no limit).
    pub nano_cpus: Option<u64>,
    /// Memory limit in bytes; `None` leaves the engine's default (no limit).
    pub memory_bytes: Option<u64>,
}

/// The network of workspace containers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DockerNetwork {
    /// Docker's default bridge network.
    #[default]
    Bridge,
    /// A loopback interface only.
    None,
}

impl DockerNetwork {
    /// Returns the engine's name of the network mode.
    pub fn as_str(self) -> &'static str {
        match self {
            DockerNetwork::Bridge => "bridge",
            DockerNetwork::None => "none",
        }
    }
}

/// One repository to check out into every workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repository {
    pub url: RepoUrl,
    /// The checkout's folder, as an absolute path inside the workspace (`/code/app`).
    pub path: String,
    /// Branch, tag or full commit id; `None` means the remote's default branch.
    pub reference: Option<String>,
    /// Name of the provider-process environment variable that contains the token.
    pub credentials_env: Option<String>,
}

/// The identity that checkouts commit with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitAuthor {
    pub name: String,
    pub email: String,
}

impl Default for GitAuthor {
    fn default() -> Self {
        GitAuthor {
            name: "derrick agent".to_owned(),
            email: "agent@derrick.invalid".to_owned(),
        }
    }
}

/// A Git remote location without user info, safe to log, store and show.
///
/// Local paths are stored as absolute paths, resolved against the configuration file's folder.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct RepoUrl(String);

impl RepoUrl {
    /// Parses a URL or local path from a configuration file in `base_dir`.
    ///
    /// # Errors
    /// Returns a message for an unsupported scheme, a URL that carries a password or token, or a
    /// local path that does not exist.
    pub fn parse(input: &str, base_dir: &Path) -> Result<RepoUrl, String> {
        if input.is_empty() {
            return Err(
                "must not be empty; give an https://, http://, ssh://, file:// URL or a local path"
                    .to_owned(),
            );
        }
        if !input.contains("://") {
            return Self::parse_local_path(input, base_dir);
        }

        let url = url::Url::parse(input)
            .map_err(|error| format!("`{input}` is not a valid URL: {error}"))?;
        match url.scheme() {
            "https" | "http" => {
                if !url.username().is_empty() || url.password().is_some() {
                    return Err("must not contain user info; put the token in an environment variable and name it in `credentials_env`".to_owned());
                }
            }
            "ssh" => {
                if url.password().is_some() {
                    return Err("must not contain a password; use an SSH agent".to_owned());
                }
            }
            "file" => {}
            other => {
                return Err(format!(
                    "scheme `{other}` is not supported; use https://, http://, ssh://, file:// or a local path"
                ));
            }
        }
        if url.host_str().is_none_or(str::is_empty) && url.scheme() != "file" {
            return Err(format!("`{input}` has no host"));
        }
        Ok(RepoUrl(url.to_string()))
    }

    fn parse_local_path(input: &str, base_dir: &Path) -> Result<RepoUrl, String> {
        let joined = base_dir.join(input);
        let absolute = normalize_lexically(&joined);
        if !absolute.exists() {
            return Err(format!(
                "local repository `{}` does not exist (relative paths are resolved against the configuration file's folder)",
                absolute.display()
            ));
        }
        Ok(RepoUrl(absolute.to_string_lossy().into_owned()))
    }

    /// Returns the URL or absolute local path.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Returns the last path segment without `.git`, the default checkout folder.
    pub fn default_folder(&self) -> String {
        let trimmed = self.0.trim_end_matches('/');
        let last = trimmed.rsplit(['/', ':']).next().unwrap_or(trimmed);
        last.strip_suffix(".git").unwrap_or(last).to_owned()
    }

    /// Wraps a string already known to hold no user info (tests and records).
    pub fn from_trusted(url: impl Into<String>) -> RepoUrl {
        RepoUrl(url.into())
    }
}

impl fmt::Display for RepoUrl {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// Reads, parses and validates a configuration file.
///
/// # Errors
/// Returns a `ConfigError` naming the file, the field and what is allowed.
pub fn load(file: &Path) -> Result<WorkspaceConfig, ConfigError> {
    let file_name = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|error| ConfigError {
        file: file_name.clone(),
        field: "(file)".to_owned(),
        message: format!("cannot read the file: {error}"),
    })?;
    let parent = file
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base_dir = std::path::absolute(parent).map_err(|error| ConfigError {
        file: file_name.clone(),
        field: "(file)".to_owned(),
        message: format!("cannot resolve the configuration folder: {error}"),
    })?;
    parse(&text, &file_name, &base_dir)
}

/// Parses and validates configuration text; `file` names it in errors.
///
/// # Errors
/// Returns a `ConfigError` naming the file, the field and what is allowed.
pub fn parse(text: &str, file: &str, base_dir: &Path) -> Result<WorkspaceConfig, ConfigError> {
    let deserializer = &mut serde_json::Deserializer::from_str(text);
    let raw: RawConfig = serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let path = error.path().to_string();
        let message = error.into_inner().to_string();
        ConfigError {
            file: file.to_owned(),
            field: field_of(&path, &message),
            message,
        }
    })?;
    raw.validate(base_dir)
        .map_err(|(field, message)| ConfigError {
            file: file.to_owned(),
            field,
            message,
        })
}

/// The configuration file as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: String,
    repositories: Vec<RawRepository>,
    setup_script: String,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    base_image: Option<String>,
    #[serde(default)]
    git_author: Option<GitAuthor>,
    #[serde(default)]
    docker: Option<RawDockerSettings>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDockerSettings {
    #[serde(default)]
    network: Option<String>,
    #[serde(default)]
    cpus: Option<f64>,
    #[serde(default)]
    memory: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepository {
    url: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    reference: Option<String>,
    #[serde(default)]
    credentials_env: Option<String>,
}

type FieldError = (String, String);

impl RawConfig {
    fn validate(self, base_dir: &Path) -> Result<WorkspaceConfig, FieldError> {
        validate_name(&self.name).map_err(|message| ("name".to_owned(), message))?;

        let mut repositories = Vec::with_capacity(self.repositories.len());
        for (index, raw) in self.repositories.into_iter().enumerate() {
            let repository = raw
                .validate(base_dir)
                .map_err(|(field, message)| (format!("repositories[{index}].{field}"), message))?;
            check_paths_disjoint(&repositories, &repository)
                .map_err(|message| (format!("repositories[{index}].path"), message))?;
            repositories.push(repository);
        }

        for (key, value) in &self.env {
            validate_env_entry(key, value).map_err(|message| (format!("env.{key}"), message))?;
        }
        if let Some(image) = &self.base_image
            && (image.trim().is_empty() || image.chars().any(char::is_whitespace))
        {
            return Err((
                "base_image".to_owned(),
                "must be a non-empty image reference without spaces".to_owned(),
            ));
        }
        let git_author = self.git_author.unwrap_or_default();
        validate_author(&git_author)?;
        let docker = match self.docker {
            Some(raw) => raw.validate()?,
            None => DockerSettings::default(),
        };

        Ok(WorkspaceConfig {
            name: self.name,
            repositories,
            setup_script: self.setup_script,
            env: self.env,
            base_image: self.base_image,
            git_author,
            docker,
        })
    }
}

/// Smallest memory limit the docker engine accepts (6 MiB, as of Docker 20.10).
const MIN_DOCKER_MEMORY_BYTES: u64 = 6 * 1024 * 1024;

impl RawDockerSettings {
    fn validate(self) -> Result<DockerSettings, FieldError> {
        let network = match self.network.as_deref() {
            None | Some("bridge") => DockerNetwork::Bridge,
            Some("none") => DockerNetwork::None,
            Some(other) => {
                return Err((
                    "docker.network".to_owned(),
                    format!("`{other}` is not supported; allowed: \"bridge\" (default), \"none\""),
                ));
            }
        };
        if let Some(cpus) = self.cpus
            && !(cpus.is_finite() && cpus > 0.0 && cpus <= 1024.0)
        {
            return Err((
                "docker.cpus".to_owned(),
                format!("{cpus} is invalid; allowed: a number of cores above 0, such as 1.5"),
            ));
        }
        let memory_bytes = match self.memory.as_deref() {
            None => None,
            Some(text) => {
                Some(parse_memory(text).map_err(|message| ("docker.memory".to_owned(), message))?)
            }
        };
        Ok(DockerSettings {
            network,
            nano_cpus: self.cpus.map(|cpus| (cpus * 1e9).round() as u64),
            memory_bytes,
        })
    }
}

/// Parses a memory size as Docker writes it: a whole number with an optional unit `b`, `k`, `m`
/// or `g` (powers of 1024).
fn parse_memory(text: &str) -> Result<u64, String> {
    let invalid = || {
        format!(
            "`{text}` is invalid; allowed: a whole number of bytes with an optional unit b, k, m \
             or g (such as \"512m\"), at least 6m"
        )
    };
    let lower = text.trim().to_ascii_lowercase();
    let (digits, unit) = match lower.find(|c: char| !c.is_ascii_digit()) {
        Some(index) => lower.split_at(index),
        None => (lower.as_str(), ""),
    };
    let multiplier: u64 = match unit {
        "" | "b" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => return Err(invalid()),
    };
    let count: u64 = digits.parse().map_err(|_| invalid())?;
    let bytes = count.checked_mul(multiplier).ok_or_else(invalid)?;
    if bytes < MIN_DOCKER_MEMORY_BYTES {
        return Err(invalid());
    }
    Ok(bytes)
}

impl RawRepository {
    fn validate(self, base_dir: &Path) -> Result<Repository, FieldError> {
        let url =
            RepoUrl::parse(&self.url, base_dir).map_err(|message| ("url".to_owned(), message))?;
        let path = match self.path {
            Some(path) => path,
            None => format!("/{}", url.default_folder()),
        };
        let path =
            normalize_workspace_path(&path).map_err(|message| ("path".to_owned(), message))?;
        if let Some(reference) = &self.reference {
            validate_reference(reference).map_err(|message| ("reference".to_owned(), message))?;
        }
        if let Some(variable) = &self.credentials_env
            && !is_env_name(variable)
        {
            return Err((
                "credentials_env".to_owned(),
                format!(
                    "`{variable}` is not an environment variable name; allowed: [A-Za-z_][A-Za-z0-9_]*"
                ),
            ));
        }
        Ok(Repository {
            url,
            path,
            reference: self.reference,
            credentials_env: self.credentials_env,
        })
    }
}

/// Names the field of a serde error. A missing field is reported by serde at its parent's path,
/// so its name is taken from the message.
fn field_of(path: &str, message: &str) -> String {
    let parent = if path == "." || path == "?" {
        None
    } else {
        Some(path)
    };
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next());
    match (parent, missing) {
        (Some(parent), Some(missing)) => format!("{parent}.{missing}"),
        (None, Some(missing)) => missing.to_owned(),
        (Some(parent), None) => parent.to_owned(),
        (None, None) => "(file)".to_owned(),
    }
}

fn validate_name(name: &str) -> Result<(), String> {
    let length = name.chars().count();
    let allowed = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if length == 0 || length > MAX_NAME_CHARS || !allowed {
        return Err(format!(
            "`{name}` is invalid; allowed: 1 to {MAX_NAME_CHARS} characters of [A-Za-z0-9_.-]"
        ));
    }
    Ok(())
}

/// Normalizes a checkout path to `/a/b`, rejecting `..`, the root itself and empty segments.
fn normalize_workspace_path(path: &str) -> Result<String, String> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(format!(
                    "`{path}` contains `..`; give a path inside the workspace such as /code/app"
                ));
            }
            _ if part.contains('\0') => return Err("must not contain NUL bytes".to_owned()),
            _ => parts.push(part),
        }
    }
    if parts.is_empty() {
        return Err(format!(
            "`{path}` is the workspace root; give a folder such as /code/app"
        ));
    }
    Ok(format!("/{}", parts.join("/")))
}

fn check_paths_disjoint(existing: &[Repository], new: &Repository) -> Result<(), String> {
    for other in existing {
        let (a, b) = (format!("{}/", other.path), format!("{}/", new.path));
        if a.starts_with(&b) || b.starts_with(&a) {
            return Err(format!(
                "`{}` overlaps `{}` of {}; two repositories may not share a path or nest inside each other",
                new.path, other.path, other.url
            ));
        }
    }
    Ok(())
}

fn validate_reference(reference: &str) -> Result<(), String> {
    let invalid = reference.is_empty()
        || reference.len() > 255
        || reference.starts_with('-')
        || reference.contains("..")
        || reference
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "~^:?*[\\".contains(c));
    if invalid {
        return Err(format!(
            "`{reference}` is not a valid branch, tag or commit id"
        ));
    }
    Ok(())
}

fn validate_env_entry(key: &str, value: &str) -> Result<(), String> {
    if !is_env_name(key) {
        return Err(format!(
            "`{key}` is not a valid variable name; allowed: [A-Za-z_][A-Za-z0-9_]*"
        ));
    }
    if value.contains('\0') {
        return Err("the value must not contain NUL bytes".to_owned());
    }
    Ok(())
}

fn validate_author(author: &GitAuthor) -> Result<(), FieldError> {
    let bad = |value: &str| {
        value.trim().is_empty()
            || value
                .chars()
                .any(|c| c.is_control() || c == '<' || c == '>')
    };
    if bad(&author.name) {
        return Err((
            "git_author.name".to_owned(),
            "must be non-empty, without control characters, `<` or `>`".to_owned(),
        ));
    }
    if bad(&author.email) || !author.email.contains('@') {
        return Err((
            "git_author.email".to_owned(),
            "must be an address like agent@example.com".to_owned(),
        ));
    }
    Ok(())
}

/// Tells whether `name` is a portable environment variable name.
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Resolves `.` and `..` without touching the file system.
fn normalize_lexically(path: &Path) -> PathBuf {
    let mut normalized = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                normalized.pop();
            }
            Component::CurDir => {}
            other => normalized.push(other),
        }
    }
    normalized
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_error(text: &str, field: &str, fragment: &str) {
        let error =
            parse(text, "test.json", Path::new("/")).expect_err("configuration must be rejected");
        assert_eq!(error.field, field, "{error}");
        assert!(
            error.message.contains(fragment),
            "message `{}` lacks `{fragment}`",
            error.message
        );
        assert!(
            error
                .to_string()
                .starts_with("invalid configuration test.json: field"),
            "{error}"
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let text = r#"{"name": "a", "repositories": [{"url": "https://example.com/team/app.git"}], "setup_script": ""}"#;
        let config = parse(text, "test.json", Path::new("/")).expect("valid");
        assert_eq!(config.repositories[0].path, "/app");
        assert_eq!(config.repositories[0].reference, None);
        assert_eq!(config.git_author, GitAuthor::default());
    }

    #[test]
    fn invalid_fields_are_named() {
        check_error(
            r#"{"name": "a b", "repositories": [], "setup_script": ""}"#,
            "name",
            "[A-Za-z0-9_.-]",
        );
        check_error(
            &format!(
                r#"{{"name": "{}", "repositories": [], "setup_script": ""}}"#,
                "x".repeat(65)
            ),
            "name",
            "1 to 64",
        );
        check_error(
            r#"{"name": "a", "repositories": [], "setup_script": "", "extra": 1}"#,
            "extra",
            "unknown field",
        );
        check_error(
            r#"{"name": "a", "repositories": [], "setup_script": 3}"#,
            "setup_script",
            "invalid type",
        );
        check_error(
            r#"{"name": "a", "setup_script": ""}"#,
            "repositories",
            "missing field `repositories`",
        );
        check_error(
            r#"{"name": "a", "repositories": [{"path": "/x"}], "setup_script": ""}"#,
            "repositories[0].url",
            "missing field `url`",
        );
        check_error(
            r#"{"name": "a", "repositories": [{"url": "ftp://h/x"}], "setup_script": ""}"#,
            "repositories[0].url",
            "not supported",
        );
        check_error(
            r#"{"name": "a", "repositories": [{"url": "https://user:tok@h/x"}], "setup_script": ""}"#,
            "repositories[0].url",
            "credentials_env",
        );
        check_error(
            r#"{"name": "a", "repositories": [{"url": "/definitely/not/here"}], "setup_script": ""}"#,
            "repositories[0].url",
            "does not exist",
        );
        check_error(
            r#"{"name": "a", "repositories": [{"url": "https://h/x", "path": "/a/../.."}], "setup_script": ""}"#,
            "repositories[0].path",
            "..",
        );
        check_error(
            r#"{"name": "a", "repositories": [{"url": "https://h/x", "path": "/"}], "setup_script": ""}"#,
            "repositories[0].path",
            "workspace root",
        );
        check_error(
            r#"{"name": "a", "repositories": [{"url": "https://h/x", "reference": "a b"}], "setup_script": ""}"#,
            "repositories[0].reference",
            "not a valid",
        );
        check_error(
            r#"{"name": "a", "repositories": [{"url": "https://h/x", "credentials_env": "1X"}], "setup_script": ""}"#,
            "repositories[0].credentials_env",
            "environment variable",
        );
        check_error(
            r#"{"name": "a", "repositories": [], "setup_script": "", "env": {"A-B": "1"}}"#,
            "env.A-B",
            "variable name",
        );
        check_error(
            r#"{"name": "a", "repositories": [], "setup_script": "", "git_author": {"name": "n", "email": "nope"}}"#,
            "git_author.email",
            "address",
        );
    }

    #[test]
    fn docker_settings_are_optional_and_checked() {
        let text = r#"{"name": "a", "repositories": [], "setup_script": ""}"#;
        let config = parse(text, "test.json", Path::new("/")).expect("valid");
        assert_eq!(config.docker, DockerSettings::default());

        let text = r#"{"name": "a", "repositories": [], "setup_script": "",
            "docker": {"network": "none", "cpus": 1.5, "memory": "512m"}}"#;
        let config = parse(text, "test.json", Path::new("/")).expect("valid");
        assert_eq!(config.docker.network, DockerNetwork::None);
        assert_eq!(config.docker.nano_cpus, Some(1_500_000_000));
        assert_eq!(config.docker.memory_bytes, Some(512 * 1024 * 1024));

        let base = r#"{"name": "a", "repositories": [], "setup_script": "", "docker": "#;
        let cases = [
            (
                r#"{"network": "host"}"#,
                "docker.network",
                "allowed: \"bridge\"",
            ),
            (r#"{"cpus": 0}"#, "docker.cpus", "above 0"),
            (r#"{"memory": "12x"}"#, "docker.memory", "unit b, k, m"),
            (r#"{"memory": "1k"}"#, "docker.memory", "at least 6m"),
            (r#"{"swap": "1g"}"#, "docker.swap", "unknown field"),
        ];
        for (docker, field, fragment) in cases {
            check_error(&format!("{base}{docker}}}"), field, fragment);
        }
    }

    #[test]
    fn nested_repository_paths_are_rejected() {
        let text = r#"{"name": "a", "repositories": [
            {"url": "https://h/x", "path": "/code"},
            {"url": "https://h/y", "path": "/code/y"}], "setup_script": ""}"#;
        check_error(text, "repositories[1].path", "nest");
        let same = r#"{"name": "a", "repositories": [{"url": "https://h/x"}, {"url": "https://g/x.git"}], "setup_script": ""}"#;
        check_error(same, "repositories[1].path", "share");
    }

    #[test]
    fn sibling_paths_with_common_prefix_are_allowed() {
        let text = r#"{"name": "a", "repositories": [
            {"url": "https://h/x", "path": "/code"},
            {"url": "https://h/y", "path": "/code2"}], "setup_script": ""}"#;
        parse(text, "test.json", Path::new("/")).expect("`/code` and `/code2` do not nest");
    }

    #[test]
    fn local_paths_resolve_against_config_folder() {
        let directory = tempfile::tempdir().expect("temporary directory");
        std::fs::create_dir(directory.path().join("repo")).expect("create repo folder");
        let text = r#"{"name": "a", "repositories": [{"url": "sub/../repo"}], "setup_script": ""}"#;
        let config = parse(text, "test.json", directory.path()).expect("valid");
        assert_eq!(
            config.repositories[0].url.as_str(),
            directory.path().join("repo").to_str().expect("utf-8")
        );
        assert_eq!(config.repositories[0].path, "/repo");
    }
}
