package connmeta

import (
	"context"
	"fmt"
	"iter"

	"google.golang.org/protobuf/proto"

	"github.com/connmeta/connmeta/clients/go/connmetav1"
)

// Pages iterates over the pages of a listing, starting at req.PageToken.
// Every page carries the same Revision: the listing is a snapshot, and
// watching with StartAfterRevision = that revision follows it gap-free.
// Iteration stops at the first error, which is yielded with a nil page. A
// token that outlived the server's history fails with OUT_OF_RANGE
// (REVISION_COMPACTED), one from before a sidecar restart with
// INVALID_ARGUMENT: list again from the first page.
func (c *Client) Pages(ctx context.Context, req *connmetav1.ListConnectionsRequest) iter.Seq2[*connmetav1.ListConnectionsResponse, error] {
	return func(yield func(*connmetav1.ListConnectionsResponse, error) bool) {
		// Copy: the page token changes per page and the caller's request
		// must stay as given.
		r := proto.CloneOf(req)
		for {
			page, err := c.Connections.ListConnections(ctx, r)
			if err != nil {
				yield(nil, err)
				return
			}
			if !yield(page, nil) || page.GetNextPageToken() == "" {
				return
			}
			r.PageToken = page.GetNextPageToken()
		}
	}
}

// ListAll collects every record of a listing and the revision it reflects.
func (c *Client) ListAll(ctx context.Context, req *connmetav1.ListConnectionsRequest) ([]*connmetav1.ConnectionRecord, int64, error) {
	var (
		records  []*connmetav1.ConnectionRecord
		revision int64
	)
	for page, err := range c.Pages(ctx, req) {
		if err != nil {
			return nil, 0, fmt.Errorf("connmeta: list: %w", err)
		}
		revision = page.GetRevision()
		records = append(records, page.GetConnections()...)
	}
	return records, revision, nil
}

// CurrentRevision returns the store's current revision: a one-record
// listing is the cheapest read that reports it.
func (c *Client) CurrentRevision(ctx context.Context) (int64, error) {
	page, err := c.Connections.ListConnections(ctx, &connmetav1.ListConnectionsRequest{
		PageSize: 1,
		View:     connmetav1.ConnectionView_CONNECTION_VIEW_BASIC,
	})
	if err != nil {
		return 0, fmt.Errorf("connmeta: current revision: %w", err)
	}
	return page.GetRevision(), nil
}
