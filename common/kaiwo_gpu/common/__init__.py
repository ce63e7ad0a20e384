"""What clients of kaiwo-gpu may use: the clients, the request model, units, pods and errors.

The clients (grpc) and the pod reader (yaml) load on first use, so the agent, the
coordinator and the engine, which import the model through this package, do not pay for them.
"""

import importlib
from typing import TYPE_CHECKING

from kaiwo_gpu.common.annotations import AmdGpuUnit, RequestShape, parse_gpu_annotations
from kaiwo_gpu.common.errors import (
    ConflictError,
    InvalidArgumentError,
    KaiwoGpuError,
    NoCapacityError,
    NotFoundError,
    UnavailableError,
    error_from_status,
)
from kaiwo_gpu.common.models import AllocationRequest, Health, Isolation, Selector, parse_isolation
from kaiwo_gpu.common.request_builder import build_request
from kaiwo_gpu.common.units import (
    MILLIS_PER_GPU,
    format_fraction,
    parse_fraction_millis,
    parse_memory_mib,
)

if TYPE_CHECKING:
    from kaiwo_gpu.common.aio_client import AsyncClient, AsyncHeldAllocation
    from kaiwo_gpu.common.client import Client, HeldAllocation
    from kaiwo_gpu.common.client_support import ClientSettings, RetryPolicy
    from kaiwo_gpu.common.pods import load_manifest, request_from_pod

_ON_FIRST_USE = {
    "AsyncClient": "aio_client",
    "AsyncHeldAllocation": "aio_client",
    "Client": "client",
    "HeldAllocation": "client",
    "ClientSettings": "client_support",
    "RetryPolicy": "client_support",
    "load_manifest": "pods",
    "request_from_pod": "pods",
}


def __getattr__(name: str) -> object:
    module = _ON_FIRST_USE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_ON_FIRST_USE})


__all__ = [
    "MILLIS_PER_GPU",
    "AllocationRequest",
    "AmdGpuUnit",
    "AsyncClient",
    "AsyncHeldAllocation",
    "Client",
    "ClientSettings",
    "ConflictError",
    "Health",
    "HeldAllocation",
    "InvalidArgumentError",
    "Isolation",
    "KaiwoGpuError",
    "NoCapacityError",
    "NotFoundError",
    "RequestShape",
    "RetryPolicy",
    "Selector",
    "UnavailableError",
    "build_request",
    "error_from_status",
    "format_fraction",
    "load_manifest",
    "parse_fraction_millis",
    "parse_gpu_annotations",
    "parse_isolation",
    "parse_memory_mib",
    "request_from_pod",
]
