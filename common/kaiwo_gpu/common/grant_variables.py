"""The environment variables a grant sets for the workload that runs on it.

The coordinator renders them from a placement; clients, `run` and the Slurm TaskProlog
replace every one of them when they start work under a new grant, so a mask or a device
list inherited from another allocation never leaks into it.
"""

from __future__ import annotations

VISIBLE_DEVICES = "ROCR_VISIBLE_DEVICES"
CU_MASK = "HSA_CU_MASK"
ALLOCATION_ID = "KAIWO_GPU_ALLOCATION_ID"
NODE = "KAIWO_GPU_NODE"
FRACTION_MILLIS = "KAIWO_GPU_FRACTION_MILLIS"
MEMORY_LIMIT_MIB = "KAIWO_GPU_MEMORY_LIMIT_MIB"
ISOLATION = "KAIWO_GPU_ISOLATION"

GRANT_VARIABLES = (
    VISIBLE_DEVICES,
    CU_MASK,
    ALLOCATION_ID,
    NODE,
    FRACTION_MILLIS,
    MEMORY_LIMIT_MIB,
    ISOLATION,
)
"""Every variable a grant may set (HSA_CU_MASK only for cu-mask)."""
