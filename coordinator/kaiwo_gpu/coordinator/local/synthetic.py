"""Synthetic clusters and request streams, for the engine demo and the benchmarks.

Deterministic for a given `random.Random`, so a demo or a benchmark run can be repeated.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from kaiwo_gpu.common.gpu_models import GPU_MODELS
from kaiwo_gpu.common.models import AllocationRequest, Isolation
from kaiwo_gpu.coordinator.placement.cluster import Gpu, Node

FRACTIONS_MILLIS = (100, 125, 250, 300, 500, 750, 1000)


def synthetic_nodes(node_count: int, gpus_per_node: int, model: str = "MI300X") -> list[Node]:
    spec = GPU_MODELS[model]
    width = max(2, len(str(node_count - 1)))
    nodes = []
    for n in range(node_count):
        name = f"node-{n:0{width}d}"
        gpus = tuple(
            Gpu(
                uuid=f"GPU-{n:06x}{i:04x}",
                node=name,
                index=i,
                bdf=f"0000:{0x10 + i * 0x10:02x}:00.0",
                model=spec.name,
                vram_mib=spec.vram_mib,
                compute_units=spec.compute_units,
            )
            for i in range(gpus_per_node)
        )
        nodes.append(Node(name=name, gpus=gpus, labels=(("kaiwo.ai/pool", "default"),)))
    return nodes


def random_requests(rng: random.Random, prefix: str = "req") -> Iterator[AllocationRequest]:
    """An endless mix: mostly fractional shares, some memory-only, cu-mask and whole GPUs."""
    serial = 0
    while True:
        serial += 1
        kind = rng.random()
        request_id = f"{prefix}-{serial:06d}"
        if kind < 0.6:
            yield AllocationRequest(request_id, fraction_millis=rng.choice(FRACTIONS_MILLIS))
        elif kind < 0.75:
            yield AllocationRequest(request_id, memory_mib=rng.choice((8192, 16384, 24576, 49152)))
        elif kind < 0.9:
            yield AllocationRequest(
                request_id,
                fraction_millis=rng.choice((250, 300, 500)),
                isolation=Isolation.CU_MASK,
            )
        else:
            yield AllocationRequest(request_id, count=rng.choice((1, 2, 4)), fraction_millis=1000)
