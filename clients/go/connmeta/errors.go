package connmeta

import (
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Domain is the ErrorInfo domain of every error the sidecar raises.
const Domain = "connmeta.v1"

// ErrorInfo reasons, with the status code each comes with.
const (
	ReasonConnectionNotFound = "CONNECTION_NOT_FOUND" // NOT_FOUND
	ReasonInvalidArgument    = "INVALID_ARGUMENT"     // INVALID_ARGUMENT, with BadRequest
	ReasonEtagMismatch       = "ETAG_MISMATCH"        // ABORTED
	ReasonConnectionOpen     = "CONNECTION_OPEN"      // FAILED_PRECONDITION, with PreconditionFailure
	ReasonRevisionCompacted  = "REVISION_COMPACTED"   // OUT_OF_RANGE
	ReasonWatcherTooSlow     = "WATCHER_TOO_SLOW"     // RESOURCE_EXHAUSTED
	ReasonShuttingDown       = "SHUTTING_DOWN"        // UNAVAILABLE
	// The caller's identity may not call the method (authorization policy,
	// or a write over plaintext TCP); metadata "method" names it.
	ReasonPermissionDenied = "PERMISSION_DENIED" // PERMISSION_DENIED
	// The policy needs an identity and the call had none (plaintext TCP).
	ReasonUnauthenticated = "UNAUTHENTICATED" // UNAUTHENTICATED
	// A router subscribed under a name another router holds.
	ReasonRouterAlreadySubscribed = "ROUTER_ALREADY_SUBSCRIBED" // ALREADY_EXISTS
	ReasonTooManyWatchers         = "TOO_MANY_WATCHERS"         // RESOURCE_EXHAUSTED
	ReasonTooManyStreams          = "TOO_MANY_STREAMS"          // RESOURCE_EXHAUSTED
	ReasonInternal                = "INTERNAL"                  // INTERNAL
)

// ErrorInfo metadata keys the watch errors carry.
const (
	MetaOldestRevision = "oldestRevision" // REVISION_COMPACTED: oldest revision still retained
	MetaLastRevision   = "lastRevision"   // WATCHER_TOO_SLOW: last revision sent; resume after it
	MetaMethod         = "method"         // PERMISSION_DENIED, UNAUTHENTICATED: the full method name
	MetaCurrentEtag    = "currentEtag"    // ETAG_MISMATCH: the record's etag now
	MetaField          = "field"          // CONNECTION_OPEN: the field that cannot change while OPEN
)

// ErrorDetails is a gRPC error with its google.rpc details decoded. Fields
// the error did not carry are nil.
type ErrorDetails struct {
	Code                codes.Code
	Message             string
	ErrorInfo           *errdetails.ErrorInfo
	BadRequest          *errdetails.BadRequest
	PreconditionFailure *errdetails.PreconditionFailure
}

// DetailsOf decodes err's status details. It returns nil when err carries no
// gRPC status (a local error, or nil). Wrapped errors are unwrapped.
func DetailsOf(err error) *ErrorDetails {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return nil
	}
	d := &ErrorDetails{Code: st.Code(), Message: st.Message()}
	// Details() skips nothing silently: an Any it cannot resolve comes back
	// as an error value, which is ignored here because a newer server may
	// add detail types this client does not know.
	for _, any := range st.Details() {
		switch v := any.(type) {
		case *errdetails.ErrorInfo:
			d.ErrorInfo = v
		case *errdetails.BadRequest:
			d.BadRequest = v
		case *errdetails.PreconditionFailure:
			d.PreconditionFailure = v
		}
	}
	return d
}

// Reason returns the ErrorInfo reason of err, or "" when it has none.
func Reason(err error) string {
	if d := DetailsOf(err); d != nil && d.ErrorInfo != nil {
		return d.ErrorInfo.GetReason()
	}
	return ""
}

// IsReason reports whether err is a connmeta error with this ErrorInfo
// reason (one of the Reason* constants).
func IsReason(err error, reason string) bool {
	d := DetailsOf(err)
	return d != nil && d.ErrorInfo != nil && d.ErrorInfo.GetReason() == reason &&
		d.ErrorInfo.GetDomain() == Domain
}

// Metadata returns ErrorInfo metadata value key, or "" when absent.
func (d *ErrorDetails) Metadata(key string) string {
	if d == nil || d.ErrorInfo == nil {
		return ""
	}
	return d.ErrorInfo.GetMetadata()[key]
}

// FieldViolations returns the BadRequest field paths and their descriptions.
func (d *ErrorDetails) FieldViolations() map[string]string {
	out := map[string]string{}
	if d == nil || d.BadRequest == nil {
		return out
	}
	for _, v := range d.BadRequest.GetFieldViolations() {
		out[v.GetField()] = v.GetDescription()
	}
	return out
}
