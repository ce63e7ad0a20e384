"""The Python client library: blocking and asyncio clients of the coordinator's gRPC API.

`Client` and `AsyncClient` call the allocation service, retry what is safe to retry and
raise the `KaiwoGpuError` tree; `allocation(...)` holds a share with a renewed lease.
"""

from kaiwo_gpu.client.aio import AsyncClient, AsyncHeldAllocation
from kaiwo_gpu.client.blocking import Client, HeldAllocation
from kaiwo_gpu.client.retries import RetryPolicy
from kaiwo_gpu.client.support import ClientSettings

__all__ = [
    "AsyncClient",
    "AsyncHeldAllocation",
    "Client",
    "ClientSettings",
    "HeldAllocation",
    "RetryPolicy",
]
