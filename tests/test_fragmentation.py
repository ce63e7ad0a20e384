"""frag-aware: the demand mix, the fragmentation measure, and choices that differ from best-fit."""

from __future__ import annotations

import pytest

from kaiwo_gpu.common.models import AllocationRequest, Isolation
from kaiwo_gpu.common.units import MILLIS_PER_GPU
from kaiwo_gpu.coordinator.placement.cluster import Gpu, GpuShare, Node, PlacedAllocation
from kaiwo_gpu.coordinator.placement.engine import NoFit, Placement, place
from kaiwo_gpu.coordinator.placement.fragmentation import (
    EMPTY_MIX,
    FRACTION_CLASSES,
    HALF_LIFE_REQUESTS,
    IDLE_SCAN_LIMIT,
    LOOKAHEAD,
    QUANTUM_MILLIS,
    DemandMix,
    FragmentationAware,
    FragmentationModel,
    fragmentation,
)
from kaiwo_gpu.coordinator.placement.snapshot import ClusterSnapshot
from kaiwo_gpu.coordinator.placement.strategies import BestFit, SchedulerState

VRAM = 65536


def node(name: str, gpus: int) -> Node:
    return Node(
        name,
        tuple(Gpu(f"GPU-{name}-{i}", name, i, f"0000:{i:02x}:00.0", "MI250X", VRAM, 110)
              for i in range(gpus)),
    )  # fmt: skip


def holding(allocation_id: str, node_name: str, index: int, millis: int) -> PlacedAllocation:
    share = GpuShare(f"GPU-{node_name}-{index}", millis, millis * VRAM // MILLIS_PER_GPU)
    return PlacedAllocation(allocation_id, node_name, (share,))


def mix_of(*shapes: tuple[int, int, int]) -> DemandMix:
    """(millis per GPU, GPU count, times), observed in that order."""
    mix = EMPTY_MIX
    for millis, count, times in shapes:
        for _ in range(times):
            mix = mix.observed(millis, count)
    return mix


def slot(millis: int) -> int:
    """The histogram slot of a fractional size (rounded up to its class)."""
    return -(-millis // QUANTUM_MILLIS)


def ask(strategy: str, millis: int, count: int = 1) -> AllocationRequest:
    return AllocationRequest("r", count=count, fraction_millis=millis, strategy=strategy)


def keys(decision: Placement | NoFit) -> list[tuple[str, int]]:
    assert isinstance(decision, Placement), decision
    return [grant.gpu.key for grant in decision.grants]


def test_mix_counts_shapes_in_their_classes() -> None:
    mix = mix_of((250, 1, 1), (251, 1, 1), (1000, 4, 1), (999, 1, 1))
    assert mix.seen == 4
    slots = [index for index, weight in enumerate(mix.weights) if weight]
    # 250 and 251 round up into neighbouring classes; 999 only fits an idle GPU.
    assert slots == [250 // QUANTUM_MILLIS, 250 // QUANTUM_MILLIS + 1, FRACTION_CLASSES + 1,
                     FRACTION_CLASSES + 4]  # fmt: skip


def test_mix_halves_a_request_after_half_life_requests() -> None:
    mix = mix_of((300, 1, 1), (500, 1, HALF_LIFE_REQUESTS))
    newest_weight = mix.increment / 2.0 ** (1 / HALF_LIFE_REQUESTS)
    assert mix.weights[slot(300)] / newest_weight == pytest.approx(0.5)


def test_mix_rescales_before_overflow_and_keeps_proportions() -> None:
    weights = list(EMPTY_MIX.weights)
    weights[slot(300)], weights[slot(500)] = 3e99, 1e99
    rescaled = DemandMix(tuple(weights), increment=1e100, seen=7).observed(500, 1)
    assert rescaled.increment == 1.0
    assert not rescaled.is_empty
    ratio = rescaled.weights[slot(500)] / rescaled.weights[slot(300)]
    assert ratio == pytest.approx((1e99 + 1e100) / 3e99)


def test_fragmentation_counts_what_the_mix_cannot_use() -> None:
    # n0: 150 free, 500 free, one idle GPU; n1: one idle GPU.
    snapshot = ClusterSnapshot.build(
        [node("n0", 3), node("n1", 1)], [holding("a", "n0", 0, 850), holding("b", "n0", 1, 500)]
    )
    index = snapshot.index_for(Isolation.NONE)
    # Only 300-millis requests: just the 150 left over is of no use.
    assert fragmentation(snapshot, index, mix_of((300, 1, 1)), 1) == pytest.approx(150)
    # Only pairs of whole GPUs: partly used GPUs and lone idle GPUs are all useless.
    assert fragmentation(snapshot, index, mix_of((1000, 2, 1)), 1) == pytest.approx(2650)
    # Half each, with equal weights: FGD's expectation, then a lookahead of 2.
    halves = (slot(300), FRACTION_CLASSES + 2)
    weights = tuple(1.0 if i in halves else 0.0 for i in range(len(EMPTY_MIX.weights)))
    even = DemandMix(weights, seen=2)
    assert fragmentation(snapshot, index, even, 1) == pytest.approx(150 + 250 + 2 * 500)
    assert fragmentation(snapshot, index, even, 2) == pytest.approx(150 + 125 + 2 * 250)


@pytest.mark.parametrize("lookahead", [1, LOOKAHEAD])
def test_score_of_a_choice_is_the_change_in_fragmentation(lookahead: int) -> None:
    """The per-level scores a decision uses agree with the full measure before and after."""
    snapshot = ClusterSnapshot.build(
        [node("n0", 3), node("n1", 2), node("n2", 1), node("n3", 3), node("n4", 2)],
        [holding("a", "n0", 0, 850), holding("b", "n0", 1, 300), holding("c", "n1", 0, 450)],
    )
    index = snapshot.index_for(Isolation.NONE)
    mix = mix_of((150, 1, 2), (500, 1, 3), (850, 1, 2), (1000, 1, 2), (1000, 2, 2))
    model = FragmentationModel.of(mix, lookahead)
    before = fragmentation(snapshot, index, mix, lookahead)
    for millis in (100, 500, 1000):
        for pos in index.ascending_free(millis):
            gpu = snapshot.gpus[pos]
            free = snapshot.free_millis(pos)
            after_snapshot = snapshot.with_allocation(holding("x", gpu.node, gpu.index, millis))
            after = fragmentation(after_snapshot, after_snapshot.index_for(Isolation.NONE), mix,
                                  lookahead)  # fmt: skip
            if free < MILLIS_PER_GPU:
                predicted = model.partial_delta(free, millis)
            else:
                idle = sum(snapshot.free_millis(snapshot.position[g.uuid]) == MILLIS_PER_GPU
                           for g in snapshot.nodes[gpu.node].gpus)  # fmt: skip
                predicted = model.idle_delta(idle, millis)
            assert after - before == pytest.approx(predicted), (millis, gpu.key)


def test_before_any_request_it_follows_best_fit() -> None:
    snapshot = ClusterSnapshot.build(
        [node("n0", 4)], [holding("a", "n0", 0, 600), holding("b", "n0", 2, 300)]
    )
    index = snapshot.index_for(Isolation.NONE)
    state = SchedulerState()
    frag = list(FragmentationAware().candidates(snapshot, index, 200, state))
    assert frag == list(BestFit().candidates(snapshot, index, 200, state))
    assert len(frag) == 4


def test_yields_every_open_gpu_once_past_the_idle_scan() -> None:
    nodes = [node(f"n{n:02d}", 8) for n in range(IDLE_SCAN_LIMIT // 8 + 3)]
    taken = [holding(f"a{i}", f"n{i:02d}", 0, 100 + 50 * i) for i in range(12)]
    snapshot = ClusterSnapshot.build(nodes, taken)
    index = snapshot.index_for(Isolation.NONE)
    state = SchedulerState(demand_mix=mix_of((300, 1, 5), (1000, 8, 1)))
    for millis in (100, 400, 1000):
        order = list(FragmentationAware().candidates(snapshot, index, millis, state))
        assert sorted(order) == sorted(index.ascending_free(millis)), millis


def test_the_engine_records_each_placement_in_the_mix() -> None:
    snapshot = ClusterSnapshot.build([node("n0", 2)])
    decision = place(ask("best-fit", 250, count=2), snapshot)
    assert isinstance(decision, Placement)
    assert decision.state.demand_mix.seen == 1
    assert decision.state.demand_mix.weights[slot(250)] > 0


def replay(strategy: str, snapshot: ClusterSnapshot, state: SchedulerState,
           requests: list[AllocationRequest]) -> list[Placement | NoFit]:  # fmt: skip
    decisions = []
    for serial, request in enumerate(requests):
        decision = place(request, snapshot, state)
        decisions.append(decision)
        if isinstance(decision, Placement):
            snapshot = snapshot.with_allocation(decision.as_allocation(f"{strategy}-{serial}"))
            state = decision.state
    return decisions


def test_leaves_room_for_the_common_size_where_best_fit_does_not() -> None:
    # n0/0 has 600 free, n0/1 700; the mix is mostly half GPUs.
    snapshot = ClusterSnapshot.build(
        [node("n0", 2)], [holding("a", "n0", 0, 400), holding("b", "n0", 1, 300)]
    )
    state = SchedulerState(demand_mix=mix_of((200, 1, 1), (500, 1, 9)))
    best = replay("best-fit", snapshot, state, [ask("best-fit", m) for m in (200, 500, 500)])
    frag = replay("frag-aware", snapshot, state, [ask("frag-aware", m) for m in (200, 500, 500)])
    assert keys(best[0]) == [("n0", 0)]  # the tightest: 400 left there, 700 on the other
    assert keys(frag[0]) == [("n0", 1)]  # 500 left there: a half GPU still fits both
    assert isinstance(best[2], NoFit)
    assert all(isinstance(decision, Placement) for decision in frag)


def test_keeps_a_pair_of_idle_gpus_together_where_best_fit_breaks_it() -> None:
    snapshot = ClusterSnapshot.build([node("n0", 2), node("n1", 3)])
    state = SchedulerState(demand_mix=mix_of((1000, 1, 1), (1000, 2, 9)))
    wanted = [(1000, 1), (1000, 2), (1000, 2)]
    best = replay("best-fit", snapshot, state, [ask("best-fit", m, c) for m, c in wanted])
    frag = replay("frag-aware", snapshot, state, [ask("frag-aware", m, c) for m, c in wanted])
    assert keys(best[0]) == [("n0", 0)]
    assert keys(frag[0])[0][0] == "n1"  # n1 keeps a pair; n0 keeps its pair
    assert isinstance(best[2], NoFit)
    assert all(isinstance(decision, Placement) for decision in frag)


def test_opens_an_idle_gpu_rather_than_leave_a_sliver_no_request_can_use() -> None:
    # n0/0 has 550 free, n0/1 is idle; the mix asks for 500 and 550. A 500 beside the 450
    # leaves 50, which no request can use: frag-aware takes the idle GPU instead.
    snapshot = ClusterSnapshot.build([node("n0", 2)], [holding("a", "n0", 0, 450)])
    state = SchedulerState(demand_mix=mix_of((550, 1, 3), (500, 1, 7)))
    wanted = (500, 500, 550)
    best = replay("best-fit", snapshot, state, [ask("best-fit", m) for m in wanted])
    frag = replay("frag-aware", snapshot, state, [ask("frag-aware", m) for m in wanted])
    assert keys(best[0]) == [("n0", 0)]  # the tightest: a 50 sliver left
    assert keys(frag[0]) == [("n0", 1)]
    assert isinstance(best[2], NoFit)  # the 550 finds 50 and 500 free
    assert [keys(decision) for decision in frag[1:]] == [[("n0", 1)], [("n0", 0)]]


def test_a_node_cut_by_the_idle_scan_is_scored_by_all_its_idle_gpus() -> None:
    """11 nodes of 6 idle GPUs: the scan sees n00..n09 whole and 4 of n10's 6. Scored by the
    4 it saw, n10 looked like a node that no 5- or 6-GPU request could use (found by review)."""
    assert IDLE_SCAN_LIMIT == 64
    snapshot = ClusterSnapshot.build([node(f"n{i:02d}", 6) for i in range(11)])
    state = SchedulerState(demand_mix=mix_of((1000, 6, 50), (1000, 5, 50), (250, 1, 50)))
    chosen = place(ask("frag-aware", 250), snapshot, state)
    assert keys(chosen) == keys(place(ask("best-fit", 250), snapshot, state)) == [("n00", 0)]
