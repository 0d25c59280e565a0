package connmeta

import (
	"cmp"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/connmeta/connmeta/clients/go/connmetav1"
)

// fakeServer is an in-process ConnectionService for unit tests and for the
// examples when no real server is given (CONNMETA_TARGET). It answers like
// the sidecar where the helpers depend on it: errors carry ErrorInfo, List
// pages, and Watch replays scripted streams.
type fakeServer struct {
	connmetav1.UnimplementedConnectionServiceServer

	mu          sync.Mutex
	records     []*connmetav1.ConnectionRecord // in id order
	revision    int64
	incarnation string        // sent in every response header
	watches     []watchScript // consumed one per WatchConnections call
	requests    []*connmetav1.WatchConnectionsRequest
	listErrors  []error // consumed one per ListConnections call; nil answers
	listings    []*connmetav1.ListConnectionsRequest
	pageSize    int // default page size (100 when 0)
	router      fakeRouter
}

// watchScript plays one WatchConnections call.
type watchScript func(req *connmetav1.WatchConnectionsRequest, send func(...*connmetav1.WatchEvent) error) error

func connmetaError(code codes.Code, reason string, meta map[string]string, msg string) error {
	st, err := status.New(code, msg).WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: Domain, Metadata: meta})
	if err != nil {
		panic(err)
	}
	return st.Err()
}

func (f *fakeServer) GetConnection(_ context.Context, req *connmetav1.GetConnectionRequest) (*connmetav1.GetConnectionResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, r := range f.records {
		if r.GetServer().GetConnection().GetId() == req.GetId() {
			return &connmetav1.GetConnectionResponse{Connection: r}, nil
		}
	}
	return nil, connmetaError(codes.NotFound, ReasonConnectionNotFound, map[string]string{"id": req.GetId()},
		fmt.Sprintf("no connection %q", req.GetId()))
}

func (f *fakeServer) ListConnections(_ context.Context, req *connmetav1.ListConnectionsRequest) (*connmetav1.ListConnectionsResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.listings = append(f.listings, req)
	if len(f.listErrors) > 0 {
		err := f.listErrors[0]
		f.listErrors = f.listErrors[1:]
		if err != nil {
			return nil, err
		}
	}
	start := 0
	if req.GetPageToken() != "" {
		if _, err := fmt.Sscan(req.GetPageToken(), &start); err != nil {
			return nil, status.Error(codes.InvalidArgument, "bad page token")
		}
	}
	size := int(req.GetPageSize())
	if size == 0 {
		size = cmp.Or(f.pageSize, 100)
	}
	end := min(start+size, len(f.records))
	resp := &connmetav1.ListConnectionsResponse{
		Connections: f.records[start:end], Revision: f.revision, Header: f.header(),
	}
	if end < len(f.records) {
		resp.NextPageToken = fmt.Sprint(end)
	}
	return resp, nil
}

func (f *fakeServer) WatchConnections(req *connmetav1.WatchConnectionsRequest, stream grpc.ServerStreamingServer[connmetav1.WatchConnectionsResponse]) error {
	f.mu.Lock()
	f.requests = append(f.requests, req)
	header := f.header()
	var script watchScript
	if len(f.watches) > 0 {
		script, f.watches = f.watches[0], f.watches[1:]
	}
	f.mu.Unlock()
	if script == nil { // nothing scripted: a quiet watch
		<-stream.Context().Done()
		return stream.Context().Err()
	}
	return script(req, func(evs ...*connmetav1.WatchEvent) error {
		return stream.Send(&connmetav1.WatchConnectionsResponse{Events: evs, Header: header})
	})
}

func (f *fakeServer) header() *connmetav1.ResponseHeader {
	return &connmetav1.ResponseHeader{Incarnation: f.incarnation}
}

// restart turns f into a new incarnation holding records at revision.
func (f *fakeServer) restart(incarnation string, revision int64, records ...*connmetav1.ConnectionRecord) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.incarnation, f.revision, f.records = incarnation, revision, records
}

// startFake serves f on a Unix socket (exercising Dial's unix: targets)
// and returns the target.
func startFake(f *fakeServer) (target string, stop func(), err error) {
	dir, err := os.MkdirTemp("", "cm")
	if err != nil {
		return "", nil, err
	}
	sock := filepath.Join(dir, "fake.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		return "", nil, err
	}
	srv := grpc.NewServer()
	connmetav1.RegisterConnectionServiceServer(srv, f)
	connmetav1.RegisterRouterServiceServer(srv, &f.router)
	go func() { _ = srv.Serve(lis) }()
	return "unix://" + sock, func() { srv.Stop(); _ = os.RemoveAll(dir) }, nil
}

func newFake(t *testing.T) (*fakeServer, *Client) {
	t.Helper()
	f := &fakeServer{revision: 100, incarnation: "inc-1"}
	target, stop, err := startFake(f)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	c, err := Dial(target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return f, c
}

func change(rev int64) *connmetav1.WatchEvent {
	return &connmetav1.WatchEvent{Type: connmetav1.WatchEventType_WATCH_EVENT_TYPE_MODIFIED, Revision: rev}
}

func bookmark(rev int64) *connmetav1.WatchEvent {
	return &connmetav1.WatchEvent{Type: connmetav1.WatchEventType_WATCH_EVENT_TYPE_BOOKMARK, Revision: rev}
}

func server(id string) *connmetav1.ConnectionRecord {
	return serverAt(id, 0)
}

// serverAt is a server record last changed at revision.
func serverAt(id string, revision int64) *connmetav1.ConnectionRecord {
	return &connmetav1.ConnectionRecord{
		Kind: &connmetav1.ConnectionRecord_Server{Server: &connmetav1.Server{
			Connection: &connmetav1.Connection{Id: id},
		}},
		Metadata: &connmetav1.RecordMetadata{Revision: revision},
	}
}

func event(t connmetav1.WatchEventType, rev int64, r *connmetav1.ConnectionRecord) *connmetav1.WatchEvent {
	return &connmetav1.WatchEvent{Type: t, Revision: rev, Connection: r}
}

// fakeRouter is an in-process RouterService: it confirms every
// subscription as active, sends the queued queries and hands the answers
// out on answers.
type fakeRouter struct {
	connmetav1.UnimplementedRouterServiceServer

	mu      sync.Mutex
	names   []string // subscriptions, in order
	queries []*connmetav1.RouteQuery
	answers chan *connmetav1.RouteAnswer
}

func (f *fakeRouter) Route(stream grpc.BidiStreamingServer[connmetav1.RouteRequest, connmetav1.RouteResponse]) error {
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	name := first.GetSubscribe().GetName()
	f.mu.Lock()
	f.names = append(f.names, name)
	queries := f.queries
	f.queries = nil
	f.mu.Unlock()
	if err := stream.Send(&connmetav1.RouteResponse{Message: &connmetav1.RouteResponse_Subscribed{
		Subscribed: &connmetav1.RouteSubscribed{Active: true, ActiveRouter: name},
	}}); err != nil {
		return err
	}
	for _, q := range queries {
		if err := stream.Send(&connmetav1.RouteResponse{Message: &connmetav1.RouteResponse_Query{Query: q}}); err != nil {
			return err
		}
	}
	for {
		req, err := stream.Recv()
		if err != nil {
			return err
		}
		if f.answers != nil {
			f.answers <- req.GetAnswer()
		}
	}
}
