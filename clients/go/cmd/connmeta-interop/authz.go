package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/fieldmaskpb"

	"github.com/connmeta/connmeta/clients/go/connmeta"
	"github.com/connmeta/connmeta/clients/go/connmetav1"
)

// The example policy of `connmeta certs init` (policy.json), as the
// contract states it: every role may use health and reflection and read;
// writer may also update, router route, reporter report. The expectations
// are written out here rather than read from the policy file, so a policy
// that drifted from the contract fails the case.
var (
	readMethods = []string{
		"/connmeta.v1.ConnectionService/GetConnection",
		"/connmeta.v1.ConnectionService/ListConnections",
		"/connmeta.v1.ConnectionService/WatchConnections",
		"/grpc.health.v1.Health/Check",
		"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
	}
	methodUpdate = "/connmeta.v1.ConnectionService/UpdateServerConnection"
	methodRoute  = "/connmeta.v1.RouterService/Route"
	methodReport = "/connmeta.v1.ReportService/Report"
	roleExtra    = map[string]string{"reader": "", "writer": methodUpdate, "router": methodRoute, "reporter": methodReport}
	roles        = []string{"reader", "writer", "router", "reporter"}
)

// authzCalls makes one call of each method, with a request the method
// answers at once when allowed (an unknown id, an empty stream), and
// returns its status.
var authzCalls = map[string]func(ctx context.Context, conn *grpc.ClientConn) error{
	"/connmeta.v1.ConnectionService/GetConnection": func(ctx context.Context, conn *grpc.ClientConn) error {
		_, err := connmetav1.NewConnectionServiceClient(conn).GetConnection(ctx, &connmetav1.GetConnectionRequest{Id: newID()})
		return err
	},
	"/connmeta.v1.ConnectionService/ListConnections": func(ctx context.Context, conn *grpc.ClientConn) error {
		_, err := connmetav1.NewConnectionServiceClient(conn).ListConnections(ctx, &connmetav1.ListConnectionsRequest{PageSize: 1})
		return err
	},
	"/connmeta.v1.ConnectionService/WatchConnections": func(ctx context.Context, conn *grpc.ClientConn) error {
		// Matching nothing, it still answers at once (the end of the
		// initial events, bookmarks): any first response proves it was let
		// through.
		ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		stream, err := connmetav1.NewConnectionServiceClient(conn).WatchConnections(ctx, &connmetav1.WatchConnectionsRequest{
			Filter: &connmetav1.ConnectionFilter{ClientId: newID()}, SendInitialEvents: true, AllowBookmarks: true,
		})
		if err != nil {
			return err
		}
		_, err = stream.Recv()
		return err
	},
	methodUpdate: func(ctx context.Context, conn *grpc.ClientConn) error {
		_, err := connmetav1.NewConnectionServiceClient(conn).UpdateServerConnection(ctx, &connmetav1.UpdateServerConnectionRequest{
			Id: newID(), Address: addr("authz.example", 443), UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"address"}},
		})
		return err
	},
	methodRoute: func(ctx context.Context, conn *grpc.ClientConn) error {
		stream, err := connmetav1.NewRouterServiceClient(conn).Route(ctx)
		return endEmptyStream(stream, err)
	},
	methodReport: func(ctx context.Context, conn *grpc.ClientConn) error {
		stream, err := connmetav1.NewReportServiceClient(conn).Report(ctx)
		return endEmptyStream(stream, err)
	},
	"/grpc.health.v1.Health/Check": func(ctx context.Context, conn *grpc.ClientConn) error {
		_, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
		return err
	},
	"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": func(ctx context.Context, conn *grpc.ClientConn) error {
		stream, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
		if err != nil {
			return err
		}
		//lint:ignore SA1019 the policy names the v1alpha method, which tools still call; this call is the point
		if err := stream.Send(&reflectionpb.ServerReflectionRequest{
			MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{ListServices: "*"},
		}); err != nil && !errors.Is(err, io.EOF) {
			return err
		}
		return endEmptyStream(stream, nil)
	},
}

// endEmptyStream half-closes a bidi stream and reads it to its status; nil
// means it ended OK.
func endEmptyStream(stream grpc.ClientStream, err error) error {
	if err != nil {
		return err
	}
	if err := stream.CloseSend(); err != nil {
		return err
	}
	for {
		// Only the status counts: any response decodes into Empty (its
		// fields are kept as unknown ones).
		if err := stream.RecvMsg(new(emptypb.Empty)); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
	}
}

func caseAuthzRoles(ctx context.Context, e *env) error {
	if e.rolesDir == "" {
		return errors.New("case authz_roles needs --roles-dir DIR (ca.pem, <role>.pem, <role>.key)")
	}
	ca := filepath.Join(e.rolesDir, "ca.pem")
	var failures []string
	for _, role := range roles {
		c, err := connmeta.Dial(e.target, connmeta.WithTLS(ca,
			filepath.Join(e.rolesDir, role+".pem"), filepath.Join(e.rolesDir, role+".key")))
		if err != nil {
			return err
		}
		for _, method := range slices.Sorted(maps.Keys(authzCalls)) {
			allowed := slices.Contains(readMethods, method) || roleExtra[role] == method
			err := authzCalls[method](ctx, c.Conn())
			if msg := judgeAuthz(method, allowed, err); msg != "" {
				failures = append(failures, fmt.Sprintf("%s %s: %s", role, method, msg))
			}
		}
		_ = c.Close()
	}
	// The Unix socket is not subject to the policy: a write there is let through.
	if e.unixTarget != "" {
		c, err := connmeta.Dial(e.unixTarget)
		if err != nil {
			return err
		}
		if msg := judgeAuthz(methodUpdate, true, authzCalls[methodUpdate](ctx, c.Conn())); msg != "" {
			failures = append(failures, "unix socket "+methodUpdate+": "+msg)
		}
		_ = c.Close()
	}
	// No client certificate: the handshake fails, no method is reached.
	c, err := connmeta.Dial(e.target, connmeta.WithTLS(ca, "", ""))
	if err != nil {
		return err
	}
	defer c.Close()
	callCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err = c.Connections.GetConnection(callCtx, &connmetav1.GetConnectionRequest{Id: newID()})
	if status.Code(err) != codes.Unavailable {
		failures = append(failures, fmt.Sprintf("no client certificate: GetConnection %v, want UNAVAILABLE (handshake refused)", err))
	}
	if len(failures) > 0 {
		return errors.New(strings.Join(failures, "\n  "))
	}
	return nil
}

// judgeAuthz says what is wrong with a call's outcome, or "" if nothing.
// A denial must be PERMISSION_DENIED with ErrorInfo {connmeta.v1,
// PERMISSION_DENIED, method}; an allowed call may end any other way but
// PERMISSION_DENIED or UNAUTHENTICATED (NOT_FOUND for an unknown id is a
// call that was let through).
func judgeAuthz(method string, allowed bool, err error) string {
	code := status.Code(err)
	denied := code == codes.PermissionDenied || code == codes.Unauthenticated
	switch {
	case allowed && denied:
		return fmt.Sprintf("denied (%v), the policy allows it", err)
	case allowed:
		return ""
	case code != codes.PermissionDenied:
		return fmt.Sprintf("ended %v, want PERMISSION_DENIED", err)
	}
	d := connmeta.DetailsOf(err)
	if d == nil || d.ErrorInfo == nil {
		return fmt.Sprintf("PERMISSION_DENIED without ErrorInfo: %v", err)
	}
	info := d.ErrorInfo
	if info.GetDomain() != connmeta.Domain || info.GetReason() != connmeta.ReasonPermissionDenied || info.GetMetadata()[connmeta.MetaMethod] != method {
		return fmt.Sprintf("ErrorInfo %v, want domain %s, reason %s, metadata method=%s", info, connmeta.Domain, connmeta.ReasonPermissionDenied, method)
	}
	return ""
}
