"""A request that is not the message its method takes is INVALID_ARGUMENT, not UNKNOWN.

gRPC decodes a request before the servicer sees it, and a decode failure comes back as
UNKNOWN "DecodeError", which a client cannot tell from a server bug. This interceptor
takes the decoding of every single-request method into the handler, so bytes that do not
parse end the call with INVALID_ARGUMENT naming the message it expected. Streams of
requests (an agent's Connect) are left to gRPC: their messages are decoded one by one as
they arrive, outside any handler code.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

Context = grpc.aio.ServicerContext[Any, Any]


class DecodeErrorsAreInvalidArgument(grpc.aio.ServerInterceptor):
    """Wraps each method's handler once and reuses the wrapper (gRPC asks for every call)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], Any]] = {}
        """method -> (the handler gRPC gave, the one that decodes in the handler)."""

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
        method = handler_call_details.method or ""
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]  # type: ignore[no-any-return]
        wrapped = _decoding(handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _decoding(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` with its request decoded inside it (streams of requests: as it is)."""
    parse = getattr(handler, "request_deserializer", None)
    if handler.request_streaming or parse is None:
        return handler
    expected = _message_name(parse)

    async def decoded(raw: bytes, context: Context) -> Any:
        try:
            return parse(raw)
        except DecodeError:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid {expected} (it does not decode)",
            )

    if handler.response_streaming:
        stream: Any = handler.unary_stream  # an async generator function in grpc.aio

        async def unary_stream(raw: bytes, context: Context) -> None:
            replies = stream(await decoded(raw, context), context)
            if hasattr(replies, "__aiter__"):  # a generator: its replies, written
                async for reply in replies:
                    await context.write(reply)
            else:  # a coroutine that writes its own replies
                await replies

        return handler._replace(request_deserializer=None, unary_stream=unary_stream)  # type: ignore[attr-defined, no-any-return]
    unary: Any = handler.unary_unary

    async def unary_unary(raw: bytes, context: Context) -> Any:
        return await unary(await decoded(raw, context), context)

    return handler._replace(request_deserializer=None, unary_unary=unary_unary)  # type: ignore[attr-defined, no-any-return]


def _message_name(parse: Callable[[bytes], Any]) -> str:
    message_class = getattr(parse, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request message"))
