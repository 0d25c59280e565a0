package connmeta

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/connmeta/connmeta/clients/go/connmetav1"
)

// WatchOptions configures [Client.Watch].
type WatchOptions struct {
	// StartAfterRevision: a value R > 0 delivers every change after R. With
	// 0, Watch first reads the current revision (or, when Relist is set,
	// lists) and follows from there, so that even a reconnect before the
	// first event cannot lose a change.
	StartAfterRevision int64
	// Filter and View are as in WatchConnectionsRequest.
	Filter *connmetav1.ConnectionFilter
	View   connmetav1.ConnectionView
	// Bookmarks asks for BOOKMARK events. They are passed to the handler
	// and also advance the resume point, so a quiet, filtered watch does
	// not fall out of the server's history.
	Bookmarks bool
	// Relist, when set, makes the watch an informer: it is called with a
	// full listing (same filter and view) at the start when
	// StartAfterRevision is 0, and again whenever the resume revision has
	// been compacted away (OUT_OF_RANGE / REVISION_COMPACTED); the watch
	// then continues after the listing's revision. The handler sees no
	// events for what the listing replaced. Without Relist, a compacted
	// revision ends Watch with that error.
	Relist func(ctx context.Context, records []*connmetav1.ConnectionRecord, revision int64) error
	// MaxBackoff caps the wait between reconnects (default 5 s).
	MaxBackoff time.Duration
}

// Watch delivers every change in revision order, each revision exactly
// once, until ctx ends, the handler returns an error, or the sidecar
// returns an error that resuming cannot fix. It resumes by itself after:
//
//   - a dropped connection or a stream the server ended (UNAVAILABLE, EOF):
//     from the last revision delivered;
//   - RESOURCE_EXHAUSTED / WATCHER_TOO_SLOW (this consumer fell too far
//     behind and was evicted): from the revision the error names in
//     ErrorInfo metadata "last_revision";
//   - OUT_OF_RANGE / REVISION_COMPACTED, when opts.Relist is set: from a
//     fresh listing.
//
// A handler error ends Watch and is returned as is; the caller can resume
// later with StartAfterRevision = the last event's Revision.
func (c *Client) Watch(ctx context.Context, opts WatchOptions, handle func(*connmetav1.WatchEvent) error) error {
	maxBackoff := opts.MaxBackoff
	if maxBackoff <= 0 {
		maxBackoff = 5 * time.Second
	}
	last := opts.StartAfterRevision
	if last == 0 {
		var err error
		if last, err = c.startRevision(ctx, opts); err != nil {
			if ctx.Err() != nil {
				// The caller's deadline, not the server's answer: report it as
				// such, like every other exit on a done context.
				return ctx.Err()
			}
			return unwrapHandler(err)
		}
	}
	backoff := 100 * time.Millisecond
	for {
		progressed, err := c.watchOnce(ctx, opts, &last, handle)
		if progressed {
			backoff = 100 * time.Millisecond
		}
		var hErr handlerError
		switch {
		case errors.As(err, &hErr):
			return hErr.err
		case ctx.Err() != nil:
			return ctx.Err()
		case err == nil, errors.Is(err, io.EOF):
			// The server ended the stream cleanly (max connection age,
			// restart): resume.
		case IsReason(err, ReasonWatcherTooSlow):
			named, perr := strconv.ParseInt(DetailsOf(err).Metadata(MetaLastRevision), 10, 64)
			if perr != nil {
				return fmt.Errorf("connmeta: watch evicted without a usable %s: %w", MetaLastRevision, err)
			}
			// The server has sent everything up to named. Never resume
			// past what this client actually delivered: that would skip
			// revisions. Resuming from an earlier point only costs
			// duplicates, which watchOnce drops.
			if last == 0 || named < last {
				last = named
			}
			continue // catch up at once: waiting only makes the lag worse
		case IsReason(err, ReasonRevisionCompacted) && opts.Relist != nil:
			if last, err = c.relist(ctx, opts); err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				return unwrapHandler(err)
			}
			continue
		case status.Code(err) == codes.Unavailable:
			// Connection lost or the server is shutting down; retry below.
		default:
			return fmt.Errorf("connmeta: watch after revision %d: %w", last, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// handlerError marks an error that came from the caller's handler.
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

func (c *Client) startRevision(ctx context.Context, opts WatchOptions) (int64, error) {
	if opts.Relist != nil {
		return c.relist(ctx, opts)
	}
	return c.CurrentRevision(ctx)
}

func (c *Client) relist(ctx context.Context, opts WatchOptions) (int64, error) {
	records, rev, err := c.ListAll(ctx, &connmetav1.ListConnectionsRequest{
		Filter: opts.Filter,
		View:   opts.View,
	})
	if err != nil {
		return 0, err
	}
	if err := opts.Relist(ctx, records, rev); err != nil {
		return 0, handlerError{err}
	}
	return rev, nil
}

// watchOnce runs one stream from *last and advances *last as events are
// delivered. progressed reports whether anything was received.
func (c *Client) watchOnce(ctx context.Context, opts WatchOptions, last *int64, handle func(*connmetav1.WatchEvent) error) (progressed bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // ends the stream on return, whatever the reason
	stream, err := c.Connections.WatchConnections(ctx, &connmetav1.WatchConnectionsRequest{
		StartAfterRevision: *last,
		AllowBookmarks:     opts.Bookmarks,
		Filter:             opts.Filter,
		View:               opts.View,
	})
	if err != nil {
		return false, err
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			return progressed, err
		}
		progressed = true
		for _, ev := range resp.GetEvents() {
			// A bookmark may repeat the revision of the last event; a
			// change at or below what was delivered is a duplicate
			// replayed after a resume from an earlier point.
			if ev.GetType() != connmetav1.WatchEventType_WATCH_EVENT_TYPE_BOOKMARK && ev.GetRevision() <= *last {
				continue
			}
			if err := handle(ev); err != nil {
				return progressed, handlerError{err}
			}
			*last = max(*last, ev.GetRevision())
		}
	}
}
