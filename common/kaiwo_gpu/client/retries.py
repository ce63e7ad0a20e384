"""When a failed call is tried again, and which error ends it: the rules both clients follow.

Pure: each attempt's failure and the clock's reading come in, a decision goes out (retry
after a pause, give up with this error, or a release that was already done), so the rules
are tested without a server and the clients only perform them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from kaiwo_gpu.common.errors import KaiwoGpuError, error_from_status

# UNAVAILABLE: nothing was changed (or the change is replayed by request_id).
# ABORTED: the coordinator lost its conflict retries; the same request_id is safe to resend.
RETRYABLE_STATUSES = frozenset({"UNAVAILABLE", "ABORTED"})
MIN_ATTEMPT_TIMEOUT_S = 0.001


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Full-jitter exponential backoff, bounded by the call's whole deadline."""

    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    attempt_timeout_s: float = 10.0
    """An attempt unanswered for this long is abandoned and tried again while the call's
    deadline allows: a coordinator that froze holding the call must not take all of it
    (the retry reaches another one when the target names several)."""


def try_another_coordinator(failure: Failure) -> bool:
    """Whether a retry of this failure should go to the target's next coordinator: one that
    could not be reached, or left an attempt unanswered (frozen, partitioned, without
    etcd), as opposed to one that answered (ABORTED: conflicts, retried where they were)."""
    return failure.status in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def retry_delays(policy: RetryPolicy, rng: random.Random) -> Iterator[float]:
    """Endless waits between attempts; the caller stops at its deadline."""
    ceiling = policy.initial_backoff_s
    while True:
        yield rng.uniform(0, ceiling)
        ceiling = min(policy.max_backoff_s, ceiling * policy.multiplier)


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed attempt as gRPC reported it: a status name (`UNAVAILABLE`) and the server's
    message; `reached_server` is False only when gRPC says it never connected."""

    status: str
    message: str
    reached_server: bool = True

    def as_error(self, note: str = "") -> KaiwoGpuError:
        """The project's error for this failure, in the server's own words."""
        message = self.message or f"the coordinator call failed ({self.status})"
        return error_from_status(self.status, f"{message} ({note})" if note else message)


@dataclass(frozen=True, slots=True)
class Retry:
    pause_s: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    error: KaiwoGpuError


@dataclass(frozen=True, slots=True)
class AlreadyDone:
    """A release's NOT_FOUND after an attempt that may have reached the server: that attempt
    released it, so the call succeeded (`error` is what it would otherwise raise)."""

    error: KaiwoGpuError


Decision = Retry | GiveUp | AlreadyDone


class Attempts:
    """One call's attempts from its start to its deadline, and what each failure means.

    A call that ran out of time after retryable failures raises the last of them (the
    server's reason), noting the deadline, not the bare timeout of its last, short attempt.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        rng: random.Random,
        *,
        started_at: float,
        timeout_s: float,
        not_found_after_retry_is_done: bool = False,
        alternatives: bool = False,
    ) -> None:
        self.deadline = started_at + timeout_s
        # With another coordinator to go to, no attempt takes more than half the call.
        self._attempt_timeout_s = (
            min(policy.attempt_timeout_s, timeout_s / 2)
            if alternatives
            else policy.attempt_timeout_s
        )
        self._attempt_capped = False  # the last attempt had less time than the call had left
        self._started_at = started_at
        self._timeout_s = timeout_s
        self._delays = retry_delays(policy, rng)
        self._not_found_after_retry_is_done = not_found_after_retry_is_done
        self._failed = 0
        self._last_retried: Failure | None = None
        self._may_have_taken_effect = False

    def timeout_s(self, now: float) -> float:
        """How long the next attempt may take: what is left of the call's time, and no more
        than the policy's attempt timeout."""
        left_s = self.deadline - now
        self._attempt_capped = self._attempt_timeout_s < left_s
        return max(MIN_ATTEMPT_TIMEOUT_S, min(left_s, self._attempt_timeout_s))

    def failed(self, failure: Failure, now: float) -> Decision:
        """What to do after this attempt failed at `now`."""
        self._failed += 1
        done_before = self._not_found_after_retry_is_done and self._may_have_taken_effect
        if failure.status == "NOT_FOUND" and done_before:
            return AlreadyDone(failure.as_error())
        attempt_timed_out = failure.status == "DEADLINE_EXCEEDED" and self._attempt_capped
        if failure.status == "DEADLINE_EXCEEDED" and not attempt_timed_out:
            if self._last_retried is not None:
                why = "the last attempt timed out"
                return GiveUp(self._at_deadline(self._last_retried, now, why))
            return GiveUp(failure.as_error())
        if failure.status not in RETRYABLE_STATUSES and not attempt_timed_out:
            return GiveUp(failure.as_error())
        pause_s = next(self._delays)
        if now + pause_s >= self.deadline:
            return GiveUp(
                self._at_deadline(failure, now, "the next retry was due past the deadline")
            )
        self._last_retried = failure
        self._may_have_taken_effect |= failure.reached_server
        return Retry(pause_s)

    def _at_deadline(self, failure: Failure, now: float, why: str) -> KaiwoGpuError:
        """The server's error, with how long the call ran of its time and why it stopped."""
        elapsed_s = min(now - self._started_at, self._timeout_s)
        return failure.as_error(
            f"gave up after {self._failed} attempts in {elapsed_s:.2g}s of the call's "
            f"{self._timeout_s:g}s; {why}"
        )
