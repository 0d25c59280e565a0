//! A watch that resumes by itself, revision-exact.

use std::collections::VecDeque;
use std::time::Duration;

use tonic::{Code, Status, Streaming};

use crate::Client;
use crate::errors::{ErrorDetails, is_reason, meta, reason};
use crate::v1::{
    ConnectionFilter, ConnectionRecord, ConnectionView, ListConnectionsRequest,
    WatchConnectionsRequest, WatchConnectionsResponse, WatchEvent, WatchEventType,
};

/// Options for [`Watcher`].
#[derive(Clone, Debug, Default)]
pub struct WatchOptions {
    /// A value R > 0 delivers every change after R. With 0 the watcher first
    /// reads the current revision (or, with `relist`, lists) and follows from
    /// there, so even a reconnect before the first event loses nothing.
    pub start_after_revision: i64,
    /// As in `WatchConnectionsRequest`.
    pub filter: Option<ConnectionFilter>,
    /// As in `WatchConnectionsRequest`.
    pub view: ConnectionView,
    /// Ask for BOOKMARK events. They are returned and advance the resume
    /// point, so a quiet, filtered watch does not fall out of the history.
    pub bookmarks: bool,
    /// Make the watch an informer: list at the start when
    /// `start_after_revision` is 0, and again whenever the resume revision
    /// was compacted away (OUT_OF_RANGE / `REVISION_COMPACTED`), returning
    /// [`WatchItem::Relisted`]; the watch then continues after the listing's
    /// revision. Without it, compaction is returned as an error.
    pub relist: bool,
}

/// What [`Watcher::next`] returns.
// Event is the large variant and the common one; boxing it would cost an
// allocation per event to shrink a value that is moved once.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum WatchItem {
    /// A change (or a bookmark), in revision order, each revision once.
    Event(WatchEvent),
    /// A full listing that replaces what the caller knew; events follow
    /// from after `revision`.
    Relisted {
        /// The matching records.
        records: Vec<ConnectionRecord>,
        /// The listing's revision.
        revision: i64,
    },
}

/// Follows changes. It resumes by itself after
///
/// - a dropped connection or a stream the server ended (UNAVAILABLE, end of
///   stream): from the last revision returned;
/// - RESOURCE_EXHAUSTED / `WATCHER_TOO_SLOW` (this consumer fell too far
///   behind): from the revision the error names in metadata `last_revision`;
/// - OUT_OF_RANGE / `REVISION_COMPACTED` with `relist`: from a new listing.
///
/// Other errors are returned; call `next` again to retry, or drop it.
#[derive(Debug)]
pub struct Watcher {
    client: Client,
    opts: WatchOptions,
    last: i64,
    started: bool,
    stream: Option<Streaming<WatchConnectionsResponse>>,
    pending: VecDeque<WatchEvent>,
    backoff: Duration,
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Watcher {
    /// A watcher; nothing is sent until the first [`Watcher::next`].
    pub fn new(client: Client, opts: WatchOptions) -> Watcher {
        let last = opts.start_after_revision;
        Watcher {
            client,
            opts,
            last,
            started: false,
            stream: None,
            pending: VecDeque::new(),
            backoff: MIN_BACKOFF,
        }
    }

    /// The revision a resumed watch would continue after.
    pub fn last_revision(&self) -> i64 {
        self.last
    }

    /// The next item. Cancel-safe between items: dropping the future loses
    /// nothing that `last_revision` does not account for.
    pub async fn next(&mut self) -> Result<WatchItem, Status> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                let bookmark = ev.r#type == WatchEventType::Bookmark as i32;
                // A change at or below what was returned is a duplicate
                // replayed after resuming from an earlier point.
                if !bookmark && ev.revision <= self.last {
                    continue;
                }
                self.last = self.last.max(ev.revision);
                return Ok(WatchItem::Event(ev));
            }
            if !self.started {
                // Marked started only once the starting point is known: a
                // failed first read must be retried, not turned into a watch
                // from "now" that could miss changes.
                if self.last == 0 {
                    if self.opts.relist {
                        let item = self.relist().await?;
                        self.started = true;
                        return Ok(item);
                    }
                    self.last = self.client.current_revision().await?;
                }
                self.started = true;
            }
            let stream = match self.stream.as_mut() {
                Some(s) => s,
                None => {
                    let req = WatchConnectionsRequest {
                        start_after_revision: self.last,
                        send_initial_events: false,
                        allow_bookmarks: self.opts.bookmarks,
                        filter: self.opts.filter.clone(),
                        view: self.opts.view as i32,
                    };
                    match self.client.connections.watch_connections(req).await {
                        Ok(resp) => self.stream.insert(resp.into_inner()),
                        Err(status) => {
                            if let Some(item) = self.recover(status).await? {
                                return Ok(item);
                            }
                            continue;
                        }
                    }
                }
            };
            match stream.message().await {
                Ok(Some(resp)) => {
                    self.backoff = MIN_BACKOFF;
                    self.pending.extend(resp.events);
                }
                // The server ended the stream cleanly (max connection age,
                // restart): resume.
                Ok(None) => self.stream = None,
                Err(status) => {
                    self.stream = None;
                    if let Some(item) = self.recover(status).await? {
                        return Ok(item);
                    }
                }
            }
        }
    }

    async fn relist(&mut self) -> Result<WatchItem, Status> {
        let req = ListConnectionsRequest {
            filter: self.opts.filter.clone(),
            view: self.opts.view as i32,
            ..Default::default()
        };
        let (records, revision) = self.client.list_all(req).await?;
        self.last = revision;
        Ok(WatchItem::Relisted { records, revision })
    }

    /// Decides what a failed stream means: resume (Ok(None)), relist
    /// (Ok(Some)), or give up (Err).
    async fn recover(&mut self, status: Status) -> Result<Option<WatchItem>, Status> {
        if is_reason(&status, reason::WATCHER_TOO_SLOW) {
            let named = ErrorDetails::from_status(&status)
                .revision(meta::LAST_REVISION)
                .ok_or_else(|| {
                    Status::new(
                        status.code(),
                        format!(
                            "evicted without a usable last_revision: {}",
                            status.message()
                        ),
                    )
                })?;
            // Never resume past what was actually returned: that would skip
            // revisions. Resuming earlier only replays duplicates, dropped
            // above. Catch up at once: waiting only adds lag.
            if self.last == 0 || named < self.last {
                self.last = named;
            }
            return Ok(None);
        }
        if is_reason(&status, reason::REVISION_COMPACTED) && self.opts.relist {
            return self.relist().await.map(Some);
        }
        if status.code() == Code::Unavailable {
            tokio::time::sleep(self.backoff).await;
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            return Ok(None);
        }
        Err(status)
    }
}
