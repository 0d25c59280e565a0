// Package connmeta is a small, idiomatic client for the connmeta sidecar,
// the gRPC service that holds mitmproxy's connection metadata.
//
// The generated stubs live in package connmetav1; this package adds what
// every consumer would otherwise write by hand:
//
//   - [Dial] connects over TCP ("host:port") or a Unix socket
//     ("unix:///path/to/connmeta.sock") with keepalive suited to long watches.
//   - [Client.Watch] follows changes and survives disconnects, slow-consumer
//     evictions (WATCHER_TOO_SLOW), compaction (REVISION_COMPACTED) and, as
//     an informer, sidecar restarts, without losing or repeating a revision
//     and without delivering another incarnation's events.
//   - [Client.Pages] and [Client.ListAll] page through a listing pinned at
//     one revision.
//   - [Client.UpdateServer] and [Client.RetargetServer] ask for a change of
//     a server's address or upstream proxy with optimistic concurrency
//     (etags); the proxy applies it at the server's next connect.
//   - [DetailsOf] decodes the google.rpc error details (ErrorInfo,
//     BadRequest, PreconditionFailure) every connmeta error carries.
package connmeta
