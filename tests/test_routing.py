"""RouterHub without gRPC: who decides, what a query returns and when, and
which pending changes (kept by the store) a proxy's stream is handed."""

from __future__ import annotations

import asyncio

import pytest

from connmeta.routing import AlreadySubscribed, Decision, ProxyFeed, RouterHub
from connmeta.store import Store
from connmeta.v1 import connection_pb2 as pb
from tests.snapshots import CLOSED, FakeClock, server

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


@pytest.mark.parametrize("name", ["", "x" * 129, "new\nline"])
async def test_empty_overlong_or_unprintable_router_name_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=r"required|longer than 128 bytes|printable ASCII"):
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
    store = _store_with_closed_server("proxy-a")
    hub = RouterHub(store)
    feed = hub.attach()
    hub.identify(feed, "proxy-a")
    drain(feed)
    hub.detach(feed)
    hub.subscribe("a")
    store.update_server("s1", address=address(), via=None, mask=ADDRESS, actor="op")
    assert drain(feed) == []


# -- queries ---------------------------------------------------------------


async def test_query_answered_in_time_returns_the_routers_decision() -> None:
    hub = RouterHub(timeout=5)
    router = hub.subscribe("r")
    asking = asyncio.create_task(hub.ask("q1", "s1", "payload"))
    query = await asyncio.wait_for(router.queries.get(), 1)
    assert query is not None
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


def _store_with_closed_server(proxy: str, server_id: str = "s1") -> Store:
    store = Store(clock=FakeClock())
    store.apply([server(server_id, state=CLOSED, hook=pb.HOOK_SERVER_CONNECT)], proxy=proxy)
    return store


async def test_new_pending_change_goes_to_the_feeds_of_the_proxy_that_holds_the_server() -> None:
    store = _store_with_closed_server("proxy-a")
    hub = RouterHub(store)
    a, b, unnamed = hub.attach(), hub.attach(), hub.attach()
    hub.identify(a, "proxy-a")
    hub.identify(b, "proxy-b")
    store.update_server("s1", address=address(), via=None, mask=ADDRESS, actor="op")
    (decision,) = [d for d in drain(a) if isinstance(d, Decision)]
    assert (decision.server_id, decision.actor, decision.fields) == ("s1", "op", ADDRESS)
    assert decision.address == address()
    assert decision.query_id == "", "an unasked change"
    assert [d for d in drain(b) if isinstance(d, Decision)] == []
    assert [d for d in drain(unnamed) if isinstance(d, Decision)] == []


async def test_stream_identified_later_is_handed_its_proxys_pending_changes() -> None:
    store = _store_with_closed_server("proxy-a")
    store.update_server("s1", address=address(), via=None, mask=ADDRESS, actor="op")
    hub = RouterHub(store)
    feed = hub.attach()
    assert [d.server_id for d in hub.identify(feed, "proxy-a")] == ["s1"]
    assert hub.identify(hub.attach(), "proxy-b") == []


async def test_pending_change_answering_a_query_is_not_sent_again_unasked() -> None:
    store = _store_with_closed_server("proxy-a")
    hub = RouterHub(store)
    feed = hub.attach()
    hub.identify(feed, "proxy-a")
    store.update_server(
        "s1", address=address(), via=None, mask=ADDRESS, actor="router", query_id="q-1"
    )
    assert [d for d in drain(feed) if isinstance(d, Decision)] == []


async def test_report_that_keeps_a_pending_change_does_not_send_it_again() -> None:
    store = _store_with_closed_server("proxy-a")
    hub = RouterHub(store)
    feed = hub.attach()
    hub.identify(feed, "proxy-a")
    store.update_server("s1", address=address(), via=None, mask=ADDRESS, actor="op")
    drain(feed)
    store.apply([server("s1", state=CLOSED, hook=pb.HOOK_RESYNC, sni="x")], proxy="proxy-a")
    record = store.get("s1")
    assert record is not None
    assert record.has_pending
    assert drain(feed) == []
