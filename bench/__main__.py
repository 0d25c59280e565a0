"""``python -m bench`` (or ``make bench``): every transport benchmark, connmeta and
bare grpcio side by side in one run, printed as a Markdown table for
bench/README.md. ``--quick`` runs smaller loads."""

from __future__ import annotations

import argparse
import asyncio

from bench.transport_bench import fan_out, ingest, unary_get


async def main(quick: bool) -> None:
    scale = 0.2 if quick else 1.0
    rows: list[tuple[str, str, str, str, str]] = []

    ours, bare = await ingest("connmeta", int(200 * scale)), await ingest("bare", int(200 * scale))
    rows.append(
        (
            "batched ingest (500/batch)",
            f"{ours.records_per_second:,.0f} records/s",
            f"{bare.records_per_second:,.0f} records/s",
            f"{ours.records_per_second / bare.records_per_second:.2f}",
            f"goal ≥ 300k/s and ≥ 0.6x; server CPU {ours.server_cpu_us_per_record:.2f} µs/record "
            f"(bare {bare.server_cpu_us_per_record:.2f})",
        )
    )
    for watchers, events, goal in ((10, 50_000, 50_000), (100, 10_000, 5_000)):
        events = int(events * scale)
        o, b = await fan_out("connmeta", watchers, events), await fan_out("bare", watchers, events)
        rows.append(
            (
                f"watch fan-out, {watchers} watchers",
                f"{o.events_per_second:,.0f} events/s",
                f"{b.events_per_second:,.0f} events/s",
                f"{o.events_per_second / b.events_per_second:.2f}",
                f"goal ≥ {goal:,}/s; lost {o.lost}; p50 {o.p50_ms:.1f} ms, p99 {o.p99_ms:.1f} ms; "
                f"server CPU {o.server_cpu_us_per_delivery:.2f} µs/delivery "
                f"(bare {b.server_cpu_us_per_delivery:.2f})",
            )
        )
    calls = int(3000 * scale)
    o_get, b_get = await unary_get("connmeta", calls), await unary_get("bare", calls)
    rows.append(
        (
            "unary GetConnection",
            f"{o_get:,.0f} calls/s",
            f"{b_get:,.0f} calls/s",
            f"{o_get / b_get:.2f}",
            "goal ≥ 0.85x a bare unary echo of the same message",
        )
    )
    print("| benchmark | connmeta | bare grpcio | ratio | notes |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    asyncio.run(main(parser.parse_args().quick))
