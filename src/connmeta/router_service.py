"""RouterService: routers subscribe, receive route queries and answer them.

Protobuf in, a call on :class:`connmeta.routing.RouterHub`, protobuf or a rich
error out. The queries come from the report streams (``report_service``),
which ask the hub when a proxy reports a server connect.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Final

import grpc

from connmeta import auth
from connmeta.errors import abort, internal, invalid_argument, rich_status
from connmeta.routing import AlreadySubscribed, Decision, Router, RouterHub
from connmeta.service import Context, Undecodable, cancel, decoder
from connmeta.v1 import router_service_pb2 as rt
from connmeta.validation import Violations, change_violations, escape, id_problem

__all__ = ["ROUTER_SERVICE", "RouterServicer", "handler"]

log = logging.getLogger("connmeta.router_service")

ROUTER_SERVICE: Final = rt.DESCRIPTOR.services_by_name["RouterService"].full_name


def answer_violations(request: rt.RouteRequest | Undecodable) -> Violations:
    """What is wrong with a message that should carry an answer."""
    if isinstance(request, Undecodable):
        return [(request.type_name, f"not a valid connmeta.v1.RouteRequest: {request.error}")]
    if request.WhichOneof("message") != "answer":
        return [("message", "only answers may follow subscribe")]
    answer = request.answer
    out = change_violations(
        answer.update_mask.paths,
        answer.address if answer.HasField("address") else None,
        answer.via if answer.HasField("via") else None,
        mask_required=False,
        prefix="answer.",
    )
    problem = id_problem(answer.query_id)
    if problem:
        out.append(("answer.query_id", problem))
    return out


class RouterServicer:
    """connmeta.v1.RouterService over the hub."""

    def __init__(self, routers: RouterHub) -> None:
        self._routers = routers

    async def Route(
        self, requests: AsyncIterator[rt.RouteRequest | Undecodable], context: Context
    ) -> AsyncIterator[rt.RouteResponse]:
        first = await anext(requests, None)
        if isinstance(first, Undecodable):
            await abort(context, first.status())
        if first is None or first.WhichOneof("message") != "subscribe":
            await abort(
                context, invalid_argument([("message", "the first message must be subscribe")])
            )
        try:
            router = self._routers.subscribe(first.subscribe.name, auth.principal())
        except AlreadySubscribed as error:
            await abort(
                context,
                rich_status(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"{error}: use another name, or wait until it unsubscribes",
                    "ROUTER_ALREADY_SUBSCRIBED",
                    {"name": error.name},
                ),
            )
        except ValueError as error:
            await abort(context, invalid_argument([("subscribe.name", str(error))]))
        log.info("router %s subscribed", escape(router.name))
        problems: Violations = []
        reader = asyncio.create_task(self._read(router, requests, problems))
        # Once the router's side ends it answers nothing more: it leaves at
        # once, which also ends its queue (None) and so the loop below.
        reader.add_done_callback(lambda _: self._routers.unsubscribe(router))
        try:
            active = self._routers.active
            yield rt.RouteResponse(
                subscribed=rt.RouteSubscribed(
                    active=active is router, active_router=active.name if active else ""
                )
            )
            # A standby is told when it takes over, also when that happened
            # while the answer above was being written (the generator resumes
            # only once it is): decided by what that answer said, not by
            # whether it is active by now.
            if active is not router:
                if not router.activated.is_set():
                    await self._until(router.activated.wait(), reader)
                if not router.left:
                    yield rt.RouteResponse(
                        subscribed=rt.RouteSubscribed(active=True, active_router=router.name)
                    )
            # One await per query, no task: a query's way out is on every
            # held connect's path (queued -> written 83 -> 44 µs p50, against
            # a task and asyncio.wait per query; marks in the sidecar).
            queries = router.queries
            while (query := await queries.get()) is not None:
                if not query.future.done():
                    assert isinstance(query.payload, rt.RouteQuery)
                    yield rt.RouteResponse(query=query.payload)
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                log.error("router %s: reading its stream failed", escape(router.name))
                await abort(context, internal())
            if problems:
                await abort(context, invalid_argument(problems))
        finally:
            self._routers.unsubscribe(router)
            log.info("router %s unsubscribed", escape(router.name))
            await cancel(reader)

    @staticmethod
    async def _until(waiting: Any, reader: asyncio.Task[None]) -> Any:
        """Await ``waiting`` unless the router's side of the stream ends first
        (a standby waiting to take over)."""
        task = asyncio.ensure_future(waiting)
        try:
            await asyncio.wait({task, reader}, return_when=asyncio.FIRST_COMPLETED)
            return task.result() if task.done() else None
        finally:
            # Also when the RPC itself is cancelled while waiting here.
            await cancel(task)

    async def _read(
        self,
        router: Router,
        requests: AsyncIterator[rt.RouteRequest | Undecodable],
        problems: Violations,
    ) -> None:
        async for request in requests:
            violations = answer_violations(request)
            if violations:
                problems.extend(violations)
                return
            assert not isinstance(request, Undecodable)
            answer = request.answer
            self._routers.answer(
                router,
                Decision(
                    "",
                    fields=frozenset(answer.update_mask.paths),
                    address=answer.address if answer.HasField("address") else None,
                    via=answer.via if answer.HasField("via") else None,
                    query_id=answer.query_id,
                ),
            )


def handler(routers: RouterHub) -> grpc.GenericRpcHandler:
    """RouterService's handler."""
    servicer = RouterServicer(routers)
    return grpc.method_handlers_generic_handler(
        ROUTER_SERVICE,
        {
            "Route": grpc.stream_stream_rpc_method_handler(
                servicer.Route,
                request_deserializer=decoder(rt.RouteRequest),
                response_serializer=rt.RouteResponse.SerializeToString,
            )
        },
    )
