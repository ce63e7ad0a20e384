"""The coordinator serves on the loop its command runs it on (uvloop): grpc.aio, the etcd
client and the cluster view all work there, end to end (real etcd, real gRPC)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import uvloop

from kaiwo_gpu.coordinator.local.etcd import LocalEtcd
from kaiwo_gpu.coordinator.server import new_event_loop
from kaiwo_gpu.v1 import allocation_pb2
from tests.conftest import coordinator_running
from tests.harness import request


def test_allocate_release_and_renew_on_the_coordinators_loop(
    etcd: LocalEtcd, prefix: str, inventory: Path
) -> None:
    async def exercise() -> tuple[bool, str, int, str]:
        on_uvloop = isinstance(asyncio.get_running_loop(), uvloop.Loop)
        async with coordinator_running(etcd.endpoint, prefix, inventory) as running:
            api = running.api
            made = await api.Allocate(request("on-uvloop", fraction_millis=250, ttl_seconds=60))
            renewed = await api.KeepAlive(
                allocation_pb2.KeepAliveRequest(allocation_id=made.allocation.id)
            )
            released = await api.Release(
                allocation_pb2.ReleaseRequest(allocation_id=made.allocation.id)
            )
        return on_uvloop, made.allocation.node, renewed.ttl_seconds, released.allocation.id

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        on_uvloop, node, ttl_s, released_id = runner.run(exercise())
    assert on_uvloop
    assert node
    assert 0 < ttl_s <= 60
    assert released_id
