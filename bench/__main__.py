"""``python -m bench`` (or ``make bench``): every benchmark, one Markdown table.

Each module in ``SUITES`` exposes ``figures(quick) -> list[Figure]`` (see
``bench/_report.py``); every figure is measured beside its baseline in the
same run. ``python -m bench NAME ...`` runs only the named suites;
``--quick`` runs smaller loads (a smoke run, not figures to quote).
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time

from bench._report import HEADER, Figure

# Name -> module; run in this order (the cheap, noise-sensitive ones first).
SUITES: dict[str, str] = {
    "transport": "bench.transport_bench",
    "watch": "bench.watch_bench",
    "routing": "bench.routing_bench",
    "scale": "bench.scale_bench",
    "proxy": "bench.proxy_bench",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("suites", nargs="*", metavar="SUITE", help=", ".join(SUITES))
    parser.add_argument("--quick", action="store_true", help="small loads: a smoke run")
    args = parser.parse_args(argv)
    names = args.suites or list(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
    rows: list[Figure] = []
    started = time.monotonic()
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.extend(importlib.import_module(SUITES[name]).figures(args.quick))
    print(
        f"{time.strftime('%Y-%m-%d')}, Python {platform.python_version()}, "
        f"{len(rows)} figures in {time.monotonic() - started:.0f} s"
        + (" (--quick: smoke run, do not quote)" if args.quick else "")
    )
    print()
    print(HEADER)
    for figure in rows:
        print(figure.row())


if __name__ == "__main__":
    main()
