package connmeta

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/fieldmaskpb"

	"github.com/connmeta/connmeta/clients/go/connmetav1"
)

// Decision is a router's answer to one [connmetav1.RouteQuery]. The zero
// Decision means "no change": the proxy connects as planned, at once.
type Decision struct {
	// Address, when not nil, is the server's new target.
	Address *connmetav1.Address
	// Via, when not nil, is the new upstream proxy (http or https only).
	Via *connmetav1.ServerSpec
	// ClearVia removes the upstream proxy: connect directly.
	ClearVia bool
}

// RouteFunc decides where one server connection goes. ctx ends at the
// query's deadline (the sidecar ignores later answers) or when the router
// stops. An error answers "no change" (routing fails open) and goes to
// RouterOptions.OnError.
type RouteFunc func(ctx context.Context, q *connmetav1.RouteQuery) (Decision, error)

// RouterState is what the sidecar said of this router's subscription.
type RouterState struct {
	// Active is true when this router receives the queries; false while
	// it is a standby behind ActiveRouter.
	Active bool
	// ActiveRouter names the router that receives the queries.
	ActiveRouter string
}

// RouterOptions configures [Client.RunRouter].
type RouterOptions struct {
	// Name identifies the router (the actor of the changes it makes);
	// required, unique among the sidecar's routers.
	Name string
	// OnState, when set, is told each RouterState: at every (re)subscribe
	// and when a standby becomes active.
	OnState func(RouterState)
	// OnError, when set, is told of each RouteFunc error (the query was
	// answered "no change").
	OnError func(q *connmetav1.RouteQuery, err error)
	// MaxBackoff caps the wait between reconnects (default 5 s).
	MaxBackoff time.Duration
}

// RunRouter makes route the sidecar's router until ctx ends (it then
// returns ctx's error) or an error occurs that resubscribing cannot fix:
// it subscribes as opts.Name, waits as a standby while another router is
// active, calls route for each query (concurrently, each with the query's
// deadline) and sends its Decision, and resubscribes with backoff when the
// stream breaks (sidecar restart, dropped connection). A name another
// router holds fails ErrAlreadyExists at the first subscription; after a
// reconnect it is retried, since it is usually this router's old stream
// that the sidecar has not seen end yet. An answer the sidecar refuses
// (INVALID_ARGUMENT: e.g. via scheme TLS) ends RunRouter with that error.
func (c *Client) RunRouter(ctx context.Context, opts RouterOptions, route RouteFunc) error {
	if opts.Name == "" {
		return errors.New("connmeta: RunRouter needs RouterOptions.Name")
	}
	b := backoff{max: opts.MaxBackoff}
	if b.max <= 0 {
		b.max = 5 * time.Second
	}
	b.reset()
	subscribed := false
	for {
		ok, err := c.routeOnce(ctx, opts, route)
		subscribed = subscribed || ok
		if cerr := contextDone(ctx); cerr != nil {
			return cerr
		}
		if ok {
			b.reset()
		}
		switch {
		case err == nil, errors.Is(err, io.EOF), status.Code(err) == codes.Unavailable:
		case subscribed && errors.Is(err, ErrAlreadyExists):
		default:
			return fmt.Errorf("connmeta: router %q: %w", opts.Name, err)
		}
		if err := b.wait(ctx); err != nil {
			return err
		}
	}
}

// routeOnce runs one Route stream; subscribed reports whether the sidecar
// confirmed the subscription.
func (c *Client) routeOnce(ctx context.Context, opts RouterOptions, route RouteFunc) (subscribed bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	var inflight sync.WaitGroup
	defer inflight.Wait() // no RouteFunc or callback runs after return
	defer cancel()
	stream, err := connmetav1.NewRouterServiceClient(c.conn).Route(ctx)
	if err != nil {
		return false, err
	}
	var sendMu sync.Mutex // a gRPC stream takes one Send at a time
	send := func(req *connmetav1.RouteRequest) error {
		sendMu.Lock()
		defer sendMu.Unlock()
		return stream.Send(req)
	}
	if err := send(&connmetav1.RouteRequest{Message: &connmetav1.RouteRequest_Subscribe{
		Subscribe: &connmetav1.RouteSubscribe{Name: opts.Name},
	}}); err != nil {
		_, rerr := stream.Recv() // the reason the stream ended
		return false, firstErr(rerr, err)
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			return subscribed, err
		}
		switch m := resp.GetMessage().(type) {
		case *connmetav1.RouteResponse_Subscribed:
			subscribed = true
			if opts.OnState != nil {
				opts.OnState(RouterState{Active: m.Subscribed.GetActive(), ActiveRouter: m.Subscribed.GetActiveRouter()})
			}
		case *connmetav1.RouteResponse_Query:
			q := m.Query
			inflight.Add(1)
			go func() {
				defer inflight.Done()
				answer := decide(ctx, q, opts, route)
				// A failed send means the stream ended; Recv reports why.
				_ = send(&connmetav1.RouteRequest{Message: &connmetav1.RouteRequest_Answer{Answer: answer}})
			}()
		}
	}
}

// decide runs route for q within its deadline and makes the answer.
func decide(ctx context.Context, q *connmetav1.RouteQuery, opts RouterOptions, route RouteFunc) *connmetav1.RouteAnswer {
	if q.GetDeadline() != nil {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, q.GetDeadline().AsTime())
		defer cancel()
	}
	answer := &connmetav1.RouteAnswer{QueryId: q.GetQueryId(), UpdateMask: &fieldmaskpb.FieldMask{}}
	d, err := route(ctx, q)
	if err != nil {
		if opts.OnError != nil {
			opts.OnError(q, err)
		}
		return answer // no change: the proxy connects as planned
	}
	if d.Address != nil {
		answer.Address = d.Address
		answer.UpdateMask.Paths = append(answer.UpdateMask.Paths, "address")
	}
	if d.Via != nil || d.ClearVia {
		answer.Via = d.Via
		answer.UpdateMask.Paths = append(answer.UpdateMask.Paths, "via")
	}
	return answer
}

// firstErr returns the first error that is not nil or io.EOF (io.EOF when
// there is none).
func firstErr(errs ...error) error {
	for _, err := range errs {
		if err != nil && !errors.Is(err, io.EOF) {
			return err
		}
	}
	return io.EOF
}
