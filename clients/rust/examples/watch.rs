//! A watch as a stream: follow every change to servers matching a host. The
//! Watcher lists first (every record arrives as ADDED), resumes by itself
//! after disconnects and slow-consumer evictions, and lists again when it
//! falls out of the sidecar's history or the sidecar restarts: it says so
//! (`Relisted`), and the events that follow bring the map to the new listing
//! (DELETED for what vanished). It is a `futures::Stream`, so the usual
//! combinators apply. (For a ready-made cache, see the reflector example.)
//!
//! ```text
//! cargo run --example watch -- 127.0.0.1:50051 '*.example.com' [SECONDS]
//! ```

use std::collections::HashMap;
use std::time::Duration;

use connmeta::v1::{ConnectionFilter, ConnectionKind, ConnectionRecord, WatchEventType};
use connmeta::{WatchItem, WatchOptions, Watcher};
use futures_util::TryStreamExt;

/// Keeps `servers` equal to the matching servers on the sidecar.
async fn follow(
    watcher: Watcher,
    servers: &mut HashMap<String, ConnectionRecord>,
) -> Result<(), connmeta::Error> {
    let events = watcher.try_filter_map(|item| async move {
        Ok(match item {
            WatchItem::Relisted { records, cause, .. } => {
                println!("listed {} servers ({cause:?})", records.len());
                None // the events that follow apply the listing
            }
            WatchItem::Event(ev) => Some(ev),
        })
    });
    let mut events = std::pin::pin!(events);
    while let Some(ev) = events.try_next().await? {
        let Some(record) = ev.connection else {
            continue; // a bookmark
        };
        if ev.r#type == WatchEventType::Deleted as i32 {
            servers.remove(record.id());
        } else {
            println!("revision {}: {}", ev.revision, record.id());
            servers.insert(record.id().to_owned(), record);
        }
    }
    Ok(())
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
    let watcher = Watcher::new(
        client,
        WatchOptions {
            filter: Some(ConnectionFilter {
                kind: ConnectionKind::Server as i32,
                host,
                ..Default::default()
            }),
            bookmarks: true,
            relist: true,
            ..Default::default()
        },
    );
    let mut servers = HashMap::new();
    match tokio::time::timeout(Duration::from_secs(seconds), follow(watcher, &mut servers)).await {
        Ok(result) => result?,
        Err(_) => println!("stopped"),
    }
    Ok(())
}
