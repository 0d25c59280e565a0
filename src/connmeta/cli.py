"""The ``connmeta`` command: ``serve`` for the sidecar, and client commands for
people (``get``, ``list``, ``watch``, ``update-server``).

Every flag of ``serve`` can also come from the environment as
``CONNMETA_<FLAG>`` (``--watch-max-lag`` -> ``CONNMETA_WATCH_MAX_LAG``); a flag
on the command line wins. Client errors print the status and its details on
one line and exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields
from typing import Any, TypeVar

import grpc
from google.protobuf import field_mask_pb2, json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from connmeta import __version__
from connmeta.addresses import SCHEME_VALUES, format_address, parse_address
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
    "history_size": "events kept for resuming watches and paging",
    "closed_retention": "seconds a closed connection stays before it is deleted",
    "closed_retention_count": "closed connections kept at most (oldest deleted first)",
    "watch_max_lag": "events a watcher may fall behind before it is ended (RESOURCE_EXHAUSTED)",
    "watch_write_timeout": "seconds a watch response may wait on a client that stopped reading"
    " before the watch is ended (RESOURCE_EXHAUSTED)",
    "bookmark_interval": "seconds of silence before a watcher gets a BOOKMARK",
    "shutdown_grace": "seconds in-flight calls get after SIGTERM",
    "max_message_bytes": "largest gRPC message sent or received",
    "keepalive_min_ping_interval": "seconds: clients may ping this often without a GOAWAY",
    "state_dir": "directory that keeps the store across restarts (SQLite); empty: in memory",
}


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

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        p.add_argument("--target", default=target, help="sidecar address (env CONNMETA_TARGET)")
        p.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
        return p

    get = client("get", "show one connection")
    get.add_argument("id")
    get.add_argument("--output", "-o", choices=("json", "table"), default="json")
    get.add_argument("--basic", action="store_true", help="leave out certificates")

    ls = client("list", "list connections")
    ls.add_argument("--output", "-o", choices=("table", "ndjson"), default="table")
    _add_filter_flags(ls)

    watch = client("watch", "follow changes live (like kubectl get -w)")
    watch.add_argument("--output", "-o", choices=("table", "ndjson"), default="table")
    watch.add_argument("--since", type=int, default=0, help="resume after this revision")
    watch.add_argument(
        "--no-initial", action="store_true", help="only changes, not the current objects first"
    )
    _add_filter_flags(watch)

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="connmeta", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"connmeta {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_client(sub)
    sub.add_parser("addon-path", help="print the path of the mitmproxy addon (mitmdump -s PATH)")
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


def _stub(args: argparse.Namespace) -> cs_grpc.ConnectionServiceStub:
    return cs_grpc.ConnectionServiceStub(grpc.insecure_channel(args.target))


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
        _watch(args, out)
    elif args.command == "update-server":
        _update(args, out)


def _watch(args: argparse.Namespace, out: Callable[[str], None]) -> None:
    request = cs.WatchConnectionsRequest(
        start_after_revision=args.since,
        send_initial_events=not args.no_initial and args.since == 0,
        allow_bookmarks=True,
        filter=_filter(args),
        view=_view(args),
    )
    if args.output == "table":
        out(WATCH_HEADER)
    for response in _stub(args).WatchConnections(request):
        for event in response.events:
            name = EVENT_NAMES.get(event.type, str(event.type))
            if args.output == "ndjson":
                line: dict[str, Any] = {"type": name, "revision": event.revision}
                if event.HasField("connection"):
                    line["connection"] = _json(event.connection)
                out(json.dumps(line))
            elif event.HasField("connection"):
                out(table_row(event.connection, name))


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
        logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
        config = Config(**{f.name: getattr(args, f.name) for f in fields(Config)})
        try:
            asyncio.run(serve(config))
        except (ListenError, StateError) as error:
            print(f"connmeta: {error}", file=sys.stderr)
            return 1
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
    return 0
