//! A loopback HTTP/1.1 server that runs `git http-backend` as a CGI program.
//!
//! It serves every repository under one project root on `127.0.0.1`, optionally behind Basic
//! authentication. It records the number of requests, the number that carried an
//! `Authorization` header, and every request line and header except `Authorization`, so tests
//! can prove that a secret never travelled in a URL.
//!
//! The server runs on plain threads (one accept loop, one thread per connection), so it works
//! the same under `#[test]` and under any Tokio runtime flavor. It serves one request per
//! connection and then closes it (`Connection: close`). Git and libgit2 both reconnect as
//! needed, so the server never has to keep an idle connection alive.
//!
//! Invariant: only loopback clients are served, and the server never reaches the network.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

/// The realm of the Basic authentication challenge that a `401` response carries.
pub const REALM: &str = "derrick-test";

/// How long a connection may wait for the next bytes of a request before it is dropped.
///
/// Git and libgit2 send a request without pauses. The bound only stops a stalled client from
/// keeping a connection thread alive for the rest of the test run.
const CLIENT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The maximum size of a request line plus headers. Git's request heads take a few hundred bytes.
const MAX_HEAD_BYTES: u64 = 64 * 1024;

/// The maximum size of a decoded request body, far above any push of a test repository.
const MAX_BODY_BYTES: usize = 1024 * 1024 * 1024;

/// A running Git smart HTTP server on a free loopback port; it stops when dropped.
pub struct GitHttpServer {
    address: SocketAddr,
    state: Arc<ServerState>,
    accept_thread: Option<JoinHandle<()>>,
}

impl GitHttpServer {
    /// Starts serving the bare repositories under `project_root`.
    ///
    /// With `credentials` set to `Some((user, password))`, every request without a matching
    /// `Authorization: Basic` header gets `401` with `WWW-Authenticate: Basic
    /// realm="derrick-test"`; without, all requests are served anonymously.
    ///
    /// # Panics
    ///
    /// Panics when no loopback port can be bound or `git --exec-path` fails.
    pub fn start(project_root: &Path, credentials: Option<(&str, &str)>) -> GitHttpServer {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback port");
        let address = listener
            .local_addr()
            .expect("a bound listener has a local address");
        let state = Arc::new(ServerState {
            project_root: project_root.to_owned(),
            backend: http_backend_path(),
            credentials: Mutex::new(credentials.map(to_user_password)),
            stopping: AtomicBool::new(false),
            requests: AtomicUsize::new(0),
            auth_attempts: AtomicUsize::new(0),
            transcript: Mutex::new(Vec::new()),
        });

        let accept_state = Arc::clone(&state);
        let accept_thread = thread::Builder::new()
            .name("git-http-server".to_owned())
            .spawn(move || accept_connections(&listener, &accept_state))
            .expect("spawn the accept thread of the Git HTTP server");
        GitHttpServer {
            address,
            state,
            accept_thread: Some(accept_thread),
        }
    }

    /// Returns `http://127.0.0.1:PORT/<repository>`, for example `server.url(bare.name())`.
    pub fn url(&self, repository: &str) -> String {
        format!("http://{}/{repository}", self.address)
    }

    /// Returns the address the server listens on, for tests that speak HTTP directly.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Returns the number of requests received so far, whatever their outcome.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Returns the number of requests received so far that carried an `Authorization` header.
    pub fn auth_attempts(&self) -> usize {
        self.state.auth_attempts.load(Ordering::SeqCst)
    }

    /// Returns whether `needle` occurred in any request line or header other than
    /// `Authorization` (header names included).
    pub fn saw(&self, needle: &str) -> bool {
        lock(&self.state.transcript)
            .iter()
            .any(|line| line.contains(needle))
    }

    /// Returns every request line and header received, in order, except `Authorization`.
    pub fn transcript(&self) -> Vec<String> {
        lock(&self.state.transcript).clone()
    }

    /// Returns the request lines received, in order (`GET /repo.git/info/refs?... HTTP/1.1`).
    pub fn request_lines(&self) -> Vec<String> {
        lock(&self.state.transcript)
            .iter()
            .filter(|line| line.ends_with(" HTTP/1.1") || line.ends_with(" HTTP/1.0"))
            .cloned()
            .collect()
    }

    /// Replaces the accepted credentials, for example to rotate a token between two fetches;
    /// `None` makes the server anonymous.
    pub fn set_credentials(&self, credentials: Option<(&str, &str)>) {
        *lock(&self.state.credentials) = credentials.map(to_user_password);
    }
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        self.state.stopping.store(true, Ordering::SeqCst);

        // The accept loop blocks in `accept`; a connection of our own wakes it up to see the
        // flag. If the connection fails the listener is already gone and the loop has ended.
        let _wake = TcpStream::connect(self.address);
        if let Some(accept_thread) = self.accept_thread.take() {
            // A panic in the accept loop must not become a second panic inside `drop`.
            let _ = accept_thread.join();
        }
    }
}

/// What the accept loop and the connection threads share.
struct ServerState {
    project_root: PathBuf,
    backend: PathBuf,
    /// The accepted `user:password`, compared with the decoded `Authorization: Basic` value.
    credentials: Mutex<Option<String>>,
    stopping: AtomicBool,
    requests: AtomicUsize,
    auth_attempts: AtomicUsize,
    transcript: Mutex<Vec<String>>,
}

/// A parsed request line and its headers.
struct RequestHead {
    method: String,
    target: String,
    line: String,
    headers: Vec<(String, String)>,
}

/// The identity a request is served under, decided by its `Authorization` header.
enum Access {
    Anonymous,
    User(String),
    Denied,
}

/// A complete HTTP response, sent with `Content-Length` and `Connection: close`.
struct Response {
    status: u16,
    reason: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl ServerState {
    fn record(&self, head: &RequestHead) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if head.header("authorization").is_some() {
            self.auth_attempts.fetch_add(1, Ordering::SeqCst);
        }

        let mut transcript = lock(&self.transcript);
        transcript.push(head.line.clone());
        let visible = head
            .headers
            .iter()
            .filter(|(name, _)| !name.eq_ignore_ascii_case("authorization"));
        transcript.extend(visible.map(|(name, value)| format!("{name}: {value}")));
    }

    fn access(&self, head: &RequestHead) -> Access {
        let Some(expected) = lock(&self.credentials).clone() else {
            return Access::Anonymous;
        };
        let Some(presented) = head.header("authorization").and_then(decode_basic) else {
            return Access::Denied;
        };
        if presented != expected {
            return Access::Denied;
        }

        let user = presented.split_once(':').map_or("", |(user, _)| user);
        Access::User(user.to_owned())
    }
}

impl RequestHead {
    /// Returns the value of the first header called `name`, compared case-insensitively.
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header, _)| header.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn is_chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|value| value.to_ascii_lowercase().contains("chunked"))
    }

    fn has_body(&self) -> bool {
        self.is_chunked() || self.header("content-length").is_some()
    }

    fn expects_continue(&self) -> bool {
        self.header("expect")
            .is_some_and(|value| value.eq_ignore_ascii_case("100-continue"))
    }
}

impl Response {
    fn new(status: u16, reason: &str) -> Response {
        Response {
            status,
            reason: reason.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    fn text(status: u16, reason: &str, body: &str) -> Response {
        let mut response = Response::new(status, reason);
        response
            .headers
            .push(("Content-Type".to_owned(), "text/plain".to_owned()));
        response.body = body.as_bytes().to_vec();
        response
    }

    fn unauthorized() -> Response {
        let mut response = Response::text(401, "Unauthorized", "authentication required\n");
        let challenge = format!("Basic realm=\"{REALM}\"");
        response
            .headers
            .push(("WWW-Authenticate".to_owned(), challenge));
        response
    }

    fn write_to(&self, stream: &mut impl Write) -> io::Result<()> {
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, self.reason);
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        head.push_str("Connection: close\r\n\r\n");

        stream.write_all(head.as_bytes())?;
        stream.write_all(&self.body)?;
        stream.flush()
    }
}

/// Accepts connections until the server stops, then closes and joins the open ones.
fn accept_connections(listener: &TcpListener, state: &Arc<ServerState>) {
    let mut connections: Vec<(TcpStream, JoinHandle<()>)> = Vec::new();
    for stream in listener.incoming() {
        if state.stopping.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let Ok(control) = stream.try_clone() else {
            continue;
        };

        connections.retain(|(_, handle)| !handle.is_finished());
        let connection_state = Arc::clone(state);
        let spawned = thread::Builder::new()
            .name("git-http-connection".to_owned())
            .spawn(move || serve_connection(stream, &connection_state));
        if let Ok(handle) = spawned {
            connections.push((control, handle));
        }
    }

    for (control, handle) in connections {
        // Shutting the socket down wakes a thread blocked on a read; the peer may have closed
        // it already, which is just as good.
        let _ = control.shutdown(Shutdown::Both);
        let _ = handle.join();
    }
}

/// Serves one request on `stream` and closes it.
fn serve_connection(stream: TcpStream, state: &ServerState) {
    // A failure here means that the client went away or broke the protocol. The client gets
    // the failure itself, and no other caller needs to know.
    let _ = try_serve_connection(stream, state);
}

fn try_serve_connection(mut stream: TcpStream, state: &ServerState) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_READ_TIMEOUT))?;
    let peer = stream.peer_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);

    let head = match read_head(&mut reader) {
        Ok(Some(head)) => head,
        Ok(None) => return Ok(()),
        Err(error) if error.kind() == io::ErrorKind::InvalidData => {
            let response = Response::text(400, "Bad Request", &format!("{error}\n"));
            return response.write_to(&mut stream);
        }
        Err(error) => return Err(error),
    };
    state.record(&head);

    let response = respond(&head, &mut reader, &mut stream, state, peer)?;
    response.write_to(&mut stream)?;
    stream.shutdown(Shutdown::Write)
}

/// Authenticates the request, reads its body and runs the backend on it.
fn respond(
    head: &RequestHead,
    reader: &mut impl BufRead,
    stream: &mut TcpStream,
    state: &ServerState,
    peer: SocketAddr,
) -> io::Result<Response> {
    let access = state.access(head);
    if matches!(access, Access::Denied) {
        // A client that waits for `100 Continue` has not sent its body. Any other client has,
        // and closing with unread bytes would reset the connection before it reads the 401.
        if !head.expects_continue() {
            read_body(head, reader)?;
        }
        return Ok(Response::unauthorized());
    }

    if head.expects_continue() {
        stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let body = match read_body(head, reader) {
        Ok(body) => body,
        Err(error) if error.kind() == io::ErrorKind::InvalidData => {
            return Ok(Response::text(400, "Bad Request", &format!("{error}\n")));
        }
        Err(error) => return Err(error),
    };

    let user = match access {
        Access::User(user) => Some(user),
        Access::Anonymous | Access::Denied => None,
    };
    run_backend(state, head, body, peer, user.as_deref())
}

/// Reads the request line and headers; `None` when the client closed before sending anything.
fn read_head(reader: &mut impl BufRead) -> io::Result<Option<RequestHead>> {
    let mut limited = reader.by_ref().take(MAX_HEAD_BYTES);
    let Some(line) = read_line(&mut limited)? else {
        return Ok(None);
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid_data(format!("malformed request line {line:?}")));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(invalid_data(format!(
            "unsupported protocol version {version:?}"
        )));
    }

    let mut head = RequestHead {
        method: method.to_owned(),
        target: target.to_owned(),
        line: line.clone(),
        headers: Vec::new(),
    };
    loop {
        let header = read_line(&mut limited)?
            .ok_or_else(|| invalid_data("request head ends before its blank line".to_owned()))?;
        if header.is_empty() {
            return Ok(Some(head));
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(invalid_data(format!("malformed header line {header:?}")));
        };
        head.headers
            .push((name.trim().to_owned(), value.trim().to_owned()));
    }
}

/// Reads the body that the head announces, decoding chunked transfer encoding.
fn read_body(head: &RequestHead, reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    if head.is_chunked() {
        return read_chunked_body(reader);
    }
    let Some(length) = head.header("content-length") else {
        return Ok(Vec::new());
    };

    let length: usize = length
        .parse()
        .map_err(|_| invalid_data(format!("malformed Content-Length {length:?}")))?;
    if length > MAX_BODY_BYTES {
        return Err(invalid_data(format!(
            "request body of {length} bytes is too large"
        )));
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(body)
}

/// Decodes a `Transfer-Encoding: chunked` body (RFC 9112, section 7.1), discarding trailers.
fn read_chunked_body(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let size_line = read_line(&mut reader.by_ref().take(MAX_HEAD_BYTES))?
            .ok_or_else(|| invalid_data("chunked body ends before its last chunk".to_owned()))?;
        let size_field = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_field, 16)
            .map_err(|_| invalid_data(format!("malformed chunk size {size_line:?}")))?;
        if size == 0 {
            return skip_trailers(reader).map(|()| body);
        }
        if body.len() + size > MAX_BODY_BYTES {
            return Err(invalid_data("chunked request body is too large".to_owned()));
        }

        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        let terminator = read_line(&mut reader.by_ref().take(2))?;
        if terminator.as_deref() != Some("") {
            return Err(invalid_data(
                "chunk data is not followed by CRLF".to_owned(),
            ));
        }
    }
}

fn skip_trailers(reader: &mut impl BufRead) -> io::Result<()> {
    let mut limited = reader.by_ref().take(MAX_HEAD_BYTES);
    loop {
        let trailer = read_line(&mut limited)?
            .ok_or_else(|| invalid_data("chunked body ends inside its trailers".to_owned()))?;
        if trailer.is_empty() {
            return Ok(());
        }
    }
}

/// Runs `git http-backend` for one request and converts its CGI output into a response.
fn run_backend(
    state: &ServerState,
    head: &RequestHead,
    body: Vec<u8>,
    peer: SocketAddr,
    user: Option<&str>,
) -> io::Result<Response> {
    let mut command = backend_command(state, head, peer, user);
    if head.has_body() {
        command.env("CONTENT_LENGTH", body.len().to_string());
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;

    // The body is written from another thread, so a backend that responds before it has read
    // all of its input cannot deadlock against this thread.
    let mut stdin = child.stdin.take().expect("the backend's stdin is piped");
    let feeder = thread::spawn(move || stdin.write_all(&body));
    let output = child.wait_with_output()?;
    // The backend may exit without reading its input, after reporting an error in its output.
    // The broken pipe that the feeder then gets is not a failure of the request.
    let _ = feeder.join();

    match parse_cgi_output(&output.stdout) {
        Some(response) => Ok(response),
        None => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let message = format!(
                "git http-backend gave no CGI response ({}): {stderr}",
                output.status
            );
            Ok(Response::text(502, "Bad Gateway", &message))
        }
    }
}

/// Builds the backend command with the CGI environment of one request (RFC 3875, section 4.1).
fn backend_command(
    state: &ServerState,
    head: &RequestHead,
    peer: SocketAddr,
    user: Option<&str>,
) -> Command {
    let (path, query) = head.target.split_once('?').unwrap_or((&head.target, ""));
    let mut command = Command::new(&state.backend);
    command.env_clear();
    if let Some(search_path) = std::env::var_os("PATH") {
        command.env("PATH", search_path);
    }

    command
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_PROJECT_ROOT", &state.project_root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("SERVER_SOFTWARE", "derrick-test-git-server")
        .env("REQUEST_METHOD", &head.method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("REMOTE_ADDR", peer.ip().to_string());
    if let Some(user) = user {
        command.env("REMOTE_USER", user).env("AUTH_TYPE", "Basic");
    }

    let forwarded = [
        ("content-type", "CONTENT_TYPE"),
        ("content-encoding", "HTTP_CONTENT_ENCODING"),
        ("git-protocol", "HTTP_GIT_PROTOCOL"),
    ];
    for (header, variable) in forwarded {
        if let Some(value) = head.header(header) {
            command.env(variable, value);
        }
    }
    command
}

/// Splits CGI output into a response: a `Status:` header sets the status (200 without one),
/// and the other headers pass through except those that framing on this side decides.
fn parse_cgi_output(output: &[u8]) -> Option<Response> {
    let mut response = Response::new(200, "OK");
    let mut position = 0;
    loop {
        let end = position + output[position..].iter().position(|&byte| byte == b'\n')?;
        let line = std::str::from_utf8(&output[position..end]).ok()?;
        let line = line.strip_suffix('\r').unwrap_or(line);
        position = end + 1;
        if line.is_empty() {
            break;
        }

        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let (code, reason) = value.split_once(' ').unwrap_or((value, ""));
            response.status = code.parse().ok()?;
            response.reason = reason.to_owned();
        } else if !is_framing_header(name) {
            response.headers.push((name.to_owned(), value.to_owned()));
        }
    }

    response.body = output[position..].to_vec();
    Some(response)
}

fn is_framing_header(name: &str) -> bool {
    ["content-length", "transfer-encoding", "connection"]
        .iter()
        .any(|framing| name.eq_ignore_ascii_case(framing))
}

/// Reads one line ending in LF (CRLF accepted) without its terminator; `None` at end of input.
fn read_line(reader: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut bytes = Vec::new();
    if reader.read_until(b'\n', &mut bytes)? == 0 {
        return Ok(None);
    }
    if bytes.pop() != Some(b'\n') {
        return Err(invalid_data(
            "line is too long or not terminated".to_owned(),
        ));
    }
    if bytes.last() == Some(&b'\r') {
        bytes.pop();
    }

    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| invalid_data("line is not UTF-8".to_owned()))
}

/// Decodes `Basic <base64 of user:password>` into `user:password`.
fn decode_basic(authorization: &str) -> Option<String> {
    let (scheme, encoded) = authorization.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = BASE64.decode(encoded.trim()).ok()?;
    String::from_utf8(decoded).ok()
}

fn to_user_password((user, password): (&str, &str)) -> String {
    format!("{user}:{password}")
}

/// Finds `git-http-backend` in Git's exec path (`git --exec-path`).
fn http_backend_path() -> PathBuf {
    let output = Command::new("git")
        .arg("--exec-path")
        .output()
        .expect("run `git --exec-path` (is git on PATH?)");
    assert!(output.status.success(), "`git --exec-path` failed");
    let exec_path = String::from_utf8(output.stdout).expect("git prints its exec path in UTF-8");

    let backend = Path::new(exec_path.trim_end()).join("git-http-backend");
    assert!(
        backend.is_file(),
        "git-http-backend is missing at {}",
        backend.display()
    );
    backend
}

/// Locks `mutex`, ignoring poisoning: a panicking connection thread leaves the counters and
/// transcript consistent, because each update is a single push or assignment.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn invalid_data(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}
