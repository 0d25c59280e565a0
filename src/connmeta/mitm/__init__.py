"""mitmproxy's connection objects as connmeta.v1 messages, and back.

Needs the ``mitmproxy`` extra (``pip install connmeta[mitmproxy]``); nothing
else in connmeta imports mitmproxy.

    >>> msg = to_proto(flow.server_conn, describe_certificates=False)
    >>> server = from_proto(msg)   # same class, state and get_state()
"""

from connmeta.mitm._convert import from_proto, to_proto

__all__ = ["from_proto", "to_proto"]
