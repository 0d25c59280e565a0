"""A real session: mitmdump with the addon feeds the sidecar, and every line
``connmeta watch -o ndjson`` prints for it validates against the committed
schema, with mitmproxy's values in it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from connmeta.export import ndjson
from tests.e2e.harness import Mitmdump, Origin, SidecarProcess, async_wait_for, get

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def _watch(target: str, sink: Path) -> subprocess.Popen[str]:
    with sink.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "connmeta", "watch", "-o", "ndjson", "--bookmarks",
             "--target", target],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip


def _stop(process: subprocess.Popen[str]) -> str:
    process.terminate()
    return process.communicate(timeout=10)[1]


async def test_every_line_of_a_real_session_validates_against_the_schema(
    sidecar: SidecarProcess, proxy: Mitmdump, origin_a: Origin, origin_tls: Origin, tmp_path: Path
) -> None:
    out = tmp_path / "watch.ndjson"
    watch = _watch(sidecar.target, out)
    try:
        assert await asyncio.to_thread(get, proxy.proxy, origin_a.url + "/n") == "A:/n"
        body = await asyncio.to_thread(get, proxy.proxy, origin_tls.url + "/t", proxy.ca)
        assert body == "S:/t"

        def lines() -> list[dict[str, Any]]:
            return [json.loads(line) for line in out.read_text().splitlines() if line]

        def closed_clients() -> int:
            return sum(
                1
                for line in lines()
                if line.get("connection", {}).get("metadata", {}).get("last_hook")
                == "HOOK_CLIENT_DISCONNECTED"
            )

        await async_wait_for(
            lambda: asyncio.sleep(0, closed_clients() >= 2), 15, "both clients closed"
        )
    finally:
        err = await asyncio.to_thread(_stop, watch)
    assert "Traceback" not in err, err
    schema = json.loads((ROOT / ndjson.SCHEMA_PATH).read_text())
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    seen = lines()
    for line in seen:
        errors = sorted(validator.iter_errors(line), key=str)
        assert not errors, f"{line}: {errors[0].message}"
    # mitmproxy's values came through: the TLS server's SNI and version.
    servers = [
        line["connection"]["server"]["connection"]
        for line in seen
        if "server" in line.get("connection", {})
    ]
    assert any(
        s.get("sni") == "localhost" and s.get("tls_version") == "TLS_VERSION_TLS_V1_3"
        for s in servers
    ), servers
