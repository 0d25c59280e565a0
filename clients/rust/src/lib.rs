//! Rust client for connmeta, the gRPC sidecar that holds mitmproxy's
//! connection metadata.
//!
//! [`v1`] holds the generated messages and clients (tonic + prost, built from
//! `proto/connmeta/v1` by `build.rs`); the rest is a thin layer over them:
//!
//! - [`connect`] dials TCP (`host:port`) or a Unix socket (`unix:///path`),
//!   with keepalive suited to long watches; [`connect_with`] and
//!   [`TlsConfig`] add mutual TLS for TCP. The [`Client`] is cheap to clone
//!   and takes `&self` everywhere, like tonic's clients.
//! - [`Watcher`] is a [`Stream`](futures_core::Stream) of changes that
//!   survives disconnects, slow-consumer evictions (`WATCHER_TOO_SLOW`),
//!   compaction (`REVISION_COMPACTED`) and, with `relist`, sidecar restarts,
//!   without losing or repeating a revision and without returning another
//!   incarnation's events.
//! - [`reflector`] keeps a local [`Store`](reflector::Store) equal to the
//!   sidecar's records and says what changed, like kube-rs's reflector.
//! - [`router`] makes a router out of an async function.
//! - [`Client::pages`] (a stream) and [`Client::list_all`] page through a
//!   listing pinned at one revision.
//! - [`Client::update_server`] and [`Client::retarget_server`] ask for a
//!   change of a server's target with optimistic concurrency (etags); the
//!   proxy applies it at the server's next connect.
//! - [`Error`] sorts every failure by what to do about it and carries the
//!   decoded `google.rpc` details ([`ErrorDetails`]: `ErrorInfo`,
//!   `BadRequest`, `PreconditionFailure`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = connmeta::connect("unix:///run/connmeta/connmeta.sock").await?;
//! match client.get("4c9e1a52-8d0f-4f49-a1b4-5c0f4b8f9f00").await {
//!     Ok(record) => println!("revision {}", record.metadata.unwrap_or_default().revision),
//!     Err(connmeta::Error::NotFound(_)) => println!("no such connection"),
//!     Err(e) => return Err(e.into()),
//! }
//! # Ok(()) }
//! ```

mod client;
mod dial;
mod errors;
pub mod reflector;
pub mod router;
mod watch;

/// Generated connmeta.v1 messages and clients.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("connmeta.v1");
}

impl v1::Address {
    /// A `host:port` address (no IPv6 flow info or scope).
    pub fn new(host: impl Into<String>, port: u32) -> v1::Address {
        v1::Address {
            host: host.into(),
            port,
            ..Default::default()
        }
    }
}

impl v1::ConnectionRecord {
    /// The connection id (of a client or a server record).
    pub fn id(&self) -> &str {
        record_id(self)
    }

    /// The server, if this is a server record.
    pub fn as_server(&self) -> Option<&v1::Server> {
        match &self.kind {
            Some(v1::connection_record::Kind::Server(s)) => Some(s),
            _ => None,
        }
    }

    /// The client, if this is a client record.
    pub fn as_client(&self) -> Option<&v1::Client> {
        match &self.kind {
            Some(v1::connection_record::Kind::Client(c)) => Some(c),
            _ => None,
        }
    }
}

impl v1::RouteQuery {
    /// The address the proxy is about to connect the server to.
    pub fn target(&self) -> Option<&v1::Address> {
        self.server.as_ref()?.as_server()?.address.as_ref()
    }
}

/// The standard gRPC health service client (`grpc.health.v1`).
pub mod health {
    pub use tonic_health::pb::health_check_response::ServingStatus;
    pub use tonic_health::pb::health_client::HealthClient;
    pub use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
}

pub use client::{Client, Pages, RETARGET_ATTEMPTS, ServerUpdate};
pub use dial::{
    ConnectError, ConnectOptions, DEFAULT_KEEPALIVE, Target, TlsConfig, connect, connect_channel,
    connect_with,
};
pub use errors::{
    BadRequest, DOMAIN, Error, ErrorDetails, ErrorInfo, FieldViolation, PreconditionFailure,
    PreconditionViolation, is_reason, meta, reason,
};
pub use watch::{RelistCause, WatchItem, WatchOptions, Watcher, record_id};
