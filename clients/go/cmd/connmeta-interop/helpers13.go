package main

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/connmeta/connmeta/clients/go/connmeta"
	"github.com/connmeta/connmeta/clients/go/connmetav1"
)

// helperRouter is the whole router of case router_helper_retargets, written
// with the helper as a user would: it sends connects to origin-a to
// origin-b:8443 and leaves everything else alone. helper_router_test.go
// keeps it under 30 lines.
func helperRouter(ctx context.Context, c *connmeta.Client, name string) error {
	return c.RunRouter(ctx, connmeta.RouterOptions{Name: name},
		func(ctx context.Context, q *connmetav1.RouteQuery) (connmeta.Decision, error) {
			if q.GetServer().GetServer().GetAddress().GetHost() != "origin-a" {
				return connmeta.Decision{}, nil // no change
			}
			return connmeta.Decision{Address: &connmetav1.Address{Host: "origin-b", Port: 8443}}, nil
		})
}

func caseRouterHelperRetargets(ctx context.Context, e *env) error {
	const name = "go-helper-router"
	target := addr("origin-b", 8443)
	routerCtx, stopRouter := context.WithCancel(ctx)
	defer stopRouter()
	routerDone := make(chan error, 1)
	go func() { routerDone <- helperRouter(routerCtx, e.client, name) }()

	p, err := newRoutingProxy(ctx, e.client)
	if err != nil {
		return err
	}
	defer p.close()
	// The helper waits as a standby while a router of an earlier case is
	// still leaving; the proxy is told once it is active.
	if err := p.awaitRouter(name); err != nil {
		return fmt.Errorf("the helper's router never became active: %w", err)
	}
	if err := p.resync(2 * time.Second); err != nil {
		return err
	}
	clientID, serverID := newID(), newID()
	if _, err := routedConnect(p, clientID, serverID); err != nil {
		return err
	}
	d, err := p.awaitDecision(serverID, 2*time.Second)
	if err != nil {
		return err
	}
	if d.GetQueryId() == "" || d.GetActor() != name || d.GetTimedOut() ||
		!slices.Equal(d.GetUpdateMask().GetPaths(), []string{"address"}) || !proto.Equal(d.GetAddress(), target) {
		return fmt.Errorf("RouteDecision is %v, want a query id, actor %q, update_mask [address], address origin-b:8443, not timed out", d, name)
	}
	rec, err := get(ctx, e.client, serverID)
	if err != nil {
		return err
	}
	pc := rec.GetMetadata().GetPendingChange()
	if pc.GetActor() != name || pc.GetQueryId() != d.GetQueryId() || pc.GetStatus() != connmetav1.ChangeStatus_CHANGE_STATUS_PENDING {
		return fmt.Errorf("metadata.pending_change = %v, want the router's decision PENDING", pc)
	}
	pendingRev := rec.GetMetadata().GetRevision()
	// The proxy applies it at the connect and says so, as the addon does.
	seq, err := p.send(&connmetav1.ReportRequest{Message: &connmetav1.ReportRequest_Batch{Batch: &connmetav1.ReportBatch{
		Snapshots: []*connmetav1.ConnectionSnapshot{appliedAt(serverID, clientID, target, d.GetQueryId(), name)},
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
	lc := rec.GetMetadata().GetLastChange()
	if !proto.Equal(rec.GetServer().GetAddress(), target) || rec.GetMetadata().GetRevision() != appliedRev ||
		rec.GetMetadata().GetPendingChange() != nil || lc.GetStatus() != connmetav1.ChangeStatus_CHANGE_STATUS_APPLIED ||
		lc.GetActor() != name || lc.GetQueryId() != d.GetQueryId() || lc.GetRevision() != pendingRev {
		return fmt.Errorf("after the APPLIED outcome the record is %v; want origin-b:8443 at revision %d, no pending_change, last_change APPLIED by %q for query %s accepted at %d",
			rec, appliedRev, name, d.GetQueryId(), pendingRev)
	}
	stopRouter()
	select {
	case err := <-routerDone:
		if !errors.Is(err, context.Canceled) {
			return fmt.Errorf("RunRouter ended with %v, want context.Canceled when stopped", err)
		}
	case <-time.After(stepTimeout):
		return errors.New("RunRouter did not return after its context was cancelled")
	}
	return nil
}

// sentinels are every sentinel error: a status must match exactly one.
var sentinels = map[string]error{
	"ErrNotFound": connmeta.ErrNotFound, "ErrConnectionOpen": connmeta.ErrConnectionOpen,
	"ErrEtagMismatch": connmeta.ErrEtagMismatch, "ErrCompacted": connmeta.ErrCompacted,
	"ErrWatcherTooSlow": connmeta.ErrWatcherTooSlow, "ErrInvalidArgument": connmeta.ErrInvalidArgument,
	"ErrPermissionDenied": connmeta.ErrPermissionDenied, "ErrUnauthenticated": connmeta.ErrUnauthenticated,
	"ErrAlreadyExists": connmeta.ErrAlreadyExists, "ErrTooManyWatchers": connmeta.ErrTooManyWatchers,
	"ErrTooManyStreams": connmeta.ErrTooManyStreams, "ErrUnavailable": connmeta.ErrUnavailable,
	"ErrInternal": connmeta.ErrInternal,
}

// expectTyped checks that err matches sentinel want and no other, and is a
// *StatusError with this code and reason, which it returns.
func expectTyped(what string, err error, want string, code codes.Code, reason string) (*connmeta.StatusError, error) {
	var matched []string
	for n, s := range sentinels {
		if errors.Is(err, s) {
			matched = append(matched, n)
		}
	}
	slices.Sort(matched)
	if !slices.Equal(matched, []string{want}) {
		return nil, fmt.Errorf("%s: %v matches sentinels %v, want exactly %s", what, err, matched, want)
	}
	var se *connmeta.StatusError
	if !errors.As(err, &se) {
		return nil, fmt.Errorf("%s: %v (%T) is not a *connmeta.StatusError", what, err, err)
	}
	if se.Code != code || se.Reason != reason || se.Domain != connmeta.Domain {
		return nil, fmt.Errorf("%s: StatusError{Code: %s, Reason: %q, Domain: %q}, want %s, %q, %q", what, se.Code, se.Reason, se.Domain, code, reason, connmeta.Domain)
	}
	return se, nil
}

func caseTypedErrors(ctx context.Context, e *env) error {
	// The server runs with the example policy: the writer's certificate
	// (e.client) may read and update but not report, so the proxy reports
	// over the Unix socket, where the policy does not apply.
	if e.unixTarget == "" || e.rolesDir == "" {
		return errors.New("typed_errors needs --unix-target and --roles-dir")
	}
	uds, err := connmeta.Dial(e.unixTarget)
	if err != nil {
		return err
	}
	defer uds.Close()
	reporter, err := newProxy(ctx, uds)
	if err != nil {
		return err
	}
	defer reporter.close()

	// Not found, from a raw stub.
	_, err = e.client.Connections.GetConnection(ctx, &connmetav1.GetConnectionRequest{Id: newID()})
	if _, err := expectTyped("GetConnection of an unknown id", err, "ErrNotFound", codes.NotFound, connmeta.ReasonConnectionNotFound); err != nil {
		return err
	}

	// Connection open, from a helper (wrapped: errors.Is/As see through).
	clientID, openID, closedID := newID(), newID(), newID()
	if _, err := reporter.report(clientSnapshot(clientID), serverSnapshot(openID, clientID, open, "origin.example", 443),
		serverSnapshot(closedID, clientID, closed, "origin.example", 443)); err != nil {
		return err
	}
	_, err = e.client.UpdateServer(ctx, connmeta.ServerUpdate{ID: openID, Actor: actor, Address: addr("elsewhere.example", 8443)})
	se, err := expectTyped("update of an OPEN server", fmt.Errorf("wrapped: %w", err), "ErrConnectionOpen", codes.FailedPrecondition, connmeta.ReasonConnectionOpen)
	if err != nil {
		return err
	}
	if se.Meta(connmeta.MetaField) != "address" || len(se.PreconditionViolations) == 0 {
		return fmt.Errorf("CONNECTION_OPEN: metadata %v, precondition violations %v; want field address and at least one violation", se.Metadata, se.PreconditionViolations)
	}

	// Etag mismatch: the etag read before an accepted update is stale.
	before, err := get(ctx, e.client, closedID)
	if err != nil {
		return err
	}
	first, err := e.client.UpdateServer(ctx, connmeta.ServerUpdate{ID: closedID, Etag: before.GetMetadata().GetEtag(), Actor: actor, Address: addr("first.example", 443)})
	if err != nil {
		return fmt.Errorf("update with the current etag: %w", err)
	}
	_, err = e.client.UpdateServer(ctx, connmeta.ServerUpdate{ID: closedID, Etag: before.GetMetadata().GetEtag(), Actor: actor, Address: addr("second.example", 443)})
	if se, err = expectTyped("update with a stale etag", err, "ErrEtagMismatch", codes.Aborted, connmeta.ReasonEtagMismatch); err != nil {
		return err
	}
	if se.CurrentEtag() != first.GetMetadata().GetEtag() {
		return fmt.Errorf("ETAG_MISMATCH names current etag %q, the record has %q", se.CurrentEtag(), first.GetMetadata().GetEtag())
	}

	// Compacted: a watch from revision 1, older than any history.
	stream := e.client.WatchEvents(ctx, connmeta.WatchOptions{StartAfterRevision: 1})
	for ev := range stream.Events() {
		stream.Stop()
		return fmt.Errorf("a watch after revision 1 delivered %v, want REVISION_COMPACTED", ev)
	}
	if se, err = expectTyped("watch after revision 1", stream.Err(), "ErrCompacted", codes.OutOfRange, connmeta.ReasonRevisionCompacted); err != nil {
		return err
	}
	if oldest, ok := se.OldestRevision(); !ok || oldest <= 1 {
		return fmt.Errorf("REVISION_COMPACTED names oldest revision %d (present: %v), want one above 1", oldest, ok)
	}
	if r := stream.Resume(); r.Revision != 1 {
		return fmt.Errorf("a refused watch's resume point is %d, want where it started (1)", r.Revision)
	}

	// Invalid argument with field violations.
	_, err = e.client.UpdateServer(ctx, connmeta.ServerUpdate{ID: closedID, Actor: actor, Address: addr("origin.example", 70000)})
	if se, err = expectTyped("update to port 70000", err, "ErrInvalidArgument", codes.InvalidArgument, connmeta.ReasonInvalidArgument); err != nil {
		return err
	}
	if _, ok := se.Field("address.port"); !ok {
		return fmt.Errorf("INVALID_ARGUMENT field violations %v do not name address.port", se.FieldViolations)
	}

	// Permission denied: the reader may not update.
	reader, err := connmeta.Dial(e.target, connmeta.WithTLS(filepath.Join(e.rolesDir, "ca.pem"),
		filepath.Join(e.rolesDir, "reader.pem"), filepath.Join(e.rolesDir, "reader.key")))
	if err != nil {
		return err
	}
	defer reader.Close()
	_, err = reader.UpdateServer(ctx, connmeta.ServerUpdate{ID: closedID, Actor: actor, Address: addr("origin.example", 443)})
	if se, err = expectTyped("update by the reader", err, "ErrPermissionDenied", codes.PermissionDenied, connmeta.ReasonPermissionDenied); err != nil {
		return err
	}
	if want := "/connmeta.v1.ConnectionService/UpdateServerConnection"; se.Method() != want {
		return fmt.Errorf("PERMISSION_DENIED names method %q, want %q", se.Method(), want)
	}
	return nil
}
