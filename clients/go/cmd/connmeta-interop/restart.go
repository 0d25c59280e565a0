package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"

	"github.com/connmeta/connmeta/clients/go/connmeta"
	"github.com/connmeta/connmeta/clients/go/connmetav1"
)

// restartRequest is the line a case prints on stdout to have the harness
// kill -9 the server and start it again on the same TCP address and Unix
// socket; the harness answers "restarted" on stdin once it serves again.
// Run by hand, restart the server yourself and press Enter.
const restartRequest = "connmeta-interop: restart-server"

var stdin = bufio.NewReader(os.Stdin)

func restartServer() error {
	fmt.Println(restartRequest)
	fmt.Fprintln(os.Stderr, "connmeta-interop: kill -9 the server, start it again on the same addresses, then press Enter")
	line, err := stdin.ReadString('\n')
	if err != nil {
		return fmt.Errorf("asked for a server restart, but stdin ended (%v): run this case under tests/interop/test_interop.py", err)
	}
	if answer := strings.TrimSpace(line); answer != "restarted" && answer != "" {
		return fmt.Errorf("asked for a server restart, the harness answered %q", answer)
	}
	return nil
}

// informer follows the records of one filter through the helper in
// informer mode, and remembers what it was told.
type informer struct {
	mu       sync.Mutex
	state    map[string]*connmetav1.ConnectionRecord
	listings []connmeta.Listing
	// events after each listing; deleted holds every DELETED record.
	events  []*connmetav1.WatchEvent
	deleted []*connmetav1.ConnectionRecord
	done    chan error
}

func startInformer(ctx context.Context, c *connmeta.Client, filter *connmetav1.ConnectionFilter) *informer {
	inf := &informer{state: map[string]*connmetav1.ConnectionRecord{}, done: make(chan error, 1)}
	go func() {
		inf.done <- c.Watch(ctx, connmeta.WatchOptions{
			Filter:    filter,
			Bookmarks: true,
			Relist: func(_ context.Context, l connmeta.Listing) error {
				inf.mu.Lock()
				defer inf.mu.Unlock()
				inf.listings = append(inf.listings, l)
				return nil
			},
		}, func(ev *connmetav1.WatchEvent) error {
			inf.mu.Lock()
			defer inf.mu.Unlock()
			if !isChange(ev) {
				return nil
			}
			inf.events = append(inf.events, ev)
			id := connID(ev.GetConnection())
			if ev.GetType() == connmetav1.WatchEventType_WATCH_EVENT_TYPE_DELETED {
				inf.deleted = append(inf.deleted, ev.GetConnection())
				delete(inf.state, id)
			} else {
				inf.state[id] = ev.GetConnection()
			}
			return nil
		})
	}()
	return inf
}

// awaitState waits until the informer's records are exactly want.
func (inf *informer) awaitState(want []*connmetav1.ConnectionRecord, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		inf.mu.Lock()
		diff := stateDiff(inf.state, want)
		inf.mu.Unlock()
		if diff == "" {
			return nil
		}
		select {
		case err := <-inf.done:
			return fmt.Errorf("the informer's watch ended: %w", err)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("after %s the informer's records still differ from the listing: %s", within, diff)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func stateDiff(got map[string]*connmetav1.ConnectionRecord, want []*connmetav1.ConnectionRecord) string {
	var diffs []string
	ids := map[string]bool{}
	for _, r := range want {
		id := connID(r)
		ids[id] = true
		if g, ok := got[id]; !ok {
			diffs = append(diffs, "missing "+id)
		} else if !proto.Equal(g, r) {
			diffs = append(diffs, fmt.Sprintf("%s is at revision %d, want %d", id, g.GetMetadata().GetRevision(), r.GetMetadata().GetRevision()))
		}
	}
	for id := range got {
		if !ids[id] {
			diffs = append(diffs, "extra "+id)
		}
	}
	slices.Sort(diffs)
	return strings.Join(diffs, "; ")
}

func caseWatchSurvivesSidecarRestart(ctx context.Context, e *env) error {
	clientID, s1, s2, s3, s4 := newID(), newID(), newID(), newID(), newID()
	if _, err := e.proxy.report(clientSnapshot(clientID),
		serverSnapshot(s1, clientID, closed, "one.example", 443),
		serverSnapshot(s2, clientID, closed, "two.example", 443),
		serverSnapshot(s3, clientID, closed, "three.example", 443)); err != nil {
		return err
	}
	filter := &connmetav1.ConnectionFilter{ClientId: clientID}

	// A consumer on its own connection (the Unix socket when given: it
	// must come back too) follows the client's records.
	target := e.target
	if e.unixTarget != "" {
		target = e.unixTarget
	}
	consumer, err := connmeta.Dial(target, e.dial...)
	if err != nil {
		return err
	}
	defer consumer.Close()
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	inf := startInformer(watchCtx, consumer, filter)

	// One change while it watches, then the resume points of this
	// incarnation: a revision, its incarnation and a page token.
	oldRev, err := e.proxy.report(serverSnapshot(s1, clientID, closed, "one.example", 8443))
	if err != nil {
		return err
	}
	var md metadata.MD
	page, err := e.client.Connections.ListConnections(ctx, &connmetav1.ListConnectionsRequest{PageSize: 1, Filter: filter}, grpc.Header(&md))
	if err != nil {
		return err
	}
	oldInc, token := page.GetHeader().GetIncarnation(), page.GetNextPageToken()
	if oldInc == "" || token == "" || page.GetRevision() != oldRev {
		return fmt.Errorf("listing before the restart: incarnation %q, page token %q, revision %d; want both set and revision %d", oldInc, token, page.GetRevision(), oldRev)
	}
	if got := md.Get("connmeta-incarnation"); !slices.Equal(got, []string{oldInc}) {
		return fmt.Errorf("response metadata connmeta-incarnation = %q, want the header's %q", got, oldInc)
	}
	before, _, err := e.client.ListAll(ctx, &connmetav1.ListConnectionsRequest{Filter: filter})
	if err != nil {
		return err
	}
	if err := inf.awaitState(before, 5*time.Second); err != nil {
		return fmt.Errorf("before the restart: %w", err)
	}
	var s3Before *connmetav1.ConnectionRecord
	for _, r := range before {
		if connID(r) == s3 {
			s3Before = r
		}
	}

	if err := restartServer(); err != nil {
		return err
	}

	// The proxy reconnects and reports what is still there: s1 changed, s2
	// as before, a new s4; s3 closed while the sidecar was down.
	waitCtx, cancelWait := context.WithTimeout(ctx, 5*time.Second)
	defer cancelWait()
	if _, err := e.client.Health.Check(waitCtx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true)); err != nil {
		return fmt.Errorf("the restarted server is not reachable: %w", err)
	}
	p, err := newProxy(ctx, e.client)
	if err != nil {
		return err
	}
	defer p.close()
	newRev, err := p.report(clientSnapshot(clientID),
		serverSnapshot(s1, clientID, closed, "one.example", 9443),
		serverSnapshot(s2, clientID, closed, "two.example", 443),
		serverSnapshot(s4, clientID, closed, "four.example", 443))
	if err != nil {
		return err
	}
	// Write until the new store's revision passes the old one, so that the
	// old resume points below would be inside its range if revisions were
	// reused. (Revisions start from the clock: the first write does.)
	for i := 0; newRev <= oldRev; i++ {
		if i == 1000 {
			return fmt.Errorf("after 1000 writes the restarted store is at revision %d, still not past %d", newRev, oldRev)
		}
		if newRev, err = p.report(serverSnapshot(s4, clientID, closed, "four.example", uint32(1000+i))); err != nil {
			return err
		}
	}

	// Every resume point of the old incarnation is refused, never OK.
	for _, inc := range []string{"", oldInc} {
		what := fmt.Sprintf("watch resumed after old revision %d (incarnation %q) on the restarted server", oldRev, inc)
		if err := expectWatchRefused(ctx, e.client, what, &connmetav1.WatchConnectionsRequest{
			StartAfterRevision: oldRev, Incarnation: inc, Filter: filter,
		}, oldInc); err != nil {
			return err
		}
	}
	md = nil
	_, err = e.client.Connections.ListConnections(ctx, &connmetav1.ListConnectionsRequest{PageSize: 1, Filter: filter, PageToken: token}, grpc.Header(&md))
	d, err := expectError("list with a page token of the old incarnation", err, codes.InvalidArgument, connmeta.ReasonInvalidArgument)
	if err != nil {
		return err
	}
	if _, ok := d.FieldViolations()["page_token"]; !ok {
		return fmt.Errorf("INVALID_ARGUMENT names %v, want page_token", d.FieldViolations())
	}
	if err := checkNewIncarnation("the refused page token", md, oldInc); err != nil {
		return err
	}

	// The informer relisted by itself and holds exactly the new store.
	after, _, err := e.client.ListAll(ctx, &connmetav1.ListConnectionsRequest{Filter: filter})
	if err != nil {
		return err
	}
	if err := inf.awaitState(after, 8*time.Second); err != nil {
		return fmt.Errorf("after the restart: %w", err)
	}
	stopWatch()
	if err := <-inf.done; !errors.Is(err, context.Canceled) {
		return fmt.Errorf("the informer's watch ended with %v, want it running until stopped", err)
	}
	return checkRelisted(inf, oldInc, s3Before)
}

// expectWatchRefused opens a watch that must fail OUT_OF_RANGE /
// REVISION_COMPACTED, answered by an incarnation other than oldInc.
func expectWatchRefused(ctx context.Context, c *connmeta.Client, what string, req *connmetav1.WatchConnectionsRequest, oldInc string) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	stream, err := c.Connections.WatchConnections(ctx, req)
	if err == nil {
		var resp *connmetav1.WatchConnectionsResponse
		if resp, err = stream.Recv(); err == nil {
			return fmt.Errorf("%s: accepted, sent %v", what, resp)
		}
	}
	if _, err := expectError(what, err, codes.OutOfRange, connmeta.ReasonRevisionCompacted); err != nil {
		return err
	}
	md, _ := stream.Header()
	return checkNewIncarnation(what, md, oldInc)
}

func checkNewIncarnation(what string, md metadata.MD, oldInc string) error {
	got := md.Get("connmeta-incarnation")
	if len(got) != 1 || got[0] == "" || got[0] == oldInc {
		return fmt.Errorf("%s: response metadata connmeta-incarnation = %q, want the new incarnation (not %q)", what, got, oldInc)
	}
	return nil
}

// checkRelisted checks what the informer was told: a relist caused by the
// restart, with the vanished server delivered as DELETED in its last
// version, and no event of the old incarnation after it.
func checkRelisted(inf *informer, oldInc string, s3Before *connmetav1.ConnectionRecord) error {
	var restarted *connmeta.Listing
	for i, l := range inf.listings {
		if l.Cause == connmeta.RelistRestarted {
			restarted = &inf.listings[i]
		}
	}
	if restarted == nil || restarted.Incarnation == oldInc || restarted.Incarnation == "" {
		return fmt.Errorf("the informer was never told of a relist caused by the restart (listings: %v)", inf.listings)
	}
	if !slices.ContainsFunc(inf.deleted, func(r *connmetav1.ConnectionRecord) bool { return proto.Equal(r, s3Before) }) {
		return fmt.Errorf("the server that vanished in the restart was not delivered as DELETED in its last version (DELETED: %v)", inf.deleted)
	}
	// After the restart's listing, revisions only go up from it.
	seen := false
	var prev int64
	for _, ev := range inf.events {
		if ev.GetRevision() == restarted.Revision {
			seen = true
		}
		if seen && ev.GetRevision() < prev {
			return fmt.Errorf("event at revision %d after one at %d following the relist", ev.GetRevision(), prev)
		}
		if seen {
			prev = ev.GetRevision()
		}
	}
	return nil
}
