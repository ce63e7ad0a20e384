"""A held allocation's lease as its renewer sees it: when to renew, how long a renewal may
take, and what each renewal's outcome means (renew again, the lease is lost, or stop).

Pure: the clock's readings come in with each event, so a lease that no renewal reached for
a whole TTL is tested without waiting for one; the blocking client's thread and the asyncio
client's task only perform the steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from kaiwo_gpu.common.errors import FailedPreconditionError, KaiwoGpuError, NotFoundError

RETRY_FAILED_RENEWAL_S = 0.2


def keepalive_interval_s(ttl_seconds: int) -> float:
    """A third of the lease, so two renewals in a row may fail before it lapses."""
    return max(0.5, min(60.0, ttl_seconds / 3))


@dataclass(frozen=True, slots=True)
class Renew:
    """Send the next renewal `after_s` from now; `warning` is a failure the lease may outlast."""

    after_s: float
    warning: str = ""


@dataclass(frozen=True, slots=True)
class Lose:
    """The lease is gone, or nobody can renew it any more: stop, and tell the holder why."""

    reason: str


@dataclass(frozen=True, slots=True)
class Stop:
    """Released on purpose: stop renewing; nothing was lost."""


RenewalStep = Renew | Lose | Stop


class Lease:
    """The renewal decisions of one held allocation, from its grant to its release or loss."""

    def __init__(self) -> None:
        self.ttl_s = 0
        self.lost_reason = ""
        self._granted = False
        self._released = False
        self._renewed_at = 0.0  # when the last renewal that succeeded (or the grant) was sent

    @property
    def interval_s(self) -> float:
        return keepalive_interval_s(self.ttl_s)

    @property
    def renewal_timeout_s(self) -> float:
        """One renewal, retries included, may take until the next one is due: an answer that
        comes late still counts (a renewal the coordinator applied is not a failure)."""
        return self.interval_s

    def granted(self, ttl_s: int, sent_at: float) -> Renew:
        """The allocation asked for at `sent_at` was placed with this lease."""
        self.ttl_s = ttl_s
        self._granted = True
        self._renewed_at = sent_at
        return Renew(self.interval_s)

    def renewed(self, sent_at: float) -> RenewalStep:
        """The renewal sent at `sent_at` succeeded."""
        if self._released:
            return Stop()
        self._renewed_at = sent_at
        return Renew(self.interval_s)

    def renewal_failed(self, error: Exception, now: float) -> RenewalStep:
        """A renewal failed with `error`, noticed at `now`."""
        if self._released:  # the release, or a renewal that raced it, found it gone
            return Stop()
        if isinstance(error, NotFoundError | FailedPreconditionError):  # gone, or cannot renew
            return self._lose(error.message)
        if not isinstance(error, KaiwoGpuError):  # e.g. a bug under it; nothing will renew it
            return self._lose(f"lease renewal stopped: {error!r}")
        if self.ttl_s and now - self._renewed_at >= self.ttl_s:
            # etcd has dropped the lease by now, and the share may be someone else's.
            return self._lose(f"no renewal succeeded for {self.ttl_s}s ({error.message})")
        return Renew(RETRY_FAILED_RENEWAL_S, warning=error.message)  # unreachable for now

    @property
    def released(self) -> bool:
        return self._released

    def mark_released(self) -> bool:
        """Renewing ends here; True the first time for a granted lease: send the release.
        Before the grant there is nothing to release, and nothing ends."""
        if not self._granted:
            return False
        send = not self._released
        self._released = True
        return send

    def _lose(self, reason: str) -> Lose:
        self.lost_reason = reason
        return Lose(reason)
