//! The error type that every core operation returns.
//!
//! Each variant is one error code of the wire contract and carries the values its message needs.
//! This module decides codes and messages; the HTTP status and the NATS envelope are decided by
//! the transports.
//!
//! Invariant: no variant contains a credential. Git URLs appear only as `RepoUrl`, which has no
//! user info, and command output comes from inside the workspace, where no token is ever placed.

use std::fmt;

/// The result type of the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The failure of a core operation, as reported to its caller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or names a value that does not exist (a missing `working_dir`).
    #[error("{0}")]
    InvalidRequest(String),

    /// A `content` field is not valid base64.
    #[error(
        "invalid base64 in `{field}`: {reason}; send standard base64 (line breaks are allowed)"
    )]
    InvalidBase64 { field: &'static str, reason: String },

    /// A path in a request resolves outside the workspace root.
    #[error(
        "path `{path}` resolves outside the workspace; use a path inside the workspace root \
         without `..` or symbolic links that leave it"
    )]
    PathOutsideWorkspace { path: String },

    /// The request lacks a valid API token.
    #[error("missing or invalid bearer token; send `Authorization: Bearer <token>`")]
    Unauthorized,

    /// No workspace with this id exists (or it was destroyed).
    #[error("workspace `{id}` not found; list the workspaces to see which exist")]
    WorkspaceNotFound { id: String },

    /// No endpoint has this method and path.
    #[error("no endpoint {method} {path}; the endpoints are listed in the API documentation")]
    RouteNotFound { method: String, path: String },

    /// The path exists, but not with this method.
    #[error(
        "{method} is not allowed on {path}; the endpoints and their methods are listed in the API documentation"
    )]
    MethodNotAllowed { method: String, path: String },

    /// A request body exceeds the transport's limit; its full size is not known.
    #[error("request body is over the limit of {limit} bytes; send files of up to 64 MiB")]
    BodyTooLarge { limit: u64 },

    /// The file to read does not exist.
    #[error("file `{path}` not found in workspace `{id}`")]
    FileNotFound { id: String, path: String },

    /// The state machine does not allow this operation in the workspace's current state.
    #[error(
        "cannot {op} workspace `{id}` in state `{state}`; allowed operations in `{state}`: {allowed}"
    )]
    InvalidTransition {
        id: String,
        state: String,
        op: String,
        allowed: String,
    },

    /// A body, file or reply exceeds a documented limit.
    #[error("{what} is {size} bytes, over the limit of {limit} bytes")]
    PayloadTooLarge { what: String, size: u64, limit: u64 },

    /// A command run through `/cmd` exited non-zero.
    #[error("command exited with code {exit_code}")]
    CommandFailed {
        exit_code: i32,
        output: String,
        truncated: bool,
    },

    /// The setup script exited non-zero (or was killed by the operator's setup timeout).
    #[error(
        "setup script of workspace `{id}` failed with exit code {exit_code}; fix `setup_script` in the configuration and create again"
    )]
    SetupFailed {
        id: String,
        exit_code: i32,
        output: String,
    },

    /// A Git operation failed. `url` is credential-free.
    #[error("git {step} failed for `{url}`: {reason}")]
    GitFailed {
        step: &'static str,
        url: String,
        reason: String,
    },

    /// A create would exceed `--max-workspaces`.
    #[error(
        "derrick already has {limit} workspaces, the --max-workspaces limit; destroy workspaces that are no longer needed, or ask the operator to raise the limit"
    )]
    WorkspaceLimitReached { limit: usize },

    /// The provider's backend (Docker engine, NATS, a worker) cannot be reached.
    #[error("provider unavailable: {0}")]
    ProviderUnavailable(String),

    /// An unexpected failure. The message goes to the log; clients see only `internal`.
    #[error("{0}")]
    Internal(String),

    /// An error that a `derrick worker` returned, passed on with its code and message as they are.
    #[error("{message}")]
    Forwarded { code: &'static str, message: String },
}

/// Every code of the wire contract.
pub const CODES: [&str; 16] = [
    "invalid_request",
    "invalid_base64",
    "path_outside_workspace",
    "unauthorized",
    "workspace_not_found",
    "not_found",
    "method_not_allowed",
    "payload_too_large",
    "file_not_found",
    "invalid_transition",
    "command_failed",
    "setup_failed",
    "git_failed",
    "workspace_limit_reached",
    "provider_unavailable",
    "internal",
];

impl Error {
    /// Returns the snake_case code of the wire contract.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidRequest(_) => "invalid_request",
            Error::InvalidBase64 { .. } => "invalid_base64",
            Error::PathOutsideWorkspace { .. } => "path_outside_workspace",
            Error::Unauthorized => "unauthorized",
            Error::WorkspaceNotFound { .. } => "workspace_not_found",
            Error::RouteNotFound { .. } => "not_found",
            Error::MethodNotAllowed { .. } => "method_not_allowed",
            Error::BodyTooLarge { .. } => "payload_too_large",
            Error::FileNotFound { .. } => "file_not_found",
            Error::InvalidTransition { .. } => "invalid_transition",
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::CommandFailed { .. } => "command_failed",
            Error::SetupFailed { .. } => "setup_failed",
            Error::GitFailed { .. } => "git_failed",
            Error::WorkspaceLimitReached { .. } => "workspace_limit_reached",
            Error::ProviderUnavailable(_) => "provider_unavailable",
            Error::Internal(_) => "internal",
            Error::Forwarded { code, .. } => code,
        }
    }

    /// Returns the code of the wire contract that is spelled `code`, or `None` for an unknown one.
    pub fn known_code(code: &str) -> Option<&'static str> {
        CODES.into_iter().find(|known| *known == code)
    }

    /// Wraps an unexpected failure with the operation that hit it.
    pub fn internal(context: impl fmt::Display, source: impl fmt::Display) -> Self {
        Error::Internal(format!("{context}: {source}"))
    }

    /// Builds an `invalid_request` error from a message.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Error::InvalidRequest(message.into())
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(error: tokio::task::JoinError) -> Self {
        Error::internal("blocking task failed", error)
    }
}

/// One error of each variant, for tests that must cover every code.
#[cfg(test)]
pub(crate) fn samples() -> Vec<Error> {
    let text = || "x".to_owned();
    vec![
        Error::InvalidRequest(text()),
        Error::InvalidBase64 {
            field: "content",
            reason: text(),
        },
        Error::PathOutsideWorkspace { path: text() },
        Error::Unauthorized,
        Error::WorkspaceNotFound { id: text() },
        Error::RouteNotFound {
            method: text(),
            path: text(),
        },
        Error::MethodNotAllowed {
            method: text(),
            path: text(),
        },
        Error::BodyTooLarge { limit: 1 },
        Error::FileNotFound {
            id: text(),
            path: text(),
        },
        Error::InvalidTransition {
            id: text(),
            state: text(),
            op: text(),
            allowed: text(),
        },
        Error::PayloadTooLarge {
            what: text(),
            size: 2,
            limit: 1,
        },
        Error::CommandFailed {
            exit_code: 1,
            output: text(),
            truncated: false,
        },
        Error::SetupFailed {
            id: text(),
            exit_code: 1,
            output: text(),
        },
        Error::GitFailed {
            step: "fetch",
            url: text(),
            reason: text(),
        },
        Error::WorkspaceLimitReached { limit: 1 },
        Error::ProviderUnavailable(text()),
        Error::Internal(text()),
        Error::Forwarded {
            code: "file_not_found",
            message: text(),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns the position of `error`'s variant in `samples`. The match has no wildcard, so a
    /// new variant does not compile until it is added here and to `samples`.
    fn variant_index(error: &Error) -> usize {
        match error {
            Error::InvalidRequest(_) => 0,
            Error::InvalidBase64 { .. } => 1,
            Error::PathOutsideWorkspace { .. } => 2,
            Error::Unauthorized => 3,
            Error::WorkspaceNotFound { .. } => 4,
            Error::RouteNotFound { .. } => 5,
            Error::MethodNotAllowed { .. } => 6,
            Error::BodyTooLarge { .. } => 7,
            Error::FileNotFound { .. } => 8,
            Error::InvalidTransition { .. } => 9,
            Error::PayloadTooLarge { .. } => 10,
            Error::CommandFailed { .. } => 11,
            Error::SetupFailed { .. } => 12,
            Error::GitFailed { .. } => 13,
            Error::WorkspaceLimitReached { .. } => 14,
            Error::ProviderUnavailable(_) => 15,
            Error::Internal(_) => 16,
            Error::Forwarded { .. } => 17,
        }
    }

    #[test]
    fn every_code_is_listed() {
        let samples = samples();
        let indices: Vec<usize> = samples.iter().map(variant_index).collect();
        assert_eq!(indices, (0..=17).collect::<Vec<_>>());

        let mut codes: Vec<&str> = samples.iter().map(Error::code).collect();
        codes.sort_unstable();
        codes.dedup();
        let mut listed = CODES.to_vec();
        listed.sort_unstable();
        assert_eq!(codes, listed);
        for code in CODES {
            assert_eq!(Error::known_code(code), Some(code));
        }
        assert_eq!(Error::known_code("novel_code"), None);
    }
}
