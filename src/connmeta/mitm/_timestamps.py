"""mitmproxy's float timestamps ↔ google.protobuf.Timestamp, exactly.

A float second count is converted with integer arithmetic on its exact binary
value, rounded to the nearest nanosecond (ties to even). Back, the integer
nanosecond count is divided once, and CPython's int / int is correctly
rounded. Where a double's spacing is above 1 ns (|t| >= 2**23 s, i.e. after
1970-04-08 or before 1969-09-25) float → Timestamp → float is therefore the
identity; nearer to the epoch it moves by at most half a nanosecond.

Non-finite floats and values outside Timestamp's range (0001-01-01 to
9999-12-31, UTC) have no Timestamp: both raise ValueError naming the field.
"""

from __future__ import annotations

from typing import Final

from google.protobuf.timestamp_pb2 import Timestamp

__all__ = ["fill_timestamp", "split_timestamp", "timestamp_to_float"]

_NS: Final = 1_000_000_000
_MIN_SECONDS: Final = -62_135_596_800  # 0001-01-01T00:00:00Z
_MAX_SECONDS: Final = 253_402_300_799  # 9999-12-31T23:59:59Z
_RANGE: Final = "0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z"


def fill_timestamp(msg: Timestamp, value: float, path: str) -> None:
    """Set ``msg`` (marking it present) to ``value`` seconds since the epoch."""
    msg.seconds, msg.nanos = split_timestamp(value, path)


def split_timestamp(value: float, path: str) -> tuple[int, int]:
    """``(seconds, nanos)`` of a Timestamp for ``value`` seconds since the epoch."""
    try:
        num, den = value.as_integer_ratio()
    except (OverflowError, ValueError):
        raise ValueError(
            f"{path}: {value!r} is not a finite number of seconds; a Timestamp cannot hold it"
        ) from None
    except AttributeError:
        raise ValueError(f"{path}: {value!r} is not a number of seconds") from None
    ns, rem = divmod(num * _NS, den)
    twice = 2 * rem
    if twice > den or (twice == den and ns & 1):
        ns += 1
    seconds, nanos = divmod(ns, _NS)
    if not _MIN_SECONDS <= seconds <= _MAX_SECONDS:
        raise ValueError(f"{path}: {value!r} is outside the range of a Timestamp ({_RANGE})")
    return seconds, nanos


def timestamp_to_float(msg: Timestamp, path: str) -> float:
    """Seconds since the epoch for ``msg``, which must be a valid Timestamp."""
    seconds, nanos = msg.seconds, msg.nanos
    if not 0 <= nanos < _NS:
        raise ValueError(f"{path}.nanos: {nanos} is outside 0-999999999")
    if not _MIN_SECONDS <= seconds <= _MAX_SECONDS:
        raise ValueError(
            f"{path}.seconds: {seconds} is outside the range of a Timestamp ({_RANGE})"
        )
    return (seconds * _NS + nanos) / _NS
