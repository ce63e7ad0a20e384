"""No over-commit with two coordinator processes, and recovery from coordinator and etcd restarts.

Every check ends with an audit that reads etcd directly, not through a coordinator.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kaiwo_gpu.coordinator.local.coordinator_process import CoordinatorProcess
from kaiwo_gpu.coordinator.local.etcd import LocalEtcd
from kaiwo_gpu.v1 import allocation_pb2, allocation_pb2_grpc
from tests.conftest import coordinator_running
from tests.harness import audit_etcd, audit_history, request
from tests.load import LoadResult, run_client

if TYPE_CHECKING:
    from kaiwo_gpu.v1.allocation_pb2_grpc import AllocationServiceAsyncStub

pytestmark = pytest.mark.integration


async def _list_ids(api: AllocationServiceAsyncStub) -> set[str]:
    reply = await api.ListAllocations(allocation_pb2.ListAllocationsRequest(page_size=5000))
    return {a.id for a in reply.allocations}


@pytest.mark.timeout(240)
async def test_two_coordinator_processes_32_clients_never_over_commit(
    etcd: LocalEtcd, prefix: str, inventory: Path, tmp_path: Path
) -> None:
    processes = [
        CoordinatorProcess(etcd.endpoint, prefix, inventory, tmp_path / f"coordinator-{i}.log")
        for i in range(2)
    ]
    for process in processes:
        process.start()
    channels = [grpc.aio.insecure_channel(p.address) for p in processes]
    try:
        await asyncio.gather(*(p.wait_serving() for p in processes))
        apis = [allocation_pb2_grpc.AllocationServiceStub(c) for c in channels]
        result = LoadResult()
        await asyncio.gather(
            *(run_client(w, apis, 66, result, seed=7, time_limit_s=150) for w in range(32))
        )
        assert result.operations >= 2000
        assert result.unexpected == []
        assert len(result.allocated) >= 400, "too few allocations to prove anything"
        assert result.refused > 0, "the cluster never filled up; no contention was tested"
        assert set(result.served_by) == {0, 1}, "both coordinators must have placed work"

        audit = await audit_etcd(etcd.endpoint, prefix)  # asserts the per-GPU invariants
        assert set(audit.allocations) == result.live
        # ...and not only at the end: at every revision etcd went through.
        assert await audit_history(etcd.endpoint, prefix) >= len(result.allocated)
        for request_id, allocation_id in result.allocated.items():
            if allocation_id not in result.released:
                assert audit.request_keys[request_id] == allocation_id
        assert len(set(result.allocated.values())) == len(result.allocated)
        for api in apis:  # each coordinator's view converges on etcd
            for _ in range(50):
                if await _list_ids(api) == result.live:
                    break
                await asyncio.sleep(0.1)
            assert await _list_ids(api) == result.live
    finally:
        for channel in channels:
            await channel.close()
        for process in processes:
            assert process.stop() == 0, process.log_tail()
    conflicts = sum(_logged(p, "coordinator stopped")["commit_conflicts"] for p in processes)
    assert conflicts > 0, "the coordinators never raced, so the commit guard was not exercised"


def _logged(process: CoordinatorProcess, event: str) -> dict[str, Any]:
    for line in process.log_path.read_text().splitlines():
        if line.startswith("{"):
            entry: dict[str, Any] = json.loads(line)
            if entry.get("event") == event:
                return entry
    raise AssertionError(f"{event!r} not logged: {process.log_tail()}")


@pytest.mark.timeout(120)
async def test_coordinator_killed_and_restarted_keeps_allocations(
    etcd: LocalEtcd, prefix: str, inventory: Path, tmp_path: Path
) -> None:
    process = CoordinatorProcess(etcd.endpoint, prefix, inventory, tmp_path / "coordinator.log")
    process.start()
    await process.wait_serving()
    async with grpc.aio.insecure_channel(process.address) as channel:
        api = allocation_pb2_grpc.AllocationServiceStub(channel)
        made = {
            (await api.Allocate(request(f"k-{i}", fraction_millis=500))).allocation.id
            for i in range(8)
        }
    assert process.stop(signal.SIGKILL) == -signal.SIGKILL
    process.start()
    await process.wait_serving()
    async with grpc.aio.insecure_channel(process.address) as channel:
        api = allocation_pb2_grpc.AllocationServiceStub(channel)
        assert await _list_ids(api) == made
        again = await api.Allocate(request("k-0", fraction_millis=500))
        assert again.replayed
        assert again.allocation.id in made
        # Best-fit paired the 8 halves on 4 GPUs, so exactly 2 whole GPUs are left.
        for i in range(2):
            await api.Allocate(request(f"whole-{i}", fraction_millis=1000))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await api.Allocate(request("whole-2", fraction_millis=1000))
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert process.stop() == 0
    audit = await audit_etcd(etcd.endpoint, prefix)
    assert made <= set(audit.allocations)
    assert len(audit.allocations) == 10


@pytest.mark.timeout(180)
async def test_etcd_restart_under_load_loses_and_duplicates_nothing(
    own_etcd: LocalEtcd, prefix: str, inventory: Path
) -> None:
    async with coordinator_running(own_etcd.endpoint, prefix, inventory) as running:
        result = LoadResult()
        load = asyncio.gather(
            *(
                run_client(w, [running.api], 60, result, seed=11, time_limit_s=120, pause_s=0.01)
                for w in range(8)
            )
        )
        started = time.monotonic()
        while result.operations < 120 and time.monotonic() - started < 60:
            await asyncio.sleep(0.02)
        restarted_at = result.operations
        # A restart that lands between calls interrupts none (refusals never reach etcd):
        # restart again, a bounded number of times, until one call was cut off.
        for _ in range(3):
            await asyncio.to_thread(own_etcd.restart, kill=True)
            await asyncio.sleep(0.3)
            if result.retries or load.done():
                break
        await load
        assert result.operations > restarted_at, "no load ran after the restart"
        assert result.retries > 0, "the restart did not interrupt any call"
        assert result.unexpected == []

        audit = await audit_etcd(own_etcd.endpoint, prefix)
        assert set(audit.allocations) == result.live
        assert len(set(result.allocated.values())) == len(result.allocated)
        assert await audit_history(own_etcd.endpoint, prefix) >= len(result.allocated)
        deadline = time.monotonic() + 15
        while await _list_ids(running.api) != result.live and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await _list_ids(running.api) == result.live
        for allocation_id in result.live:  # the recovered coordinator releases...
            await running.api.Release(allocation_pb2.ReleaseRequest(allocation_id=allocation_id))
        whole = [  # ...and places again: all 6 GPUs are free
            await running.api.Allocate(request(f"after-restart-{i}", fraction_millis=1000))
            for i in range(6)
        ]
        assert len({reply.allocation.gpus[0].uuid for reply in whole}) == 6


async def test_etcd_down_gives_unavailable_and_writes_nothing(
    own_etcd: LocalEtcd, prefix: str, inventory: Path
) -> None:
    async with coordinator_running(own_etcd.endpoint, prefix, inventory) as running:
        held = (await running.api.Allocate(request("before", fraction_millis=100))).allocation
        own_etcd.stop()
        for call in (
            running.api.Allocate(request("during", fraction_millis=100)),
            running.api.Release(allocation_pb2.ReleaseRequest(allocation_id=held.id)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "etcd" in (caught.value.details() or "")
        await _wait_health(running.channel, health_pb2.HealthCheckResponse.NOT_SERVING)
        own_etcd.start()
        await _wait_health(running.channel, health_pb2.HealthCheckResponse.SERVING)
        audit = await audit_etcd(own_etcd.endpoint, prefix)
        assert set(audit.allocations) == {held.id}


async def _wait_health(channel: grpc.aio.Channel, wanted: int, timeout_s: float = 20) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="kaiwo_gpu.v1.AllocationService")
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = (await health.Check(request)).status
        if status == wanted:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"health stayed {status}, wanted {wanted}")


async def test_one_request_id_raced_through_two_coordinators_makes_one_allocation(
    etcd: LocalEtcd, prefix: str, inventory: Path
) -> None:
    async with (
        coordinator_running(etcd.endpoint, prefix, inventory) as first,
        coordinator_running(etcd.endpoint, prefix, inventory) as second,
    ):
        for round_ in range(10):
            replies = await asyncio.gather(
                *(
                    api.Allocate(request(f"race-{round_}", fraction_millis=100))
                    for api in (first.api, second.api) * 3
                )
            )
            assert len({reply.allocation.id for reply in replies}) == 1
            assert sum(not reply.replayed for reply in replies) == 1
        audit = await audit_etcd(etcd.endpoint, prefix)
        assert len(audit.allocations) == 10
