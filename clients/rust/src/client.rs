//! The client handle: reads, paginated listings and server updates.

use tonic::Status;
use tonic::transport::Channel;

use crate::errors::{is_reason, reason};
use crate::health::HealthClient;
use crate::v1::connection_service_client::ConnectionServiceClient;
use crate::v1::report_service_client::ReportServiceClient;
use crate::v1::{
    Address, ConnectionRecord, ConnectionView, GetConnectionRequest, ListConnectionsRequest,
    ListConnectionsResponse, ServerSpec, UpdateServerConnectionRequest,
};

/// A connection to one sidecar. Cloning is cheap and shares the connection.
#[derive(Clone, Debug)]
pub struct Client {
    /// The raw ConnectionService stub, for anything the helpers do not cover.
    pub connections: ConnectionServiceClient<Channel>,
    /// The raw ReportService stub (the proxy's side).
    pub reports: ReportServiceClient<Channel>,
    /// The standard grpc.health.v1 service.
    pub health: HealthClient<Channel>,
}

impl Client {
    /// Wraps a channel made elsewhere (custom connector, TLS).
    pub fn new(channel: Channel) -> Client {
        Client {
            connections: ConnectionServiceClient::new(channel.clone()),
            reports: ReportServiceClient::new(channel.clone()),
            health: HealthClient::new(channel),
        }
    }

    /// One connection by id, every field. Unknown id: NOT_FOUND
    /// (`CONNECTION_NOT_FOUND`).
    pub async fn get(&mut self, id: &str) -> Result<ConnectionRecord, Status> {
        let resp = self
            .connections
            .get_connection(GetConnectionRequest {
                id: id.to_owned(),
                view: ConnectionView::Full as i32,
            })
            .await?;
        resp.into_inner()
            .connection
            .ok_or_else(|| Status::internal(format!("get {id}: response without a connection")))
    }

    /// Pages through a listing starting at `req.page_token`. Every page has
    /// the same `revision`; watching after it follows the listing gap-free.
    pub fn pages(&self, req: ListConnectionsRequest) -> Pages {
        Pages {
            client: self.connections.clone(),
            req,
            done: false,
        }
    }

    /// Every record of a listing and the revision it reflects.
    pub async fn list_all(
        &self,
        req: ListConnectionsRequest,
    ) -> Result<(Vec<ConnectionRecord>, i64), Status> {
        let mut pages = self.pages(req);
        let (mut records, mut revision) = (Vec::new(), 0);
        while let Some(page) = pages.next().await? {
            revision = page.revision;
            records.extend(page.connections);
        }
        Ok((records, revision))
    }

    /// The store's current revision (a one-record listing reports it).
    pub async fn current_revision(&mut self) -> Result<i64, Status> {
        let req = ListConnectionsRequest {
            page_size: 1,
            view: ConnectionView::Basic as i32,
            ..Default::default()
        };
        Ok(self
            .connections
            .list_connections(req)
            .await?
            .into_inner()
            .revision)
    }

    /// Asks for `update`; returns the record after it. An OPEN server
    /// refuses a real change with FAILED_PRECONDITION (`CONNECTION_OPEN`);
    /// setting a field to its current value always succeeds (and withdraws a
    /// pending change of that field).
    ///
    /// An accepted change is desired state: the returned record holds it in
    /// `metadata.pending_change` (status PENDING) while its server still
    /// shows what the proxy reported. The proxy applies it at the server's
    /// next connect; the change then moves to `metadata.last_change`
    /// (APPLIED, DEFERRED or NOT_APPLIED), which a watch shows.
    pub async fn update_server(
        &mut self,
        update: ServerUpdate,
    ) -> Result<ConnectionRecord, Status> {
        let mut paths = Vec::new();
        if update.address.is_some() {
            paths.push("address".to_owned());
        }
        if update.via.is_some() || update.clear_via {
            paths.push("via".to_owned());
        }
        if paths.is_empty() {
            return Err(Status::invalid_argument(format!(
                "update of {} changes nothing: set address, via or clear_via",
                update.id
            )));
        }
        let req = UpdateServerConnectionRequest {
            id: update.id,
            address: update.address,
            via: update.via,
            update_mask: Some(prost_types::FieldMask { paths }),
            etag: update.etag,
            actor: update.actor,
        };
        let resp = self
            .connections
            .update_server_connection(req)
            .await?
            .into_inner();
        resp.connection
            .ok_or_else(|| Status::internal("update response without a connection"))
    }

    /// Asks for a server to connect to `address` (a pending change, see
    /// [`Client::update_server`]): read, then update with the etag just
    /// read, retrying while another writer gets in between (ABORTED /
    /// `ETAG_MISMATCH`), a few times at most.
    pub async fn retarget_server(
        &mut self,
        id: &str,
        address: Address,
        actor: &str,
    ) -> Result<ConnectionRecord, Status> {
        let mut last_err = None;
        for _ in 0..5 {
            let etag = self.get(id).await?.metadata.unwrap_or_default().etag;
            let update = ServerUpdate {
                id: id.to_owned(),
                etag,
                actor: actor.to_owned(),
                address: Some(address.clone()),
                ..Default::default()
            };
            match self.update_server(update).await {
                Err(status) if is_reason(&status, reason::ETAG_MISMATCH) => last_err = Some(status),
                other => return other,
            }
        }
        let status = last_err.expect("loop ran");
        Err(Status::aborted(format!(
            "retarget {id}: etag kept changing: {}",
            status.message()
        )))
    }
}

/// A change to a server's target; only the fields set go in the mask.
#[derive(Clone, Debug, Default)]
pub struct ServerUpdate {
    /// The server connection's id.
    pub id: String,
    /// When not empty, the update applies only if the record still has this
    /// etag (else ABORTED / `ETAG_MISMATCH`).
    pub etag: String,
    /// Who makes the change (the actor of `metadata.pending_change`, later
    /// `last_change`).
    pub actor: String,
    /// The new address.
    pub address: Option<Address>,
    /// The new upstream proxy (http or https only).
    pub via: Option<ServerSpec>,
    /// Remove the upstream proxy: connect directly.
    pub clear_via: bool,
}

/// The pages of one listing; see [`Client::pages`].
#[derive(Debug)]
pub struct Pages {
    client: ConnectionServiceClient<Channel>,
    req: ListConnectionsRequest,
    done: bool,
}

impl Pages {
    /// The next page, or `None` after the last. A token that outlived the
    /// server's history fails OUT_OF_RANGE, one from before a sidecar
    /// restart INVALID_ARGUMENT: list again from the start.
    pub async fn next(&mut self) -> Result<Option<ListConnectionsResponse>, Status> {
        if self.done {
            return Ok(None);
        }
        let page = self
            .client
            .list_connections(self.req.clone())
            .await?
            .into_inner();
        self.done = page.next_page_token.is_empty();
        self.req.page_token.clone_from(&page.next_page_token);
        Ok(Some(page))
    }
}
