//! The proxy's part: report snapshots through ReportService, as the connmeta
//! mitmproxy addon would, so each case can create the state it needs.

use std::io::Read;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use connmeta::v1::{
    self, Address, ConnectionSnapshot, ConnectionState, Hook, ProxyMode, ReportAck, ReportBatch,
    ReportRequest, ReportResponse, ResyncEnd, ResyncStart, RouteOutcome, RouteOutcomeKind,
    TransportProtocol, connection_snapshot, report_request, report_response,
    report_service_client::ReportServiceClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

/// The running case; proxy ids name it so that a server log says which
/// case a stream belongs to.
pub static CASE_NAME: OnceLock<&'static str> = OnceLock::new();
static PROXY_COUNT: AtomicU64 = AtomicU64::new(0);

/// A proxy id unique within this process: interop-rust-<case>-<n>.
pub fn new_proxy_id() -> String {
    let n = PROXY_COUNT.fetch_add(1, Ordering::Relaxed) + 1;
    format!(
        "interop-rust-{}-{n}",
        CASE_NAME.get().copied().unwrap_or("none")
    )
}

pub struct Proxy {
    /// ReportRequest.proxy_id, sent on the stream's first message.
    pub id: String,
    client: ReportServiceClient<Channel>,
    tx: mpsc::Sender<ReportRequest>,
    rx: Option<mpsc::Receiver<ReportRequest>>,
    responses: Option<Streaming<ReportResponse>>,
    seq: u64,
}

impl Proxy {
    pub fn new(client: &connmeta::Client) -> Proxy {
        let (tx, rx) = mpsc::channel(4);
        Proxy {
            id: new_proxy_id(),
            client: client.reports.clone(),
            tx,
            rx: Some(rx),
            responses: None,
            seq: 0,
        }
    }

    /// Sends one batch; the revision the store reached. A snapshot the
    /// sidecar rejects fails it: every case but report_rejects_bad_snapshot
    /// sends only valid ones, and a rejection would otherwise go unnoticed
    /// (the rest of the batch is applied).
    pub async fn report(&mut self, snapshots: Vec<ConnectionSnapshot>) -> Result<i64, String> {
        let ack = self.report_ack(snapshots).await?;
        if !ack.rejected.is_empty() {
            return Err(format!(
                "report batch {}: the sidecar rejected {:?}",
                ack.sequence, ack.rejected
            ));
        }
        Ok(ack.revision)
    }

    /// Sends one batch; its ack, rejections included.
    pub async fn report_ack(
        &mut self,
        snapshots: Vec<ConnectionSnapshot>,
    ) -> Result<ReportAck, String> {
        self.request(report_request::Message::Batch(ReportBatch { snapshots }))
            .await
    }

    pub async fn resync_start(&mut self) -> Result<ReportAck, String> {
        self.request(report_request::Message::ResyncStart(ResyncStart::default()))
            .await
    }

    pub async fn resync_end(&mut self) -> Result<ReportAck, String> {
        self.request(report_request::Message::ResyncEnd(ResyncEnd {}))
            .await
    }

    /// Sends one request (numbered, and named on the stream's first
    /// message) and waits for its ack.
    async fn request(&mut self, message: report_request::Message) -> Result<ReportAck, String> {
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
        // The stream opens with the first request already queued, so a
        // server that sends its headers only after reading a request cannot
        // stall it.
        if self.responses.is_none() {
            let rx = self.rx.take().expect("receiver taken once");
            let call = self.client.report(ReceiverStream::new(rx)).await;
            self.responses = Some(
                call.map_err(|s| format!("open report stream: {s:?}"))?
                    .into_inner(),
            );
        }
        let responses = self.responses.as_mut().expect("opened above");
        loop {
            match responses.message().await {
                // Routing state and route decisions share the stream; only
                // the ack answers the request.
                Ok(Some(ReportResponse {
                    message: Some(report_response::Message::Ack(ack)),
                })) => {
                    if ack.sequence != seq {
                        return Err(format!(
                            "report request {seq}: ack for sequence {}",
                            ack.sequence
                        ));
                    }
                    return Ok(ack);
                }
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return Err(format!("report request {seq}: stream ended without an ack"));
                }
                Err(status) => return Err(format!("report request {seq}: {status:?}")),
            }
        }
    }
}

/// A random (version 4) UUID, the form of mitmproxy's ids.
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("read /dev/urandom");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

pub fn addr(host: &str, port: u32) -> Address {
    Address {
        host: host.to_owned(),
        port,
        ..Default::default()
    }
}

fn epoch() -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: 1_767_225_600,
        nanos: 0,
    } // 2026-01-01T00:00:00Z
}

/// A client that just connected to a regular-mode listener.
pub fn client_snapshot(id: &str) -> ConnectionSnapshot {
    ConnectionSnapshot {
        hook: Hook::ClientConnected as i32,
        connection: Some(connection_snapshot::Connection::Client(v1::Client {
            connection: Some(v1::Connection {
                id: id.to_owned(),
                state: ConnectionState::Open as i32,
                transport_protocol: TransportProtocol::Tcp as i32,
                peername: Some(addr("198.51.100.7", 51234)),
                sockname: Some(addr("127.0.0.1", 8080)),
                timestamp_start: Some(epoch()),
                ..Default::default()
            }),
            proxy_mode: Some(ProxyMode {
                full_spec: "regular".into(),
                ..Default::default()
            }),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// A server of `client_id` targeting host:port. OPEN: just connected;
/// CLOSED: about to connect (server_connect), when an update can still
/// re-target it.
pub fn server_snapshot(
    id: &str,
    client_id: &str,
    state: ConnectionState,
    host: &str,
    port: u32,
) -> ConnectionSnapshot {
    let mut conn = v1::Connection {
        id: id.to_owned(),
        state: state as i32,
        transport_protocol: TransportProtocol::Tcp as i32,
        timestamp_start: Some(epoch()),
        ..Default::default()
    };
    let mut hook = Hook::ServerConnect;
    if state != ConnectionState::Closed {
        hook = Hook::ServerConnected;
        conn.peername = Some(addr("192.0.2.10", port));
        conn.sockname = Some(addr("192.0.2.1", 40000));
    }
    ConnectionSnapshot {
        hook: hook as i32,
        client_id: client_id.to_owned(),
        connection: Some(connection_snapshot::Connection::Server(v1::Server {
            connection: Some(conn),
            address: Some(addr(host, port)),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// A server snapshot made large (about 2 KiB) so that a watcher that does
/// not read fills the HTTP/2 flow-control windows quickly.
pub fn padded(id: &str, client_id: &str, port: u32) -> ConnectionSnapshot {
    let mut s = server_snapshot(
        id,
        client_id,
        ConnectionState::Closed,
        "origin.example",
        port,
    );
    if let Some(connection_snapshot::Connection::Server(server)) = s.connection.as_mut() {
        let conn = server.connection.as_mut().expect("set above");
        conn.cipher_list = (0..48)
            .map(|i| format!("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384_{i:02}"))
            .collect();
    }
    s
}

/// The snapshot the proxy sends from server_connect after it applied a
/// route decision or a pending change of the address: the server, still
/// CLOSED, with the new address, and the outcome that settles the record's
/// pending_change (what the connmeta addon sends).
pub fn applied_at(
    server_id: &str,
    client_id: &str,
    address: &Address,
    query_id: &str,
    actor: &str,
) -> ConnectionSnapshot {
    let mut s = server_snapshot(
        server_id,
        client_id,
        ConnectionState::Closed,
        &address.host,
        address.port,
    );
    s.route_outcome = Some(RouteOutcome {
        kind: RouteOutcomeKind::Applied as i32,
        query_id: query_id.to_owned(),
        actor: actor.to_owned(),
        applied_fields: vec!["address".into()],
        ..Default::default()
    });
    s
}

/// A client's snapshot as the proxy sends it in a resync.
pub fn resync_client(id: &str) -> ConnectionSnapshot {
    let mut s = client_snapshot(id);
    s.hook = Hook::Resync as i32;
    s
}
