"""Each strategy's distinctive choice, and a contract every registered strategy keeps."""

from __future__ import annotations

import pytest

from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.common.models import AllocationRequest, Health, Isolation, Selector
from kaiwo_gpu.coordinator.placement.cluster import Gpu, GpuShare, Node, PlacedAllocation, Telemetry
from kaiwo_gpu.coordinator.placement.cumask import parse_id_ranges
from kaiwo_gpu.coordinator.placement.engine import NoFit, Placement, Reason, place
from kaiwo_gpu.coordinator.placement.environment import grant_environment
from kaiwo_gpu.coordinator.placement.snapshot import ClusterSnapshot
from kaiwo_gpu.coordinator.placement.strategies import BUILTIN_STRATEGIES, SchedulerState

VRAM = 65536
CUS = 110


def gpu(node: str, index: int, health: Health = Health.HEALTHY, partition: str = "") -> Gpu:
    return Gpu(
        f"GPU-{node}-{index}", node, index, f"0000:{index:02x}:00.0", "MI250X", VRAM, CUS,
        health=health, compute_partition=partition,
    )  # fmt: skip


def cluster(*node_gpus: int, **node_kwargs: object) -> list[Node]:
    return [
        Node(f"n{n}", tuple(gpu(f"n{n}", i) for i in range(count)), **node_kwargs)  # type: ignore[arg-type]
        for n, count in enumerate(node_gpus)
    ]


def holding(allocation_id: str, node: str, index: int, millis: int) -> PlacedAllocation:
    return PlacedAllocation(
        allocation_id, node, (GpuShare(f"GPU-{node}-{index}", millis, millis * VRAM // 1000),)
    )


def ask(strategy: str, fraction: int = 250, **kwargs: object) -> AllocationRequest:
    return AllocationRequest("r", fraction_millis=fraction, strategy=strategy, **kwargs)  # type: ignore[arg-type]


def placed(decision: Placement | NoFit) -> Placement:
    assert isinstance(decision, Placement), decision
    return decision


def spots(decision: Placement | NoFit) -> list[tuple[str, int]]:
    return [grant.gpu.key for grant in placed(decision).grants]


# A cluster where GPU n0/0 is 600 full, n0/1 200 full, n0/2 empty, n1/0 700 full.
PARTLY_FULL = ClusterSnapshot.build(
    cluster(3, 1),
    [
        holding("a", "n0", 0, 600),
        holding("b", "n0", 1, 200),
        holding("c", "n1", 0, 700),
    ],
)


def test_first_fit_takes_the_first_gpu_in_order_that_fits() -> None:
    assert spots(place(ask("first-fit", 300), PARTLY_FULL)) == [("n0", 0)]
    assert spots(place(ask("first-fit", 500), PARTLY_FULL)) == [("n0", 1)]


def test_best_fit_takes_the_tightest_gpu() -> None:
    assert spots(place(ask("best-fit", 300), PARTLY_FULL)) == [("n1", 0)]
    assert spots(place(ask("best-fit", 400), PARTLY_FULL)) == [("n0", 0)]


def test_worst_fit_takes_the_emptiest_gpu() -> None:
    assert spots(place(ask("worst-fit", 100), PARTLY_FULL)) == [("n0", 2)]


def test_round_robin_rotates_and_wraps() -> None:
    snapshot = ClusterSnapshot.build(cluster(2, 2))
    state = SchedulerState()
    seen = []
    for _ in range(5):
        decision = placed(place(ask("round-robin", 100), snapshot, state))
        seen.extend(spots(decision))
        state = decision.state
    assert seen == [("n0", 0), ("n0", 1), ("n1", 0), ("n1", 1), ("n0", 0)]


def test_round_robin_skips_gpus_that_do_not_fit() -> None:
    state = SchedulerState(round_robin_after=("n0", 0))
    assert spots(place(ask("round-robin", 500), PARTLY_FULL, state)) == [("n0", 1)]
    state = SchedulerState(round_robin_after=("n0", 2))
    assert spots(place(ask("round-robin", 500), PARTLY_FULL, state)) == [("n0", 1)]


def test_load_balanced_avoids_the_busiest_by_telemetry() -> None:
    nodes = cluster(1, 1, 1)
    telemetry = {
        "GPU-n0-0": Telemetry(gfx_activity_percent=95),
        "GPU-n1-0": Telemetry(gfx_activity_percent=5),
        "GPU-n2-0": Telemetry(gfx_activity_percent=40),
    }
    snapshot = ClusterSnapshot.build(nodes, telemetry=telemetry)
    assert spots(place(ask("load-balanced"), snapshot)) == [("n1", 0)]


def test_load_balanced_avoids_hot_and_degraded_gpus() -> None:
    nodes = [
        Node("n0", (gpu("n0", 0, Health.DEGRADED),)),
        Node("n1", (gpu("n1", 0),)),
        Node("n2", (gpu("n2", 0),)),
    ]
    telemetry = {"GPU-n1-0": Telemetry(hotspot_temperature_c=104.0)}
    snapshot = ClusterSnapshot.build(nodes, telemetry=telemetry)
    assert spots(place(ask("load-balanced"), snapshot)) == [("n2", 0)]


def test_unknown_strategy_names_the_field_and_choices() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        place(ask("tetris"), PARTLY_FULL)
    assert caught.value.field == "strategy"
    assert "best-fit" in caught.value.allowed


def test_refusal_counts_gpus_per_constraint() -> None:
    nodes = [
        Node("n0", (gpu("n0", 0), gpu("n0", 1, Health.UNHEALTHY))),
        Node("n1", (gpu("n1", 0),), schedulable=False),
    ]
    snapshot = ClusterSnapshot.build(nodes, [holding("a", "n0", 0, 900)])
    decision = place(AllocationRequest("r", memory_mib=20000), snapshot)
    assert isinstance(decision, NoFit)
    assert dict(decision.reasons) == {
        Reason.LACKS_MILLIS: 1,
        Reason.UNHEALTHY: 1,
        Reason.NODE_UNSCHEDULABLE: 1,
    }
    assert decision.message.startswith("no GPU can take 20000 MiB: ")
    assert "1 are unhealthy" in decision.message
    error = decision.to_error()
    assert error.status_code == "RESOURCE_EXHAUSTED"
    assert ("unhealthy", 1) in error.reasons


@pytest.fixture(params=sorted(BUILTIN_STRATEGIES))
def strategy(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class TestEveryStrategy:
    def test_places_on_an_empty_cluster(self, strategy: str) -> None:
        decision = placed(place(ask(strategy), ClusterSnapshot.build(cluster(2, 2))))
        assert decision.strategy == strategy
        assert decision.grants[0].millis == 250
        assert decision.grants[0].memory_mib == VRAM // 4

    def test_refuses_with_reasons_when_full(self, strategy: str) -> None:
        snapshot = ClusterSnapshot.build(cluster(1), [holding("a", "n0", 0, 900)])
        decision = place(ask(strategy, 200), snapshot)
        assert isinstance(decision, NoFit)
        assert decision.reasons == ((Reason.LACKS_MILLIS, 1),)

    def test_never_uses_unhealthy_gpus_or_unschedulable_nodes(self, strategy: str) -> None:
        nodes = [
            Node("n0", (gpu("n0", 0, Health.UNHEALTHY), gpu("n0", 1))),
            Node("n1", (gpu("n1", 0),), schedulable=False),
        ]
        assert spots(place(ask(strategy), ClusterSnapshot.build(nodes))) == [("n0", 1)]

    def test_multi_gpu_lands_on_one_node(self, strategy: str) -> None:
        snapshot = ClusterSnapshot.build(cluster(1, 3, 2), [holding("a", "n1", 0, 900)])
        decision = placed(place(ask(strategy, 500, count=2), snapshot))
        assert len({grant.gpu.node for grant in decision.grants}) == 1
        assert len(decision.grants) == 2
        refused = place(ask(strategy, 500, count=4), snapshot)
        assert isinstance(refused, NoFit)
        assert "no node has enough" in refused.message

    def test_does_not_join_a_non_sharing_allocation(self, strategy: str) -> None:
        private = PlacedAllocation("p", "n0", (GpuShare("GPU-n0-0", 200, 100),), sharing=False)
        snapshot = ClusterSnapshot.build(cluster(2), [private])
        assert spots(place(ask(strategy), snapshot)) == [("n0", 1)]

    def test_exclusive_takes_an_idle_gpu_whole(self, strategy: str) -> None:
        snapshot = ClusterSnapshot.build(cluster(2), [holding("a", "n0", 0, 100)])
        request = AllocationRequest("r", isolation=Isolation.EXCLUSIVE, strategy=strategy)
        grant = placed(place(request, snapshot)).grants[0]
        assert (grant.gpu.key, grant.millis, grant.memory_mib) == (("n0", 1), 1000, VRAM)

    def test_partition_needs_a_hardware_partition(self, strategy: str) -> None:
        nodes = [Node("n0", (gpu("n0", 0), gpu("n0", 1, partition="CPX")))]
        request = AllocationRequest("r", isolation=Isolation.PARTITION, strategy=strategy)
        assert spots(place(request, ClusterSnapshot.build(nodes))) == [("n0", 1)]
        refused = place(request, ClusterSnapshot.build(cluster(2)))
        assert isinstance(refused, NoFit)
        assert refused.reasons == ((Reason.NOT_A_PARTITION, 2),)

    def test_cu_mask_grants_disjoint_whole_cus_and_renders_them(self, strategy: str) -> None:
        snapshot = ClusterSnapshot.build(cluster(1))
        masks = []
        for n in range(3):
            request = ask(strategy, 300, isolation=Isolation.CU_MASK)
            decision = placed(place(request, snapshot))
            grant = decision.grants[0]
            assert len(grant.compute_units) == 33  # 0.3 x 110 CUs, rounded up
            assert grant.millis == 300  # 33 of 110 CUs are exactly 0.3
            env = grant_environment(decision, f"a{n}")
            visible, _, units = env["HSA_CU_MASK"].partition(":")
            assert visible == "0"
            assert parse_id_ranges(units) == grant.compute_units
            masks.append(set(grant.compute_units))
            snapshot = snapshot.with_allocation(decision.as_allocation(f"a{n}"))
        assert sum(len(m) for m in masks) == len(set().union(*masks)), "CU sets overlap"

    def test_respects_the_selector(self, strategy: str) -> None:
        nodes = [
            Node("n0", (gpu("n0", 0),), labels=(("zone", "a"),)),
            Node("n1", (gpu("n1", 0),), labels=(("zone", "b"),)),
            Node("n2", (gpu("n2", 0),), labels=(("zone", "b"),)),
        ]
        selector = Selector(node_labels=(("zone", "b"),), exclude_nodes=frozenset({"n2"}))
        decision = place(ask(strategy, selector=selector), ClusterSnapshot.build(nodes))
        assert spots(decision) == [("n1", 0)]

    def test_places_only_on_the_named_nodes(self, strategy: str) -> None:
        nodes = [Node(f"n{i}", (gpu(f"n{i}", 0),)) for i in range(4)]
        pinned = ask(strategy, selector=Selector(nodes=frozenset({"n2"})))
        assert spots(place(pinned, ClusterSnapshot.build(nodes))) == [("n2", 0)]
        elsewhere = ask(strategy, selector=Selector(nodes=frozenset({"n9"})))
        assert isinstance(place(elsewhere, ClusterSnapshot.build(nodes)), NoFit)

    def test_does_not_depend_on_input_order(self, strategy: str) -> None:
        nodes = cluster(3, 2, 2)
        allocations = [holding("a", "n0", 1, 400), holding("b", "n2", 0, 700)]
        forward = ClusterSnapshot.build(nodes, allocations)
        backward = ClusterSnapshot.build(reversed(nodes), reversed(allocations))
        assert place(ask(strategy), forward) == place(ask(strategy), backward)


def test_environment_lists_devices_and_allocation() -> None:
    snapshot = ClusterSnapshot.build(cluster(4))
    request = ask("first-fit", 500, count=2, isolation=Isolation.CU_MASK)
    env = grant_environment(placed(place(request, snapshot)), "alloc-1")
    assert env["ROCR_VISIBLE_DEVICES"] == "0,1"
    assert env["HSA_CU_MASK"] == "0:0-54;1:0-54"
    assert env["KAIWO_GPU_ALLOCATION_ID"] == "alloc-1"
    assert env["KAIWO_GPU_MEMORY_LIMIT_MIB"] == f"{VRAM // 2},{VRAM // 2}"
