"""An offline run of the engine over a synthetic cluster: what `kaiwo-gpu demo` shows.

Places a seeded stream of requests until the cluster is full or the stream ends, and
returns what happened as lines of text; the CLI prints them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import islice

from kaiwo_gpu.common.units import MILLIS_PER_GPU, format_fraction
from kaiwo_gpu.coordinator.local.synthetic import random_requests, synthetic_nodes
from kaiwo_gpu.coordinator.placement.engine import NoFit, describe_demand, place
from kaiwo_gpu.coordinator.placement.environment import grant_environment
from kaiwo_gpu.coordinator.placement.snapshot import ClusterSnapshot
from kaiwo_gpu.coordinator.placement.strategies import SchedulerState


def run_demo(
    *, node_count: int, gpus_per_node: int, model: str, strategy: str, requests: int, seed: int
) -> Iterator[str]:
    snapshot = ClusterSnapshot.build(synthetic_nodes(node_count, gpus_per_node, model))
    state = SchedulerState()
    rng = random.Random(seed)
    placed = refused = 0
    for request in islice(random_requests(rng, prefix="demo"), requests):
        decision = place(request, snapshot, state, default_strategy=strategy)
        wanted = describe_demand(request)
        if isinstance(decision, NoFit):
            refused += 1
            yield f"{request.request_id}  {wanted:<48} REFUSED  {decision.message}"
            continue
        placed += 1
        allocation_id = f"a-{placed:05d}"
        snapshot = snapshot.with_allocation(decision.as_allocation(allocation_id))
        state = decision.state
        env = grant_environment(decision, allocation_id)
        where = f"{decision.node} GPU {env['ROCR_VISIBLE_DEVICES']}"
        granted = ", ".join(
            f"{format_fraction(g.millis)}/{g.memory_mib} MiB" for g in decision.grants
        )
        mask = f"  HSA_CU_MASK={env['HSA_CU_MASK']}" if "HSA_CU_MASK" in env else ""
        yield f"{request.request_id}  {wanted:<48} -> {where:<22} granted {granted}{mask}"
    capacity = len(snapshot.gpus) * MILLIS_PER_GPU
    allocated = snapshot.allocated_millis()
    yield ""
    yield (
        f"{placed} placed, {refused} refused with {strategy}; "
        f"{allocated / capacity:.1%} of {len(snapshot.gpus)} GPUs' compute allocated"
    )
