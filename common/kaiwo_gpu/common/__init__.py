"""What every part of kaiwo-gpu shares: the request model, units, annotations and errors.

A leaf without grpc, so the agent, the coordinator and the engine import it for free. The
gRPC clients live in `kaiwo_gpu.client`, the pod reader (yaml) in `kaiwo_gpu.common.pods`.
"""

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

__all__ = [
    "MILLIS_PER_GPU",
    "AllocationRequest",
    "AmdGpuUnit",
    "ConflictError",
    "Health",
    "InvalidArgumentError",
    "Isolation",
    "KaiwoGpuError",
    "NoCapacityError",
    "NotFoundError",
    "RequestShape",
    "Selector",
    "UnavailableError",
    "build_request",
    "error_from_status",
    "format_fraction",
    "parse_fraction_millis",
    "parse_gpu_annotations",
    "parse_isolation",
    "parse_memory_mib",
]
