"""Decides a batch of allocation requests as one guarded transaction (pure).

`decide_batch` places each request on a snapshot that already holds the ones placed before
it, so a batch never double-books a GPU; what no longer fits in one etcd transaction waits
for the next batch, in arrival order. The answer is data: the commit plan, what it places,
what was refused and why, and which placements still need a lease. The allocator performs
it (grants the leases, commits, answers the callers); nothing here waits or writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from kaiwo_gpu.common.errors import KaiwoGpuError, NoCapacityError, UnavailableError
from kaiwo_gpu.common.models import AllocationRequest
from kaiwo_gpu.coordinator.placement.cluster import PlacedAllocation
from kaiwo_gpu.coordinator.placement.engine import NoFit, place
from kaiwo_gpu.coordinator.placement.snapshot import ClusterSnapshot
from kaiwo_gpu.coordinator.placement.strategies import (
    BUILTIN_STRATEGIES,
    DEFAULT_STRATEGY,
    SchedulerState,
    Strategy,
)
from kaiwo_gpu.coordinator.state.commit_plan import CommitPlan
from kaiwo_gpu.coordinator.state.records import allocation_record
from kaiwo_gpu.coordinator.state.view_state import ViewState
from kaiwo_gpu.v1 import types_pb2


@dataclass(frozen=True, slots=True)
class DecisionPolicy:
    """What the coordinator was configured to decide with."""

    strategies: Mapping[str, Strategy] = field(default_factory=lambda: BUILTIN_STRATEGIES)
    default_strategy: str = DEFAULT_STRATEGY
    default_ttl_s: int | None = None

    def ttl_s(self, request: AllocationRequest) -> int | None:
        """The lease a request gets: its own TTL, else the default (None: no lease)."""
        return request.ttl_seconds or self.default_ttl_s


@dataclass(frozen=True, slots=True)
class BatchItem:
    request: AllocationRequest
    allocation_id: str
    """The id the allocation gets if this decision places it (fresh for each decision)."""
    has_lease: bool = False
    """Granted at an earlier attempt of this request, and kept by this one."""


@dataclass(frozen=True, slots=True)
class BatchDecision:
    """What to do with a batch; every item index appears in exactly one of the outcomes."""

    plan: CommitPlan
    placed: tuple[tuple[int, types_pb2.Allocation], ...]
    """(item index, the record to commit); leases are filled in before the commit."""
    refused: tuple[tuple[int, NoCapacityError], ...]
    """Nothing fits now; a release this coordinator has not seen yet may change that."""
    failed: tuple[tuple[int, KaiwoGpuError], ...]
    """The request cannot be decided at all (an unknown strategy, a blocked view)."""
    leftover: tuple[int, ...]
    """Did not fit in this transaction: decided with the next batch, in order."""
    leases_wanted: tuple[tuple[int, int], ...]
    """(item index, TTL in seconds) for placements that need a lease and have none yet."""
    scheduler_state: SchedulerState
    """The strategies' state after these placements (kept only if they commit)."""


def decide_batch(
    items: Sequence[BatchItem],
    snapshot: ClusterSnapshot,
    view: ViewState,
    *,
    scheduler_state: SchedulerState,
    policy: DecisionPolicy,
    now: datetime,
) -> BatchDecision:
    """Places `items` in order on `snapshot` (the view's, telemetry folded in) as one plan."""
    plan = CommitPlan(view.layout, view)
    placed: list[tuple[int, types_pb2.Allocation]] = []
    refused: list[tuple[int, NoCapacityError]] = []
    failed: list[tuple[int, KaiwoGpuError]] = []
    leftover: list[int] = []
    blocked = view.blocked_reason
    # The last placement joins `snapshot` only when another request is placed after it: the
    # snapshot after a batch's last placement is never read, and adding one cost more than
    # placing it (89 us against 37 us on 512 GPUs, sequential Allocates).
    unseen: PlacedAllocation | None = None
    for index, item in enumerate(items):
        if blocked is not None:
            failed.append((index, UnavailableError(blocked)))
            continue
        if leftover:
            leftover.append(index)  # keep arrival order once the transaction is full
            continue
        if unseen is not None:
            snapshot, unseen = snapshot.with_allocation(unseen), None
        try:
            decision = place(
                item.request,
                snapshot,
                scheduler_state,
                policy.strategies,
                policy.default_strategy,
            )
        except KaiwoGpuError as error:
            failed.append((index, error))
            continue
        if isinstance(decision, NoFit):
            refused.append((index, decision.to_error()))
            continue
        record = allocation_record(
            item.request, decision, item.allocation_id, lease_id=0, created_at=now
        )
        if not plan.add(record):
            leftover.append(index)
            continue
        placed.append((index, record))
        unseen = decision.as_allocation(item.allocation_id)
        scheduler_state = decision.state
    leases_wanted = tuple(
        (index, ttl_s)
        for index, _ in placed
        if not items[index].has_lease and (ttl_s := policy.ttl_s(items[index].request))
    )
    return BatchDecision(
        plan=plan,
        placed=tuple(placed),
        refused=tuple(refused),
        failed=tuple(failed),
        leftover=tuple(leftover),
        leases_wanted=leases_wanted,
        scheduler_state=scheduler_state,
    )
