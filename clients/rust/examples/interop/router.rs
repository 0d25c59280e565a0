//! The router cases: both sides of RouterService, a router on
//! RouterService.Route and the proxy on a Report stream of its own (the
//! proxy of `Env` drops everything but acks).

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use connmeta::v1::{
    ChangeStatus, ConnectionFilter, ReportAck, ReportBatch, ReportRequest, ReportResponse,
    ResyncEnd, ResyncStart, RouteAnswer, RouteDecision, RouteQuery, RouteRequest, RouteResponse,
    RouteSubscribe, RouteSubscribed, RoutingState, WatchEventType, connection_record,
    report_request, report_response, route_request, route_response,
    router_service_client::RouterServiceClient,
};
use connmeta::{WatchItem, WatchOptions, Watcher};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use crate::Env;
use crate::cases::{Details, NextItem};
use crate::proxy::{addr, applied_at, client_snapshot, new_id, new_proxy_id, server_snapshot};

type R = Result<(), String>;

/// Bounds every single wait: a message the contract promises "at once"
/// that has not come by then is not coming.
const STEP: Duration = Duration::from_secs(5);

fn status_text<E: Details>(e: &E) -> String {
    let d = e.details();
    format!("{:?}: {}", d.code, d.message)
}

/// The next message of a stream within `within`.
async fn next_within<T>(s: &mut Streaming<T>, within: Duration, what: &str) -> Result<T, Status> {
    match timeout(within, s.message()).await {
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no {what} within {within:?}"
        ))),
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => Err(Status::unknown(format!(
            "stream ended while waiting for {what}"
        ))),
        Ok(Err(s)) => Err(Status::new(
            s.code(),
            format!("stream ended while waiting for {what}: {}", s.message()),
        )),
    }
}

/// A channel of its own for RouterService (the crate's Client has no stub
/// for it).
async fn router_channel(e: &Env) -> Result<Channel, String> {
    match timeout(STEP, connmeta::connect_channel(&e.target, &e.opts)).await {
        Ok(Ok(ch)) => Ok(ch),
        Ok(Err(e)) => Err(format!("connect for RouterService: {e}")),
        Err(_) => Err(format!("connect for RouterService: not within {STEP:?}")),
    }
}

/// One subscription on RouterService.Route; dropping it ends the stream.
struct Router {
    name: String,
    tx: mpsc::Sender<RouteRequest>,
    rx: Streaming<RouteResponse>,
}

impl Router {
    /// Opens a Route stream, subscribes as `name`; the first RouteSubscribed.
    async fn subscribe(ch: &Channel, name: &str) -> Result<(Router, RouteSubscribed), Status> {
        let (tx, rx) = mpsc::channel(16);
        let subscribe = RouteRequest {
            message: Some(route_request::Message::Subscribe(RouteSubscribe {
                name: name.to_owned(),
            })),
        };
        tx.send(subscribe)
            .await
            .map_err(|_| Status::internal("request channel closed"))?;
        let mut client = RouterServiceClient::new(ch.clone());
        let call = timeout(STEP, client.route(ReceiverStream::new(rx)))
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!("Route not opened within {STEP:?}"))
            })??;
        let mut rx = call.into_inner();
        let first = next_within(&mut rx, STEP, "RouteSubscribed").await?;
        match first.message {
            Some(route_response::Message::Subscribed(s)) => Ok((
                Router {
                    name: name.to_owned(),
                    tx,
                    rx,
                },
                s,
            )),
            other => Err(Status::unknown(format!(
                "first message is {other:?}, want RouteSubscribed"
            ))),
        }
    }

    /// Subscribes and waits until the router receives queries. A router of
    /// an earlier case may still be leaving (its stream's end reaches the
    /// sidecar a moment after its process exited): this one is then a
    /// standby for that moment, which the contract allows.
    async fn active(ch: &Channel, name: &str) -> Result<Router, String> {
        let fail = |s: Status| format!("router {name}: {}", status_text(&s));
        let (mut r, mut sub) = Router::subscribe(ch, name).await.map_err(fail)?;
        while !sub.active {
            let what = format!(
                "RouteSubscribed{{active: true}} (standby behind {:?})",
                sub.active_router
            );
            let m = next_within(&mut r.rx, STEP, &what).await.map_err(fail)?;
            sub = match m.message {
                Some(route_response::Message::Subscribed(s)) => s,
                other => return Err(format!("router {name}: a standby got {other:?}")),
            };
        }
        if sub.active_router != name {
            return Err(format!(
                "router {name}: RouteSubscribed{{active: true}} names {:?} as the active router",
                sub.active_router
            ));
        }
        Ok(r)
    }

    async fn next(&mut self, within: Duration, what: &str) -> Result<RouteResponse, String> {
        next_within(&mut self.rx, within, what)
            .await
            .map_err(|s| format!("router {}: {}", self.name, status_text(&s)))
    }

    /// Waits for the query about `server_id`. Queries about other servers
    /// are answered "no change" at once so nothing else waits on this router.
    async fn await_query(&mut self, server_id: &str) -> Result<RouteQuery, String> {
        let until = Instant::now() + STEP;
        loop {
            let what = format!("RouteQuery for server {server_id}");
            let m = self
                .next(until.saturating_duration_since(Instant::now()), &what)
                .await?;
            let Some(route_response::Message::Query(q)) = m.message else {
                return Err(format!(
                    "router {}: got {:?} while waiting for a query",
                    self.name, m.message
                ));
            };
            if query_server_id(&q) == server_id {
                return Ok(q);
            }
            self.answer(RouteAnswer {
                query_id: q.query_id.clone(),
                ..Default::default()
            })
            .await?;
        }
    }

    async fn answer(&mut self, a: RouteAnswer) -> R {
        let id = a.query_id.clone();
        let req = RouteRequest {
            message: Some(route_request::Message::Answer(a)),
        };
        self.tx
            .send(req)
            .await
            .map_err(|_| format!("router {}: send answer to {id}: stream closed", self.name))
    }
}

fn query_server_id(q: &RouteQuery) -> String {
    match q.server.as_ref().and_then(|r| r.kind.as_ref()) {
        Some(connection_record::Kind::Server(s)) => s
            .connection
            .as_ref()
            .map(|c| c.id.clone())
            .unwrap_or_default(),
        _ => String::new(),
    }
}

/// The proxy's Report stream, with everything the sidecar sends on it:
/// acks, RoutingState and RouteDecision.
struct RoutingProxy {
    /// ReportRequest.proxy_id, sent on the stream's first message.
    id: String,
    tx: mpsc::Sender<ReportRequest>,
    rx: Streaming<ReportResponse>,
    seq: u64,
    state: RoutingState,
    decisions: Vec<RouteDecision>,
    acks: HashMap<u64, ReportAck>,
}

impl RoutingProxy {
    /// Opens a Report stream and reads its first message, which the
    /// contract says is the RoutingState.
    async fn open(client: &connmeta::Client) -> Result<RoutingProxy, String> {
        let (tx, rx) = mpsc::channel(16);
        let mut reports = client.reports.clone();
        let call = timeout(STEP, reports.report(ReceiverStream::new(rx)))
            .await
            .map_err(|_| format!("open report stream: no response headers within {STEP:?}"))?
            .map_err(|s| format!("open report stream: {}", status_text(&s)))?;
        let mut rx = call.into_inner();
        let first = next_within(&mut rx, STEP, "the first message (RoutingState)")
            .await
            .map_err(|s| format!("report stream: {}", status_text(&s)))?;
        let Some(report_response::Message::RoutingState(state)) = first.message else {
            return Err(format!(
                "the report stream's first message is {:?}, want RoutingState",
                first.message
            ));
        };
        Ok(RoutingProxy {
            id: new_proxy_id(),
            tx,
            rx,
            seq: 0,
            state,
            decisions: Vec::new(),
            acks: HashMap::new(),
        })
    }

    /// Takes one message off the stream and files it.
    async fn receive(&mut self, within: Duration, what: &str) -> R {
        let m = next_within(&mut self.rx, within, what)
            .await
            .map_err(|s| format!("report stream: {}", status_text(&s)))?;
        match m.message {
            Some(report_response::Message::Ack(a)) => {
                self.acks.insert(a.sequence, a);
            }
            Some(report_response::Message::RoutingState(s)) => self.state = s,
            Some(report_response::Message::RouteDecision(d)) => self.decisions.push(d),
            None => return Err("report stream: a message without content".into()),
        }
        Ok(())
    }

    async fn send(&mut self, message: report_request::Message) -> Result<u64, String> {
        self.seq += 1;
        let seq = self.seq;
        let req = ReportRequest {
            sequence: seq,
            proxy_id: if seq == 1 {
                self.id.clone()
            } else {
                String::new()
            },
            message: Some(message),
            // The addon's counters; the interop proxies have none to send.
            proxy_stats: None,
        };
        self.tx
            .send(req)
            .await
            .map_err(|_| format!("report request {seq}: stream closed"))?;
        Ok(seq)
    }

    /// Waits for the ack of request `seq`; a rejected snapshot fails it
    /// (the router cases send only valid ones).
    async fn await_ack(&mut self, seq: u64) -> Result<i64, String> {
        loop {
            if let Some(ack) = self.acks.get(&seq) {
                if !ack.rejected.is_empty() {
                    return Err(format!(
                        "report request {seq}: the sidecar rejected {:?}",
                        ack.rejected
                    ));
                }
                return Ok(ack.revision);
            }
            self.receive(STEP, &format!("the ack of request {seq}"))
                .await?;
        }
    }

    /// ResyncStart{route_deadline} and ResyncEnd, as the proxy sends after
    /// every (re)connect; that sets this stream's route deadline.
    async fn resync(&mut self, deadline: Duration) -> R {
        let d = prost_types::Duration::try_from(deadline).map_err(|e| e.to_string())?;
        let start = report_request::Message::ResyncStart(ResyncStart {
            route_deadline: Some(d),
        });
        let seq = self.send(start).await?;
        self.await_ack(seq).await?;
        let seq = self
            .send(report_request::Message::ResyncEnd(ResyncEnd {}))
            .await?;
        self.await_ack(seq).await.map(|_| ())
    }

    /// Waits until the latest RoutingState is active and names `name`.
    async fn await_router(&mut self, name: &str) -> R {
        while !self.state.active || self.state.router != name {
            let what = format!(
                "RoutingState{{active: true, router: {name:?}}} (latest: {:?})",
                self.state
            );
            self.receive(STEP, &what).await?;
        }
        Ok(())
    }

    /// Waits at most `within` for the RouteDecision about `server_id`.
    async fn await_decision(
        &mut self,
        server_id: &str,
        within: Duration,
    ) -> Result<RouteDecision, String> {
        let until = Instant::now() + within;
        loop {
            if let Some(i) = self.decisions.iter().position(|d| d.server_id == server_id) {
                return Ok(self.decisions.remove(i));
            }
            let what = format!("RouteDecision for server {server_id}");
            self.receive(until.saturating_duration_since(Instant::now()), &what)
                .await?;
        }
    }

    /// Reports a client and its server at server_connect (CLOSED,
    /// origin-a:443); when the batch was sent.
    async fn routed_connect(
        &mut self,
        client_id: &str,
        server_id: &str,
    ) -> Result<(Instant, SystemTime), String> {
        let sent = (Instant::now(), SystemTime::now());
        let batch = report_request::Message::Batch(ReportBatch {
            snapshots: vec![
                client_snapshot(client_id),
                server_snapshot(
                    server_id,
                    client_id,
                    connmeta::v1::ConnectionState::Closed,
                    "origin-a",
                    443,
                ),
            ],
        });
        let seq = self.send(batch).await?;
        self.await_ack(seq).await?;
        Ok(sent)
    }
}

/// Checks what a RouteQuery says about the reported connect.
fn check_query(q: &RouteQuery, client_id: &str, sent: SystemTime, route_deadline: Duration) -> R {
    let server = match q.server.as_ref().and_then(|r| r.kind.as_ref()) {
        Some(connection_record::Kind::Server(s)) => s.clone(),
        _ => {
            return Err(format!(
                "RouteQuery.server is {:?}, want a server",
                q.server
            ));
        }
    };
    let state = server.connection.as_ref().map_or(0, |c| c.state);
    if state != connmeta::v1::ConnectionState::Closed as i32
        || server.address != Some(addr("origin-a", 443))
    {
        return Err(format!(
            "RouteQuery.server is {server:?}, want the CLOSED server with address origin-a:443"
        ));
    }
    let got_client = match q.client.as_ref().and_then(|r| r.kind.as_ref()) {
        Some(connection_record::Kind::Client(c)) => c
            .connection
            .as_ref()
            .map(|c| c.id.clone())
            .unwrap_or_default(),
        _ => String::new(),
    };
    if got_client != client_id {
        return Err(format!(
            "RouteQuery.client is {got_client:?}, want the reported client {client_id}"
        ));
    }
    if q.query_id.is_empty() {
        return Err("RouteQuery.query_id is empty".into());
    }
    // The sidecar's share of the proxy's deadline ends before the proxy's own.
    let deadline = q
        .deadline
        .and_then(|t| SystemTime::try_from(t).ok())
        .ok_or_else(|| format!("RouteQuery.deadline is {:?}", q.deadline))?;
    match deadline.duration_since(sent) {
        Ok(d) if !d.is_zero() && d <= route_deadline => Ok(()),
        other => Err(format!(
            "RouteQuery.deadline is {other:?} after the report, want within the route deadline (0, {route_deadline:?}]"
        )),
    }
}

fn route_address(paths: &[&str], host: &str, port: u32) -> RouteAnswer {
    RouteAnswer {
        address: Some(addr(host, port)),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
        ..Default::default()
    }
}

fn mask_paths(d: &RouteDecision) -> Vec<String> {
    d.update_mask.clone().map(|m| m.paths).unwrap_or_default()
}

fn record_server(rec: &connmeta::v1::ConnectionRecord) -> connmeta::v1::Server {
    match &rec.kind {
        Some(connection_record::Kind::Server(s)) => s.clone(),
        _ => Default::default(),
    }
}

pub async fn router_retargets_connect(e: &mut Env) -> R {
    const NAME: &str = "rust-router";
    let route_deadline = Duration::from_secs(2);
    let target = addr("origin-b", 8443);

    let ch = router_channel(e).await?;
    let mut r = Router::active(&ch, NAME).await?;
    let mut p = RoutingProxy::open(&e.client).await?;
    p.await_router(NAME).await?;
    p.resync(route_deadline).await?;
    let start = e
        .client
        .current_revision()
        .await
        .map_err(|s| format!("current revision: {}", status_text(&s)))?;

    // Watch the client's connections from before the connect, until the
    // server's record shows the change applied.
    let (client_id, server_id) = (new_id(), new_id());
    let opts = WatchOptions {
        start_after_revision: start,
        filter: Some(ConnectionFilter {
            client_id: client_id.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut watcher = Watcher::new(e.client.clone(), opts);
    let watched_id = server_id.clone();
    let watch = tokio::spawn(async move {
        let mut modified = Vec::new();
        loop {
            match watcher.item().await {
                Ok(WatchItem::Event(ev))
                    if ev.r#type == WatchEventType::Modified as i32
                        && ev.connection.as_ref().is_some_and(|c| {
                            record_server(c)
                                .connection
                                .is_some_and(|c| c.id == watched_id)
                        }) =>
                {
                    let applied = last_change_of(&ev)
                        .is_some_and(|c| c.status == ChangeStatus::Applied as i32);
                    modified.push(ev);
                    if applied {
                        return Ok(modified);
                    }
                }
                Ok(_) => {}
                Err(s) => return Err(format!("watch from revision {start}: {}", status_text(&s))),
            }
        }
    });

    let (sent, sent_wall) = p.routed_connect(&client_id, &server_id).await?;
    let q = r.await_query(&server_id).await?;
    check_query(&q, &client_id, sent_wall, route_deadline)?;
    let mut answer = route_address(&["address"], "origin-b", 8443);
    answer.query_id = q.query_id.clone();
    r.answer(answer).await?;

    let d = p
        .await_decision(&server_id, route_deadline.saturating_sub(sent.elapsed()))
        .await?;
    if d.query_id != q.query_id
        || d.actor != NAME
        || d.timed_out
        || mask_paths(&d) != ["address"]
        || d.address.as_ref() != Some(&target)
    {
        return Err(format!(
            "RouteDecision is {d:?}, want query_id {}, actor {NAME:?}, update_mask [address], address origin-b:8443, not timed out",
            q.query_id
        ));
    }

    // The sidecar recorded the decision before sending it: desired state,
    // while the record still shows what the proxy reported.
    let rec = e
        .client
        .get(&server_id)
        .await
        .map_err(|s| format!("get {server_id}: {}", status_text(&s)))?;
    if record_server(&rec).address != Some(addr("origin-a", 443)) {
        return Err(format!(
            "GetConnection address after the decision = {:?}, want origin-a:443 until the proxy reports it applied",
            record_server(&rec).address
        ));
    }
    let meta = rec.metadata.clone().unwrap_or_default();
    let pc = meta.pending_change.clone().unwrap_or_default();
    if pc.actor != NAME
        || pc.query_id != q.query_id
        || pc.fields != ["address"]
        || pc.address.as_ref() != Some(&target)
        || pc.status != ChangeStatus::Pending as i32
        || pc.revision != meta.revision
    {
        return Err(format!(
            "metadata.pending_change = {:?}, want actor {NAME:?}, query_id {}, fields [address], address origin-b:8443, status PENDING, revision {}",
            meta.pending_change, q.query_id, meta.revision
        ));
    }
    if meta.last_change.is_some() {
        return Err(format!(
            "metadata.last_change = {:?} before the proxy reported the outcome, want none",
            meta.last_change
        ));
    }
    let pending_rev = meta.revision;

    // The proxy applies it in server_connect and says so, as the addon does.
    let batch = report_request::Message::Batch(ReportBatch {
        snapshots: vec![applied_at(
            &server_id,
            &client_id,
            &target,
            &q.query_id,
            NAME,
        )],
    });
    let seq = p.send(batch).await?;
    let applied_rev = p.await_ack(seq).await?;
    let rec = e
        .client
        .get(&server_id)
        .await
        .map_err(|s| format!("get {server_id}: {}", status_text(&s)))?;
    let meta = rec.metadata.clone().unwrap_or_default();
    if record_server(&rec).address.as_ref() != Some(&target) || meta.revision != applied_rev {
        return Err(format!(
            "after the APPLIED outcome (ack revision {applied_rev}): address {:?} at revision {}, want origin-b:8443 at {applied_rev}",
            record_server(&rec).address,
            meta.revision
        ));
    }
    if meta.pending_change.is_some() {
        return Err(format!(
            "metadata.pending_change = {:?} after the APPLIED outcome, want none",
            meta.pending_change
        ));
    }
    let lc = meta.last_change.clone().unwrap_or_default();
    if lc.actor != NAME
        || lc.query_id != q.query_id
        || !lc.fields.iter().any(|f| f == "address")
        || lc.status != ChangeStatus::Applied as i32
        || lc.revision != pending_rev
    {
        return Err(format!(
            "metadata.last_change = {:?}, want actor {NAME:?}, query_id {}, fields [address], status APPLIED, revision {pending_rev} (accepted at)",
            meta.last_change, q.query_id
        ));
    }

    let evs = match timeout(STEP, watch).await {
        Ok(Ok(result)) => result?,
        Ok(Err(join)) => return Err(format!("watch task: {join}")),
        Err(_) => {
            return Err(format!(
                "watch from revision {start}: no MODIFIED event with last_change APPLIED within {STEP:?}"
            ));
        }
    };
    let saw_pending = evs.iter().any(|ev| {
        ev.revision == pending_rev
            && ev
                .connection
                .as_ref()
                .and_then(|c| c.metadata.as_ref())
                .and_then(|m| m.pending_change.as_ref())
                .is_some_and(|c| c.actor == NAME)
    });
    let last = evs.last().expect("the watch returns after an event");
    if !saw_pending
        || last.revision != applied_rev
        || last_change_of(last).is_none_or(|c| c.actor != NAME)
    {
        return Err(format!(
            "watch MODIFIED events of server {server_id}: {evs:?}; want one at revision {pending_rev} with pending_change.actor {NAME:?}, then one at {applied_rev} with last_change APPLIED by {NAME:?}"
        ));
    }
    drop(r);
    Ok(())
}

fn last_change_of(ev: &connmeta::v1::WatchEvent) -> Option<&connmeta::v1::Change> {
    ev.connection
        .as_ref()
        .and_then(|c| c.metadata.as_ref())
        .and_then(|m| m.last_change.as_ref())
}

pub async fn router_silent_fails_open(e: &mut Env) -> R {
    const NAME: &str = "rust-router";
    let route_deadline = Duration::from_secs(1);
    let bound = Duration::from_secs(2);

    let ch = router_channel(e).await?;
    let mut r = Router::active(&ch, NAME).await?;
    let mut p = RoutingProxy::open(&e.client).await?;
    p.await_router(NAME).await?;
    p.resync(route_deadline).await?;
    let (client_id, server_id) = (new_id(), new_id());
    let (sent, sent_wall) = p.routed_connect(&client_id, &server_id).await?;
    let q = r.await_query(&server_id).await?;
    check_query(&q, &client_id, sent_wall, route_deadline)?;
    // The router says nothing.
    let d = p
        .await_decision(&server_id, bound.saturating_sub(sent.elapsed()))
        .await
        .map_err(|err| format!("an unanswered query (route deadline {route_deadline:?}): {err}"))?;
    let waited = sent.elapsed();
    if !d.timed_out || !mask_paths(&d).is_empty() || d.query_id != q.query_id {
        return Err(format!(
            "RouteDecision after {waited:?} is {d:?}, want timed_out with an empty update_mask for query {}",
            q.query_id
        ));
    }
    // A late answer is ignored.
    let mut late = route_address(&["address"], "origin-b", 8443);
    late.query_id = q.query_id.clone();
    r.answer(late).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rec = e
        .client
        .get(&server_id)
        .await
        .map_err(|s| format!("get {server_id}: {}", status_text(&s)))?;
    let last_change = rec.metadata.as_ref().and_then(|m| m.last_change.clone());
    let pending = rec.metadata.as_ref().and_then(|m| m.pending_change.clone());
    if record_server(&rec).address != Some(addr("origin-a", 443))
        || last_change.is_some()
        || pending.is_some()
    {
        return Err(format!(
            "after a timed-out query and a late answer the server has address {:?}, last_change {last_change:?}, pending_change {pending:?}; want origin-a:443 and no change",
            record_server(&rec).address
        ));
    }
    // Decisions about other servers may come (every proxy stream gets the
    // pending changes of UpdateServerConnection); none about this one.
    if let Some(d) = p.decisions.iter().find(|d| d.server_id == server_id) {
        return Err(format!(
            "a further RouteDecision after the timed-out one: {d:?}"
        ));
    }
    Ok(())
}

pub async fn router_standby_takes_over(e: &mut Env) -> R {
    const FIRST: &str = "rust-router-a";
    const SECOND: &str = "rust-router-b";
    let ch = router_channel(e).await?;
    let a = Router::active(&ch, FIRST).await?;
    let (mut b, sub) = Router::subscribe(&ch, SECOND)
        .await
        .map_err(|s| format!("router {SECOND}: {}", status_text(&s)))?;
    if sub.active || sub.active_router != FIRST {
        return Err(format!(
            "second router's RouteSubscribed = {sub:?}, want active false, active_router {FIRST:?}"
        ));
    }
    match Router::subscribe(&ch, FIRST).await {
        Ok(_) => {
            return Err(format!(
                "a second subscription as {FIRST:?} succeeded, want ALREADY_EXISTS"
            ));
        }
        Err(s) if s.code() == Code::AlreadyExists => {}
        Err(s) => {
            return Err(format!(
                "a second subscription as {FIRST:?}: {}; want ALREADY_EXISTS",
                status_text(&s)
            ));
        }
    }

    let mut p = RoutingProxy::open(&e.client).await?;
    p.await_router(FIRST).await?;
    drop(a); // the active router leaves
    let m = b
        .next(
            STEP,
            "RouteSubscribed{active: true} after the active router left",
        )
        .await?;
    match &m.message {
        Some(route_response::Message::Subscribed(s)) if s.active && s.active_router == SECOND => {}
        other => {
            return Err(format!(
                "standby {SECOND} got {other:?} when the active router left, want RouteSubscribed{{active: true, active_router: {SECOND:?}}}"
            ));
        }
    }
    p.await_router(SECOND).await?;
    p.resync(Duration::from_secs(2)).await?;
    let server_id = new_id();
    p.routed_connect(&new_id(), &server_id).await?;
    let q = b.await_query(&server_id).await?;
    b.answer(RouteAnswer {
        query_id: q.query_id.clone(),
        ..Default::default()
    })
    .await?;
    let d = p.await_decision(&server_id, STEP).await?;
    if d.actor != SECOND || d.timed_out || !mask_paths(&d).is_empty() {
        return Err(format!(
            "RouteDecision = {d:?}, want actor {SECOND:?}, an empty update_mask, not timed out"
        ));
    }
    Ok(())
}

/// The router of examples/router.rs (its `main` is that example's).
#[allow(dead_code)]
#[path = "../router.rs"]
mod example;

/// The example router (the helper and a function) against a real connect:
/// its decision reaches the proxy, which applies it; the record settles
/// APPLIED with the router as actor.
pub async fn router_helper_retargets(e: &mut Env) -> R {
    const NAME: &str = "rust-helper-router";
    let route_deadline = Duration::from_secs(2);
    let target = addr("origin-b", 8443);

    let client = e.client.clone();
    let router = tokio::spawn(async move { example::route(&client, NAME).await });
    // Aborted however the case ends: the next case's router must not find
    // this one active.
    let _stop = AbortOnDrop(router.abort_handle());

    let mut p = RoutingProxy::open(&e.client).await?;
    let until = Instant::now() + STEP;
    while !p.state.active || p.state.router != NAME {
        if router.is_finished() {
            return Err(format!("the helper's router ended: {:?}", router.await));
        }
        let what = format!(
            "RoutingState naming the helper's router (latest: {:?})",
            p.state
        );
        p.receive(until.saturating_duration_since(Instant::now()), &what)
            .await?;
    }
    p.resync(route_deadline).await?;
    let (client_id, server_id) = (new_id(), new_id());
    let (sent, _) = p.routed_connect(&client_id, &server_id).await?;
    let d = p
        .await_decision(&server_id, route_deadline.saturating_sub(sent.elapsed()))
        .await?;
    if d.query_id.is_empty()
        || d.actor != NAME
        || d.timed_out
        || mask_paths(&d) != ["address"]
        || d.address.as_ref() != Some(&target)
    {
        return Err(format!(
            "RouteDecision is {d:?}, want a query id, actor {NAME:?}, update_mask [address], address origin-b:8443, not timed out"
        ));
    }
    let pending = e
        .client
        .get(&server_id)
        .await
        .map_err(|s| format!("get {server_id}: {}", status_text(&s)))?;
    let pending_rev = pending.metadata.clone().unwrap_or_default().revision;

    // The proxy applies it in server_connect, as the addon does.
    let batch = report_request::Message::Batch(ReportBatch {
        snapshots: vec![applied_at(
            &server_id,
            &client_id,
            &target,
            &d.query_id,
            NAME,
        )],
    });
    let seq = p.send(batch).await?;
    let applied_rev = p.await_ack(seq).await?;
    let rec = e
        .client
        .get(&server_id)
        .await
        .map_err(|s| format!("get {server_id}: {}", status_text(&s)))?;
    let meta = rec.metadata.clone().unwrap_or_default();
    let lc = meta.last_change.clone().unwrap_or_default();
    if record_server(&rec).address.as_ref() != Some(&target)
        || meta.revision != applied_rev
        || meta.pending_change.is_some()
        || lc.actor != NAME
        || lc.query_id != d.query_id
        || lc.status != ChangeStatus::Applied as i32
        || lc.revision != pending_rev
    {
        return Err(format!(
            "after the APPLIED outcome (ack revision {applied_rev}): {rec:?}, want address origin-b:8443 at {applied_rev}, no pending_change, last_change {{actor {NAME:?}, query_id {}, APPLIED, revision {pending_rev}}}",
            d.query_id
        ));
    }
    Ok(())
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
