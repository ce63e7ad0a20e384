"""The coordinator: cluster snapshot, strategy engine and (later) etcd store and servicers."""

from kaiwo_gpu.coordinator.cluster import Gpu, GpuShare, Node, PlacedAllocation, Telemetry
from kaiwo_gpu.coordinator.engine import NoFit, Placement, Reason, place
from kaiwo_gpu.coordinator.snapshot import ClusterSnapshot
from kaiwo_gpu.coordinator.strategies import (
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
