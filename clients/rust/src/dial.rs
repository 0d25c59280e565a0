//! Connecting over TCP or a Unix socket.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

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
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            keepalive: DEFAULT_KEEPALIVE,
            initial_stream_window: None,
            initial_connection_window: None,
        }
    }
}

impl ConnectOptions {
    /// The endpoint these options describe. For a Unix socket the URI is a
    /// placeholder (tonic needs one for the `:authority` header); pass
    /// [`unix_connector`]-style connectors to `connect_with_connector`.
    pub fn endpoint(&self, target: &Target) -> Result<Endpoint, ConnectError> {
        let uri = match target {
            Target::Tcp(uri) => uri.clone(),
            Target::Unix(_) => "http://localhost".to_owned(),
        };
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| ConnectError::Transport(format!("{target:?}"), e))?
            .http2_keep_alive_interval(self.keepalive)
            .keep_alive_timeout(Duration::from_secs(10))
            // Ping only while a call is open, when a dead peer costs
            // something; a server with gRPC's default policy would GOAWAY
            // pings on an idle connection.
            .keep_alive_while_idle(false)
            .initial_stream_window_size(self.initial_stream_window)
            .initial_connection_window_size(self.initial_connection_window);
        Ok(endpoint)
    }
}

/// Why [`connect`] failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The target is not `host:port` or `unix:///path`.
    Target(String),
    /// The connection could not be made.
    Transport(String, tonic::transport::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Target(t) => write!(
                f,
                "connmeta: bad target {t:?}: want host:port or unix:///path"
            ),
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
            ConnectError::Target(_) => None,
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

/// Connects with explicit options.
pub async fn connect_with(target: &str, opts: &ConnectOptions) -> Result<Client, ConnectError> {
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
    Ok(Client::new(channel))
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
}
