"""How ``connmeta serve`` writes its log: text for people, or JSON lines for pipelines.

``--log-format json`` writes one JSON object per line::

    {"time": "2026-01-01T00:00:00.123456Z", "level": "INFO", "logger": "connmeta.audit",
     "message": "update accepted principal=unix method=… connection_id=…",
     "principal": "unix", "method": "/connmeta.v1.ConnectionService/UpdateServerConnection",
     "action": "update accepted", "connection_id": "…", "fields": "address", "actor": "bob"}

``time`` (RFC 3339, UTC), ``level``, ``logger`` and ``message`` are on every
line; whatever a call passes in ``extra`` follows as fields of their own (the
audit log's principal, method and ids), and ``exception`` holds a traceback.
JSON escapes control characters itself, so a hostile value cannot forge a line;
the text format escapes them in the message (``validation.escape``).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Final

__all__ = ["LOG_FORMATS", "JsonFormatter", "configure"]

LOG_FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(message)s"

# What every LogRecord has; anything else on a record came from ``extra``.
_STANDARD: Final = frozenset(
    {*logging.LogRecord("", 0, "", 0, "", (), None).__dict__, "message", "asctime", "taskName"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="microseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            # An extra never replaces one of the four fields every line has.
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra that JSON cannot hold is written as its text,
        # not dropped with the whole line.
        return json.dumps(line, ensure_ascii=True, default=str)


def configure(log_format: str, level: str) -> None:
    """Send the root logger to stderr in ``log_format`` ("text" or "json")."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"--log-format {log_format!r}: expected one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler], force=True)
