//! The NATS transport: request/reply on `<prefix>.<operation>` over the service core.
//!
//! A request is the HTTP body as a JSON object, plus `"id"` for operations on one workspace. The
//! reply is `{"ok": <the HTTP success body>}` or the error envelope of the wire contract, with the
//! same codes as HTTP. Each request is served in a task of its own, so a long command never delays
//! other requests. Every request that has a reply subject gets exactly one reply. That includes an
//! undecodable request, an unknown operation, and a reply over the server's maximum payload,
//! which becomes `payload_too_large` because the server would drop it.
//!
//! Subjects under `<prefix>.worker.` carry the traffic between a `remote_nats` controller and
//! its workers, so this server leaves them unanswered. `worker` serves the same operations on
//! those subjects for `derrick worker`.
//!
//! Invariant: this module decides the NATS envelope and nothing else; it never branches on a
//! workspace's state. It sets no deadline of its own on an operation, so a command runs for as
//! long as its `timeout` allows. No credential reaches a log line or an error: URLs are shown
//! without user info and secrets are held in `Secret`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::{Client, Message, Subject, Subscriber};
use base64::Engine as _;
use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, instrument, warn};

use crate::api::{self, ErrorBody, Operation, ReadFileReply};
use crate::error::Error;
use crate::nats_client::{NatsError, NatsOptions, connect, redact_url};
use crate::service::Service;

mod worker;

pub use worker::{WorkerIdentity, serve_worker};

/// How long running requests may go on once shutdown starts. Twenty seconds lets file operations
/// and interrupted steps finish and stays inside the 30 s that Kubernetes gives a pod to stop,
/// leaving time to destroy the workspaces. Requests still running then get an error reply.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// How long abandoned requests get to publish their error reply, and the client to flush its
/// buffered replies, at shutdown. Both are local steps that take milliseconds when NATS is up.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to NATS, serves every operation on `<prefix>.>` until `shutdown` is cancelled, then
/// stops taking requests and lets running ones finish for up to `SHUTDOWN_GRACE`. Subjects
/// under `<prefix>.worker.` belong to the worker traffic and get no reply from here.
///
/// # Errors
/// Fails at start-up on an invalid prefix or URL, an unreadable credentials file, or a server
/// that rejects derrick or does not respond within `CONNECT_TIMEOUT`; later when the
/// subscription closes.
pub async fn serve(
    service: Arc<dyn Service>,
    options: NatsOptions,
    shutdown: CancellationToken,
) -> Result<(), NatsError> {
    options.validate()?;
    let client = connect(&options).await?;
    let subject = format!("{}.>", options.subject_prefix);
    let subscriber = subscribe(&client, &subject, None).await?;
    flush(&client, &subject).await?;
    info!(
        url = %redact_url(&options.url),
        subject = %subject,
        max_payload = client.server_info().max_payload,
        "serving nats requests"
    );

    let server = Arc::new(Server {
        service,
        client,
        prefix: options.subject_prefix,
        role: Role::Contract,
    });
    server.run(vec![subscriber], &subject, shutdown).await
}

/// The success envelope.
#[derive(Serialize)]
struct OkBody<T> {
    ok: T,
}

/// The subjects a server replies on.
enum Role {
    /// The contract's subjects, `<prefix>.<operation>`, for controllers and clients.
    Contract,
    /// One worker's subjects under `<prefix>.worker.`, for `remote_nats` controllers.
    Worker { id: String },
}

/// State shared by every request task.
struct Server {
    service: Arc<dyn Service>,
    client: Client,
    prefix: String,
    role: Role,
}

impl Server {
    /// Takes requests until `shutdown`, then drains the subscriptions' buffers and waits for the
    /// running requests. `subjects` names the subscriptions in errors.
    async fn run(
        self: Arc<Self>,
        subscribers: Vec<Subscriber>,
        subjects: &str,
        shutdown: CancellationToken,
    ) -> Result<(), NatsError> {
        let abandon = CancellationToken::new();
        let mut requests = JoinSet::new();
        let mut messages = futures_util::stream::select_all(subscribers);
        let closed = loop {
            tokio::select! {
                () = shutdown.cancelled() => break false,
                message = messages.next() => {
                    let Some(message) = message else { break true };
                    self.accept(&mut requests, message, &abandon);
                }
                Some(joined) = requests.join_next(), if !requests.is_empty() => log_joined(joined),
            }
        };

        for subscriber in messages.iter_mut() {
            if let Err(error) = subscriber.unsubscribe().await {
                warn!(error = %error, "cannot unsubscribe from nats at shutdown");
            }
        }
        // Requests that arrived before the unsubscribe are served like the others. The streams
        // end once the client has processed the unsubscribes, which it does only while it is
        // connected, so without a connection only the messages already received are taken.
        let connected = self.client.connection_state() == State::Connected;
        let wait = if connected {
            FLUSH_TIMEOUT
        } else {
            Duration::ZERO
        };
        let drain = async {
            while let Some(message) = messages.next().await {
                self.accept(&mut requests, message, &abandon);
            }
        };
        if tokio::time::timeout(wait, drain).await.is_err() && connected {
            warn!("the nats subscriptions did not end after the unsubscribe; stopped waiting");
        }
        self.finish(&mut requests, &abandon).await;
        if closed {
            return Err(NatsError::SubscriptionClosed {
                subject: subjects.to_owned(),
            });
        }
        Ok(())
    }

    /// Starts a task for a request, or drops one that has nowhere to reply.
    fn accept(
        self: &Arc<Self>,
        requests: &mut JoinSet<()>,
        message: Message,
        abandon: &CancellationToken,
    ) {
        let worker_traffic = message
            .subject
            .starts_with(&api::worker::namespace(&self.prefix));
        if matches!(self.role, Role::Contract) && worker_traffic {
            return;
        }
        let Some(reply_to) = message.reply.clone() else {
            warn!(
                subject = %message.subject,
                "nats message without a reply subject dropped; send requests with request/reply"
            );
            return;
        };
        let server = self.clone();
        let abandon = abandon.clone();
        requests.spawn(async move { server.respond(message, reply_to, abandon).await });
    }

    /// Serves one request and publishes its one reply; a worker first acknowledges a create.
    #[instrument(skip_all, fields(subject = %message.subject))]
    async fn respond(&self, message: Message, reply_to: Subject, abandon: CancellationToken) {
        let started = Instant::now();
        let operation = self.operation(&message.subject);
        if matches!(self.role, Role::Worker { .. }) && matches!(operation, Ok(Operation::Create)) {
            let accepted = api::worker::Accepted { accepted: true };
            let accepted = serde_json::to_vec(&accepted).expect("a bool encodes as JSON");
            self.publish(reply_to.clone(), accepted).await;
        }
        let result = tokio::select! {
            result = self.dispatch(operation, &message.payload) => result,
            () = abandon.cancelled() => Err(Error::ProviderUnavailable(
                "derrick stopped before this request finished; send it again once derrick is back"
                    .to_owned(),
            )),
        };
        if let Err(error) = &result
            && matches!(error, Error::Internal(_) | Error::ProviderUnavailable(_))
        {
            error!(code = error.code(), error = %error, "nats request failed");
        }

        let code = result.as_ref().map_or_else(Error::code, |_| "ok");
        let max_payload = self.client.server_info().max_payload;
        let hint = match self.role {
            Role::Contract => CONTRACT_SIZE_HINT,
            Role::Worker { .. } => WORKER_SIZE_HINT,
        };
        let reply = encode_reply(result, &message.subject, max_payload, hint);
        self.publish(reply_to, reply).await;
        debug!(
            code,
            duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "nats request answered"
        );
    }

    /// Publishes a reply; a worker names itself in a header.
    async fn publish(&self, reply_to: Subject, payload: Vec<u8>) {
        let published = match &self.role {
            Role::Contract => self.client.publish(reply_to, payload.into()).await,
            Role::Worker { id } => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(api::worker::WORKER_HEADER, id.as_str());
                self.client
                    .publish_with_headers(reply_to, headers, payload.into())
                    .await
            }
        };
        if let Err(error) = published {
            error!(error = %error, "cannot publish nats reply");
        }
    }

    /// Maps a subject to its operation; an unknown one is `not_found`.
    fn operation(&self, subject: &str) -> Result<Operation, Error> {
        let name = match &self.role {
            Role::Contract => subject
                .strip_prefix(&self.prefix)
                .and_then(|rest| rest.strip_prefix('.')),
            Role::Worker { id } => {
                let rest = subject.strip_prefix(&api::worker::namespace(&self.prefix));
                match rest {
                    Some("create") => Some(Operation::Create.name()),
                    Some("list") => Some(Operation::List.name()),
                    Some(rest) => rest
                        .strip_prefix(id.as_str())
                        .and_then(|rest| rest.strip_prefix('.')),
                    None => None,
                }
            }
        };
        name.and_then(Operation::from_name)
            .ok_or_else(|| Error::RouteNotFound {
                method: "NATS".to_owned(),
                path: subject.to_owned(),
            })
    }

    /// Decodes the request, calls the service once and encodes the success envelope.
    async fn dispatch(
        &self,
        operation: Result<Operation, Error>,
        payload: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let engine = &self.service;
        match operation? {
            Operation::Health => ok(api::HealthResponse { healthy: true }),
            Operation::States => ok(engine.states()),
            Operation::Create => ok(engine.create(decode_body(payload)?).await?),
            Operation::List => ok(engine.list().await?),
            Operation::Get => ok(engine.get(&decode_id(payload)?).await?),
            Operation::Destroy => {
                engine.destroy(&decode_id(payload)?).await?;
                ok(true)
            }
            Operation::Command => {
                let (id, request) = decode_with_id(payload)?;
                ok(engine.command_checked(&id, request).await?)
            }
            Operation::CommandWithOutput => {
                let (id, request) = decode_with_id(payload)?;
                ok(engine.command(&id, request).await?)
            }
            Operation::WriteFile => {
                let (id, request) = decode_with_id(payload)?;
                ok(engine.write_file(&id, request).await?)
            }
            Operation::ReadFile => {
                let (id, request) = decode_with_id(payload)?;
                let bytes = engine.read_file(&id, request).await?;
                let content = base64::engine::general_purpose::STANDARD.encode(bytes);
                ok(ReadFileReply { content })
            }
            Operation::Reset => ok(engine.reset(&decode_id(payload)?).await?),
            Operation::Fetch => {
                let (id, request) = decode_with_id(payload)?;
                ok(engine.fetch(&id, request).await?)
            }
        }
    }

    /// Waits up to `SHUTDOWN_GRACE` for running requests, then makes the rest reply with an error.
    async fn finish(&self, requests: &mut JoinSet<()>, abandon: &CancellationToken) {
        if !requests.is_empty() {
            info!(
                requests = requests.len(),
                "waiting for running nats requests"
            );
        }
        if tokio::time::timeout(SHUTDOWN_GRACE, join_all(requests))
            .await
            .is_err()
        {
            warn!(
                requests = requests.len(),
                grace_seconds = SHUTDOWN_GRACE.as_secs(),
                "nats requests still running after the grace period get provider_unavailable"
            );
            abandon.cancel();
            if tokio::time::timeout(FLUSH_TIMEOUT, join_all(requests))
                .await
                .is_err()
            {
                requests.abort_all();
            }
        }
        match tokio::time::timeout(FLUSH_TIMEOUT, self.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(error = %error, "cannot flush nats replies at shutdown"),
            Err(_elapsed) => warn!("flushing nats replies at shutdown timed out"),
        }
    }
}

/// Encodes the success envelope `{"ok": value}`.
fn ok<T: Serialize>(value: T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(&OkBody { ok: value })
        .map_err(|error| Error::internal("cannot encode the nats reply", error))
}

/// The advice in the `payload_too_large` reply of a contract request.
const CONTRACT_SIZE_HINT: &str = "request less data (a smaller file, a command with less output), \
    raise max_payload in the server's configuration, or use the HTTP transport, which carries \
    files of up to 64 MiB";

/// The advice in the `payload_too_large` reply of a worker. The HTTP transport is no way out here,
/// because a controller reaches its workers over NATS whatever transport it serves.
const WORKER_SIZE_HINT: &str = "request less data (a smaller file, a command with less output) or \
    raise max_payload in the NATS server's configuration; workers reply over NATS whatever \
    transport the controller serves";

/// Subscribes to `subject`, in `queue_group` when one is given.
async fn subscribe(
    client: &Client,
    subject: &str,
    queue_group: Option<&str>,
) -> Result<Subscriber, NatsError> {
    let subscribed = match queue_group {
        Some(group) => {
            client
                .queue_subscribe(subject.to_owned(), group.to_owned())
                .await
        }
        None => client.subscribe(subject.to_owned()).await,
    };
    subscribed.map_err(|error| NatsError::Subscribe {
        subject: subject.to_owned(),
        reason: error.to_string(),
    })
}

/// Makes the server register the subscriptions before derrick logs that it serves.
async fn flush(client: &Client, subject: &str) -> Result<(), NatsError> {
    client.flush().await.map_err(|error| NatsError::Subscribe {
        subject: subject.to_owned(),
        reason: error.to_string(),
    })
}

/// Turns a result into the reply payload, replacing a reply over `max_payload` with
/// `payload_too_large` and `hint`, because the server would drop it and leave the requester
/// waiting.
fn encode_reply(
    result: Result<Vec<u8>, Error>,
    subject: &str,
    max_payload: usize,
    hint: &str,
) -> Vec<u8> {
    let reply = result.unwrap_or_else(|error| error_reply(&error));
    if reply.len() <= max_payload {
        return reply;
    }
    let error = Error::PayloadTooLarge {
        what: format!("the reply to `{subject}`"),
        size: reply.len() as u64,
        limit: max_payload as u64,
    };
    let mut body = ErrorBody::from_error(&error);
    body.error.message = format!(
        "{} (the NATS server's max_payload); {hint}",
        body.error.message
    );
    encode_error(&body)
}

fn error_reply(error: &Error) -> Vec<u8> {
    encode_error(&ErrorBody::from_error(error))
}

fn encode_error(body: &ErrorBody) -> Vec<u8> {
    serde_json::to_vec(body).unwrap_or_else(|_| {
        br#"{"error":{"code":"internal","message":"cannot encode the error reply"}}"#.to_vec()
    })
}

/// Parses a payload as a JSON object; an empty payload is `{}`.
fn decode_object(payload: &[u8]) -> Result<Map<String, Value>, Error> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice(payload) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(Error::invalid_request(
            "the request must be a JSON object: the HTTP body, plus `id` for operations on one \
             workspace",
        )),
        Err(error) => Err(Error::invalid_request(format!(
            "invalid JSON request: {error}"
        ))),
    }
}

/// Removes and returns the workspace id of a request.
fn take_id(object: &mut Map<String, Value>) -> Result<String, Error> {
    match object.remove("id") {
        Some(Value::String(id)) => Ok(id),
        Some(_) => Err(Error::invalid_request(
            "`id` must be a string, the workspace id that create returned",
        )),
        None => Err(Error::invalid_request(
            "missing `id`: operations on one workspace need the workspace id that create returned",
        )),
    }
}

fn from_object<T: DeserializeOwned>(object: Map<String, Value>) -> Result<T, Error> {
    serde_json::from_value(Value::Object(object))
        .map_err(|error| Error::invalid_request(format!("invalid JSON request: {error}")))
}

/// Decodes the request of an operation without a workspace id.
fn decode_body<T: DeserializeOwned>(payload: &[u8]) -> Result<T, Error> {
    from_object(decode_object(payload)?)
}

/// Decodes the workspace id of an operation that has no body over HTTP; other fields are
/// ignored, as HTTP ignores such a body.
fn decode_id(payload: &[u8]) -> Result<String, Error> {
    take_id(&mut decode_object(payload)?)
}

/// Decodes the workspace id and the HTTP body of an operation on one workspace.
fn decode_with_id<T: DeserializeOwned>(payload: &[u8]) -> Result<(String, T), Error> {
    let mut object = decode_object(payload)?;
    let id = take_id(&mut object)?;
    Ok((id, from_object(object)?))
}

async fn join_all(requests: &mut JoinSet<()>) {
    while let Some(joined) = requests.join_next().await {
        log_joined(joined);
    }
}

fn log_joined(joined: Result<(), JoinError>) {
    if let Err(error) = joined
        && !error.is_cancelled()
    {
        error!(error = %error, "nats request task failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(reply: &[u8]) -> Value {
        serde_json::from_slice(reply).expect("reply is JSON")
    }

    #[test]
    fn request_carries_id_and_http_body() {
        let payload = br#"{"id": "ws-1", "cmd": "true", "timeout": 2}"#;
        let (id, request): (String, api::CommandRequest) =
            decode_with_id(payload).expect("valid request");
        assert_eq!(id, "ws-1");
        assert_eq!(request.cmd, "true");
        assert_eq!(request.timeout, Some(2.0));
    }

    #[test]
    fn empty_payload_is_an_empty_body() {
        let request: api::CreateRequest = decode_body(b" \n").expect("optional body");
        assert!(request.env.is_empty());
        let error = decode_id(b"").expect_err("id is required");
        assert_eq!(error.code(), "invalid_request");
        assert!(error.to_string().contains("missing `id`"), "{error}");
    }

    #[test]
    fn malformed_requests_are_invalid_request() {
        let cases: [&[u8]; 5] = [
            b"{not json",
            b"[1, 2]",
            br#"{"id": 7, "cmd": "true"}"#,
            br#"{"id": "ws-1", "command": "true"}"#,
            br#"{"cmd": "true"}"#,
        ];
        for payload in cases {
            let error = decode_with_id::<api::CommandRequest>(payload).expect_err("malformed");
            assert_eq!(
                error.code(),
                "invalid_request",
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
    }

    #[test]
    fn reply_has_ok_or_error_envelope() {
        let success = encode_reply(
            ok(api::CommandResponse { exit_code: 0 }),
            "d.x",
            1024,
            CONTRACT_SIZE_HINT,
        );
        assert_eq!(
            decoded(&success),
            serde_json::json!({ "ok": { "exit_code": 0 } })
        );
        let failure = encode_reply(
            Err(Error::WorkspaceNotFound {
                id: "ws-1".to_owned(),
            }),
            "d.x",
            1024,
            CONTRACT_SIZE_HINT,
        );
        assert_eq!(decoded(&failure)["error"]["code"], "workspace_not_found");
    }

    #[test]
    fn oversized_reply_becomes_payload_too_large() {
        let content = "a".repeat(2000);
        let reply = encode_reply(
            ok(ReadFileReply { content }),
            "derrick.workspaces.read_file",
            1000,
            CONTRACT_SIZE_HINT,
        );
        assert!(reply.len() <= 1000, "{} bytes", reply.len());
        let body = decoded(&reply);
        assert_eq!(body["error"]["code"], "payload_too_large");
        let message = body["error"]["message"].as_str().expect("message");
        for expected in [
            "derrick.workspaces.read_file",
            "2021 bytes",
            "1000 bytes",
            "HTTP",
        ] {
            assert!(message.contains(expected), "{expected} missing: {message}");
        }
    }
}
