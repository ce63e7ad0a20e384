"""The coordinator: the allocation service over gRPC, with its state in etcd.

`placement` decides (pure), `state` knows and changes etcd, `allocator` commits decisions,
`api` serves gRPC and `server` wires them into one process; `local` is for `up`, tests and
benchmarks. This package re-exports what a strategy author needs.
"""

from kaiwo_gpu.coordinator.placement.cluster import Gpu, GpuShare, Node, PlacedAllocation, Telemetry
from kaiwo_gpu.coordinator.placement.engine import NoFit, Placement, Reason, place
from kaiwo_gpu.coordinator.placement.snapshot import ClusterSnapshot
from kaiwo_gpu.coordinator.placement.strategies import (
    BUILTIN_STRATEGIES,
    DEFAULT_STRATEGY,
    SchedulerState,
    Strategy,
    StrategyRegistry,
)

__all__ = [
    "BUILTIN_STRATEGIES",
    "DEFAULT_STRATEGY",
    "ClusterSnapshot",
    "Gpu",
    "GpuShare",
    "NoFit",
    "Node",
    "PlacedAllocation",
    "Placement",
    "Reason",
    "SchedulerState",
    "Strategy",
    "StrategyRegistry",
    "Telemetry",
    "place",
]
