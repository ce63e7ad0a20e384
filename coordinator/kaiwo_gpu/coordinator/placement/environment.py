"""The environment a workload starts with, rendered from its placement.

ROCR_VISIBLE_DEVICES takes node-local device indices; HSA_CU_MASK indices count after
that reordering, so the n-th granted GPU is index n there.
"""

from __future__ import annotations

from kaiwo_gpu.common.models import Isolation
from kaiwo_gpu.coordinator.placement.cumask import render_hsa_cu_mask
from kaiwo_gpu.coordinator.placement.engine import Placement


def launch_environment(placement: Placement, allocation_id: str) -> dict[str, str]:
    env = {
        "ROCR_VISIBLE_DEVICES": ",".join(str(g.gpu.index) for g in placement.grants),
        "KAIWO_GPU_ALLOCATION_ID": allocation_id,
        "KAIWO_GPU_NODE": placement.node,
        "KAIWO_GPU_FRACTION_MILLIS": ",".join(str(g.millis) for g in placement.grants),
        "KAIWO_GPU_MEMORY_LIMIT_MIB": ",".join(str(g.memory_mib) for g in placement.grants),
        "KAIWO_GPU_ISOLATION": placement.isolation.value,
    }
    if placement.isolation is Isolation.CU_MASK:
        env["HSA_CU_MASK"] = render_hsa_cu_mask([g.compute_units for g in placement.grants])
    return env
