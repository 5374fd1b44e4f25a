//! The HTTP transport: the paths and bodies of the original derrick, over the service core.
//!
//! Handlers extract their inputs, call one service function and convert the result. Every error,
//! including a malformed body and an oversized one, gets the JSON envelope of the wire contract.
//!
//! Invariant: this module decides HTTP statuses and nothing else; it never branches on a
//! workspace's state.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::api::{self, ErrorBody};
use crate::engine::MAX_FILE_BYTES;
use crate::error::Error;
use crate::service::Service;

/// Largest request body: a `write_file` of `MAX_FILE_BYTES` in base64 (4/3 of its size) with
/// line breaks every 76 characters, plus room for the JSON around it.
pub const MAX_REQUEST_BYTES: usize = (MAX_FILE_BYTES as usize / 3 * 4) * 78 / 76 + 64 * 1024;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// The backend: an engine on this machine, or workers reached over NATS.
    pub service: Arc<dyn Service>,
    /// The bearer token every endpoint but `/health` requires; `None` serves without one.
    pub auth_token: Option<Arc<str>>,
}

/// Builds the router; tests drive it with `oneshot` or a listener of their own.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/states", get(states))
        .route("/workspaces", post(create).get(list))
        .route("/workspaces/{id}", get(workspace).delete(destroy))
        .route("/workspaces/{id}/cmd", post(command))
        .route(
            "/workspaces/{id}/cmd_with_output",
            post(command_with_output),
        )
        .route("/workspaces/{id}/write_file", post(write_file))
        .route("/workspaces/{id}/read_file", post(read_file))
        .route("/workspaces/{id}/reset", post(reset))
        .route("/workspaces/{id}/fetch", post(fetch))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .with_state(state)
}

/// Rejects a request without `Authorization: Bearer <token>` when a token is configured.
/// `/health` stays open, so that load balancers and supervisors can probe without a secret.
async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(expected) = &state.auth_token else {
        return next.run(request).await;
    };
    if request.uri().path() == "/health" {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    if presented.is_some_and(|token| tokens_match(token, expected)) {
        return next.run(request).await;
    }
    let mut response = ApiError(Error::Unauthorized).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

/// Compares two tokens in time that does not depend on where they differ: both are hashed, and
/// every byte of the digests is compared.
fn tokens_match(presented: &str, expected: &str) -> bool {
    use sha2::{Digest, Sha256};
    let (presented, expected) = (Sha256::digest(presented), Sha256::digest(expected));
    presented
        .iter()
        .zip(expected.iter())
        .fold(0u8, |difference, (a, b)| difference | (a ^ b))
        == 0
}

/// Serves `router` on `listen` until `shutdown` is cancelled, then lets running requests finish.
///
/// # Errors
/// Fails when the address cannot be bound.
pub async fn serve(
    state: AppState,
    listen: SocketAddr,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let authentication = if state.auth_token.is_some() {
        "bearer token"
    } else {
        "none"
    };
    // The address comes last: test harnesses read the port from the end of this line.
    info!(authentication, address = %listener.local_addr()?, "http server listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// An error in the wire contract's envelope.
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        ApiError(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status_of(&self.0);
        if status.is_server_error() {
            error!(code = self.0.code(), error = %self.0, "request failed");
        }
        (status, Json(ErrorBody::from_error(&self.0))).into_response()
    }
}

/// Returns the HTTP status of an error, decided by its code, so that an error a worker returned
/// gets the same status as the one it stands for.
pub fn status_of(error: &Error) -> StatusCode {
    status_of_code(error.code())
}

/// Returns the HTTP status of an error code of the wire contract; 500 for an unknown one.
pub fn status_of_code(code: &str) -> StatusCode {
    match code {
        "invalid_request" | "invalid_base64" | "path_outside_workspace" => StatusCode::BAD_REQUEST,
        "unauthorized" => StatusCode::UNAUTHORIZED,
        "workspace_not_found" | "file_not_found" | "not_found" => StatusCode::NOT_FOUND,
        "method_not_allowed" => StatusCode::METHOD_NOT_ALLOWED,
        "invalid_transition" => StatusCode::CONFLICT,
        "payload_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "command_failed" | "setup_failed" | "git_failed" => StatusCode::UNPROCESSABLE_ENTITY,
        "workspace_limit_reached" => StatusCode::TOO_MANY_REQUESTS,
        "provider_unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A JSON body whose rejections use the error envelope. An empty body is `T::default()` for the
/// operations whose body is optional (`create`, `fetch`).
pub struct Body<T>(pub T);

impl<T, S> FromRequest<S> for Body<T>
where
    T: DeserializeOwned + BodyDefault,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(body_rejection)?;
        if bytes.iter().all(u8::is_ascii_whitespace)
            && let Some(default) = T::empty_body()
        {
            return Ok(Body(default));
        }
        // serde accepts a JSON array for a struct, field by position; the contract has objects.
        let first = bytes.iter().find(|byte| !byte.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Err(ApiError(Error::invalid_request(
                "the request body must be a JSON object",
            )));
        }
        serde_json::from_slice(&bytes).map(Body).map_err(|error| {
            ApiError(Error::invalid_request(format!(
                "invalid JSON body: {error}"
            )))
        })
    }
}

/// The meaning of an empty body for a request type.
pub trait BodyDefault: Sized {
    /// Returns the value of an empty body, or `None` when a body is required.
    fn empty_body() -> Option<Self> {
        None
    }
}

impl BodyDefault for api::CreateRequest {
    fn empty_body() -> Option<Self> {
        Some(Self::default())
    }
}

impl BodyDefault for api::FetchRequest {
    fn empty_body() -> Option<Self> {
        Some(Self::default())
    }
}

impl BodyDefault for api::CommandRequest {}
impl BodyDefault for api::WriteFileRequest {}
impl BodyDefault for api::ReadFileRequest {}

fn body_rejection(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError(Error::BodyTooLarge {
            limit: MAX_REQUEST_BYTES as u64,
        });
    }
    ApiError(Error::invalid_request(format!(
        "cannot read the request body: {rejection}"
    )))
}

type Reply<T> = Result<T, ApiError>;

async fn health() -> Json<api::HealthResponse> {
    Json(api::HealthResponse { healthy: true })
}

async fn states(State(state): State<AppState>) -> Response {
    Json(state.service.states().clone()).into_response()
}

async fn create(
    State(state): State<AppState>,
    Body(request): Body<api::CreateRequest>,
) -> Reply<Json<api::CreateResponse>> {
    let service = state.service;
    Ok(Json(
        to_completion(async move { service.create(request).await }).await?,
    ))
}

async fn list(State(state): State<AppState>) -> Reply<Json<api::ListResponse>> {
    Ok(Json(state.service.list().await?))
}

async fn workspace(State(state): State<AppState>, Path(id): Path<String>) -> Reply<Response> {
    Ok(Json(state.service.get(&id).await?).into_response())
}

async fn destroy(State(state): State<AppState>, Path(id): Path<String>) -> Reply<Json<bool>> {
    let service = state.service;
    to_completion(async move { service.destroy(&id).await }).await?;
    Ok(Json(true))
}

async fn command(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Body(request): Body<api::CommandRequest>,
) -> Reply<Json<api::CommandResponse>> {
    Ok(Json(state.service.command_checked(&id, request).await?))
}

async fn command_with_output(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Body(request): Body<api::CommandRequest>,
) -> Reply<Json<api::CommandOutput>> {
    Ok(Json(state.service.command(&id, request).await?))
}

async fn write_file(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Body(request): Body<api::WriteFileRequest>,
) -> Reply<Json<api::WriteFileResponse>> {
    let service = state.service;
    Ok(Json(
        to_completion(async move { service.write_file(&id, request).await }).await?,
    ))
}

async fn read_file(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Body(request): Body<api::ReadFileRequest>,
) -> Reply<Response> {
    let bytes = state.service.read_file(&id, request).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

async fn reset(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Reply<Json<api::ResetResponse>> {
    let service = state.service;
    Ok(Json(
        to_completion(async move { service.reset(&id).await }).await?,
    ))
}

async fn fetch(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Body(request): Body<api::FetchRequest>,
) -> Reply<Json<api::FetchResponse>> {
    let service = state.service;
    Ok(Json(
        to_completion(async move { service.fetch(&id, request).await }).await?,
    ))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError(Error::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    })
}

/// Runs a state-changing operation in a task of its own, so that a client that disconnects
/// midway cannot leave a workspace half-created or half-reset by dropping the handler's future.
async fn to_completion<T: Send + 'static>(
    operation: impl Future<Output = Result<T, Error>> + Send + 'static,
) -> Reply<T> {
    tokio::spawn(operation)
        .await
        .map_err(Error::from)?
        .map_err(ApiError)
}

async fn not_found(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError(Error::RouteNotFound {
        method: method.to_string(),
        path: uri.path().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(tokens_match("secret", "secret"));
        assert!(!tokens_match("secret", "secreT"));
        assert!(!tokens_match("", "secret"));
        assert!(!tokens_match("secret-and-more", "secret"));
    }

    #[test]
    fn request_limit_fits_largest_file() {
        let encoded = (MAX_FILE_BYTES as usize).div_ceil(3) * 4;
        assert!(MAX_REQUEST_BYTES > encoded + encoded / 76 * 2);
    }

    #[test]
    fn every_code_has_its_status() {
        let cases = [
            (Error::invalid_request("x"), 400),
            (
                Error::PathOutsideWorkspace {
                    path: "..".to_owned(),
                },
                400,
            ),
            (Error::WorkspaceNotFound { id: "x".to_owned() }, 404),
            (
                Error::PayloadTooLarge {
                    what: "x".to_owned(),
                    size: 2,
                    limit: 1,
                },
                413,
            ),
            (
                Error::GitFailed {
                    step: "fetch",
                    url: "u".to_owned(),
                    reason: "r".to_owned(),
                },
                422,
            ),
            (Error::WorkspaceLimitReached { limit: 1 }, 429),
            (Error::ProviderUnavailable("x".to_owned()), 503),
            (Error::Internal("x".to_owned()), 500),
            (
                Error::Forwarded {
                    code: "file_not_found",
                    message: "x".to_owned(),
                },
                404,
            ),
        ];
        for (error, status) in cases {
            assert_eq!(status_of(&error).as_u16(), status, "{}", error.code());
        }
    }
}
