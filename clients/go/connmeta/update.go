package connmeta

import (
	"context"
	"fmt"

	"google.golang.org/protobuf/types/known/fieldmaskpb"

	"github.com/connmeta/connmeta/clients/go/connmetav1"
)

// ServerUpdate is a change to a server connection's target. Only the
// fields that are set are sent in the update mask; everything else on the
// server stays as it is.
type ServerUpdate struct {
	// ID is the server connection's id.
	ID string
	// Etag, when not empty, makes the update conditional: the sidecar
	// refuses it with ABORTED (ETAG_MISMATCH) if the record changed since
	// the etag was read.
	Etag string
	// Actor names who makes the change (recorded as the actor of
	// metadata.pending_change, later last_change).
	Actor string
	// Address, when not nil, is the new address.
	Address *connmetav1.Address
	// Via, when not nil, is the new upstream proxy (http or https only).
	Via *connmetav1.ServerSpec
	// ClearVia removes the upstream proxy: connect directly.
	ClearVia bool
}

// UpdateServer asks for u and returns the record after the update. A server
// whose state is OPEN refuses a change with FAILED_PRECONDITION
// (CONNECTION_OPEN); setting a field to its current value always succeeds
// (and withdraws a pending change of that field).
//
// An accepted change is desired state: the returned record holds it in
// Metadata.PendingChange (status PENDING) while its Server still shows what
// the proxy reported. The proxy applies it at the server's next connect;
// the change then moves to Metadata.LastChange (APPLIED, DEFERRED or
// NOT_APPLIED), which a watch shows.
func (c *Client) UpdateServer(ctx context.Context, u ServerUpdate) (*connmetav1.ConnectionRecord, error) {
	req := &connmetav1.UpdateServerConnectionRequest{
		Id:         u.ID,
		Etag:       u.Etag,
		Actor:      u.Actor,
		UpdateMask: &fieldmaskpb.FieldMask{},
	}
	if u.Address != nil {
		req.Address = u.Address
		req.UpdateMask.Paths = append(req.UpdateMask.Paths, "address")
	}
	if u.Via != nil || u.ClearVia {
		req.Via = u.Via
		req.UpdateMask.Paths = append(req.UpdateMask.Paths, "via")
	}
	if len(req.UpdateMask.Paths) == 0 {
		return nil, fmt.Errorf("connmeta: update of %s changes nothing: set Address, Via or ClearVia", u.ID)
	}
	resp, err := c.Connections.UpdateServerConnection(ctx, req)
	if err != nil {
		return nil, err
	}
	return resp.GetConnection(), nil
}

// RetargetServer asks for a server connection to connect to addr (a
// pending change, see [Client.UpdateServer]): read, then update with
// the etag just read, retrying when another writer got in between
// (ABORTED / ETAG_MISMATCH). It gives up after a few attempts, because a
// server that changes that often is being fought over and the caller
// should know.
func (c *Client) RetargetServer(ctx context.Context, id string, addr *connmetav1.Address, actor string) (*connmetav1.ConnectionRecord, error) {
	const attempts = 5
	var err error
	for range attempts {
		var got *connmetav1.GetConnectionResponse
		got, err = c.Connections.GetConnection(ctx, &connmetav1.GetConnectionRequest{
			Id:   id,
			View: connmetav1.ConnectionView_CONNECTION_VIEW_BASIC,
		})
		if err != nil {
			return nil, err
		}
		var rec *connmetav1.ConnectionRecord
		rec, err = c.UpdateServer(ctx, ServerUpdate{
			ID:      id,
			Etag:    got.GetConnection().GetMetadata().GetEtag(),
			Actor:   actor,
			Address: addr,
		})
		if !IsReason(err, ReasonEtagMismatch) {
			return rec, err
		}
	}
	return nil, fmt.Errorf("connmeta: retarget %s: etag kept changing after %d attempts: %w", id, attempts, err)
}
