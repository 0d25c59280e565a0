package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/connmeta/connmeta/clients/go/connmeta"
	"github.com/connmeta/connmeta/clients/go/connmetav1"
)

// proxy plays mitmproxy's part: it reports connection snapshots through
// ReportService, as the connmeta addon would, so each case can set up the
// exact state it needs on a real server.
type proxy struct {
	id     string // ReportRequest.proxy_id, sent on the stream's first message
	stream connmetav1.ReportService_ReportClient
	cancel context.CancelFunc
	seq    uint64
}

// caseName is the running case; proxy ids name it so that a server log
// says which case a stream belongs to.
var (
	caseName   string
	proxyCount atomic.Uint64
)

// newProxyID returns a proxy id unique within this process:
// interop-go-<case>-<n>.
func newProxyID() string {
	return fmt.Sprintf("interop-go-%s-%d", caseName, proxyCount.Add(1))
}

func newProxy(ctx context.Context, c *connmeta.Client) (*proxy, error) {
	return newProxyNamed(ctx, c, newProxyID())
}

// newProxyNamed opens a Report stream that reports as proxy id.
func newProxyNamed(ctx context.Context, c *connmeta.Client, id string) (*proxy, error) {
	ctx, cancel := context.WithCancel(ctx)
	stream, err := c.Reports.Report(ctx)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("open report stream: %w", err)
	}
	return &proxy{id: id, stream: stream, cancel: cancel}, nil
}

// report sends one batch and returns the revision the store reached. A
// snapshot the sidecar rejects fails it: every case but
// report_rejects_bad_snapshot sends only valid ones, and a rejection
// would otherwise go unnoticed (the rest of the batch is applied).
func (p *proxy) report(snapshots ...*connmetav1.ConnectionSnapshot) (int64, error) {
	ack, err := p.reportAck(snapshots...)
	if err != nil {
		return 0, err
	}
	if len(ack.GetRejected()) > 0 {
		return 0, fmt.Errorf("report batch %d: the sidecar rejected %v", ack.GetSequence(), ack.GetRejected())
	}
	return ack.GetRevision(), nil
}

// reportAck sends one batch and returns its ack, rejections included.
func (p *proxy) reportAck(snapshots ...*connmetav1.ConnectionSnapshot) (*connmetav1.ReportAck, error) {
	return p.request(&connmetav1.ReportRequest{
		Message: &connmetav1.ReportRequest_Batch{Batch: &connmetav1.ReportBatch{Snapshots: snapshots}},
	})
}

// resyncStart and resyncEnd send the two halves of a resync.
func (p *proxy) resyncStart() (*connmetav1.ReportAck, error) {
	return p.request(&connmetav1.ReportRequest{
		Message: &connmetav1.ReportRequest_ResyncStart{ResyncStart: &connmetav1.ResyncStart{}},
	})
}

func (p *proxy) resyncEnd() (*connmetav1.ReportAck, error) {
	return p.request(&connmetav1.ReportRequest{
		Message: &connmetav1.ReportRequest_ResyncEnd{ResyncEnd: &connmetav1.ResyncEnd{}},
	})
}

// request sends req (numbered, and named on the stream's first message)
// and waits for its ack.
func (p *proxy) request(req *connmetav1.ReportRequest) (*connmetav1.ReportAck, error) {
	p.seq++
	req.Sequence = p.seq
	if p.seq == 1 {
		req.ProxyId = p.id
	}
	if err := p.stream.Send(req); err != nil {
		_, err = p.stream.Recv() // Send only says "stream broken"; Recv has the status
		return nil, fmt.Errorf("report request %d: %w", p.seq, err)
	}
	for {
		resp, err := p.stream.Recv()
		if err != nil {
			return nil, fmt.Errorf("report request %d: %w", p.seq, err)
		}
		// The sidecar also sends routing state and route decisions on
		// this stream; only the ack answers the request.
		if ack := resp.GetAck(); ack != nil {
			if ack.GetSequence() != p.seq {
				return nil, fmt.Errorf("report request %d: ack for sequence %d", p.seq, ack.GetSequence())
			}
			return ack, nil
		}
	}
}

func (p *proxy) close() {
	_ = p.stream.CloseSend()
	p.cancel()
}

// newID returns a random (version 4) UUID, the form of mitmproxy's ids.
func newID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails on Linux (crypto/rand documents a panic instead)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

var epoch = timestamppb.New(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))

func addr(host string, port uint32) *connmetav1.Address {
	return &connmetav1.Address{Host: host, Port: port}
}

// clientSnapshot is a client that just connected to a regular-mode listener.
func clientSnapshot(id string) *connmetav1.ConnectionSnapshot {
	return &connmetav1.ConnectionSnapshot{
		Hook: connmetav1.Hook_HOOK_CLIENT_CONNECTED,
		Connection: &connmetav1.ConnectionSnapshot_Client{Client: &connmetav1.Client{
			Connection: &connmetav1.Connection{
				Id:                id,
				State:             connmetav1.ConnectionState_CONNECTION_STATE_OPEN,
				TransportProtocol: connmetav1.TransportProtocol_TRANSPORT_PROTOCOL_TCP,
				Peername:          addr("198.51.100.7", 51234),
				Sockname:          addr("127.0.0.1", 8080),
				TimestampStart:    epoch,
			},
			ProxyMode: &connmetav1.ProxyMode{FullSpec: "regular"},
		}},
	}
}

// serverSnapshot is a server of client clientID targeting host:port. An
// OPEN server has just connected; a CLOSED one is about to connect
// (server_connect), the moment a sidecar update can still re-target it.
func serverSnapshot(id, clientID string, state connmetav1.ConnectionState, host string, port uint32) *connmetav1.ConnectionSnapshot {
	conn := &connmetav1.Connection{
		Id:                id,
		State:             state,
		TransportProtocol: connmetav1.TransportProtocol_TRANSPORT_PROTOCOL_TCP,
		TimestampStart:    epoch,
	}
	hook := connmetav1.Hook_HOOK_SERVER_CONNECT
	if state != connmetav1.ConnectionState_CONNECTION_STATE_CLOSED {
		hook = connmetav1.Hook_HOOK_SERVER_CONNECTED
		conn.Peername = addr("192.0.2.10", port)
		conn.Sockname = addr("192.0.2.1", 40000)
	}
	return &connmetav1.ConnectionSnapshot{
		Hook:     hook,
		ClientId: clientID,
		Connection: &connmetav1.ConnectionSnapshot_Server{Server: &connmetav1.Server{
			Connection: conn,
			Address:    addr(host, port),
		}},
	}
}

// appliedAt is the snapshot the proxy sends from server_connect after it
// applied a route decision or a pending change of the address: the server,
// still CLOSED, with the new address, and the outcome that settles the
// record's pending_change (what the connmeta addon sends).
func appliedAt(serverID, clientID string, address *connmetav1.Address, queryID, actor string) *connmetav1.ConnectionSnapshot {
	s := serverSnapshot(serverID, clientID, closed, address.GetHost(), address.GetPort())
	s.RouteOutcome = &connmetav1.RouteOutcome{
		Kind:          connmetav1.RouteOutcomeKind_ROUTE_OUTCOME_KIND_APPLIED,
		QueryId:       queryID,
		Actor:         actor,
		AppliedFields: []string{"address"},
	}
	return s
}

const (
	open   = connmetav1.ConnectionState_CONNECTION_STATE_OPEN
	closed = connmetav1.ConnectionState_CONNECTION_STATE_CLOSED
)
