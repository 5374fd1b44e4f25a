//! Connecting to NATS: the server URL, authentication, TLS and the start-up bound, shared by the
//! NATS transport, the worker and the `remote_nats` provider.
//!
//! Invariant: no credential reaches a log line or an error. URLs are shown without user info and
//! secrets are held in `Secret`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use async_nats::{Client, ConnectError, ConnectErrorKind, ConnectOptions, Event, ServerAddr};
use tracing::{info, warn};

/// Default server: a NATS server on this machine, on NATS's standard port.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// Default first token of every subject.
pub const DEFAULT_SUBJECT_PREFIX: &str = "derrick";

/// Bound on connecting at start-up. Ten seconds covers a TLS handshake with a distant server, and
/// a server that has not responded by then is reported instead of retried forever.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of a NATS connection, and the prefix of every subject.
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

    /// Another process already serves the subjects of this worker id.
    #[error(
        "worker id `{id}` is already in use: {reason}; give each worker its own --worker-id, or \
         stop the other worker first"
    )]
    WorkerIdInUse { id: String, reason: String },

    /// The subscription ended while derrick was serving, so no request can reach it.
    #[error("the NATS subscription to `{subject}` closed; restart derrick")]
    SubscriptionClosed { subject: String },
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
    // Requests have no client-side deadline: the `remote_nats` provider bounds its waits by the
    // worker's heartbeat instead, because a command may run for as long as its `timeout` allows.
    Ok(connect
        .request_timeout(None)
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
    // async-nats reports a rejected certificate during the handshake as an IO error.
    let lowercase = error.to_string().to_lowercase();
    if lowercase.contains("certificate") || lowercase.contains("tls") {
        return "check --nats-tls-ca, --nats-tls-cert and --nats-tls-key against the server's TLS \
                configuration";
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
