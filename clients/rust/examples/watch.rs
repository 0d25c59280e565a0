//! An informer: follow every change to servers matching a host. The Watcher
//! lists first (every record arrives as ADDED), resumes by itself after
//! disconnects and slow-consumer evictions, and lists again when it falls out
//! of the sidecar's history or the sidecar restarts: it says so
//! (`Relisted`), and the events that follow bring the map to the new listing
//! (DELETED for what vanished).
//!
//! ```text
//! cargo run --example watch -- 127.0.0.1:50051 '*.example.com' [SECONDS]
//! ```

use std::collections::HashMap;
use std::time::Duration;

use connmeta::v1::{
    ConnectionFilter, ConnectionKind, ConnectionRecord, WatchEventType, connection_record,
};
use connmeta::{WatchItem, WatchOptions, Watcher};

fn id_of(record: &ConnectionRecord) -> String {
    match &record.kind {
        Some(connection_record::Kind::Server(s)) => s.connection.clone().unwrap_or_default().id,
        _ => String::new(),
    }
}

/// Keeps `servers` equal to the matching servers on the sidecar.
async fn follow(
    watcher: &mut Watcher,
    servers: &mut HashMap<String, ConnectionRecord>,
) -> Result<(), tonic::Status> {
    loop {
        match watcher.next().await? {
            WatchItem::Relisted { records, cause, .. } => {
                // The events that follow apply the listing; the watcher
                // then continues after its revision by itself.
                println!("listed {} servers ({cause:?})", records.len());
            }
            WatchItem::Event(ev) => {
                let Some(record) = ev.connection else {
                    continue;
                }; // a bookmark
                if ev.r#type == WatchEventType::Deleted as i32 {
                    servers.remove(&id_of(&record));
                } else {
                    println!("revision {}: {}", ev.revision, id_of(&record));
                    servers.insert(id_of(&record), record);
                }
            }
        }
    }
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
    let mut watcher = Watcher::new(
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
    match tokio::time::timeout(
        Duration::from_secs(seconds),
        follow(&mut watcher, &mut servers),
    )
    .await
    {
        Ok(result) => result?,
        Err(_) => println!("stopped"),
    }
    Ok(())
}
