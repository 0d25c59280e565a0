package connmeta

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
	"strconv"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/connmeta/connmeta/clients/go/connmetav1"
)

// WatchOptions configures [Client.Watch].
type WatchOptions struct {
	// StartAfterRevision: a value R > 0 delivers every change after R. With
	// 0, Watch first reads the current revision (or, when Relist is set,
	// lists) and follows from there, so that even a reconnect before the
	// first event cannot lose a change.
	StartAfterRevision int64
	// Incarnation is the store identity StartAfterRevision belongs to
	// (ResponseHeader.incarnation of the listing or watch it came from).
	// Optional: without it a resume into a restarted sidecar is still
	// refused, by its revision; with it the refusal is explicit.
	Incarnation string
	// Filter and View are as in WatchConnectionsRequest.
	Filter *connmetav1.ConnectionFilter
	View   connmetav1.ConnectionView
	// Bookmarks asks for BOOKMARK events. They are passed to the handler
	// and also advance the resume point, so a quiet, filtered watch does
	// not fall out of the server's history.
	Bookmarks bool
	// Relist, when set, makes the watch an informer. Watch keeps the
	// records it delivered and lists (same filter and view) at the start
	// when StartAfterRevision is 0, when the resume revision was compacted
	// away, and when the sidecar restarted (another incarnation: its
	// revisions are another history). Each time it first calls Relist with
	// the listing, then passes the handler the difference to what it had
	// delivered: DELETED (with the last version delivered) for records that
	// are gone, ADDED for new ones, MODIFIED for changed ones, each with
	// Revision = the listing's revision, and then continues after it. The
	// handler's events alone therefore always add up to the sidecar's
	// state; Relist may replace the caller's state wholesale instead (the
	// events that follow then change nothing), which is the way to go when
	// resuming with StartAfterRevision > 0: Watch only diffs against what
	// it delivered itself. Without Relist, compaction and restarts end
	// Watch with OUT_OF_RANGE / REVISION_COMPACTED.
	Relist func(ctx context.Context, listing Listing) error
	// MaxBackoff caps the wait between reconnects (default 5 s).
	MaxBackoff time.Duration
}

// RelistCause says why [Client.Watch] listed.
type RelistCause int

const (
	// RelistStart is the first listing of a Watch from revision 0.
	RelistStart RelistCause = iota + 1
	// RelistCompacted: the resume revision fell out of the retained history.
	RelistCompacted
	// RelistRestarted: the sidecar restarted with a new incarnation; the
	// revisions known so far belong to a history that no longer exists.
	RelistRestarted
)

func (c RelistCause) String() string {
	switch c {
	case RelistStart:
		return "start"
	case RelistCompacted:
		return "compacted"
	case RelistRestarted:
		return "restarted"
	}
	return "RelistCause(" + strconv.Itoa(int(c)) + ")"
}

// Listing is one full listing made by [Client.Watch], as given to
// WatchOptions.Relist.
type Listing struct {
	Cause RelistCause
	// Revision is the listing's revision; the watch continues after it.
	Revision int64
	// Incarnation is the store identity the listing (and every event after
	// it) comes from.
	Incarnation string
	// Records are every matching record, in id order.
	Records []*connmetav1.ConnectionRecord
}

// RecordID returns the connection id of a client or server record.
func RecordID(r *connmetav1.ConnectionRecord) string {
	if s := r.GetServer(); s != nil {
		return s.GetConnection().GetId()
	}
	return r.GetClient().GetConnection().GetId()
}

// Watch delivers every change in revision order, each revision exactly
// once, until ctx ends, the handler returns an error, or the sidecar
// returns an error that resuming cannot fix. It resumes by itself after:
//
//   - a dropped connection, an unreachable sidecar or a stream the server
//     ended (UNAVAILABLE, EOF): from the last revision delivered, retrying
//     with exponential backoff (also for the listings below);
//   - RESOURCE_EXHAUSTED / WATCHER_TOO_SLOW (this consumer fell too far
//     behind and was evicted): from the revision the error names in
//     ErrorInfo metadata "lastRevision";
//   - OUT_OF_RANGE / REVISION_COMPACTED, when opts.Relist is set: from a
//     fresh listing. This is also how a sidecar restart shows: every
//     resume names the incarnation it belongs to, so the restarted sidecar
//     refuses it, and a response of another incarnation is never
//     delivered (without Relist, Watch returns OUT_OF_RANGE /
//     REVISION_COMPACTED for it).
//
// A handler error ends Watch and is returned as is; the caller can resume
// later with StartAfterRevision = the last event's Revision.
func (c *Client) Watch(ctx context.Context, opts WatchOptions, handle func(*connmetav1.WatchEvent) error) error {
	return newWatcher(c, opts, handle).watch(ctx)
}

func newWatcher(c *Client, opts WatchOptions, handle func(*connmetav1.WatchEvent) error) *watcher {
	w := &watcher{
		c:       c,
		opts:    opts,
		handle:  handle,
		last:    opts.StartAfterRevision,
		inc:     opts.Incarnation,
		backoff: backoff{max: opts.MaxBackoff},
	}
	if w.backoff.max <= 0 {
		w.backoff.max = 5 * time.Second
	}
	w.backoff.reset()
	return w
}

// watch runs the watch and returns what [Client.Watch] returns.
func (w *watcher) watch(ctx context.Context) error {
	err := w.run(ctx)
	if cerr := contextDone(ctx); cerr != nil && !errors.As(err, new(handlerError)) {
		// The caller's deadline, not the server's answer: report it as
		// such, whatever call it interrupted.
		return cerr
	}
	return unwrapHandler(err)
}

// watcher is the state of one Watch call.
type watcher struct {
	c      *Client
	opts   WatchOptions
	handle func(*connmetav1.WatchEvent) error
	last   int64  // resume after this revision
	inc    string // the incarnation last belongs to; "" until known
	// known holds what the handler was given, by id (informer mode only):
	// a relist diffs against it.
	known   map[string]*connmetav1.ConnectionRecord
	backoff backoff
	// noDiff leaves the difference a relist makes to Relist (the
	// Informer computes it against its own store, with tombstones).
	noDiff bool
}

func (w *watcher) run(ctx context.Context) error {
	if w.last == 0 {
		if err := w.start(ctx); err != nil {
			return err
		}
	}
	for {
		progressed, err := w.watchOnce(ctx)
		if progressed {
			w.backoff.reset()
		}
		switch {
		case errors.As(err, new(handlerError)), ctx.Err() != nil:
			return err
		case err == nil, errors.Is(err, io.EOF):
			// The server ended the stream cleanly (max connection age,
			// shutdown): resume.
		case IsReason(err, ReasonWatcherTooSlow):
			named, perr := strconv.ParseInt(DetailsOf(err).Metadata(MetaLastRevision), 10, 64)
			if perr != nil {
				return fmt.Errorf("connmeta: watch evicted without a usable %s: %w", MetaLastRevision, err)
			}
			// The server has sent everything up to named. Never resume
			// past what this client actually delivered: that would skip
			// revisions. Resuming from an earlier point only costs
			// duplicates, which watchOnce drops.
			if last := w.last; last == 0 || named < last {
				w.last = named
			}
			continue // catch up at once: waiting only makes the lag worse
		case IsReason(err, ReasonRevisionCompacted) && w.opts.Relist != nil:
			if err := w.relist(ctx, RelistCompacted); err != nil {
				return err
			}
			continue
		case status.Code(err) == codes.Unavailable:
			// Connection lost, sidecar down or shutting down: retry below.
		default:
			return fmt.Errorf("connmeta: watch after revision %d: %w", w.last, err)
		}
		if err := w.backoff.wait(ctx); err != nil {
			return err
		}
	}
}

// start finds the starting point of a watch from "now": a listing in
// informer mode, else the current revision; both retried while the sidecar
// is unreachable.
func (w *watcher) start(ctx context.Context) error {
	if w.opts.Relist != nil {
		return w.relist(ctx, RelistStart)
	}
	for {
		page, err := w.c.Connections.ListConnections(ctx, &connmetav1.ListConnectionsRequest{
			PageSize: 1,
			View:     connmetav1.ConnectionView_CONNECTION_VIEW_BASIC,
		})
		if err == nil {
			w.last, w.inc = page.GetRevision(), page.GetHeader().GetIncarnation()
			return nil
		}
		if status.Code(err) != codes.Unavailable {
			return fmt.Errorf("connmeta: current revision: %w", err)
		}
		if err := w.backoff.wait(ctx); err != nil {
			return err
		}
	}
}

// relist lists, tells the caller, delivers the difference to what it had
// delivered and moves the resume point to the listing.
func (w *watcher) relist(ctx context.Context, cause RelistCause) error {
	listing, err := w.list(ctx)
	if err != nil {
		return err
	}
	if cause != RelistStart && w.inc != "" && listing.Incarnation != "" && listing.Incarnation != w.inc {
		cause = RelistRestarted
	}
	listing.Cause = cause
	var events []*connmetav1.WatchEvent
	if !w.noDiff {
		events = w.diff(listing)
	}
	w.last, w.inc = listing.Revision, listing.Incarnation
	if err := w.opts.Relist(ctx, listing); err != nil {
		return handlerError{err}
	}
	for _, ev := range events {
		if err := w.handle(ev); err != nil {
			return handlerError{err}
		}
	}
	return nil
}

// diff returns the events that take what was delivered to listing, and
// makes listing what was delivered: DELETED (last version delivered) for
// what is gone, in id order, then ADDED and MODIFIED in listing order.
func (w *watcher) diff(listing Listing) []*connmetav1.WatchEvent {
	next := make(map[string]*connmetav1.ConnectionRecord, len(listing.Records))
	for _, r := range listing.Records {
		next[RecordID(r)] = r
	}
	event := func(t connmetav1.WatchEventType, r *connmetav1.ConnectionRecord) *connmetav1.WatchEvent {
		return &connmetav1.WatchEvent{Type: t, Revision: listing.Revision, Connection: r}
	}
	var events []*connmetav1.WatchEvent
	var gone []string
	for id := range w.known {
		if _, ok := next[id]; !ok {
			gone = append(gone, id)
		}
	}
	slices.Sort(gone)
	for _, id := range gone {
		events = append(events, event(connmetav1.WatchEventType_WATCH_EVENT_TYPE_DELETED, w.known[id]))
	}
	for _, r := range listing.Records {
		switch old, ok := w.known[RecordID(r)]; {
		case !ok:
			events = append(events, event(connmetav1.WatchEventType_WATCH_EVENT_TYPE_ADDED, r))
		case !proto.Equal(old, r):
			events = append(events, event(connmetav1.WatchEventType_WATCH_EVENT_TYPE_MODIFIED, r))
		}
	}
	w.known = next
	return events
}

// list collects one complete listing from one incarnation. It starts over
// (after a backoff) when the sidecar is unreachable or restarted between
// two pages: the next page's token is then refused INVALID_ARGUMENT (tokens
// are signed per process) or, if its snapshot left the history,
// OUT_OF_RANGE.
func (w *watcher) list(ctx context.Context) (Listing, error) {
	for {
		listing, err := w.listOnce(ctx)
		if err == nil {
			return listing, nil
		}
		var again errListAgain
		if !errors.As(err, &again) {
			return Listing{}, fmt.Errorf("connmeta: list: %w", err)
		}
		if err := w.backoff.wait(ctx); err != nil {
			return Listing{}, err
		}
	}
}

// errListAgain marks a listing that must start over from the first page.
type errListAgain struct{ err error }

func (e errListAgain) Error() string { return e.err.Error() }
func (e errListAgain) Unwrap() error { return e.err }

func (w *watcher) listOnce(ctx context.Context) (Listing, error) {
	var l Listing
	req := &connmetav1.ListConnectionsRequest{Filter: w.opts.Filter, View: w.opts.View}
	for {
		page, err := w.c.Connections.ListConnections(ctx, req)
		switch {
		case status.Code(err) == codes.Unavailable:
			return l, errListAgain{err}
		case err != nil && req.PageToken != "" &&
			(status.Code(err) == codes.InvalidArgument || IsReason(err, ReasonRevisionCompacted)):
			return l, errListAgain{err}
		case err != nil:
			return l, err
		}
		inc := page.GetHeader().GetIncarnation()
		if req.PageToken == "" {
			l.Revision, l.Incarnation = page.GetRevision(), inc
		} else if inc != l.Incarnation {
			return l, errListAgain{fmt.Errorf("incarnation changed from %q to %q between pages", l.Incarnation, inc)}
		}
		l.Records = append(l.Records, page.GetConnections()...)
		if page.GetNextPageToken() == "" {
			return l, nil
		}
		req = &connmetav1.ListConnectionsRequest{
			Filter: w.opts.Filter, View: w.opts.View, PageToken: page.GetNextPageToken(),
		}
	}
}

// watchOnce runs one stream from w.last and advances w.last as events are
// delivered. progressed reports whether anything was received.
func (w *watcher) watchOnce(ctx context.Context) (progressed bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // ends the stream on return, whatever the reason
	stream, err := w.c.Connections.WatchConnections(ctx, &connmetav1.WatchConnectionsRequest{
		StartAfterRevision: w.last,
		Incarnation:        w.inc,
		AllowBookmarks:     w.opts.Bookmarks,
		Filter:             w.opts.Filter,
		View:               w.opts.View,
	})
	if err != nil {
		return false, err
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			return progressed, err
		}
		// Never apply another history's events. The sidecar refuses a
		// resume that names another incarnation; this also catches a
		// resume that could not name one yet.
		if inc := resp.GetHeader().GetIncarnation(); inc != "" {
			if w.inc == "" {
				w.inc = inc
			} else if inc != w.inc {
				return progressed, otherIncarnation(w.last, w.inc, inc)
			}
		}
		progressed = true
		for _, ev := range resp.GetEvents() {
			// A bookmark may repeat the revision of the last event; a
			// change at or below what was delivered is a duplicate
			// replayed after a resume from an earlier point.
			if ev.GetType() != connmetav1.WatchEventType_WATCH_EVENT_TYPE_BOOKMARK && ev.GetRevision() <= w.last {
				continue
			}
			if err := w.handle(ev); err != nil {
				return progressed, handlerError{err}
			}
			w.remember(ev)
			w.last = max(w.last, ev.GetRevision())
		}
	}
}

// remember keeps what an event delivered, in informer mode.
func (w *watcher) remember(ev *connmetav1.WatchEvent) {
	if w.opts.Relist == nil || w.noDiff {
		return
	}
	if w.known == nil {
		w.known = map[string]*connmetav1.ConnectionRecord{}
	}
	switch ev.GetType() {
	case connmetav1.WatchEventType_WATCH_EVENT_TYPE_ADDED, connmetav1.WatchEventType_WATCH_EVENT_TYPE_MODIFIED:
		w.known[RecordID(ev.GetConnection())] = ev.GetConnection()
	case connmetav1.WatchEventType_WATCH_EVENT_TYPE_DELETED:
		delete(w.known, RecordID(ev.GetConnection()))
	}
}

// otherIncarnation is the error a watch response from another store
// history gets: the one the sidecar itself gives a resume that names
// another incarnation, so callers handle both alike.
func otherIncarnation(after int64, want, got string) error {
	st, err := status.New(codes.OutOfRange, fmt.Sprintf(
		"revision %d is from incarnation %s, the sidecar answered as %s (it restarted): list again and watch from the listing's revision",
		after, want, got)).WithDetails(&errdetails.ErrorInfo{
		Reason: ReasonRevisionCompacted,
		Domain: Domain,
		Metadata: map[string]string{
			"requestedRevision":    strconv.FormatInt(after, 10),
			"requestedIncarnation": want,
			"incarnation":          got,
		},
	})
	if err != nil {
		panic(err) // an ErrorInfo always marshals
	}
	return NewStatusError(st)
}

// handlerError marks an error that came from the caller's handler or
// Relist.
type handlerError struct{ err error }

func (h handlerError) Error() string { return h.err.Error() }

// unwrapHandler returns a handler's (or Relist's) error as the caller gave
// it, and any other error unchanged.
func unwrapHandler(err error) error {
	var h handlerError
	if errors.As(err, &h) {
		return h.err
	}
	return err
}

// backoff is an exponential backoff with jitter, from 100 ms to max.
type backoff struct{ cur, max time.Duration }

const minBackoff = 100 * time.Millisecond

func (b *backoff) reset() { b.cur = minBackoff }

// wait sleeps the current delay, ±20 % so that the consumers of one
// restarted sidecar do not reconnect in lockstep, then doubles it.
func (b *backoff) wait(ctx context.Context) error {
	d := b.cur + time.Duration((rand.Float64()*0.4-0.2)*float64(b.cur))
	b.cur = min(2*b.cur, b.max)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// contextDone is ctx.Err(), also in the moment after ctx's deadline passed
// and before its timer fired: grpc-go ends a stream with DeadlineExceeded
// on a timer of its own, which may fire first.
func contextDone(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if d, ok := ctx.Deadline(); ok && !time.Now().Before(d) {
		return context.DeadlineExceeded
	}
	return nil
}
