"""Helpers for the agent tests: simulated agents in this process, a raw agent stream, polling."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from kaiwo_gpu.agent.service import AgentSettings, NodeAgent
from kaiwo_gpu.v1 import agent_pb2, agent_pb2_grpc, allocation_pb2, types_pb2
from kaiwo_gpu.v1.allocation_pb2_grpc import AllocationServiceStub

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T | None]], *, timeout_s: float = 20.0, every_s: float = 0.05
) -> T:
    """Polls until `probe` returns something other than None (bounded in time)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = await probe()
        if result is not None:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(every_s)


async def nodes_by_name(api: AllocationServiceStub) -> dict[str, types_pb2.NodeStatus]:
    reply = await api.ListNodes(allocation_pb2.ListNodesRequest())  # type: ignore[misc]
    return {node.name: node for node in reply.nodes}


@contextlib.asynccontextmanager
async def agents_running(
    address: str | tuple[str, ...],
    names: list[str],
    *,
    gpus: int = 2,
    model: str = "MI300X",
    interval_ms: int = 200,
    faults_dir: Path | None = None,
) -> AsyncIterator[list[NodeAgent]]:
    """Simulated agents in this process, stopped (closing their streams) on exit."""
    agents = [
        NodeAgent(
            AgentSettings(
                node=name,
                coordinators=(address,) if isinstance(address, str) else address,
                backend="simulated",
                interval_ms=interval_ms,
                simulated_model=model,
                simulated_gpus=gpus,
                faults_file=faults_dir / f"{name}.yaml" if faults_dir else None,
                seed=n,
            )
        )
        for n, name in enumerate(names)
    ]
    for agent in agents:
        agent.uplink.backoff_base_s = 0.05
        agent.uplink.backoff_cap_s = 0.5
    stop = asyncio.Event()
    tasks = [asyncio.create_task(agent.run(stop)) for agent in agents]
    try:
        yield agents
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)


def raw_inventory(node: str, count: int = 2) -> list[types_pb2.GpuInventory]:
    return [
        types_pb2.GpuInventory(
            uuid=f"RAW-{node}-{i}",
            index=i,
            bdf=f"0000:{0x20 + i:02x}:00.0",
            model="MI300X",
            vram_mib=192 * 1024,
            compute_units=304,
        )
        for i in range(count)
    ]


def batch(samples: dict[str, types_pb2.GpuTelemetry]) -> agent_pb2.AgentMessage:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return agent_pb2.AgentMessage(
        telemetry=agent_pb2.TelemetryBatch(
            sampled_at=stamp,
            samples=[
                agent_pb2.GpuSample(uuid=uuid, telemetry=telemetry, health=types_pb2.HEALTH_HEALTHY)
                for uuid, telemetry in samples.items()
            ],
        )
    )


class RawAgent:
    """A hand-driven Connect stream: what a buggy or hostile agent could send."""

    def __init__(self, channel: grpc.aio.Channel, node: str, gpus: list[types_pb2.GpuInventory]):
        self.call = agent_pb2_grpc.AgentServiceStub(channel).Connect()
        self.node = node
        self.gpus = gpus

    async def register(self) -> agent_pb2.CoordinatorDirective:
        await self.call.write(
            agent_pb2.AgentMessage(
                register=agent_pb2.Register(node=self.node, gpus=self.gpus, backend="simulated")
            )
        )
        directive = await self.call.read()
        assert isinstance(directive, agent_pb2.CoordinatorDirective)
        return directive

    async def send(self, message: agent_pb2.AgentMessage) -> None:
        await self.call.write(message)

    async def status(self) -> tuple[grpc.StatusCode, str]:
        """Reads until the coordinator ends the stream; its status and message."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            while await self.call.read() is not grpc.aio.EOF:
                pass
        return await self.call.code(), await self.call.details() or ""

    def close(self) -> None:
        self.call.cancel()


class AgentProcess:
    """`kaiwo-gpu agent --backend simulated` as a child process, so it can be SIGKILLed."""

    def __init__(self, node: str, coordinators: str, log_path: Path, gpus: int = 2) -> None:
        self.args = [
            sys.executable,
            "-m",
            "kaiwo_gpu.cli.main",
            "agent",
            "--backend=simulated",
            f"--node={node}",
            f"--gpus={gpus}",
            f"--coordinator={coordinators}",
            "--interval=200ms",
            "--log-format=json",
        ]
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
