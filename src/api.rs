//! Wire types of the HTTP and NATS contract: request bodies, success bodies, the error body and
//! the NATS operations, plus the subjects and messages between a `remote_nats` controller and
//! its workers (`worker`).
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

    /// Rebuilds the error that a worker sent, so that the controller replies with the same code,
    /// message and fields. An unknown code, or `internal`, becomes `internal`.
    pub fn into_error(self) -> Error {
        let ErrorDetail {
            code,
            message,
            exit_code,
            output,
            truncated,
            workspace_id,
        } = self.error;
        match (code.as_str(), exit_code, workspace_id) {
            ("command_failed", Some(exit_code), _) => Error::CommandFailed {
                exit_code,
                output: output.unwrap_or_default(),
                truncated: truncated.unwrap_or(false),
            },
            ("setup_failed", Some(exit_code), Some(id)) => Error::SetupFailed {
                id,
                exit_code,
                output: output.unwrap_or_default(),
            },
            _ => match Error::known_code(&code) {
                Some(known) if known != "internal" => Error::Forwarded {
                    code: known,
                    message,
                },
                _ => Error::Internal(format!("a worker failed with `{code}`: {message}")),
            },
        }
    }
}

/// The traffic between a controller started with `-p remote_nats` and `derrick worker`
/// processes, all on subjects under `<prefix>.worker.`, which the NATS transport never answers.
///
/// - `<prefix>.worker.create`: a create, taken by one worker of the queue group `QUEUE_GROUP`.
///   That worker first sends `Accepted`, then the reply, both carrying its id in `WORKER_HEADER`.
/// - `<prefix>.worker.list`: every worker replies with its own workspaces.
/// - `<prefix>.worker.<worker id>.<operation>`: an operation on a workspace that this worker
///   owns; `<operation>` is the operation's subject suffix (`workspaces.cmd`).
/// - `<prefix>.worker.heartbeat`: each worker publishes a `Heartbeat` every second.
///
/// Requests and replies are those of the NATS transport: the HTTP body plus `id`, and
/// `{"ok": ...}` or the error envelope.
pub mod worker {
    use std::time::Duration;

    use serde::{Deserialize, Serialize};

    use super::Operation;

    /// How often a worker publishes its heartbeat. One second lets a controller notice a stopped
    /// worker within a few seconds, for one small message per worker and second.
    pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

    /// Queue group of the create subject, so that each create reaches exactly one worker.
    pub const QUEUE_GROUP: &str = "derrick-workers";

    /// Header that names the worker on every reply it sends.
    pub const WORKER_HEADER: &str = "Derrick-Worker";

    /// A worker's periodic sign of life, and its last message when it stops.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Heartbeat {
        /// The worker id, a single subject token.
        pub worker: String,
        /// Name of the workspace configuration that the worker serves.
        pub config: String,
        /// Provider kind of the worker, such as `local/overlay`.
        pub provider: String,
        /// `true` in the message a worker sends as it stops taking requests.
        #[serde(default)]
        pub stopping: bool,
    }

    /// The first message a worker sends on a create it took: `{"accepted": true}`.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Accepted {
        pub accepted: bool,
    }

    /// Returns the prefix of every worker subject: `<prefix>.worker.`.
    pub fn namespace(prefix: &str) -> String {
        format!("{prefix}.worker.")
    }

    /// Returns `<prefix>.worker.create`.
    pub fn create_subject(prefix: &str) -> String {
        format!("{prefix}.worker.create")
    }

    /// Returns `<prefix>.worker.list`.
    pub fn list_subject(prefix: &str) -> String {
        format!("{prefix}.worker.list")
    }

    /// Returns `<prefix>.worker.heartbeat`.
    pub fn heartbeat_subject(prefix: &str) -> String {
        format!("{prefix}.worker.heartbeat")
    }

    /// Returns `<prefix>.worker.<worker>.<operation>`.
    pub fn operation_subject(prefix: &str, worker: &str, operation: Operation) -> String {
        format!("{prefix}.worker.{worker}.{}", operation.name())
    }

    /// Returns the subject that every operation of one worker falls under.
    pub fn owned_subjects(prefix: &str, worker: &str) -> String {
        format!("{prefix}.worker.{worker}.>")
    }

    /// Checks that a worker id is one subject token that cannot clash with the fixed subjects.
    pub fn is_valid_id(worker: &str) -> bool {
        let reserved = ["create", "list", "heartbeat"].contains(&worker);
        let token = !worker.is_empty()
            && worker
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        token && !reserved
    }
}

/// The operations of the wire contract, named by their NATS subject suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Health,
    States,
    Create,
    List,
    Get,
    Destroy,
    Command,
    CommandWithOutput,
    WriteFile,
    ReadFile,
    Reset,
    Fetch,
}

impl Operation {
    /// Every operation, in the order of the wire contract.
    pub const ALL: [Operation; 12] = [
        Operation::Health,
        Operation::States,
        Operation::Create,
        Operation::List,
        Operation::Get,
        Operation::Destroy,
        Operation::Command,
        Operation::CommandWithOutput,
        Operation::WriteFile,
        Operation::ReadFile,
        Operation::Reset,
        Operation::Fetch,
    ];

    /// Returns the subject suffix of the operation (`workspaces.cmd`).
    pub fn name(self) -> &'static str {
        match self {
            Operation::Health => "health",
            Operation::States => "states",
            Operation::Create => "workspaces.create",
            Operation::List => "workspaces.list",
            Operation::Get => "workspaces.get",
            Operation::Destroy => "workspaces.destroy",
            Operation::Command => "workspaces.cmd",
            Operation::CommandWithOutput => "workspaces.cmd_with_output",
            Operation::WriteFile => "workspaces.write_file",
            Operation::ReadFile => "workspaces.read_file",
            Operation::Reset => "workspaces.reset",
            Operation::Fetch => "workspaces.fetch",
        }
    }

    /// Finds the operation of a subject suffix.
    pub fn from_name(name: &str) -> Option<Operation> {
        Operation::ALL
            .into_iter()
            .find(|operation| operation.name() == name)
    }
}

/// The success body of `read_file` over NATS: the file's bytes in standard base64.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadFileReply {
    pub content: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_has_its_subject() {
        let names: Vec<&str> = Operation::ALL.iter().map(|op| op.name()).collect();
        assert_eq!(
            names,
            [
                "health",
                "states",
                "workspaces.create",
                "workspaces.list",
                "workspaces.get",
                "workspaces.destroy",
                "workspaces.cmd",
                "workspaces.cmd_with_output",
                "workspaces.write_file",
                "workspaces.read_file",
                "workspaces.reset",
                "workspaces.fetch",
            ]
        );
        for operation in Operation::ALL {
            assert_eq!(Operation::from_name(operation.name()), Some(operation));
        }
        assert_eq!(Operation::from_name("workspaces"), None);
    }

    #[test]
    fn worker_subjects_are_under_the_namespace() {
        let subjects = [
            worker::create_subject("d"),
            worker::list_subject("d"),
            worker::heartbeat_subject("d"),
            worker::operation_subject("d", "w-1", Operation::Command),
        ];
        assert_eq!(
            subjects,
            [
                "d.worker.create",
                "d.worker.list",
                "d.worker.heartbeat",
                "d.worker.w-1.workspaces.cmd",
            ]
        );
        for subject in subjects {
            assert!(subject.starts_with(&worker::namespace("d")), "{subject}");
        }
        for invalid in ["", "create", "a.b", "a b", "*", ">"] {
            assert!(!worker::is_valid_id(invalid), "{invalid}");
        }
        assert!(worker::is_valid_id("worker-3f9a_1"));
    }

    #[test]
    fn every_code_round_trips() {
        for error in crate::error::samples() {
            let sent = serde_json::to_value(ErrorBody::from_error(&error)).expect("json");
            let received: ErrorBody = serde_json::from_value(sent.clone()).expect("body");
            let rebuilt = received.into_error();
            assert_eq!(rebuilt.code(), error.code(), "{sent}");
            let resent = serde_json::to_value(ErrorBody::from_error(&rebuilt)).expect("json");
            assert_eq!(resent, sent);
        }
    }

    #[test]
    fn forwarded_errors_keep_code_and_fields() {
        let cases = [
            Error::FileNotFound {
                id: "ws-1".to_owned(),
                path: "/a".to_owned(),
            },
            Error::CommandFailed {
                exit_code: 3,
                output: "out\n".to_owned(),
                truncated: false,
            },
            Error::SetupFailed {
                id: "ws-1".to_owned(),
                exit_code: 5,
                output: "before\n".to_owned(),
            },
            Error::ProviderUnavailable("docker".to_owned()),
        ];
        for error in cases {
            let sent = serde_json::to_value(ErrorBody::from_error(&error)).expect("json");
            let received: ErrorBody = serde_json::from_value(sent.clone()).expect("body");
            let rebuilt = received.into_error();
            assert_eq!(rebuilt.code(), error.code());
            let resent = serde_json::to_value(ErrorBody::from_error(&rebuilt)).expect("json");
            assert_eq!(resent, sent);
        }
        let unknown = ErrorBody {
            error: ErrorDetail {
                code: "novel_code".to_owned(),
                message: "m".to_owned(),
                exit_code: None,
                output: None,
                truncated: None,
                workspace_id: None,
            },
        };
        assert_eq!(unknown.into_error().code(), "internal");
    }
}
