package connmeta

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/connmeta/connmeta/clients/go/connmetav1"
)

// EventHandler is told of every change of an [Informer]'s records, in
// revision order, on the informer's goroutine (one call at a time: a slow
// handler holds the watch, which the sidecar ends WATCHER_TOO_SLOW if it
// falls far behind; the informer then resumes by itself). The informer's
// store already shows the change when a handler runs.
type EventHandler interface {
	// OnAdd gets a record the informer did not hold: at the first listing
	// every matching record, later each new one.
	OnAdd(rec *connmetav1.ConnectionRecord)
	// OnUpdate gets the version held before and the new one.
	OnUpdate(old, new *connmetav1.ConnectionRecord)
	// OnDelete gets a *connmetav1.ConnectionRecord (its last version, from
	// a DELETED event: retention ended, or it left the filter) or, when
	// the delete was seen only as a record missing from a relist (the
	// watch fell out of the history, or the sidecar restarted), a
	// [DeletedFinalStateUnknown] holding the last version the informer
	// had. [DeletedRecord] takes either apart.
	OnDelete(obj any)
}

// DeletedFinalStateUnknown is what [EventHandler.OnDelete] gets for a
// record that vanished while the informer was not watching (it learned
// from a relist): Record is the last version it held, not necessarily the
// last one the sidecar had. Like client-go's cache.DeletedFinalStateUnknown.
type DeletedFinalStateUnknown struct {
	ID     string
	Record *connmetav1.ConnectionRecord
}

// DeletedRecord returns the record of an OnDelete argument, and whether it
// was a tombstone ([DeletedFinalStateUnknown]).
func DeletedRecord(obj any) (rec *connmetav1.ConnectionRecord, tombstone bool) {
	switch v := obj.(type) {
	case *connmetav1.ConnectionRecord:
		return v, false
	case DeletedFinalStateUnknown:
		return v.Record, true
	}
	return nil, false
}

// EventHandlerFuncs is an [EventHandler] made of functions; nil ones are
// skipped.
type EventHandlerFuncs struct {
	AddFunc    func(rec *connmetav1.ConnectionRecord)
	UpdateFunc func(old, new *connmetav1.ConnectionRecord)
	DeleteFunc func(obj any)
}

// OnAdd calls AddFunc if set.
func (f EventHandlerFuncs) OnAdd(rec *connmetav1.ConnectionRecord) {
	if f.AddFunc != nil {
		f.AddFunc(rec)
	}
}

// OnUpdate calls UpdateFunc if set.
func (f EventHandlerFuncs) OnUpdate(old, new *connmetav1.ConnectionRecord) {
	if f.UpdateFunc != nil {
		f.UpdateFunc(old, new)
	}
}

// OnDelete calls DeleteFunc if set.
func (f EventHandlerFuncs) OnDelete(obj any) {
	if f.DeleteFunc != nil {
		f.DeleteFunc(obj)
	}
}

// IndexFunc returns the values a record is indexed under (none: not in
// the index).
type IndexFunc func(rec *connmetav1.ConnectionRecord) []string

// The indexes every Informer has.
const (
	// IndexClientID holds a client under its own id and a server under its
	// client's id: ByIndex(IndexClientID, id) is a client and its servers.
	IndexClientID = "client_id"
	// IndexServerHost holds a server under its address's host, lower-cased
	// (hosts are case-insensitive); clients are not in it.
	IndexServerHost = "server_host"
)

// InformerOptions configures [NewInformer].
type InformerOptions struct {
	// Filter and View select the records, as in ListConnections.
	Filter *connmetav1.ConnectionFilter
	View   connmetav1.ConnectionView
	// Indexers are indexes of your own, by name, besides IndexClientID and
	// IndexServerHost.
	Indexers map[string]IndexFunc
	// OnRelist, when set, is told of every listing (why, at which revision
	// and incarnation) before the handlers hear of its differences.
	OnRelist func(l Listing)
	// MaxBackoff caps the wait between reconnects (default 5 s).
	MaxBackoff time.Duration
}

// Informer is a local cache of the sidecar's records, kept in sync by a
// list and a watch, like client-go's SharedIndexInformer: [Informer.Run]
// lists, then follows every change; it resumes after disconnects and
// slow-consumer evictions, and lists again when its revision fell out of
// the sidecar's history or the sidecar restarted (another incarnation),
// telling handlers the difference (deletes it missed as
// [DeletedFinalStateUnknown]). Reads (Get, List, ByIndex) are safe from
// any goroutine at any time, and consistent with one revision.
type Informer struct {
	c    *Client
	opts InformerOptions

	mu       sync.RWMutex
	items    map[string]*connmetav1.ConnectionRecord
	indices  map[string]map[string]map[string]struct{} // index -> value -> ids
	indexers map[string]IndexFunc
	resume   ResumePoint
	synced   chan struct{} // closed at the first listing
	ended    chan struct{} // closed when Run returns
	runErr   error

	// hmu serializes handler calls and registration, so that a handler
	// added late gets the store's records as OnAdd, then every later
	// change, nothing twice and nothing missed.
	hmu      sync.Mutex
	handlers []EventHandler
	running  bool
}

// NewInformer makes an informer of the records opts selects; it does
// nothing until [Informer.Run].
func NewInformer(c *Client, opts InformerOptions) *Informer {
	inf := &Informer{
		c:       c,
		opts:    opts,
		items:   map[string]*connmetav1.ConnectionRecord{},
		indices: map[string]map[string]map[string]struct{}{},
		indexers: map[string]IndexFunc{
			IndexClientID:   clientIDOf,
			IndexServerHost: serverHostOf,
		},
		synced: make(chan struct{}),
		ended:  make(chan struct{}),
	}
	for name, f := range opts.Indexers {
		inf.indexers[name] = f
	}
	return inf
}

func clientIDOf(r *connmetav1.ConnectionRecord) []string {
	if r.GetServer() != nil {
		if id := r.GetMetadata().GetClientId(); id != "" {
			return []string{id}
		}
		return nil
	}
	return []string{r.GetClient().GetConnection().GetId()}
}

func serverHostOf(r *connmetav1.ConnectionRecord) []string {
	if h := r.GetServer().GetAddress().GetHost(); h != "" {
		return []string{strings.ToLower(h)}
	}
	return nil
}

// AddEventHandler registers h. Added after the first listing, h first
// gets every record held as OnAdd, then every change after them. Call it
// from anywhere but a handler (that would deadlock).
func (inf *Informer) AddEventHandler(h EventHandler) {
	inf.hmu.Lock()
	defer inf.hmu.Unlock()
	for _, r := range inf.List() {
		h.OnAdd(r)
	}
	inf.handlers = append(inf.handlers, h)
}

// Run lists and watches until ctx ends (it then returns ctx's error) or an
// error occurs that resuming and relisting cannot fix (a *StatusError,
// e.g. ErrPermissionDenied). Run once per Informer.
func (inf *Informer) Run(ctx context.Context) error {
	inf.hmu.Lock()
	if inf.running {
		inf.hmu.Unlock()
		return errors.New("connmeta: Informer.Run called twice")
	}
	inf.running = true
	inf.hmu.Unlock()

	w := newWatcher(inf.c, WatchOptions{
		Filter:     inf.opts.Filter,
		View:       inf.opts.View,
		Bookmarks:  true, // keeps a quiet, filtered watch inside the history
		Relist:     inf.replace,
		MaxBackoff: inf.opts.MaxBackoff,
	}, inf.apply)
	w.noDiff = true
	err := w.watch(ctx)
	inf.mu.Lock()
	inf.runErr = err
	inf.mu.Unlock()
	close(inf.ended)
	return err
}

// HasSynced reports whether the first listing is in the store.
func (inf *Informer) HasSynced() bool {
	select {
	case <-inf.synced:
		return true
	default:
		return false
	}
}

// WaitForSync waits until the first listing is in the store; it fails
// with ctx's error, or with Run's when Run ended first.
func (inf *Informer) WaitForSync(ctx context.Context) error {
	select {
	case <-inf.synced:
		return nil
	case <-inf.ended:
		inf.mu.RLock()
		defer inf.mu.RUnlock()
		return inf.runErr
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Get returns the record with this id.
func (inf *Informer) Get(id string) (*connmetav1.ConnectionRecord, bool) {
	inf.mu.RLock()
	defer inf.mu.RUnlock()
	r, ok := inf.items[id]
	return r, ok
}

// List returns every record, in id order.
func (inf *Informer) List() []*connmetav1.ConnectionRecord {
	inf.mu.RLock()
	defer inf.mu.RUnlock()
	ids := make([]string, 0, len(inf.items))
	for id := range inf.items {
		ids = append(ids, id)
	}
	return inf.byIDs(ids)
}

// ByIndex returns the records index holds under value, in id order
// (IndexClientID, IndexServerHost or one of InformerOptions.Indexers; the
// id itself is [Informer.Get]). An unknown index holds nothing.
func (inf *Informer) ByIndex(index, value string) []*connmetav1.ConnectionRecord {
	if index == IndexServerHost {
		value = strings.ToLower(value)
	}
	inf.mu.RLock()
	defer inf.mu.RUnlock()
	ids := make([]string, 0, len(inf.indices[index][value]))
	for id := range inf.indices[index][value] {
		ids = append(ids, id)
	}
	return inf.byIDs(ids)
}

// Resume is the revision (and incarnation) the store reflects: every
// change up to it, none after it.
func (inf *Informer) Resume() ResumePoint {
	inf.mu.RLock()
	defer inf.mu.RUnlock()
	return inf.resume
}

func (inf *Informer) byIDs(ids []string) []*connmetav1.ConnectionRecord {
	slices.Sort(ids)
	out := make([]*connmetav1.ConnectionRecord, len(ids))
	for i, id := range ids {
		out[i] = inf.items[id]
	}
	return out
}

// notification is one handler call, made after the store changed.
type notification struct {
	old, new *connmetav1.ConnectionRecord
	deleted  any
}

// replace takes a listing into the store and tells the handlers the
// difference; records gone from it are tombstones.
func (inf *Informer) replace(_ context.Context, l Listing) error {
	if inf.opts.OnRelist != nil {
		inf.opts.OnRelist(l)
	}
	var calls []notification
	inf.hmu.Lock()
	defer inf.hmu.Unlock()
	inf.mu.Lock()
	next := make(map[string]bool, len(l.Records))
	for _, r := range l.Records {
		id := RecordID(r)
		next[id] = true
		if old, ok := inf.items[id]; !ok {
			calls = append(calls, notification{new: r})
		} else if !proto.Equal(old, r) {
			calls = append(calls, notification{old: old, new: r})
		}
	}
	var gone []string
	for id := range inf.items {
		if !next[id] {
			gone = append(gone, id)
		}
	}
	slices.Sort(gone)
	deletes := make([]notification, len(gone))
	for i, id := range gone {
		deletes[i] = notification{deleted: DeletedFinalStateUnknown{ID: id, Record: inf.items[id]}}
		inf.remove(id)
	}
	for _, r := range l.Records {
		inf.put(r)
	}
	inf.resume = ResumePoint{Revision: l.Revision, Incarnation: l.Incarnation}
	inf.mu.Unlock()
	// Deletes first, as client-go's Replace does: a handler keeping a
	// count never sees more records than exist.
	inf.notify(append(deletes, calls...))
	if !inf.HasSynced() {
		close(inf.synced)
	}
	return nil
}

// apply takes one watch event into the store and tells the handlers.
func (inf *Informer) apply(ev *connmetav1.WatchEvent) error {
	var n *notification
	inf.hmu.Lock()
	defer inf.hmu.Unlock()
	inf.mu.Lock()
	r := ev.GetConnection()
	switch ev.GetType() {
	case connmetav1.WatchEventType_WATCH_EVENT_TYPE_ADDED, connmetav1.WatchEventType_WATCH_EVENT_TYPE_MODIFIED:
		old := inf.items[RecordID(r)]
		inf.put(r)
		n = &notification{old: old, new: r}
	case connmetav1.WatchEventType_WATCH_EVENT_TYPE_DELETED:
		// A delete of a record never held (it left the filter before
		// the informer saw it) changes nothing.
		if _, ok := inf.items[RecordID(r)]; ok {
			inf.remove(RecordID(r))
			n = &notification{deleted: r}
		}
	}
	inf.resume = ResumePoint{Revision: max(inf.resume.Revision, ev.GetRevision()), Incarnation: inf.resume.Incarnation}
	inf.mu.Unlock()
	if n != nil {
		inf.notify([]notification{*n})
	}
	return nil
}

// notify calls the handlers; the caller holds hmu (from before the store
// changed, so that AddEventHandler sees each change either in the store or
// as a call, never both).
func (inf *Informer) notify(calls []notification) {
	for _, c := range calls {
		for _, h := range inf.handlers {
			switch {
			case c.deleted != nil:
				h.OnDelete(c.deleted)
			case c.old == nil:
				h.OnAdd(c.new)
			default:
				h.OnUpdate(c.old, c.new)
			}
		}
	}
}

// put stores r and indexes it; the caller holds mu.
func (inf *Informer) put(r *connmetav1.ConnectionRecord) {
	id := RecordID(r)
	inf.remove(id)
	inf.items[id] = r
	for name, f := range inf.indexers {
		for _, v := range f(r) {
			byValue := inf.indices[name]
			if byValue == nil {
				byValue = map[string]map[string]struct{}{}
				inf.indices[name] = byValue
			}
			if byValue[v] == nil {
				byValue[v] = map[string]struct{}{}
			}
			byValue[v][id] = struct{}{}
		}
	}
}

// remove drops id and its index entries; the caller holds mu.
func (inf *Informer) remove(id string) {
	old, ok := inf.items[id]
	if !ok {
		return
	}
	delete(inf.items, id)
	for name, f := range inf.indexers {
		for _, v := range f(old) {
			delete(inf.indices[name][v], id)
			if len(inf.indices[name][v]) == 0 {
				delete(inf.indices[name], v)
			}
		}
	}
}
