"""The telemetry suite's baseline: the CPU the coordinator's pure ingest steps spend per batch.

Timed in the benchmark's process on the same bytes the generators send: parse +
`checked_batch`, then the rest of `_ingest`'s pure work (`placement_reading`,
`with_health`). These are the coordinator's internal functions, not its public surface;
this import is the only place the suite names them, so a rename there is a fix here alone.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from bench.telemetry_nodes import NodeLoad
from kaiwo_gpu.coordinator.state.agent_reports import (
    checked_batch,
    node_record,
    placement_reading,
    with_health,
)
from kaiwo_gpu.v1 import agent_pb2

BASELINE_BATCHES = 20_000
BASELINE_NODES = 50


@dataclass(frozen=True, slots=True)
class Baseline:
    batches: int
    parse_check_us: float  # CPU per batch: FromString + checked_batch
    whole_pure_us: float  # ... + placement_reading + with_health


def _no_owner(_uuid: str) -> str | None:
    return None


def measure_baseline(nodes: int, gpus: int, batches: int = BASELINE_BATCHES) -> Baseline:
    """CPU per batch of the coordinator's pure ingest steps, on the generators' bytes."""
    loads = [NodeLoad(i, nodes, gpus) for i in range(min(nodes, BASELINE_NODES))]
    records = [
        node_record(agent_pb2.AgentMessage.FromString(load.register).register, None, _no_owner)
        for load in loads
    ]
    now = time.time()
    per_load = math.ceil(batches / len(loads))
    payloads = [
        (records[n], load.payload(k, load.due_wall_s(now, k)))
        for k in range(per_load)
        for n, load in enumerate(loads)
    ]

    def parse_check() -> None:
        for record, payload in payloads:
            message = agent_pb2.AgentMessage.FromString(payload)
            checked_batch(message.telemetry, record, _no_owner)

    def whole() -> None:
        for record, payload in payloads:
            message = agent_pb2.AgentMessage.FromString(payload)
            samples = checked_batch(message.telemetry, record, _no_owner)
            {uuid: placement_reading(s.telemetry) for uuid, s in samples.items()}
            if with_health(record, samples) is not None:
                raise RuntimeError("a healthy batch changed a healthy record")

    def cpu_us(work: object) -> float:
        assert callable(work)
        work()  # warm
        start = time.process_time()
        work()
        return (time.process_time() - start) * 1e6 / len(payloads)

    return Baseline(len(payloads), cpu_us(parse_check), cpu_us(whole))
