"""The simulated nodes of the telemetry benchmark: their messages, schedule and baseline.

Each node's Register and telemetry messages are built once (a few value variants); only the
timestamps change before each write. Batch k of node i is due at t0 + k + i/nodes seconds,
and is stamped with that time, so the batch number can be read back from `sampled_at`.
"""

from __future__ import annotations

import math
import random

from kaiwo_gpu.v1 import agent_pb2, types_pb2

GPU_MODEL = "MI300X"
VRAM_MIB = 192 * 1024
COMPUTE_UNITS = 304
POWER_LIMIT_W = 750.0
INTERVAL_S = 1.0
VARIANTS = 4  # value sets per node, cycled so consecutive batches differ


def node_name(index: int, nodes: int) -> str:
    return f"node-{index:0{max(4, len(str(nodes - 1)))}d}"


def node_index(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def offset_s(index: int, nodes: int) -> float:
    """Where in each second node `index` sends: spread evenly over the interval."""
    return index * INTERVAL_S / nodes


class NodeLoad:
    """One simulated node: its Register message and its telemetry, built once."""

    def __init__(self, index: int, nodes: int, gpus: int) -> None:
        self.index = index
        self.name = node_name(index, nodes)
        self.offset_s = offset_s(index, nodes)
        self.inventory = [
            types_pb2.GpuInventory(
                uuid=f"{index:08x}-0000-1000-80{g:02x}-bench0000000",
                index=g,
                bdf=f"{g // 8:04x}:{0x05 + 0x20 * (g % 8):02x}:00.0",
                model=GPU_MODEL,
                vram_mib=VRAM_MIB,
                compute_units=COMPUTE_UNITS,
                compute_partition="SPX",
                memory_partition="NPS1",
            )
            for g in range(gpus)
        ]
        self.register = agent_pb2.AgentMessage(
            register=agent_pb2.Register(
                node=self.name,
                labels={"kaiwo.ai/pool": "bench"},
                gpus=self.inventory,
                agent_version="bench",
                backend="simulated",
            )
        ).SerializeToString()
        rng = random.Random(index)
        self.variants = [self._variant(rng) for _ in range(VARIANTS)]

    def _variant(self, rng: random.Random) -> agent_pb2.AgentMessage:
        samples = []
        for gpu in self.inventory:
            activity = rng.uniform(0.0, 1.0)
            edge = 35.0 + 40.0 * activity + rng.uniform(-2.0, 2.0)
            used_mib = int(VRAM_MIB * rng.uniform(0.05, 0.95))
            processes = [
                types_pb2.ProcessMemory(
                    pid=rng.randint(1000, 4_000_000),
                    name=rng.choice(("python3", "pt_main_thread", "vllm-worker")),
                    vram_mib=used_mib // 2,
                )
                for _ in range(rng.randint(1, 2))
            ]
            samples.append(
                agent_pb2.GpuSample(
                    uuid=gpu.uuid,
                    telemetry=types_pb2.GpuTelemetry(
                        gfx_activity_percent=round(100 * activity),
                        umc_activity_percent=round(100 * activity * rng.uniform(0.3, 0.9)),
                        edge_temperature_c=round(edge, 1),
                        hotspot_temperature_c=round(edge + 10.0 + 15.0 * activity, 1),
                        memory_temperature_c=round(edge + 5.0 + 10.0 * activity, 1),
                        socket_power_w=round(140.0 + 580.0 * activity, 1),
                        power_limit_w=POWER_LIMIT_W,
                        used_vram_mib=used_mib,
                        ecc_correctable_total=rng.randint(0, 40),
                        ecc_uncorrectable_total=0,
                        processes=processes,
                    ),
                    health=types_pb2.HEALTH_HEALTHY,
                )
            )
        return agent_pb2.AgentMessage(telemetry=agent_pb2.TelemetryBatch(samples=samples))

    def due_wall_s(self, t0_wall_s: float, k: int) -> float:
        return t0_wall_s + k * INTERVAL_S + self.offset_s

    def payload(self, k: int, sampled_at_wall_s: float) -> bytes:
        """Batch k, stamped (batch and every sample) with its scheduled wall time."""
        message = self.variants[k % VARIANTS]
        seconds = math.floor(sampled_at_wall_s)
        nanos = min(999_999_999, round((sampled_at_wall_s - seconds) * 1e9))
        batch = message.telemetry
        batch.sampled_at.seconds = seconds
        batch.sampled_at.nanos = nanos
        for sample in batch.samples:
            stamp = sample.telemetry.sampled_at
            stamp.seconds = seconds
            stamp.nanos = nanos
        return message.SerializeToString()


def batch_number(sampled_at_wall_s: float, t0_wall_s: float, index: int, nodes: int) -> int:
    """The batch number a `sampled_at` stands for (it is the batch's scheduled time)."""
    return round((sampled_at_wall_s - t0_wall_s - offset_s(index, nodes)) / INTERVAL_S)


def last_due(wall_s: float, t0_wall_s: float, index: int, nodes: int) -> int:
    """The number of node `index`'s latest batch due at `wall_s`."""
    return math.floor((wall_s - t0_wall_s - offset_s(index, nodes)) / INTERVAL_S)
