//! Connecting over TCP (plaintext or mutual TLS) or a Unix socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

use crate::Client;

/// How long a connection may be silent before the client pings the sidecar.
/// Watches sit idle for long stretches; without pings a dead peer, or a
/// balancer that dropped the flow, goes unnoticed until the next write. The
/// sidecar permits pings this often, so they earn no GOAWAY `too_many_pings`.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(20);

/// Where the sidecar listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// An `http://host:port` URI.
    Tcp(String),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl Target {
    /// Parses `host:port`, `http://host:port`, `unix:///abs/path` or
    /// `unix:relative/path` (gRPC's naming rules).
    pub fn parse(target: &str) -> Result<Target, ConnectError> {
        if let Some(rest) = target.strip_prefix("unix:") {
            // unix:///abs keeps one slash; unix:rel is relative to the cwd.
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(ConnectError::Target(target.to_owned()));
            }
            return Ok(Target::Unix(PathBuf::from(path)));
        }
        if target.starts_with("http://") || target.starts_with("https://") {
            return Ok(Target::Tcp(target.to_owned()));
        }
        if target.is_empty() || target.contains('/') {
            return Err(ConnectError::Target(target.to_owned()));
        }
        Ok(Target::Tcp(format!("http://{target}")))
    }
}

/// Mutual TLS for TCP targets: the PEM files `connmeta certs init --dir DIR`
/// writes, `DIR/ca.pem` and `DIR/<role>.pem` / `DIR/<role>.key` (role
/// `reader`, `writer`, `router` or `reporter`).
///
/// The sidecar's certificate is verified against `ca`; the client
/// certificate is the caller's identity, which the sidecar verifies
/// against its `--client-ca` and authorizes by (its SPIFFE URI SAN, else DNS
/// SANs, else subject). Unix-socket targets ignore it and stay plaintext:
/// the socket's file permissions are their access control.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// The CA that issued the sidecar's certificate (required).
    pub ca: PathBuf,
    /// The client certificate and its key; `None` sends no client
    /// certificate, which a sidecar run with `--client-ca` refuses in the
    /// handshake.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name the sidecar's certificate must carry; `None` means the
    /// target's host (an IP address is matched against IP SANs).
    pub server_name: Option<String>,
}

impl TlsConfig {
    /// A CA plus a client certificate and key, the usual mTLS setup.
    pub fn new(
        ca: impl Into<PathBuf>,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> TlsConfig {
        TlsConfig {
            ca: ca.into(),
            identity: Some((cert.into(), key.into())),
            server_name: None,
        }
    }

    /// Reads the files (now: every [`connect_with`] reads them again, so a
    /// rotated certificate is used by the next connect) into tonic's
    /// rustls configuration.
    pub fn client_tls_config(&self) -> Result<ClientTlsConfig, ConnectError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| ConnectError::Tls(format!("{}: {e}", path.display())))
        };
        let ca = read(&self.ca)?;
        // tonic only finds out at the handshake; say which file is wrong now.
        if !contains_pem(&ca, "CERTIFICATE") {
            return Err(ConnectError::Tls(format!(
                "{}: no PEM certificate in the CA file",
                self.ca.display()
            )));
        }
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = &self.identity {
            let (cert_pem, key_pem) = (read(cert)?, read(key)?);
            if !contains_pem(&cert_pem, "CERTIFICATE") || !contains_pem(&key_pem, "PRIVATE KEY") {
                return Err(ConnectError::Tls(format!(
                    "{} / {}: want a PEM certificate and a PEM private key",
                    cert.display(),
                    key.display()
                )));
            }
            config = config.identity(Identity::from_pem(cert_pem, key_pem));
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        Ok(config)
    }
}

/// Whether `pem` has a block whose label ends with `label` ("PRIVATE KEY"
/// matches PKCS#8, EC and RSA keys).
fn contains_pem(pem: &[u8], label: &str) -> bool {
    String::from_utf8_lossy(pem)
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{label}-----")))
}

/// Options for [`connect_with`].
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Keepalive ping interval while a call is open.
    pub keepalive: Duration,
    /// HTTP/2 stream and connection receive windows; `None` keeps hyper's
    /// defaults (2 MiB / 5 MiB). Small windows make backpressure reach the
    /// server sooner.
    pub initial_stream_window: Option<u32>,
    /// See `initial_stream_window`.
    pub initial_connection_window: Option<u32>,
    /// Mutual TLS for TCP targets; `None` is plaintext. Ignored for Unix
    /// sockets.
    pub tls: Option<TlsConfig>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            keepalive: DEFAULT_KEEPALIVE,
            initial_stream_window: None,
            initial_connection_window: None,
            tls: None,
        }
    }
}

impl ConnectOptions {
    /// The endpoint these options describe. For a Unix socket the URI is a
    /// placeholder (tonic needs one for the `:authority` header): connect it
    /// with [`Endpoint::connect_with_connector`] and a connector that opens
    /// the socket, as [`connect_channel`] does.
    ///
    /// With [`ConnectOptions::tls`] a TCP target's URI becomes `https://`:
    /// tonic does TLS only for that scheme, also over custom connectors.
    pub fn endpoint(&self, target: &Target) -> Result<Endpoint, ConnectError> {
        let tls = match target {
            Target::Tcp(_) => self.tls.as_ref(),
            Target::Unix(_) => None,
        };
        let uri = match (target, tls) {
            (Target::Tcp(uri), Some(_)) => match uri.strip_prefix("http://") {
                Some(rest) => format!("https://{rest}"),
                None => uri.clone(),
            },
            (Target::Tcp(uri), None) => uri.clone(),
            (Target::Unix(_), _) => "http://localhost".to_owned(),
        };
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|e| ConnectError::Transport(format!("{target:?}"), e))?
            .http2_keep_alive_interval(self.keepalive)
            .keep_alive_timeout(Duration::from_secs(10))
            // Ping only while a call is open, when a dead peer costs
            // something; a server with gRPC's default policy would GOAWAY
            // pings on an idle connection.
            .keep_alive_while_idle(false)
            .initial_stream_window_size(self.initial_stream_window)
            .initial_connection_window_size(self.initial_connection_window);
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls.client_tls_config()?)
                .map_err(|e| ConnectError::Transport(format!("{target:?}"), e))?;
        }
        Ok(endpoint)
    }
}

/// Why [`connect`] failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The target is not `host:port` or `unix:///path`.
    Target(String),
    /// The connection could not be made (a refused TLS handshake too).
    Transport(String, tonic::transport::Error),
    /// A TLS file is missing or not what it should be.
    Tls(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Target(t) => write!(
                f,
                "connmeta: bad target {t:?}: want host:port or unix:///path"
            ),
            ConnectError::Tls(why) => write!(f, "connmeta: TLS: {why}"),
            ConnectError::Transport(t, e) => {
                write!(f, "connmeta: connect to {t}: {e}")?;
                // tonic's top-level message is just "transport error".
                let mut source = std::error::Error::source(e);
                while let Some(s) = source {
                    write!(f, ": {s}")?;
                    source = s.source();
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConnectError::Target(_) | ConnectError::Tls(_) => None,
            ConnectError::Transport(_, e) => Some(e),
        }
    }
}

/// Connects to a sidecar at `host:port` or `unix:///path` with default
/// options. Unlike Go's lazy `Dial`, this connects now, so a wrong target
/// or a server that is down fails here.
pub async fn connect(target: &str) -> Result<Client, ConnectError> {
    connect_with(target, &ConnectOptions::default()).await
}

/// Connects with explicit options, e.g. mutual TLS:
///
/// ```no_run
/// # async fn demo() -> Result<(), connmeta::ConnectError> {
/// let opts = connmeta::ConnectOptions {
///     tls: Some(connmeta::TlsConfig::new("certs/ca.pem", "certs/reader.pem", "certs/reader.key")),
///     ..Default::default()
/// };
/// let client = connmeta::connect_with("127.0.0.1:50051", &opts).await?;
/// # Ok(()) }
/// ```
pub async fn connect_with(target: &str, opts: &ConnectOptions) -> Result<Client, ConnectError> {
    Ok(Client::new(connect_channel(target, opts).await?))
}

/// The channel [`connect_with`] builds its [`Client`] on, for stubs the
/// client does not wrap (`RouterService`, reflection).
pub async fn connect_channel(target: &str, opts: &ConnectOptions) -> Result<Channel, ConnectError> {
    let parsed = Target::parse(target)?;
    let endpoint = opts.endpoint(&parsed)?;
    let channel: Channel = match &parsed {
        Target::Tcp(_) => endpoint.connect().await,
        // tonic has no unix: URIs: hand it a connector that ignores the
        // placeholder URI and opens the socket.
        Target::Unix(path) => {
            let path = path.clone();
            endpoint
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
        }
    }
    .map_err(|e| ConnectError::Transport(target.to_owned(), e))?;
    Ok(channel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_target_forms_grpc_names() {
        assert_eq!(
            Target::parse("127.0.0.1:50051").unwrap(),
            Target::Tcp("http://127.0.0.1:50051".into())
        );
        assert_eq!(
            Target::parse("[::1]:50051").unwrap(),
            Target::Tcp("http://[::1]:50051".into())
        );
        assert_eq!(
            Target::parse("unix:///run/c.sock").unwrap(),
            Target::Unix("/run/c.sock".into())
        );
        assert_eq!(
            Target::parse("unix:rel/c.sock").unwrap(),
            Target::Unix("rel/c.sock".into())
        );
        assert!(Target::parse("unix:").is_err());
        assert!(Target::parse("").is_err());
    }

    fn tls_with(ca: &Path) -> ConnectOptions {
        ConnectOptions {
            tls: Some(TlsConfig::new(
                ca,
                ca.with_extension("crt"),
                ca.with_extension("key"),
            )),
            ..Default::default()
        }
    }

    #[test]
    fn tls_options_leave_a_unix_socket_plaintext() {
        // Files that do not exist: a Unix target must not even read them.
        let opts = tls_with(Path::new("/nonexistent/ca.pem"));
        let endpoint = opts.endpoint(&Target::Unix("/run/c.sock".into())).unwrap();
        assert_eq!(endpoint.uri().scheme_str(), Some("http"));
    }

    #[test]
    fn tls_options_name_the_file_that_is_missing_or_wrong() {
        let tcp = Target::parse("127.0.0.1:50051").unwrap();
        let missing = tls_with(Path::new("/nonexistent/ca.pem")).endpoint(&tcp);
        match missing {
            Err(ConnectError::Tls(why)) => assert!(why.contains("/nonexistent/ca.pem"), "{why}"),
            other => panic!("missing CA: {other:?}"),
        }
        let dir = std::env::temp_dir().join(format!("connmeta-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let wrong = tls_with(&ca).endpoint(&tcp);
        std::fs::remove_dir_all(&dir).unwrap();
        match wrong {
            Err(ConnectError::Tls(why)) => assert!(why.contains("no PEM certificate"), "{why}"),
            other => panic!("CA without a certificate: {other:?}"),
        }
    }
}
