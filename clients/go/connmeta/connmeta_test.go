package connmeta

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

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
	var listings []int
	stop := errors.New("stop")
	err := c.Watch(context.Background(), WatchOptions{
		StartAfterRevision: 7,
		Relist: func(_ context.Context, records []*connmetav1.ConnectionRecord, revision int64) error {
			if revision != 100 {
				t.Errorf("relist at revision %d, want 100", revision)
			}
			listings = append(listings, len(records))
			return nil
		},
	}, func(ev *connmetav1.WatchEvent) error { return stop })
	if !errors.Is(err, stop) || !slices.Equal(listings, []int{2}) {
		t.Fatalf("Watch = %v after listings %v; want one listing of 2 then an event", err, listings)
	}
	if f.requests[1].GetStartAfterRevision() != 100 {
		t.Fatalf("after relisting, watched from %d, want the listing's revision 100", f.requests[1].GetStartAfterRevision())
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
		Relist: func(context.Context, []*connmetav1.ConnectionRecord, int64) error { return stop },
	}, func(*connmetav1.WatchEvent) error { return nil })
	if err != stop { // the very error, not one wrapping it
		t.Fatalf("Watch = %v, want Relist's error as is", err)
	}
}
