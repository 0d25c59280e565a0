//! A watch that resumes by itself, revision-exact, across sidecar restarts.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tonic::{Code, Status, Streaming};

use crate::Client;
use crate::errors::{DOMAIN, Error, ErrorDetails, is_reason, meta, reason};
use crate::v1::{
    ConnectionFilter, ConnectionRecord, ConnectionView, ListConnectionsRequest,
    WatchConnectionsRequest, WatchConnectionsResponse, WatchEvent, WatchEventType,
    connection_record,
};

/// Options for [`Watcher`].
#[derive(Clone, Debug, Default)]
pub struct WatchOptions {
    /// A value R > 0 delivers every change after R. With 0 the watcher first
    /// reads the current revision (or, with `relist`, lists) and follows from
    /// there, so even a reconnect before the first event loses nothing.
    pub start_after_revision: i64,
    /// The store identity `start_after_revision` belongs to
    /// (`ResponseHeader.incarnation` of the listing or watch it came from).
    /// Optional: without it a resume into a restarted sidecar is still
    /// refused, by its revision; with it the refusal is explicit.
    pub incarnation: String,
    /// As in `WatchConnectionsRequest`.
    pub filter: Option<ConnectionFilter>,
    /// As in `WatchConnectionsRequest`.
    pub view: ConnectionView,
    /// Ask for BOOKMARK events. They are returned and advance the resume
    /// point, so a quiet, filtered watch does not fall out of the history.
    pub bookmarks: bool,
    /// Make the watch an informer. The watcher keeps the records it
    /// returned and lists at the start when `start_after_revision` is 0,
    /// when the resume revision was compacted away, and when the sidecar
    /// restarted (another incarnation: its revisions are another history).
    /// Each time it returns [`WatchItem::Relisted`] first, then the
    /// difference to what it had returned as events: DELETED (with the last
    /// version returned) for records that are gone, ADDED for new ones,
    /// MODIFIED for changed ones, each with `revision` = the listing's; then
    /// it continues after it. The events alone therefore always add up to
    /// the sidecar's state; the caller may instead replace its state with
    /// the listing (the events that follow then change nothing), which is
    /// the way to go when resuming with `start_after_revision` > 0: the
    /// watcher only diffs against what it returned itself. Without `relist`,
    /// compaction and restarts are returned as OUT_OF_RANGE /
    /// [`Error::Compacted`].
    pub relist: bool,
}

/// Why a [`Watcher`] listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelistCause {
    /// The first listing of a watch from revision 0.
    Start,
    /// The resume revision fell out of the retained history.
    Compacted,
    /// The sidecar restarted with a new incarnation: the revisions known so
    /// far belong to a history that no longer exists.
    Restarted,
}

/// What a [`Watcher`] yields.
// Event is the large variant and the common one; boxing it would cost an
// allocation per event to shrink a value that is moved once.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum WatchItem {
    /// A change (or a bookmark), in revision order, each revision once; or,
    /// right after [`WatchItem::Relisted`], one of the listing's differences
    /// to what was returned before (all at the listing's revision).
    Event(WatchEvent),
    /// A full listing was made; the events that follow first bring what was
    /// returned up to it, then follow from after `revision`.
    Relisted {
        /// Why.
        cause: RelistCause,
        /// The matching records, in id order.
        records: Vec<ConnectionRecord>,
        /// The listing's revision.
        revision: i64,
        /// The store identity of the listing and of every event after it.
        incarnation: String,
    },
}

/// Follows changes: a [`Stream`] of [`WatchItem`]s that never ends. It
/// resumes by itself after
///
/// - a dropped connection, an unreachable sidecar or a stream the server
///   ended (UNAVAILABLE, transport errors, end of stream): from the last
///   revision returned, retrying with exponential backoff (also for the
///   listings below);
/// - [`Error::WatcherTooSlow`] (this consumer fell too far behind): from
///   the revision the error names in metadata [`meta::LAST_REVISION`];
/// - [`Error::Compacted`] with `relist`: from a new listing. This is also
///   how a sidecar restart shows: every resume names the incarnation it
///   belongs to, so the restarted sidecar refuses it, and a response of
///   another incarnation is never returned (without `relist` it is
///   [`Error::Compacted`]).
///
/// Other errors are yielded and the stream goes on: polling again retries
/// (like kube-rs's `watcher`); `try_next` or `?` stops at the first one.
/// Dropping a `next()` future loses nothing: the call in flight stays with
/// the watcher and the next poll continues it.
///
/// ```no_run
/// # async fn demo(client: connmeta::Client) -> Result<(), connmeta::Error> {
/// use connmeta::{WatchItem, WatchOptions, Watcher};
/// use futures_util::TryStreamExt;
///
/// let opts = WatchOptions { relist: true, ..Default::default() };
/// let changes = Watcher::new(client, opts).try_filter_map(|item| async move {
///     Ok(match item {
///         WatchItem::Event(ev) => ev.connection.map(|c| (ev.r#type, c)),
///         WatchItem::Relisted { .. } => None,
///     })
/// });
/// let mut changes = std::pin::pin!(changes);
/// while let Some((kind, record)) = changes.try_next().await? {
///     println!("{kind} {}", connmeta::record_id(&record));
/// }
/// # Ok(()) }
/// ```
pub struct Watcher {
    /// The watch's state while no call is in flight.
    state: Option<Box<State>>,
    /// The call in flight; it owns the state until it finishes.
    call: Option<NextCall>,
    last: i64,
    incarnation: String,
}

/// A [`State::next`] in flight, returning the state with the item.
type NextCall = BoxFuture<'static, (Box<State>, Result<WatchItem, Error>)>;

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("last_revision", &self.last)
            .field("incarnation", &self.incarnation)
            .field("in_flight", &self.call.is_some())
            .finish()
    }
}

impl Watcher {
    /// A watcher; nothing is sent until it is first polled.
    pub fn new(client: Client, opts: WatchOptions) -> Watcher {
        let state = State::new(client, opts);
        Watcher {
            last: state.last,
            incarnation: state.incarnation.clone(),
            state: Some(Box::new(state)),
            call: None,
        }
    }

    /// The revision a resumed watch would continue after: the last one
    /// yielded (or listed).
    pub fn last_revision(&self) -> i64 {
        self.last
    }

    /// The store identity [`Watcher::last_revision`] belongs to; empty until
    /// known.
    pub fn incarnation(&self) -> &str {
        &self.incarnation
    }
}

impl Stream for Watcher {
    type Item = Result<WatchItem, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let call = match &mut this.call {
            Some(call) => call,
            None => {
                let mut state = this
                    .state
                    .take()
                    .expect("a watcher holds its state or a call");
                this.call.insert(
                    async move {
                        let item = state.next().await.map_err(Error::from);
                        (state, item)
                    }
                    .boxed(),
                )
            }
        };
        let (state, item) = std::task::ready!(call.poll_unpin(cx));
        this.call = None;
        this.last = state.last;
        this.incarnation.clone_from(&state.incarnation);
        this.state = Some(state);
        Poll::Ready(Some(item))
    }
}

/// A watch between items: where it is, what it returned, what it holds.
#[derive(Debug)]
struct State {
    client: Client,
    opts: WatchOptions,
    last: i64,
    incarnation: String,
    started: bool,
    stream: Option<Streaming<WatchConnectionsResponse>>,
    pending: VecDeque<WatchEvent>,
    /// A listing's difference, returned before anything else.
    diff: VecDeque<WatchEvent>,
    /// What was returned, by id (with `relist` only): a relist diffs
    /// against it.
    known: HashMap<String, ConnectionRecord>,
    backoff: Duration,
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The connection id of a client or server record.
pub fn record_id(record: &ConnectionRecord) -> &str {
    let connection = match &record.kind {
        Some(connection_record::Kind::Server(s)) => s.connection.as_ref(),
        Some(connection_record::Kind::Client(c)) => c.connection.as_ref(),
        None => None,
    };
    connection.map_or("", |c| c.id.as_str())
}

/// Whether `status` was made on this side from a failed connection rather
/// than sent by the sidecar: UNAVAILABLE, or any status tonic built from a
/// transport error (those carry it as their source; a status the server
/// sent never has one). A sidecar killed mid-stream shows as the latter.
fn is_transient(status: &Status) -> bool {
    status.code() == Code::Unavailable || std::error::Error::source(status).is_some()
}

impl State {
    fn new(client: Client, opts: WatchOptions) -> State {
        let last = opts.start_after_revision;
        let incarnation = opts.incarnation.clone();
        State {
            client,
            opts,
            last,
            incarnation,
            started: false,
            stream: None,
            pending: VecDeque::new(),
            diff: VecDeque::new(),
            known: HashMap::new(),
            backoff: MIN_BACKOFF,
        }
    }

    /// The next item.
    async fn next(&mut self) -> Result<WatchItem, Status> {
        loop {
            if let Some(ev) = self.diff.pop_front() {
                return Ok(WatchItem::Event(ev));
            }
            if let Some(ev) = self.pending.pop_front() {
                let bookmark = ev.r#type == WatchEventType::Bookmark as i32;
                // A change at or below what was returned is a duplicate
                // replayed after resuming from an earlier point.
                if !bookmark && ev.revision <= self.last {
                    continue;
                }
                self.last = self.last.max(ev.revision);
                self.remember(&ev);
                return Ok(WatchItem::Event(ev));
            }
            if !self.started {
                // Marked started only once the starting point is known: a
                // failed first read must be retried, not turned into a watch
                // from "now" that could miss changes.
                if self.last == 0 {
                    if self.opts.relist {
                        let item = self.relist(RelistCause::Start).await?;
                        self.started = true;
                        return Ok(item);
                    }
                    self.current_revision().await?;
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
                        incarnation: self.incarnation.clone(),
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
            let status = match stream.message().await {
                Ok(Some(resp)) => {
                    // Never return another history's events. The sidecar
                    // refuses a resume that names another incarnation; this
                    // also catches a resume that could not name one yet.
                    let inc = resp.header.map(|h| h.incarnation).unwrap_or_default();
                    if inc.is_empty() || inc == self.incarnation {
                        self.backoff = MIN_BACKOFF;
                        self.pending.extend(resp.events);
                        continue;
                    }
                    if self.incarnation.is_empty() {
                        self.incarnation = inc;
                        self.backoff = MIN_BACKOFF;
                        self.pending.extend(resp.events);
                        continue;
                    }
                    other_incarnation(self.last, &self.incarnation, &inc)
                }
                // The server ended the stream cleanly (max connection age,
                // shutdown): resume.
                Ok(None) => {
                    self.stream = None;
                    continue;
                }
                Err(status) => status,
            };
            self.stream = None;
            if let Some(item) = self.recover(status).await? {
                return Ok(item);
            }
        }
    }

    /// Keeps what an event returned (with `relist`).
    fn remember(&mut self, ev: &WatchEvent) {
        let Some(record) = ev.connection.as_ref().filter(|_| self.opts.relist) else {
            return;
        };
        let id = record_id(record).to_owned();
        if ev.r#type == WatchEventType::Deleted as i32 {
            self.known.remove(&id);
        } else if ev.r#type == WatchEventType::Added as i32
            || ev.r#type == WatchEventType::Modified as i32
        {
            self.known.insert(id, record.clone());
        }
    }

    async fn sleep(&mut self) {
        // ±20 % so that the consumers of one restarted sidecar do not
        // reconnect in lockstep; no rand crate for that: the clock's
        // nanoseconds are random enough.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let jitter = 0.8 + 0.4 * (f64::from(nanos % 1000) / 1000.0);
        tokio::time::sleep(self.backoff.mul_f64(jitter)).await;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// The current revision and incarnation, retried while unreachable.
    async fn current_revision(&mut self) -> Result<(), Status> {
        loop {
            let req = ListConnectionsRequest {
                page_size: 1,
                view: ConnectionView::Basic as i32,
                ..Default::default()
            };
            match self.client.connections.list_connections(req).await {
                Ok(resp) => {
                    let page = resp.into_inner();
                    self.last = page.revision;
                    self.incarnation = page.header.unwrap_or_default().incarnation;
                    return Ok(());
                }
                Err(status) if is_transient(&status) => self.sleep().await,
                Err(status) => return Err(status),
            }
        }
    }

    /// Lists, queues the difference to what was returned and moves the
    /// resume point to the listing.
    async fn relist(&mut self, cause: RelistCause) -> Result<WatchItem, Status> {
        let (records, revision, incarnation) = self.list().await?;
        let cause = if cause != RelistCause::Start
            && !self.incarnation.is_empty()
            && !incarnation.is_empty()
            && incarnation != self.incarnation
        {
            RelistCause::Restarted
        } else {
            cause
        };
        self.diff = diff(&mut self.known, &records, revision);
        self.pending.clear();
        self.stream = None;
        self.last = revision;
        self.incarnation.clone_from(&incarnation);
        Ok(WatchItem::Relisted {
            cause,
            records,
            revision,
            incarnation,
        })
    }

    /// One complete listing from one incarnation: (records, revision,
    /// incarnation). Starts over (after a backoff) while the sidecar is
    /// unreachable, or when it restarted between two pages: the next page's
    /// token is then refused INVALID_ARGUMENT (tokens are signed per
    /// process) or, if its snapshot left the history, OUT_OF_RANGE.
    async fn list(&mut self) -> Result<(Vec<ConnectionRecord>, i64, String), Status> {
        'again: loop {
            let mut req = ListConnectionsRequest {
                filter: self.opts.filter.clone(),
                view: self.opts.view as i32,
                ..Default::default()
            };
            let (mut records, mut revision, mut incarnation) = (Vec::new(), 0, String::new());
            loop {
                let page = match self.client.connections.list_connections(req.clone()).await {
                    Ok(resp) => resp.into_inner(),
                    Err(status)
                        if is_transient(&status)
                            || (!req.page_token.is_empty()
                                && (status.code() == Code::InvalidArgument
                                    || is_reason(&status, reason::REVISION_COMPACTED))) =>
                    {
                        self.sleep().await;
                        continue 'again;
                    }
                    Err(status) => return Err(status),
                };
                let inc = page.header.unwrap_or_default().incarnation;
                if req.page_token.is_empty() {
                    (revision, incarnation) = (page.revision, inc);
                } else if inc != incarnation {
                    self.sleep().await;
                    continue 'again;
                }
                records.extend(page.connections);
                if page.next_page_token.is_empty() {
                    return Ok((records, revision, incarnation));
                }
                req.page_token = page.next_page_token;
            }
        }
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
            return self.relist(RelistCause::Compacted).await.map(Some);
        }
        if is_transient(&status) {
            self.sleep().await;
            return Ok(None);
        }
        Err(status)
    }
}

/// The events that take `known` (what was returned) to `records`, at the
/// listing's `revision`, and makes `records` what is known: DELETED (last
/// version returned) for what is gone, in id order, then ADDED and MODIFIED
/// in listing order.
fn diff(
    known: &mut HashMap<String, ConnectionRecord>,
    records: &[ConnectionRecord],
    revision: i64,
) -> VecDeque<WatchEvent> {
    let event = |t: WatchEventType, r: &ConnectionRecord| WatchEvent {
        r#type: t as i32,
        revision,
        connection: Some(r.clone()),
    };
    let next: HashMap<String, ConnectionRecord> = records
        .iter()
        .map(|r| (record_id(r).to_owned(), r.clone()))
        .collect();
    let mut gone: Vec<_> = known
        .iter()
        .filter(|(id, _)| !next.contains_key(*id))
        .collect();
    gone.sort_by(|a, b| a.0.cmp(b.0));
    let mut events: VecDeque<_> = gone
        .into_iter()
        .map(|(_, r)| event(WatchEventType::Deleted, r))
        .collect();
    for r in records {
        match known.get(record_id(r)) {
            None => events.push_back(event(WatchEventType::Added, r)),
            Some(old) if old != r => events.push_back(event(WatchEventType::Modified, r)),
            Some(_) => {}
        }
    }
    *known = next;
    events
}

/// The error a watch response from another store history gets: the one
/// the sidecar itself gives a resume that names another incarnation, so
/// callers handle both alike.
fn other_incarnation(after: i64, want: &str, got: &str) -> Status {
    let details = tonic_types::ErrorDetails::with_error_info(
        reason::REVISION_COMPACTED,
        DOMAIN,
        HashMap::from([
            (meta::REQUESTED_REVISION.to_owned(), after.to_string()),
            (meta::REQUESTED_INCARNATION.to_owned(), want.to_owned()),
            (meta::INCARNATION.to_owned(), got.to_owned()),
        ]),
    );
    <Status as tonic_types::StatusExt>::with_error_details(
        Code::OutOfRange,
        format!(
            "revision {after} is from incarnation {want}, the sidecar answered as {got} (it \
             restarted): list again and watch from the listing's revision"
        ),
        details,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{Connection, RecordMetadata, Server};

    fn server_at(id: &str, revision: i64) -> ConnectionRecord {
        ConnectionRecord {
            kind: Some(connection_record::Kind::Server(Server {
                connection: Some(Connection {
                    id: id.to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            metadata: Some(RecordMetadata {
                revision,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn relist_diff_deletes_adds_and_modifies_what_changed() {
        let (a, b, c) = (server_at("a", 90), server_at("b", 95), server_at("c", 99));
        let mut known: HashMap<_, _> = [&a, &b, &c]
            .into_iter()
            .map(|r| (record_id(r).to_owned(), r.clone()))
            .collect();
        // After a restart: a vanished, b changed, c the same, d new.
        let listing = [server_at("b", 4001), c.clone(), server_at("d", 4002)];
        let events = diff(&mut known, &listing, 5000);
        let told: Vec<_> = events
            .iter()
            .map(|ev| {
                let t = WatchEventType::try_from(ev.r#type).unwrap();
                let r = ev.connection.as_ref().unwrap();
                (t, record_id(r).to_owned(), ev.revision)
            })
            .collect();
        assert_eq!(
            told,
            [
                (WatchEventType::Deleted, "a".to_owned(), 5000),
                (WatchEventType::Modified, "b".to_owned(), 5000),
                (WatchEventType::Added, "d".to_owned(), 5000),
            ]
        );
        // DELETED carries the last version returned.
        assert_eq!(events[0].connection.as_ref(), Some(&a));
        let mut ids: Vec<_> = known.keys().cloned().collect();
        ids.sort();
        assert_eq!(ids, ["b", "c", "d"]);
        assert!(diff(&mut known, &listing, 5001).is_empty());
    }

    #[test]
    fn another_incarnation_is_revision_compacted() {
        let status = other_incarnation(7, "inc-1", "inc-2");
        assert_eq!(status.code(), Code::OutOfRange);
        assert!(is_reason(&status, reason::REVISION_COMPACTED));
        assert!(!is_transient(&status));
    }

    #[test]
    fn transport_errors_are_transient_server_statuses_are_not() {
        let io = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed");
        let broken = Status::from_error(Box::new(io));
        assert!(is_transient(&broken), "{broken:?}");
        assert!(is_transient(&Status::unavailable("connection refused")));
        assert!(!is_transient(&Status::unknown("sent by the server")));
    }
}
