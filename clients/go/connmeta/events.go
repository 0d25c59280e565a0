package connmeta

import (
	"context"
	"sync"

	"github.com/connmeta/connmeta/clients/go/connmetav1"
)

// ResumePoint is where a watch stopped: a watch with StartAfterRevision =
// Revision and Incarnation = Incarnation continues exactly after the last
// event received, without a gap or a repeat (or is refused
// REVISION_COMPACTED when the history moved on or the sidecar restarted).
type ResumePoint struct {
	Revision    int64
	Incarnation string
}

// EventStream is a watch that delivers on a channel; see
// [Client.WatchEvents].
type EventStream struct {
	events chan *connmetav1.WatchEvent
	stop   context.CancelFunc
	// done is closed once err and resume are set, before events is.
	done   chan struct{}
	err    error
	resume ResumePoint
	once   sync.Once
}

// WatchEvents is [Client.Watch] on a channel: the same resumes, relists
// (with opts.Relist) and guarantees, each revision exactly once in order.
// Range over Events(); when it is closed (ctx ended, Stop, or an error
// resuming cannot fix), Err says why and Resume where to continue:
//
//	s := client.WatchEvents(ctx, opts)
//	for ev := range s.Events() { ... }
//	err, next := s.Err(), s.Resume()
//
// The channel is unbuffered: an event counts as received, and so moves
// the resume point, only once the receiver took it, so stopping loses
// nothing. opts.Relist, when set, runs on the watch's goroutine before the
// events of that listing are sent.
func (c *Client) WatchEvents(ctx context.Context, opts WatchOptions) *EventStream {
	ctx, stop := context.WithCancel(ctx)
	s := &EventStream{events: make(chan *connmetav1.WatchEvent), done: make(chan struct{}), stop: stop}
	w := newWatcher(c, opts, func(ev *connmetav1.WatchEvent) error {
		select {
		case s.events <- ev:
			return nil
		case <-ctx.Done():
			// Not received: the resume point stays before it.
			return ctx.Err()
		}
	})
	go func() {
		err := w.watch(ctx)
		s.err, s.resume = err, ResumePoint{Revision: w.last, Incarnation: w.inc}
		close(s.done)
		close(s.events)
		stop()
	}()
	return s
}

// Events delivers the watch's events; it is closed when the watch ends.
func (s *EventStream) Events() <-chan *connmetav1.WatchEvent { return s.events }

// Stop ends the watch; Events is closed soon after (an event already on
// its way may still be received, and then counts in Resume). Safe to call
// more than once and from any goroutine.
func (s *EventStream) Stop() { s.once.Do(s.stop) }

// Err is why the watch ended: context.Canceled after Stop or when ctx was
// cancelled, ctx's error when it ended, else the error resuming could not
// fix (a *StatusError: errors.Is(err, ErrCompacted) without Relist). It
// is nil while Events is open.
func (s *EventStream) Err() error {
	select {
	case <-s.done:
		return s.err
	default:
		return nil
	}
}

// Resume is the point after the last event received (the watch's start
// before any), valid once Events is closed; the zero ResumePoint before.
func (s *EventStream) Resume() ResumePoint {
	select {
	case <-s.done:
		return s.resume
	default:
		return ResumePoint{}
	}
}
