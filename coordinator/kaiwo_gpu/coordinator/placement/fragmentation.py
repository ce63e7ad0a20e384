"""The `frag-aware` strategy: place where the cluster loses least of its ability to serve
the requests it has been seeing, after "Beware of Fragmentation" (FGD, Weng et al., ATC'23).

A free share is a fragment when the mix of recent requests cannot use it: on a GPU with `f`
millis free, a fractional request of `s` millis cannot when `f < s`; a request for `k` whole
GPUs cannot use a partly used GPU, nor an idle one on a node with fewer than `k` idle. FGD
weighs a share by the chance that the next request cannot use it; here by the chance that
the next LOOKAHEAD cannot, which packs better under sustained demand (a sliver that most
sizes miss is waste; a half GPU that a common size fits soon is not). The mix is a decayed
histogram of request shapes (`DemandMix`) that the engine records in SchedulerState. A
decision scores one candidate per distinct free level (from the capacity index) and idle
GPUs node by node, so its work follows the number of free levels, not of GPUs.

Much of its gain over best-fit is that it opens an idle GPU rather than leave a sliver that no
request in the mix can use. What it cannot recover is admission: on the all-fractional
benchmark nearly all of best-fit's waste is the gap beside a task of about 0.85 GPU that
nothing small enough fills, and spending idle GPUs early so fewer such tasks get in gains at
130% requested but loses more at 100% and with departures (`python -m bench packing`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import TYPE_CHECKING

from kaiwo_gpu.common.models import MAX_GPUS_PER_REQUEST
from kaiwo_gpu.common.units import MILLIS_PER_GPU
from kaiwo_gpu.coordinator.placement.capacity_index import CapacityIndex
from kaiwo_gpu.coordinator.placement.snapshot import ClusterSnapshot

if TYPE_CHECKING:
    from kaiwo_gpu.coordinator.placement.cluster import GpuKey
    from kaiwo_gpu.coordinator.placement.strategies import SchedulerState

QUANTUM_MILLIS = 10
"""Fractional sizes are counted in classes this wide, rounded up: a bounded histogram."""
FRACTION_CLASSES = MILLIS_PER_GPU // QUANTUM_MILLIS - 1
"""Fractional classes 1..FRACTION_CLASSES; a request above the last fits only an idle GPU
and is counted as a whole GPU."""
HALF_LIFE_REQUESTS = 1000
"""A request's weight in the mix halves after this many later requests."""
_GROWTH = 2.0 ** (1.0 / HALF_LIFE_REQUESTS)
_RESCALE_ABOVE = 1e100
LOOKAHEAD = 20
"""Requests a free share must fail in a row to count as a fragment (see FragmentationModel)."""
SCORE_DIGITS = 6
"""Scores are rounded to this many decimals of a milli, so float noise never breaks a tie."""
IDLE_SCAN_LIMIT = 64
"""Idle GPUs scored node by node per decision; the rest follow in best-fit order. Bounds
the work on an empty cluster, where every node is idle and any of them is as good."""


@dataclass(frozen=True, slots=True)
class DemandMix:
    """A decayed histogram of request shapes, newest heaviest.

    `weights[q]` for q in 1..FRACTION_CLASSES counts fractional requests of up to
    q * QUANTUM_MILLIS per GPU; `weights[FRACTION_CLASSES + k]` counts requests for k whole
    GPUs (a fractional request for several GPUs counts as one of its per-GPU size). Decay
    without touching every bin: each new request weighs `increment`, which grows by
    _GROWTH, so older ones weigh relatively less; both are rescaled before they overflow.
    """

    weights: tuple[float, ...] = (0.0,) * (FRACTION_CLASSES + MAX_GPUS_PER_REQUEST + 1)
    increment: float = 1.0
    seen: int = 0
    """Requests observed in all, undecayed."""

    @property
    def is_empty(self) -> bool:
        return self.seen == 0

    def observed(self, millis_per_gpu: int, count: int) -> DemandMix:
        """The mix after one more request for `count` GPUs of `millis_per_gpu` each."""
        quantum = -(-millis_per_gpu // QUANTUM_MILLIS)
        if quantum <= FRACTION_CLASSES:
            slot = max(1, quantum)
        else:
            slot = FRACTION_CLASSES + min(max(1, count), MAX_GPUS_PER_REQUEST)  # k at FC + k
        weights = self.weights
        weights = (*weights[:slot], weights[slot] + self.increment, *weights[slot + 1 :])
        increment = self.increment * _GROWTH
        if increment > _RESCALE_ABOVE:
            weights = tuple(w / increment for w in weights)
            increment = 1.0
        return DemandMix(weights, increment, self.seen + 1)


EMPTY_MIX = DemandMix()


def observe_request(state: SchedulerState, millis_per_gpu: int, count: int) -> SchedulerState:
    """The state with one more request in its demand mix. The engine records placements;
    a caller that keeps the state may record refusals too (they are demand as well)."""
    return replace(state, demand_mix=state.demand_mix.observed(millis_per_gpu, count))


@dataclass(frozen=True, slots=True)
class FragmentationModel:
    """The mix folded into what a score needs: O(classes) once per decision.

    A free share is a fragment in proportion to the chance that the next LOOKAHEAD
    requests all cannot use it (FGD's measure is LOOKAHEAD 1).
    """

    unfit: tuple[float, ...]
    """[j]: that chance for a partly free GPU with j = free // QUANTUM + 1 (sizes above)."""
    stranded: tuple[float, ...]
    """[c]: that chance for an idle GPU on a node with c idle: requests for more than c."""

    @staticmethod
    def of(mix: DemandMix, lookahead: int) -> FragmentationModel:
        weights = mix.weights
        inverse = 1.0 / (sum(weights) or 1.0)
        whole = weights[FRACTION_CLASSES + 1 :]  # [k - 1]: requests for k whole GPUs
        more = [*accumulate(reversed(whole), initial=0.0)][::-1]  # [c]: for more than c
        # [j - 1]: fractional classes >= j, and every whole-GPU request (a partly used GPU
        # is of no use to those).
        larger = [*accumulate(reversed(weights[1 : FRACTION_CLASSES + 1]), initial=more[0])]
        return FragmentationModel(
            unfit=(0.0, *[(x * inverse) ** lookahead for x in reversed(larger)]),
            stranded=tuple([(x * inverse) ** lookahead for x in more]),
        )

    def partial_fragment(self, free_millis: int) -> float:
        """The expected unusable share of a partly used GPU with `free_millis` free."""
        if free_millis <= 0:
            return 0.0
        return free_millis * self.unfit[min(free_millis // QUANTUM_MILLIS + 1, len(self.unfit) - 1)]

    def idle_fragment(self, idle_on_node: int) -> float:
        """The same for one idle GPU of a node with `idle_on_node` idle GPUs."""
        return MILLIS_PER_GPU * self.stranded[min(idle_on_node, len(self.stranded) - 1)]

    def partial_delta(self, free_millis: int, millis: int) -> float:
        """Change in fragmentation when `millis` go onto a partly used GPU."""
        return self.partial_fragment(free_millis - millis) - self.partial_fragment(free_millis)

    def idle_delta(self, idle_on_node: int, millis: int) -> float:
        """Change in fragmentation when `millis` go onto one idle GPU of a node with
        `idle_on_node` idle GPUs: that GPU becomes partly used (or full), and the node's
        other idle GPUs are stranded for requests of more whole GPUs than remain."""
        others = idle_on_node - 1
        return (
            self.partial_fragment(MILLIS_PER_GPU - millis)
            - self.idle_fragment(idle_on_node)
            + others * (self.idle_fragment(others) - self.idle_fragment(idle_on_node))
        )


def fragmentation(
    snapshot: ClusterSnapshot, index: CapacityIndex, mix: DemandMix, lookahead: int
) -> float:
    """The cluster's fragmentation over the GPUs in `index`: a full walk, for tests and
    benchmarks, never for a decision."""
    model = FragmentationModel.of(mix, lookahead)
    idle_per_node: dict[str, int] = {}
    total = 0.0
    for pos in index.ascending_free(1):
        free = snapshot.free_millis(pos)
        if free >= MILLIS_PER_GPU:
            node = snapshot.gpus[pos].node
            idle_per_node[node] = idle_per_node.get(node, 0) + 1
        else:
            total += model.partial_fragment(free)
    return total + sum(idle * model.idle_fragment(idle) for idle in idle_per_node.values())


class FragmentationAware:
    """The GPU where the mix of recent requests loses least usable share: packs for demand.

    Best-fit order until a request has been seen, and between equal scores.
    """

    name = "frag-aware"

    def candidates(
        self,
        snapshot: ClusterSnapshot,
        index: CapacityIndex,
        min_free_millis: int,
        state: SchedulerState,
    ) -> Iterator[int]:
        if state.demand_mix.is_empty:
            return index.ascending_free(min_free_millis)
        return _ranked(snapshot, index, min(min_free_millis, MILLIS_PER_GPU), state.demand_mix)

    def advance(self, state: SchedulerState, chosen: tuple[GpuKey, ...]) -> SchedulerState:
        return state  # the engine records every request in the demand mix


def _ranked(
    snapshot: ClusterSnapshot, index: CapacityIndex, millis: int, mix: DemandMix
) -> Iterator[int]:
    model = FragmentationModel.of(mix, LOOKAHEAD)
    free_of = snapshot.free_millis
    # (score, free level, rank): a partial level is walked from the index when its turn
    # comes; an idle node's GPUs are listed. Equal scores keep best-fit order.
    groups: list[tuple[float, int, int, tuple[int, ...]]] = []
    level = millis
    while level < MILLIS_PER_GPU:  # at most MILLIS_PER_GPU rounds: the level only rises
        level = index.least_free_at_least(level)
        if level < 0 or level >= MILLIS_PER_GPU:
            break
        groups.append((round(model.partial_delta(level, millis), SCORE_DIGITS), level, 0, ()))
        level += 1
    idle = index.ascending_free(MILLIS_PER_GPU)
    by_node: dict[str, list[int]] = {}
    for scanned, pos in enumerate(idle, start=1):
        by_node.setdefault(snapshot.gpus[pos].node, []).append(pos)
        if scanned >= IDLE_SCAN_LIMIT:
            break
    idle_scores: dict[int, float] = {}  # by idle GPUs on the node: a few distinct counts
    idle_on = snapshot.idle_by_node
    for rank, (node, positions) in enumerate(by_node.items()):
        # The node's own count, not the scanned one: the scan may stop inside a node.
        idle_count = idle_on.get(node, len(positions))
        score = idle_scores.get(idle_count)
        if score is None:
            score = round(model.idle_delta(idle_count, millis), SCORE_DIGITS)
            idle_scores[idle_count] = score
        groups.append((score, MILLIS_PER_GPU, rank, tuple(positions)))
    groups.sort(key=lambda group: group[:3])
    for _, free, _, listed in groups:
        if listed:
            yield from listed
            continue
        for pos in index.ascending_free(free):
            if free_of(pos) != free:
                break
            yield pos
    yield from idle  # idle GPUs past the scan, in best-fit order
