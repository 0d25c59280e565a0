//! A router as an async function from a [`RouteQuery`] to a [`Decision`].
//!
//! A router decides where a server connection goes *before* the proxy
//! connects: the proxy holds each connect while the sidecar asks the active
//! router (`RouterService.Route`), and applies the answer at once. (To change
//! the target of a server that is not connecting now, ask with
//! [`Client::update_server`] instead: the proxy applies that at the
//! server's next connect.)
//!
//! [`Router::run`] subscribes, waits while another router of the sidecar
//! is active (a standby takes over when it leaves), calls the function once
//! per query, concurrently, and answers; it reconnects by itself with
//! backoff when the stream breaks. A function that fails, or a query it
//! cannot decide, is answered "no change": the proxy connects as planned.
//!
//! ```no_run
//! # async fn demo(client: connmeta::Client) -> Result<(), connmeta::Error> {
//! use connmeta::router::{Decision, Router};
//! use connmeta::v1::Address;
//!
//! Router::new(&client, "example-router")
//!     .run(|query| async move {
//!         Ok(match query.target() {
//!             Some(a) if a.host == "origin-a" => {
//!                 Decision::Address(Address::new("origin-b", 8443))
//!             }
//!             _ => Decision::NoChange,
//!         })
//!     })
//!     .await?;
//! # Ok(()) }
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::Client;
use crate::errors::Error;
use crate::v1::{
    Address, RouteAnswer, RouteQuery, RouteRequest, RouteSubscribe, RouteSubscribed, ServerSpec,
    route_request, route_response,
};

pub use crate::v1::RouteQuery as Query;

/// What a router answers to one query.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Decision {
    /// Connect as planned.
    NoChange,
    /// Connect to this address instead.
    Address(Address),
    /// Connect through this upstream proxy (http or https).
    Via(ServerSpec),
    /// Connect directly, without an upstream proxy.
    Direct,
    /// Both: this address, through this upstream proxy (`None`: directly).
    AddressVia(Address, Option<ServerSpec>),
}

impl Decision {
    /// The answer to query `query_id`.
    pub fn into_answer(self, query_id: String) -> RouteAnswer {
        let (paths, address, via): (&[&str], _, _) = match self {
            Decision::NoChange => (&[], None, None),
            Decision::Address(a) => (&["address"], Some(a), None),
            Decision::Via(v) => (&["via"], None, Some(v)),
            Decision::Direct => (&["via"], None, None),
            Decision::AddressVia(a, v) => (&["address", "via"], Some(a), v),
        };
        RouteAnswer {
            query_id,
            address,
            via,
            update_mask: Some(prost_types::FieldMask {
                paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            }),
        }
    }
}

type ErrorHook = Box<dyn FnMut(&RouteQuery, &Error) + Send>;
type SubscribedHook = Box<dyn FnMut(&RouteSubscribed) + Send>;

/// A router subscription; see the [module](self) docs.
pub struct Router {
    client: Client,
    name: String,
    on_error: Option<ErrorHook>,
    on_subscribed: Option<SubscribedHook>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").field("name", &self.name).finish()
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Router {
    /// A router named `name` (the actor of the changes it decides; one
    /// active router per name and sidecar).
    pub fn new(client: &Client, name: impl Into<String>) -> Router {
        Router {
            client: client.clone(),
            name: name.into(),
            on_error: None,
            on_subscribed: None,
        }
    }

    /// Called with each query the function failed on (it was answered "no
    /// change"), for logging.
    pub fn on_error(mut self, hook: impl FnMut(&RouteQuery, &Error) + Send + 'static) -> Router {
        self.on_error = Some(Box::new(hook));
        self
    }

    /// Called with each `RouteSubscribed`: after (re)subscribing, and when a
    /// standby becomes the active router.
    pub fn on_subscribed(mut self, hook: impl FnMut(&RouteSubscribed) + Send + 'static) -> Router {
        self.on_subscribed = Some(Box::new(hook));
        self
    }

    /// Routes until an error retrying cannot fix: another router already
    /// subscribed under this name ([`Error::Other`] with ALREADY_EXISTS, on
    /// the first subscription; after a reconnect the sidecar may still hold
    /// the broken stream for a moment, so then it retries), a refused
    /// answer ([`Error::InvalidArgument`]: the function's decision broke a
    /// rule), [`Error::PermissionDenied`]. Broken streams and an unreachable
    /// sidecar are retried with backoff (100 ms doubling to 5 s).
    pub async fn run<F, Fut>(mut self, mut decide: F) -> Result<Infallible, Error>
    where
        F: FnMut(RouteQuery) -> Fut,
        Fut: Future<Output = Result<Decision, Error>>,
    {
        let mut backoff = MIN_BACKOFF;
        let mut subscribed_once = false;
        loop {
            let mut subscribed = false;
            let result = self.session(&mut decide, &mut subscribed).await;
            if subscribed {
                backoff = MIN_BACKOFF;
            }
            match result {
                Ok(()) => {}
                Err(e) if e.is_transient() => {}
                Err(e) if subscribed_once && e.code() == tonic::Code::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            subscribed_once |= subscribed;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One Route stream, until it ends (Ok) or fails.
    async fn session<F, Fut>(&mut self, decide: &mut F, subscribed: &mut bool) -> Result<(), Error>
    where
        F: FnMut(RouteQuery) -> Fut,
        Fut: Future<Output = Result<Decision, Error>>,
    {
        let (tx, rx) = mpsc::channel(64);
        let subscribe = route_request::Message::Subscribe(RouteSubscribe {
            name: self.name.clone(),
        });
        // Cannot fail: the receiver is right here.
        let _ = tx.try_send(RouteRequest {
            message: Some(subscribe),
        });
        let mut stream = self
            .client
            .routers
            .clone()
            .route(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let mut open = FuturesUnordered::new();
        loop {
            tokio::select! {
                message = stream.message() => {
                    let Some(response) = message? else {
                        return Ok(());
                    };
                    match response.message {
                        Some(route_response::Message::Subscribed(s)) => {
                            *subscribed = true;
                            if let Some(hook) = self.on_subscribed.as_mut() {
                                hook(&s);
                            }
                        }
                        Some(route_response::Message::Query(q)) => {
                            let pending = decide(q.clone());
                            open.push(async move { (q, pending.await) });
                        }
                        None => {}
                    }
                }
                Some((query, decision)) = open.next(), if !open.is_empty() => {
                    let decision = decision.unwrap_or_else(|e| {
                        if let Some(hook) = self.on_error.as_mut() {
                            hook(&query, &e);
                        }
                        Decision::NoChange
                    });
                    let answer = route_request::Message::Answer(decision.into_answer(query.query_id));
                    if tx.send(RouteRequest { message: Some(answer) }).await.is_err() {
                        // The call ended; its status comes with the next message.
                        continue;
                    }
                }
            }
        }
    }
}
