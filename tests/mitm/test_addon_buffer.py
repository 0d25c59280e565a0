"""The addon's outage buffer, without processes: what it keeps, in which
order, and what it drops (the e2e test in tests/e2e/test_outage.py proves the
replay against a real mitmdump and sidecar)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from mitmproxy import ctx, exceptions
from mitmproxy.connection import Client
from mitmproxy.options import Options

from connmeta.mitm.addon import ConnmetaAddon, _footprint, _snapshot
from connmeta.v1 import connection_pb2 as pb


def snapshot(n: int, *, sni: str = "") -> bytes:
    client = Client(
        peername=("127.0.0.1", 40000 + n), sockname=("127.0.0.1", 8080), timestamp_start=1.7e9
    )
    client.sni = sni or None
    return _snapshot(client, pb.HOOK_CLIENT_CONNECTED)


def kept(addon: ConnmetaAddon) -> list[bytes]:
    return [snap for snap, _ in addon._buffer]


class AddonOptions:
    """The addon's options, as mitmproxy would hold them (not
    mitmproxy.test.taddons: it imports a module that warns on import)."""

    def __init__(self, addon: ConnmetaAddon) -> None:
        self.addon = addon
        self.options = Options()
        addon.load(self)  # type: ignore[arg-type]  # the one Loader method load() uses

    def add_option(self, name: str, typespec: type, default: Any, help: str) -> None:
        self.options.add_option(name, typespec, default, help)

    def configure(self, **values: Any) -> None:
        self.options.update(**values)  # type: ignore[no-untyped-call]
        self.addon.configure(set(values))


@contextlib.contextmanager
def running(addon: ConnmetaAddon) -> Iterator[AddonOptions]:
    """``addon`` with its options in mitmproxy's ``ctx``."""
    saved = getattr(ctx, "options", None)
    context = AddonOptions(addon)
    ctx.options = context.options
    try:
        yield context
    finally:
        ctx.options = saved  # type: ignore[assignment]


async def test_beyond_the_byte_bound_the_oldest_snapshots_are_dropped_and_counted() -> None:
    addon = ConnmetaAddon()
    # Sizes differ, so the bound is in bytes, not a count in disguise.
    snaps = [snapshot(n, sni="x" * (n * 300)) for n in range(10)]
    with running(addon) as options:
        limit = sum(_footprint(s) for s in snaps[-3:])
        options.configure(connmeta_buffer_bytes=limit)
        for snap in snaps:
            addon._enqueue(snap)
        assert kept(addon) == snaps[-3:]
        assert addon._buffer_bytes == limit
        assert addon.stats["dropped"] == 7
        assert addon.stats["buffered"] == 10


async def test_shrinking_the_buffer_drops_the_oldest_at_once() -> None:
    addon = ConnmetaAddon()
    snaps = [snapshot(n) for n in range(6)]
    with running(addon) as options:
        for snap in snaps:
            addon._enqueue(snap)
        options.configure(connmeta_buffer_size=2)
        assert kept(addon) == snaps[-2:]
        assert addon.stats["dropped"] == 4
        assert addon._buffer_bytes == sum(_footprint(s) for s in snaps[-2:])


async def test_a_lost_stream_puts_its_unacknowledged_then_its_queued_ahead_of_the_buffer() -> None:
    addon = ConnmetaAddon()
    a, b, c, d, e = (snapshot(n) for n in range(5))
    with running(addon):
        addon._enqueue(e)  # buffered: the stream was already gone
        addon._hold_unacked(6, [a, b], 100)  # written, never acknowledged
        addon._hold_unacked(7, [c], 100)
        addon._queue.append(d)  # never written
        addon._disconnected()
        assert kept(addon) == [a, b, c, d, e]
        assert not addon._unacked
        assert not addon._queue


@pytest.mark.parametrize("acknowledged", [False, True])
async def test_unacknowledged_batches_let_go_beyond_the_bound_count_as_dropped_unless_acked(
    acknowledged: bool,
) -> None:
    addon = ConnmetaAddon()
    a, b, c, d = (snapshot(n) for n in range(4))
    with running(addon) as options:
        options.configure(connmeta_buffer_size=3)
        addon._hold_unacked(1, [a, b], 100)
        addon._hold_unacked(2, [c, d], 100)  # 4 > 3: batch 1 is let go
        if acknowledged:
            addon._acknowledged(1)  # applied after all: nothing of it was lost
        addon._disconnected()
        assert kept(addon) == [c, d]
        assert addon.stats["dropped"] == (0 if acknowledged else 2)


async def test_a_replay_takes_the_oldest_first_and_counts_them() -> None:
    addon = ConnmetaAddon()
    snaps = [snapshot(n) for n in range(3)]
    with running(addon):
        for snap in snaps:
            addon._enqueue(snap)
        assert addon._take_buffered() == snaps
        assert addon._buffer_bytes == 0
        assert addon.stats["replayed"] == 3


@pytest.mark.parametrize("option", ["connmeta_buffer_size", "connmeta_buffer_bytes"])
async def test_a_negative_bound_is_refused(option: str) -> None:
    addon = ConnmetaAddon()
    with running(addon) as options, pytest.raises(exceptions.OptionsError):
        options.configure(**{option: -1})
