package main

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/fieldmaskpb"

	"github.com/connmeta/connmeta/clients/go/connmeta"
	"github.com/connmeta/connmeta/clients/go/connmetav1"
)

// The router cases play both sides of RouterService: a router on
// RouterService.Route, and the proxy on a Report stream of its own (the
// proxy of env drops everything but acks).

// stepTimeout bounds every single wait of the router cases: a message the
// contract promises "at once" that has not come by then is not coming.
const stepTimeout = 5 * time.Second

// inbox receives a stream's messages in the background so that every wait
// can have its own deadline.
type inbox[T any] struct {
	ch   chan T
	done chan struct{}
	err  error // why the stream ended; read after done is closed
}

func startInbox[T any](recv func() (T, error)) *inbox[T] {
	b := &inbox[T]{ch: make(chan T, 1024), done: make(chan struct{})}
	go func() {
		defer close(b.done)
		for {
			m, err := recv()
			if err != nil {
				b.err = err
				return
			}
			b.ch <- m
		}
	}()
	return b
}

// next is the next message, or an error naming what was awaited if none
// arrives within the time or the stream ends.
func (b *inbox[T]) next(within time.Duration, what string) (T, error) {
	var zero T
	timer := time.NewTimer(within)
	defer timer.Stop()
	select {
	case m := <-b.ch:
		return m, nil
	case <-b.done:
		select { // messages received before the end come first
		case m := <-b.ch:
			return m, nil
		default:
		}
		return zero, fmt.Errorf("stream ended while waiting for %s: %w", what, b.err)
	case <-timer.C:
		return zero, fmt.Errorf("no %s within %v", what, within)
	}
}

// router is one subscription on RouterService.Route.
type router struct {
	name   string
	stream connmetav1.RouterService_RouteClient
	cancel context.CancelFunc
	in     *inbox[*connmetav1.RouteResponse]
}

// subscribeRouter opens a Route stream, subscribes as name and returns the
// first RouteSubscribed.
func subscribeRouter(ctx context.Context, c *connmeta.Client, name string) (*router, *connmetav1.RouteSubscribed, error) {
	ctx, cancel := context.WithCancel(ctx)
	stream, err := connmetav1.NewRouterServiceClient(c.Conn()).Route(ctx)
	if err != nil {
		cancel()
		return nil, nil, fmt.Errorf("router %s: open Route stream: %w", name, err)
	}
	r := &router{name: name, stream: stream, cancel: cancel, in: startInbox(stream.Recv)}
	err = stream.Send(&connmetav1.RouteRequest{Message: &connmetav1.RouteRequest_Subscribe{
		Subscribe: &connmetav1.RouteSubscribe{Name: name},
	}})
	if err != nil {
		r.close()
		return nil, nil, fmt.Errorf("router %s: send subscribe: %w", name, err)
	}
	m, err := r.in.next(stepTimeout, "RouteSubscribed")
	if err != nil {
		r.close()
		return nil, nil, fmt.Errorf("router %s: %w", name, err)
	}
	sub := m.GetSubscribed()
	if sub == nil {
		r.close()
		return nil, nil, fmt.Errorf("router %s: first message is %v, want RouteSubscribed", name, m)
	}
	return r, sub, nil
}

// activeRouter subscribes and waits until the router receives queries. A
// router of an earlier case may still be leaving (its stream's end reaches
// the sidecar a moment after its process exited): this one is then a
// standby for that moment, which the contract allows.
func activeRouter(ctx context.Context, c *connmeta.Client, name string) (*router, error) {
	r, sub, err := subscribeRouter(ctx, c, name)
	if err != nil {
		return nil, err
	}
	for !sub.GetActive() {
		m, err := r.in.next(stepTimeout, fmt.Sprintf("RouteSubscribed{active: true} (standby behind %q)", sub.GetActiveRouter()))
		if err != nil {
			r.close()
			return nil, fmt.Errorf("router %s: %w", name, err)
		}
		if sub = m.GetSubscribed(); sub == nil {
			r.close()
			return nil, fmt.Errorf("router %s: a standby got %v", name, m)
		}
	}
	if sub.GetActiveRouter() != name {
		r.close()
		return nil, fmt.Errorf("router %s: RouteSubscribed{active: true} names %q as the active router", name, sub.GetActiveRouter())
	}
	return r, nil
}

// awaitQuery waits for the query about serverID. Queries about other
// servers (no other case runs concurrently, but nothing forbids it) are
// answered "no change" at once so that nothing else waits on this router.
func (r *router) awaitQuery(serverID string, within time.Duration) (*connmetav1.RouteQuery, error) {
	until := time.Now().Add(within)
	for {
		m, err := r.in.next(time.Until(until), fmt.Sprintf("RouteQuery for server %s", serverID))
		if err != nil {
			return nil, fmt.Errorf("router %s: %w", r.name, err)
		}
		q := m.GetQuery()
		if q == nil {
			return nil, fmt.Errorf("router %s: got %v while waiting for a query", r.name, m)
		}
		if q.GetServer().GetServer().GetConnection().GetId() == serverID {
			return q, nil
		}
		if err := r.answer(&connmetav1.RouteAnswer{QueryId: q.GetQueryId()}); err != nil {
			return nil, err
		}
	}
}

func (r *router) answer(a *connmetav1.RouteAnswer) error {
	err := r.stream.Send(&connmetav1.RouteRequest{Message: &connmetav1.RouteRequest_Answer{Answer: a}})
	if err != nil {
		return fmt.Errorf("router %s: send answer to %s: %w", r.name, a.GetQueryId(), err)
	}
	return nil
}

// close ends the subscription (the sidecar sees the stream cancelled).
func (r *router) close() {
	_ = r.stream.CloseSend()
	r.cancel()
}

// routingProxy is the proxy's Report stream, with everything the sidecar
// sends on it: acks, RoutingState and RouteDecision.
type routingProxy struct {
	id        string // ReportRequest.proxy_id, sent on the stream's first message
	stream    connmetav1.ReportService_ReportClient
	cancel    context.CancelFunc
	in        *inbox[*connmetav1.ReportResponse]
	seq       uint64
	first     *connmetav1.ReportResponse
	state     *connmetav1.RoutingState // the latest one received
	decisions []*connmetav1.RouteDecision
	acks      map[uint64]*connmetav1.ReportAck
}

// newRoutingProxy opens a Report stream and reads its first message, which
// the contract says is the RoutingState.
func newRoutingProxy(ctx context.Context, c *connmeta.Client) (*routingProxy, error) {
	ctx, cancel := context.WithCancel(ctx)
	stream, err := c.Reports.Report(ctx)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("open report stream: %w", err)
	}
	p := &routingProxy{id: newProxyID(), stream: stream, cancel: cancel, in: startInbox(stream.Recv), acks: map[uint64]*connmetav1.ReportAck{}}
	if err := p.receive("the first message (RoutingState)"); err != nil {
		p.close()
		return nil, err
	}
	if p.state == nil {
		p.close()
		return nil, fmt.Errorf("the report stream's first message is %v, want RoutingState", p.first)
	}
	return p, nil
}

// receive takes one message off the stream and files it.
func (p *routingProxy) receive(what string) error {
	return p.receiveWithin(stepTimeout, what)
}

func (p *routingProxy) receiveWithin(within time.Duration, what string) error {
	m, err := p.in.next(within, what)
	if err != nil {
		return fmt.Errorf("report stream: %w", err)
	}
	if p.first == nil {
		p.first = m
	}
	switch {
	case m.GetAck() != nil:
		p.acks[m.GetAck().GetSequence()] = m.GetAck()
	case m.GetRoutingState() != nil:
		p.state = m.GetRoutingState()
	case m.GetRouteDecision() != nil:
		p.decisions = append(p.decisions, m.GetRouteDecision())
	default:
		return fmt.Errorf("report stream: unknown message %v", m)
	}
	return nil
}

// send sends one request and returns its sequence (acks are awaited apart).
func (p *routingProxy) send(req *connmetav1.ReportRequest) (uint64, error) {
	p.seq++
	req.Sequence = p.seq
	if p.seq == 1 {
		req.ProxyId = p.id
	}
	if err := p.stream.Send(req); err != nil {
		return 0, fmt.Errorf("report request %d: %w", p.seq, err)
	}
	return p.seq, nil
}

// awaitAck waits for the ack of request seq; a rejected snapshot fails it
// (the router cases send only valid ones).
func (p *routingProxy) awaitAck(seq uint64) (int64, error) {
	for {
		if ack, ok := p.acks[seq]; ok {
			if len(ack.GetRejected()) > 0 {
				return 0, fmt.Errorf("report request %d: the sidecar rejected %v", seq, ack.GetRejected())
			}
			return ack.GetRevision(), nil
		}
		if err := p.receive(fmt.Sprintf("the ack of request %d", seq)); err != nil {
			return 0, err
		}
	}
}

// resync sends ResyncStart{route_deadline} and ResyncEnd, as the proxy does
// after every (re)connect; that sets this stream's route deadline.
func (p *routingProxy) resync(deadline time.Duration) error {
	for _, req := range []*connmetav1.ReportRequest{
		{Message: &connmetav1.ReportRequest_ResyncStart{ResyncStart: &connmetav1.ResyncStart{RouteDeadline: durationpb.New(deadline)}}},
		{Message: &connmetav1.ReportRequest_ResyncEnd{ResyncEnd: &connmetav1.ResyncEnd{}}},
	} {
		seq, err := p.send(req)
		if err != nil {
			return err
		}
		if _, err := p.awaitAck(seq); err != nil {
			return err
		}
	}
	return nil
}

// awaitRouter waits until the latest RoutingState is active and names router.
func (p *routingProxy) awaitRouter(name string) error {
	for !p.state.GetActive() || p.state.GetRouter() != name {
		if err := p.receive(fmt.Sprintf("RoutingState{active: true, router: %q} (latest: %v)", name, p.state)); err != nil {
			return err
		}
	}
	return nil
}

// awaitDecision waits at most within for the RouteDecision about serverID.
func (p *routingProxy) awaitDecision(serverID string, within time.Duration) (*connmetav1.RouteDecision, error) {
	until := time.Now().Add(within)
	for {
		for i, d := range p.decisions {
			if d.GetServerId() == serverID {
				p.decisions = slices.Delete(p.decisions, i, i+1)
				return d, nil
			}
		}
		if err := p.receiveWithin(time.Until(until), fmt.Sprintf("RouteDecision for server %s", serverID)); err != nil {
			return nil, err
		}
	}
}

func (p *routingProxy) close() {
	_ = p.stream.CloseSend()
	p.cancel()
}

// routedConnect reports a client and its server at server_connect (CLOSED,
// origin-a:443) on p; it returns when the batch was sent.
func routedConnect(p *routingProxy, clientID, serverID string) (sent time.Time, err error) {
	sent = time.Now()
	seq, err := p.send(&connmetav1.ReportRequest{Message: &connmetav1.ReportRequest_Batch{Batch: &connmetav1.ReportBatch{
		Snapshots: []*connmetav1.ConnectionSnapshot{
			clientSnapshot(clientID),
			serverSnapshot(serverID, clientID, closed, "origin-a", 443),
		},
	}}})
	if err == nil {
		_, err = p.awaitAck(seq)
	}
	return sent, err
}

// checkQuery checks what a RouteQuery says about the reported connect.
func checkQuery(q *connmetav1.RouteQuery, clientID string, sent time.Time, routeDeadline time.Duration) error {
	s := q.GetServer().GetServer()
	if s.GetConnection().GetState() != closed || !proto.Equal(s.GetAddress(), addr("origin-a", 443)) {
		return fmt.Errorf("RouteQuery.server is %v, want the CLOSED server with address origin-a:443", q.GetServer())
	}
	if got := q.GetClient().GetClient().GetConnection().GetId(); got != clientID {
		return fmt.Errorf("RouteQuery.client is %q, want the reported client %s", got, clientID)
	}
	if q.GetQueryId() == "" {
		return errors.New("RouteQuery.query_id is empty")
	}
	// The sidecar's share of the proxy's deadline ends before the proxy's own.
	dl := q.GetDeadline().AsTime()
	if !dl.After(sent) || dl.After(sent.Add(routeDeadline)) {
		return fmt.Errorf("RouteQuery.deadline is %v after the report, want within the route deadline (0, %v]", dl.Sub(sent), routeDeadline)
	}
	return nil
}

func caseRouterRetargetsConnect(ctx context.Context, e *env) error {
	const name = "go-router"
	const routeDeadline = 2 * time.Second
	target := addr("origin-b", 8443)

	r, err := activeRouter(ctx, e.client, name)
	if err != nil {
		return err
	}
	defer r.close()
	p, err := newRoutingProxy(ctx, e.client)
	if err != nil {
		return err
	}
	defer p.close()
	if err := p.awaitRouter(name); err != nil {
		return err
	}
	if err := p.resync(routeDeadline); err != nil {
		return err
	}
	start, err := e.client.CurrentRevision(ctx)
	if err != nil {
		return err
	}
	// Watch the client's connections from before the connect, until the
	// server's record shows the change applied.
	clientID, serverID := newID(), newID()
	watchCtx, stopWatch := context.WithTimeout(ctx, 3*stepTimeout)
	defer stopWatch()
	watched := make(chan []*connmetav1.WatchEvent, 1)
	watchErr := make(chan error, 1)
	go func() {
		var modified []*connmetav1.WatchEvent
		err := e.client.Watch(watchCtx, connmeta.WatchOptions{
			StartAfterRevision: start,
			Filter:             &connmetav1.ConnectionFilter{ClientId: clientID},
		}, func(ev *connmetav1.WatchEvent) error {
			if ev.GetType() == connmetav1.WatchEventType_WATCH_EVENT_TYPE_MODIFIED && connID(ev.GetConnection()) == serverID {
				modified = append(modified, ev)
				if ev.GetConnection().GetMetadata().GetLastChange().GetStatus() == connmetav1.ChangeStatus_CHANGE_STATUS_APPLIED {
					return errStop
				}
			}
			return nil
		})
		if errors.Is(err, errStop) {
			watched <- modified
			return
		}
		watchErr <- err
	}()

	sent, err := routedConnect(p, clientID, serverID)
	if err != nil {
		return err
	}
	q, err := r.awaitQuery(serverID, stepTimeout)
	if err != nil {
		return err
	}
	if err := checkQuery(q, clientID, sent, routeDeadline); err != nil {
		return err
	}
	err = r.answer(&connmetav1.RouteAnswer{
		QueryId:    q.GetQueryId(),
		Address:    target,
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"address"}},
	})
	if err != nil {
		return err
	}

	d, err := p.awaitDecision(serverID, routeDeadline)
	if err != nil {
		return err
	}
	if d.GetQueryId() != q.GetQueryId() || d.GetActor() != name || d.GetTimedOut() ||
		!slices.Equal(d.GetUpdateMask().GetPaths(), []string{"address"}) || !proto.Equal(d.GetAddress(), target) {
		return fmt.Errorf("RouteDecision is %v, want query_id %s, actor %q, update_mask [address], address origin-b:8443, not timed out", d, q.GetQueryId(), name)
	}

	// The sidecar recorded the decision before sending it: desired state,
	// while the record still shows what the proxy reported.
	rec, err := get(ctx, e.client, serverID)
	if err != nil {
		return err
	}
	if !proto.Equal(rec.GetServer().GetAddress(), addr("origin-a", 443)) {
		return fmt.Errorf("GetConnection address after the decision = %v, want origin-a:443 until the proxy reports it applied", rec.GetServer().GetAddress())
	}
	pc := rec.GetMetadata().GetPendingChange()
	if pc.GetActor() != name || pc.GetQueryId() != q.GetQueryId() || !slices.Equal(pc.GetFields(), []string{"address"}) ||
		!proto.Equal(pc.GetAddress(), target) || pc.GetStatus() != connmetav1.ChangeStatus_CHANGE_STATUS_PENDING ||
		pc.GetRevision() != rec.GetMetadata().GetRevision() {
		return fmt.Errorf("metadata.pending_change = %v, want actor %q, query_id %s, fields [address], address origin-b:8443, status PENDING, revision %d",
			pc, name, q.GetQueryId(), rec.GetMetadata().GetRevision())
	}
	if lc := rec.GetMetadata().GetLastChange(); lc != nil {
		return fmt.Errorf("metadata.last_change = %v before the proxy reported the outcome, want none", lc)
	}
	pendingRev := rec.GetMetadata().GetRevision()

	// The proxy applies it in server_connect and says so, as the addon does.
	seq, err := p.send(&connmetav1.ReportRequest{Message: &connmetav1.ReportRequest_Batch{Batch: &connmetav1.ReportBatch{
		Snapshots: []*connmetav1.ConnectionSnapshot{appliedAt(serverID, clientID, target, q.GetQueryId(), name)},
	}}})
	if err != nil {
		return err
	}
	appliedRev, err := p.awaitAck(seq)
	if err != nil {
		return err
	}
	rec, err = get(ctx, e.client, serverID)
	if err != nil {
		return err
	}
	if !proto.Equal(rec.GetServer().GetAddress(), target) || rec.GetMetadata().GetRevision() != appliedRev {
		return fmt.Errorf("after the APPLIED outcome (ack revision %d): address %v at revision %d, want origin-b:8443 at %d",
			appliedRev, rec.GetServer().GetAddress(), rec.GetMetadata().GetRevision(), appliedRev)
	}
	if pc := rec.GetMetadata().GetPendingChange(); pc != nil {
		return fmt.Errorf("metadata.pending_change = %v after the APPLIED outcome, want none", pc)
	}
	lc := rec.GetMetadata().GetLastChange()
	if lc.GetActor() != name || lc.GetQueryId() != q.GetQueryId() || !slices.Contains(lc.GetFields(), "address") ||
		lc.GetStatus() != connmetav1.ChangeStatus_CHANGE_STATUS_APPLIED || lc.GetRevision() != pendingRev {
		return fmt.Errorf("metadata.last_change = %v, want actor %q, query_id %s, fields [address], status APPLIED, revision %d (accepted at)",
			lc, name, q.GetQueryId(), pendingRev)
	}

	select {
	case evs := <-watched:
		var sawPending bool
		for _, ev := range evs {
			m := ev.GetConnection().GetMetadata()
			if ev.GetRevision() == pendingRev && m.GetPendingChange().GetActor() == name {
				sawPending = true
			}
		}
		last := evs[len(evs)-1]
		if !sawPending || last.GetRevision() != appliedRev || last.GetConnection().GetMetadata().GetLastChange().GetActor() != name {
			return fmt.Errorf("watch MODIFIED events of server %s: %v; want one at revision %d with pending_change.actor %q, then one at %d with last_change APPLIED by %q",
				serverID, evs, pendingRev, name, appliedRev, name)
		}
	case err := <-watchErr:
		return fmt.Errorf("watch from revision %d ended before the router's change was applied: %w", start, err)
	case <-time.After(stepTimeout):
		return fmt.Errorf("watch from revision %d: no MODIFIED event with last_change APPLIED within %v", start, stepTimeout)
	}
	return nil
}

func caseRouterSilentFailsOpen(ctx context.Context, e *env) error {
	const name = "go-router"
	const routeDeadline = time.Second
	const bound = 2 * time.Second

	r, err := activeRouter(ctx, e.client, name)
	if err != nil {
		return err
	}
	defer r.close()
	p, err := newRoutingProxy(ctx, e.client)
	if err != nil {
		return err
	}
	defer p.close()
	if err := p.awaitRouter(name); err != nil {
		return err
	}
	if err := p.resync(routeDeadline); err != nil {
		return err
	}
	clientID, serverID := newID(), newID()
	sent, err := routedConnect(p, clientID, serverID)
	if err != nil {
		return err
	}
	q, err := r.awaitQuery(serverID, stepTimeout)
	if err != nil {
		return err
	}
	if err := checkQuery(q, clientID, sent, routeDeadline); err != nil {
		return err
	}
	// The router says nothing.
	d, err := p.awaitDecision(serverID, bound-time.Since(sent))
	if err != nil {
		return fmt.Errorf("an unanswered query (route deadline %v): %w", routeDeadline, err)
	}
	waited := time.Since(sent)
	if !d.GetTimedOut() || len(d.GetUpdateMask().GetPaths()) != 0 || d.GetQueryId() != q.GetQueryId() {
		return fmt.Errorf("RouteDecision after %v is %v, want timed_out with an empty update_mask for query %s", waited, d, q.GetQueryId())
	}
	// A late answer is ignored.
	err = r.answer(&connmetav1.RouteAnswer{
		QueryId:    q.GetQueryId(),
		Address:    addr("origin-b", 8443),
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"address"}},
	})
	if err != nil {
		return err
	}
	time.Sleep(200 * time.Millisecond)
	rec, err := get(ctx, e.client, serverID)
	if err != nil {
		return err
	}
	m := rec.GetMetadata()
	if !proto.Equal(rec.GetServer().GetAddress(), addr("origin-a", 443)) || m.GetLastChange() != nil || m.GetPendingChange() != nil {
		return fmt.Errorf("after a timed-out query and a late answer the server has address %v, last_change %v, pending_change %v; want origin-a:443 and no change",
			rec.GetServer().GetAddress(), m.GetLastChange(), m.GetPendingChange())
	}
	// Decisions about other servers may come (every proxy stream gets the
	// pending changes of UpdateServerConnection); none about this one.
	for _, d := range p.decisions {
		if d.GetServerId() == serverID {
			return fmt.Errorf("a further RouteDecision after the timed-out one: %v", d)
		}
	}
	return nil
}

func caseRouterStandbyTakesOver(ctx context.Context, e *env) error {
	const first, second = "go-router-a", "go-router-b"
	a, err := activeRouter(ctx, e.client, first)
	if err != nil {
		return err
	}
	defer a.close()
	b, sub, err := subscribeRouter(ctx, e.client, second)
	if err != nil {
		return err
	}
	defer b.close()
	if sub.GetActive() || sub.GetActiveRouter() != first {
		return fmt.Errorf("second router's RouteSubscribed = %v, want active false, active_router %q", sub, first)
	}
	dup, _, err := subscribeRouter(ctx, e.client, first)
	if err == nil {
		dup.close()
		return fmt.Errorf("a second subscription as %q succeeded, want ALREADY_EXISTS", first)
	}
	if d := connmeta.DetailsOf(err); d == nil || d.Code != codes.AlreadyExists {
		return fmt.Errorf("a second subscription as %q: %w; want ALREADY_EXISTS", first, err)
	}

	p, err := newRoutingProxy(ctx, e.client)
	if err != nil {
		return err
	}
	defer p.close()
	if err := p.awaitRouter(first); err != nil {
		return err
	}
	a.close() // the active router leaves
	m, err := b.in.next(stepTimeout, "RouteSubscribed{active: true} after the active router left")
	if err != nil {
		return fmt.Errorf("router %s: %w", second, err)
	}
	if s := m.GetSubscribed(); !s.GetActive() || s.GetActiveRouter() != second {
		return fmt.Errorf("standby %s got %v when the active router left, want RouteSubscribed{active: true, active_router: %q}", second, m, second)
	}
	if err := p.awaitRouter(second); err != nil {
		return err
	}
	if err := p.resync(2 * time.Second); err != nil {
		return err
	}
	serverID := newID()
	_, err = routedConnect(p, newID(), serverID)
	if err != nil {
		return err
	}
	q, err := b.awaitQuery(serverID, stepTimeout)
	if err != nil {
		return err
	}
	if err := b.answer(&connmetav1.RouteAnswer{QueryId: q.GetQueryId()}); err != nil {
		return err
	}
	d, err := p.awaitDecision(serverID, stepTimeout)
	if err != nil {
		return err
	}
	if d.GetActor() != second || d.GetTimedOut() || len(d.GetUpdateMask().GetPaths()) != 0 {
		return fmt.Errorf("RouteDecision = %v, want actor %q, an empty update_mask, not timed out", d, second)
	}
	return nil
}
