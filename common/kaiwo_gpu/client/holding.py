"""What a held allocation is, whoever renews it (the blocking client's thread or the asyncio
client's task): the grant, its lease's decisions, and how a loss or a failed release is told.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from kaiwo_gpu.client.lease import Lease, Lose, Renew, RenewalStep
from kaiwo_gpu.client.support import quietly
from kaiwo_gpu.common import logs
from kaiwo_gpu.common.errors import FailedPreconditionError, KaiwoGpuError
from kaiwo_gpu.v1 import types_pb2

log = logs.get_logger(__name__)


class Holding:
    """The part of a held allocation both clients share; they add the renewing and the I/O."""

    def __init__(self, on_lost: Callable[[str], None] | None, clock: Callable[[], float]) -> None:
        self.allocation = types_pb2.Allocation()
        self._lease = Lease()
        self._on_lost = on_lost
        self._clock = clock

    @property
    def id(self) -> str:
        return self.allocation.id

    @property
    def environment(self) -> dict[str, str]:
        return dict(self.allocation.environment)

    @property
    def lost(self) -> bool:
        return bool(self._lease.lost_reason)

    @property
    def lost_reason(self) -> str:
        return self._lease.lost_reason

    def _check_not_released(self) -> None:
        """A released holding holds nothing: using it again must not run work without a share."""
        if self._lease.released:
            raise FailedPreconditionError(
                f"allocation {self.id} was released; hold a new one with client.allocation(...)"
            )

    def _grant(self, allocation: types_pb2.Allocation, sent_at: float) -> Renew:
        """Holds the allocation asked for at `sent_at`; returns when to renew first."""
        self.allocation = allocation
        return self._lease.granted(allocation.request.ttl_seconds, sent_at)

    def _after_renewal(self, sent_at: float, error: Exception | None) -> RenewalStep:
        """The lease's next step after the renewal sent at `sent_at` (failed with `error`),
        with a failure logged and a loss reported to the holder."""
        if error is None:
            step = self._lease.renewed(sent_at)
        else:
            step = self._lease.renewal_failed(error, self._clock())
        if isinstance(step, Renew) and step.warning:
            quietly(log.warning, "lease renewal failed", allocation_id=self.id, reason=step.warning)
        elif isinstance(step, Lose):
            quietly(log.warning, "allocation lost", allocation_id=self.id, reason=step.reason)
            if self._on_lost is not None:
                quietly(self._on_lost, step.reason)
        return step

    @contextlib.contextmanager
    def _release_on_exit(self, body_raised: bool) -> Iterator[None]:
        """Around the release at a `with` block's end: the body's exception matters more
        than a failed release (the lease still lapses), so that failure is only logged."""
        try:
            yield
        except KaiwoGpuError as failure:
            if not body_raised:
                raise
            quietly(log.warning, "release failed", allocation_id=self.id, reason=failure.message)
