//! A real `nats-server` per test on a loopback port that the server picks itself, with an
//! optional token, user, maximum payload and TLS, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long `nats-server` may take to accept connections.
const START_DEADLINE: Duration = Duration::from_secs(10);

/// Settings of a test server.
#[derive(Debug, Clone, Default)]
pub struct NatsServerOptions {
    /// Token that clients must send (`--auth`).
    pub token: Option<String>,
    /// User name and password that clients must send (`--user`, `--pass`).
    pub user: Option<(String, String)>,
    /// Largest message the server accepts, in bytes (its default is 1 MiB).
    pub max_payload: Option<usize>,
    /// Serve TLS only, with certificates from a CA of the test's own, and require a client
    /// certificate from that CA.
    pub tls: bool,
}

/// The PEM files of a TLS server's test CA and of a client certificate that it accepts.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub client_certificate: PathBuf,
    pub client_key: PathBuf,
}

/// A running `nats-server` and its folder (configuration, log, ports file).
pub struct NatsServer {
    child: Child,
    port: u16,
    token: Option<String>,
    user: Option<(String, String)>,
    tls: Option<TlsFiles>,
    folder: TempDir,
}

impl NatsServer {
    /// Starts a server without authentication and with the default maximum payload.
    pub fn start() -> NatsServer {
        Self::start_with(NatsServerOptions::default())
    }

    /// Starts a server and waits until it accepts connections.
    ///
    /// The server binds port `-1` (a free port of its choice) and writes the port to a ports
    /// file, so two tests never race for one port.
    pub fn start_with(options: NatsServerOptions) -> NatsServer {
        let folder = tempfile::tempdir().expect("temporary folder");
        let config_path = folder.path().join("nats.conf");
        let mut config = match options.max_payload {
            Some(bytes) => format!("max_payload: {bytes}\n"),
            None => String::new(),
        };
        let tls = options.tls.then(|| {
            let files = make_certificates(folder.path());
            config.push_str(&format!(
                "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n}}\n",
                folder.path().join("server.pem").display(),
                folder.path().join("server.key").display(),
                files.ca.display(),
            ));
            files
        });
        std::fs::write(&config_path, config).expect("write nats.conf");

        let mut command = Command::new(binary());
        command
            .args(["-a", "127.0.0.1", "-p", "-1", "-c"])
            .arg(&config_path)
            .arg("--ports_file_dir")
            .arg(folder.path())
            .arg("-l")
            .arg(folder.path().join("nats.log"));
        if let Some(token) = &options.token {
            command.args(["--auth", token]);
        }
        if let Some((user, password)) = &options.user {
            command.args(["--user", user, "--pass", password]);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = match command.spawn() {
            Ok(child) => child,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => panic!(
                "`nats-server` is not installed; the NATS tests need it: \
                 apt-get install -y nats-server"
            ),
            Err(error) => panic!("cannot start nats-server: {error}"),
        };
        let mut server = NatsServer {
            child,
            port: 0,
            token: options.token,
            user: options.user,
            tls,
            folder,
        };
        server.port = server.wait_for_port();
        server
    }

    /// Returns the client URL (`nats://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Returns the certificate files of a TLS server.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// Returns the token clients must send, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Returns what the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Connects a client with the server's credentials and no request timeout of its own;
    /// callers bound their waits themselves.
    pub async fn client(&self) -> async_nats::Client {
        let mut options = async_nats::ConnectOptions::new().request_timeout(None);
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let Some((user, password)) = &self.user {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(tls) = &self.tls {
            options = options
                .require_tls(true)
                .add_root_certificates(tls.ca.clone())
                .add_client_certificate(tls.client_certificate.clone(), tls.client_key.clone());
        }
        options
            .connect(self.url())
            .await
            .unwrap_or_else(|error| panic!("cannot connect to {}: {error}", self.url()))
    }

    /// Kills the server with SIGKILL, as an outage would, and waits for it to exit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_path(&self) -> PathBuf {
        self.folder.path().join("nats.log")
    }

    /// Polls for the ports file, then for a TCP connection, until `START_DEADLINE`.
    fn wait_for_port(&mut self) -> u16 {
        let ports_file = self
            .folder
            .path()
            .join(format!("nats-server_{}.ports", self.child.id()));
        let deadline = Instant::now() + START_DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("nats-server exited with {status}; log:\n{}", self.log());
            }
            let port = std::fs::read_to_string(&ports_file)
                .ok()
                .and_then(|text| client_port(&text));
            if let Some(port) = port
                && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                return port;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "nats-server did not accept connections within {START_DEADLINE:?}; log:\n{}",
            self.log()
        );
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates a CA, a server certificate for 127.0.0.1 and a client certificate in `folder` with
/// the `openssl` CLI, and returns the files a client needs.
fn make_certificates(folder: &Path) -> TlsFiles {
    let openssl = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(folder)
            .stdin(Stdio::null())
            .output()
            .expect("run openssl");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca_request = [
        &["req", "-x509"],
        &key[..],
        &["-keyout", "ca.key", "-out", "ca.pem"],
    ];
    openssl(
        &[
            ca_request.concat(),
            vec!["-days", "2", "-subj", "/CN=derrick test CA"],
        ]
        .concat(),
    );
    for (name, extension) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        let (key_file, request, certificate, extensions) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        std::fs::write(folder.join(&extensions), extension).expect("write extensions");
        let subject = format!("/CN=derrick test {name}");
        openssl(
            &[
                &["req"],
                &key[..],
                &["-keyout", &key_file, "-out", &request, "-subj", &subject],
            ]
            .concat(),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            &request,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &certificate,
            "-days",
            "2",
            "-extfile",
            &extensions,
        ]);
    }
    TlsFiles {
        ca: folder.join("ca.pem"),
        client_certificate: folder.join("client.pem"),
        client_key: folder.join("client.key"),
    }
}

/// Finds `nats-server` on `PATH` or in `/usr/sbin`, where Debian installs it and which a
/// non-root `PATH` may lack. A missing binary is reported when it fails to start.
fn binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|folder| folder.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

/// Reads the client port from a ports file: `{"nats": ["nats://127.0.0.1:PORT"], ...}`.
fn client_port(text: &str) -> Option<u16> {
    let ports: serde_json::Value = serde_json::from_str(text).ok()?;
    let url = ports["nats"].get(0)?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}
