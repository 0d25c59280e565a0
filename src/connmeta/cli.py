"""The ``connmeta`` command: ``serve`` for the sidecar, and client commands for
people (``get``, ``list``, ``watch``, ``update-server``).

Every flag of ``serve`` can also come from the environment as
``CONNMETA_<FLAG>`` (``--watch-max-lag`` -> ``CONNMETA_WATCH_MAX_LAG``); a flag
on the command line wins. Client errors print the status and its details on
one line and exit 1. A reader that goes away (``connmeta watch | head``) ends
a client command quietly with status 0, like ``cat``.

``connmeta watch`` survives sidecar restarts: see ``Watch``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields
from typing import Any, TypeVar

import grpc
from google.protobuf import field_mask_pb2, json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from connmeta import __version__
from connmeta.addresses import SCHEME_VALUES, format_address, parse_address
from connmeta.auth import TLSError
from connmeta.export import ndjson
from connmeta.logs import configure as configure_logging
from connmeta.policy import PolicyError
from connmeta.server import Config, ListenError, default_unix_socket, serve
from connmeta.state_file import StateError
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs
from connmeta.v1 import connection_service_pb2_grpc as cs_grpc

T = TypeVar("T")

_HELP = {
    "listen": "gRPC API over TCP, HOST:PORT (port 0 picks one); empty disables",
    "unix_socket": "gRPC API over a Unix socket (mode 0600); empty disables",
    "health_listen": "grpc.health.v1 only, HOST:PORT, for kubelet probes; empty disables",
    "metrics_listen": "Prometheus /metrics over plain HTTP, HOST:PORT (counts only, no"
    " per-connection data); empty disables",
    "history_size": "events kept for resuming watches and paging",
    "history_bytes": "bytes of record versions the history keeps at most (oldest dropped first)",
    "closed_retention": "seconds a closed connection stays before it is deleted",
    "closed_retention_count": "closed connections kept at most (oldest deleted first)",
    "closed_retention_bytes": "bytes of closed connections kept at most (oldest deleted first)",
    "proxy_gone_after": "seconds a proxy may have no report stream before its open"
    " connections are set CLOSED (HOOK_PROXY_GONE)",
    "watch_max_lag": "events a watcher may fall behind before it is ended (RESOURCE_EXHAUSTED)",
    "watch_write_timeout": "seconds a watch response may wait on a client that stopped reading"
    " before the watch is ended (RESOURCE_EXHAUSTED)",
    "bookmark_interval": "seconds of silence before a watcher gets a BOOKMARK",
    "shutdown_grace": "seconds in-flight calls get after SIGTERM",
    "max_message_bytes": "largest gRPC message sent or received",
    "keepalive_min_ping_interval": "seconds: clients may ping this often without a GOAWAY",
    "state_dir": "directory that keeps the store across restarts (SQLite); empty: in memory",
    "tls_cert": "server certificate chain (PEM) for every TCP listener; with --tls-key and"
    " --client-ca, TCP requires mTLS. Re-read when it changes",
    "tls_key": "the server certificate's private key (PEM, unencrypted)",
    "client_ca": "CA certificates (PEM) that client certificates must chain to",
    "authz_policy": "gRFC A43 authorization policy (JSON) for TCP callers; re-read when it"
    " changes (see README, Security)",
    "insecure_listen": "UNSAFE: allow --listen in plaintext on a non-loopback address; anyone"
    " who reaches it can read every connection",
    "max_watchers": "WatchConnections calls open at once, all callers together"
    " (RESOURCE_EXHAUSTED beyond); 0: no limit",
    "max_streams_per_principal": "streams (watch, report, route) one principal may hold open"
    " (RESOURCE_EXHAUSTED beyond); 0: no limit",
    "log_format": "text, or json: one JSON object per line (time, level, logger, message"
    " and the record's own fields, e.g. the audit log's principal and method)",
    "otlp_endpoint": "send every connection change as an OpenTelemetry event over OTLP/gRPC to"
    " this collector (http://HOST:4317 plaintext, https:// TLS); empty: OTEL_EXPORTER_OTLP_"
    "ENDPOINT if set, else off. OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES apply",
}


def _flag_bool(value: str) -> bool:
    """An environment variable's truth: 1/true/yes/on or 0/false/no/off/empty."""
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _env(name: str, default: T, convert: Callable[[str], T]) -> T:
    value = os.environ.get("CONNMETA_" + name.upper())
    if value is None:
        return default
    try:
        return convert(value)
    except ValueError:
        raise SystemExit(f"connmeta: CONNMETA_{name.upper()}={value!r} is not valid") from None


def _add_serve(sub: Any) -> None:
    serve_parser = sub.add_parser("serve", help="run the sidecar (embedded defaults: no config)")
    defaults = Config()
    for f in fields(Config):
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            serve_parser.add_argument(
                "--" + f.name.replace("_", "-"),
                action="store_true",
                default=_env(f.name, default, _flag_bool),
                help=f"{_HELP[f.name]} (env CONNMETA_{f.name.upper()}=1)",
            )
            continue
        kind: Callable[[str], Any] = type(default)
        serve_parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            default=_env(f.name, default, kind),
            help=f"{_HELP[f.name]} (default: %(default)s; env CONNMETA_{f.name.upper()})",
        )
    serve_parser.add_argument(
        "--log-level", default=_env("log_level", "INFO", str), help="logging level"
    )


def _add_client(sub: Any) -> None:
    target = _env("target", "unix://" + default_unix_socket(), str)

    def client(name: str, help_text: str, epilog: str | None = None) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name,
            help=help_text,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--target", default=target, help="sidecar address (env CONNMETA_TARGET)")
        p.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
        tls = p.add_argument_group("mTLS (for a TCP target served with --tls-cert)")
        tls.add_argument(
            "--tls-ca",
            default=_env("tls_ca", "", str),
            help="CA certificate (PEM) the server's certificate must chain to"
            " (env CONNMETA_TLS_CA)",
        )
        tls.add_argument(
            "--tls-cert",
            default=_env("tls_cert", "", str),
            help="client certificate (PEM) (env CONNMETA_TLS_CERT)",
        )
        tls.add_argument(
            "--tls-key",
            default=_env("tls_key", "", str),
            help="the client certificate's private key (PEM) (env CONNMETA_TLS_KEY)",
        )
        return p

    get = client("get", "show one connection")
    get.add_argument("id")
    get.add_argument("--output", "-o", choices=("json", "table"), default="json")
    get.add_argument("--basic", action="store_true", help="leave out certificates")

    ls = client("list", "list connections")
    ls.add_argument("--output", "-o", choices=("table", "ndjson"), default="table")
    _add_filter_flags(ls)

    watch = client(
        "watch",
        "follow changes live (like kubectl get -w); survives sidecar restarts",
        epilog=WATCH_EPILOG,
    )
    watch.add_argument("--output", "-o", choices=("table", "ndjson"), default="table")
    watch.add_argument(
        "--since",
        type=int,
        default=0,
        help="resume after this revision; one the sidecar no longer has (compacted, or"
        " from before a restart) relists instead",
    )
    watch.add_argument(
        "--no-initial", action="store_true", help="only changes, not the current objects first"
    )
    watch.add_argument(
        "--once",
        action="store_true",
        help="exit when the watch ends instead of reconnecting (status 1 if it ended with"
        " an error, 0 if the sidecar ended it cleanly)",
    )
    watch.add_argument(
        "--bookmarks",
        action="store_true",
        help="also print BOOKMARK events (the position reached while nothing changed)",
    )
    watch.add_argument(
        "--max-backoff",
        type=float,
        default=MAX_BACKOFF,
        help="longest wait between reconnect attempts, in seconds (default: %(default)s)",
    )
    _add_filter_flags(watch)

    health = client(
        "health",
        "check grpc.health.v1 and exit 0 if SERVING (for exec probes: the kubelet's own"
        " grpc probes cannot use mTLS)",
    )
    health.add_argument("--service", default="", help='service name; "" is the whole sidecar')

    update = client("update-server", "change a server connection's address and/or via")
    update.add_argument("id")
    update.add_argument("--address", help="HOST:PORT ([v6]:PORT)")
    update.add_argument("--via", help="SCHEME://HOST:PORT (http or https), or 'none' to remove")
    update.add_argument("--etag", default="", help="only if the record still has this etag")
    update.add_argument("--actor", default=os.environ.get("USER", ""), help="who makes the change")


def _add_filter_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=("client", "server"))
    p.add_argument(
        "--state", action="append", default=[], choices=("closed", "can_read", "can_write", "open")
    )
    p.add_argument("--host", default="", help="address host; '*.example.com' matches subdomains")
    p.add_argument("--sni", default="")
    p.add_argument("--client-id", default="", help="a client and the servers serving it")
    p.add_argument("--basic", action="store_true", help="leave out certificates")


def _filter(args: argparse.Namespace) -> cs.ConnectionFilter:
    return cs.ConnectionFilter(
        kind={"client": cs.CONNECTION_KIND_CLIENT, "server": cs.CONNECTION_KIND_SERVER}.get(
            args.kind or "", cs.CONNECTION_KIND_UNSPECIFIED
        ),
        states=[pb.ConnectionState.Value("CONNECTION_STATE_" + s.upper()) for s in args.state],
        host=args.host,
        sni=args.sni,
        client_id=args.client_id,
    )


def _view(args: argparse.Namespace) -> cs.ConnectionView.ValueType:
    return cs.CONNECTION_VIEW_BASIC if args.basic else cs.CONNECTION_VIEW_FULL


_DESCRIPTION = (
    "connmeta: 'serve' runs the sidecar; get, list, watch, health and update-server are "
    "client commands for people. Every flag of 'serve' can also come from the environment "
    "as CONNMETA_<FLAG> (--watch-max-lag: CONNMETA_WATCH_MAX_LAG); the command line wins."
)
"""Plain text: argparse prints it as is, so no RST markup and whole sentences."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="connmeta", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"connmeta {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_client(sub)
    sub.add_parser("addon-path", help="print the path of the mitmproxy addon (mitmdump -s PATH)")
    certs = sub.add_parser("certs", help="development certificates for mTLS")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    init = certs_sub.add_parser(
        "init",
        help="write a development CA, a server certificate, one client certificate per"
        " role (reader, writer, router, reporter) and the example policy.json",
    )
    init.add_argument("--dir", required=True, help="directory to write to (created 0700)")
    init.add_argument(
        "--dns",
        action="append",
        default=[],
        help="another DNS name for the server certificate (repeatable); it always covers"
        " localhost, 127.0.0.1 and ::1",
    )
    return parser


# --- output -------------------------------------------------------------------------------


def _json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


STATE_NAMES = {v: k.removeprefix("CONNECTION_STATE_") for k, v in pb.ConnectionState.items()}
EVENT_NAMES = {v: k.removeprefix("WATCH_EVENT_TYPE_") for k, v in cs.WatchEventType.items()}
_COLUMNS = "{:<8} {:<36} {:<9} {:<28} {:<24} {:>8}"
_EVENT = "{:<20} "
HEADER = _COLUMNS.format("KIND", "ID", "STATE", "TARGET", "SNI", "REVISION")
WATCH_HEADER = _EVENT.format("EVENT") + HEADER


def table_row(record: pb.ConnectionRecord, event: str | None = None) -> str:
    """One line per record: the columns people filter by eye."""
    if record.HasField("server"):
        kind, conn = "server", record.server.connection
        target = format_address(record.server.address) if record.server.HasField("address") else ""
        if record.server.HasField("via"):
            target += " via " + format_address(record.server.via.address)
    else:
        kind, conn = "client", record.client.connection
        target = format_address(conn.peername) if conn.HasField("peername") else ""
    row = _COLUMNS.format(
        kind,
        conn.id,
        STATE_NAMES.get(conn.state, str(conn.state)),
        target,
        conn.sni if conn.HasField("sni") else "",
        record.metadata.revision,
    )
    return row if event is None else _EVENT.format(event) + row


def describe_error(error: grpc.RpcError) -> str:
    """Status, message and every google.rpc detail, on one readable line."""
    call: Any = error
    parts = [f"{call.code().name}: {call.details()}"]
    status = rpc_status.from_call(call)
    for detail in status.details if status is not None else ():
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.PreconditionFailure,
        ):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                parts.append(_detail_text(message))
    return " | ".join(parts)


def _detail_text(message: Message) -> str:
    if isinstance(message, error_details_pb2.ErrorInfo):
        meta = ", ".join(f"{k}={v}" for k, v in sorted(message.metadata.items()))
        return f"ErrorInfo {message.reason} ({meta})"
    if isinstance(message, error_details_pb2.BadRequest):
        return "BadRequest " + "; ".join(
            f"{v.field}: {v.description}" for v in message.field_violations
        )
    assert isinstance(message, error_details_pb2.PreconditionFailure)
    return "PreconditionFailure " + "; ".join(
        f"{v.type} {v.subject}: {v.description}" for v in message.violations
    )


# --- client commands ----------------------------------------------------------------------


def channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to ``--target``: mTLS when any --tls-* flag is given, else plaintext."""
    if not (args.tls_ca or args.tls_cert or args.tls_key):
        return grpc.insecure_channel(args.target)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")

    def read(path: str) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    try:
        credentials = grpc.ssl_channel_credentials(
            read(args.tls_ca), read(args.tls_key), read(args.tls_cert)
        )
    except OSError as error:
        raise ValueError(f"cannot read {error.filename}: {error.strerror}") from None
    return grpc.secure_channel(args.target, credentials)


def _stub(args: argparse.Namespace) -> cs_grpc.ConnectionServiceStub:
    return cs_grpc.ConnectionServiceStub(channel(args))


def _pages(args: argparse.Namespace) -> Iterator[pb.ConnectionRecord]:
    stub, token = _stub(args), ""
    while True:
        page = stub.ListConnections(
            cs.ListConnectionsRequest(page_token=token, filter=_filter(args), view=_view(args)),
            timeout=args.timeout,
        )
        yield from page.connections
        token = page.next_page_token
        if not token:
            return


def _run_client(args: argparse.Namespace, out: Callable[[str], None]) -> None:
    if args.command == "get":
        record = (
            _stub(args)
            .GetConnection(
                cs.GetConnectionRequest(id=args.id, view=_view(args)), timeout=args.timeout
            )
            .connection
        )
        out(table_row(record) if args.output == "table" else json.dumps(_json(record), indent=2))
    elif args.command == "list":
        if args.output == "table":
            out(HEADER)
        for record in _pages(args):
            out(table_row(record) if args.output == "table" else json.dumps(_json(record)))
    elif args.command == "watch":
        Watch(args, out, lambda text: print(text, file=sys.stderr, flush=True)).run()
    elif args.command == "update-server":
        _update(args, out)
    elif args.command == "health":
        stub: Any = health_pb2_grpc.HealthStub(channel(args))
        status = stub.Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
        ).status
        out(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
        if status != health_pb2.HealthCheckResponse.SERVING:
            raise SystemExit(1)


MAX_BACKOFF = 10.0
FIRST_BACKOFF = 0.25

WATCH_EPILOG = """\
Restarts and reconnects:
  When the watch ends (the sidecar stopped, restarted, or ended a slow
  watcher) connmeta watch reconnects with capped, jittered exponential
  backoff and resumes after the last revision it printed: -o ndjson never
  repeats or skips a change. If the sidecar cannot resume from there (it
  restarted: another incarnation, or the revision was compacted) the watch
  lists again and prints the difference to what it has shown as events:
  records that vanished as DELETED (their last known version), new ones as
  ADDED, changed ones as MODIFIED, all at the listing's revision, and then
  follows changes after it.

  The difference is announced first: in table output by a line starting
  with "-- relisted", in -o ndjson by one line of type RELISTED with
  "relisted": {"reason": "restarted" | "compacted" | "interrupted",
  "deleted": D, "added": A, "modified": M}, followed by exactly D + A + M
  events at its revision. With --since R, what it has shown is the changes
  after R, so a relist reports records it never printed as ADDED.

-o ndjson: one JSON object per line (schema: docs/ndjson.schema.json):
  {"type": "WATCH_EVENT_TYPE_ADDED", "revision": "R", "time": "RFC 3339",
   "incarnation": "...", "connection": {...}}
  type is a WatchEventType name (ADDED, MODIFIED, DELETED with a
  connection; INITIAL_EVENTS_END and, with --bookmarks, BOOKMARK without)
  or RELISTED. Revisions are strings (proto3 JSON int64); connection is the
  record in proto3 JSON with every field without presence printed.
"""


class _OtherHistory(Exception):
    """A watch response from another incarnation than the one being followed."""


class Backoff:
    """Exponential, capped, with jitter: restarted sidecars are not met by every
    watcher at the same instant, and a long outage costs one attempt per cap."""

    def __init__(self, cap: float, first: float = FIRST_BACKOFF) -> None:
        self.cap = max(cap, 0.0)
        self.first = min(first, self.cap)
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2.0**self.attempt)
        self.attempt = min(self.attempt + 1, 32)
        # "Equal jitter": at least half the delay, so retries never hammer.
        return delay / 2 + random.uniform(0, delay / 2)

    def reset(self) -> None:
        self.attempt = 0


# Errors no reconnect can fix: the request itself or the caller is wrong.
_FINAL = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


def record_id(record: pb.ConnectionRecord) -> str:
    kind = record.server if record.HasField("server") else record.client
    return kind.connection.id


class Watch:
    """``connmeta watch``: follow changes, across reconnects and sidecar restarts.

    It keeps what it has shown (``known``, by id) and the revision it has
    printed up to (``resume``). A reconnect resumes after ``resume`` under the
    incarnation it follows, so the sidecar itself refuses a resume into
    another history (OUT_OF_RANGE REVISION_COMPACTED); then, or when a
    response names another incarnation, it lists again and prints the
    difference to ``known``. ``resume`` is None while there is no position to
    resume from (before the initial snapshot completed).
    """

    def __init__(
        self,
        args: argparse.Namespace,
        out: Callable[[str], None],
        note: Callable[[str], None],
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.args = args
        self.out = out
        self.note = note
        self.sleep = sleep
        self.known: dict[str, pb.ConnectionRecord] = {}
        self.resume: int | None = args.since or None
        self.incarnation = ""
        self.backoff = Backoff(args.max_backoff)
        self.noted = False  # the current outage has been reported on stderr

    def run(self) -> None:
        """Until interrupted; with --once until the first end (raises its error)."""
        args = self.args
        if args.output == "table":
            self.out(WATCH_HEADER)
        # The first connect sends the snapshot as initial events; --no-initial
        # lists silently instead, so a later relist knows what existed.
        initial_events = self.resume is None and not args.no_initial
        announce = not args.no_initial
        compactions = 0
        # Why the next relist happens; only a snapshot cut short leaves no
        # resume point without saying so.
        reason = "interrupted"
        while True:
            try:
                with channel(args) as ch:
                    stub = cs_grpc.ConnectionServiceStub(ch)
                    if self.resume is None and not initial_events:
                        self._relist(stub, reason, announce)
                        announce = True
                    first, initial_events = initial_events, False
                    self._stream(stub, first)
                error: grpc.RpcError | None = None
            except _OtherHistory:
                reason = "restarted"
                self.resume = None
                continue
            except grpc.RpcError as failure:
                call: Any = failure
                if call.code() == grpc.StatusCode.OUT_OF_RANGE:
                    # Not an end: the resume point is not in this store's
                    # history (compacted, or the sidecar restarted). A second
                    # one in a row means the store churns faster than we list.
                    reason = "compacted"
                    self.resume = None
                    compactions += 1
                    if compactions > 1:
                        self.sleep(self.backoff.next())
                    continue
                if args.once or call.code() in _FINAL:
                    raise
                error = failure
            compactions = 0
            if args.once:
                return
            if not self.noted:  # one line per outage, not one per attempt
                why = describe_error(error) if error is not None else "ended by the sidecar"
                self.note(f"connmeta: watch ended ({why}); reconnecting")
                self.noted = True
            self.sleep(self.backoff.next())

    def _request(self, initial_events: bool) -> cs.WatchConnectionsRequest:
        args = self.args
        return cs.WatchConnectionsRequest(
            start_after_revision=self.resume or 0,
            send_initial_events=initial_events,
            allow_bookmarks=True,
            filter=_filter(args),
            view=_view(args),
            incarnation=self.incarnation if self.resume else "",
        )

    def _stream(self, stub: cs_grpc.ConnectionServiceStub, initial_events: bool) -> None:
        call = stub.WatchConnections(self._request(initial_events))
        try:
            for response in call:
                self.backoff.reset()
                self.noted = False
                incarnation = response.header.incarnation
                if self.incarnation and incarnation and incarnation != self.incarnation:
                    raise _OtherHistory
                self.incarnation = incarnation or self.incarnation
                for event in response.events:
                    self._event(event)
        finally:
            call.cancel()

    def _event(self, event: cs.WatchEvent) -> None:
        if event.type in (cs.WATCH_EVENT_TYPE_INITIAL_EVENTS_END, cs.WATCH_EVENT_TYPE_BOOKMARK):
            if self.resume is None and event.type == cs.WATCH_EVENT_TYPE_BOOKMARK:
                return  # not sent before the snapshot ends; no position to take
            self.resume = max(self.resume or 0, event.revision)
            if event.type != cs.WATCH_EVENT_TYPE_BOOKMARK or self.args.bookmarks:
                self._emit(event.type, event.revision, None, self.incarnation)
            return
        if self.resume is not None and event.revision <= self.resume:
            return  # already printed: a resume never repeats a change
        key = record_id(event.connection)
        if event.type == cs.WATCH_EVENT_TYPE_DELETED:
            self.known.pop(key, None)
        else:
            self.known[key] = event.connection
        if self.resume is not None:
            self.resume = event.revision
        self._emit(event.type, event.revision, event.connection, self.incarnation)

    def _list(self, stub: cs_grpc.ConnectionServiceStub) -> cs.ListConnectionsResponse:
        """Every page of one listing, in one response; restarted if the store
        restarts in between (the page token is then refused)."""
        args = self.args
        while True:
            token, whole = "", cs.ListConnectionsResponse()
            try:
                while True:
                    page = stub.ListConnections(
                        cs.ListConnectionsRequest(
                            page_token=token, filter=_filter(args), view=_view(args)
                        ),
                        timeout=args.timeout,
                    )
                    if not token:
                        whole.revision, whole.header.incarnation = (
                            page.revision,
                            page.header.incarnation,
                        )
                    elif page.header.incarnation != whole.header.incarnation:
                        break
                    whole.connections.extend(page.connections)
                    token = page.next_page_token
                    if not token:
                        return whole
            except grpc.RpcError as error:
                code = error.code()
                if not token or code not in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.OUT_OF_RANGE,
                ):
                    raise

    def _relist(self, stub: cs_grpc.ConnectionServiceStub, reason: str, announce: bool) -> None:
        listing = self._list(stub)
        listed = {record_id(r): r for r in listing.connections}
        if announce:
            if self.incarnation and listing.header.incarnation != self.incarnation:
                reason = "restarted"
            deleted = [self.known[k] for k in sorted(self.known.keys() - listed.keys())]
            added = [listed[k] for k in sorted(listed.keys() - self.known.keys())]
            modified = [
                listed[k]
                for k in sorted(listed.keys() & self.known.keys())
                if listed[k] != self.known[k]
            ]
            self._announce(listing, reason, len(deleted), len(added), len(modified))
            for kind, records in (
                (cs.WATCH_EVENT_TYPE_DELETED, deleted),
                (cs.WATCH_EVENT_TYPE_ADDED, added),
                (cs.WATCH_EVENT_TYPE_MODIFIED, modified),
            ):
                for record in records:
                    self._emit(kind, listing.revision, record, listing.header.incarnation)
        self.known = listed
        self.resume = listing.revision
        self.incarnation = listing.header.incarnation

    def _announce(
        self,
        listing: cs.ListConnectionsResponse,
        reason: str,
        deleted: int,
        added: int,
        modified: int,
    ) -> None:
        if self.args.output == "ndjson":
            self.out(
                ndjson.relisted_line(
                    listing.revision,
                    listing.header.incarnation,
                    reason,
                    deleted,
                    added,
                    modified,
                )
            )
        else:
            self.out(
                f"-- relisted at revision {listing.revision} ({_REASONS[reason]}): "
                f"{deleted} deleted, {added} added, {modified} modified"
            )

    def _emit(
        self,
        kind: cs.WatchEventType.ValueType,
        revision: int,
        record: pb.ConnectionRecord | None,
        incarnation: str,
    ) -> None:
        if self.args.output == "ndjson":
            self.out(ndjson.event_line(kind, revision, incarnation, record))
        elif record is not None:
            self.out(table_row(record, EVENT_NAMES.get(kind, str(kind))))


_REASONS = {
    "restarted": "the sidecar restarted",
    "compacted": "the resume revision is not in the sidecar's history",
    "interrupted": "the watch ended before its snapshot was complete",
}


def _update(args: argparse.Namespace, out: Callable[[str], None]) -> None:
    request = cs.UpdateServerConnectionRequest(id=args.id, etag=args.etag, actor=args.actor)
    paths = []
    if args.address is not None:
        request.address.CopyFrom(parse_address(args.address))
        paths.append("address")
    if args.via is not None:
        if args.via.lower() != "none":
            request.via.CopyFrom(parse_via(args.via))
        paths.append("via")
    if not paths:
        raise SystemExit("connmeta: update-server needs --address and/or --via")
    request.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=paths))
    record = _stub(args).UpdateServerConnection(request, timeout=args.timeout).connection
    out(json.dumps(_json(record), indent=2))


def parse_via(text: str) -> pb.ServerSpec:
    """``http://proxy:3128`` -> ServerSpec. Schemes are lower case, as in mitmproxy."""
    scheme, sep, rest = text.partition("://")
    value = SCHEME_VALUES.get(scheme) if sep else None
    if value is None:
        raise ValueError(f"--via {text!r}: expected SCHEME://HOST:PORT, e.g. http://proxy:3128")
    return pb.ServerSpec(scheme=value, address=parse_address(rest))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        config = Config(**{f.name: getattr(args, f.name) for f in fields(Config)})
        try:
            configure_logging(config.log_format, args.log_level)
        except ValueError as error:
            print(f"connmeta: {error}", file=sys.stderr)
            return 2
        try:
            asyncio.run(serve(config))
        except (ListenError, StateError, TLSError, PolicyError) as error:
            print(f"connmeta: {error}", file=sys.stderr)
            return 1
        return 0
    if args.command == "certs":
        from connmeta import devcerts

        written = devcerts.init(args.dir, args.dns)
        print(f"connmeta: wrote {len(written)} files to {args.dir}:")
        for path in written:
            print(f"  {path}")
        d = args.dir
        print(
            "serve:  connmeta serve "
            f"--tls-cert {d}/server.pem --tls-key {d}/server.key --client-ca {d}/ca.pem "
            f"--authz-policy {d}/policy.json\n"
            "client: connmeta list --target localhost:50051 "
            f"--tls-ca {d}/ca.pem --tls-cert {d}/reader.pem --tls-key {d}/reader.key"
        )
        return 0
    if args.command == "addon-path":
        from connmeta.mitm.paths import addon_path

        print(addon_path())
        return 0
    try:
        _run_client(args, lambda line: print(line, flush=True))
    except grpc.RpcError as error:
        print(f"connmeta: {describe_error(error)}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"connmeta: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): done, like cat. Point stdout at
        # /dev/null so the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    return 0
