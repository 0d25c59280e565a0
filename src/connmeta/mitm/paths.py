"""Where the mitmproxy addon lives, for ``mitmdump -s "$(connmeta addon-path)"``.

Kept apart from the addon so that the CLI can answer without importing
mitmproxy (or gRPC's aio machinery) at all.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["addon_path"]


def addon_path() -> str:
    """The absolute path of ``connmeta/mitm/addon.py`` in this installation."""
    return str(Path(__file__).resolve().with_name("addon.py"))
