//! A local cache of the sidecar's records, kept in sync by a [`Watcher`]:
//! the shape of kube-rs's `reflector` + `watcher`.
//!
//! [`store`] makes a [`Store`] (the reader: cheap to clone, shareable) and
//! its [`Writer`]; [`reflector`] runs a watch through the writer and yields
//! what changed in the store as [`Change`]s: the handler calls of an
//! informer (`Added`, `Updated { old, new }`, `Deleted`), plus `Synced`
//! each time the store holds a complete listing. The store changes only
//! while the stream is polled.
//!
//! The watch must have `relist` (as [`Client::reflect`] sets it): the
//! watcher then lists at the start, when its resume revision was compacted
//! away and when the sidecar restarted, and the writer replaces its records
//! with each listing. Records that vanished while the watch was away (a
//! restart, or a compaction that hid their deletion) come out as
//! [`Change::Deleted`] with the version the store held, so every record
//! that was ever `Added` is `Deleted` exactly once when it goes.
//!
//! ```no_run
//! # async fn demo(client: connmeta::Client) -> Result<(), connmeta::Error> {
//! use connmeta::reflector::Change;
//! use futures_util::TryStreamExt;
//!
//! let (store, mut changes) = client.reflect(Default::default());
//! while let Some(change) = changes.try_next().await? {
//!     match change {
//!         Change::Added(record) => println!("added {}", connmeta::record_id(&record)),
//!         Change::Updated { new, .. } => println!("updated {}", connmeta::record_id(&new)),
//!         Change::Deleted(record) => println!("deleted {}", connmeta::record_id(&record)),
//!         Change::Synced { .. } => println!("{} records", store.len()),
//!     }
//! }
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use futures_core::Stream;
use tokio::sync::watch;

use crate::Client;
use crate::errors::Error;
use crate::v1::{ConnectionRecord, WatchEventType};
use crate::watch::{RelistCause, WatchItem, WatchOptions, Watcher, record_id};

/// A change the [`Writer`] made to the store: what an informer's handlers
/// are called with.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// A record the store did not hold.
    Added(Arc<ConnectionRecord>),
    /// A record the store held in another version.
    Updated {
        /// The version the store held.
        old: Arc<ConnectionRecord>,
        /// The version it holds now.
        new: Arc<ConnectionRecord>,
    },
    /// A record that is gone: the sidecar's last version of it when the
    /// watch saw the deletion, else (it vanished while the watch was away)
    /// the version the store held.
    Deleted(Arc<ConnectionRecord>),
    /// The store holds a complete listing: the changes before this one
    /// brought it there. The first one makes the store ready.
    Synced {
        /// Why the watch listed.
        cause: RelistCause,
        /// The listing's revision.
        revision: i64,
    },
}

#[derive(Debug, Default)]
struct Records {
    by_id: BTreeMap<String, Arc<ConnectionRecord>>,
    revision: i64,
    incarnation: String,
}

/// The reading side of the cache. Cloning is cheap; every clone sees the
/// same records.
#[derive(Clone, Debug)]
pub struct Store {
    records: Arc<RwLock<Records>>,
    ready: watch::Receiver<bool>,
}

/// The writing side of the cache; [`reflector`] drives it, [`Writer::apply`]
/// is for driving it by hand.
#[derive(Debug)]
pub struct Writer {
    records: Arc<RwLock<Records>>,
    ready: watch::Sender<bool>,
}

/// The [`Writer`] was dropped before the store was ready.
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("the reflector's writer was dropped before its first listing")]
pub struct WriterDropped;

/// An empty store and its writer.
pub fn store() -> (Store, Writer) {
    let records = Arc::new(RwLock::new(Records::default()));
    let (tx, rx) = watch::channel(false);
    (
        Store {
            records: records.clone(),
            ready: rx,
        },
        Writer { records, ready: tx },
    )
}

impl Store {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Records> {
        // A writer that panicked mid-apply left whole records behind (each
        // change is one map operation): reading on is sound.
        self.records.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The record with this connection id.
    pub fn get(&self, id: &str) -> Option<Arc<ConnectionRecord>> {
        self.read().by_id.get(id).cloned()
    }

    /// Every record, in id order.
    pub fn state(&self) -> Vec<Arc<ConnectionRecord>> {
        self.read().by_id.values().cloned().collect()
    }

    /// The records `keep` selects, in id order.
    pub fn find(&self, keep: impl Fn(&ConnectionRecord) -> bool) -> Vec<Arc<ConnectionRecord>> {
        self.read()
            .by_id
            .values()
            .filter(|r| keep(r))
            .cloned()
            .collect()
    }

    /// How many records the store holds.
    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.read().by_id.is_empty()
    }

    /// The revision the store reflects.
    pub fn revision(&self) -> i64 {
        self.read().revision
    }

    /// The store identity [`Store::revision`] belongs to.
    pub fn incarnation(&self) -> String {
        self.read().incarnation.clone()
    }

    /// Whether the first listing is in (the informer's `HasSynced`).
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits for the first listing (the informer's `WaitForSync`); someone
    /// must poll the [`reflector`] meanwhile.
    pub async fn wait_until_ready(&self) -> Result<(), WriterDropped> {
        let mut ready = self.ready.clone();
        ready
            .wait_for(|r| *r)
            .await
            .map(|_| ())
            .map_err(|_| WriterDropped)
    }
}

impl Writer {
    /// A [`Store`] reading what this writer writes.
    pub fn as_reader(&self) -> Store {
        Store {
            records: self.records.clone(),
            ready: self.ready.subscribe(),
        }
    }

    /// Applies one item of a relisting watch; returns what changed. An
    /// event that changes nothing (the difference a watcher sends after a
    /// listing the store already took) returns nothing.
    pub fn apply(&mut self, item: &WatchItem) -> Vec<Change> {
        let mut changes = Vec::new();
        {
            let mut records = self.records.write().unwrap_or_else(|e| e.into_inner());
            match item {
                WatchItem::Relisted {
                    cause,
                    records: listed,
                    revision,
                    incarnation,
                } => {
                    let mut next = BTreeMap::new();
                    for r in listed {
                        next.insert(record_id(r).to_owned(), Arc::new(r.clone()));
                    }
                    // Deletions first, in id order, as the watcher sends them.
                    for (id, old) in &records.by_id {
                        if !next.contains_key(id) {
                            changes.push(Change::Deleted(old.clone()));
                        }
                    }
                    for r in listed {
                        let new = next[record_id(r)].clone();
                        match records.by_id.get(record_id(r)) {
                            None => changes.push(Change::Added(new)),
                            Some(old) if **old != *r => changes.push(Change::Updated {
                                old: old.clone(),
                                new,
                            }),
                            Some(_) => {}
                        }
                    }
                    records.by_id = next;
                    records.revision = *revision;
                    records.incarnation.clone_from(incarnation);
                    changes.push(Change::Synced {
                        cause: *cause,
                        revision: *revision,
                    });
                }
                WatchItem::Event(ev) => {
                    records.revision = records.revision.max(ev.revision);
                    if let Some(record) = &ev.connection {
                        let id = record_id(record);
                        let kind = WatchEventType::try_from(ev.r#type).ok();
                        match kind {
                            Some(WatchEventType::Added | WatchEventType::Modified) => {
                                match records.by_id.get(id) {
                                    Some(old) if **old == *record => {}
                                    Some(old) => {
                                        let (old, new) = (old.clone(), Arc::new(record.clone()));
                                        records.by_id.insert(id.to_owned(), new.clone());
                                        changes.push(Change::Updated { old, new });
                                    }
                                    None => {
                                        let new = Arc::new(record.clone());
                                        records.by_id.insert(id.to_owned(), new.clone());
                                        changes.push(Change::Added(new));
                                    }
                                }
                            }
                            Some(WatchEventType::Deleted) if records.by_id.remove(id).is_some() => {
                                changes.push(Change::Deleted(Arc::new(record.clone())));
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        if matches!(item, WatchItem::Relisted { .. }) {
            self.ready.send_replace(true);
        }
        changes
    }
}

/// The stream [`reflector`] returns: the watch's errors and the store's
/// [`Change`]s.
#[derive(Debug)]
pub struct Reflector<S> {
    writer: Writer,
    stream: S,
    queue: VecDeque<Change>,
}

/// Feeds `stream` (a [`Watcher`] with `relist`) into `writer` and yields
/// what changed. Errors of the watch are passed on; a [`Watcher`] goes on
/// after them, so polling again retries.
pub fn reflector<S>(writer: Writer, stream: S) -> Reflector<S>
where
    S: Stream<Item = Result<WatchItem, Error>> + Unpin,
{
    Reflector {
        writer,
        stream,
        queue: VecDeque::new(),
    }
}

impl<S> Reflector<S> {
    /// A reader of the store this reflector writes.
    pub fn store(&self) -> Store {
        self.writer.as_reader()
    }
}

impl<S> Stream for Reflector<S>
where
    S: Stream<Item = Result<WatchItem, Error>> + Unpin,
{
    type Item = Result<Change, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(change) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            match std::task::ready!(Pin::new(&mut this.stream).poll_next(cx)) {
                Some(Ok(item)) => this.queue.extend(this.writer.apply(&item)),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => return Poll::Ready(None),
            }
        }
    }
}

impl Client {
    /// A reflector of the records `opts` selects: a [`Store`] and the
    /// stream that fills it (poll it, for instance in a task of its own).
    /// It always lists first and relists when needed (`relist` is set,
    /// `start_after_revision` ignored).
    pub fn reflect(&self, opts: WatchOptions) -> (Store, Reflector<Watcher>) {
        let opts = WatchOptions {
            relist: true,
            start_after_revision: 0,
            incarnation: String::new(),
            ..opts
        };
        let (store, writer) = store();
        (store, reflector(writer, Watcher::new(self.clone(), opts)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{Connection, RecordMetadata, Server, WatchEvent, connection_record};

    fn server(id: &str, revision: i64) -> ConnectionRecord {
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

    fn event(kind: WatchEventType, r: &ConnectionRecord) -> WatchItem {
        WatchItem::Event(WatchEvent {
            r#type: kind as i32,
            revision: r.metadata.clone().unwrap_or_default().revision,
            connection: Some(r.clone()),
        })
    }

    fn relisted(cause: RelistCause, records: &[ConnectionRecord], revision: i64) -> WatchItem {
        WatchItem::Relisted {
            cause,
            records: records.to_vec(),
            revision,
            incarnation: "inc".into(),
        }
    }

    fn names(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                Change::Added(r) => format!("+{}", record_id(r)),
                Change::Updated { new, .. } => format!("~{}", record_id(new)),
                Change::Deleted(r) => format!("-{}", record_id(r)),
                Change::Synced { cause, revision } => format!("synced {cause:?} {revision}"),
            })
            .collect()
    }

    #[test]
    fn relist_delivers_what_vanished_and_the_watchers_diff_is_a_no_op() {
        let (store, mut writer) = store();
        assert!(!store.is_ready());
        let (a, b) = (server("a", 1), server("b", 2));
        let start = writer.apply(&relisted(RelistCause::Start, &[a.clone(), b.clone()], 2));
        assert_eq!(names(&start), ["+a", "+b", "synced Start 2"]);
        assert!(store.is_ready());

        let b3 = server("b", 3);
        assert_eq!(
            names(&writer.apply(&event(WatchEventType::Modified, &b3))),
            ["~b"]
        );
        // The same version again (a replay) changes nothing.
        assert!(
            writer
                .apply(&event(WatchEventType::Modified, &b3))
                .is_empty()
        );

        // The sidecar restarted: a vanished, b changed, c new.
        let (b9, c) = (server("b", 9), server("c", 9));
        let changes = writer.apply(&relisted(
            RelistCause::Restarted,
            &[b9.clone(), c.clone()],
            9,
        ));
        assert_eq!(names(&changes), ["-a", "~b", "+c", "synced Restarted 9"]);
        assert_eq!(changes[0], Change::Deleted(Arc::new(a.clone())));
        assert_eq!(
            changes[1],
            Change::Updated {
                old: Arc::new(b3),
                new: Arc::new(b9.clone())
            }
        );
        // The watcher's own difference events after the listing.
        for item in [
            event(WatchEventType::Deleted, &a),
            event(WatchEventType::Modified, &b9),
            event(WatchEventType::Added, &c),
        ] {
            assert!(writer.apply(&item).is_empty());
        }
        let ids: Vec<_> = store
            .state()
            .iter()
            .map(|r| record_id(r).to_owned())
            .collect();
        assert_eq!(ids, ["b", "c"]);
        assert_eq!(store.revision(), 9);
        assert_eq!(
            names(&writer.apply(&event(WatchEventType::Deleted, &c))),
            ["-c"]
        );
        assert!(store.get("c").is_none());
    }
}
