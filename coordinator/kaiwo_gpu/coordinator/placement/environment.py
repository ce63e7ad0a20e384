"""The grant's environment: the variables a workload starts with, rendered from a placement.

ROCR_VISIBLE_DEVICES takes node-local device indices; HSA_CU_MASK indices count after
that reordering, so the n-th granted GPU is index n there.
"""

from __future__ import annotations

from kaiwo_gpu.common import grant_variables as var
from kaiwo_gpu.common.models import Isolation
from kaiwo_gpu.coordinator.placement.cumask import render_hsa_cu_mask
from kaiwo_gpu.coordinator.placement.engine import Placement


def grant_environment(placement: Placement, allocation_id: str) -> dict[str, str]:
    env = {
        var.VISIBLE_DEVICES: ",".join(str(g.gpu.index) for g in placement.grants),
        var.ALLOCATION_ID: allocation_id,
        var.NODE: placement.node,
        var.FRACTION_MILLIS: ",".join(str(g.millis) for g in placement.grants),
        var.MEMORY_LIMIT_MIB: ",".join(str(g.memory_mib) for g in placement.grants),
        var.ISOLATION: placement.isolation.value,
    }
    if placement.isolation is Isolation.CU_MASK:
        env[var.CU_MASK] = render_hsa_cu_mask([g.compute_units for g in placement.grants])
    return env
