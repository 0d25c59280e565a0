package connmeta

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/connmeta/connmeta/clients/go/connmetav1"
)

// calls records handler calls as strings: "add a@1", "update a@1->2",
// "delete a@2", "tombstone a@2".
type calls struct {
	mu  sync.Mutex
	got []string
}

func (c *calls) add(s string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.got = append(c.got, s)
}

func (c *calls) handler() EventHandler {
	at := func(r *connmetav1.ConnectionRecord) string {
		return fmt.Sprintf("%s@%d", RecordID(r), r.GetMetadata().GetRevision())
	}
	return EventHandlerFuncs{
		AddFunc: func(r *connmetav1.ConnectionRecord) { c.add("add " + at(r)) },
		UpdateFunc: func(old, new *connmetav1.ConnectionRecord) {
			c.add(fmt.Sprintf("update %s->%d", at(old), new.GetMetadata().GetRevision()))
		},
		DeleteFunc: func(obj any) {
			r, tombstone := DeletedRecord(obj)
			if tombstone {
				c.add("tombstone " + at(r))
			} else {
				c.add("delete " + at(r))
			}
		},
	}
}

func (c *calls) await(t *testing.T, n int) []string {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		c.mu.Lock()
		got := slices.Clone(c.got)
		c.mu.Unlock()
		if len(got) >= n || time.Now().After(deadline) {
			return got
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func withClient(r *connmetav1.ConnectionRecord, clientID, host string) *connmetav1.ConnectionRecord {
	r.GetServer().Address = &connmetav1.Address{Host: host, Port: 443}
	r.GetMetadata().ClientId = clientID
	return r
}

// The informer applies events, lists again on compaction and tells the
// handlers the difference, with what vanished as a tombstone; its store
// and indexes follow.
func TestInformerEventsRelistAndTombstones(t *testing.T) {
	f, c := newFake(t)
	a, b := withClient(serverAt("a", 90), "c1", "A.example"), withClient(serverAt("b", 95), "c1", "b.example")
	f.records = []*connmetav1.ConnectionRecord{a, b}
	b2 := withClient(serverAt("b", 101), "c2", "b.example")
	cc := withClient(serverAt("c", 102), "c1", "a.example")
	d := withClient(serverAt("d", 110), "c1", "d.example")
	f.watches = []watchScript{
		func(_ *connmetav1.WatchConnectionsRequest, send func(...*connmetav1.WatchEvent) error) error {
			_ = send(event(connmetav1.WatchEventType_WATCH_EVENT_TYPE_MODIFIED, 101, b2),
				event(connmetav1.WatchEventType_WATCH_EVENT_TYPE_ADDED, 102, cc),
				event(connmetav1.WatchEventType_WATCH_EVENT_TYPE_DELETED, 103, a),
				bookmark(104))
			// While the watch is down, b and c vanish and d appears.
			f.mu.Lock()
			f.records, f.revision = []*connmetav1.ConnectionRecord{d}, 110
			f.mu.Unlock()
			return connmetaError(codes.OutOfRange, ReasonRevisionCompacted, map[string]string{MetaOldestRevision: "105"}, "compacted")
		},
	}
	inf := NewInformer(c, InformerOptions{})
	rec := &calls{}
	inf.AddEventHandler(rec.handler())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- inf.Run(ctx) }()
	if err := inf.WaitForSync(ctx); err != nil || !inf.HasSynced() {
		t.Fatalf("WaitForSync = %v, HasSynced %v", err, inf.HasSynced())
	}
	want := []string{
		"add a@90", "add b@95", // listing
		"update b@95->101", "add c@102", "delete a@90", // events
		"tombstone b@101", "tombstone c@102", "add d@110", // relist after compaction
	}
	if got := rec.await(t, len(want)); !slices.Equal(got, want) {
		t.Fatalf("handler calls %q, want %q", got, want)
	}
	if got := inf.List(); len(got) != 1 || !proto.Equal(got[0], d) {
		t.Fatalf("List = %v, want d", got)
	}
	if r := inf.Resume(); r.Revision != 110 || r.Incarnation != "inc-1" {
		t.Fatalf("Resume = %+v, want 110 of inc-1", r)
	}
	if got := inf.ByIndex(IndexClientID, "c1"); len(got) != 1 || RecordID(got[0]) != "d" {
		t.Fatalf("ByIndex(client c1) = %v, want d only (b, c left the store)", got)
	}
	if got := inf.ByIndex(IndexServerHost, "A.EXAMPLE"); len(got) != 0 {
		t.Fatalf("ByIndex(host a.example) = %v, want none", got)
	}
	if _, ok := inf.Get("d"); !ok {
		t.Fatal("Get(d) found nothing")
	}
	// A handler added late gets the store as adds.
	late := &calls{}
	inf.AddEventHandler(late.handler())
	if got := late.await(t, 1); !slices.Equal(got, []string{"add d@110"}) {
		t.Fatalf("late handler got %q", got)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Run = %v, want context.Canceled", err)
	}
}

func TestInformerIndexesFollowChanges(t *testing.T) {
	f, c := newFake(t)
	a := withClient(serverAt("a", 90), "c1", "one.example")
	f.records = []*connmetav1.ConnectionRecord{a}
	a2 := withClient(serverAt("a", 101), "c1", "two.example")
	f.watches = []watchScript{
		func(_ *connmetav1.WatchConnectionsRequest, send func(...*connmetav1.WatchEvent) error) error {
			_ = send(event(connmetav1.WatchEventType_WATCH_EVENT_TYPE_MODIFIED, 101, a2))
			select {}
		},
	}
	inf := NewInformer(c, InformerOptions{Indexers: map[string]IndexFunc{
		"port": func(r *connmetav1.ConnectionRecord) []string {
			return []string{fmt.Sprint(r.GetServer().GetAddress().GetPort())}
		},
	}})
	rec := &calls{}
	inf.AddEventHandler(rec.handler())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = inf.Run(ctx) }()
	rec.await(t, 2)
	if got := inf.ByIndex(IndexServerHost, "one.example"); len(got) != 0 {
		t.Fatalf("the old host still indexes %v", got)
	}
	if got := inf.ByIndex(IndexServerHost, "two.example"); len(got) != 1 || !proto.Equal(got[0], a2) {
		t.Fatalf("ByIndex(two.example) = %v", got)
	}
	if got := inf.ByIndex("port", "443"); len(got) != 1 {
		t.Fatalf("custom index = %v", got)
	}
}

func TestWaitForSyncReturnsRunsError(t *testing.T) {
	f, c := newFake(t)
	f.listErrors = []error{connmetaError(codes.PermissionDenied, ReasonPermissionDenied, map[string]string{MetaMethod: "/x"}, "no")}
	inf := NewInformer(c, InformerOptions{})
	go func() { _ = inf.Run(context.Background()) }()
	err := inf.WaitForSync(context.Background())
	if !errors.Is(err, ErrPermissionDenied) || inf.HasSynced() {
		t.Fatalf("WaitForSync = %v, want ErrPermissionDenied", err)
	}
}

func TestWatchEventsResumePoint(t *testing.T) {
	f, c := newFake(t)
	f.watches = []watchScript{
		func(_ *connmetav1.WatchConnectionsRequest, send func(...*connmetav1.WatchEvent) error) error {
			_ = send(change(101), change(102), change(103))
			select {}
		},
	}
	s := c.WatchEvents(context.Background(), WatchOptions{})
	var got []int64
	for ev := range s.Events() {
		got = append(got, ev.GetRevision())
		if ev.GetRevision() == 102 {
			// 103 may still come (it was on its way) or not: the resume
			// point is after whatever was received last.
			s.Stop()
		}
	}
	if !slices.Equal(got[:2], []int64{101, 102}) {
		t.Fatalf("received %v", got)
	}
	if r := s.Resume(); r.Revision != got[len(got)-1] || r.Incarnation != "inc-1" || !errors.Is(s.Err(), context.Canceled) {
		t.Fatalf("Resume %+v, Err %v; want %d of inc-1 and context.Canceled", r, s.Err(), got[len(got)-1])
	}
}

func TestWatchEventsEndsWithCompacted(t *testing.T) {
	f, c := newFake(t)
	f.watches = []watchScript{
		func(*connmetav1.WatchConnectionsRequest, func(...*connmetav1.WatchEvent) error) error {
			return connmetaError(codes.OutOfRange, ReasonRevisionCompacted, map[string]string{MetaOldestRevision: "50"}, "compacted")
		},
	}
	s := c.WatchEvents(context.Background(), WatchOptions{StartAfterRevision: 7})
	for range s.Events() {
		t.Fatal("an event from a compacted watch")
	}
	var se *StatusError
	if !errors.Is(s.Err(), ErrCompacted) || !errors.As(s.Err(), &se) {
		t.Fatalf("Err = %v, want ErrCompacted", s.Err())
	}
	if oldest, ok := se.OldestRevision(); !ok || oldest != 50 || s.Resume().Revision != 7 {
		t.Fatalf("oldest %d %v, resume %+v", oldest, ok, s.Resume())
	}
}

func TestSentinelsMatchReasonsThenCodes(t *testing.T) {
	_, c := newFake(t)
	_, err := c.Connections.GetConnection(context.Background(), &connmetav1.GetConnectionRequest{Id: "x"})
	var se *StatusError
	if !errors.Is(err, ErrNotFound) || errors.Is(err, ErrInvalidArgument) || !errors.As(err, &se) {
		t.Fatalf("a raw stub's NOT_FOUND: %v", err)
	}
	if se.Code != codes.NotFound || se.Reason != ReasonConnectionNotFound || se.Meta("id") != "x" {
		t.Fatalf("StatusError = %+v", se)
	}
	if st, ok := status.FromError(fmt.Errorf("wrapped: %w", err)); !ok || st.Code() != codes.NotFound || len(st.Details()) != 1 {
		t.Fatalf("status.FromError lost the status: %v", st)
	}
	// Without a connmeta ErrorInfo the code decides; with one, the reason.
	plain := NewStatusError(status.New(codes.Unavailable, "connection refused"))
	if !errors.Is(plain, ErrUnavailable) || errors.Is(plain, ErrNotFound) {
		t.Fatal("a status without ErrorInfo matches by code")
	}
	oddNotFound, _ := status.New(codes.NotFound, "x").WithDetails(&errdetails.ErrorInfo{Reason: "SOMETHING_ELSE", Domain: Domain})
	if errors.Is(NewStatusError(oddNotFound), ErrNotFound) {
		t.Fatal("a NOT_FOUND with another reason matched ErrNotFound")
	}
	bad, _ := status.New(codes.InvalidArgument, "bad").WithDetails(
		&errdetails.ErrorInfo{Reason: ReasonInvalidArgument, Domain: Domain},
		&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{Field: "update_mask.paths[0]", Description: "unknown"}}})
	be := NewStatusError(bad)
	if d, ok := be.Field("update_mask"); !errors.Is(be, ErrInvalidArgument) || !ok || d != "unknown" {
		t.Fatalf("Field(update_mask) = %q %v", d, ok)
	}
	if _, ok := be.Field("update"); ok {
		t.Fatal("Field matched a prefix that is not a path element")
	}
	if asStatusError(io.EOF) != io.EOF || asStatusError(nil) != nil {
		t.Fatal("io.EOF and nil must stay as they are")
	}
}

func TestRunRouterAnswersEachQuery(t *testing.T) {
	f, c := newFake(t)
	f.router.answers = make(chan *connmetav1.RouteAnswer, 2)
	deadline := timestamppb.New(time.Now().Add(time.Minute))
	query := func(id, host string) *connmetav1.RouteQuery {
		return &connmetav1.RouteQuery{QueryId: id, Deadline: deadline, Server: withClient(serverAt("s-"+id, 1), "c", host)}
	}
	f.router.queries = []*connmetav1.RouteQuery{query("q1", "legacy.internal"), query("q2", "broken.internal")}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var states []RouterState
	var failed []string
	var mu sync.Mutex
	done := make(chan error, 1)
	go func() {
		done <- c.RunRouter(ctx, RouterOptions{
			Name:    "r",
			OnState: func(s RouterState) { mu.Lock(); states = append(states, s); mu.Unlock() },
			OnError: func(q *connmetav1.RouteQuery, err error) {
				mu.Lock()
				failed = append(failed, q.GetQueryId())
				mu.Unlock()
			},
		}, func(ctx context.Context, q *connmetav1.RouteQuery) (Decision, error) {
			if _, ok := ctx.Deadline(); !ok {
				return Decision{}, errors.New("no deadline")
			}
			if q.GetServer().GetServer().GetAddress().GetHost() == "broken.internal" {
				return Decision{}, errors.New("cannot decide")
			}
			return Decision{Address: &connmetav1.Address{Host: "new.internal", Port: 8443}, ClearVia: true}, nil
		})
	}()
	answers := map[string]*connmetav1.RouteAnswer{}
	for range 2 {
		select {
		case a := <-f.router.answers:
			answers[a.GetQueryId()] = a
		case <-time.After(5 * time.Second):
			t.Fatalf("answers so far: %v", answers)
		}
	}
	if a := answers["q1"]; !slices.Equal(a.GetUpdateMask().GetPaths(), []string{"address", "via"}) ||
		a.GetAddress().GetHost() != "new.internal" || a.GetVia() != nil {
		t.Fatalf("q1 answered %v", a)
	}
	if a := answers["q2"]; len(a.GetUpdateMask().GetPaths()) != 0 {
		t.Fatalf("a failed decision answered %v, want no change", a)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("RunRouter = %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(states) != 1 || !states[0].Active || states[0].ActiveRouter != "r" || !slices.Equal(failed, []string{"q2"}) {
		t.Fatalf("states %v, failed %v", states, failed)
	}
}

func TestRunRouterNeedsAName(t *testing.T) {
	_, c := newFake(t)
	if err := c.RunRouter(context.Background(), RouterOptions{}, nil); err == nil {
		t.Fatal("RunRouter without a name succeeded")
	}
}
