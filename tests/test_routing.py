"""RouterHub without gRPC: who decides, what a query returns and when, and
which pending changes a proxy is handed."""

from __future__ import annotations

import asyncio

import pytest

from connmeta.routing import AlreadySubscribed, Decision, ProxyFeed, RouterHub, answer_violations
from connmeta.v1 import connection_pb2 as pb

ADDRESS = frozenset({"address"})
VIA = frozenset({"via"})
# Long enough that an answer given at once is always in time, short enough
# that a test waiting it out stays fast.
SHORT = 0.05


def drain(feed: ProxyFeed) -> list[str | Decision]:
    items: list[str | Decision] = []
    while not feed.items.empty():
        items.append(feed.items.get_nowait())
    return items


def address(host: str = "origin-b.example", port: int = 443) -> pb.Address:
    return pb.Address(host=host, port=port)


def via(
    scheme: int = pb.SCHEME_HTTP, host: str = "proxy.example", port: int = 3128
) -> pb.ServerSpec:
    return pb.ServerSpec(scheme=scheme, address=pb.Address(host=host, port=port))  # type: ignore[arg-type]


# -- routers ---------------------------------------------------------------


async def test_first_subscriber_is_active_and_later_ones_are_standbys() -> None:
    hub = RouterHub()
    first = hub.subscribe("a")
    second = hub.subscribe("b")
    assert hub.active is first
    assert first.activated.is_set()
    assert not second.activated.is_set()


async def test_standbys_take_over_in_subscription_order_when_the_active_router_leaves() -> None:
    hub = RouterHub()
    a, b, c = hub.subscribe("a"), hub.subscribe("b"), hub.subscribe("c")
    hub.unsubscribe(a)
    assert hub.active is b
    assert b.activated.is_set()
    assert not c.activated.is_set()
    hub.unsubscribe(b)
    assert hub.active is c
    hub.unsubscribe(c)
    assert hub.active is None


async def test_a_leaving_standby_does_not_change_the_active_router() -> None:
    hub = RouterHub()
    a, b = hub.subscribe("a"), hub.subscribe("b")
    feed = hub.attach()
    drain(feed)
    hub.unsubscribe(b)
    assert hub.active is a
    assert drain(feed) == [], "no routing-state change to announce"


async def test_duplicate_router_name_is_refused() -> None:
    hub = RouterHub()
    hub.subscribe("a")
    with pytest.raises(AlreadySubscribed) as caught:
        hub.subscribe("a")
    assert caught.value.name == "a"


async def test_name_is_free_again_once_its_router_left() -> None:
    hub = RouterHub()
    hub.unsubscribe(hub.subscribe("a"))
    assert hub.subscribe("a") is hub.active


@pytest.mark.parametrize("name", ["", "x" * 129])
async def test_empty_or_overlong_router_name_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="1-128 characters"):
        RouterHub().subscribe(name)


async def test_proxy_feed_starts_with_the_routing_state_and_follows_its_changes() -> None:
    hub = RouterHub()
    feed = hub.attach()
    a = hub.subscribe("a")
    b = hub.subscribe("b")
    hub.unsubscribe(a)
    hub.unsubscribe(b)
    assert drain(feed) == ["", "a", "b", ""]


async def test_detached_feed_receives_nothing() -> None:
    hub = RouterHub()
    feed = hub.attach()
    drain(feed)
    hub.detach(feed)
    hub.subscribe("a")
    hub.note_pending(Decision("s1", actor="op", fields=ADDRESS, address=address()))
    assert drain(feed) == []


# -- queries ---------------------------------------------------------------


async def test_query_answered_in_time_returns_the_routers_decision() -> None:
    hub = RouterHub(timeout=5)
    router = hub.subscribe("r")
    asking = asyncio.create_task(hub.ask("q1", "s1", "payload"))
    query = await asyncio.wait_for(router.queries.get(), 1)
    assert (query.id, query.server_id, query.payload) == ("q1", "s1", "payload")
    new = address(port=8443)
    assert hub.answer(router, Decision("", fields=ADDRESS, address=new, query_id="q1"))
    decision = await asyncio.wait_for(asking, 1)
    assert decision == Decision(
        "s1", actor="r", fields=ADDRESS, address=new, query_id="q1", timed_out=False
    )
    assert hub.stats["answered"] == 1


async def test_unanswered_query_returns_no_change_after_the_timeout() -> None:
    hub = RouterHub()
    router = hub.subscribe("r")
    loop = asyncio.get_running_loop()
    started = loop.time()
    decision = await asyncio.wait_for(hub.ask("q1", "s1", None, within=SHORT), 1)
    waited = loop.time() - started
    assert decision == Decision("s1", actor="r", query_id="q1", timed_out=True)
    assert not decision.fields
    assert SHORT * 0.9 <= waited < 0.5
    assert router.open == {}, "the expired query is forgotten"
    assert hub.stats["timed_out"] == 1


async def test_query_uses_the_hubs_default_timeout() -> None:
    hub = RouterHub(timeout=SHORT)
    hub.subscribe("r")
    decision = await asyncio.wait_for(hub.ask("q1", "s1", None), 1)
    assert decision.timed_out


async def test_query_without_a_router_is_no_change_at_once() -> None:
    hub = RouterHub(timeout=5)
    decision = await asyncio.wait_for(hub.ask("q1", "s1", None), 0.5)
    assert decision == Decision("s1", query_id="q1")
    assert hub.stats["unrouted"] == 1


async def test_open_query_ends_as_no_change_at_once_when_its_router_leaves() -> None:
    hub = RouterHub(timeout=5)
    router = hub.subscribe("r")
    asking = asyncio.create_task(hub.ask("q1", "s1", None))
    await asyncio.wait_for(router.queries.get(), 1)
    hub.unsubscribe(router)
    decision = await asyncio.wait_for(asking, 0.5)
    assert decision == Decision("s1", query_id="q1")


async def test_query_to_a_router_with_a_full_queue_times_out_at_once() -> None:
    hub = RouterHub(timeout=5, queue_size=1)
    hub.subscribe("r")
    first = asyncio.create_task(hub.ask("q1", "s1", None))
    await asyncio.sleep(0)
    decision = await asyncio.wait_for(hub.ask("q2", "s2", None), 0.5)
    assert decision == Decision("s2", actor="r", query_id="q2", timed_out=True)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_answer_to_an_unknown_query_is_ignored() -> None:
    hub = RouterHub(timeout=5)
    router = hub.subscribe("r")
    asking = asyncio.create_task(hub.ask("q1", "s1", None))
    await asyncio.wait_for(router.queries.get(), 1)
    assert not hub.answer(router, Decision("", fields=ADDRESS, address=address(), query_id="nope"))
    assert hub.stats["late"] == 1
    assert not asking.done()
    assert hub.answer(router, Decision("", query_id="q1"))
    assert (await asyncio.wait_for(asking, 1)).fields == frozenset()


async def test_answer_after_the_timeout_is_ignored() -> None:
    hub = RouterHub()
    router = hub.subscribe("r")
    decision = await hub.ask("q1", "s1", None, within=SHORT)
    assert decision.timed_out
    assert not hub.answer(router, Decision("", fields=ADDRESS, address=address(), query_id="q1"))
    assert hub.stats["late"] == 1
    assert hub.stats["answered"] == 0


async def test_answer_from_another_router_is_ignored() -> None:
    hub = RouterHub(timeout=5)
    active, standby = hub.subscribe("a"), hub.subscribe("b")
    asking = asyncio.create_task(hub.ask("q1", "s1", None))
    await asyncio.wait_for(active.queries.get(), 1)
    assert not hub.answer(standby, Decision("", fields=ADDRESS, address=address(), query_id="q1"))
    assert hub.answer(active, Decision("", query_id="q1"))
    assert (await asyncio.wait_for(asking, 1)).actor == "a"


async def test_query_ids_are_unique() -> None:
    hub = RouterHub()
    ids = {hub.new_query_id() for _ in range(1000)}
    assert len(ids) == 1000


# -- pending changes ---------------------------------------------------------


async def test_pending_change_is_returned_until_settled() -> None:
    hub = RouterHub()
    change = Decision("s1", actor="op", fields=ADDRESS, address=address())
    assert not hub.has_pending
    hub.note_pending(change)
    assert hub.has_pending
    assert hub.pending("s1") == change
    assert hub.pending("s2") is None
    hub.settle("s1")
    assert hub.pending("s1") is None
    assert not hub.has_pending
    hub.settle("s1")  # settling twice is harmless


async def test_later_pending_change_replaces_the_earlier_one() -> None:
    hub = RouterHub()
    hub.note_pending(Decision("s1", actor="op", fields=ADDRESS, address=address(port=1)))
    latest = Decision("s1", actor="op", fields=VIA, via=via())
    hub.note_pending(latest)
    assert hub.pending("s1") == latest


async def test_pending_change_is_pushed_to_attached_feeds_and_replayed_to_new_ones() -> None:
    hub = RouterHub()
    hub.subscribe("r")
    early = hub.attach()
    change = Decision("s1", actor="op", fields=ADDRESS, address=address())
    hub.note_pending(change)
    assert drain(early) == ["r", change]
    late = hub.attach()
    assert drain(late) == ["r", change], "state first, then every pending change"


async def test_settled_change_is_not_replayed_to_new_feeds() -> None:
    hub = RouterHub()
    hub.note_pending(Decision("s1", actor="op", fields=ADDRESS, address=address()))
    hub.settle("s1")
    assert drain(hub.attach()) == [""]


async def test_drop_pending_removes_only_the_changes_it_is_told_are_stale() -> None:
    hub = RouterHub()
    for server_id in ("gone-1", "kept", "gone-2"):
        hub.note_pending(Decision(server_id, actor="op", fields=ADDRESS, address=address()))
    assert hub.drop_pending(lambda server_id: server_id.startswith("gone")) == 2
    assert hub.pending("kept") is not None
    assert hub.pending("gone-1") is None
    assert hub.pending("gone-2") is None
    assert [d.server_id for d in drain(hub.attach()) if isinstance(d, Decision)] == ["kept"]


# -- answer validation -------------------------------------------------------


def test_valid_answers_have_no_violations() -> None:
    assert answer_violations(frozenset(), None, None) == []
    assert answer_violations(ADDRESS, address(port=1), None) == []
    assert answer_violations(ADDRESS, address(port=65535), None) == []
    assert answer_violations(VIA, None, via(pb.SCHEME_HTTPS)) == []
    assert answer_violations(VIA, None, None) == [], "no via: connect directly"
    assert answer_violations(ADDRESS | VIA, address(), via()) == []


@pytest.mark.parametrize("port", [0, 65536, 70000])
def test_answer_with_a_port_out_of_range_is_refused(port: int) -> None:
    (problem,) = answer_violations(ADDRESS, address(port=port), None)
    assert problem == ("address.port", f"must be 1-65535, got {port}")


@pytest.mark.parametrize("given", [None, pb.Address(host="", port=443)])
def test_answer_naming_address_without_a_host_is_refused(given: pb.Address | None) -> None:
    (problem,) = answer_violations(ADDRESS, given, None)
    assert problem[0] == "address.host"
    assert "required" in problem[1]


@pytest.mark.parametrize("scheme", [pb.SCHEME_HTTP3, pb.SCHEME_TLS, pb.SCHEME_UNSPECIFIED, 99])
def test_answer_with_a_via_scheme_mitmproxy_cannot_use_is_refused(scheme: int) -> None:
    (problem,) = answer_violations(VIA, None, via(scheme))
    assert problem[0] == "via.scheme"
    assert "http or https" in problem[1]


@pytest.mark.parametrize(("host", "port"), [("", 3128), ("proxy.example", 0)])
def test_answer_with_an_incomplete_via_address_is_refused(host: str, port: int) -> None:
    (problem,) = answer_violations(VIA, None, via(host=host, port=port))
    assert problem[0] == "via.address"


def test_answer_with_an_unroutable_mask_path_is_refused() -> None:
    problems = answer_violations(frozenset({"sni", "address", "tls"}), address(), None)
    assert problems == [("update_mask", "only address and via can be routed, got ['sni', 'tls']")]


def test_every_violation_of_an_answer_is_reported() -> None:
    problems = answer_violations(
        frozenset({"address", "via", "alpn"}), address(port=0), via(pb.SCHEME_TCP, host="")
    )
    assert [field for field, _ in problems] == [
        "update_mask",
        "address.port",
        "via.scheme",
        "via.address",
    ]
