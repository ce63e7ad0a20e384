"""Counts every RPC the coordinator's server completes, by method and status code, and times
the unary ones: an interceptor, so no servicer has to remember to.

A streaming call (Watch, an agent's Connect) is counted when it ends; its duration is the
stream's life, not a latency, so it is not timed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from kaiwo_gpu.coordinator.instruments import Instruments

Context = grpc.aio.ServicerContext[Any, Any]


def _code_of(context: Context, error: BaseException | None) -> str:
    """The status a finished call ends with: what the handler set (an abort sets it), else
    OK, or CANCELLED / UNKNOWN for a call cut short by the client or a bug."""
    code: grpc.StatusCode | None = context.code()  # None until the handler sets one
    if code is not None:
        return code.name
    if error is None:
        return "OK"
    return "CANCELLED" if context.cancelled() else "UNKNOWN"


class RpcMetrics(grpc.aio.ServerInterceptor):
    def __init__(self, instruments: Instruments) -> None:
        self._handled = instruments.grpc_handled
        self._seconds = instruments.grpc_seconds

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
        full = handler_call_details.method or ""
        service, _, method = full.strip("/").rpartition("/")
        handled = self._handled
        seconds = self._seconds

        if handler.unary_unary is not None:
            unary: Any = handler.unary_unary

            async def unary_unary(request: Any, context: Context) -> Any:
                started = time.perf_counter()
                error: BaseException | None = None
                try:
                    return await unary(request, context)
                except BaseException as raised:
                    error = raised
                    raise
                finally:
                    seconds.labels(service, method).observe(time.perf_counter() - started)
                    handled.labels(service, method, _code_of(context, error)).inc()

            return handler._replace(unary_unary=unary_unary)  # type: ignore[attr-defined, no-any-return]

        kind = "unary_stream" if handler.unary_stream is not None else "stream_stream"
        behaviour: Any = getattr(handler, kind)
        if behaviour is None:  # stream_unary: none of ours
            return handler

        async def streaming(request: Any, context: Context) -> None:
            error: BaseException | None = None
            try:
                replies = behaviour(request, context)
                if hasattr(replies, "__aiter__"):  # a generator: its replies, written
                    async for reply in replies:
                        await context.write(reply)
                else:  # a coroutine that writes its own replies
                    await replies
            except BaseException as raised:
                error = raised
                raise
            finally:
                handled.labels(service, method, _code_of(context, error)).inc()

        return handler._replace(**{kind: streaming})  # type: ignore[attr-defined, no-any-return]
