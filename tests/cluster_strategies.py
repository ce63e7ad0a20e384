"""Hypothesis strategies for random clusters and request streams (shared by property tests)."""

from __future__ import annotations

from collections.abc import Iterator

from hypothesis import strategies as st

from kaiwo_gpu.common.models import AllocationRequest, Health, Isolation, Selector
from kaiwo_gpu.coordinator.placement.capacity_index import CapacityIndex
from kaiwo_gpu.coordinator.placement.cluster import Gpu, Node, Telemetry
from kaiwo_gpu.coordinator.placement.snapshot import ClusterSnapshot
from kaiwo_gpu.coordinator.placement.strategies import BUILTIN_STRATEGIES, SchedulerState


class EveryGpuTwice:
    """A careless strategy: suggests every GPU, full or not, twice. The engine must cope."""

    name = "every-gpu-twice"

    def candidates(
        self,
        snapshot: ClusterSnapshot,
        index: CapacityIndex,
        min_free_millis: int,
        state: SchedulerState,
    ) -> Iterator[int]:
        everything = range(len(snapshot.gpus) - 1, -1, -1)
        yield from everything
        yield from everything

    def advance(self, state: SchedulerState, chosen: tuple[tuple[str, int], ...]) -> SchedulerState:
        return state


STRATEGIES = BUILTIN_STRATEGIES.with_strategy(EveryGpuTwice())
LABEL_VALUES = ("a", "b")
MODELS = ("MI300X", "MI250X", "TINY")


@st.composite
def gpus_for(draw: st.DrawFn, node: str, count: int) -> tuple[Gpu, ...]:
    gpus = []
    for index in range(count):
        model = draw(st.sampled_from(MODELS))
        vram = {"MI300X": 196608, "MI250X": 65536}.get(model) or draw(st.integers(512, 4096))
        units = {"MI300X": 304, "MI250X": 110}.get(model) or draw(st.integers(2, 16))
        gpus.append(
            Gpu(
                uuid=f"GPU-{node}-{index}",
                node=node,
                index=index,
                bdf=f"0000:{index:02x}:00.0",
                model=model,
                vram_mib=vram,
                compute_units=units,
                health=draw(
                    st.sampled_from(
                        [Health.HEALTHY, Health.HEALTHY, Health.DEGRADED, Health.UNHEALTHY]
                    )
                ),
                compute_partition=draw(st.sampled_from(["", "SPX", "CPX"])),
            )
        )
    return tuple(gpus)


@st.composite
def clusters(draw: st.DrawFn, max_nodes: int = 4, max_gpus: int = 4) -> list[Node]:
    nodes = []
    for n in range(draw(st.integers(1, max_nodes))):
        name = f"n{n}"
        nodes.append(
            Node(
                name=name,
                gpus=draw(gpus_for(name, draw(st.integers(1, max_gpus)))),
                labels=(("zone", draw(st.sampled_from(LABEL_VALUES))),),
                schedulable=draw(st.booleans() | st.just(True)),
            )
        )
    return nodes


telemetry_readings = st.builds(
    Telemetry,
    gfx_activity_percent=st.none() | st.integers(0, 100),
    hotspot_temperature_c=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    socket_power_w=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    power_limit_w=st.none() | st.floats(0, 1000) | st.just(float("nan")),
)


def telemetry_for(nodes: list[Node]) -> st.SearchStrategy[dict[str, Telemetry]]:
    """Readings for some GPUs, NaN and infinity included: agents can send those."""
    uuids = [gpu.uuid for node in nodes for gpu in node.gpus]
    return st.dictionaries(st.sampled_from(uuids), telemetry_readings, max_size=len(uuids))


@st.composite
def requests(draw: st.DrawFn, serial: int = 0) -> AllocationRequest:
    isolation = draw(st.sampled_from(list(Isolation)))
    fraction = draw(st.none() | st.integers(100, 1000) | st.sampled_from([100, 250, 500, 1000]))
    memory = draw(st.none() | st.integers(1, 70000))
    if fraction is None and memory is None and isolation in (Isolation.NONE, Isolation.CU_MASK):
        fraction = 250
    selector = Selector(
        node_labels=draw(st.sampled_from([(), (("zone", "a"),)])),
        gpu_models=draw(st.sampled_from([frozenset(), frozenset({"MI300X", "TINY"})])),
        exclude_nodes=draw(st.sampled_from([frozenset(), frozenset({"n0"})])),
    )
    return AllocationRequest(
        request_id=f"r{serial}-{draw(st.integers(0, 10**6))}",
        count=draw(st.integers(1, 3)),
        fraction_millis=fraction,
        memory_mib=memory,
        sharing=draw(st.booleans() | st.just(True)),
        isolation=isolation,
        selector=selector,
        strategy=draw(st.sampled_from(sorted(STRATEGIES))),
    )


# An operation is a request to place, or the index (mod live count) of an allocation to release.
operations = st.lists(st.one_of(requests(), st.integers(0, 1000)), min_size=1, max_size=40)


def released(snapshot: ClusterSnapshot, op: int) -> ClusterSnapshot:
    """The snapshot after a release operation: allocation `op` (mod the live count), if any."""
    if not snapshot.allocations:
        return snapshot
    ids = sorted(snapshot.allocations)
    return snapshot.without_allocation(ids[op % len(ids)])
