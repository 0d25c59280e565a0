package main

import (
	"fmt"
	"slices"

	"google.golang.org/grpc/codes"

	"github.com/connmeta/connmeta/clients/go/connmeta"
)

// expectError checks that err is a connmeta error with this code and
// ErrorInfo reason (domain connmeta.v1), and returns its decoded details.
func expectError(what string, err error, code codes.Code, reason string) (*connmeta.ErrorDetails, error) {
	if err == nil {
		return nil, fmt.Errorf("%s: succeeded, want %s with ErrorInfo reason %s", what, code, reason)
	}
	d := connmeta.DetailsOf(err)
	if d == nil {
		return nil, fmt.Errorf("%s: %v is not a gRPC status, want %s", what, err, code)
	}
	if d.Code != code {
		return nil, fmt.Errorf("%s: got %s (%s), want %s", what, d.Code, d.Message, code)
	}
	if d.ErrorInfo == nil {
		return nil, fmt.Errorf("%s: %s carries no google.rpc.ErrorInfo detail (message %q)", what, code, d.Message)
	}
	if d.ErrorInfo.GetReason() != reason || d.ErrorInfo.GetDomain() != connmeta.Domain {
		return nil, fmt.Errorf("%s: ErrorInfo %s/%s, want %s/%s", what,
			d.ErrorInfo.GetDomain(), d.ErrorInfo.GetReason(), connmeta.Domain, reason)
	}
	return d, nil
}

// checkRevisions compares the change revisions a watcher saw with the
// revisions the writer's acks reported: each exactly once, in order.
func checkRevisions(got, want []int64) error {
	for i := 1; i < len(got); i++ {
		if got[i] <= got[i-1] {
			return fmt.Errorf("revisions out of order or repeated at position %d: %d after %d (all: %v)", i, got[i], got[i-1], got)
		}
	}
	if !slices.Equal(got, want) {
		var missing, extra []int64
		for _, r := range want {
			if !slices.Contains(got, r) {
				missing = append(missing, r)
			}
		}
		for _, r := range got {
			if !slices.Contains(want, r) {
				extra = append(extra, r)
			}
		}
		return fmt.Errorf("watch saw %d revisions, writer made %d: missing %v, unexpected %v", len(got), len(want), missing, extra)
	}
	return nil
}
