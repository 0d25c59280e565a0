//! The case that needs the server restarted under it (kill -9).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use connmeta::health::HealthCheckRequest;
use connmeta::v1::{
    ConnectionFilter, ConnectionRecord, ListConnectionsRequest, WatchConnectionsRequest,
    WatchEvent, WatchEventType,
};
use connmeta::{RelistCause, WatchItem, WatchOptions, Watcher, reason, record_id};
use tonic::Code;
use tonic::metadata::MetadataMap;

use crate::Env;
use crate::cases::{NextItem, expect_error, is_change};
use crate::proxy::{Proxy, client_snapshot, new_id, server_snapshot};

/// The line a case prints on stdout to have the harness kill -9 the server
/// and start it again on the same TCP address and Unix socket; the harness
/// answers "restarted" on stdin once it serves again. Run by hand, restart
/// the server yourself and press Enter.
const RESTART_REQUEST: &str = "connmeta-interop: restart-server";
const INCARNATION_KEY: &str = "connmeta-incarnation";
const CLOSED: connmeta::v1::ConnectionState = connmeta::v1::ConnectionState::Closed;

pub async fn restart_server() -> Result<(), String> {
    println!("{RESTART_REQUEST}");
    eprintln!(
        "connmeta-interop: kill -9 the server, start it again on the same addresses, then press Enter"
    );
    let line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|n| (n, line))
    })
    .await
    .map_err(|e| e.to_string())?;
    match line {
        Ok((0, _)) | Err(_) => Err(
            "asked for a server restart, but stdin ended: run this case under tests/interop/test_interop.py"
                .to_owned(),
        ),
        Ok((_, answer)) if matches!(answer.trim(), "restarted" | "") => Ok(()),
        Ok((_, answer)) => Err(format!(
            "asked for a server restart, the harness answered {answer:?}"
        )),
    }
}

/// What the informer was told.
#[derive(Default)]
struct Seen {
    state: HashMap<String, ConnectionRecord>,
    /// (cause, revision, incarnation) of each listing.
    listings: Vec<(RelistCause, i64, String)>,
    events: Vec<WatchEvent>,
    deleted: Vec<ConnectionRecord>,
    ended: Option<String>,
}

/// Follows the records of `filter` through the Watcher in informer mode.
fn start_informer(client: connmeta::Client, filter: ConnectionFilter) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let shared = seen.clone();
    let mut watcher = Watcher::new(
        client,
        WatchOptions {
            filter: Some(filter),
            bookmarks: true,
            relist: true,
            ..Default::default()
        },
    );
    tokio::spawn(async move {
        loop {
            let item = watcher.item().await;
            let mut seen = shared.lock().unwrap();
            match item {
                Err(error) => {
                    seen.ended = Some(error.to_string());
                    return;
                }
                Ok(WatchItem::Relisted {
                    cause,
                    revision,
                    incarnation,
                    ..
                }) => seen.listings.push((cause, revision, incarnation)),
                Ok(WatchItem::Event(ev)) if is_change(&ev) => {
                    let record = ev.connection.clone().unwrap_or_default();
                    let id = record_id(&record).to_owned();
                    if ev.r#type == WatchEventType::Deleted as i32 {
                        seen.state.remove(&id);
                        seen.deleted.push(record);
                    } else {
                        seen.state.insert(id, record);
                    }
                    seen.events.push(ev);
                }
                Ok(WatchItem::Event(_)) => {}
            }
        }
    });
    seen
}

fn state_diff(got: &HashMap<String, ConnectionRecord>, want: &[ConnectionRecord]) -> String {
    let mut diffs = Vec::new();
    for r in want {
        let id = record_id(r);
        match got.get(id) {
            None => diffs.push(format!("missing {id}")),
            Some(g) if g != r => diffs.push(format!(
                "{id} is at revision {}, want {}",
                g.metadata.clone().unwrap_or_default().revision,
                r.metadata.clone().unwrap_or_default().revision
            )),
            Some(_) => {}
        }
    }
    for id in got.keys() {
        if !want.iter().any(|r| record_id(r) == id) {
            diffs.push(format!("extra {id}"));
        }
    }
    diffs.sort();
    diffs.join("; ")
}

/// Waits until the informer's records are exactly `want`.
async fn await_state(
    seen: &Mutex<Seen>,
    want: &[ConnectionRecord],
    within: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        {
            let seen = seen.lock().unwrap();
            let diff = state_diff(&seen.state, want);
            if diff.is_empty() {
                return Ok(());
            }
            if let Some(ended) = &seen.ended {
                return Err(format!("the informer's watch ended: {ended}"));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "after {within:?} the informer's records still differ from the listing: {diff}"
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn incarnation_of(md: &MetadataMap) -> String {
    md.get(INCARNATION_KEY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

async fn list_all(e: &Env, filter: &ConnectionFilter) -> Result<Vec<ConnectionRecord>, String> {
    let req = ListConnectionsRequest {
        filter: Some(filter.clone()),
        ..Default::default()
    };
    e.client
        .list_all(req)
        .await
        .map(|(records, _)| records)
        .map_err(|e| format!("list: {e}"))
}

pub async fn watch_survives_sidecar_restart(e: &mut Env) -> Result<(), String> {
    let (client_id, s1, s2, s3, s4) = (new_id(), new_id(), new_id(), new_id(), new_id());
    e.proxy
        .report(vec![
            client_snapshot(&client_id),
            server_snapshot(&s1, &client_id, CLOSED, "one.example", 443),
            server_snapshot(&s2, &client_id, CLOSED, "two.example", 443),
            server_snapshot(&s3, &client_id, CLOSED, "three.example", 443),
        ])
        .await?;
    let filter = ConnectionFilter {
        client_id: client_id.clone(),
        ..Default::default()
    };

    // A consumer on its own connection (the Unix socket when given: it
    // must come back too) follows the client's records.
    let target = if e.unix_target.is_empty() {
        &e.target
    } else {
        &e.unix_target
    };
    let consumer = e.connect(target).await?;
    let seen = start_informer(consumer, filter.clone());

    // One change while it watches, then the resume points of this
    // incarnation: a revision, its incarnation and a page token.
    let old_rev = e
        .proxy
        .report(vec![server_snapshot(
            &s1,
            &client_id,
            CLOSED,
            "one.example",
            8443,
        )])
        .await?;
    let resp = e
        .client
        .connections
        .list_connections(ListConnectionsRequest {
            page_size: 1,
            filter: Some(filter.clone()),
            ..Default::default()
        })
        .await
        .map_err(|s| format!("list: {s:?}"))?;
    let md_inc = incarnation_of(resp.metadata());
    let page = resp.into_inner();
    let old_inc = page.header.clone().unwrap_or_default().incarnation;
    let token = page.next_page_token.clone();
    if old_inc.is_empty() || token.is_empty() || page.revision != old_rev {
        return Err(format!(
            "listing before the restart: incarnation {old_inc:?}, page token {token:?}, revision {}; want both set and revision {old_rev}",
            page.revision
        ));
    }
    if md_inc != old_inc {
        return Err(format!(
            "response metadata {INCARNATION_KEY} = {md_inc:?}, want the header's {old_inc:?}"
        ));
    }
    let before = list_all(e, &filter).await?;
    await_state(&seen, &before, Duration::from_secs(5))
        .await
        .map_err(|err| format!("before the restart: {err}"))?;
    let s3_before = before
        .iter()
        .find(|r| record_id(r) == s3)
        .cloned()
        .ok_or("s3 not listed")?;

    restart_server().await?;

    // The proxy reconnects and reports what is still there: s1 changed, s2
    // as before, a new s4; s3 closed while the sidecar was down.
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(status) = e.client.health.check(HealthCheckRequest::default()).await {
        if Instant::now() > deadline {
            return Err(format!("the restarted server is not reachable: {status:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut proxy = Proxy::new(&e.client);
    let mut new_rev = proxy
        .report(vec![
            client_snapshot(&client_id),
            server_snapshot(&s1, &client_id, CLOSED, "one.example", 9443),
            server_snapshot(&s2, &client_id, CLOSED, "two.example", 443),
            server_snapshot(&s4, &client_id, CLOSED, "four.example", 443),
        ])
        .await?;
    // Write until the new store's revision passes the old one, so that the
    // old resume points below would be inside its range if revisions were
    // reused. (Revisions start from the clock: the first write does.)
    let mut writes = 0;
    while new_rev <= old_rev {
        if writes == 1000 {
            return Err(format!(
                "after 1000 writes the restarted store is at revision {new_rev}, still not past {old_rev}"
            ));
        }
        new_rev = proxy
            .report(vec![server_snapshot(
                &s4,
                &client_id,
                CLOSED,
                "four.example",
                1000 + writes,
            )])
            .await?;
        writes += 1;
    }

    // Every resume point of the old incarnation is refused, never OK.
    for inc in ["", old_inc.as_str()] {
        let what = format!(
            "watch resumed after old revision {old_rev} (incarnation {inc:?}) on the restarted server"
        );
        let req = WatchConnectionsRequest {
            start_after_revision: old_rev,
            incarnation: inc.to_owned(),
            filter: Some(filter.clone()),
            ..Default::default()
        };
        let call = e.client.connections.watch_connections(req);
        let res = match tokio::time::timeout(Duration::from_secs(5), call).await {
            Err(_) => return Err(format!("{what}: no answer within 5 s")),
            Ok(Err(status)) => Err(status),
            Ok(Ok(resp)) => {
                let md_inc = incarnation_of(resp.metadata());
                if md_inc.is_empty() || md_inc == old_inc {
                    return Err(format!(
                        "{what}: response metadata {INCARNATION_KEY} = {md_inc:?}, want the new incarnation (not {old_inc:?})"
                    ));
                }
                let mut stream = resp.into_inner();
                match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
                    Err(_) => return Err(format!("{what}: accepted, and silent for 5 s")),
                    Ok(res) => res.map(|m| format!("{m:?}")),
                }
            }
        };
        expect_error(&what, res, Code::OutOfRange, reason::REVISION_COMPACTED)?;
    }
    let res = e
        .client
        .connections
        .list_connections(ListConnectionsRequest {
            page_size: 1,
            filter: Some(filter.clone()),
            page_token: token,
            ..Default::default()
        })
        .await;
    let what = "list with a page token of the old incarnation";
    if let Err(status) = &res {
        let md_inc = incarnation_of(status.metadata());
        if md_inc.is_empty() || md_inc == old_inc {
            return Err(format!(
                "{what}: error metadata {INCARNATION_KEY} = {md_inc:?}, want the new incarnation (not {old_inc:?})"
            ));
        }
    }
    let d = expect_error(
        what,
        res.map(|r| format!("{:?}", r.into_inner())),
        Code::InvalidArgument,
        reason::INVALID_ARGUMENT,
    )?;
    if !d.field_violations().any(|(field, _)| field == "page_token") {
        return Err(format!(
            "INVALID_ARGUMENT names {:?}, want page_token",
            d.field_violations().collect::<Vec<_>>()
        ));
    }

    // The informer relisted by itself and holds exactly the new store.
    let after = list_all(e, &filter).await?;
    await_state(&seen, &after, Duration::from_secs(8))
        .await
        .map_err(|err| format!("after the restart: {err}"))?;
    let seen = seen.lock().unwrap();
    let Some((_, relist_rev, relist_inc)) = seen
        .listings
        .iter()
        .rfind(|(cause, ..)| *cause == RelistCause::Restarted)
    else {
        return Err(format!(
            "the informer was never told of a relist caused by the restart (listings: {:?})",
            seen.listings
        ));
    };
    if relist_inc.is_empty() || *relist_inc == old_inc {
        return Err(format!(
            "the relist after the restart names incarnation {relist_inc:?}, want a new one"
        ));
    }
    if !seen.deleted.contains(&s3_before) {
        return Err(format!(
            "the server that vanished in the restart was not returned as DELETED in its last version (DELETED: {:?})",
            seen.deleted.iter().map(record_id).collect::<Vec<_>>()
        ));
    }
    // After the restart's listing, revisions only go up from it.
    let mut prev = None;
    for ev in &seen.events {
        if ev.revision == *relist_rev && prev.is_none() {
            prev = Some(ev.revision);
        }
        if let Some(p) = prev {
            if ev.revision < p {
                return Err(format!(
                    "event at revision {} after one at {p} following the relist",
                    ev.revision
                ));
            }
            prev = Some(ev.revision);
        }
    }
    Ok(())
}
