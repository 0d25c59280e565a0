//! The proxy's part: report snapshots through ReportService, as the connmeta
//! mitmproxy addon would, so each case can create the state it needs.

use std::io::Read;

use connmeta::v1::{
    self, Address, ConnectionSnapshot, ConnectionState, Hook, ProxyMode, ReportBatch,
    ReportRequest, ReportResponse, TransportProtocol, connection_snapshot, report_request,
    report_response, report_service_client::ReportServiceClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

pub struct Proxy {
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
            client: client.reports.clone(),
            tx,
            rx: Some(rx),
            responses: None,
            seq: 0,
        }
    }

    /// Sends one batch; the revision the store reached.
    pub async fn report(&mut self, snapshots: Vec<ConnectionSnapshot>) -> Result<i64, String> {
        self.seq += 1;
        let seq = self.seq;
        let req = ReportRequest {
            sequence: seq,
            message: Some(report_request::Message::Batch(ReportBatch { snapshots })),
        };
        self.tx
            .send(req)
            .await
            .map_err(|_| format!("report batch {seq}: stream closed"))?;
        // The stream opens with the first batch already queued, so a server
        // that sends its headers only after reading a request cannot stall it.
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
                // the ack answers the batch.
                Ok(Some(ReportResponse {
                    message: Some(report_response::Message::Ack(ack)),
                })) => {
                    if ack.sequence != seq {
                        return Err(format!(
                            "report batch {seq}: ack for sequence {}",
                            ack.sequence
                        ));
                    }
                    return Ok(ack.revision);
                }
                Ok(Some(_)) => continue,
                Ok(None) => return Err(format!("report batch {seq}: stream ended without an ack")),
                Err(status) => return Err(format!("report batch {seq}: {status:?}")),
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
