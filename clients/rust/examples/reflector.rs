//! A reflector: a local store of the servers matching a host, kept equal to
//! the sidecar's by a relisting watch, and the handler calls of an informer
//! (added, updated with the old and new version, deleted, synced). Records
//! that vanish while the watch is away (compaction, a sidecar restart) come
//! as deletions too. The interop case `informer_converges` holds the same
//! reflector to churn, a compaction and a restart.
//!
//! ```text
//! cargo run --example reflector -- 127.0.0.1:50051 '*.example.com' [SECONDS]
//! ```

use std::time::Duration;

use connmeta::WatchOptions;
use connmeta::reflector::Change;
use connmeta::v1::{ConnectionFilter, ConnectionKind};
use futures_util::TryStreamExt;

/// Runs the handlers for every change, until an error the watch does not
/// retry by itself.
async fn reflect(client: connmeta::Client, host: String) -> Result<(), connmeta::Error> {
    let filter = ConnectionFilter {
        kind: ConnectionKind::Server as i32,
        host,
        ..Default::default()
    };
    let opts = WatchOptions {
        filter: Some(filter),
        ..Default::default()
    };
    let (store, mut changes) = client.reflect(opts);
    while let Some(change) = changes.try_next().await? {
        match change {
            Change::Added(r) => println!("added {}", r.id()),
            Change::Updated { old, new } => println!(
                "updated {} (etag {} → {})",
                new.id(),
                etag(&old),
                etag(&new)
            ),
            Change::Deleted(r) => println!("deleted {}", r.id()),
            Change::Synced { cause, .. } => println!("synced {} servers ({cause:?})", store.len()),
        }
    }
    Ok(())
}

fn etag(r: &connmeta::v1::ConnectionRecord) -> &str {
    r.metadata.as_ref().map_or("", |m| m.etag.as_str())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let target = args.next().unwrap_or_else(|| "127.0.0.1:50051".into());
    let host = args.next().unwrap_or_else(|| "*.example.com".into());
    // A real consumer runs until shutdown; a duration makes the example end.
    let seconds: u64 = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(u64::MAX / 4);

    let client = connmeta::connect(&target).await?;
    match tokio::time::timeout(Duration::from_secs(seconds), reflect(client, host)).await {
        Ok(result) => result?,
        Err(_) => println!("stopped"),
    }
    Ok(())
}
