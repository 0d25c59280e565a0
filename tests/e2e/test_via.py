"""(c) An upstream proxy decided as ``via`` is really used: a second mitmdump
sees the CONNECT, and the request still reaches the origin."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import router_service_pb2 as rt
from tests.e2e.harness import Mitmdump, Origin, RouterClient, async_wait_for, get, routing_reached
from tests.e2e.sidecar_view import records

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mitmdump]:
    # Passes TLS through untouched, so the front proxy still sees (and
    # verifies) the origin's own certificate.
    dump = Mitmdump(
        tmp_path_factory.mktemp("upstream"), ["--ignore-hosts", ".*"], with_connmeta=False
    )
    dump.start()
    yield dump
    dump.stop()


async def test_router_via_sends_an_https_request_through_the_upstream_proxy(
    proxy: Mitmdump, upstream: Mitmdump, origin_tls: Origin, channel: grpc.aio.Channel
) -> None:
    def decide(query: rt.RouteQuery) -> rt.RouteAnswer:
        if query.server.server.address.port != origin_tls.port:
            return rt.RouteAnswer()  # the tunnel to the upstream itself: as is
        answer = rt.RouteAnswer(
            via=pb.ServerSpec(
                scheme=pb.SCHEME_HTTP, address=pb.Address(host="127.0.0.1", port=upstream.port)
            )
        )
        answer.update_mask.paths.append("via")
        return answer

    async with RouterClient(channel, "e2e-via", decide) as router:
        await routing_reached(proxy)
        body = await asyncio.to_thread(get, proxy.proxy, origin_tls.url + "/v", proxy.ca)
    assert body == "S:/v"
    assert [e["target"] for e in upstream.hooks() if e["hook"] == "http_connect"] == [
        ["localhost", origin_tls.port]
    ], "the upstream proxy carried the request"
    via = ("http", ("127.0.0.1", upstream.port))
    request = [e for e in proxy.hooks() if e["hook"] == "request"][-1]
    assert request["via"] == via
    # The logical server (reached through the upstream) as mitmproxy and the
    # sidecar see it, and the direct server the decision was made for.
    logical = [
        e
        for e in proxy.hooks()
        if e["hook"] == "tls_established_server" and e["get_state"]["via"] == via
    ]
    assert logical
    logical_id = logical[-1]["id"]

    async def reported() -> dict[str, pb.ConnectionRecord] | None:
        held = await records(channel)
        return held if logical_id in held else None

    held = await async_wait_for(reported, 5, "the logical server in the sidecar")
    assert held[logical_id].server.via.address.port == upstream.port
    decided = held[router.queries[0].server.server.connection.id]
    assert decided.metadata.last_change.actor == "e2e-via"
    assert list(decided.metadata.last_change.fields) == ["via"]
