//! Rust client for connmeta, the gRPC sidecar that holds mitmproxy's
//! connection metadata.
//!
//! [`v1`] holds the generated messages and clients (tonic + prost, built from
//! `proto/connmeta/v1` by `build.rs`); the rest is a thin layer over them:
//!
//! - [`connect`] dials TCP (`host:port`) or a Unix socket (`unix:///path`),
//!   with keepalive suited to long watches; [`connect_with`] and
//!   [`TlsConfig`] add mutual TLS for TCP.
//! - [`Watcher`] follows changes and survives disconnects, slow-consumer
//!   evictions (`WATCHER_TOO_SLOW`), compaction (`REVISION_COMPACTED`) and,
//!   with `relist`, sidecar restarts, without losing or repeating a revision
//!   and without returning another incarnation's events.
//! - [`Client::pages`] and [`Client::list_all`] page through a listing
//!   pinned at one revision.
//! - [`Client::update_server`] and [`Client::retarget_server`] ask for a
//!   change of a server's target with optimistic concurrency (etags); the
//!   proxy applies it at the server's next connect.
//! - [`ErrorDetails`] decodes the `google.rpc` details (`ErrorInfo`,
//!   `BadRequest`, `PreconditionFailure`) every connmeta error carries.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let mut client = connmeta::connect("unix:///run/connmeta/connmeta.sock").await?;
//! match client.get("4c9e1a52-8d0f-4f49-a1b4-5c0f4b8f9f00").await {
//!     Ok(record) => println!("revision {}", record.metadata.unwrap_or_default().revision),
//!     Err(status) if connmeta::is_reason(&status, connmeta::reason::CONNECTION_NOT_FOUND) => {
//!         println!("no such connection")
//!     }
//!     Err(status) => return Err(status.into()),
//! }
//! # Ok(()) }
//! ```

mod client;
mod dial;
mod errors;
mod watch;

/// Generated connmeta.v1 messages and clients.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("connmeta.v1");
}

/// The standard gRPC health service client (`grpc.health.v1`).
pub mod health {
    pub use tonic_health::pb::health_check_response::ServingStatus;
    pub use tonic_health::pb::health_client::HealthClient;
    pub use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
}

pub use client::{Client, Pages, ServerUpdate};
pub use dial::{
    ConnectError, ConnectOptions, DEFAULT_KEEPALIVE, Target, TlsConfig, connect, connect_channel,
    connect_with,
};
pub use errors::{
    BadRequest, DOMAIN, ErrorDetails, ErrorInfo, FieldViolation, PreconditionFailure,
    PreconditionViolation, is_reason, meta, reason,
};
pub use watch::{RelistCause, WatchItem, WatchOptions, Watcher, record_id};
