//! `derrick worker`: serves the operations of one engine to `remote_nats` controllers, on the
//! worker subjects of `api::worker`, and publishes a heartbeat every `HEARTBEAT_INTERVAL`.
//!
//! The worker takes creates from a queue group shared with the other workers, and owns the
//! workspaces it creates. Later operations on them arrive on subjects that carry its id, so it
//! does not start when a live worker already replies on them. Its engine fills its own Git
//! mirrors, so repository credentials stay on the worker's machine.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, RequestErrorKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{FLUSH_TIMEOUT, Role, Server, flush, subscribe};
use crate::api::Operation;
use crate::api::worker::{self, Heartbeat};
use crate::nats_client::{NatsError, NatsOptions, connect, redact_url};
use crate::service::Service;

pub use crate::api::worker::HEARTBEAT_INTERVAL;

/// How long the start-up check of the worker id waits for a worker that already uses it. A live
/// worker replies to `health` from memory within milliseconds, and the NATS server replies "no
/// responders" at once when nothing subscribes, so only a stuck holder of the id takes this long.
const ID_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The content of a worker's heartbeat to controllers.
#[derive(Debug, Clone)]
pub struct WorkerIdentity {
    /// A subject token that is unique among the workers of one prefix.
    pub id: String,
    /// Name of the workspace configuration the worker serves.
    pub config: String,
    /// Provider kind, such as `local/overlay`.
    pub provider: String,
}

impl WorkerIdentity {
    /// Generates a random worker id: `worker-` and 12 hexadecimal digits.
    pub fn generate_id() -> String {
        let random = uuid::Uuid::new_v4().simple().to_string();
        format!("worker-{}", &random[..12])
    }
}

/// Connects to NATS and serves the worker subjects until `shutdown` is cancelled, then stops
/// taking requests, lets running ones finish for up to `SHUTDOWN_GRACE` and sends a last
/// heartbeat that announces the stop.
///
/// # Errors
/// As `serve`: invalid options, a failed connection or subscription, or a subscription that
/// closes while serving.
pub async fn serve_worker(
    service: Arc<dyn Service>,
    options: NatsOptions,
    identity: WorkerIdentity,
    shutdown: CancellationToken,
) -> Result<(), NatsError> {
    options.validate()?;
    let prefix = options.subject_prefix.clone();
    if !worker::is_valid_id(&identity.id) {
        return Err(NatsError::Subscribe {
            subject: worker::owned_subjects(&prefix, &identity.id),
            reason: "the worker id must be one subject token of letters, digits, `-` and `_`"
                .to_owned(),
        });
    }
    let client = connect(&options).await?;
    check_id_unused(&client, &prefix, &identity.id).await?;
    let create = worker::create_subject(&prefix);
    let list = worker::list_subject(&prefix);
    let owned = worker::owned_subjects(&prefix, &identity.id);
    let subscribers = vec![
        subscribe(&client, &create, Some(worker::QUEUE_GROUP)).await?,
        subscribe(&client, &list, None).await?,
        subscribe(&client, &owned, None).await?,
    ];
    flush(&client, &owned).await?;

    let stop_heartbeats = CancellationToken::new();
    let heartbeats = tokio::spawn(send_heartbeats(
        client.clone(),
        worker::heartbeat_subject(&prefix),
        identity.clone(),
        stop_heartbeats.clone(),
    ));
    info!(
        url = %redact_url(&options.url),
        worker = %identity.id,
        subject = %worker::namespace(&prefix),
        max_payload = client.server_info().max_payload,
        "serving nats requests as a worker"
    );

    let server = Arc::new(Server {
        service,
        client,
        prefix,
        role: Role::Worker {
            id: identity.id.clone(),
        },
    });
    let subjects = format!("{create}, {list} and {owned}");
    let served = server.run(subscribers, &subjects, shutdown).await;
    stop_heartbeats.cancel();
    if let Err(error) = heartbeats.await {
        error!(error = %error, "heartbeat task failed");
    }
    served
}

/// Fails when another process already serves the subjects of worker `id`, so that a second worker
/// with the same id cannot take over the first one's workspace subjects. It sends `health` to
/// the id's own subject, and the NATS server replies "no responders" when the id is free.
///
/// NOTE: two workers that start with the same id at the same moment can both pass this check.
async fn check_id_unused(client: &Client, prefix: &str, id: &str) -> Result<(), NatsError> {
    let subject = worker::operation_subject(prefix, id, Operation::Health);
    let request = client.request(subject.clone(), Vec::new().into());
    let reason = match tokio::time::timeout(ID_CHECK_TIMEOUT, request).await {
        Err(_elapsed) => format!(
            "a subscriber of `{subject}` did not answer within {} s (a stuck worker, or the \
             connection of one that died and that the NATS server has not closed yet)",
            ID_CHECK_TIMEOUT.as_secs()
        ),
        Ok(Err(error)) if error.kind() == RequestErrorKind::NoResponders => return Ok(()),
        Ok(Err(error)) => format!("the request to `{subject}` failed: {error}"),
        Ok(Ok(_reply)) => format!("a live worker answered on `{subject}`"),
    };
    Err(NatsError::WorkerIdInUse {
        id: id.to_owned(),
        reason,
    })
}

/// Publishes a heartbeat every `HEARTBEAT_INTERVAL` until `stop`, then one with `stopping`, so
/// that controllers fail requests for this worker's workspaces at once instead of after the
/// silence bound.
async fn send_heartbeats(
    client: Client,
    subject: String,
    identity: WorkerIdentity,
    stop: CancellationToken,
) {
    let mut heartbeat = Heartbeat {
        worker: identity.id,
        config: identity.config,
        provider: identity.provider,
        stopping: false,
    };
    let mut interval = tokio::time::interval(HEARTBEAT_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = interval.tick() => publish(&client, &subject, &heartbeat).await,
        }
    }
    heartbeat.stopping = true;
    publish(&client, &subject, &heartbeat).await;
    // A flush waits for the connection, so without a bound a worker stopped while NATS is down
    // would never exit.
    match tokio::time::timeout(FLUSH_TIMEOUT, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => warn!(error = %error, "cannot flush the last heartbeat"),
        Err(_elapsed) => warn!("flushing the last heartbeat timed out; NATS is unreachable"),
    }
}

async fn publish(client: &Client, subject: &str, heartbeat: &Heartbeat) {
    let payload = serde_json::to_vec(heartbeat).expect("a heartbeat encodes as JSON");
    if let Err(error) = client.publish(subject.to_owned(), payload.into()).await {
        warn!(error = %error, "cannot publish heartbeat");
    }
}
