//! The cases of tests/interop/cases.md; names and descriptions must match
//! that file and the Go program (a pytest test compares them).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::TryStreamExt;

use connmeta::health::{HealthCheckRequest, ServingStatus};
use connmeta::v1::{
    Address, ChangeStatus, ConnectionFilter, ConnectionRecord, ConnectionState,
    GetConnectionRequest, Hook, ListConnectionsRequest, RecordMetadata, Scheme, ServerSpec,
    SnapshotRejection, TransportProtocol, UpdateServerConnectionRequest, WatchConnectionsRequest,
    WatchEvent, WatchEventType, connection_record, connection_snapshot,
};
use connmeta::{
    ConnectOptions, ErrorDetails, RelistCause, ServerUpdate, WatchItem, WatchOptions, Watcher,
    meta, reason,
};
use tonic::{Code, Status};

use crate::Env;
use crate::authz::authz_roles;
use crate::errors::typed_errors;
use crate::informer::informer_converges;
use crate::keepalive::{PingCounter, counting_channel};
use crate::proxy::{
    Proxy, addr, applied_at, client_snapshot, new_id, padded, resync_client, server_snapshot,
};
use crate::restart::watch_survives_sidecar_restart;
use crate::router::{
    router_helper_retargets, router_retargets_connect, router_silent_fails_open,
    router_standby_takes_over,
};

type R = Result<(), String>;
type BoxFut<'a> = Pin<Box<dyn Future<Output = R> + 'a>>;

pub struct Case {
    pub name: &'static str,
    pub proves: &'static str,
    pub run: for<'a> fn(&'a mut Env) -> BoxFut<'a>,
}

macro_rules! case {
    ($name:literal, $proves:literal, $f:ident) => {
        Case {
            name: $name,
            proves: $proves,
            run: |e| Box::pin($f(e)),
        }
    };
}

pub static CASES: &[Case] = &[
    case!(
        "get_not_found",
        "GetConnection of an unknown id fails NOT_FOUND with ErrorInfo CONNECTION_NOT_FOUND",
        get_not_found
    ),
    case!(
        "update_open_server_refused",
        "changing the address of an OPEN server fails FAILED_PRECONDITION with ErrorInfo CONNECTION_OPEN and PreconditionFailure; nothing changes",
        update_open_server_refused
    ),
    case!(
        "update_same_value_on_open_server_accepted",
        "setting an OPEN server's address to its current value succeeds and records no change",
        update_same_value_on_open_server_accepted
    ),
    case!(
        "update_closed_server",
        "an accepted change of a CLOSED server waits in pending_change while the record keeps the reported address; the proxy's APPLIED route outcome moves it to last_change and the address; a pending via is withdrawn by naming the current one",
        update_closed_server
    ),
    case!(
        "update_stale_etag",
        "an update with an outdated etag fails ABORTED with ErrorInfo ETAG_MISMATCH; a read-modify-write retry succeeds",
        update_stale_etag
    ),
    case!(
        "update_invalid_argument",
        "port 70000, an empty host, an address with flowinfo, via scheme TLS and mask path sni each fail INVALID_ARGUMENT with a BadRequest naming the field; an invalid address outside the mask is ignored",
        update_invalid_argument
    ),
    case!(
        "list_pagination",
        "paging with a small page_size returns every id exactly once, in id order, all pages at one pinned revision",
        list_pagination
    ),
    case!(
        "watch_resume_no_gap",
        "a watch cut mid-stream and resumed from its last revision sees every concurrent write exactly once, in order",
        watch_resume_no_gap
    ),
    case!(
        "watch_compacted",
        "watching from a revision older than the history fails OUT_OF_RANGE with ErrorInfo REVISION_COMPACTED and oldestRevision; relist then watch recovers",
        watch_compacted
    ),
    case!(
        "watch_slow_consumer",
        "a watcher that stops reading is ended RESOURCE_EXHAUSTED with ErrorInfo WATCHER_TOO_SLOW and lastRevision; resuming from it loses nothing",
        watch_slow_consumer
    ),
    case!(
        "watch_survives_sidecar_restart",
        "after a kill -9 and restart of the server (no --state-dir), a watch and a page token of the old incarnation fail OUT_OF_RANGE REVISION_COMPACTED and INVALID_ARGUMENT, never OK; the helper's informer relists by itself, says so, delivers the vanished records as DELETED and ends with exactly the new store's records",
        watch_survives_sidecar_restart
    ),
    case!(
        "keepalive",
        "keepalive pings every 10 s on an idle watch do not get the connection closed (too_many_pings); the watch still delivers afterwards",
        keepalive
    ),
    case!(
        "authz_roles",
        "with the example policy, each role's certificate may call exactly the methods the policy gives it: the others fail PERMISSION_DENIED with ErrorInfo naming the method; the Unix socket may write; a connection without a client certificate fails the TLS handshake (UNAVAILABLE)",
        authz_roles
    ),
    case!(
        "health",
        "grpc.health.v1 Check reports SERVING for \"\" and connmeta.v1.ConnectionService",
        health
    ),
    case!(
        "report_rejects_bad_snapshot",
        "a batch whose middle snapshot has transport_protocol UNSPECIFIED is acked with that one rejected (index 1, INVALID_SNAPSHOT, a violation naming its field path) and the other two stored; the stream goes on: a further batch with port 70000 at index 0 is acked the same way",
        report_rejects_bad_snapshot
    ),
    case!(
        "two_proxies_resync_independent",
        "two Report streams with different proxy_id each report an OPEN client; a resync of proxy A, overlapping one of proxy B, closes only A's client (CLOSED, last_hook RESYNC); B's client stays OPEN and B's resync closes nothing",
        two_proxies_resync_independent
    ),
    case!(
        "unix_socket",
        "the Unix socket serves the same store: a record reported over TCP reads back identical, errors keep their details",
        unix_socket
    ),
    case!(
        "router_retargets_connect",
        "a server_connect reported while a router is subscribed reaches it as a RouteQuery; its answer reaches the proxy as a RouteDecision and waits as pending_change; the proxy's APPLIED route outcome shows on the record and in the watch with the new address and last_change.actor = the router's name",
        router_retargets_connect
    ),
    case!(
        "router_silent_fails_open",
        "a query the router leaves unanswered ends in a timed-out no-change RouteDecision within the sidecar's share of the proxy's route deadline; the server keeps its address and a late answer is ignored",
        router_silent_fails_open
    ),
    case!(
        "router_standby_takes_over",
        "a second router is a standby naming the active one and a duplicate name fails ALREADY_EXISTS; when the active router leaves, the standby is told it is active, RoutingState names it and it gets the next query",
        router_standby_takes_over
    ),
    case!(
        "informer_converges",
        "the informer/reflector converges to exactly the server's List after a churn of creates, changes and deletes, after a compaction and after a sidecar restart, with handler calls matching the changes and no missed delete",
        informer_converges
    ),
    case!(
        "router_helper_retargets",
        "a router written with the helper in under 30 lines retargets a server connect: the decision reaches the proxy and settles APPLIED on the record",
        router_helper_retargets
    ),
    case!(
        "typed_errors",
        "every sentinel/typed error matches its status: not found, connection open, etag mismatch, compacted, invalid argument with field violations, permission denied",
        typed_errors
    ),
];

const ACTOR: &str = "interop-rust";
const OPEN: ConnectionState = ConnectionState::Open;
const CLOSED: ConnectionState = ConnectionState::Closed;

/// The next item of a watcher, which never ends: `try_next` without the
/// Option.
pub trait NextItem {
    fn item(&mut self) -> impl Future<Output = Result<WatchItem, connmeta::Error>> + Send;
}

impl NextItem for connmeta::Watcher {
    async fn item(&mut self) -> Result<WatchItem, connmeta::Error> {
        Ok(self.try_next().await?.expect("a Watcher never ends"))
    }
}

/// A raw stub's status or the helper's error: the cases check both alike.
pub trait Details {
    fn details(&self) -> ErrorDetails;
}

impl Details for Status {
    fn details(&self) -> ErrorDetails {
        ErrorDetails::from_status(self)
    }
}

impl Details for connmeta::Error {
    fn details(&self) -> ErrorDetails {
        match connmeta::Error::details(self) {
            Some(d) => d.clone(),
            None => ErrorDetails::from_status(&Status::unavailable(self.to_string())),
        }
    }
}

/// Checks that `result` failed with this code and ErrorInfo reason (domain
/// connmeta.v1); returns the decoded details.
pub fn expect_error<T: std::fmt::Debug, E: Details>(
    what: &str,
    result: Result<T, E>,
    code: Code,
    reason: &str,
) -> Result<ErrorDetails, String> {
    let error = match result {
        Ok(v) => {
            return Err(format!(
                "{what}: succeeded ({v:?}), want {code:?} with ErrorInfo reason {reason}"
            ));
        }
        Err(s) => s,
    };
    let d = error.details();
    if d.code != code {
        return Err(format!(
            "{what}: got {:?} ({}), want {code:?}",
            d.code, d.message
        ));
    }
    let Some(info) = &d.error_info else {
        return Err(format!(
            "{what}: {code:?} carries no google.rpc.ErrorInfo detail (message {:?})",
            d.message
        ));
    };
    if info.reason != reason || info.domain != connmeta::DOMAIN {
        return Err(format!(
            "{what}: ErrorInfo {}/{}, want {}/{reason}",
            info.domain,
            info.reason,
            connmeta::DOMAIN
        ));
    }
    Ok(d)
}

fn ctx<E: Details>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e: E| {
        let d = e.details();
        format!("{what}: {:?}: {}", d.code, d.message)
    }
}

fn conn_id(rec: &ConnectionRecord) -> &str {
    match &rec.kind {
        Some(connection_record::Kind::Server(s)) => {
            s.connection.as_ref().map_or("", |c| c.id.as_str())
        }
        Some(connection_record::Kind::Client(c)) => {
            c.connection.as_ref().map_or("", |c| c.id.as_str())
        }
        None => "",
    }
}

fn server_of(rec: &ConnectionRecord) -> connmeta::v1::Server {
    match &rec.kind {
        Some(connection_record::Kind::Server(s)) => s.clone(),
        _ => Default::default(),
    }
}

fn host_of(rec: &ConnectionRecord) -> String {
    server_of(rec).address.map(|a| a.host).unwrap_or_default()
}

fn meta_of(rec: &ConnectionRecord) -> connmeta::v1::RecordMetadata {
    rec.metadata.clone().unwrap_or_default()
}

pub fn is_change(ev: &WatchEvent) -> bool {
    [
        WatchEventType::Added,
        WatchEventType::Modified,
        WatchEventType::Deleted,
    ]
    .iter()
    .any(|t| *t as i32 == ev.r#type)
}

async fn report_server(
    e: &mut Env,
    state: ConnectionState,
    host: &str,
    port: u32,
) -> Result<(String, String), String> {
    let (client_id, server_id) = (new_id(), new_id());
    e.proxy
        .report(vec![
            client_snapshot(&client_id),
            server_snapshot(&server_id, &client_id, state, host, port),
        ])
        .await?;
    Ok((client_id, server_id))
}

async fn get_not_found(e: &mut Env) -> R {
    let res = e.client.get(&new_id()).await;
    expect_error(
        "get unknown id",
        res,
        Code::NotFound,
        reason::CONNECTION_NOT_FOUND,
    )
    .map(drop)
}

async fn update_open_server_refused(e: &mut Env) -> R {
    let (_, id) = report_server(e, OPEN, "origin.example", 443).await?;
    let before = e.client.get(&id).await.map_err(ctx("get"))?;
    let res = e
        .client
        .update_server(ServerUpdate {
            id: id.clone(),
            actor: ACTOR.into(),
            address: Some(addr("elsewhere.example", 8443)),
            ..Default::default()
        })
        .await;
    let d = expect_error(
        "update address of OPEN server",
        res,
        Code::FailedPrecondition,
        reason::CONNECTION_OPEN,
    )?;
    if d.metadata("field") != Some("address") {
        return Err(format!(
            "ErrorInfo metadata field = {:?}, want \"address\"",
            d.metadata("field")
        ));
    }
    if d.precondition_failure
        .as_ref()
        .is_none_or(|p| p.violations.is_empty())
    {
        return Err("FAILED_PRECONDITION carries no PreconditionFailure violation".into());
    }
    let after = e.client.get(&id).await.map_err(ctx("get"))?;
    if before != after {
        return Err(format!(
            "refused update changed the record:\nbefore {before:?}\nafter  {after:?}"
        ));
    }
    Ok(())
}

async fn update_same_value_on_open_server_accepted(e: &mut Env) -> R {
    let (_, id) = report_server(e, OPEN, "origin.example", 443).await?;
    let before = meta_of(&e.client.get(&id).await.map_err(ctx("get"))?);
    let rec = e
        .client
        .update_server(ServerUpdate {
            id,
            actor: ACTOR.into(),
            address: Some(addr("origin.example", 443)),
            ..Default::default()
        })
        .await
        .map_err(ctx("same-value update of OPEN server"))?;
    let after = meta_of(&rec);
    if after.revision != before.revision || after.etag != before.etag {
        return Err(format!(
            "a no-op update recorded a change: revision {} -> {}, etag {} -> {}",
            before.revision, after.revision, before.etag, after.etag
        ));
    }
    if after.last_change.is_some() || after.pending_change.is_some() {
        return Err(format!(
            "a no-op update set last_change {:?}, pending_change {:?}",
            after.last_change, after.pending_change
        ));
    }
    Ok(())
}

/// Checks that `m` holds, as pending_change, the update of `fields` by
/// ACTOR accepted at m's revision, with no route query.
fn check_pending(
    what: &str,
    m: &RecordMetadata,
    fields: &[&str],
    address: Option<&Address>,
    via: Option<&ServerSpec>,
) -> R {
    let pc = m.pending_change.clone().unwrap_or_default();
    if pc.actor != ACTOR
        || pc.fields != fields
        || pc.revision != m.revision
        || pc.status != ChangeStatus::Pending as i32
        || !pc.query_id.is_empty()
        || pc.address.as_ref() != address
        || pc.via.as_ref() != via
    {
        return Err(format!(
            "{what}: metadata.pending_change = {:?}, want actor {ACTOR}, fields {fields:?}, address {address:?}, via {via:?}, revision {}, status PENDING, no query_id",
            m.pending_change, m.revision
        ));
    }
    Ok(())
}

async fn update_closed_server(e: &mut Env) -> R {
    let (client_id, id) = report_server(e, CLOSED, "origin.example", 443).await?;
    let before = meta_of(&e.client.get(&id).await.map_err(ctx("get"))?);
    let reported = addr("origin.example", 443);
    let target = addr("elsewhere.example", 8443);
    let rec = e
        .client
        .update_server(ServerUpdate {
            id: id.clone(),
            etag: before.etag.clone(),
            actor: ACTOR.into(),
            address: Some(target.clone()),
            ..Default::default()
        })
        .await
        .map_err(ctx("update address of CLOSED server"))?;
    // Desired, not observed: the server keeps what the proxy reported.
    if server_of(&rec).address.as_ref() != Some(&reported) {
        return Err(format!(
            "address after update = {:?}, want {reported:?} (the reported one) until the proxy applies the change",
            server_of(&rec).address
        ));
    }
    let m = meta_of(&rec);
    if m.etag == before.etag {
        return Err(format!("etag did not change: {}", m.etag));
    }
    if m.revision <= before.revision {
        return Err(format!(
            "revision did not advance: {} -> {}",
            before.revision, m.revision
        ));
    }
    check_pending("update address", &m, &["address"], Some(&target), None)?;
    if m.last_change != before.last_change {
        return Err(format!(
            "last_change changed to {:?} before the proxy reported the outcome",
            m.last_change
        ));
    }
    let reread = meta_of(&e.client.get(&id).await.map_err(ctx("get"))?);
    if reread.etag != m.etag {
        return Err(format!(
            "get after update: etag {}, update returned {}",
            reread.etag, m.etag
        ));
    }
    let accepted = m.revision;

    // The proxy applies it at the server's connect and says so.
    let rev = e
        .proxy
        .report(vec![applied_at(&id, &client_id, &target, "", ACTOR)])
        .await?;
    let rec = e.client.get(&id).await.map_err(ctx("get"))?;
    let m = meta_of(&rec);
    if server_of(&rec).address.as_ref() != Some(&target) || m.revision != rev {
        return Err(format!(
            "after the APPLIED outcome (ack revision {rev}): address {:?} at revision {}, want {target:?}",
            server_of(&rec).address,
            m.revision
        ));
    }
    if m.pending_change.is_some() {
        return Err(format!(
            "pending_change = {:?} after the APPLIED outcome, want none",
            m.pending_change
        ));
    }
    let lc = m.last_change.clone().unwrap_or_default();
    if lc.actor != ACTOR
        || lc.fields != ["address"]
        || lc.status != ChangeStatus::Applied as i32
        || lc.revision != accepted
        || lc.address.as_ref() != Some(&target)
    {
        return Err(format!(
            "last_change = {:?}, want actor {ACTOR}, fields [address], address {target:?}, status APPLIED, revision {accepted} (accepted at)",
            m.last_change
        ));
    }

    // A via waits the same way; naming the current value (none) withdraws it.
    let spec = ServerSpec {
        scheme: Scheme::Http as i32,
        address: Some(addr("proxy.internal", 3128)),
    };
    let rec = e
        .client
        .update_server(ServerUpdate {
            id: id.clone(),
            actor: ACTOR.into(),
            via: Some(spec.clone()),
            ..Default::default()
        })
        .await
        .map_err(ctx("set via"))?;
    if server_of(&rec).via.is_some() {
        return Err(format!(
            "via after update = {:?}, want none (the reported one) until the proxy applies the change",
            server_of(&rec).via
        ));
    }
    check_pending("set via", &meta_of(&rec), &["via"], None, Some(&spec))?;
    let rec = e
        .client
        .update_server(ServerUpdate {
            id,
            actor: ACTOR.into(),
            clear_via: true,
            ..Default::default()
        })
        .await
        .map_err(ctx("clear via"))?;
    if server_of(&rec).via.is_some() || meta_of(&rec).pending_change.is_some() {
        return Err(format!(
            "after clearing via: via {:?}, pending_change {:?}; want neither (the pending via is withdrawn)",
            server_of(&rec).via,
            meta_of(&rec).pending_change
        ));
    }
    Ok(())
}

fn pending_host(rec: &ConnectionRecord) -> String {
    meta_of(rec)
        .pending_change
        .and_then(|c| c.address)
        .map(|a| a.host)
        .unwrap_or_default()
}

async fn update_stale_etag(e: &mut Env) -> R {
    let (_, id) = report_server(e, CLOSED, "origin.example", 443).await?;
    let stale = meta_of(&e.client.get(&id).await.map_err(ctx("get"))?).etag;
    let update = |host: &str| ServerUpdate {
        id: id.clone(),
        etag: stale.clone(),
        actor: ACTOR.into(),
        address: Some(addr(host, 443)),
        ..Default::default()
    };
    e.client
        .update_server(update("first.example"))
        .await
        .map_err(ctx("first update"))?;
    let res = e.client.update_server(update("second.example")).await;
    expect_error(
        &format!("update with stale etag {stale}"),
        res,
        Code::Aborted,
        reason::ETAG_MISMATCH,
    )?;
    // Accepted changes wait in pending_change; the server keeps the
    // reported address.
    let after = e.client.get(&id).await.map_err(ctx("get"))?;
    if pending_host(&after) != "first.example" {
        return Err(format!(
            "pending_change asks for host {:?}, want first.example (the refused update must not replace it)",
            pending_host(&after)
        ));
    }
    let rec = e
        .client
        .retarget_server(&id, addr("third.example", 443), ACTOR)
        .await
        .map_err(ctx("retarget_server (fresh etag)"))?;
    if pending_host(&rec) != "third.example" {
        return Err(format!(
            "retarget_server: pending_change asks for host {:?}, want third.example",
            pending_host(&rec)
        ));
    }
    if host_of(&rec) != "origin.example" {
        return Err(format!(
            "retarget_server: server host {:?}, want origin.example (the reported one) until the proxy applies it",
            host_of(&rec)
        ));
    }
    Ok(())
}

/// Whether a violation names `field` or a part of it ("update_mask.paths"
/// names "update_mask"): the contract fixes the field, not how deep into it
/// the server points.
fn names_field(d: &ErrorDetails, field: &str) -> bool {
    d.field_violations().any(|(f, _)| {
        f == field
            || f.strip_prefix(field)
                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
    })
}

async fn update_invalid_argument(e: &mut Env) -> R {
    let (_, id) = report_server(e, CLOSED, "origin.example", 443).await?;
    let before = e.client.get(&id).await.map_err(ctx("get"))?;
    let mask = |p: &str| {
        Some(prost_types::FieldMask {
            paths: vec![p.to_owned()],
        })
    };
    let base = UpdateServerConnectionRequest {
        id: id.clone(),
        actor: ACTOR.into(),
        ..Default::default()
    };
    let tests = [
        (
            "port 70000",
            UpdateServerConnectionRequest {
                address: Some(addr("origin.example", 70000)),
                update_mask: mask("address"),
                ..base.clone()
            },
            "address.port",
        ),
        (
            "empty host",
            UpdateServerConnectionRequest {
                address: Some(addr("", 443)),
                update_mask: mask("address"),
                ..base.clone()
            },
            "address.host",
        ),
        // A server's address is a (host, port) pair in mitmproxy; an IPv6
        // socket's flowinfo, even 0, has no place in it.
        (
            "address with flowinfo",
            UpdateServerConnectionRequest {
                address: Some(Address {
                    host: "2001:db8::1".into(),
                    port: 443,
                    flowinfo: Some(0),
                    ..Default::default()
                }),
                update_mask: mask("address"),
                ..base.clone()
            },
            "address.flowinfo",
        ),
        (
            "via scheme TLS",
            UpdateServerConnectionRequest {
                via: Some(ServerSpec {
                    scheme: Scheme::Tls as i32,
                    address: Some(addr("proxy.internal", 3128)),
                }),
                update_mask: mask("via"),
                ..base.clone()
            },
            "via.scheme",
        ),
        (
            "mask path sni",
            UpdateServerConnectionRequest {
                update_mask: mask("sni"),
                ..base.clone()
            },
            "update_mask",
        ),
    ];
    for (name, req, field) in tests {
        let res = e.client.connections.update_server_connection(req).await;
        let d = expect_error(name, res, Code::InvalidArgument, reason::INVALID_ARGUMENT)?;
        if !names_field(&d, field) {
            return Err(format!(
                "{name}: BadRequest field violations {:?} do not name {field:?}",
                d.field_violations().collect::<Vec<_>>()
            ));
        }
    }
    // Fields the mask does not name are ignored, however invalid: this
    // clears a via the server does not have (a no-op).
    e.client
        .connections
        .update_server_connection(UpdateServerConnectionRequest {
            address: Some(addr("", 70000)),
            update_mask: mask("via"),
            ..base.clone()
        })
        .await
        .map_err(ctx(
            "update_mask [via] with an invalid address outside the mask (want it ignored)",
        ))?;
    let after = e.client.get(&id).await.map_err(ctx("get"))?;
    if after != before {
        return Err(format!(
            "invalid and no-op updates changed the record:\nbefore {before:?}\nafter  {after:?}"
        ));
    }
    Ok(())
}

async fn list_pagination(e: &mut Env) -> R {
    const SERVERS: u32 = 23;
    const PAGE_SIZE: usize = 5;
    let client_id = new_id();
    let mut snaps = vec![client_snapshot(&client_id)];
    let mut want = vec![client_id.clone()];
    for i in 0..SERVERS {
        let id = new_id();
        snaps.push(server_snapshot(
            &id,
            &client_id,
            CLOSED,
            "origin.example",
            1000 + i,
        ));
        want.push(id);
    }
    e.proxy.report(snaps).await?;
    want.sort();

    let filter = ConnectionFilter {
        client_id: client_id.clone(),
        ..Default::default()
    };
    let req = ListConnectionsRequest {
        page_size: PAGE_SIZE as i32,
        filter: Some(filter),
        ..Default::default()
    };
    let mut pages = e.client.pages(req.clone());
    let (mut got, mut revision, mut n) = (Vec::new(), 0, 0);
    while let Some(page) = pages
        .try_next()
        .await
        .map_err(|s| format!("page {}: {s:?}", n + 1))?
    {
        n += 1;
        if page.connections.len() > PAGE_SIZE {
            return Err(format!(
                "page {n} holds {} records, page_size is {PAGE_SIZE}",
                page.connections.len()
            ));
        }
        if n == 1 {
            revision = page.revision;
            // Writes after the first page must not show in later pages: the
            // listing is pinned at the first page's revision.
            let mut batch = vec![server_snapshot(
                &new_id(),
                &client_id,
                CLOSED,
                "late.example",
                443,
            )];
            let last = want.last().expect("not empty").clone();
            if last != client_id {
                batch.push(server_snapshot(
                    &last,
                    &client_id,
                    CLOSED,
                    "moved.example",
                    443,
                ));
            }
            e.proxy.report(batch).await?;
        } else if page.revision != revision {
            return Err(format!(
                "page {n} is at revision {}, page 1 was at {revision}",
                page.revision
            ));
        }
        for rec in &page.connections {
            got.push(conn_id(rec).to_owned());
            let host = host_of(rec);
            if host == "moved.example" || host == "late.example" {
                return Err(format!(
                    "page {n} shows a write made after page 1 (host {host}): the listing is not pinned"
                ));
            }
        }
    }
    if n < want.len().div_ceil(PAGE_SIZE) {
        return Err(format!(
            "{} records came in {n} pages of at most {PAGE_SIZE}",
            got.len()
        ));
    }
    if got != want {
        return Err(format!(
            "listing (in order) = {got:?}\nwant every id once, in id order = {want:?}"
        ));
    }
    let (records, rev) = e.client.list_all(req).await.map_err(ctx("fresh listing"))?;
    if records.len() != want.len() + 1 || rev <= revision {
        return Err(format!(
            "fresh listing: {} records at revision {rev}, want {} after revision {revision}",
            records.len(),
            want.len() + 1
        ));
    }
    Ok(())
}

/// A writer reporting `count` changes to servers of a client from its own
/// stream, pausing between them; it records the revision of each.
struct Writer {
    revisions: Arc<Mutex<Vec<i64>>>,
    done: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<R>,
}

impl Writer {
    fn start(
        client: &connmeta::Client,
        client_id: &str,
        servers: Vec<String>,
        count: u32,
        pause: Duration,
    ) -> Writer {
        let revisions = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicBool::new(false));
        let mut proxy = Proxy::new(client);
        let (revs, fin, client_id) = (revisions.clone(), done.clone(), client_id.to_owned());
        let task = tokio::spawn(async move {
            let result = async {
                for i in 0..count {
                    // A new port every time: a snapshot equal to the stored
                    // one might not make a revision.
                    let id = &servers[i as usize % servers.len()];
                    let rev = proxy
                        .report(vec![server_snapshot(
                            id,
                            &client_id,
                            CLOSED,
                            "origin.example",
                            2000 + i,
                        )])
                        .await?;
                    revs.lock().unwrap().push(rev);
                    tokio::time::sleep(pause).await;
                }
                Ok(())
            }
            .await;
            fin.store(true, Ordering::SeqCst);
            result
        });
        Writer {
            revisions,
            done,
            task,
        }
    }

    fn finished(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    fn final_revision(&self) -> i64 {
        *self.revisions.lock().unwrap().last().unwrap_or(&i64::MAX)
    }
}

fn check_revisions(got: &[i64], want: &[i64]) -> R {
    if let Some(w) = got.windows(2).find(|w| w[1] <= w[0]) {
        return Err(format!(
            "revisions out of order or repeated: {} after {} (all: {got:?})",
            w[1], w[0]
        ));
    }
    if got != want {
        let missing: Vec<_> = want.iter().filter(|r| !got.contains(r)).collect();
        let extra: Vec<_> = got.iter().filter(|r| !want.contains(r)).collect();
        return Err(format!(
            "watch saw {} revisions, writer made {}: missing {missing:?}, unexpected {extra:?}",
            got.len(),
            want.len()
        ));
    }
    Ok(())
}

async fn watch_resume_no_gap(e: &mut Env) -> R {
    let client_id = new_id();
    let servers = vec![new_id(), new_id(), new_id()];
    e.proxy.report(vec![client_snapshot(&client_id)]).await?;
    let start = e
        .client
        .current_revision()
        .await
        .map_err(ctx("current revision"))?;
    let filter = Some(ConnectionFilter {
        client_id: client_id.clone(),
        ..Default::default()
    });
    let writer = Writer::start(
        &e.client,
        &client_id,
        servers,
        60,
        Duration::from_millis(10),
    );

    let mut got = Vec::new();
    let opts = WatchOptions {
        start_after_revision: start,
        filter: filter.clone(),
        bookmarks: true,
        ..Default::default()
    };
    let mut first = Watcher::new(e.client.clone(), opts);
    while got.len() < 20 {
        if let WatchItem::Event(ev) = first.item().await.map_err(ctx("first watch"))?
            && is_change(&ev)
        {
            got.push(ev.revision);
        }
    }
    let resume_after = first.last_revision();
    drop(first); // cut the stream mid-way
    let cut_while_writing = !writer.finished();

    // Resume on a new connection, as a restarted consumer would.
    let resumed = e.connect(&e.target).await?;
    let opts = WatchOptions {
        start_after_revision: resume_after,
        filter,
        bookmarks: true,
        ..Default::default()
    };
    let mut second = Watcher::new(resumed, opts);
    loop {
        if let WatchItem::Event(ev) = second.item().await.map_err(ctx("resumed watch"))? {
            if is_change(&ev) {
                got.push(ev.revision);
            }
            if writer.finished() && ev.revision >= writer.final_revision() {
                break;
            }
        }
    }
    writer.task.await.map_err(|e| e.to_string())??;
    check_revisions(&got, &writer.revisions.lock().unwrap())?;
    if !cut_while_writing {
        return Err("the writer finished before the watch was cut; the case proved nothing about concurrent writes".into());
    }
    Ok(())
}

async fn watch_compacted(e: &mut Env) -> R {
    let (client_id, server_id) = (new_id(), new_id());
    e.proxy.report(vec![client_snapshot(&client_id)]).await?;
    let start = e
        .client
        .current_revision()
        .await
        .map_err(ctx("current revision"))?;
    // Far more changes than the server's (small) history keeps.
    let mut last = 0;
    for i in 0..64 {
        last = e
            .proxy
            .report(vec![server_snapshot(
                &server_id,
                &client_id,
                CLOSED,
                "origin.example",
                3000 + i,
            )])
            .await?;
    }
    let filter = Some(ConnectionFilter {
        client_id: client_id.clone(),
        ..Default::default()
    });
    let req = WatchConnectionsRequest {
        start_after_revision: start,
        filter: filter.clone(),
        ..Default::default()
    };
    // The error may come as the call's status or as the stream's first item.
    let res = match e.client.connections.watch_connections(req).await {
        Ok(resp) => resp.into_inner().message().await.map(|m| format!("{m:?}")),
        Err(s) => Err(s),
    };
    let d = expect_error(
        &format!("watch after compacted revision {start}"),
        res,
        Code::OutOfRange,
        reason::REVISION_COMPACTED,
    )?;
    match d.revision(meta::OLDEST_REVISION) {
        Some(oldest) if oldest > start && oldest <= last => {}
        _ => {
            return Err(format!(
                "ErrorInfo metadata oldestRevision = {:?}, want a revision in ({start}, {last}]",
                d.metadata(meta::OLDEST_REVISION)
            ));
        }
    }

    // The watcher recovers: relist, then watch from the listing's revision.
    let opts = WatchOptions {
        start_after_revision: start,
        filter,
        bookmarks: true,
        relist: true,
        ..Default::default()
    };
    let mut watcher = Watcher::new(e.client.clone(), opts);
    let (records, list_rev, cause) = match watcher.item().await.map_err(ctx("watch with relist"))? {
        WatchItem::Relisted {
            records,
            revision,
            cause,
            ..
        } => (records, revision, cause),
        WatchItem::Event(ev) => {
            return Err(format!(
                "watch from a compacted revision delivered {ev:?} instead of relisting"
            ));
        }
    };
    let port = records
        .iter()
        .find(|r| conn_id(r) == server_id)
        .and_then(|r| server_of(r).address)
        .map(|a| a.port);
    if list_rev < last || port != Some(3063) || cause != RelistCause::Compacted {
        return Err(format!(
            "relist: revision {list_rev} (last write {last}), server port {port:?} (want 3063), cause {cause:?} (want Compacted)"
        ));
    }
    let extra = e
        .proxy
        .report(vec![server_snapshot(
            &server_id,
            &client_id,
            CLOSED,
            "after-relist.example",
            443,
        )])
        .await?;
    let mut added = 0;
    loop {
        match watcher.item().await.map_err(ctx("watch after relist"))? {
            // The listing's difference to what this watcher returned
            // (nothing): every record as ADDED.
            WatchItem::Event(ev) if ev.revision == list_rev && is_change(&ev) => {
                if ev.r#type != WatchEventType::Added as i32 {
                    return Err(format!("relist returned {ev:?}, want only ADDED"));
                }
                added += 1;
            }
            WatchItem::Event(ev) if is_change(&ev) => {
                let host = ev.connection.as_ref().map(host_of).unwrap_or_default();
                if ev.revision != extra || host != "after-relist.example" {
                    return Err(format!(
                        "first event after relist: revision {} host {host}, want the write at {extra}",
                        ev.revision
                    ));
                }
                if added != records.len() {
                    return Err(format!(
                        "relist of {} records returned {added} as ADDED",
                        records.len()
                    ));
                }
                return Ok(());
            }
            WatchItem::Event(_) => {}
            WatchItem::Relisted { revision, .. } => {
                return Err(format!("relisted a second time (revision {revision})"));
            }
        }
    }
}

async fn watch_slow_consumer(e: &mut Env) -> R {
    let client_id = new_id();
    let servers = [new_id(), new_id(), new_id(), new_id()];
    e.proxy.report(vec![client_snapshot(&client_id)]).await?;
    // Small windows, so backpressure reaches the server before hyper has
    // buffered megabytes on its behalf.
    let opts = ConnectOptions {
        initial_stream_window: Some(65_535),
        initial_connection_window: Some(65_535),
        ..e.opts.clone()
    };
    let slow = connmeta::connect_with(&e.target, &opts)
        .await
        .map_err(|e| e.to_string())?;
    let start = slow
        .current_revision()
        .await
        .map_err(ctx("current revision"))?;
    let filter = Some(ConnectionFilter {
        client_id: client_id.clone(),
        ..Default::default()
    });
    let req = WatchConnectionsRequest {
        start_after_revision: start,
        filter: filter.clone(),
        ..Default::default()
    };
    // Opened in a task: the call completes only once the server sends
    // headers, which it may do only with the first event.
    let mut connections = slow.connections.clone();
    let call = tokio::spawn(async move { connections.watch_connections(req).await });
    let mut want = vec![
        e.proxy
            .report(vec![padded(&servers[0], &client_id, 1)])
            .await?,
    ];
    let mut stream = call
        .await
        .map_err(|e| e.to_string())?
        .map_err(ctx("open watch"))?
        .into_inner();
    let mut got = Vec::new();
    // One change read proves the watcher is registered before the flood.
    let first = stream
        .message()
        .await
        .map_err(ctx("first event"))?
        .unwrap_or_default();
    got.extend(
        first
            .events
            .iter()
            .filter(|ev| is_change(ev))
            .map(|ev| ev.revision),
    );

    // Flood while not reading: 1,200 changes of ~2 KiB, 24 per batch.
    for b in 0..50u32 {
        let batch: Vec<_> = (0..24)
            .map(|i| b * 24 + i)
            .map(|n| padded(&servers[n as usize % servers.len()], &client_id, 10_000 + n))
            .collect();
        let len = batch.len() as i64;
        let rev = e.proxy.report(batch).await?;
        want.extend(rev - len + 1..=rev);
    }
    let final_rev = *want.last().expect("not empty");

    // Now read: the stream must end with WATCHER_TOO_SLOW, not just deliver
    // everything; a bounded wait after the last revision tells them apart.
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(15), stream.message()).await {
            Err(_) | Ok(Ok(None)) => {
                return Err(format!(
                    "watcher that did not read while {} changes (~{} KiB) were written was never ended WATCHER_TOO_SLOW (it received {})",
                    want.len() - 1,
                    (want.len() - 1) * 2,
                    got.len()
                ));
            }
            Ok(Ok(Some(resp))) => got.extend(
                resp.events
                    .iter()
                    .filter(|ev| is_change(ev))
                    .map(|ev| ev.revision),
            ),
            Ok(Err(status)) => break status,
        }
    };
    let d = expect_error(
        "slow watcher",
        Err::<(), _>(status),
        Code::ResourceExhausted,
        reason::WATCHER_TOO_SLOW,
    )?;
    let Some(named) = d.revision(meta::LAST_REVISION) else {
        return Err(format!(
            "ErrorInfo metadata last_revision = {:?}, want a revision",
            d.metadata(meta::LAST_REVISION)
        ));
    };
    let last_got = got.last().copied().unwrap_or(start);
    if named != last_got {
        return Err(format!(
            "lastRevision = {named} but the last revision received was {last_got}: resuming from it would lose or repeat changes"
        ));
    }
    if named >= final_rev {
        return Err(format!(
            "watcher was ended only after receiving everything (last_revision {named}, final write {final_rev})"
        ));
    }
    // Resume exactly where the server said, through the Watcher.
    let opts = WatchOptions {
        start_after_revision: named,
        filter,
        ..Default::default()
    };
    let mut watcher = Watcher::new(e.client.clone(), opts);
    while watcher.last_revision() < final_rev {
        if let WatchItem::Event(ev) = watcher
            .item()
            .await
            .map_err(ctx("resume from last_revision"))?
            && is_change(&ev)
        {
            got.push(ev.revision);
        }
    }
    check_revisions(&got, &want)
}

async fn keepalive(e: &mut Env) -> R {
    let counter = PingCounter::default();
    let opts = ConnectOptions {
        keepalive: Duration::from_secs(10),
        ..e.opts.clone()
    };
    let channel = counting_channel(&e.target, &opts, counter.clone()).await?;
    let c = connmeta::Client::new(channel);
    let client_id = new_id();
    e.proxy.report(vec![client_snapshot(&client_id)]).await?;
    let start = c
        .current_revision()
        .await
        .map_err(ctx("current revision"))?;
    // No bookmarks: the stream must stay silent so only pings cross it.
    let req = WatchConnectionsRequest {
        start_after_revision: start,
        filter: Some(ConnectionFilter {
            client_id: client_id.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let mut connections = c.connections.clone();
    tokio::spawn(async move {
        let mut stream = match connections.watch_connections(req).await {
            Ok(r) => r.into_inner(),
            Err(s) => return tx.send(Err(s)).await,
        };
        loop {
            let item = match stream.message().await {
                Ok(Some(m)) => Ok(m),
                Ok(None) => Err(Status::unavailable("stream ended")),
                Err(s) => Err(s),
            };
            let end = item.is_err();
            tx.send(item).await?;
            if end {
                return Ok(());
            }
        }
    });
    if let Ok(item) = tokio::time::timeout(e.keepalive, rx.recv()).await {
        let pings = counter.pings();
        return Err(match item {
            Some(Err(s))
                if s.message().contains("too_many_pings")
                    || format!("{s:?}").contains("too_many_pings") =>
            {
                format!(
                    "idle watch ended after {pings} pings with too_many_pings (the server's minimum ping interval is above 10 s): {s:?}"
                )
            }
            Some(Err(s)) => format!("idle watch ended after {pings} pings: {s:?}"),
            Some(Ok(m)) => format!("idle watch received {m:?}; nothing should match"),
            None => "watch task ended".into(),
        });
    }
    let pings = counter.pings();
    // Half the ideal count: timers drift and pings wait for activity to stop,
    // but a client that does not ping at all sends none.
    let min_pings = (e.keepalive.as_secs() / 20).max(1);
    if e.keepalive >= Duration::from_secs(20) && pings < min_pings {
        return Err(format!(
            "only {pings} keepalive pings in {:?} with a 10 s interval: the client is not pinging, so this proved nothing",
            e.keepalive
        ));
    }
    // The watch is still alive: a change arrives on it.
    let rev = e
        .proxy
        .report(vec![server_snapshot(
            &new_id(),
            &client_id,
            CLOSED,
            "origin.example",
            443,
        )])
        .await?;
    match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
        Ok(Some(Ok(m))) if m.events.first().map(|ev| ev.revision) == Some(rev) => {}
        Ok(other) => {
            return Err(format!(
                "after the idle period the watch delivered {other:?}, want revision {rev}"
            ));
        }
        Err(_) => {
            return Err(format!(
                "after {:?} idle and {pings} pings the watch did not deliver revision {rev}",
                e.keepalive
            ));
        }
    }
    println!("keepalive: {pings} pings in {:?}, watch alive", e.keepalive);
    Ok(())
}

async fn health(e: &mut Env) -> R {
    for service in ["", "connmeta.v1.ConnectionService"] {
        let resp = e
            .client
            .health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .map_err(|s| format!("health check {service:?}: {s:?}"))?
            .into_inner();
        if resp.status != ServingStatus::Serving as i32 {
            return Err(format!(
                "health check {service:?}: {:?}, want SERVING",
                ServingStatus::try_from(resp.status)
            ));
        }
    }
    Ok(())
}

async fn unix_socket(e: &mut Env) -> R {
    let target = if e.unix_target.is_empty() && e.target.starts_with("unix:") {
        e.target.clone()
    } else {
        e.unix_target.clone()
    };
    if !target.starts_with("unix:") {
        return Err(format!(
            "case unix_socket needs --unix-target unix:///path (got {target:?})"
        ));
    }
    let (_, id) = report_server(e, OPEN, "origin.example", 443).await?;
    let over_tcp = e.client.get(&id).await.map_err(ctx("get"))?;
    let mut uds = e.connect(&target).await?;
    let over_uds = uds
        .get(&id)
        .await
        .map_err(|s| format!("over {target}: {s:?}"))?;
    if over_tcp != over_uds {
        return Err(format!(
            "record differs between listeners:\n{}: {over_tcp:?}\n{target}: {over_uds:?}",
            e.target
        ));
    }
    let res = uds
        .connections
        .get_connection(GetConnectionRequest {
            id: new_id(),
            ..Default::default()
        })
        .await;
    expect_error(
        &format!("get unknown id over {target}"),
        res,
        Code::NotFound,
        reason::CONNECTION_NOT_FOUND,
    )
    .map(drop)
}

/// Checks that `rejected` is exactly one INVALID_SNAPSHOT rejection of the
/// snapshot at `index`, with `id`, and a violation naming `field` (the path
/// from the request) or a part of it.
fn check_rejection(
    what: &str,
    rejected: &[SnapshotRejection],
    index: u32,
    id: &str,
    field: &str,
) -> R {
    let [r] = rejected else {
        return Err(format!(
            "{what}: ack.rejected = {rejected:?}, want exactly the snapshot at index {index}"
        ));
    };
    if r.index != index
        || r.connection_id != id
        || r.reason != "INVALID_SNAPSHOT"
        || r.message.is_empty()
    {
        return Err(format!(
            "{what}: rejection {r:?}, want index {index}, connection_id {id}, reason INVALID_SNAPSHOT and a message"
        ));
    }
    let named = r.violations.iter().any(|v| {
        v.field == field
            || v.field
                .strip_prefix(field)
                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
    });
    if !named {
        return Err(format!(
            "{what}: violations {:?} do not name {field:?}",
            r.violations
        ));
    }
    Ok(())
}

fn snapshot_server_id(s: &connmeta::v1::ConnectionSnapshot) -> String {
    match &s.connection {
        Some(connection_snapshot::Connection::Server(srv)) => srv
            .connection
            .as_ref()
            .map(|c| c.id.clone())
            .unwrap_or_default(),
        _ => String::new(),
    }
}

async fn report_rejects_bad_snapshot(e: &mut Env) -> R {
    let (client_id, bad_id, good_id) = (new_id(), new_id(), new_id());
    let mut bad = server_snapshot(&bad_id, &client_id, CLOSED, "origin.example", 443);
    if let Some(connection_snapshot::Connection::Server(srv)) = bad.connection.as_mut() {
        srv.connection.as_mut().expect("set").transport_protocol =
            TransportProtocol::Unspecified as i32;
    }
    let ack = e
        .proxy
        .report_ack(vec![
            client_snapshot(&client_id),
            bad,
            server_snapshot(&good_id, &client_id, CLOSED, "origin.example", 443),
        ])
        .await?;
    check_rejection(
        "batch 1",
        &ack.rejected,
        1,
        &bad_id,
        "batch.snapshots[1].server.connection.transport_protocol",
    )?;
    e.client.get(&client_id).await.map_err(ctx(
        "a valid snapshot of the batch (the client) was not stored",
    ))?;
    let good = e.client.get(&good_id).await.map_err(ctx(
        "a valid snapshot of the batch (the server) was not stored",
    ))?;
    if meta_of(&good).revision != ack.revision {
        return Err(format!(
            "the last valid snapshot is at revision {}, the ack says the store reached {}",
            meta_of(&good).revision,
            ack.revision
        ));
    }
    let res = e.client.get(&bad_id).await;
    expect_error(
        "get the rejected snapshot's id",
        res,
        Code::NotFound,
        reason::CONNECTION_NOT_FOUND,
    )?;

    // The stream goes on: the next batch is acked, again snapshot by snapshot.
    let worse = server_snapshot(&new_id(), &client_id, CLOSED, "origin.example", 70000);
    let worse_id = snapshot_server_id(&worse);
    let fixed = server_snapshot(&bad_id, &client_id, CLOSED, "origin.example", 443);
    let ack2 = e
        .proxy
        .report_ack(vec![worse, fixed])
        .await
        .map_err(|err| format!("the batch after a rejection: {err}"))?;
    check_rejection(
        "batch 2",
        &ack2.rejected,
        0,
        &worse_id,
        "batch.snapshots[0].server.address.port",
    )?;
    let rec = e
        .client
        .get(&bad_id)
        .await
        .map_err(ctx("the corrected snapshot of batch 2 was not stored"))?;
    if meta_of(&rec).revision != ack2.revision || ack2.revision <= ack.revision {
        return Err(format!(
            "corrected snapshot at revision {}, batch 2 acked at {} after batch 1 at {}",
            meta_of(&rec).revision,
            ack2.revision,
            ack.revision
        ));
    }
    Ok(())
}

async fn two_proxies_resync_independent(e: &mut Env) -> R {
    let mut a = Proxy::new(&e.client);
    let mut b = Proxy::new(&e.client);
    let (client_a, client_b) = (new_id(), new_id());
    a.report(vec![client_snapshot(&client_a)]).await?;
    b.report(vec![client_snapshot(&client_b)]).await?;

    // B starts a resync; A resyncs completely meanwhile, without its client.
    b.resync_start()
        .await
        .map_err(|err| format!("proxy {}: {err}", b.id))?;
    a.resync_start()
        .await
        .map_err(|err| format!("proxy {}: {err}", a.id))?;
    let end_a = a
        .resync_end()
        .await
        .map_err(|err| format!("proxy {} (while {} resyncs): {err}", a.id, b.id))?;
    if end_a.closed_by_resync != 1 {
        return Err(format!(
            "proxy {}'s resync closed {} connections, want 1 (its own client)",
            a.id, end_a.closed_by_resync
        ));
    }
    let rec_a = e.client.get(&client_a).await.map_err(ctx("get"))?;
    let state_a = client_state(&rec_a);
    let m = meta_of(&rec_a);
    if state_a != CLOSED as i32 || m.last_hook != Hook::Resync as i32 || m.proxy_id != a.id {
        return Err(format!(
            "proxy {}'s unreported client: state {state_a}, last_hook {}, proxy_id {:?}; want CLOSED, HOOK_RESYNC, {:?}",
            a.id, m.last_hook, m.proxy_id, a.id
        ));
    }
    let b_id = b.id.clone();
    let check_b = async |client: &mut connmeta::Client, when: &str| -> R {
        let rec = client.get(&client_b).await.map_err(ctx("get"))?;
        let m = meta_of(&rec);
        if client_state(&rec) != OPEN as i32 || m.proxy_id != b_id {
            return Err(format!(
                "{when}: proxy {b_id}'s client has state {}, proxy_id {:?}; want OPEN, {b_id:?}",
                client_state(&rec),
                m.proxy_id
            ));
        }
        Ok(())
    };
    check_b(&mut e.client, &format!("after proxy {}'s resync", a.id)).await?;

    // B completes its own resync, which still holds its client.
    b.report(vec![resync_client(&client_b)]).await?;
    let end_b = b
        .resync_end()
        .await
        .map_err(|err| format!("proxy {b_id}: resync_end after {}'s resync: {err}", a.id))?;
    if end_b.closed_by_resync != 0 {
        return Err(format!(
            "proxy {b_id}'s resync closed {} connections, want 0",
            end_b.closed_by_resync
        ));
    }
    check_b(&mut e.client, &format!("after proxy {b_id}'s resync")).await
}

fn client_state(rec: &ConnectionRecord) -> i32 {
    match &rec.kind {
        Some(connection_record::Kind::Client(c)) => c.connection.as_ref().map_or(0, |c| c.state),
        _ => 0,
    }
}
