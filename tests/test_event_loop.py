"""The coordinator command serves on uvloop, and grpc.aio, the etcd client and the cluster
view all work there, end to end (real etcd, real gRPC, the real command).

In a process of its own: a uvloop loop in the test process leaves grpc.aio's poller bound
to it, and a later test's loop then drops an unclosed socket at a random moment."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import grpc

from kaiwo_gpu.coordinator.local.coordinator_process import CoordinatorProcess
from kaiwo_gpu.coordinator.local.etcd import LocalEtcd
from kaiwo_gpu.v1 import allocation_pb2, allocation_pb2_grpc
from tests.harness import request


async def test_allocate_release_and_renew_on_the_coordinators_loop(
    etcd: LocalEtcd, prefix: str, inventory: Path, tmp_path: Path
) -> None:
    process = CoordinatorProcess(etcd.endpoint, prefix, inventory, tmp_path / "coordinator.log")
    process.start()
    try:
        await process.wait_serving()
        async with grpc.aio.insecure_channel(process.address) as channel:
            api = allocation_pb2_grpc.AllocationServiceStub(channel)
            made = await api.Allocate(request("on-uvloop", fraction_millis=250, ttl_seconds=60))
            renewed = await api.KeepAlive(
                allocation_pb2.KeepAliveRequest(allocation_id=made.allocation.id)
            )
            released = await api.Release(
                allocation_pb2.ReleaseRequest(allocation_id=made.allocation.id)
            )
    finally:
        assert process.stop(signal.SIGTERM) == 0
    assert made.allocation.node
    assert 0 < renewed.ttl_seconds <= 60
    assert released.allocation.id == made.allocation.id
    serving = [
        json.loads(line)
        for line in process.log_path.read_text().splitlines()
        if line.startswith("{") and '"coordinator serving"' in line
    ]
    assert [entry["event_loop"] for entry in serving] == ["uvloop"]
