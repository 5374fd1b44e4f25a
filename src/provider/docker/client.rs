//! The connection to the Docker engine and the mapping of its failures onto derrick's errors.
//!
//! Every call goes through [`bounded`], so an engine that accepts a connection and then stays
//! silent becomes `provider_unavailable` instead of a hang. A refused connection, a missing
//! socket or a timeout is `provider_unavailable`; a reply with an error status is `internal`,
//! except where a caller checks [`is_not_found`] first.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as BollardError;

use crate::error::Error;

/// Bound on one API call that does not wait for a container's work (inspect, create, rename,
/// stat, a small upload). The engine replies to these in milliseconds, and 30 s leaves room for a
/// loaded machine and still turns a stuck engine into an error well before a client gives up.
pub(super) const API_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound on a commit, an archive transfer or a start: their time grows with the data involved.
/// Ten minutes covers a commit of several GiB (an estimate, not a measurement).
pub(super) const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);

/// Bound on pulling a missing base image from its registry.
pub(super) const PULL_TIMEOUT: Duration = Duration::from_secs(600);

/// The library-level timeout of bollard, set above every bound of this module so that ours
/// decide; bollard applies it to the wait for response headers only.
const LIBRARY_TIMEOUT_SECONDS: u64 = 3600;

/// Connects through the standard settings (`DOCKER_HOST`, or the local socket) and agrees on an
/// API version with the engine.
///
/// # Errors
/// `provider_unavailable` naming the address when the engine cannot be reached.
pub(super) async fn connect() -> Result<Docker, Error> {
    let host =
        std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
    let unavailable = |reason: &dyn fmt::Display| {
        Error::ProviderUnavailable(format!(
            "cannot reach the docker engine at {host}: {reason}; start dockerd or point \
             DOCKER_HOST at a running engine"
        ))
    };
    let docker = Docker::connect_with_defaults()
        .map_err(|error| unavailable(&error))?
        .with_timeout(Duration::from_secs(LIBRARY_TIMEOUT_SECONDS));
    let negotiated = tokio::time::timeout(API_TIMEOUT, docker.negotiate_version())
        .await
        .map_err(|_| unavailable(&format!("no answer within {} s", API_TIMEOUT.as_secs())))?;
    negotiated.map_err(|error| unavailable(&error))
}

/// Runs one API call with a time bound; `op` and `target` name it in errors ("commit",
/// "container derrick-ws-…").
pub(super) async fn bounded<T>(
    op: &str,
    target: &str,
    limit: Duration,
    call: impl Future<Output = Result<T, BollardError>>,
) -> Result<T, Error> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result.map_err(|error| failed(op, target, error)),
        Err(_) => Err(Error::ProviderUnavailable(format!(
            "the docker engine did not finish `{op}` on {target} within {} s; check that \
             dockerd is responsive",
            limit.as_secs()
        ))),
    }
}

/// Like [`bounded`], but returns `None` for a 404 reply (no such container, image, file or
/// exec).
pub(super) async fn bounded_optional<T>(
    op: &str,
    target: &str,
    limit: Duration,
    call: impl Future<Output = Result<T, BollardError>>,
) -> Result<Option<T>, Error> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(value)) => Ok(Some(value)),
        Ok(Err(error)) if is_not_found(&error) => Ok(None),
        Ok(Err(error)) => Err(failed(op, target, error)),
        Err(_) => Err(Error::ProviderUnavailable(format!(
            "the docker engine did not finish `{op}` on {target} within {} s; check that \
             dockerd is responsive",
            limit.as_secs()
        ))),
    }
}

/// Tells whether the engine answered 404.
pub(super) fn is_not_found(error: &BollardError) -> bool {
    matches!(
        error,
        BollardError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Maps a failed call: transport failures mean the engine is gone (`provider_unavailable`), an
/// error answer is `internal` with the engine's message for the log.
pub(super) fn failed(op: &str, target: &str, error: BollardError) -> Error {
    match error {
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => Error::Internal(format!(
            "docker `{op}` on {target} failed with status {status_code}: {message}"
        )),
        BollardError::IOError { .. }
        | BollardError::HyperResponseError { .. }
        | BollardError::HyperLegacyError { .. }
        | BollardError::SocketNotFoundError(_)
        | BollardError::RequestTimeoutError => Error::ProviderUnavailable(format!(
            "cannot reach the docker engine for `{op}` on {target}: {error}; check that dockerd \
             runs and DOCKER_HOST points at it"
        )),
        other => Error::Internal(format!("docker `{op}` on {target} failed: {other}")),
    }
}
