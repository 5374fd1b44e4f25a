//! The `remote_nats` provider: forwards every operation over NATS to `derrick worker` processes,
//! each running the `local` or `docker` provider on its own machine.
//!
//! A create goes to the workers' queue group, so exactly one live worker takes it, and that
//! worker owns the workspace. A worker at its `--max-workspaces` rejects it, and the create then
//! goes to each other live worker's own subject in turn. The provider remembers each workspace's
//! owner from the create reply and from list replies. A controller that restarts, or receives an
//! id it has not seen, requests the list of every worker, so no table is lost with the
//! controller. Listing merges the replies of all workers that reply within `LIST_TIMEOUT`. When
//! none replies, or the controller is not connected to NATS, the list is `provider_unavailable`
//! rather than empty.
//!
//! Workers publish a heartbeat every second. A worker whose last heartbeat is older than
//! `WORKER_SILENCE`, or that announced its stop, is gone. Operations on its workspaces then get
//! `provider_unavailable` at once, and a request already waiting for it gets the same error as
//! soon as the silence is noticed. No request has a deadline of its own otherwise, so a command
//! runs for as long as its `timeout` allows while its worker lives, until a shutdown's grace has
//! passed.
//!
//! Invariant: requests and replies are the wire types of `api`, and the controller holds no
//! repository credential: each worker's engine fills its own Git mirrors.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::{Client, Message, StatusCode, Subscriber};
use async_trait::async_trait;
use base64::Engine as _;
use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::worker::{self, Heartbeat};
use crate::api::{self, ErrorBody, Operation};
use crate::engine::WorkspaceId;
use crate::engine::record::WorkspaceRecord;
use crate::error::{Error, Result};
use crate::nats_client::{NatsError, NatsOptions, connect, redact_url};
use crate::service::Service;
use crate::states::StateMachine;

/// How long a worker may go without a heartbeat before its workspaces are unavailable. Five
/// missed heartbeats ride out a garbage-collection pause or a short reconnect, and keep the time
/// from a worker's death to the error within 10 s.
pub const WORKER_SILENCE: Duration = Duration::from_secs(5);

/// How often a waiting request checks its worker's heartbeat, small against `WORKER_SILENCE`.
const LIVENESS_POLL: Duration = Duration::from_millis(250);

/// How long a create waits for a worker to acknowledge it. A worker acknowledges as soon as it
/// reads the request, before any work, so only a worker that is stuck or gone takes longer.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a list waits for workers that have not replied yet. Workers reply to a list from
/// memory in milliseconds, so two seconds leaves room for a loaded machine.
const LIST_TIMEOUT: Duration = Duration::from_secs(2);

/// How long start-up waits for the first heartbeat: two heartbeat intervals, so that every
/// running worker is known before the first request.
const DISCOVERY_WAIT: Duration = Duration::from_secs(2);

/// The `remote_nats` provider: a `Service` whose operations run on workers.
pub struct RemoteNats {
    client: Client,
    /// The server URL without user info, for errors.
    url: String,
    prefix: String,
    machine: StateMachine,
    workers: Arc<Mutex<HashMap<String, WorkerStatus>>>,
    /// The owner of each workspace, by workspace id.
    owners: Mutex<HashMap<String, String>>,
    heartbeats: JoinHandle<()>,
    /// Cancelled once a shutdown's grace has passed: requests still waiting for a worker then
    /// get `provider_unavailable`, so that the transports' graceful shutdown ends.
    abandon: CancellationToken,
    abandon_task: JoinHandle<()>,
    /// When the controller connected. Until `WORKER_SILENCE` has passed, some live workers may
    /// not have sent a heartbeat yet, so a list waits for every reply instead of the known ones.
    started: Instant,
}

/// The controller's record of one worker.
#[derive(Debug, Clone, Copy)]
struct WorkerStatus {
    last_seen: Instant,
    stopping: bool,
}

impl RemoteNats {
    /// Connects to NATS, starts following the workers' heartbeats and waits up to
    /// `DISCOVERY_WAIT` for the first one. `config_name` is the configuration the workers should
    /// serve; a worker with another one is logged as a warning. Once `shutdown` is cancelled and
    /// `grace` has passed, requests still waiting for a worker get `provider_unavailable`, while
    /// the worker goes on with them.
    ///
    /// # Errors
    /// Fails as the NATS transport does on invalid options or a failed connection.
    pub async fn connect(
        options: &NatsOptions,
        config_name: &str,
        shutdown: CancellationToken,
        grace: Duration,
    ) -> Result<RemoteNats, NatsError> {
        options.validate()?;
        let client = connect(options).await?;
        let subject = worker::heartbeat_subject(&options.subject_prefix);
        let subscriber =
            client
                .subscribe(subject.clone())
                .await
                .map_err(|error| NatsError::Subscribe {
                    subject: subject.clone(),
                    reason: error.to_string(),
                })?;
        let workers = Arc::new(Mutex::new(HashMap::new()));
        let heartbeats = tokio::spawn(follow_heartbeats(
            subscriber,
            workers.clone(),
            config_name.to_owned(),
        ));

        let abandon = CancellationToken::new();
        let abandon_task = tokio::spawn(abandon_after_grace(shutdown, grace, abandon.clone()));
        let remote = RemoteNats {
            client,
            url: redact_url(&options.url),
            prefix: options.subject_prefix.clone(),
            machine: StateMachine::builtin().expect("the built-in state machine is valid"),
            workers,
            owners: Mutex::new(HashMap::new()),
            heartbeats,
            abandon,
            abandon_task,
            started: Instant::now(),
        };

        let deadline = Instant::now() + DISCOVERY_WAIT;
        while remote.live_workers().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(LIVENESS_POLL).await;
        }
        let live = remote.live_workers().len();
        if live == 0 {
            warn!(url = %redact_url(&options.url), subject = %subject, "no derrick worker has sent a heartbeat yet; creates fail until one runs");
        }
        info!(url = %redact_url(&options.url), workers = live, "remote_nats provider ready");
        Ok(remote)
    }

    /// Returns the ids of the workers that are live now.
    fn live_workers(&self) -> HashSet<String> {
        let workers = self.workers.lock().expect("worker map lock");
        workers
            .iter()
            .filter(|(_, status)| status.is_live())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Records a message from `worker` as a sign of life.
    fn mark_seen(&self, worker: &str) {
        let mut workers = self.workers.lock().expect("worker map lock");
        let status = workers.entry(worker.to_owned()).or_insert(WorkerStatus {
            last_seen: Instant::now(),
            stopping: false,
        });
        status.last_seen = Instant::now();
    }

    /// Checks that `worker` is live. `role` names it in the error, such as "the owner of
    /// workspace `ws-…`".
    fn check_live(&self, worker: &str, role: &str) -> Result<()> {
        let status = self
            .workers
            .lock()
            .expect("worker map lock")
            .get(worker)
            .copied();
        let reason = match status {
            Some(status) if status.is_live() => return Ok(()),
            Some(status) if status.stopping => "stopped".to_owned(),
            Some(status) => format!(
                "has sent no heartbeat for {} s",
                status.last_seen.elapsed().as_secs()
            ),
            None => "has sent no heartbeat".to_owned(),
        };
        Err(Error::ProviderUnavailable(format!(
            "worker `{worker}` ({role}) {reason}; check that worker and its connection to NATS, \
             or create a new workspace"
        )))
    }

    /// Waits until `worker` is no longer live, or until the shutdown's grace has passed, and
    /// returns the matching error.
    async fn until_gone(&self, worker: &str, role: &str) -> Error {
        loop {
            tokio::select! {
                () = tokio::time::sleep(LIVENESS_POLL) => {}
                () = self.abandon.cancelled() => return Error::ProviderUnavailable(format!(
                    "the controller stopped before worker `{worker}` ({role}) replied; the \
                     worker goes on with the request, so check the workspace before sending it \
                     again"
                )),
            }
            if let Err(error) = self.check_live(worker, role) {
                return error;
            }
        }
    }

    /// Returns the worker that owns workspace `id`, asking every worker when it is not known.
    async fn owner(&self, id: &str) -> Result<String> {
        let not_found = || Error::WorkspaceNotFound { id: id.to_owned() };
        WorkspaceId::parse(id).ok_or_else(not_found)?;
        if let Some(worker) = self.known_owner(id) {
            return Ok(worker);
        }
        self.gather().await?;
        self.known_owner(id).ok_or_else(not_found)
    }

    fn known_owner(&self, id: &str) -> Option<String> {
        self.owners.lock().expect("owner map lock").get(id).cloned()
    }

    fn set_owner(&self, id: &str, worker: &str) {
        let mut owners = self.owners.lock().expect("owner map lock");
        owners.insert(id.to_owned(), worker.to_owned());
    }

    /// Sends `operation` on workspace `id` to its owner and decodes the `ok` value of the reply.
    async fn call<T: DeserializeOwned>(
        &self,
        id: &str,
        operation: Operation,
        body: impl Serialize,
    ) -> Result<T> {
        // Checked first, so that the error names NATS rather than the workers that went silent
        // because of it.
        self.check_connected()?;
        let worker = self.owner(id).await?;
        let role = format!("the owner of workspace `{id}`");
        self.check_live(&worker, &role)?;
        let subject = worker::operation_subject(&self.prefix, &worker, operation);
        let payload = with_id(id, body)?;
        self.check_size(&subject, payload.len())?;

        let request = self.client.request(subject.clone(), payload.into());
        let reply = tokio::select! {
            reply = request => reply.map_err(|error| match error.kind() {
                async_nats::RequestErrorKind::NoResponders => Error::ProviderUnavailable(format!(
                    "worker `{worker}` ({role}) no longer takes requests (nothing subscribes to \
                     `{subject}`); create a new workspace"
                )),
                _ => Error::ProviderUnavailable(format!(
                    "request `{subject}` failed: {error}; check the connection to NATS"
                )),
            })?,
            error = self.until_gone(&worker, &role) => return Err(error),
        };
        self.mark_seen(&worker);
        decode_reply(&reply.payload, &worker)
    }

    /// Fails at once while the client is not connected to NATS: it would buffer the request until
    /// it reconnects, and a list would wait for replies that cannot come.
    fn check_connected(&self) -> Result<()> {
        if self.client.connection_state() == State::Connected {
            return Ok(());
        }
        Err(Error::ProviderUnavailable(format!(
            "the controller is not connected to NATS at {}, so no worker can be reached; check \
             that nats-server runs there (the controller reconnects by itself)",
            self.url
        )))
    }

    /// Rejects a request that the NATS server would refuse for its size.
    fn check_size(&self, subject: &str, size: usize) -> Result<()> {
        let limit = self.client.server_info().max_payload;
        if size <= limit {
            return Ok(());
        }
        Err(Error::PayloadTooLarge {
            what: format!("the request to `{subject}` (the NATS server's max_payload)"),
            size: size as u64,
            limit: limit as u64,
        })
    }

    /// Publishes `payload` to `subject` with a new inbox as the reply subject and returns the
    /// inbox's subscription.
    async fn publish_request(&self, subject: &str, payload: Vec<u8>) -> Result<Subscriber> {
        let unavailable = |error: &dyn std::fmt::Display| {
            Error::ProviderUnavailable(format!(
                "cannot send `{subject}` over NATS: {error}; check the connection to NATS"
            ))
        };
        self.check_connected()?;
        self.check_size(subject, payload.len())?;
        let inbox = self.client.new_inbox();
        let replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|error| unavailable(&error))?;
        self.client
            .publish_with_reply(subject.to_owned(), inbox, payload.into())
            .await
            .map_err(|error| unavailable(&error))?;
        Ok(replies)
    }

    /// Sends a create to `subject`, the queue group or one worker's own subject, and returns the
    /// worker that took it with its reply. The error is one of the create's own (an `Err` of the
    /// outer result means that no worker took it or that the worker went away).
    async fn create_on(
        &self,
        subject: &str,
        payload: Vec<u8>,
    ) -> Result<(String, Result<api::CreateResponse>)> {
        let mut replies = self.publish_request(subject, payload).await?;
        let no_worker = || {
            Error::ProviderUnavailable(format!(
                "no derrick worker took the create on `{subject}`; start one with `derrick worker`"
            ))
        };
        let accepted = tokio::time::timeout(ACCEPT_TIMEOUT, replies.next())
            .await
            .ok()
            .flatten()
            .filter(|message| message.status != Some(StatusCode::NO_RESPONDERS))
            .ok_or_else(no_worker)?;
        let worker = worker_of(&accepted).ok_or_else(no_worker)?;
        self.mark_seen(&worker);

        let reply = tokio::select! {
            reply = replies.next() => reply.ok_or_else(no_worker)?,
            error = self.until_gone(&worker, "the worker that took this create") => return Err(error),
        };
        let created = decode_reply::<api::CreateResponse>(&reply.payload, &worker);
        match &created {
            Ok(response) => self.set_owner(&response.id, &worker),
            Err(Error::SetupFailed { id, .. }) => self.set_owner(id, &worker),
            Err(_) => {}
        }
        let code = created.as_ref().map_or_else(Error::code, |_| "ok");
        info!(worker = %worker, code, "create forwarded");
        Ok((worker, created))
    }

    /// Requests every worker's workspaces, records their owners, and returns the replies that
    /// arrived within `LIST_TIMEOUT`.
    async fn gather(&self) -> Result<Vec<api::WorkspaceSummary>> {
        let subject = worker::list_subject(&self.prefix);
        let mut replies = self.publish_request(&subject, Vec::new()).await?;
        let expected = self.live_workers();
        let mut answered = HashSet::new();
        let mut workspaces = Vec::new();
        let deadline = tokio::time::Instant::now() + LIST_TIMEOUT;
        let all_known = self.started.elapsed() >= WORKER_SILENCE;
        while !all_known || expected.is_empty() || !expected.is_subset(&answered) {
            let message = match tokio::time::timeout_at(deadline, replies.next()).await {
                Ok(Some(message)) => message,
                Ok(None) | Err(_) => break,
            };
            if message.status == Some(StatusCode::NO_RESPONDERS) {
                break;
            }
            let Some(worker) = worker_of(&message) else {
                warn!(subject = %subject, "list reply without a worker header ignored");
                continue;
            };
            self.mark_seen(&worker);
            match decode_reply::<api::ListResponse>(&message.payload, &worker) {
                Ok(list) => {
                    for workspace in &list.workspaces {
                        self.set_owner(&workspace.id, &worker);
                    }
                    workspaces.extend(list.workspaces);
                }
                Err(error) => warn!(worker = %worker, error = %error, "worker failed to list"),
            }
            answered.insert(worker);
        }
        for silent in expected.difference(&answered) {
            warn!(worker = %silent, "worker did not reply to the list in time");
        }
        if answered.is_empty() {
            // An empty list would claim that no workspace exists, while the workers that hold
            // them may only be stopped or unreachable.
            return Err(Error::ProviderUnavailable(format!(
                "no derrick worker replied to `{subject}` within {} s, so the workspaces cannot be \
                 listed; start a worker with `derrick worker`, or check the workers' connection \
                 to NATS",
                LIST_TIMEOUT.as_secs()
            )));
        }
        Ok(workspaces)
    }
}

#[async_trait]
impl Service for RemoteNats {
    fn states(&self) -> &StateMachine {
        &self.machine
    }

    async fn create(&self, request: api::CreateRequest) -> Result<api::CreateResponse> {
        let payload = serde_json::to_vec(&request)
            .map_err(|error| Error::internal("cannot encode the create request", error))?;
        // NOTE: the NATS server picks a random member of the queue group, not the least busy
        // worker, so creates spread evenly in number but not by load.
        let subject = worker::create_subject(&self.prefix);
        let (worker, created) = self.create_on(&subject, payload.clone()).await?;
        if !is_full(&created) {
            return created;
        }

        // The queue group cannot skip a full worker, so the create goes to each other live
        // worker's own subject in turn, once per worker.
        let mut full = vec![worker];
        let mut others: Vec<String> = self.live_workers().into_iter().collect();
        others.sort_unstable();
        for other in others {
            if full.contains(&other) {
                continue;
            }
            let subject = worker::operation_subject(&self.prefix, &other, Operation::Create);
            match self.create_on(&subject, payload.clone()).await {
                Ok((worker, created)) if is_full(&created) => full.push(worker),
                Ok((_, created)) => return created,
                Err(error) => {
                    warn!(worker = %other, error = %error, "worker did not take a retried create")
                }
            }
        }
        info!(workers = %full.join(", "), "every live worker rejected the create as full");
        Err(Error::Forwarded {
            code: "workspace_limit_reached",
            message: format!(
                "every live derrick worker ({}) has reached its --max-workspaces limit; destroy \
                 workspaces that are no longer needed, start another worker, or raise the limit",
                full.join(", ")
            ),
        })
    }

    async fn list(&self) -> Result<api::ListResponse> {
        let mut workspaces = self.gather().await?;
        workspaces.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(api::ListResponse { workspaces })
    }

    async fn get(&self, id: &str) -> Result<WorkspaceRecord> {
        self.call(id, Operation::Get, serde_json::json!({})).await
    }

    async fn command(&self, id: &str, request: api::CommandRequest) -> Result<api::CommandOutput> {
        self.call(id, Operation::CommandWithOutput, request).await
    }

    async fn command_checked(
        &self,
        id: &str,
        request: api::CommandRequest,
    ) -> Result<api::CommandResponse> {
        self.call(id, Operation::Command, request).await
    }

    async fn read_file(&self, id: &str, request: api::ReadFileRequest) -> Result<Vec<u8>> {
        let reply: api::ReadFileReply = self.call(id, Operation::ReadFile, request).await?;
        base64::engine::general_purpose::STANDARD
            .decode(reply.content)
            .map_err(|error| Error::internal("a worker sent invalid base64 in read_file", error))
    }

    async fn write_file(
        &self,
        id: &str,
        request: api::WriteFileRequest,
    ) -> Result<api::WriteFileResponse> {
        self.call(id, Operation::WriteFile, request).await
    }

    async fn reset(&self, id: &str) -> Result<api::ResetResponse> {
        self.call(id, Operation::Reset, serde_json::json!({})).await
    }

    async fn fetch(&self, id: &str, request: api::FetchRequest) -> Result<api::FetchResponse> {
        self.call(id, Operation::Fetch, request).await
    }

    async fn destroy(&self, id: &str) -> Result<()> {
        let _: bool = self
            .call(id, Operation::Destroy, serde_json::json!({}))
            .await?;
        self.owners.lock().expect("owner map lock").remove(id);
        Ok(())
    }
}

impl Drop for RemoteNats {
    fn drop(&mut self) {
        self.heartbeats.abort();
        self.abandon_task.abort();
    }
}

impl WorkerStatus {
    fn is_live(&self) -> bool {
        !self.stopping && self.last_seen.elapsed() <= WORKER_SILENCE
    }
}

/// Cancels `abandon` once `shutdown` is cancelled and `grace` has passed.
async fn abandon_after_grace(
    shutdown: CancellationToken,
    grace: Duration,
    abandon: CancellationToken,
) {
    shutdown.cancelled().await;
    tokio::time::sleep(grace).await;
    info!(
        grace_seconds = grace.as_secs(),
        "requests still waiting for workers at shutdown get provider_unavailable"
    );
    abandon.cancel();
}

/// Records every heartbeat in `workers`, logging workers that join, stop, or serve another
/// configuration than `config_name`.
async fn follow_heartbeats(
    mut subscriber: Subscriber,
    workers: Arc<Mutex<HashMap<String, WorkerStatus>>>,
    config_name: String,
) {
    while let Some(message) = subscriber.next().await {
        let heartbeat: Heartbeat = match serde_json::from_slice(&message.payload) {
            Ok(heartbeat) => heartbeat,
            Err(error) => {
                warn!(error = %error, "undecodable heartbeat ignored");
                continue;
            }
        };
        let status = WorkerStatus {
            last_seen: Instant::now(),
            stopping: heartbeat.stopping,
        };
        let previous = workers
            .lock()
            .expect("worker map lock")
            .insert(heartbeat.worker.clone(), status);
        let joined = previous.is_none_or(|previous| !previous.is_live());
        if heartbeat.stopping {
            info!(worker = %heartbeat.worker, "worker stopping");
        } else if joined {
            info!(worker = %heartbeat.worker, provider = %heartbeat.provider, config = %heartbeat.config, "worker live");
            if heartbeat.config != config_name {
                warn!(worker = %heartbeat.worker, config = %heartbeat.config, expected = %config_name, "worker serves another configuration than this controller's -w");
            }
        }
    }
    warn!("the heartbeat subscription closed; workers will look silent");
}

/// Tells whether a worker refused a create because it is at its `--max-workspaces` limit.
fn is_full(created: &Result<api::CreateResponse>) -> bool {
    matches!(created, Err(error) if error.code() == "workspace_limit_reached")
}

/// Returns the worker id in a reply's header.
fn worker_of(message: &Message) -> Option<String> {
    let headers = message.headers.as_ref()?;
    let worker = headers.get(worker::WORKER_HEADER)?.as_str();
    worker::is_valid_id(worker).then(|| worker.to_owned())
}

/// Encodes a request body with the workspace id added.
fn with_id(id: &str, body: impl Serialize) -> Result<Vec<u8>> {
    let encode_error = |error: serde_json::Error| Error::internal("cannot encode a request", error);
    let mut value = serde_json::to_value(body).map_err(encode_error)?;
    let Value::Object(object) = &mut value else {
        return Err(Error::Internal(
            "a request body is not a JSON object".to_owned(),
        ));
    };
    object.insert("id".to_owned(), Value::String(id.to_owned()));
    serde_json::to_vec(&value).map_err(encode_error)
}

/// Decodes a worker's reply: the `ok` value, or the error it carries.
fn decode_reply<T: DeserializeOwned>(payload: &[u8], worker: &str) -> Result<T> {
    let undecodable = |reason: &dyn std::fmt::Display| {
        Error::Internal(format!(
            "worker `{worker}` sent an undecodable reply: {reason}"
        ))
    };
    let mut envelope: serde_json::Map<String, Value> =
        serde_json::from_slice(payload).map_err(|error| undecodable(&error))?;
    if let Some(error) = envelope.remove("error") {
        let body: ErrorBody = serde_json::from_value(serde_json::json!({ "error": error }))
            .map_err(|error| undecodable(&error))?;
        return Err(body.into_error());
    }
    let ok = envelope
        .remove("ok")
        .ok_or_else(|| undecodable(&"neither `ok` nor `error`"))?;
    serde_json::from_value(ok).map_err(|error| undecodable(&error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_decode_to_values_or_errors() {
        let ok: api::CommandResponse =
            decode_reply(br#"{"ok": {"exit_code": 0}}"#, "w").expect("ok");
        assert_eq!(ok.exit_code, 0);

        let payload = br#"{"error": {"code": "file_not_found", "message": "file `/a` not found"}}"#;
        let error = decode_reply::<api::CommandResponse>(payload, "w").expect_err("error");
        assert_eq!(error.code(), "file_not_found");
        assert_eq!(error.to_string(), "file `/a` not found");

        for payload in [&b"[]"[..], b"{}", b"not json"] {
            let error = decode_reply::<api::CommandResponse>(payload, "w").expect_err("bad");
            assert_eq!(error.code(), "internal");
        }
    }

    #[test]
    fn request_carries_the_id() {
        let payload = with_id(
            "ws-1",
            api::ReadFileRequest {
                path: "/a".to_owned(),
                working_dir: None,
            },
        )
        .expect("encodes");
        let value: Value = serde_json::from_slice(&payload).expect("json");
        assert_eq!(
            value,
            serde_json::json!({ "path": "/a", "working_dir": null, "id": "ws-1" })
        );
    }
}
