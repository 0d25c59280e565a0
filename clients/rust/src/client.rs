//! The client handle: reads, paginated listings and server updates.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, TryStreamExt};
use tonic::Code;
use tonic::transport::Channel;

use crate::errors::{Error, ErrorDetails, meta, reason};
use crate::health::HealthClient;
use crate::v1::connection_service_client::ConnectionServiceClient;
use crate::v1::report_service_client::ReportServiceClient;
use crate::v1::router_service_client::RouterServiceClient;
use crate::v1::{
    Address, ConnectionRecord, ConnectionView, GetConnectionRequest, ListConnectionsRequest,
    ListConnectionsResponse, ServerSpec, UpdateServerConnectionRequest,
};

/// A connection to one sidecar. Cloning is cheap and shares the connection
/// (like tonic's clients, which it holds); every method takes `&self`, so one
/// client serves any number of concurrent calls and tasks.
#[derive(Clone, Debug)]
pub struct Client {
    /// The raw ConnectionService stub, for anything the helpers do not cover.
    pub connections: ConnectionServiceClient<Channel>,
    /// The raw ReportService stub (the proxy's side).
    pub reports: ReportServiceClient<Channel>,
    /// The raw RouterService stub (see [`crate::router`] for the helper).
    pub routers: RouterServiceClient<Channel>,
    /// The standard grpc.health.v1 service.
    pub health: HealthClient<Channel>,
}

/// The message of a response that lacks the record it must carry.
fn missing(what: &str) -> Error {
    Error::Other(Box::new(ErrorDetails::new(
        Code::Internal,
        "MISSING_CONNECTION",
        format!("{what}: the response has no connection"),
    )))
}

impl Client {
    /// Wraps a channel made elsewhere (custom connector, TLS).
    pub fn new(channel: Channel) -> Client {
        Client {
            connections: ConnectionServiceClient::new(channel.clone()),
            reports: ReportServiceClient::new(channel.clone()),
            routers: RouterServiceClient::new(channel.clone()),
            health: HealthClient::new(channel),
        }
    }

    /// One connection by id, every field ([`ConnectionView::Full`]).
    /// Unknown id: [`Error::NotFound`].
    pub async fn get(&self, id: &str) -> Result<ConnectionRecord, Error> {
        self.get_with_view(id, ConnectionView::Full).await
    }

    /// One connection by id, with the fields of `view`
    /// ([`ConnectionView::Basic`] leaves out the TLS details and
    /// certificates, the bulk of a record).
    ///
    /// ```no_run
    /// # async fn demo(client: &connmeta::Client) -> Result<(), connmeta::Error> {
    /// use connmeta::v1::ConnectionView;
    /// let record = client
    ///     .get_with_view("4c9e1a52-8d0f-4f49-a1b4-5c0f4b8f9f00", ConnectionView::Basic)
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn get_with_view(
        &self,
        id: &str,
        view: ConnectionView,
    ) -> Result<ConnectionRecord, Error> {
        let resp = self
            .connections
            .clone()
            .get_connection(GetConnectionRequest {
                id: id.to_owned(),
                view: view as i32,
            })
            .await?;
        resp.into_inner()
            .connection
            .ok_or_else(|| missing(&format!("get {id}")))
    }

    /// Pages through a listing starting at `req.page_token`: a
    /// [`Stream`] of pages, each with the same `revision`; watching after it
    /// follows the listing gap-free. A token that outlived the server's
    /// history fails [`Error::Compacted`], one from before a sidecar restart
    /// [`Error::InvalidArgument`]: list again from the start.
    ///
    /// ```no_run
    /// # async fn demo(client: &connmeta::Client) -> Result<(), connmeta::Error> {
    /// use futures_util::TryStreamExt;
    /// let pages: Vec<_> = client.pages(Default::default()).try_collect().await?;
    /// let ids: Vec<&str> = pages.iter().flat_map(|p| &p.connections).map(|r| r.id()).collect();
    /// # Ok(()) }
    /// ```
    pub fn pages(&self, req: ListConnectionsRequest) -> Pages {
        Pages {
            client: self.connections.clone(),
            token: Some(req.page_token.clone()),
            req,
            call: None,
        }
    }

    /// Every record of a listing and the revision it reflects.
    pub async fn list_all(
        &self,
        req: ListConnectionsRequest,
    ) -> Result<(Vec<ConnectionRecord>, i64), Error> {
        let mut pages = self.pages(req);
        let (mut records, mut revision) = (Vec::new(), 0);
        while let Some(page) = pages.try_next().await? {
            revision = page.revision;
            records.extend(page.connections);
        }
        Ok((records, revision))
    }

    /// The store's current revision (a one-record listing reports it).
    pub async fn current_revision(&self) -> Result<i64, Error> {
        let req = ListConnectionsRequest {
            page_size: 1,
            view: ConnectionView::Basic as i32,
            ..Default::default()
        };
        Ok(self
            .connections
            .clone()
            .list_connections(req)
            .await?
            .into_inner()
            .revision)
    }

    /// Asks for `update`; returns the record after it. An OPEN server
    /// refuses a real change with [`Error::ConnectionOpen`]; setting a field
    /// to its current value always succeeds (and withdraws a pending change
    /// of that field). An update that names no field is refused here, as
    /// [`Error::InvalidArgument`] naming `update_mask`.
    ///
    /// An accepted change is desired state: the returned record holds it in
    /// `metadata.pending_change` (status PENDING) while its server still
    /// shows what the proxy reported. The proxy applies it at the server's
    /// next connect; the change then moves to `metadata.last_change`
    /// (APPLIED, DEFERRED or NOT_APPLIED), which a watch shows.
    pub async fn update_server(&self, update: ServerUpdate) -> Result<ConnectionRecord, Error> {
        let mut paths = Vec::new();
        if update.address.is_some() {
            paths.push("address".to_owned());
        }
        if update.via.is_some() || update.clear_via {
            paths.push("via".to_owned());
        }
        if paths.is_empty() {
            let details = ErrorDetails::new(
                Code::InvalidArgument,
                reason::INVALID_ARGUMENT,
                format!(
                    "update of {} changes nothing: set address, via or clear_via",
                    update.id
                ),
            )
            .with_metadata(meta::FIELD, "update_mask")
            .with_field_violation(
                "update_mask",
                "names no field: set address, via or clear_via",
            );
            return Err(Error::InvalidArgument(Box::new(details)));
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
            .clone()
            .update_server_connection(req)
            .await?
            .into_inner();
        resp.connection.ok_or_else(|| missing("update"))
    }

    /// Asks for a server to connect to `address` (a pending change, see
    /// [`Client::update_server`]): read, then update with the etag just
    /// read, retrying while another writer gets in between
    /// ([`Error::EtagMismatch`]), [`RETARGET_ATTEMPTS`] times at most. Giving
    /// up is [`Error::EtagMismatch`] too (ABORTED, `ErrorInfo`
    /// `ETAG_MISMATCH` with metadata [`meta::ATTEMPTS`]), with the last
    /// refusal's message.
    pub async fn retarget_server(
        &self,
        id: &str,
        address: Address,
        actor: &str,
    ) -> Result<ConnectionRecord, Error> {
        let mut last = None;
        for _ in 0..RETARGET_ATTEMPTS {
            let etag = self.get(id).await?.metadata.unwrap_or_default().etag;
            let update = ServerUpdate {
                id: id.to_owned(),
                etag,
                actor: actor.to_owned(),
                address: Some(address.clone()),
                ..Default::default()
            };
            match self.update_server(update).await {
                Err(Error::EtagMismatch(d)) => last = Some(d),
                other => return other,
            }
        }
        let last = last.map(|d| d.message).unwrap_or_default();
        let details = ErrorDetails::new(
            Code::Aborted,
            reason::ETAG_MISMATCH,
            format!(
                "retarget {id}: the etag changed between read and update {RETARGET_ATTEMPTS} times; last: {last}"
            ),
        )
        .with_metadata(meta::ATTEMPTS, RETARGET_ATTEMPTS.to_string());
        Err(Error::EtagMismatch(Box::new(details)))
    }
}

/// How often [`Client::retarget_server`] reads and updates before giving up.
pub const RETARGET_ATTEMPTS: u32 = 5;

/// A change to a server's target; only the fields set go in the mask.
#[derive(Clone, Debug, Default)]
pub struct ServerUpdate {
    /// The server connection's id.
    pub id: String,
    /// When not empty, the update applies only if the record still has this
    /// etag (else [`Error::EtagMismatch`]).
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

type PageCall = BoxFuture<'static, Result<ListConnectionsResponse, Error>>;

/// The pages of one listing, a [`Stream`]; see [`Client::pages`]. It ends
/// after the last page or the first error.
pub struct Pages {
    client: ConnectionServiceClient<Channel>,
    /// The first page's request: filter, view and size of every page.
    req: ListConnectionsRequest,
    /// The next page's token; `None` once done.
    token: Option<String>,
    call: Option<PageCall>,
}

impl std::fmt::Debug for Pages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pages")
            .field("request", &self.req)
            .field("next_token", &self.token)
            .field("in_flight", &self.call.is_some())
            .finish()
    }
}

impl Stream for Pages {
    type Item = Result<ListConnectionsResponse, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.call.is_none() {
            let Some(page_token) = this.token.take() else {
                return Poll::Ready(None);
            };
            let req = ListConnectionsRequest {
                page_token,
                ..this.req.clone()
            };
            let mut client = this.client.clone();
            // The token comes back only with a page that names a next one,
            // so the stream ends after the last page and after an error (a
            // token is not worth retrying: list again from the start).
            this.call = Some(
                async move {
                    let page = client.list_connections(req).await?.into_inner();
                    Ok(page)
                }
                .boxed(),
            );
        }
        let call = this.call.as_mut().expect("set above");
        let result = std::task::ready!(call.poll_unpin(cx));
        this.call = None;
        if let Ok(page) = &result
            && !page.next_page_token.is_empty()
        {
            this.token = Some(page.next_page_token.clone());
        }
        Poll::Ready(Some(result))
    }
}
