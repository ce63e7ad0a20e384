"""Agents and coordinators as separate processes, killed with SIGKILL and started again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kaiwo_gpu.client import Client, ClientSettings
from kaiwo_gpu.coordinator.local.coordinator_process import CoordinatorProcess
from kaiwo_gpu.coordinator.local.etcd import LocalEtcd
from kaiwo_gpu.coordinator.state.view_state import AGENT_MISSING

from .agents import AgentProcess, agents_running, eventually, nodes_by_name
from .conftest import Running, coordinator_running
from .harness import child, request
from .test_agents import FAST, _schedulable, _unschedulable, address

pytestmark = pytest.mark.timeout(180)


async def test_a_killed_agent_leaves_placement_and_its_return_restores_it(
    etcd: LocalEtcd, prefix: str, tmp_path: Path
) -> None:
    async with coordinator_running(etcd.endpoint, prefix, None, **FAST) as running:
        agent = AgentProcess("proc-a", address(running), tmp_path / "agent.log")
        agent.start()
        try:
            await eventually(lambda: _schedulable(running, "proc-a"), timeout_s=60)
            assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
            node = await eventually(lambda: _unschedulable(running, "proc-a"))
            assert node.unschedulable_reason == AGENT_MISSING
            agent.start()
            await eventually(lambda: _schedulable(running, "proc-a"), timeout_s=60)
            reply = await running.api.Allocate(request("after-return", fraction_millis=300))
            assert reply.allocation.node == "proc-a"
        finally:
            agent.stop(signal.SIGKILL)


async def _observed(observer: Running, name: str, schedulable: bool) -> bool | None:
    node = (await nodes_by_name(observer.api)).get(name)
    return True if node is not None and node.schedulable == schedulable else None


async def test_node_lease_expires_when_its_coordinator_dies_and_agents_reconnect_after_restart(
    etcd: LocalEtcd, prefix: str, tmp_path: Path
) -> None:
    """The agent's coordinator is SIGKILLed, so nobody revokes the node lease: another
    coordinator sees the node go unschedulable only when etcd expires it (TTL 2 s). When
    the dead coordinator is started again on its address, the agent reconnects."""
    flags = ("--node-ttl=2s", "--sample-interval=200ms")
    first = CoordinatorProcess(
        etcd.endpoint, prefix, None, tmp_path / "first.log", extra_args=flags
    )
    first.start()
    agent = AgentProcess("proc-b", first.address, tmp_path / "agent.log")
    try:
        await first.wait_serving()
        agent.start()
        async with coordinator_running(etcd.endpoint, prefix, None, **FAST) as observer:
            await eventually(lambda: _observed(observer, "proc-b", True), timeout_s=60)
            first.stop(signal.SIGKILL)
            await eventually(lambda: _observed(observer, "proc-b", False), timeout_s=30)
            restarted = CoordinatorProcess(
                etcd.endpoint,
                prefix,
                None,
                tmp_path / "restarted.log",
                extra_args=flags,
                address=first.address,
            )
            restarted.start()
            try:
                await restarted.wait_serving()
                await eventually(lambda: _observed(observer, "proc-b", True), timeout_s=60)
            finally:
                restarted.stop()
        registrations = [
            line
            for line in agent.log().splitlines()
            if line.startswith("{")
            and json.loads(line).get("event") == "registered with coordinator"
        ]
        assert len(registrations) == 2
    finally:
        agent.stop(signal.SIGKILL)
        first.stop(signal.SIGKILL)


HUNG_AGENT = """
import asyncio, sys, threading
from kaiwo_gpu.agent.service import AgentSettings, NodeAgent, run_until_signalled
from kaiwo_gpu.agent.simulated import SimulatedBackend

class Hanging(SimulatedBackend):
    def read(self, gpu):
        print("read hangs now", flush=True)
        threading.Event().wait()  # a driver call that never returns

    def close(self):
        print("closed under a running read", flush=True)

settings = AgentSettings(node="hung", coordinators=(sys.argv[1],), backend="simulated")
agent = NodeAgent(settings, backend=Hanging(node="hung", model="MI300X", count=1))
asyncio.run(run_until_signalled(agent))
print("exited", flush=True)
"""


async def test_sigterm_stops_an_agent_whose_gpu_read_hangs(etcd: LocalEtcd, prefix: str) -> None:
    """A read stuck in the driver must not keep the agent from exiting, nor be closed under."""
    async with coordinator_running(etcd.endpoint, prefix, None, **FAST) as running:
        with child([sys.executable, "-c", HUNG_AGENT, address(running)]) as agent:
            assert agent.stdout is not None
            seen = ""
            for _ in range(200):  # bounded: the first tick after registering reads
                seen += await asyncio.wait_for(asyncio.to_thread(agent.stdout.readline), 30)
                if "read hangs now" in seen:
                    break
            assert "read hangs now" in seen, seen
            agent.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(agent.wait, 15) == 0
            rest = agent.stdout.read()
            assert "exited" in rest
            assert "closed under a running read" not in rest


@dataclass
class FreezablePair:
    """Two coordinator processes on one etcd: `frozen` is the one a test SIGSTOPs."""

    frozen: CoordinatorProcess
    healthy: CoordinatorProcess
    stopped: bool = False

    @property
    def both(self) -> str:
        return f"{self.frozen.address},{self.healthy.address}"

    def freeze(self) -> None:
        assert self.frozen.process is not None
        self.frozen.process.send_signal(signal.SIGSTOP)
        self.stopped = True


@contextlib.asynccontextmanager
async def freezable_pair(
    etcd: LocalEtcd, prefix: str, inventory: Path | None, tmp_path: Path
) -> AsyncIterator[FreezablePair]:
    """Both serving; afterwards the frozen one is thawed and killed, the other stopped."""
    flags = ("--node-ttl=2s", "--sample-interval=200ms")
    pair = FreezablePair(
        CoordinatorProcess(etcd.endpoint, prefix, inventory, tmp_path / "f.log", extra_args=flags),
        CoordinatorProcess(etcd.endpoint, prefix, inventory, tmp_path / "h.log", extra_args=flags),
    )
    pair.frozen.start()
    pair.healthy.start()
    try:
        await pair.frozen.wait_serving()
        await pair.healthy.wait_serving()
        yield pair
    finally:
        if pair.stopped and pair.frozen.process is not None:
            pair.frozen.process.send_signal(signal.SIGCONT)
        pair.frozen.stop(signal.SIGKILL)
        pair.healthy.stop()


async def test_a_frozen_coordinator_is_left_by_its_agent_and_by_clients_of_both(
    etcd: LocalEtcd, prefix: str, tmp_path: Path, inventory: Path
) -> None:
    """Review finding: with a coordinator SIGSTOPped, its agents stayed connected to it (their
    10 s pings drew GOAWAY too_many_pings, and nothing else noticed), so the healthy
    coordinator marked their nodes unschedulable, and clients of `ipv4:c1,c2` hung on the
    frozen one until their deadline. Now keepalive finds the frozen one within seconds."""
    async with freezable_pair(etcd, prefix, inventory, tmp_path) as pair:
        frozen, healthy = pair.frozen, pair.healthy
        async with (
            agents_running((frozen.address, healthy.address), ["frozen-a"]) as (agent,),
            coordinator_running(etcd.endpoint, prefix, inventory, **FAST) as observer,
        ):
            await eventually(lambda: _observed(observer, "frozen-a", True), timeout_s=60)

            async def on_the_first() -> bool | None:  # under load it may have moved on once
                status = agent.uplink.status
                return True if status.connected and status.coordinator == frozen.address else None

            await eventually(on_the_first, timeout_s=60)
            both = pair.both
            # A client that was talking to the coordinator before it froze: its connection
            # stays open (the frozen process's kernel keeps it), so before each retry went
            # back to the same coordinator and the call failed after its whole 60 s.
            connected = Client(both, settings=ClientSettings(timeout_s=60.0))
            try:
                assert await asyncio.to_thread(lambda: connected.stats().gpu_count) > 0
                pair.freeze()
                frozen_at = asyncio.get_running_loop().time()
                assert await asyncio.to_thread(lambda: connected.stats().gpu_count) > 0
                answered_after_s = asyncio.get_running_loop().time() - frozen_at
                assert answered_after_s < 30, answered_after_s  # one 10 s attempt, then healthy
            finally:
                connected.close()

            async def moved() -> bool | None:
                status = agent.uplink.status
                return True if status.connected and status.coordinator == healthy.address else None

            await eventually(moved, timeout_s=30)
            moved_after_s = asyncio.get_running_loop().time() - frozen_at
            assert moved_after_s < 15, moved_after_s  # heartbeats missed for 6 s
            await eventually(lambda: _observed(observer, "frozen-a", True), timeout_s=30)

            def stats_through_both() -> int:
                with Client(both, settings=ClientSettings(timeout_s=60.0)) as client:
                    return client.stats().gpu_count

            started = asyncio.get_running_loop().time()
            assert await asyncio.to_thread(stats_through_both) > 0  # a new client, likewise
            assert asyncio.get_running_loop().time() - started < 30


async def test_short_calls_new_clients_and_watches_leave_a_frozen_coordinator(
    etcd: LocalEtcd, prefix: str, tmp_path: Path, inventory: Path
) -> None:
    """Review findings: with one channel per address, a new client (and a Watch) waited a
    whole attempt on a frozen first coordinator, and a call of 10 s or less (top's 2 s, a
    renewal, run's release) never moved off it at all. Each channel now holds every
    address (gRPC passes over one that never answers its handshake), a connected client
    rotates its list when a call there fails, and with two coordinators an attempt has at
    most half the call's time."""
    async with freezable_pair(etcd, prefix, inventory, tmp_path) as pair:
        both = pair.both
        connected = Client(both, settings=ClientSettings(timeout_s=5.0))
        try:
            assert await asyncio.to_thread(lambda: connected.stats().gpu_count) > 0
            pair.freeze()

            # Each call has 5 s; before, each of these failed with its deadline exceeded.
            # A connected client: its first attempt (2.5 s) on the frozen one, then the other.
            assert await asyncio.to_thread(lambda: connected.stats().gpu_count) > 0
            assert connected._current == 1  # and the calls after it go there at once

            def fresh() -> int:
                with Client(both, settings=ClientSettings(timeout_s=5.0)) as client:
                    return client.stats().gpu_count

            assert await asyncio.to_thread(fresh) > 0

            def first_event() -> str:
                with Client(both, settings=ClientSettings(timeout_s=5.0)) as client:
                    made = client.allocate(fraction=0.1, request_id="watched")
                    event = next(iter(client.watch()))
                    client.release(made.id)
                    return event.allocation.request_id

            # (bounded: before, the watch failed after 20 s on the frozen handshake)
            assert await asyncio.wait_for(asyncio.to_thread(first_event), 60) == "watched"
        finally:
            connected.close()


async def test_an_agent_skips_a_coordinator_frozen_before_it_came(
    etcd: LocalEtcd, prefix: str, tmp_path: Path
) -> None:
    """Review finding: a coordinator frozen before the agent connected took gRPC's 20 s
    connect timeout to leave (its TCP accepts, its HTTP/2 never answers), each time round."""
    async with freezable_pair(etcd, prefix, None, tmp_path) as pair:
        frozen, healthy = pair.frozen, pair.healthy
        pair.freeze()
        started = asyncio.get_running_loop().time()
        async with agents_running((frozen.address, healthy.address), ["late"]) as (agent,):

            async def on_healthy() -> bool | None:
                status = agent.uplink.status
                return True if status.connected and status.coordinator == healthy.address else None

            await eventually(on_healthy, timeout_s=40)
            assert asyncio.get_running_loop().time() - started < 19  # gRPC connect timeout: 20 s
