"""Counts, times and traces every RPC the coordinator's server completes: an interceptor, so
no servicer has to remember to.

Each call is counted by method and status code when it ends; unary calls are timed (a
stream's duration is its life, not a latency); and, with tracing on, each call is a server
span that continues the caller's W3C context from its metadata, so the work it causes
(decisions, etcd transactions) joins the caller's trace.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from kaiwo_gpu.common import tracing
from kaiwo_gpu.coordinator.instruments import Instruments

Context = grpc.aio.ServicerContext[Any, Any]
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
"""Counted, never traced: a probe's health check every few seconds would be a trace each."""


def _code_of(context: Context, error: BaseException | None) -> str:
    """The status a finished call ends with: what the handler set (an abort sets it), else
    OK, or CANCELLED / UNKNOWN for a call cut short by the client or a bug."""
    code: grpc.StatusCode | None = context.code()  # None until the handler sets one
    if code is not None:
        return code.name
    if error is None:
        return "OK"
    return "CANCELLED" if context.cancelled() else "UNKNOWN"


class RpcObserver(grpc.aio.ServerInterceptor):
    """Wraps each method's handler once, on its first call, and reuses the wrapper: gRPC asks
    the interceptor for every call, and building the wrapper each time cost every RPC."""

    def __init__(self, instruments: Instruments) -> None:
        self._handled = instruments.grpc_handled
        self._seconds = instruments.grpc_seconds
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], Any]] = {}
        """method -> (the handler gRPC gave, its observed wrapper)."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        full = (handler_call_details.method or "").strip("/")
        known = self._wrapped.get(full)
        if known is not None and known[0] is handler:
            return known[1]  # type: ignore[no-any-return]
        wrapped = self._observed(full, handler)
        self._wrapped[full] = (handler, wrapped)
        return wrapped

    def _observed(
        self, full: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        service, _, method = full.rpartition("/")
        kind = next(
            (k for k in ("unary_unary", "unary_stream", "stream_stream")
             if getattr(handler, k) is not None),
            None,
        )  # fmt: skip
        if kind is None:  # stream_unary: none of ours
            return handler
        behaviour: Any = getattr(handler, kind)
        unary = kind == "unary_unary"
        traced = service not in UNTRACED_SERVICES
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        # The label children are looked up once: `labels()` per call was a lock and a dict.
        seconds = self._seconds.labels(service, method) if unary else None
        handled = self._handled

        async def observed(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            error: BaseException | None = None
            tracing_on = traced and tracing.enabled()
            parent = tracing.extracted(context.invocation_metadata()) if tracing_on else None
            observing = (
                tracing.span(full, kind="server", parent=parent, attributes=attributes)
                if tracing_on
                else contextlib.nullcontext()
            )
            with observing as span:
                try:
                    if unary:
                        return await behaviour(request, context)
                    replies = behaviour(request, context)
                    if hasattr(replies, "__aiter__"):  # a generator: its replies, written
                        async for reply in replies:
                            await context.write(reply)
                    else:  # a coroutine that writes its own replies
                        await replies
                    return None
                except BaseException as raised:
                    error = raised
                    raise
                finally:
                    code = _code_of(context, error)
                    if seconds is not None:
                        seconds.observe(time.perf_counter() - started)
                    handled.labels(service, method, code).inc()
                    if code != "OK":
                        tracing.record_error(span, code, context.details() or "")
                    else:
                        tracing.set_attributes(span, {"rpc.grpc.status_code": code})

        return handler._replace(**{kind: observed})  # type: ignore[attr-defined, no-any-return]
