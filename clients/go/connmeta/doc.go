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
//   - [Client.WatchEvents] is the same watch on a channel, ending with the
//     [ResumePoint] to continue from.
//   - [Informer] is a local cache kept in sync by list and watch, with
//     handlers ([EventHandler]: OnAdd, OnUpdate, OnDelete, tombstones as
//     [DeletedFinalStateUnknown]), indexes and WaitForSync.
//   - [Client.RunRouter] makes a [RouteFunc] the sidecar's router
//     (subscribe, standby, one answer per query, resubscribe).
//   - Every error a Client returns that carries a gRPC status is a
//     [*StatusError] matching the sentinels ([ErrNotFound],
//     [ErrConnectionOpen], [ErrEtagMismatch], [ErrCompacted], ...) with
//     errors.Is; [DetailsOf] decodes the google.rpc details of any status.
package connmeta
