package main

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/fieldmaskpb"

	"github.com/connmeta/connmeta/clients/go/connmeta"
	"github.com/connmeta/connmeta/clients/go/connmetav1"
)

// cases are the interop cases of tests/interop/cases.md, in that order.
// The names and one-line descriptions must match that file (a pytest test
// compares them).
var cases = []interopCase{
	{"get_not_found", "GetConnection of an unknown id fails NOT_FOUND with ErrorInfo CONNECTION_NOT_FOUND", caseGetNotFound},
	{"update_open_server_refused", "changing the address of an OPEN server fails FAILED_PRECONDITION with ErrorInfo CONNECTION_OPEN and PreconditionFailure; nothing changes", caseUpdateOpenServerRefused},
	{"update_same_value_on_open_server_accepted", "setting an OPEN server's address to its current value succeeds and records no change", caseUpdateSameValueOnOpenServer},
	{"update_closed_server", "an accepted change of a CLOSED server waits in pending_change while the record keeps the reported address; the proxy's APPLIED route outcome moves it to last_change and the address; a pending via is withdrawn by naming the current one", caseUpdateClosedServer},
	{"update_stale_etag", "an update with an outdated etag fails ABORTED with ErrorInfo ETAG_MISMATCH; a read-modify-write retry succeeds", caseUpdateStaleEtag},
	{"update_invalid_argument", "port 70000, an empty host, an address with flowinfo, via scheme TLS and mask path sni each fail INVALID_ARGUMENT with a BadRequest naming the field; an invalid address outside the mask is ignored", caseUpdateInvalidArgument},
	{"list_pagination", "paging with a small page_size returns every id exactly once, in id order, all pages at one pinned revision", caseListPagination},
	{"watch_resume_no_gap", "a watch cut mid-stream and resumed from its last revision sees every concurrent write exactly once, in order", caseWatchResumeNoGap},
	{"watch_compacted", "watching from a revision older than the history fails OUT_OF_RANGE with ErrorInfo REVISION_COMPACTED and oldestRevision; relist then watch recovers", caseWatchCompacted},
	{"watch_slow_consumer", "a watcher that stops reading is ended RESOURCE_EXHAUSTED with ErrorInfo WATCHER_TOO_SLOW and lastRevision; resuming from it loses nothing", caseWatchSlowConsumer},
	{"watch_survives_sidecar_restart", "after a kill -9 and restart of the server (no --state-dir), a watch and a page token of the old incarnation fail OUT_OF_RANGE REVISION_COMPACTED and INVALID_ARGUMENT, never OK; the helper's informer relists by itself, says so, delivers the vanished records as DELETED and ends with exactly the new store's records", caseWatchSurvivesSidecarRestart},
	{"keepalive", "keepalive pings every 10 s on an idle watch do not get the connection closed (too_many_pings); the watch still delivers afterwards", caseKeepalive},
	{"authz_roles", "with the example policy, each role's certificate may call exactly the methods the policy gives it: the others fail PERMISSION_DENIED with ErrorInfo naming the method; the Unix socket may write; a connection without a client certificate fails the TLS handshake (UNAVAILABLE)", caseAuthzRoles},
	{"health", "grpc.health.v1 Check reports SERVING for \"\" and connmeta.v1.ConnectionService", caseHealth},
	{"report_rejects_bad_snapshot", "a batch whose middle snapshot has transport_protocol UNSPECIFIED is acked with that one rejected (index 1, INVALID_SNAPSHOT, a violation naming its field path) and the other two stored; the stream goes on: a further batch with port 70000 at index 0 is acked the same way", caseReportRejectsBadSnapshot},
	{"two_proxies_resync_independent", "two Report streams with different proxy_id each report an OPEN client; a resync of proxy A, overlapping one of proxy B, closes only A's client (CLOSED, last_hook RESYNC); B's client stays OPEN and B's resync closes nothing", caseTwoProxiesResyncIndependent},
	{"unix_socket", "the Unix socket serves the same store: a record reported over TCP reads back identical, errors keep their details", caseUnixSocket},
	{"router_retargets_connect", "a server_connect reported while a router is subscribed reaches it as a RouteQuery; its answer reaches the proxy as a RouteDecision and waits as pending_change; the proxy's APPLIED route outcome shows on the record and in the watch with the new address and last_change.actor = the router's name", caseRouterRetargetsConnect},
	{"router_silent_fails_open", "a query the router leaves unanswered ends in a timed-out no-change RouteDecision within the sidecar's share of the proxy's route deadline; the server keeps its address and a late answer is ignored", caseRouterSilentFailsOpen},
	{"router_standby_takes_over", "a second router is a standby naming the active one and a duplicate name fails ALREADY_EXISTS; when the active router leaves, the standby is told it is active, RoutingState names it and it gets the next query", caseRouterStandbyTakesOver},
	{"informer_converges", "the informer/reflector converges to exactly the server's List after a churn of creates, changes and deletes, after a compaction and after a sidecar restart, with handler calls matching the changes and no missed delete", caseInformerConverges},
	{"router_helper_retargets", "a router written with the helper in under 30 lines retargets a server connect: the decision reaches the proxy and settles APPLIED on the record", caseRouterHelperRetargets},
	{"typed_errors", "every sentinel/typed error matches its status: not found, connection open, etag mismatch, compacted, invalid argument with field violations, permission denied", caseTypedErrors},
}

const actor = "interop-go"

func get(ctx context.Context, c *connmeta.Client, id string) (*connmetav1.ConnectionRecord, error) {
	resp, err := c.Connections.GetConnection(ctx, &connmetav1.GetConnectionRequest{Id: id})
	if err != nil {
		return nil, fmt.Errorf("get %s: %w", id, err)
	}
	return resp.GetConnection(), nil
}

// reportServer reports a client and one server of it.
func reportServer(e *env, state connmetav1.ConnectionState, host string, port uint32) (clientID, serverID string, err error) {
	clientID, serverID = newID(), newID()
	_, err = e.proxy.report(clientSnapshot(clientID), serverSnapshot(serverID, clientID, state, host, port))
	return clientID, serverID, err
}

func caseGetNotFound(ctx context.Context, e *env) error {
	id := newID()
	_, err := e.client.Connections.GetConnection(ctx, &connmetav1.GetConnectionRequest{Id: id})
	_, err = expectError("get unknown id", err, codes.NotFound, connmeta.ReasonConnectionNotFound)
	return err
}

func caseUpdateOpenServerRefused(ctx context.Context, e *env) error {
	_, id, err := reportServer(e, open, "origin.example", 443)
	if err != nil {
		return err
	}
	before, err := get(ctx, e.client, id)
	if err != nil {
		return err
	}
	_, err = e.client.UpdateServer(ctx, connmeta.ServerUpdate{ID: id, Actor: actor, Address: addr("elsewhere.example", 8443)})
	d, err := expectError("update address of OPEN server", err, codes.FailedPrecondition, connmeta.ReasonConnectionOpen)
	if err != nil {
		return err
	}
	if f := d.Metadata("field"); f != "address" {
		return fmt.Errorf("ErrorInfo metadata field = %q, want \"address\"", f)
	}
	if len(d.PreconditionFailure.GetViolations()) == 0 {
		return errors.New("FAILED_PRECONDITION carries no PreconditionFailure violation")
	}
	after, err := get(ctx, e.client, id)
	if err != nil {
		return err
	}
	if !proto.Equal(before, after) {
		return fmt.Errorf("refused update changed the record:\nbefore %v\nafter  %v", before, after)
	}
	return nil
}

func caseUpdateSameValueOnOpenServer(ctx context.Context, e *env) error {
	_, id, err := reportServer(e, open, "origin.example", 443)
	if err != nil {
		return err
	}
	before, err := get(ctx, e.client, id)
	if err != nil {
		return err
	}
	rec, err := e.client.UpdateServer(ctx, connmeta.ServerUpdate{ID: id, Actor: actor, Address: addr("origin.example", 443)})
	if err != nil {
		return fmt.Errorf("same-value update of OPEN server: %w", err)
	}
	bm, am := before.GetMetadata(), rec.GetMetadata()
	if am.GetRevision() != bm.GetRevision() || am.GetEtag() != bm.GetEtag() {
		return fmt.Errorf("a no-op update recorded a change: revision %d -> %d, etag %s -> %s",
			bm.GetRevision(), am.GetRevision(), bm.GetEtag(), am.GetEtag())
	}
	if am.GetLastChange() != nil || am.GetPendingChange() != nil {
		return fmt.Errorf("a no-op update set last_change %v, pending_change %v", am.GetLastChange(), am.GetPendingChange())
	}
	return nil
}

// checkPending checks that m holds, as pending_change, the update of fields
// by actor accepted at m's revision, with no route query.
func checkPending(what string, m *connmetav1.RecordMetadata, fields []string, address *connmetav1.Address, via *connmetav1.ServerSpec) error {
	pc := m.GetPendingChange()
	if pc.GetActor() != actor || !slices.Equal(pc.GetFields(), fields) || pc.GetRevision() != m.GetRevision() ||
		pc.GetStatus() != connmetav1.ChangeStatus_CHANGE_STATUS_PENDING || pc.GetQueryId() != "" ||
		!proto.Equal(pc.GetAddress(), address) || !proto.Equal(pc.GetVia(), via) {
		return fmt.Errorf("%s: metadata.pending_change = %v, want actor %s, fields %v, address %v, via %v, revision %d, status PENDING, no query_id",
			what, pc, actor, fields, address, via, m.GetRevision())
	}
	return nil
}

func caseUpdateClosedServer(ctx context.Context, e *env) error {
	clientID, id, err := reportServer(e, closed, "origin.example", 443)
	if err != nil {
		return err
	}
	before, err := get(ctx, e.client, id)
	if err != nil {
		return err
	}
	reported := addr("origin.example", 443)
	target := addr("elsewhere.example", 8443)
	rec, err := e.client.UpdateServer(ctx, connmeta.ServerUpdate{
		ID: id, Etag: before.GetMetadata().GetEtag(), Actor: actor, Address: target,
	})
	if err != nil {
		return fmt.Errorf("update address of CLOSED server: %w", err)
	}
	// Desired, not observed: the server keeps what the proxy reported.
	if !proto.Equal(rec.GetServer().GetAddress(), reported) {
		return fmt.Errorf("address after update = %v, want %v (the reported one) until the proxy applies the change", rec.GetServer().GetAddress(), reported)
	}
	m := rec.GetMetadata()
	if m.GetEtag() == before.GetMetadata().GetEtag() {
		return fmt.Errorf("etag did not change: %s", m.GetEtag())
	}
	if m.GetRevision() <= before.GetMetadata().GetRevision() {
		return fmt.Errorf("revision did not advance: %d -> %d", before.GetMetadata().GetRevision(), m.GetRevision())
	}
	if err := checkPending("update address", m, []string{"address"}, target, nil); err != nil {
		return err
	}
	if !proto.Equal(m.GetLastChange(), before.GetMetadata().GetLastChange()) {
		return fmt.Errorf("last_change changed to %v before the proxy reported the outcome", m.GetLastChange())
	}
	reread, err := get(ctx, e.client, id)
	if err != nil {
		return err
	}
	if reread.GetMetadata().GetEtag() != m.GetEtag() {
		return fmt.Errorf("get after update: etag %s, update returned %s", reread.GetMetadata().GetEtag(), m.GetEtag())
	}
	accepted := m.GetRevision()

	// The proxy applies it at the server's connect and says so.
	rev, err := e.proxy.report(appliedAt(id, clientID, target, "", actor))
	if err != nil {
		return err
	}
	rec, err = get(ctx, e.client, id)
	if err != nil {
		return err
	}
	m = rec.GetMetadata()
	if !proto.Equal(rec.GetServer().GetAddress(), target) || m.GetRevision() != rev {
		return fmt.Errorf("after the APPLIED outcome (ack revision %d): address %v at revision %d, want %v", rev, rec.GetServer().GetAddress(), m.GetRevision(), target)
	}
	if m.GetPendingChange() != nil {
		return fmt.Errorf("pending_change = %v after the APPLIED outcome, want none", m.GetPendingChange())
	}
	lc := m.GetLastChange()
	if lc.GetActor() != actor || !slices.Equal(lc.GetFields(), []string{"address"}) || lc.GetStatus() != connmetav1.ChangeStatus_CHANGE_STATUS_APPLIED ||
		lc.GetRevision() != accepted || !proto.Equal(lc.GetAddress(), target) {
		return fmt.Errorf("last_change = %v, want actor %s, fields [address], address %v, status APPLIED, revision %d (accepted at)", lc, actor, target, accepted)
	}

	// A via waits the same way; naming the current value (none) withdraws it.
	proxySpec := &connmetav1.ServerSpec{Scheme: connmetav1.Scheme_SCHEME_HTTP, Address: addr("proxy.internal", 3128)}
	rec, err = e.client.UpdateServer(ctx, connmeta.ServerUpdate{ID: id, Actor: actor, Via: proxySpec})
	if err != nil {
		return fmt.Errorf("set via: %w", err)
	}
	if rec.GetServer().GetVia() != nil {
		return fmt.Errorf("via after update = %v, want none (the reported one) until the proxy applies the change", rec.GetServer().GetVia())
	}
	if err := checkPending("set via", rec.GetMetadata(), []string{"via"}, nil, proxySpec); err != nil {
		return err
	}
	rec, err = e.client.UpdateServer(ctx, connmeta.ServerUpdate{ID: id, Actor: actor, ClearVia: true})
	if err != nil {
		return fmt.Errorf("clear via: %w", err)
	}
	if rec.GetServer().GetVia() != nil || rec.GetMetadata().GetPendingChange() != nil {
		return fmt.Errorf("after clearing via: via %v, pending_change %v; want neither (the pending via is withdrawn)",
			rec.GetServer().GetVia(), rec.GetMetadata().GetPendingChange())
	}
	return nil
}

func caseUpdateStaleEtag(ctx context.Context, e *env) error {
	_, id, err := reportServer(e, closed, "origin.example", 443)
	if err != nil {
		return err
	}
	before, err := get(ctx, e.client, id)
	if err != nil {
		return err
	}
	stale := before.GetMetadata().GetEtag()
	if _, err := e.client.UpdateServer(ctx, connmeta.ServerUpdate{ID: id, Etag: stale, Actor: actor, Address: addr("first.example", 443)}); err != nil {
		return fmt.Errorf("first update: %w", err)
	}
	_, err = e.client.UpdateServer(ctx, connmeta.ServerUpdate{ID: id, Etag: stale, Actor: actor, Address: addr("second.example", 443)})
	if _, err := expectError("update with stale etag "+stale, err, codes.Aborted, connmeta.ReasonEtagMismatch); err != nil {
		return err
	}
	after, err := get(ctx, e.client, id)
	if err != nil {
		return err
	}
	// Accepted changes wait in pending_change; the server keeps the
	// reported address.
	if h := after.GetMetadata().GetPendingChange().GetAddress().GetHost(); h != "first.example" {
		return fmt.Errorf("pending_change asks for host %q, want first.example (the refused update must not replace it)", h)
	}
	rec, err := e.client.RetargetServer(ctx, id, addr("third.example", 443), actor)
	if err != nil {
		return fmt.Errorf("RetargetServer (fresh etag): %w", err)
	}
	if h := rec.GetMetadata().GetPendingChange().GetAddress().GetHost(); h != "third.example" {
		return fmt.Errorf("RetargetServer: pending_change asks for host %q, want third.example", h)
	}
	if h := rec.GetServer().GetAddress().GetHost(); h != "origin.example" {
		return fmt.Errorf("RetargetServer: server host %q, want origin.example (the reported one) until the proxy applies it", h)
	}
	return nil
}

func caseUpdateInvalidArgument(ctx context.Context, e *env) error {
	_, id, err := reportServer(e, closed, "origin.example", 443)
	if err != nil {
		return err
	}
	before, err := get(ctx, e.client, id)
	if err != nil {
		return err
	}
	mask := func(paths ...string) *fieldmaskpb.FieldMask { return &fieldmaskpb.FieldMask{Paths: paths} }
	tests := []struct {
		name  string
		req   *connmetav1.UpdateServerConnectionRequest
		field string
	}{
		{"port 70000", &connmetav1.UpdateServerConnectionRequest{Address: addr("origin.example", 70000), UpdateMask: mask("address")}, "address.port"},
		{"empty host", &connmetav1.UpdateServerConnectionRequest{Address: addr("", 443), UpdateMask: mask("address")}, "address.host"},
		// A server's address is a (host, port) pair in mitmproxy; an IPv6
		// socket's flowinfo, even 0, has no place in it.
		{"address with flowinfo", &connmetav1.UpdateServerConnectionRequest{
			Address:    &connmetav1.Address{Host: "2001:db8::1", Port: 443, Flowinfo: proto.Uint32(0)},
			UpdateMask: mask("address"),
		}, "address.flowinfo"},
		{"via scheme TLS", &connmetav1.UpdateServerConnectionRequest{
			Via:        &connmetav1.ServerSpec{Scheme: connmetav1.Scheme_SCHEME_TLS, Address: addr("proxy.internal", 3128)},
			UpdateMask: mask("via"),
		}, "via.scheme"},
		{"mask path sni", &connmetav1.UpdateServerConnectionRequest{UpdateMask: mask("sni")}, "update_mask"},
	}
	for _, tc := range tests {
		tc.req.Id, tc.req.Actor = id, actor
		_, err := e.client.Connections.UpdateServerConnection(ctx, tc.req)
		d, err := expectError(tc.name, err, codes.InvalidArgument, connmeta.ReasonInvalidArgument)
		if err != nil {
			return err
		}
		violations := d.FieldViolations()
		if !namesField(violations, tc.field) {
			return fmt.Errorf("%s: BadRequest field violations %v do not name %q", tc.name, violations, tc.field)
		}
	}
	// Fields the mask does not name are ignored, however invalid: this
	// clears a via the server does not have (a no-op).
	_, err = e.client.Connections.UpdateServerConnection(ctx, &connmetav1.UpdateServerConnectionRequest{
		Id: id, Actor: actor, Address: addr("", 70000), UpdateMask: mask("via"),
	})
	if err != nil {
		return fmt.Errorf("update_mask [via] with an invalid address outside the mask: %w; want it ignored", err)
	}
	after, err := get(ctx, e.client, id)
	if err != nil {
		return err
	}
	if !proto.Equal(before, after) {
		return fmt.Errorf("invalid and no-op updates changed the record:\nbefore %v\nafter  %v", before, after)
	}
	return nil
}

// namesField reports whether a violation names field or a part of it
// ("update_mask.paths" and "update_mask.paths[0]" name "update_mask"): the
// contract fixes the field, not how deep into it the server points.
func namesField(violations map[string]string, field string) bool {
	for f := range violations {
		if f == field || strings.HasPrefix(f, field+".") || strings.HasPrefix(f, field+"[") {
			return true
		}
	}
	return false
}

func caseListPagination(ctx context.Context, e *env) error {
	const servers, pageSize = 23, 5
	clientID := newID()
	snaps := []*connmetav1.ConnectionSnapshot{clientSnapshot(clientID)}
	want := []string{clientID}
	for i := range servers {
		id := newID()
		want = append(want, id)
		snaps = append(snaps, serverSnapshot(id, clientID, closed, "origin.example", uint32(1000+i)))
	}
	if _, err := e.proxy.report(snaps...); err != nil {
		return err
	}
	slices.Sort(want)

	req := &connmetav1.ListConnectionsRequest{PageSize: pageSize, Filter: &connmetav1.ConnectionFilter{ClientId: clientID}}
	var (
		got      []string
		revision int64
		pages    int
	)
	for page, err := range e.client.Pages(ctx, req) {
		if err != nil {
			return fmt.Errorf("page %d: %w", pages+1, err)
		}
		pages++
		if len(page.GetConnections()) > pageSize {
			return fmt.Errorf("page %d holds %d records, page_size is %d", pages, len(page.GetConnections()), pageSize)
		}
		if pages == 1 {
			revision = page.GetRevision()
			// Writes after the first page must not show in later pages:
			// the listing is pinned at the first page's revision.
			late := serverSnapshot(newID(), clientID, closed, "late.example", 443)
			moved := serverSnapshot(want[len(want)-1], clientID, closed, "moved.example", 443)
			if want[len(want)-1] == clientID {
				moved = nil
			}
			batch := []*connmetav1.ConnectionSnapshot{late}
			if moved != nil {
				batch = append(batch, moved)
			}
			if _, err := e.proxy.report(batch...); err != nil {
				return err
			}
		} else if page.GetRevision() != revision {
			return fmt.Errorf("page %d is at revision %d, page 1 was at %d", pages, page.GetRevision(), revision)
		}
		for _, rec := range page.GetConnections() {
			got = append(got, connID(rec))
			if h := rec.GetServer().GetAddress().GetHost(); h == "moved.example" || h == "late.example" {
				return fmt.Errorf("page %d shows a write made after page 1 (host %s): the listing is not pinned", pages, h)
			}
		}
	}
	if pages < (len(want)+pageSize-1)/pageSize {
		return fmt.Errorf("%d records came in %d pages of at most %d", len(got), pages, pageSize)
	}
	if !slices.Equal(got, want) {
		return fmt.Errorf("listing (in order) = %v\nwant every id once, in id order = %v", got, want)
	}
	records, rev, err := e.client.ListAll(ctx, req)
	if err != nil {
		return err
	}
	if len(records) != len(want)+1 || rev <= revision {
		return fmt.Errorf("fresh listing: %d records at revision %d, want %d after revision %d", len(records), rev, len(want)+1, revision)
	}
	return nil
}

func connID(rec *connmetav1.ConnectionRecord) string {
	if s := rec.GetServer(); s != nil {
		return s.GetConnection().GetId()
	}
	return rec.GetClient().GetConnection().GetId()
}

// writer reports count changes to servers of clientID from its own stream,
// pausing between them, and collects the revision of each.
type writer struct {
	mu        sync.Mutex
	revisions []int64
	done      chan struct{}
	err       error
}

func startWriter(ctx context.Context, c *connmeta.Client, clientID string, servers []string, count int, pause time.Duration) (*writer, error) {
	p, err := newProxy(ctx, c)
	if err != nil {
		return nil, err
	}
	w := &writer{done: make(chan struct{})}
	go func() {
		defer close(w.done)
		defer p.close()
		for i := range count {
			// A new port every time: a snapshot equal to the stored one
			// might not make a revision.
			rev, err := p.report(serverSnapshot(servers[i%len(servers)], clientID, closed, "origin.example", uint32(2000+i)))
			if err != nil {
				w.err = err
				return
			}
			w.mu.Lock()
			w.revisions = append(w.revisions, rev)
			w.mu.Unlock()
			time.Sleep(pause)
		}
	}()
	return w, nil
}

func (w *writer) finished() bool {
	select {
	case <-w.done:
		return true
	default:
		return false
	}
}

func (w *writer) final() int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.revisions[len(w.revisions)-1]
}

func isChange(ev *connmetav1.WatchEvent) bool {
	switch ev.GetType() {
	case connmetav1.WatchEventType_WATCH_EVENT_TYPE_ADDED,
		connmetav1.WatchEventType_WATCH_EVENT_TYPE_MODIFIED,
		connmetav1.WatchEventType_WATCH_EVENT_TYPE_DELETED:
		return true
	}
	return false
}

var errStop = errors.New("stop")

// collectUntil watches from after and appends change revisions to got
// until the writer is done and its final revision has been seen.
func collectUntil(ctx context.Context, c *connmeta.Client, filter *connmetav1.ConnectionFilter, after int64, w *writer, got *[]int64) error {
	err := c.Watch(ctx, connmeta.WatchOptions{StartAfterRevision: after, Filter: filter, Bookmarks: true},
		func(ev *connmetav1.WatchEvent) error {
			if isChange(ev) {
				*got = append(*got, ev.GetRevision())
			}
			if w.finished() && w.err == nil && ev.GetRevision() >= w.final() {
				return errStop
			}
			return nil
		})
	if !errors.Is(err, errStop) {
		return fmt.Errorf("watch from revision %d: %w", after, err)
	}
	return w.err
}

func caseWatchResumeNoGap(ctx context.Context, e *env) error {
	clientID := newID()
	servers := []string{newID(), newID(), newID()}
	if _, err := e.proxy.report(clientSnapshot(clientID)); err != nil {
		return err
	}
	start, err := e.client.CurrentRevision(ctx)
	if err != nil {
		return err
	}
	filter := &connmetav1.ConnectionFilter{ClientId: clientID}
	w, err := startWriter(ctx, e.client, clientID, servers, 60, 10*time.Millisecond)
	if err != nil {
		return err
	}

	var got []int64
	const cutAfter = 20
	err = e.client.Watch(ctx, connmeta.WatchOptions{StartAfterRevision: start, Filter: filter, Bookmarks: true},
		func(ev *connmetav1.WatchEvent) error {
			if isChange(ev) {
				got = append(got, ev.GetRevision())
				if len(got) == cutAfter {
					return errStop // drop the stream mid-way
				}
			}
			return nil
		})
	if !errors.Is(err, errStop) {
		return fmt.Errorf("first watch: %w", err)
	}
	cutWhileWriting := !w.finished()

	// Resume on a new connection, as a restarted consumer would.
	resumed, err := connmeta.Dial(e.target, e.dial...)
	if err != nil {
		return err
	}
	defer resumed.Close()
	if err := collectUntil(ctx, resumed, filter, got[len(got)-1], w, &got); err != nil {
		return err
	}
	if err := checkRevisions(got, w.revisions); err != nil {
		return err
	}
	if !cutWhileWriting {
		return errors.New("the writer finished before the watch was cut; the case proved nothing about concurrent writes")
	}
	return nil
}

func caseWatchCompacted(ctx context.Context, e *env) error {
	clientID, serverID := newID(), newID()
	if _, err := e.proxy.report(clientSnapshot(clientID)); err != nil {
		return err
	}
	start, err := e.client.CurrentRevision(ctx)
	if err != nil {
		return err
	}
	// Far more changes than the server's (small) history keeps.
	var last int64
	for i := range 64 {
		if last, err = e.proxy.report(serverSnapshot(serverID, clientID, closed, "origin.example", uint32(3000+i))); err != nil {
			return err
		}
	}
	filter := &connmetav1.ConnectionFilter{ClientId: clientID}
	stream, err := e.client.Connections.WatchConnections(ctx, &connmetav1.WatchConnectionsRequest{StartAfterRevision: start, Filter: filter})
	if err != nil {
		return err
	}
	_, err = stream.Recv()
	d, err := expectError(fmt.Sprintf("watch after compacted revision %d", start), err, codes.OutOfRange, connmeta.ReasonRevisionCompacted)
	if err != nil {
		return err
	}
	oldest, perr := strconv.ParseInt(d.Metadata(connmeta.MetaOldestRevision), 10, 64)
	if perr != nil || oldest <= start || oldest > last {
		return fmt.Errorf("ErrorInfo metadata oldestRevision = %q, want a revision in (%d, %d]", d.Metadata(connmeta.MetaOldestRevision), start, last)
	}

	// The helper recovers: relist, then watch from the listing's revision.
	var (
		relists  []connmeta.Listing
		listPort uint32
		extraRev = make(chan int64, 1)
	)
	err = e.client.Watch(ctx, connmeta.WatchOptions{
		StartAfterRevision: start,
		Filter:             filter,
		Bookmarks:          true,
		Relist: func(ctx context.Context, l connmeta.Listing) error {
			relists = append(relists, l)
			// One more write, which the resumed watch must deliver.
			rev, err := e.proxy.report(serverSnapshot(serverID, clientID, closed, "after-relist.example", 443))
			if err != nil {
				return err
			}
			extraRev <- rev
			return nil
		},
	}, func(ev *connmetav1.WatchEvent) error {
		if !isChange(ev) {
			return nil
		}
		if len(relists) == 1 && ev.GetRevision() == relists[0].Revision {
			// The listing's difference to what this watch delivered
			// (nothing): every record as ADDED.
			if ev.GetType() != connmetav1.WatchEventType_WATCH_EVENT_TYPE_ADDED {
				return fmt.Errorf("relist delivered %v, want only ADDED", ev)
			}
			if connID(ev.GetConnection()) == serverID {
				listPort = ev.GetConnection().GetServer().GetAddress().GetPort()
			}
			return nil
		}
		want := <-extraRev
		if ev.GetRevision() != want || ev.GetConnection().GetServer().GetAddress().GetHost() != "after-relist.example" {
			return fmt.Errorf("first event after relist: revision %d %v, want the write at %d", ev.GetRevision(), ev.GetConnection(), want)
		}
		return errStop
	})
	if !errors.Is(err, errStop) {
		return fmt.Errorf("watch with relist: %w", err)
	}
	if len(relists) != 1 || relists[0].Revision < last || relists[0].Cause != connmeta.RelistCompacted || listPort != 3063 {
		return fmt.Errorf("relist: %d listings (%v), last write %d, server port %d as ADDED (want one listing, cause compacted, port 3063)", len(relists), relists, last, listPort)
	}
	return nil
}

// padded is a server snapshot made large (about 2 KiB) so that a watcher
// that does not read fills the HTTP/2 flow-control windows quickly.
func padded(id, clientID string, port uint32) *connmetav1.ConnectionSnapshot {
	s := serverSnapshot(id, clientID, closed, "origin.example", port)
	conn := s.GetServer().GetConnection()
	for i := range 48 {
		conn.CipherList = append(conn.CipherList, fmt.Sprintf("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384_%02d", i))
	}
	return s
}

func caseWatchSlowConsumer(ctx context.Context, e *env) error {
	clientID := newID()
	servers := []string{newID(), newID(), newID(), newID()}
	if _, err := e.proxy.report(clientSnapshot(clientID)); err != nil {
		return err
	}
	// Small, fixed windows: with grpc-go's default dynamic window (BDP
	// estimation) the client would buffer megabytes on the server's behalf
	// before any backpressure reached the server.
	slow, err := connmeta.Dial(e.target, append(slices.Clone(e.dial), connmeta.WithDialOptions(
		grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10)))...)
	if err != nil {
		return err
	}
	defer slow.Close()
	start, err := slow.CurrentRevision(ctx)
	if err != nil {
		return err
	}
	filter := &connmetav1.ConnectionFilter{ClientId: clientID}
	stream, err := slow.Connections.WatchConnections(ctx, &connmetav1.WatchConnectionsRequest{StartAfterRevision: start, Filter: filter})
	if err != nil {
		return err
	}
	// One change read proves the watcher is registered before the flood.
	var want []int64
	first, err := e.proxy.report(padded(servers[0], clientID, 1))
	if err != nil {
		return err
	}
	want = append(want, first)
	var got []int64
	resp, err := stream.Recv()
	if err != nil {
		return fmt.Errorf("first event: %w", err)
	}
	for _, ev := range resp.GetEvents() {
		if isChange(ev) {
			got = append(got, ev.GetRevision())
		}
	}

	// Flood while not reading: 1,200 changes of ~2 KiB, 24 per batch.
	for b := range 50 {
		batch := make([]*connmetav1.ConnectionSnapshot, 0, 24)
		for i := range 24 {
			n := b*24 + i
			batch = append(batch, padded(servers[n%len(servers)], clientID, uint32(10000+n)))
		}
		rev, err := e.proxy.report(batch...)
		if err != nil {
			return err
		}
		for r := rev - int64(len(batch)) + 1; r <= rev; r++ {
			want = append(want, r)
		}
	}
	final := want[len(want)-1]

	// Now read: the stream must end with WATCHER_TOO_SLOW, not just
	// deliver everything. A bounded wait after the last revision tells
	// the two apart.
	recvErr := make(chan error, 1)
	go func() {
		for {
			resp, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			for _, ev := range resp.GetEvents() {
				if isChange(ev) {
					got = append(got, ev.GetRevision())
				}
			}
		}
	}()
	var streamErr error
	select {
	case streamErr = <-recvErr:
	case <-time.After(15 * time.Second):
		return fmt.Errorf("watcher that did not read while %d changes (~%d KiB) were written was never ended WATCHER_TOO_SLOW (it received %d)",
			len(want)-1, (len(want)-1)*2, len(got))
	}
	d, err := expectError("slow watcher", streamErr, codes.ResourceExhausted, connmeta.ReasonWatcherTooSlow)
	if err != nil {
		return err
	}
	named, perr := strconv.ParseInt(d.Metadata(connmeta.MetaLastRevision), 10, 64)
	if perr != nil {
		return fmt.Errorf("ErrorInfo metadata lastRevision = %q, want a revision", d.Metadata(connmeta.MetaLastRevision))
	}
	lastGot := start
	if len(got) > 0 {
		lastGot = got[len(got)-1]
	}
	if named != lastGot {
		return fmt.Errorf("lastRevision = %d but the last revision received was %d: resuming from it would lose or repeat changes", named, lastGot)
	}
	if named >= final {
		return fmt.Errorf("watcher was ended only after receiving everything (last_revision %d, final write %d)", named, final)
	}
	// Resume exactly where the server said, through the helper.
	err = e.client.Watch(ctx, connmeta.WatchOptions{StartAfterRevision: named, Filter: filter}, func(ev *connmetav1.WatchEvent) error {
		if isChange(ev) {
			got = append(got, ev.GetRevision())
		}
		if ev.GetRevision() >= final {
			return errStop
		}
		return nil
	})
	if !errors.Is(err, errStop) {
		return fmt.Errorf("resume from last_revision %d: %w", named, err)
	}
	return checkRevisions(got, want)
}

func caseKeepalive(ctx context.Context, e *env) error {
	counter := &pingCounter{}
	counting, err := countingOptions(e, counter)
	if err != nil {
		return err
	}
	c, err := connmeta.Dial(e.target, append(counting, connmeta.WithKeepalive(10*time.Second))...)
	if err != nil {
		return err
	}
	defer c.Close()
	clientID := newID()
	if _, err := e.proxy.report(clientSnapshot(clientID)); err != nil {
		return err
	}
	start, err := c.CurrentRevision(ctx)
	if err != nil {
		return err
	}
	// No bookmarks: the stream must stay silent so only pings cross it.
	stream, err := c.Connections.WatchConnections(ctx, &connmetav1.WatchConnectionsRequest{
		StartAfterRevision: start,
		Filter:             &connmetav1.ConnectionFilter{ClientId: clientID},
	})
	if err != nil {
		return err
	}
	events := make(chan *connmetav1.WatchConnectionsResponse, 1)
	failed := make(chan error, 1)
	go func() {
		for {
			resp, err := stream.Recv()
			if err != nil {
				failed <- err
				return
			}
			events <- resp
		}
	}()
	select {
	case err := <-failed:
		hint := ""
		if strings.Contains(err.Error(), "too_many_pings") {
			hint = " (the server's minimum ping interval is above 10 s)"
		}
		return fmt.Errorf("idle watch ended after %d pings: %w%s", counter.pings.Load(), err, hint)
	case resp := <-events:
		return fmt.Errorf("idle watch received %v; nothing should match", resp)
	case <-time.After(e.keepalive):
	}
	pings := counter.pings.Load()
	// Half the ideal count: timers drift and pings wait for activity to
	// stop, but a client that does not ping at all sends none.
	if minPings := int64(e.keepalive / (20 * time.Second)); pings < max(minPings, 1) && e.keepalive >= 20*time.Second {
		return fmt.Errorf("only %d keepalive pings in %s with a 10 s interval: the client is not pinging, so this proved nothing", pings, e.keepalive)
	}
	// The watch is still alive: a change arrives on it.
	rev, err := e.proxy.report(serverSnapshot(newID(), clientID, closed, "origin.example", 443))
	if err != nil {
		return err
	}
	select {
	case err := <-failed:
		return fmt.Errorf("watch ended after %d pings: %w", pings, err)
	case resp := <-events:
		if evs := resp.GetEvents(); len(evs) == 0 || evs[0].GetRevision() != rev {
			return fmt.Errorf("after the idle period the watch delivered %v, want revision %d", resp, rev)
		}
	case <-time.After(10 * time.Second):
		return fmt.Errorf("after %s idle and %d pings the watch did not deliver revision %d", e.keepalive, pings, rev)
	}
	fmt.Printf("keepalive: %d pings in %s, watch alive\n", pings, e.keepalive)
	return nil
}

func caseHealth(ctx context.Context, e *env) error {
	for _, service := range []string{"", "connmeta.v1.ConnectionService"} {
		resp, err := e.client.Health.Check(ctx, &healthpb.HealthCheckRequest{Service: service})
		if err != nil {
			return fmt.Errorf("health check %q: %w", service, err)
		}
		if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			return fmt.Errorf("health check %q: %s, want SERVING", service, resp.GetStatus())
		}
	}
	return nil
}

func caseUnixSocket(ctx context.Context, e *env) error {
	target := e.unixTarget
	if target == "" && strings.HasPrefix(e.target, "unix:") {
		target = e.target
	}
	if !strings.HasPrefix(target, "unix:") {
		return fmt.Errorf("case unix_socket needs --unix-target unix:///path (got %q)", target)
	}
	_, id, err := reportServer(e, open, "origin.example", 443)
	if err != nil {
		return err
	}
	overTCP, err := get(ctx, e.client, id)
	if err != nil {
		return err
	}
	uds, err := connmeta.Dial(target, e.dial...)
	if err != nil {
		return err
	}
	defer uds.Close()
	overUDS, err := get(ctx, uds, id)
	if err != nil {
		return fmt.Errorf("over %s: %w", target, err)
	}
	if !proto.Equal(overTCP, overUDS) {
		return fmt.Errorf("record differs between listeners:\n%s: %v\n%s: %v", e.target, overTCP, target, overUDS)
	}
	_, err = uds.Connections.GetConnection(ctx, &connmetav1.GetConnectionRequest{Id: newID()})
	_, err = expectError("get unknown id over "+target, err, codes.NotFound, connmeta.ReasonConnectionNotFound)
	return err
}

// checkRejection checks that rejected is exactly one INVALID_SNAPSHOT
// rejection of the snapshot at index, with id, and a violation naming
// field (the path from the request) or a part of it.
func checkRejection(what string, rejected []*connmetav1.SnapshotRejection, index uint32, id, field string) error {
	if len(rejected) != 1 {
		return fmt.Errorf("%s: ack.rejected = %v, want exactly the snapshot at index %d", what, rejected, index)
	}
	r := rejected[0]
	if r.GetIndex() != index || r.GetConnectionId() != id || r.GetReason() != "INVALID_SNAPSHOT" || r.GetMessage() == "" {
		return fmt.Errorf("%s: rejection %v, want index %d, connection_id %s, reason INVALID_SNAPSHOT and a message", what, r, index, id)
	}
	violations := map[string]string{}
	for _, v := range r.GetViolations() {
		violations[v.GetField()] = v.GetDescription()
	}
	if !namesField(violations, field) {
		return fmt.Errorf("%s: violations %v do not name %q", what, violations, field)
	}
	return nil
}

func caseReportRejectsBadSnapshot(ctx context.Context, e *env) error {
	clientID, badID, goodID := newID(), newID(), newID()
	bad := serverSnapshot(badID, clientID, closed, "origin.example", 443)
	bad.GetServer().GetConnection().TransportProtocol = connmetav1.TransportProtocol_TRANSPORT_PROTOCOL_UNSPECIFIED
	ack, err := e.proxy.reportAck(clientSnapshot(clientID), bad, serverSnapshot(goodID, clientID, closed, "origin.example", 443))
	if err != nil {
		return err
	}
	if err := checkRejection("batch 1", ack.GetRejected(), 1, badID, "batch.snapshots[1].server.connection.transport_protocol"); err != nil {
		return err
	}
	for _, id := range []string{clientID, goodID} {
		if _, err := get(ctx, e.client, id); err != nil {
			return fmt.Errorf("a valid snapshot of the batch was not stored: %w", err)
		}
	}
	good, err := get(ctx, e.client, goodID)
	if err != nil {
		return err
	}
	if good.GetMetadata().GetRevision() != ack.GetRevision() {
		return fmt.Errorf("the last valid snapshot is at revision %d, the ack says the store reached %d", good.GetMetadata().GetRevision(), ack.GetRevision())
	}
	_, err = e.client.Connections.GetConnection(ctx, &connmetav1.GetConnectionRequest{Id: badID})
	if _, err := expectError("get the rejected snapshot's id", err, codes.NotFound, connmeta.ReasonConnectionNotFound); err != nil {
		return err
	}

	// The stream goes on: the next batch is acked, again snapshot by snapshot.
	worse := serverSnapshot(newID(), clientID, closed, "origin.example", 70000)
	fixed := serverSnapshot(badID, clientID, closed, "origin.example", 443)
	ack2, err := e.proxy.reportAck(worse, fixed)
	if err != nil {
		return fmt.Errorf("the batch after a rejection: %w", err)
	}
	if err := checkRejection("batch 2", ack2.GetRejected(), 0, worse.GetServer().GetConnection().GetId(), "batch.snapshots[0].server.address.port"); err != nil {
		return err
	}
	rec, err := get(ctx, e.client, badID)
	if err != nil {
		return fmt.Errorf("the corrected snapshot of batch 2 was not stored: %w", err)
	}
	if rec.GetMetadata().GetRevision() != ack2.GetRevision() || ack2.GetRevision() <= ack.GetRevision() {
		return fmt.Errorf("corrected snapshot at revision %d, batch 2 acked at %d after batch 1 at %d", rec.GetMetadata().GetRevision(), ack2.GetRevision(), ack.GetRevision())
	}
	return nil
}

// resyncClient is a client's snapshot as the proxy sends it in a resync.
func resyncClient(id string) *connmetav1.ConnectionSnapshot {
	s := clientSnapshot(id)
	s.Hook = connmetav1.Hook_HOOK_RESYNC
	return s
}

func caseTwoProxiesResyncIndependent(ctx context.Context, e *env) error {
	a, err := newProxy(ctx, e.client)
	if err != nil {
		return err
	}
	defer a.close()
	b, err := newProxy(ctx, e.client)
	if err != nil {
		return err
	}
	defer b.close()
	clientA, clientB := newID(), newID()
	if _, err := a.report(clientSnapshot(clientA)); err != nil {
		return err
	}
	if _, err := b.report(clientSnapshot(clientB)); err != nil {
		return err
	}

	// B starts a resync; A resyncs completely meanwhile, without its client.
	if _, err := b.resyncStart(); err != nil {
		return fmt.Errorf("proxy %s: %w", b.id, err)
	}
	if _, err := a.resyncStart(); err != nil {
		return fmt.Errorf("proxy %s: %w", a.id, err)
	}
	endA, err := a.resyncEnd()
	if err != nil {
		return fmt.Errorf("proxy %s (while %s resyncs): %w", a.id, b.id, err)
	}
	if endA.GetClosedByResync() != 1 {
		return fmt.Errorf("proxy %s's resync closed %d connections, want 1 (its own client)", a.id, endA.GetClosedByResync())
	}
	recA, err := get(ctx, e.client, clientA)
	if err != nil {
		return err
	}
	if st, m := recA.GetClient().GetConnection().GetState(), recA.GetMetadata(); st != closed || m.GetLastHook() != connmetav1.Hook_HOOK_RESYNC || m.GetProxyId() != a.id {
		return fmt.Errorf("proxy %s's unreported client: state %s, last_hook %s, proxy_id %q; want CLOSED, HOOK_RESYNC, %q",
			a.id, st, m.GetLastHook(), m.GetProxyId(), a.id)
	}
	checkB := func(when string) error {
		recB, err := get(ctx, e.client, clientB)
		if err != nil {
			return err
		}
		if st, m := recB.GetClient().GetConnection().GetState(), recB.GetMetadata(); st != open || m.GetProxyId() != b.id {
			return fmt.Errorf("%s: proxy %s's client has state %s, proxy_id %q; want OPEN, %q", when, b.id, st, m.GetProxyId(), b.id)
		}
		return nil
	}
	if err := checkB(fmt.Sprintf("after proxy %s's resync", a.id)); err != nil {
		return err
	}

	// B completes its own resync, which still holds its client.
	if _, err := b.report(resyncClient(clientB)); err != nil {
		return err
	}
	endB, err := b.resyncEnd()
	if err != nil {
		return fmt.Errorf("proxy %s: resync_end after %s's resync: %w", b.id, a.id, err)
	}
	if endB.GetClosedByResync() != 0 {
		return fmt.Errorf("proxy %s's resync closed %d connections, want 0", b.id, endB.GetClosedByResync())
	}
	return checkB(fmt.Sprintf("after proxy %s's resync", b.id))
}
