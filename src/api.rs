//! Wire types of the HTTP and NATS contract: request bodies, success bodies and the error body.
//!
//! Invariant: these serde derives are the contract that existing clients rely on. Fields may be
//! added; none may be renamed or removed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// `POST /workspaces`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// Environment for every command in the new workspace. It does not reach the setup script,
    /// so it never changes which snapshot is used.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// The deepest cached layer that the create started from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheInfo {
    /// `setup`, `repositories` or `none`.
    pub hit: String,
}

/// Success body of `POST /workspaces`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateResponse {
    pub id: String,
    pub state: String,
    pub cache: CacheInfo,
    /// Duration of each step that ran, by step name.
    pub durations_ms: BTreeMap<String, u64>,
}

/// One entry of `GET /workspaces`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkspaceSummary {
    pub id: String,
    pub state: String,
    pub name: String,
    pub created_at: String,
}

/// Success body of `GET /workspaces`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListResponse {
    pub workspaces: Vec<WorkspaceSummary>,
}

/// `POST /workspaces/{id}/cmd` and `/cmd_with_output`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandRequest {
    pub cmd: String,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Seconds; fractions are allowed.
    #[serde(default)]
    pub timeout: Option<f64>,
}

/// Success body of `/cmd`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommandResponse {
    pub exit_code: i32,
}

/// Success body of `/cmd_with_output`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommandOutput {
    pub output: String,
    pub exit_code: i32,
    pub timed_out: bool,
    pub truncated: bool,
    pub duration_ms: u64,
}

/// `POST /workspaces/{id}/write_file`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteFileRequest {
    pub path: String,
    #[serde(default)]
    pub working_dir: Option<String>,
    /// Base64; line breaks are ignored.
    pub content: String,
}

/// Success body of `/write_file`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriteFileResponse {
    pub success: bool,
}

/// `POST /workspaces/{id}/read_file`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadFileRequest {
    pub path: String,
    #[serde(default)]
    pub working_dir: Option<String>,
}

/// Success body of `/reset`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResetResponse {
    pub id: String,
    pub state: String,
    pub duration_ms: u64,
}

/// `POST /workspaces/{id}/fetch`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchRequest {
    /// Repository paths to fetch; all repositories when absent.
    #[serde(default)]
    pub paths: Option<Vec<String>>,
}

/// One repository in the `/fetch` reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FetchedRepository {
    pub path: String,
    /// Commit checked out before the fetch.
    pub before: String,
    /// Commit checked out after the fetch.
    pub after: String,
    /// Commit of the configured reference upstream. It differs from `after` when local commits
    /// or changes kept the checkout from moving.
    pub upstream: String,
}

/// Success body of `/fetch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FetchResponse {
    pub repositories: Vec<FetchedRepository>,
}

/// Success body of `/health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthResponse {
    pub healthy: bool,
}

/// The error body: `{"error": {"code", "message", ...}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// The inner error object; command and setup failures add their exit code and output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_id: Option<String>,
}

impl ErrorBody {
    /// Builds the body of `error`. Internal errors show only `internal`; their detail is logged.
    pub fn from_error(error: &Error) -> ErrorBody {
        let message = match error {
            Error::Internal(_) => "internal error; the server log has the details".to_owned(),
            other => other.to_string(),
        };
        let mut detail = ErrorDetail {
            code: error.code().to_owned(),
            message,
            exit_code: None,
            output: None,
            truncated: None,
            workspace_id: None,
        };
        match error {
            Error::CommandFailed {
                exit_code,
                output,
                truncated,
            } => {
                detail.exit_code = Some(*exit_code);
                detail.output = Some(output.clone());
                detail.truncated = Some(*truncated);
            }
            Error::SetupFailed {
                id,
                exit_code,
                output,
            } => {
                detail.exit_code = Some(*exit_code);
                detail.output = Some(output.clone());
                detail.workspace_id = Some(id.clone());
            }
            _ => {}
        }
        ErrorBody { error: detail }
    }
}
