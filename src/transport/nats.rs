//! The NATS transport: request/reply on `<prefix>.<operation>` over the service core.
//!
//! A request is the HTTP body as a JSON object, plus `"id"` for operations on one workspace. The
//! reply is `{"ok": <the HTTP success body>}` or the error envelope of the wire contract, with the
//! same codes as HTTP. Each request is served in a task of its own, so a long command never delays
//! other requests. Every request that has a reply subject gets exactly one reply. That includes an
//! undecodable request, an unknown operation, and a reply over the server's maximum payload,
//! which becomes `payload_too_large` because the server would drop it.
//!
//! Invariant: this module decides the NATS envelope and nothing else; it never branches on a
//! workspace's state. It sets no deadline of its own on an operation, so a command runs for as
//! long as its `timeout` allows. No credential reaches a log line or an error: URLs are shown
//! without user info and secrets are held in `Secret`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{
    Client, ConnectError, ConnectErrorKind, ConnectOptions, Event, Message, ServerAddr, Subject,
    Subscriber,
};
use base64::Engine as _;
use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, instrument, warn};

use crate::api::{self, ErrorBody};
use crate::engine::Engine;
use crate::error::Error;

/// Default server: a NATS server on this machine, on NATS's standard port.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// Default first token of every subject.
pub const DEFAULT_SUBJECT_PREFIX: &str = "derrick";

/// Bound on connecting at start-up. Ten seconds covers a TLS handshake with a distant server, and
/// a server that has not responded by then is reported instead of retried forever.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long running requests may go on once shutdown starts. Twenty seconds lets file operations
/// and interrupted steps finish and stays inside the 30 s that Kubernetes gives a pod to stop,
/// leaving time to destroy the workspaces. Requests still running then get an error reply.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// How long abandoned requests get to publish their error reply, and the client to flush its
/// buffered replies, at shutdown. Both are local steps that take milliseconds when NATS is up.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of the NATS transport.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// Server URL, or several separated by commas. User info in it is never logged.
    pub url: String,
    /// First token(s) of every subject; `derrick` serves `derrick.health` and so on.
    pub subject_prefix: String,
    pub auth: NatsAuth,
    pub tls: NatsTls,
}

/// Authentication method towards the NATS server.
#[derive(Debug, Clone, Default)]
pub enum NatsAuth {
    #[default]
    None,
    Token(Secret),
    UserPassword {
        user: String,
        password: Secret,
    },
    /// A `.creds` file (user JWT and NKey seed), as `nsc` writes it.
    CredentialsFile(PathBuf),
}

/// TLS towards the NATS server. Giving a CA or a client certificate requires TLS.
#[derive(Debug, Clone, Default)]
pub struct NatsTls {
    /// PEM file of the CA that signed the server's certificate.
    pub ca_file: Option<PathBuf>,
    pub client_certificate: Option<ClientCertificate>,
    /// Refuse a connection without TLS.
    pub required: bool,
}

/// A client certificate and its private key, both PEM files.
#[derive(Debug, Clone)]
pub struct ClientCertificate {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

/// A secret value whose `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

/// The operations of the wire contract, named by their subject suffix.
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

/// Failure of the NATS transport at start-up or while serving.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The subject prefix is not a valid literal NATS subject.
    #[error(
        "invalid NATS subject prefix `{prefix}`: {reason}; use dot-separated tokens without \
         spaces or wildcards, such as `derrick` or `team.derrick`"
    )]
    InvalidPrefix {
        prefix: String,
        reason: &'static str,
    },

    /// The server URL does not parse. `url` has no user info.
    #[error("invalid NATS URL `{url}`: {error}; use nats://HOST:PORT or tls://HOST:PORT")]
    InvalidUrl { url: String, error: std::io::Error },

    /// The credentials file cannot be read or parsed.
    #[error("cannot read the NATS credentials file {}: {error}", path.display())]
    CredentialsFile {
        path: PathBuf,
        error: std::io::Error,
    },

    /// The server refused or failed the connection. `url` has no user info.
    // The client's error is a plain field, not a `source`, so that the message shows it once,
    // before the hint, instead of again at the end of the printed cause chain.
    #[error("cannot connect to NATS at {url}: {error}; {}", connect_hint(error))]
    Connect { url: String, error: ConnectError },

    /// The server did not complete the connection within `CONNECT_TIMEOUT`.
    #[error(
        "cannot connect to NATS at {url}: timed out after {} s; check that nats-server runs \
         there and that the URL and the TLS flags match its configuration",
        CONNECT_TIMEOUT.as_secs()
    )]
    ConnectTimeout { url: String },

    /// The subscription to the request subjects failed.
    #[error("cannot subscribe to `{subject}` on NATS: {reason}")]
    Subscribe { subject: String, reason: String },

    /// The subscription ended while derrick was serving, so no request can reach it.
    #[error("the NATS subscription to `{subject}` closed; restart derrick")]
    SubscriptionClosed { subject: String },
}

/// Connects to NATS, serves every operation on `<prefix>.>` until `shutdown` is cancelled, then
/// stops taking requests and lets running ones finish for up to `SHUTDOWN_GRACE`.
///
/// # Errors
/// Fails at start-up on an invalid prefix or URL, an unreadable credentials file, or a server
/// that rejects derrick or does not respond within `CONNECT_TIMEOUT`; later when the
/// subscription closes.
pub async fn serve(
    engine: Arc<Engine>,
    options: NatsOptions,
    shutdown: CancellationToken,
) -> Result<(), NatsError> {
    options.validate()?;
    let client = connect(&options).await?;
    let subject = format!("{}.>", options.subject_prefix);
    let subscribe_error = |reason: String| NatsError::Subscribe {
        subject: subject.clone(),
        reason,
    };
    let subscriber = client
        .subscribe(subject.clone())
        .await
        .map_err(|error| subscribe_error(error.to_string()))?;
    // The flush makes the server register the subscription before derrick logs that it serves.
    client
        .flush()
        .await
        .map_err(|error| subscribe_error(error.to_string()))?;
    info!(
        url = %redact_url(&options.url),
        subject = %subject,
        max_payload = client.server_info().max_payload,
        "serving nats requests"
    );

    let server = Arc::new(Server {
        engine,
        client,
        prefix: options.subject_prefix,
    });
    server.run(subscriber, shutdown).await
}

/// Connects with the options' authentication and TLS, trying once within `CONNECT_TIMEOUT`.
/// After a successful start, the client reconnects by itself whenever the connection drops.
///
/// # Errors
/// See `serve`.
pub async fn connect(options: &NatsOptions) -> Result<Client, NatsError> {
    let url = redact_url(&options.url);
    let servers = parse_servers(&options.url).map_err(|error| NatsError::InvalidUrl {
        url: url.clone(),
        error,
    })?;
    let connecting = connect_options(options).await?.connect(servers);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(error)) => Err(NatsError::Connect { url, error }),
        Err(_elapsed) => Err(NatsError::ConnectTimeout { url }),
    }
}

impl NatsOptions {
    /// Checks the subject prefix and the URL, so that bad flags fail before anything starts.
    ///
    /// # Errors
    /// `InvalidPrefix` or `InvalidUrl`.
    pub fn validate(&self) -> Result<(), NatsError> {
        validate_prefix(&self.subject_prefix)?;
        parse_servers(&self.url)
            .map(drop)
            .map_err(|error| NatsError::InvalidUrl {
                url: redact_url(&self.url),
                error,
            })
    }
}

/// Returns `url` with the user info of every server removed, for logs and errors.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|server| {
            let server = server.trim();
            let (scheme, rest) = match server.split_once("://") {
                Some((scheme, rest)) => (Some(scheme), rest),
                None => (None, server),
            };
            let authority_end = rest.find('/').unwrap_or(rest.len());
            let rest = match rest[..authority_end].rfind('@') {
                Some(at) => format!("***@{}", &rest[at + 1..]),
                None => rest.to_owned(),
            };
            match scheme {
                Some(scheme) => format!("{scheme}://{rest}"),
                None => rest,
            }
        })
        .collect::<Vec<String>>()
        .join(",")
}

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// Returns the value, for the one call that sends it to the server.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Secret::new(value))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("***")
    }
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

/// The success reply of `read_file`: the file's bytes in standard base64.
#[derive(Debug, Serialize)]
struct ReadFileReply {
    content: String,
}

/// The success envelope.
#[derive(Serialize)]
struct OkBody<T> {
    ok: T,
}

/// State shared by every request task.
struct Server {
    engine: Arc<Engine>,
    client: Client,
    prefix: String,
}

impl Server {
    /// Takes requests until `shutdown`, then drains the subscription's buffer and waits for the
    /// running requests.
    async fn run(
        self: Arc<Self>,
        mut subscriber: Subscriber,
        shutdown: CancellationToken,
    ) -> Result<(), NatsError> {
        let abandon = CancellationToken::new();
        let mut requests = JoinSet::new();
        let closed = loop {
            tokio::select! {
                () = shutdown.cancelled() => break false,
                message = subscriber.next() => {
                    let Some(message) = message else { break true };
                    self.accept(&mut requests, message, &abandon);
                }
                Some(joined) = requests.join_next(), if !requests.is_empty() => log_joined(joined),
            }
        };

        if let Err(error) = subscriber.unsubscribe().await {
            warn!(error = %error, "cannot unsubscribe from nats at shutdown");
        }
        // Requests that arrived before the unsubscribe are served like the others.
        while let Some(message) = subscriber.next().await {
            self.accept(&mut requests, message, &abandon);
        }
        self.finish(&mut requests, &abandon).await;
        if closed {
            return Err(NatsError::SubscriptionClosed {
                subject: format!("{}.>", self.prefix),
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

    /// Serves one request and publishes its one reply.
    #[instrument(skip_all, fields(subject = %message.subject))]
    async fn respond(&self, message: Message, reply_to: Subject, abandon: CancellationToken) {
        let started = Instant::now();
        let operation = self.operation(&message.subject);
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
        let reply = encode_reply(result, &message.subject, max_payload);
        if let Err(error) = self.client.publish(reply_to, reply.into()).await {
            error!(error = %error, "cannot publish nats reply");
        }
        debug!(
            code,
            duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "nats request answered"
        );
    }

    /// Maps a subject to its operation; an unknown one is `not_found`.
    fn operation(&self, subject: &str) -> Result<Operation, Error> {
        subject
            .strip_prefix(&self.prefix)
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(Operation::from_name)
            .ok_or_else(|| Error::RouteNotFound {
                method: "NATS".to_owned(),
                path: subject.to_owned(),
            })
    }

    /// Decodes the request, calls the engine once and encodes the success envelope.
    async fn dispatch(
        &self,
        operation: Result<Operation, Error>,
        payload: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let engine = &self.engine;
        match operation? {
            Operation::Health => ok(api::HealthResponse { healthy: true }),
            Operation::States => ok(engine.states()),
            Operation::Create => ok(engine.create(decode_body(payload)?).await?),
            Operation::List => ok(engine.list()),
            Operation::Get => ok(engine.get(&decode_id(payload)?)?),
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

/// Builds the client options: authentication, TLS, the start-up bound and event logging.
async fn connect_options(options: &NatsOptions) -> Result<ConnectOptions, NatsError> {
    let mut connect = match &options.auth {
        NatsAuth::None => ConnectOptions::new(),
        NatsAuth::Token(token) => ConnectOptions::with_token(token.expose().to_owned()),
        NatsAuth::UserPassword { user, password } => {
            ConnectOptions::with_user_and_password(user.clone(), password.expose().to_owned())
        }
        NatsAuth::CredentialsFile(path) => ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|error| NatsError::CredentialsFile {
                path: path.clone(),
                error,
            })?,
    };
    let tls = &options.tls;
    if let Some(ca_file) = &tls.ca_file {
        connect = connect.add_root_certificates(ca_file.clone());
    }
    if let Some(client) = &tls.client_certificate {
        connect = connect.add_client_certificate(client.certificate.clone(), client.key.clone());
    }
    let tls_required = tls.required || tls.ca_file.is_some() || tls.client_certificate.is_some();
    Ok(connect
        .require_tls(tls_required)
        .connection_timeout(CONNECT_TIMEOUT)
        .name("derrick")
        .event_callback(|event| async move { log_event(&event) }))
}

fn parse_servers(url: &str) -> std::io::Result<Vec<ServerAddr>> {
    url.split(',')
        .map(|server| server.trim().parse::<ServerAddr>())
        .collect()
}

fn connect_hint(error: &ConnectError) -> &'static str {
    match error.kind() {
        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
            "the server refused the credentials; check --nats-token, --nats-user and \
             --nats-password, or --nats-credentials"
        }
        ConnectErrorKind::Tls => {
            "check --nats-tls-ca, --nats-tls-cert and --nats-tls-key against the server's TLS \
             configuration"
        }
        ConnectErrorKind::Dns | ConnectErrorKind::ServerParse => "check the host in --nats-url",
        _ => "check that nats-server runs there and that --nats-url names its client port",
    }
}

fn log_event(event: &Event) {
    match event {
        Event::Connected => info!("nats connected"),
        Event::Disconnected => warn!("nats disconnected; reconnecting"),
        Event::Closed => info!("nats connection closed"),
        other => warn!(event = %other, "nats event"),
    }
}

fn validate_prefix(prefix: &str) -> Result<(), NatsError> {
    let reason = if prefix.is_empty() {
        Some("it is empty")
    } else if prefix.split('.').any(str::is_empty) {
        Some("it has an empty token (a leading, trailing or doubled `.`)")
    } else if prefix
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>')
    {
        Some("it contains whitespace or a wildcard (`*`, `>`)")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(NatsError::InvalidPrefix {
            prefix: prefix.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Encodes the success envelope `{"ok": value}`.
fn ok<T: Serialize>(value: T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(&OkBody { ok: value })
        .map_err(|error| Error::internal("cannot encode the nats reply", error))
}

/// Turns a result into the reply payload, replacing a reply over `max_payload` with
/// `payload_too_large`, because the server would drop it and leave the requester waiting.
fn encode_reply(result: Result<Vec<u8>, Error>, subject: &str, max_payload: usize) -> Vec<u8> {
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
        "{} (the NATS server's max_payload); request less data (a smaller file, a command with \
         less output), raise max_payload in the server's configuration, or use the HTTP \
         transport, which carries files of up to 64 MiB",
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
        let success = encode_reply(ok(api::CommandResponse { exit_code: 0 }), "d.x", 1024);
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

    #[test]
    fn prefix_must_be_a_literal_subject() {
        for valid in ["derrick", "team.derrick", "a-b_c"] {
            assert!(validate_prefix(valid).is_ok(), "{valid}");
        }
        for invalid in ["", ".derrick", "derrick.", "a..b", "a b", "a.*", "a.>"] {
            assert!(
                matches!(
                    validate_prefix(invalid),
                    Err(NatsError::InvalidPrefix { .. })
                ),
                "{invalid}"
            );
        }
    }

    #[test]
    fn urls_lose_their_user_info() {
        let cases = [
            ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
            ("nats://user:pass@host:4222", "nats://***@host:4222"),
            ("tok@host", "***@host"),
            (
                "nats://a:b@one:4222, tls://two:4222",
                "nats://***@one:4222,tls://two:4222",
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(redact_url(url), expected);
        }
    }

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new("s3cret");
        let auth = NatsAuth::UserPassword {
            user: "derrick".to_owned(),
            password: secret.clone(),
        };
        assert!(!format!("{auth:?} {secret}").contains("s3cret"));
        assert_eq!(secret.expose(), "s3cret");
    }
}
