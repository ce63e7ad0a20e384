"""The clients' pure rules without a server: retries and deadlines, calls and paging, leases.

Failures and clock readings go in, decisions come out; the clients only perform them.
"""

from __future__ import annotations

import random

import grpc
import pytest

from kaiwo_gpu.client import calls
from kaiwo_gpu.client.core import failure_of
from kaiwo_gpu.client.lease import Lease, Lose, Renew, Stop, keepalive_interval_s
from kaiwo_gpu.client.retries import (
    AlreadyDone,
    Attempts,
    Failure,
    GiveUp,
    Retry,
    RetryPolicy,
    retry_delays,
)
from kaiwo_gpu.client.support import workload_environment
from kaiwo_gpu.common.errors import (
    ConflictError,
    DeadlineExceededError,
    FailedPreconditionError,
    NoCapacityError,
    NotFoundError,
    RemoteInvalidArgumentError,
    UnavailableError,
)
from kaiwo_gpu.common.grant_variables import GRANT_VARIABLES
from kaiwo_gpu.v1 import allocation_pb2, types_pb2

UNAVAILABLE = Failure("UNAVAILABLE", "etcd is unavailable")
NEVER_CONNECTED = Failure("UNAVAILABLE", "failed to connect to all addresses", reached_server=False)
TIMED_OUT = Failure("DEADLINE_EXCEEDED", "Deadline Exceeded")
GONE = Failure("NOT_FOUND", "allocation a1 not found")


class LongestPause(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


def attempts(timeout_s: float = 10.0, *, release: bool = False) -> Attempts:
    """A call started at 0 with pauses 0.1, 0.2, 0.4, 0.4, ... (no jitter)."""
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.4, multiplier=2)
    return Attempts(
        policy,
        LongestPause(),
        started_at=0.0,
        timeout_s=timeout_s,
        not_found_after_retry_is_done=release,
    )


def given_up(decision: object) -> Exception:
    assert isinstance(decision, GiveUp), decision
    return decision.error


def test_retryable_failures_are_retried_with_growing_capped_pauses() -> None:
    call = attempts()
    pauses = [call.failed(UNAVAILABLE, now) for now in (0.0, 0.1, 0.3, 0.7)]
    assert pauses == [Retry(0.1), Retry(0.2), Retry(0.4), Retry(0.4)]
    assert call.failed(Failure("ABORTED", "conflict"), 1.1) == Retry(0.4)


def test_jittered_pauses_stay_under_the_ceiling() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.4, multiplier=2)
    delays = retry_delays(policy, random.Random(7))
    for ceiling in (0.1, 0.2, 0.4, 0.4, 0.4):
        assert 0 <= next(delays) <= ceiling


def test_each_attempt_gets_what_is_left_of_the_deadline() -> None:
    call = attempts(timeout_s=2.0)
    assert call.timeout_s(0.5) == 1.5
    assert call.timeout_s(5.0) == 0.001  # past it: gRPC fails at once rather than waiting


@pytest.mark.parametrize(
    ("failure", "kind"),
    [
        (Failure("RESOURCE_EXHAUSTED", "no GPU can take it"), NoCapacityError),
        (Failure("INVALID_ARGUMENT", "strategy: 'x' is not allowed"), RemoteInvalidArgumentError),
        (GONE, NotFoundError),
        (TIMED_OUT, DeadlineExceededError),
    ],
)
def test_other_failures_end_the_call_with_the_servers_own_error(
    failure: Failure, kind: type[Exception]
) -> None:
    error = given_up(attempts().failed(failure, 0.0))
    assert type(error) is kind
    assert str(error) == failure.message


def test_no_retry_that_the_deadline_would_cut_short() -> None:
    call = attempts(timeout_s=0.35)
    assert call.failed(UNAVAILABLE, 0.0) == Retry(0.1)
    assert call.failed(UNAVAILABLE, 0.1) == Retry(0.2)
    error = given_up(call.failed(UNAVAILABLE, 0.3))  # 0.3 + 0.4 is past 0.35
    assert isinstance(error, UnavailableError)
    assert str(error) == (
        "etcd is unavailable (gave up after 3 attempts in 0.3s of the call's 0.35s; "
        "the next retry was due past the deadline)"
    )


def test_a_timeout_after_retryable_failures_raises_the_last_servers_error() -> None:
    call = attempts(timeout_s=1.0)
    assert call.failed(UNAVAILABLE, 0.0) == Retry(0.1)
    assert call.failed(Failure("ABORTED", "lost the conflict retries"), 0.1) == Retry(0.2)
    error = given_up(call.failed(TIMED_OUT, 1.0))
    assert isinstance(error, ConflictError)
    assert str(error) == (
        "lost the conflict retries (gave up after 3 attempts in 1s of the call's 1s; "
        "the last attempt timed out)"
    )


def test_a_failure_without_a_message_says_which_status_it_was() -> None:
    error = given_up(attempts().failed(Failure("INTERNAL", ""), 0.0))
    assert str(error) == "the coordinator call failed (INTERNAL)"


@pytest.mark.parametrize(
    ("release", "earlier", "done"),
    [
        (True, UNAVAILABLE, True),  # the earlier attempt may have released it
        (True, NEVER_CONNECTED, False),  # it never reached the server: NOT_FOUND is real
        (True, None, False),  # no earlier attempt
        (False, UNAVAILABLE, False),  # only a release treats NOT_FOUND so
    ],
)
def test_a_retried_release_that_finds_nothing_was_done_only_if_it_may_have_reached(
    release: bool, earlier: Failure | None, done: bool
) -> None:
    call = attempts(release=release)
    if earlier is not None:
        assert isinstance(call.failed(earlier, 0.0), Retry)
    decision = call.failed(GONE, 0.1)
    assert not isinstance(decision, Retry)
    assert isinstance(decision, AlreadyDone) == done
    assert isinstance(decision.error, NotFoundError)


def test_a_release_done_before_returns_nothing_and_other_calls_raise() -> None:
    done_before = AlreadyDone(NotFoundError("gone"))
    assert calls.release("a1", None).outcome(done_before) is None
    with pytest.raises(NotFoundError, match="gone"):
        calls.get("a1").outcome(done_before)
    with pytest.raises(UnavailableError, match="down"):
        calls.release("a1", None).outcome(GiveUp(UnavailableError("down")))


def test_calls_carry_their_message_reply_reading_and_time_limit() -> None:
    release = calls.release("a1", 2.5)
    assert release.message == allocation_pb2.ReleaseRequest(allocation_id="a1")
    assert release.timeout_s == 2.5
    record = types_pb2.Allocation(id="a1")
    assert release.result(allocation_pb2.ReleaseResponse(allocation=record)) == record
    nodes = calls.nodes({"zone": "a"})
    assert nodes.message == allocation_pb2.ListNodesRequest(labels={"zone": "a"})
    assert nodes.timeout_s is None  # the client's own


def test_a_listing_asks_page_after_page_until_the_token_runs_out() -> None:
    pages = calls.ListPages("team/a", "", {"team": "ml"})
    tokens = []
    for reply_ids, next_token in ((["a1", "a2"], "p2"), (["a3"], "")):
        assert not pages.complete
        page = pages.next_call()
        assert isinstance(page.message, allocation_pb2.ListAllocationsRequest)
        assert (page.message.owner, dict(page.message.labels)) == ("team/a", {"team": "ml"})
        tokens.append(page.message.page_token)
        reply = allocation_pb2.ListAllocationsResponse(
            allocations=[types_pb2.Allocation(id=i) for i in reply_ids],
            next_page_token=next_token,
        )
        pages.add(page.result(reply))
    assert pages.complete
    assert tokens == ["", "p2"]
    assert [a.id for a in pages.found] == ["a1", "a2", "a3"]


def test_a_bare_rpc_error_reads_as_unknown_and_may_have_reached() -> None:
    assert failure_of(grpc.RpcError()) == Failure("UNKNOWN", "", reached_server=True)


def granted(ttl_s: int = 30, at: float = 0.0) -> Lease:
    lease = Lease()
    assert lease.granted(ttl_s, at) == Renew(keepalive_interval_s(ttl_s))
    return lease


@pytest.mark.parametrize(("ttl_s", "interval_s"), [(30, 10.0), (600, 60.0), (1, 0.5)])
def test_renewals_come_every_third_of_the_ttl_and_may_take_until_the_next(
    ttl_s: int, interval_s: float
) -> None:
    lease = granted(ttl_s)
    assert (lease.interval_s, lease.renewal_timeout_s) == (interval_s, interval_s)
    assert lease.renewed(interval_s) == Renew(interval_s)


def test_an_unreachable_coordinator_is_outlasted_until_a_whole_ttl_without_a_renewal() -> None:
    lease = granted(ttl_s=30, at=0.0)
    assert lease.renewed(10.0) == Renew(10.0)  # the TTL counts from when this one was sent
    assert lease.renewal_failed(UnavailableError("etcd is down"), 25.0) == Renew(
        0.2, warning="etcd is down"
    )
    assert isinstance(lease.renewal_failed(UnavailableError("etcd is down"), 39.9), Renew)
    lost = lease.renewal_failed(UnavailableError("etcd is down"), 40.0)
    assert lost == Lose("no renewal succeeded for 30s (etcd is down)")
    assert lease.lost_reason == lost.reason


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (NotFoundError("allocation a1 not found"), "allocation a1 not found"),
        (FailedPreconditionError("this client is closed"), "this client is closed"),
        (RuntimeError("bug"), "lease renewal stopped: RuntimeError('bug')"),
    ],
)
def test_a_lease_that_is_gone_or_cannot_be_renewed_is_lost_at_once(
    error: Exception, reason: str
) -> None:
    lease = granted()
    assert lease.renewal_failed(error, 1.0) == Lose(reason)
    assert lease.lost_reason == reason


def test_after_a_release_renewing_stops_and_nothing_is_lost() -> None:
    lease = granted()
    assert lease.mark_released()  # the first release is sent
    assert not lease.mark_released()  # a second is not
    assert lease.renewal_failed(NotFoundError("a1 released"), 1.0) == Stop()
    assert lease.renewed(1.0) == Stop()
    assert lease.lost_reason == ""


def test_nothing_is_released_before_a_grant() -> None:
    assert not Lease().mark_released()


def test_the_workload_environment_replaces_every_grant_variable() -> None:
    inherited = dict.fromkeys(GRANT_VARIABLES, "inherited") | {"HOME": "/home/a"}
    grant = types_pb2.Allocation(environment={"ROCR_VISIBLE_DEVICES": "1"})
    assert workload_environment(inherited, grant) == {
        "HOME": "/home/a",
        "ROCR_VISIBLE_DEVICES": "1",
    }


def test_an_attempt_gets_at_most_its_own_timeout_and_one_that_runs_out_is_tried_again() -> None:
    """Review finding: a call held by a frozen coordinator waited its whole deadline while
    another one was healthy. An attempt now gives up after attempt_timeout_s and the call
    is tried again; only the call's own deadline ends it."""
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.4, attempt_timeout_s=10.0)
    call = Attempts(policy, LongestPause(), started_at=0.0, timeout_s=30.0)
    assert call.timeout_s(0.0) == 10.0
    assert call.failed(TIMED_OUT, 10.0) == Retry(0.1)
    assert call.timeout_s(10.1) == 10.0
    assert call.failed(TIMED_OUT, 20.1) == Retry(0.2)
    assert call.timeout_s(20.3) == pytest.approx(9.7)  # what is left of the call
    ended = call.failed(TIMED_OUT, 30.0)
    assert isinstance(ended, GiveUp)
    assert isinstance(ended.error, DeadlineExceededError)
    assert "gave up after 3 attempts" in ended.error.message
