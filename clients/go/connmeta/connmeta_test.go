package connmeta

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/connmeta/connmeta/clients/go/connmetav1"
)

func TestDetailsOfDecodesEveryDetail(t *testing.T) {
	st, err := status.New(codes.FailedPrecondition, "open").WithDetails(
		&errdetails.ErrorInfo{Reason: ReasonConnectionOpen, Domain: Domain, Metadata: map[string]string{"field": "address"}},
		&errdetails.PreconditionFailure{Violations: []*errdetails.PreconditionFailure_Violation{{Type: "CONNECTION_STATE"}}},
		&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{Field: "address.port", Description: "too big"}}},
	)
	if err != nil {
		t.Fatal(err)
	}
	// Wrapped, as callers usually return it.
	d := DetailsOf(errorsJoin(st.Err()))
	if d == nil || d.Code != codes.FailedPrecondition || d.Metadata("field") != "address" {
		t.Fatalf("DetailsOf = %+v", d)
	}
	if len(d.PreconditionFailure.GetViolations()) != 1 || d.FieldViolations()["address.port"] != "too big" {
		t.Fatalf("details not decoded: %+v", d)
	}
	if !IsReason(st.Err(), ReasonConnectionOpen) || IsReason(st.Err(), ReasonEtagMismatch) {
		t.Fatal("IsReason disagrees with the ErrorInfo")
	}
	if DetailsOf(errors.New("local")) != nil || Reason(nil) != "" {
		t.Fatal("a non-status error has no details")
	}
}

func errorsJoin(err error) error { return errors.Join(errors.New("context"), err) }

func TestWatchResumesWithoutGapOrDuplicate(t *testing.T) {
	f, c := newFake(t)
	f.watches = []watchScript{
		func(_ *connmetav1.WatchConnectionsRequest, send func(...*connmetav1.WatchEvent) error) error {
			_ = send(change(101), change(102))
			return connmetaError(codes.ResourceExhausted, ReasonWatcherTooSlow, map[string]string{MetaLastRevision: "102"}, "slow")
		},
		func(_ *connmetav1.WatchConnectionsRequest, send func(...*connmetav1.WatchEvent) error) error {
			_ = send(change(102), change(103)) // 102 again: must be dropped
			return nil                         // clean end (max connection age): resume
		},
		func(_ *connmetav1.WatchConnectionsRequest, send func(...*connmetav1.WatchEvent) error) error {
			_ = send(bookmark(105))
			return status.Error(codes.Unavailable, "connection reset")
		},
		func(_ *connmetav1.WatchConnectionsRequest, send func(...*connmetav1.WatchEvent) error) error {
			_ = send(change(106))
			select {} // the handler stops the watch
		},
	}
	var got []int64
	stop := errors.New("stop")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := c.Watch(ctx, WatchOptions{Bookmarks: true}, func(ev *connmetav1.WatchEvent) error {
		got = append(got, ev.GetRevision())
		if ev.GetRevision() == 106 {
			return stop
		}
		return nil
	})
	if !errors.Is(err, stop) {
		t.Fatalf("Watch returned %v, want the handler's error", err)
	}
	if want := []int64{101, 102, 103, 105, 106}; !slices.Equal(got, want) {
		t.Fatalf("delivered %v, want %v", got, want)
	}
	var starts []int64
	for _, r := range f.requests {
		starts = append(starts, r.GetStartAfterRevision())
	}
	// 100 is the current revision read first; then each resume point.
	if want := []int64{100, 102, 103, 105}; !slices.Equal(starts, want) {
		t.Fatalf("watch started after %v, want %v", starts, want)
	}
}

// recorder collects what Watch tells the caller, as "type id@revision"
// strings, and the listings it was given.
type recorder struct {
	got      []string
	listings []Listing
}

func (r *recorder) relist(_ context.Context, l Listing) error {
	r.listings = append(r.listings, l)
	r.got = append(r.got, fmt.Sprintf("relisted %s @%d", l.Cause, l.Revision))
	return nil
}

func (r *recorder) event(ev *connmetav1.WatchEvent) {
	name := strings.TrimPrefix(ev.GetType().String(), "WATCH_EVENT_TYPE_")
	r.got = append(r.got, fmt.Sprintf("%s %s@%d", name, RecordID(ev.GetConnection()), ev.GetRevision()))
}

func TestWatchRelistsWhenCompacted(t *testing.T) {
	f, c := newFake(t)
	f.records = []*connmetav1.ConnectionRecord{server("a"), server("b")}
	f.watches = []watchScript{
		func(*connmetav1.WatchConnectionsRequest, func(...*connmetav1.WatchEvent) error) error {
			return connmetaError(codes.OutOfRange, ReasonRevisionCompacted, map[string]string{MetaOldestRevision: "90"}, "compacted")
		},
		func(_ *connmetav1.WatchConnectionsRequest, send func(...*connmetav1.WatchEvent) error) error {
			_ = send(change(101))
			select {}
		},
	}
	rec := &recorder{}
	stop := errors.New("stop")
	err := c.Watch(context.Background(), WatchOptions{StartAfterRevision: 7, Relist: rec.relist},
		func(ev *connmetav1.WatchEvent) error {
			rec.event(ev)
			if ev.GetRevision() == 101 {
				return stop
			}
			return nil
		})
	if !errors.Is(err, stop) {
		t.Fatalf("Watch = %v, want the handler's error", err)
	}
	want := []string{"relisted compacted @100", "ADDED a@100", "ADDED b@100", "MODIFIED @101"}
	if !slices.Equal(rec.got, want) {
		t.Fatalf("told %q, want %q", rec.got, want)
	}
	if r := f.requests[1]; r.GetStartAfterRevision() != 100 || r.GetIncarnation() != "inc-1" {
		t.Fatalf("after relisting, watched after %d of %q, want the listing's revision 100 of inc-1", r.GetStartAfterRevision(), r.GetIncarnation())
	}
}

func TestWatchRelistsAfterSidecarRestart(t *testing.T) {
	f, c := newFake(t)
	a, b, cc := serverAt("a", 90), serverAt("b", 95), serverAt("c", 99)
	f.records = []*connmetav1.ConnectionRecord{a, b, cc}
	b2, b3, d := serverAt("b", 101), serverAt("b", 4001), serverAt("d", 4002)
	modified := connmetav1.WatchEventType_WATCH_EVENT_TYPE_MODIFIED
	f.watches = []watchScript{
		func(_ *connmetav1.WatchConnectionsRequest, send func(...*connmetav1.WatchEvent) error) error {
			_ = send(event(modified, 101, b2))
			// kill -9: the stream breaks, a new incarnation comes up.
			f.restart("inc-2", 5000, b3, cc, d)
			return status.Error(codes.Unavailable, "connection reset")
		},
		func(req *connmetav1.WatchConnectionsRequest, _ func(...*connmetav1.WatchEvent) error) error {
			if req.GetIncarnation() != "inc-1" || req.GetStartAfterRevision() != 101 {
				t.Errorf("resumed after %d of %q, want 101 of inc-1", req.GetStartAfterRevision(), req.GetIncarnation())
			}
			// What the restarted sidecar answers to a resume of inc-1.
			return connmetaError(codes.OutOfRange, ReasonRevisionCompacted, nil, "another incarnation")
		},
		func(_ *connmetav1.WatchConnectionsRequest, send func(...*connmetav1.WatchEvent) error) error {
			_ = send(event(modified, 5001, d))
			select {}
		},
	}
	rec := &recorder{}
	stop := errors.New("stop")
	var deleted *connmetav1.ConnectionRecord
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := c.Watch(ctx, WatchOptions{Relist: rec.relist}, func(ev *connmetav1.WatchEvent) error {
		rec.event(ev)
		if ev.GetType() == connmetav1.WatchEventType_WATCH_EVENT_TYPE_DELETED {
			deleted = ev.GetConnection()
		}
		if ev.GetRevision() == 5001 {
			return stop
		}
		return nil
	})
	if !errors.Is(err, stop) {
		t.Fatalf("Watch = %v, want the handler's error", err)
	}
	want := []string{
		"relisted start @100", "ADDED a@100", "ADDED b@100", "ADDED c@100", "MODIFIED b@101",
		// c is unchanged: no event; a vanished; b changed; d is new.
		"relisted restarted @5000", "DELETED a@5000", "MODIFIED b@5000", "ADDED d@5000",
		"MODIFIED d@5001",
	}
	if !slices.Equal(rec.got, want) {
		t.Fatalf("told\n%q\nwant\n%q", rec.got, want)
	}
	if !proto.Equal(deleted, a) {
		t.Fatalf("DELETED carried %v, want the last version delivered %v", deleted, a)
	}
	if l := rec.listings[1]; l.Incarnation != "inc-2" || len(l.Records) != 3 {
		t.Fatalf("second listing: incarnation %q, %d records; want inc-2, 3", l.Incarnation, len(l.Records))
	}
	if r := f.requests[2]; r.GetStartAfterRevision() != 5000 || r.GetIncarnation() != "inc-2" {
		t.Fatalf("after the restart, watched after %d of %q, want 5000 of inc-2", r.GetStartAfterRevision(), r.GetIncarnation())
	}
}

func TestWatchNeverDeliversAnotherIncarnation(t *testing.T) {
	f, c := newFake(t)
	f.incarnation = "inc-2" // a sidecar that does not check the request's incarnation
	f.watches = []watchScript{func(_ *connmetav1.WatchConnectionsRequest, send func(...*connmetav1.WatchEvent) error) error {
		_ = send(change(8))
		select {}
	}}
	delivered := 0
	err := c.Watch(context.Background(), WatchOptions{StartAfterRevision: 7, Incarnation: "inc-1"},
		func(*connmetav1.WatchEvent) error { delivered++; return nil })
	if !IsReason(err, ReasonRevisionCompacted) || status.Code(err) != codes.OutOfRange || delivered != 0 {
		t.Fatalf("Watch = %v after %d events, want OUT_OF_RANGE REVISION_COMPACTED and none", err, delivered)
	}
	if f.requests[0].GetIncarnation() != "inc-1" {
		t.Fatalf("resume named incarnation %q, want inc-1", f.requests[0].GetIncarnation())
	}
}

func TestWatchListsAgainWhileUnreachableOrRestartedBetweenPages(t *testing.T) {
	f, c := newFake(t)
	f.pageSize = 2
	for _, id := range []string{"a", "b", "c", "d", "e"} {
		f.records = append(f.records, server(id))
	}
	f.listErrors = []error{
		status.Error(codes.Unavailable, "connection refused"),
		nil, // page 1
		// page 2: a token of the previous incarnation
		connmetaError(codes.InvalidArgument, ReasonInvalidArgument, nil, "page_token not issued by this server"),
	}
	stop := errors.New("stop")
	var listed []Listing
	err := c.Watch(context.Background(), WatchOptions{
		Relist: func(_ context.Context, l Listing) error { listed = append(listed, l); return stop },
	}, func(*connmetav1.WatchEvent) error { return nil })
	if !errors.Is(err, stop) || len(listed) != 1 || len(listed[0].Records) != 5 {
		t.Fatalf("Watch = %v after listings %v; want one complete listing of 5", err, listed)
	}
	var tokens []string
	for _, r := range f.listings {
		tokens = append(tokens, r.GetPageToken())
	}
	if want := []string{"", "", "2", "", "2", "4"}; !slices.Equal(tokens, want) {
		t.Fatalf("page tokens asked %q, want %q", tokens, want)
	}
}

func TestWatchWaitsForAnUnreachableSidecar(t *testing.T) {
	f, c := newFake(t)
	f.listErrors = []error{status.Error(codes.Unavailable, "down"), status.Error(codes.Unavailable, "down")}
	f.watches = []watchScript{func(_ *connmetav1.WatchConnectionsRequest, send func(...*connmetav1.WatchEvent) error) error {
		_ = send(change(101))
		select {}
	}}
	stop := errors.New("stop")
	err := c.Watch(context.Background(), WatchOptions{}, func(*connmetav1.WatchEvent) error { return stop })
	if !errors.Is(err, stop) {
		t.Fatalf("Watch = %v, want it to wait for the sidecar and then deliver", err)
	}
	if r := f.requests[0]; r.GetStartAfterRevision() != 100 || r.GetIncarnation() != "inc-1" {
		t.Fatalf("watched after %d of %q, want 100 of inc-1", r.GetStartAfterRevision(), r.GetIncarnation())
	}
}

func TestWatchWithoutRelistReturnsCompaction(t *testing.T) {
	f, c := newFake(t)
	f.watches = []watchScript{func(*connmetav1.WatchConnectionsRequest, func(...*connmetav1.WatchEvent) error) error {
		return connmetaError(codes.OutOfRange, ReasonRevisionCompacted, nil, "compacted")
	}}
	err := c.Watch(context.Background(), WatchOptions{StartAfterRevision: 7}, func(*connmetav1.WatchEvent) error { return nil })
	if !IsReason(err, ReasonRevisionCompacted) {
		t.Fatalf("Watch = %v, want REVISION_COMPACTED", err)
	}
}

func TestPagesVisitsEveryPage(t *testing.T) {
	f, c := newFake(t)
	for _, id := range []string{"a", "b", "c", "d", "e"} {
		f.records = append(f.records, server(id))
	}
	req := &connmetav1.ListConnectionsRequest{PageSize: 2}
	records, rev, err := c.ListAll(context.Background(), req)
	if err != nil || len(records) != 5 || rev != 100 {
		t.Fatalf("ListAll = %d records at %d, %v", len(records), rev, err)
	}
	if req.GetPageToken() != "" {
		t.Fatal("ListAll changed the caller's request")
	}
}

func TestUpdateServerRefusesAnEmptyChange(t *testing.T) {
	_, c := newFake(t)
	if _, err := c.UpdateServer(context.Background(), ServerUpdate{ID: "x"}); err == nil {
		t.Fatal("an update with no field succeeded")
	}
}

func TestWatchReturnsTheRelistError(t *testing.T) {
	_, c := newFake(t)
	stop := errors.New("stop")
	err := c.Watch(context.Background(), WatchOptions{
		Relist: func(context.Context, Listing) error { return stop },
	}, func(*connmetav1.WatchEvent) error { return nil })
	if err != stop { // the very error, not one wrapping it
		t.Fatalf("Watch = %v, want Relist's error as is", err)
	}
}
