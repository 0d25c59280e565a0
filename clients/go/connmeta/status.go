package connmeta

import (
	"context"
	"errors"
	"io"
	"strconv"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// Sentinel errors for errors.Is:
//
//	if errors.Is(err, connmeta.ErrNotFound) { ... }
//
// Every error a [Client] returns (from the helpers and from the raw stubs
// in Client.Connections, Client.Reports and Client.Health, unary calls and
// stream receives alike) that carries a gRPC status is a [*StatusError],
// which matches these:
//
//   - by ErrorInfo reason when it carries a connmeta ErrorInfo (domain
//     connmeta.v1), because the reason is the contract and the code only
//     its category (ErrInvalidArgument does not match an OUT_OF_RANGE, and
//     ErrNotFound does not match a NOT_FOUND some proxy in between made up);
//   - by status code when it carries none (UNAVAILABLE from a dropped
//     connection, DEADLINE_EXCEEDED, a status made by gRPC itself).
//
// Use [errors.As] with a *StatusError for the code, metadata and field
// violations.
var (
	// ErrNotFound: no connection with this id (CONNECTION_NOT_FOUND).
	ErrNotFound = &sentinel{codes.NotFound, ReasonConnectionNotFound}
	// ErrConnectionOpen: an OPEN server's address or via cannot change
	// (CONNECTION_OPEN); ask again before its next connect.
	ErrConnectionOpen = &sentinel{codes.FailedPrecondition, ReasonConnectionOpen}
	// ErrEtagMismatch: the record changed since its etag was read
	// (ETAG_MISMATCH); read again and retry.
	ErrEtagMismatch = &sentinel{codes.Aborted, ReasonEtagMismatch}
	// ErrCompacted: the revision (or page token snapshot) is older than the
	// retained history, or from another incarnation (REVISION_COMPACTED);
	// list again.
	ErrCompacted = &sentinel{codes.OutOfRange, ReasonRevisionCompacted}
	// ErrWatcherTooSlow: the watcher fell too far behind and was ended
	// (WATCHER_TOO_SLOW); resume after [StatusError.LastRevision].
	ErrWatcherTooSlow = &sentinel{codes.ResourceExhausted, ReasonWatcherTooSlow}
	// ErrInvalidArgument: the request broke a rule (INVALID_ARGUMENT);
	// [StatusError.FieldViolations] names the fields.
	ErrInvalidArgument = &sentinel{codes.InvalidArgument, ReasonInvalidArgument}
	// ErrPermissionDenied: the caller's identity may not call the method
	// (PERMISSION_DENIED); [StatusError.Method] names it.
	ErrPermissionDenied = &sentinel{codes.PermissionDenied, ReasonPermissionDenied}
	// ErrUnauthenticated: the method needs an authenticated caller
	// (UNAUTHENTICATED): use mutual TLS.
	ErrUnauthenticated = &sentinel{codes.Unauthenticated, ReasonUnauthenticated}
	// ErrAlreadyExists: a router with this name is subscribed
	// (ROUTER_ALREADY_SUBSCRIBED).
	ErrAlreadyExists = &sentinel{codes.AlreadyExists, ReasonRouterAlreadySubscribed}
	// ErrTooManyWatchers: the sidecar's --max-watchers is reached.
	ErrTooManyWatchers = &sentinel{codes.ResourceExhausted, ReasonTooManyWatchers}
	// ErrTooManyStreams: this identity's --max-streams-per-principal is
	// reached.
	ErrTooManyStreams = &sentinel{codes.ResourceExhausted, ReasonTooManyStreams}
	// ErrUnavailable: the sidecar is shutting down (SHUTTING_DOWN) or
	// cannot be reached; retrying later is the remedy.
	ErrUnavailable = &sentinel{codes.Unavailable, ReasonShuttingDown}
	// ErrInternal: a bug in the sidecar (INTERNAL); it logged a traceback.
	ErrInternal = &sentinel{codes.Internal, ReasonInternal}
)

// sentinel is the type of the Err* values: a reason and the code it comes
// with. It is unexported so that the set stays closed and every value is
// comparable by identity.
type sentinel struct {
	code   codes.Code
	reason string
}

func (s *sentinel) Error() string {
	return "connmeta: " + s.code.String() + " (" + s.reason + ")"
}

// FieldViolation is one entry of a google.rpc.BadRequest: a field path of
// the request (address.port, update_mask.paths[0], page_token) and what is
// wrong with it.
type FieldViolation struct {
	Field       string
	Description string
}

// StatusError is a gRPC status with connmeta's google.rpc details decoded.
// Every error a Client returns that carries a status is one (possibly
// wrapped: use [errors.As]); it matches the Err* sentinels with
// [errors.Is], and gRPC's status.FromError and status.Code work on it as
// on the original error.
type StatusError struct {
	// Code is the gRPC status code.
	Code codes.Code
	// Message is the status message, for people: match on Reason instead.
	Message string
	// Reason and Domain are the ErrorInfo's; both empty without one.
	Reason, Domain string
	// Metadata is the ErrorInfo's metadata (nil without one): read it
	// through the accessors ([StatusError.OldestRevision], ...) or with a
	// Meta* key.
	Metadata map[string]string
	// FieldViolations are the BadRequest's, in the order the sidecar
	// found them.
	FieldViolations []FieldViolation
	// PreconditionViolations are the PreconditionFailure's
	// (CONNECTION_OPEN).
	PreconditionViolations []*errdetails.PreconditionFailure_Violation

	status *status.Status
}

// NewStatusError decodes st. Client already returns its errors this way;
// this is for statuses from elsewhere (a stub built on Client.Conn with
// its own interceptors, a test).
func NewStatusError(st *status.Status) *StatusError {
	e := &StatusError{Code: st.Code(), Message: st.Message(), status: st}
	for _, any := range st.Details() {
		switch v := any.(type) {
		case *errdetails.ErrorInfo:
			e.Reason, e.Domain, e.Metadata = v.GetReason(), v.GetDomain(), v.GetMetadata()
		case *errdetails.BadRequest:
			for _, fv := range v.GetFieldViolations() {
				e.FieldViolations = append(e.FieldViolations, FieldViolation{fv.GetField(), fv.GetDescription()})
			}
		case *errdetails.PreconditionFailure:
			e.PreconditionViolations = append(e.PreconditionViolations, v.GetViolations()...)
		}
	}
	return e
}

// Error has gRPC's form, so logs read as they would without this client.
func (e *StatusError) Error() string { return e.status.Err().Error() }

// GRPCStatus makes status.FromError, status.Code and status.Convert see
// the original status.
func (e *StatusError) GRPCStatus() *status.Status { return e.status }

// Is matches the Err* sentinels: by reason when e has a connmeta
// ErrorInfo, else by code.
func (e *StatusError) Is(target error) bool {
	s, ok := target.(*sentinel)
	if !ok {
		return false
	}
	if e.Domain == Domain && e.Reason != "" {
		return e.Reason == s.reason
	}
	return e.Code == s.code
}

// Meta is the ErrorInfo metadata value of key (a Meta* constant), "" when
// absent.
func (e *StatusError) Meta(key string) string { return e.Metadata[key] }

// OldestRevision is the oldest revision still in the history, which a
// REVISION_COMPACTED error names; ok is false when it names none.
func (e *StatusError) OldestRevision() (revision int64, ok bool) {
	return e.revision(MetaOldestRevision)
}

// LastRevision is the last revision a watcher ended WATCHER_TOO_SLOW was
// sent: resume after it.
func (e *StatusError) LastRevision() (revision int64, ok bool) {
	return e.revision(MetaLastRevision)
}

// CurrentEtag is the record's etag when an update failed ETAG_MISMATCH.
func (e *StatusError) CurrentEtag() string { return e.Meta(MetaCurrentEtag) }

// Method is the full method name a PERMISSION_DENIED or UNAUTHENTICATED
// error names.
func (e *StatusError) Method() string { return e.Meta(MetaMethod) }

// Field returns the description of the violation of path, and whether
// there is one. A violation inside the field (update_mask.paths[0] for
// update_mask) counts, because the contract names the field, not how deep
// the sidecar points into it.
func (e *StatusError) Field(path string) (description string, ok bool) {
	for _, v := range e.FieldViolations {
		if v.Field == path || (len(v.Field) > len(path) && v.Field[:len(path)] == path &&
			(v.Field[len(path)] == '.' || v.Field[len(path)] == '[')) {
			return v.Description, true
		}
	}
	return "", false
}

func (e *StatusError) revision(key string) (int64, bool) {
	v, err := strconv.ParseInt(e.Meta(key), 10, 64)
	return v, err == nil
}

// asStatusError returns err as a *StatusError when it carries a gRPC
// status, and err unchanged otherwise (nil, io.EOF, a local error, one that
// already is).
func asStatusError(err error) error {
	if err == nil || errors.Is(err, io.EOF) {
		return err
	}
	var se *StatusError
	if errors.As(err, &se) {
		return err
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	return NewStatusError(st)
}

// unaryStatusErrors and streamStatusErrors make the raw stubs return
// *StatusError, so errors.Is works on every call, not only on the helpers'.
func unaryStatusErrors(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	return asStatusError(invoker(ctx, method, req, reply, cc, opts...))
}

func streamStatusErrors(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	s, err := streamer(ctx, desc, cc, method, opts...)
	if err != nil {
		return nil, asStatusError(err)
	}
	return statusStream{s}, nil
}

// statusStream converts the errors of a stream's receives; a send fails
// io.EOF when the stream ended, and the receive then tells why.
type statusStream struct{ grpc.ClientStream }

func (s statusStream) RecvMsg(m any) error { return asStatusError(s.ClientStream.RecvMsg(m)) }

func (s statusStream) Header() (md metadata.MD, err error) {
	md, err = s.ClientStream.Header()
	return md, asStatusError(err)
}
