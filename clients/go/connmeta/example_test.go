package connmeta_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"testing"
	"time"

	"github.com/connmeta/connmeta/clients/go/connmeta"
	"github.com/connmeta/connmeta/clients/go/connmetav1"
)

// target is where the examples find a sidecar: CONNMETA_TARGET when set
// (the interop suite points it at the real server), else an in-process
// fake that TestMain starts (export_test.go).
var target = os.Getenv("CONNMETA_TARGET")

// The mTLS example's sidecar and files: CONNMETA_TLS_TARGET (a TCP
// address) and CONNMETA_TLS_CA, _CERT, _KEY when set, else a fake that
// requires a client certificate, with files made for it.
var (
	tlsTarget = os.Getenv("CONNMETA_TLS_TARGET")
	tlsCA     = os.Getenv("CONNMETA_TLS_CA")
	tlsCert   = os.Getenv("CONNMETA_TLS_CERT")
	tlsKey    = os.Getenv("CONNMETA_TLS_KEY")
)

func TestMain(m *testing.M) {
	var stops []func()
	if target == "" {
		var stop func()
		target, stop = connmeta.StartExampleServer()
		stops = append(stops, stop)
	}
	if tlsTarget == "" {
		dir, err := os.MkdirTemp("", "cm-pki")
		if err != nil {
			log.Fatal(err)
		}
		var stop func()
		tlsTarget, tlsCA, tlsCert, tlsKey, stop = connmeta.StartExampleTLSServer(dir)
		stops = append(stops, stop, func() { _ = os.RemoveAll(dir) })
	}
	code := m.Run()
	for _, stop := range stops {
		stop()
	}
	os.Exit(code)
}

// Reading one connection, and telling "not there" apart from other errors
// through the ErrorInfo reason the sidecar attaches to every error.
func Example() {
	// "unix:///run/connmeta/connmeta.sock" inside a pod, "127.0.0.1:50051" on TCP.
	client, err := connmeta.Dial(target)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := client.Connections.GetConnection(ctx, &connmetav1.GetConnectionRequest{
		Id: "4c9e1a52-8d0f-4f49-a1b4-5c0f4b8f9f00",
	})
	switch {
	case connmeta.IsReason(err, connmeta.ReasonConnectionNotFound):
		fmt.Println("no such connection")
	case err != nil:
		log.Fatal(err)
	default:
		fmt.Println("revision", resp.GetConnection().GetMetadata().GetRevision())
	}
	// Output: no such connection
}

// Mutual TLS over TCP: the sidecar's certificate is checked against the
// CA, and the client certificate is the caller's identity, which the
// sidecar's authorization policy decides on (reader may read, writer may
// also update). Unix-socket targets ignore WithTLS and stay plaintext.
func ExampleWithTLS() {
	// The files of `connmeta certs init --dir certs`: tlsCA = "certs/ca.pem",
	// tlsCert = "certs/reader.pem", tlsKey = "certs/reader.key".
	client, err := connmeta.Dial(tlsTarget, connmeta.WithTLS(tlsCA, tlsCert, tlsKey))
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = client.Connections.GetConnection(ctx, &connmetav1.GetConnectionRequest{
		Id: "4c9e1a52-8d0f-4f49-a1b4-5c0f4b8f9f00",
	})
	switch {
	case connmeta.IsReason(err, connmeta.ReasonConnectionNotFound):
		fmt.Println("no such connection")
	case connmeta.IsReason(err, connmeta.ReasonPermissionDenied):
		fmt.Println("this certificate may not read")
	case err != nil:
		log.Fatal(err)
	}
	// Output: no such connection
}

// An informer: follow every change of the matching servers. Watch lists
// first (every record arrives as ADDED), resumes by itself after
// disconnects and slow-consumer evictions, and lists again when it falls
// out of the sidecar's history or the sidecar restarts: Relist says so, and
// the events that follow bring the map to the new listing (DELETED for
// what vanished).
func ExampleClient_Watch() {
	client, err := connmeta.Dial(target)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	// A real consumer runs until shutdown; the example stops after a moment.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	servers := map[string]*connmetav1.ConnectionRecord{}
	err = client.Watch(ctx, connmeta.WatchOptions{
		Filter:    &connmetav1.ConnectionFilter{Kind: connmetav1.ConnectionKind_CONNECTION_KIND_SERVER, Host: "*.example.invalid"},
		Bookmarks: true,
		Relist: func(_ context.Context, l connmeta.Listing) error {
			fmt.Printf("listed %d servers (%s)\n", len(l.Records), l.Cause)
			return nil
		},
	}, func(ev *connmetav1.WatchEvent) error {
		switch ev.GetType() {
		case connmetav1.WatchEventType_WATCH_EVENT_TYPE_ADDED, connmetav1.WatchEventType_WATCH_EVENT_TYPE_MODIFIED:
			servers[ev.GetConnection().GetServer().GetConnection().GetId()] = ev.GetConnection()
		case connmetav1.WatchEventType_WATCH_EVENT_TYPE_DELETED:
			delete(servers, ev.GetConnection().GetServer().GetConnection().GetId())
		}
		return nil
	})
	fmt.Println("stopped:", err)
	// Output:
	// listed 0 servers (start)
	// stopped: context deadline exceeded
}

// Re-targeting a server that has not connected yet, safely against
// concurrent writers: RetargetServer reads the etag and retries on
// ETAG_MISMATCH; an OPEN server refuses with CONNECTION_OPEN.
func ExampleClient_RetargetServer() {
	client, err := connmeta.Dial(target)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	ctx := context.Background()
	_, err = client.RetargetServer(ctx, "4c9e1a52-8d0f-4f49-a1b4-5c0f4b8f9f00",
		&connmetav1.Address{Host: "backend-2.internal", Port: 8443}, "example")
	if d := connmeta.DetailsOf(err); d != nil {
		fmt.Println(d.Code, d.ErrorInfo.GetReason())
	}
	// Output: NotFound CONNECTION_NOT_FOUND
}

// An informer: a local cache of the matching records, kept in sync by a
// list and a watch, with handlers told of every change and indexes to
// look records up by. It relists by itself when it fell out of the
// sidecar's history or the sidecar restarted; a record that vanished
// meanwhile reaches OnDelete as a DeletedFinalStateUnknown.
func ExampleInformer() {
	client, err := connmeta.Dial(target)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	informer := connmeta.NewInformer(client, connmeta.InformerOptions{
		Filter: &connmetav1.ConnectionFilter{Kind: connmetav1.ConnectionKind_CONNECTION_KIND_SERVER, Host: "*.example.invalid"},
	})
	informer.AddEventHandler(connmeta.EventHandlerFuncs{
		AddFunc:    func(rec *connmetav1.ConnectionRecord) { fmt.Println("added", connmeta.RecordID(rec)) },
		UpdateFunc: func(old, new *connmetav1.ConnectionRecord) { fmt.Println("changed", connmeta.RecordID(new)) },
		DeleteFunc: func(obj any) {
			rec, tombstone := connmeta.DeletedRecord(obj)
			fmt.Println("deleted", connmeta.RecordID(rec), "seen only in a relist:", tombstone)
		},
	})
	done := make(chan error, 1)
	go func() { done <- informer.Run(ctx) }()
	if err := informer.WaitForSync(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Println("synced:", len(informer.List()), "servers,",
		len(informer.ByIndex(connmeta.IndexServerHost, "api.example.invalid")), "of them to api.example.invalid")
	cancel()
	fmt.Println("stopped:", <-done)
	// Output:
	// synced: 0 servers, 0 of them to api.example.invalid
	// stopped: context canceled
}

// A watch on a channel: range over the events; when the channel closes,
// Err says why and Resume where a later watch continues without a gap.
func ExampleClient_WatchEvents() {
	client, err := connmeta.Dial(target)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	// A real consumer runs until shutdown; the example stops after a moment.
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	stream := client.WatchEvents(ctx, connmeta.WatchOptions{
		Filter: &connmetav1.ConnectionFilter{Kind: connmetav1.ConnectionKind_CONNECTION_KIND_SERVER, Host: "*.example.invalid"},
	})
	for ev := range stream.Events() {
		fmt.Println(ev.GetType(), connmeta.RecordID(ev.GetConnection()), "at", ev.GetRevision())
	}
	next := stream.Resume() // StartAfterRevision and Incarnation of the next watch
	fmt.Println("stopped:", stream.Err(), "- resumable:", next.Revision > 0)
	// Output: stopped: context deadline exceeded - resumable: true
}

// A router: a function from a query to a decision. RunRouter subscribes,
// waits while another router is active, answers each query (a RouteFunc
// error answers "no change": routing fails open) and resubscribes after
// the sidecar restarts.
func ExampleClient_RunRouter() {
	client, err := connmeta.Dial(target)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	// A real router runs until shutdown; the example stops after a moment.
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	err = client.RunRouter(ctx, connmeta.RouterOptions{Name: "example-router"},
		func(ctx context.Context, q *connmetav1.RouteQuery) (connmeta.Decision, error) {
			if q.GetServer().GetServer().GetAddress().GetHost() == "legacy.internal" {
				return connmeta.Decision{Address: &connmetav1.Address{Host: "backend-2.internal", Port: 8443}}, nil
			}
			return connmeta.Decision{}, nil // no change
		})
	fmt.Println("stopped:", err)
	// Output: stopped: context deadline exceeded
}

// Errors: errors.Is with the sentinels, errors.As for the code, the
// ErrorInfo reason and metadata, and the BadRequest's field violations.
func ExampleStatusError() {
	client, err := connmeta.Dial(target)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = client.Connections.GetConnection(ctx, &connmetav1.GetConnectionRequest{
		Id: "4c9e1a52-8d0f-4f49-a1b4-5c0f4b8f9f00",
	})
	var se *connmeta.StatusError
	switch {
	case errors.Is(err, connmeta.ErrNotFound) && errors.As(err, &se):
		fmt.Println("not found:", se.Code, se.Reason)
	case errors.Is(err, connmeta.ErrPermissionDenied):
		fmt.Println("this identity may not read")
	case err != nil:
		log.Fatal(err)
	}
	// Output: not found: NotFound CONNECTION_NOT_FOUND
}

// Options are functions of *DialOptions: the package's, and your own.
func ExampleOption() {
	longPings := func(o *connmeta.DialOptions) { o.Keepalive = 60 * time.Second }
	client, err := connmeta.Dial(target, longPings, connmeta.WithDialOptions( /* grpc.DialOption... */ ))
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	fmt.Println("dialed", target != "")
	// Output: dialed true
}
