"""The grant's environment: the variables a workload starts with, rendered from its grant.

ROCR_VISIBLE_DEVICES takes node-local device indices; HSA_CU_MASK indices count after
that reordering, so the n-th granted GPU is index n there. The environment is never
stored: it follows from the grant, so it is rendered again wherever a grant is shown.
"""

from __future__ import annotations

from collections.abc import Sequence

from kaiwo_gpu.common import grant_variables as var
from kaiwo_gpu.common.models import Isolation
from kaiwo_gpu.coordinator.placement.cumask import render_hsa_cu_mask
from kaiwo_gpu.coordinator.placement.engine import Placement

GrantedDevice = tuple[int, int, int, Sequence[int]]
"""(device index, millis, MiB, compute units) of one granted GPU, in grant order."""


def render_grant_environment(
    allocation_id: str, node: str, isolation: Isolation, devices: Sequence[GrantedDevice]
) -> dict[str, str]:
    env = {
        var.VISIBLE_DEVICES: ",".join(str(index) for index, _, _, _ in devices),
        var.ALLOCATION_ID: allocation_id,
        var.NODE: node,
        var.FRACTION_MILLIS: ",".join(str(millis) for _, millis, _, _ in devices),
        var.MEMORY_LIMIT_MIB: ",".join(str(memory) for _, _, memory, _ in devices),
        var.ISOLATION: isolation.value,
    }
    if isolation is Isolation.CU_MASK:
        env[var.CU_MASK] = render_hsa_cu_mask([units for _, _, _, units in devices])
    return env


def grant_environment(placement: Placement, allocation_id: str) -> dict[str, str]:
    """The environment of a placement (the demo and tests show it before any record)."""
    return render_grant_environment(
        allocation_id,
        placement.node,
        placement.isolation,
        [(g.gpu.index, g.millis, g.memory_mib, g.compute_units) for g in placement.grants],
    )
