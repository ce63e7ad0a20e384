"""The coordinator's server interceptors wrap each method's handler once and reuse the
wrapper, and the reused wrapper still counts, times and decodes every call (pure: a fake
continuation and context, no server)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from kaiwo_gpu.coordinator.api.decode_errors import DecodeErrorsAreInvalidArgument
from kaiwo_gpu.coordinator.api.rpc_observer import RpcObserver
from kaiwo_gpu.coordinator.instruments import Instruments
from kaiwo_gpu.v1 import allocation_pb2

METHOD = "/kaiwo_gpu.v1.AllocationService/GetAllocation"


class Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


class Aborted(Exception):
    pass


class Context:
    """What the interceptors read of a call's context."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def code(self) -> grpc.StatusCode | None:
        return self.aborted[0] if self.aborted else None

    def details(self) -> str:
        return self.aborted[1] if self.aborted else ""

    def cancelled(self) -> bool:
        return False

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted(details)


async def _answer(
    request: allocation_pb2.GetAllocationRequest, context: Any
) -> allocation_pb2.GetAllocationResponse:
    response = allocation_pb2.GetAllocationResponse()
    response.allocation.id = request.allocation_id
    return response


def _handler() -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.unary_unary_rpc_method_handler(
        _answer,
        request_deserializer=allocation_pb2.GetAllocationRequest.FromString,
        response_serializer=allocation_pb2.GetAllocationResponse.SerializeToString,
    )


def _continuation(handler: grpc.RpcMethodHandler[Any, Any]) -> Any:
    async def continuation(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
        return handler

    return continuation


async def _wrapped(interceptor: grpc.aio.ServerInterceptor, handler: Any) -> Any:
    """What `interceptor` hands gRPC for a call of METHOD whose handler is `handler`."""
    return await interceptor.intercept_service(_continuation(handler), Details(METHOD))


def _context() -> Any:
    """A fake context, typed as the real one the wrappers take."""
    return Context()


def _handled(instruments: Instruments, code: str) -> float:
    service, _, method = METHOD.strip("/").rpartition("/")
    return instruments.grpc_handled.labels(service, method, code)._value.get()  # type: ignore[no-any-return]


async def test_the_observer_wraps_a_method_once_and_counts_every_call() -> None:
    instruments = Instruments()
    observer = RpcObserver(instruments)
    handler = _handler()
    first = await _wrapped(observer, handler)
    again = await _wrapped(observer, handler)
    assert first is not None
    assert first is again
    assert first is not handler
    request = allocation_pb2.GetAllocationRequest(allocation_id="a" * 32)
    for _ in range(3):
        reply = await first.unary_unary(request, _context())
        assert reply.allocation.id == "a" * 32
    assert _handled(instruments, "OK") == 3
    service, _, method = METHOD.strip("/").rpartition("/")
    assert instruments.grpc_seconds.labels(service, method)._sum.get() > 0


async def test_the_observer_wraps_again_when_the_handler_changes() -> None:
    observer = RpcObserver(Instruments())
    first = await _wrapped(observer, _handler())
    other = await _wrapped(observer, _handler())
    assert first is not None
    assert other is not None
    assert first is not other


async def test_a_reused_decoding_wrapper_still_refuses_bytes_that_do_not_decode() -> None:
    interceptor = DecodeErrorsAreInvalidArgument()
    handler = _handler()
    first = await _wrapped(interceptor, handler)
    again = await _wrapped(interceptor, handler)
    assert first is not None
    assert first is again
    assert first.request_deserializer is None  # decoded inside the handler
    good = allocation_pb2.GetAllocationRequest(allocation_id="b" * 32).SerializeToString()
    reply = await first.unary_unary(good, _context())
    assert reply.allocation.id == "b" * 32
    context: Any = Context()
    with pytest.raises(Aborted):
        await first.unary_unary(b"\xff\xff\xff", context)
    assert context.aborted is not None
    assert context.aborted[0] is grpc.StatusCode.INVALID_ARGUMENT
    assert "kaiwo_gpu.v1.GetAllocationRequest" in context.aborted[1]
