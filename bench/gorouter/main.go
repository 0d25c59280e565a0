// Command gorouter is the leanest router bench/routing_bench.py knows: one
// goroutine per stream answering every query at once with "no change".
//
// It subscribes on "on" and leaves on "off" (lines on stdin), printing
// "subscribed" / "left" once done, so the benchmark can alternate series.
//
//	gorouter TARGET [CA CERT KEY]
//
// With CA, CERT and KEY it dials TARGET (host:port) with mTLS, as a router in
// another container of the pod does; without, plaintext (a Unix socket).
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	pb "github.com/connmeta/connmeta/clients/go/connmetav1"
)

func transport() credentials.TransportCredentials {
	if len(os.Args) < 5 {
		return insecure.NewCredentials()
	}
	ca, err := os.ReadFile(os.Args[2])
	if err != nil {
		panic(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	cert, err := tls.LoadX509KeyPair(os.Args[3], os.Args[4])
	if err != nil {
		panic(err)
	}
	return credentials.NewTLS(&tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}})
}

func main() {
	conn, err := grpc.NewClient(os.Args[1], grpc.WithTransportCredentials(transport()))
	if err != nil {
		panic(err)
	}
	client := pb.NewRouterServiceClient(conn)
	var stream pb.RouterService_RouteClient
	done := make(chan struct{})
	lines := bufio.NewScanner(os.Stdin)
	for lines.Scan() {
		switch lines.Text() {
		case "on":
			stream, err = client.Route(context.Background())
			if err != nil {
				panic(err)
			}
			if err := stream.Send(&pb.RouteRequest{Message: &pb.RouteRequest_Subscribe{
				Subscribe: &pb.RouteSubscribe{Name: "bench"}}}); err != nil {
				panic(err)
			}
			if _, err := stream.Recv(); err != nil {
				panic(err)
			}
			fmt.Println("subscribed")
			done = make(chan struct{})
			go serve(stream, done)
		case "off":
			if err := stream.CloseSend(); err != nil {
				panic(err)
			}
			<-done
			fmt.Println("left")
		default:
			return
		}
	}
}

func serve(stream pb.RouterService_RouteClient, done chan struct{}) {
	defer close(done)
	for {
		response, err := stream.Recv()
		if err != nil {
			return
		}
		query := response.GetQuery()
		if query == nil {
			continue
		}
		answer := &pb.RouteRequest{Message: &pb.RouteRequest_Answer{
			Answer: &pb.RouteAnswer{QueryId: query.GetQueryId()}}}
		if err := stream.Send(answer); err != nil {
			return
		}
	}
}
