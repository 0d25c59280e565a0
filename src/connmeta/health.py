"""``grpc.health.v1.Health`` with every method of the protocol, List included.

grpcio-health-checking's aio servicer implements Check and Watch only; its
List is the generated stub's, which answers UNIMPLEMENTED by raising, so
every ``grpcurl ... grpc.health.v1.Health/List`` logged a traceback. This
subclass keeps its own copy of the statuses through the public ``set`` and
``enter_graceful_shutdown`` and answers List from it.
"""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer as _HealthServicer

__all__ = ["HealthServicer"]

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNTYPED: Any = health_pb2  # its typeshed stubs predate List's messages


class HealthServicer(_HealthServicer):
    """Check, Watch and List; statuses set as with the library's servicer."""

    def __init__(self) -> None:
        super().__init__()
        # The library's own starting point: the server ("") is SERVING.
        self._statuses: dict[str, int] = {"": _SERVING}
        self._frozen = False

    async def set(self, service: str, status: int) -> None:
        await super().set(service, status)
        if not self._frozen:  # the library ignores sets after a graceful shutdown began
            self._statuses[service] = status

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        self._frozen = True
        self._statuses = dict.fromkeys(self._statuses, _NOT_SERVING)

    async def List(self, request: Any, context: Any) -> Any:
        """Every service's status; a handful here, far from any size limit."""
        return _UNTYPED.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._statuses.items()
            }
        )
