"""The fault suite's checker finds each kind of violation it claims to check.

A table of zeros from the suite means something only if the checker reports a violation
when one is there: each test here builds a small history and etcd change log with exactly
one thing wrong and expects that invariant, and only that one, to be named.
"""

from __future__ import annotations

from typing import Any

import pytest

from kaiwo_gpu.v1 import types_pb2
from tests.netns import checker
from tests.netns.checker import EtcdChange

PREFIX = "/kaiwo-gpu/v1/"
GPU = "gpu-0"


def node_change(revision: int) -> EtcdChange:
    node = types_pb2.NodeStatus(name="node-0", schedulable=True)
    node.gpus.add(inventory=types_pb2.GpuInventory(uuid=GPU, vram_mib=1000, compute_units=100))
    return EtcdChange(revision, f"{PREFIX}nodes/node-0", node.SerializeToString(), 0)


def put(
    revision: int, allocation_id: str, request_id: str, millis: int, ttl_s: int = 0
) -> list[EtcdChange]:
    record = types_pb2.Allocation(id=allocation_id, request_id=request_id, node="node-0")
    record.request.ttl_seconds = ttl_s
    record.request.sharing = True
    record.gpus.add(uuid=GPU, granted_millis=millis, granted_memory_mib=millis)
    return [
        EtcdChange(revision, f"{PREFIX}allocations/{allocation_id}", record.SerializeToString(), 0),
        EtcdChange(revision, f"{PREFIX}requests/{request_id}", allocation_id.encode(), 0),
    ]


def release(revision: int, allocation_id: str, request_id: str) -> list[EtcdChange]:
    return [
        EtcdChange(revision, f"{PREFIX}allocations/{allocation_id}", None, 0),
        EtcdChange(revision, f"{PREFIX}requests/{request_id}", b"released::", 0),
    ]


def expire(revision: int, allocation_id: str, request_id: str) -> list[EtcdChange]:
    return [
        EtcdChange(revision, f"{PREFIX}allocations/{allocation_id}", None, 0),
        EtcdChange(revision, f"{PREFIX}requests/{request_id}", None, 0),
    ]


def call(op: str, outcome: str, start: float, **fields: Any) -> dict[str, Any]:
    return {"op": op, "outcome": outcome, "start": start, "end": start + 0.1,
            "coordinator": "c0", "client": "alice-0", **fields}  # fmt: skip


def granted(start: float, allocation_id: str, request_id: str, **fields: Any) -> dict[str, Any]:
    return call("allocate", "ok", start, allocation_id=allocation_id, request_id=request_id,
                code="OK", node="node-0", **fields)  # fmt: skip


def released(start: float, allocation_id: str, code: str = "OK") -> dict[str, Any]:
    outcome = "ok" if code == "OK" else "fail"
    return call("release", outcome, start, allocation_id=allocation_id, code=code)


def judged(history: list[dict[str, Any]], changes: list[EtcdChange],
           faults: list[dict[str, Any]] | None = None,
           stamps: dict[int, float] | None = None) -> dict[str, list[str]]:  # fmt: skip
    clock = {"kind": "clock", "wall": 0.0, "monotonic": 0.0}  # expiries on the calls' clock
    seen = checker.Stamps.of({"revision": r, "seen": s} for r, s in (stamps or {}).items())
    report = checker.check(history, changes, [clock, *(faults or [])], prefix=PREFIX,
                           node_ttl_s=4, stamps=seen)  # fmt: skip
    return {name: found for name, found in report.violations.items() if found}


def test_a_clean_run_violates_nothing_and_counts_what_it_replayed() -> None:
    changes = [node_change(1), *put(2, "a1", "r1", 500), *release(3, "a1", "r1")]
    history = [granted(1.0, "a1", "r1"), released(2.0, "a1")]
    report = checker.check(history, changes, [], prefix=PREFIX, node_ttl_s=4)
    assert report.violation_count == 0
    assert report.revisions_checked == 3
    assert report.operations[("allocate", "ok")] == 1
    assert "0  " + checker.GPU_LIMITS in checker.table(report)


def test_an_over_commit_released_before_the_end_is_still_found() -> None:
    changes = [node_change(1), *put(2, "a1", "r1", 600), *put(3, "a2", "r2", 600),
               *release(4, "a2", "r2"), *release(5, "a1", "r1")]  # fmt: skip
    history = [granted(1.0, "a1", "r1"), granted(1.1, "a2", "r2"),
               released(2.0, "a2"), released(2.1, "a1")]  # fmt: skip
    assert list(judged(history, changes)) == [checker.GPU_LIMITS]


def test_an_acknowledged_allocation_missing_from_etcd_is_found() -> None:
    assert list(judged([granted(1.0, "a1", "r1")], [node_change(1)])) == [checker.ACKED_IN_ETCD]


@pytest.mark.parametrize(
    ("ending", "history_tail"),
    [
        (expire, []),  # no lease, yet gone without a release
        (release, []),  # released, but never by its holder
    ],
)
def test_an_allocation_lost_without_its_holder_releasing_it_is_found(
    ending: Any, history_tail: list[dict[str, Any]]
) -> None:
    changes = [node_change(1), *put(2, "a1", "r1", 500), *ending(3, "a1", "r1")]
    assert list(judged([granted(1.0, "a1", "r1"), *history_tail], changes)) == [
        checker.KEPT_UNTIL_RELEASED
    ]


def test_a_lease_gone_before_the_expiry_its_renewal_promised_is_found() -> None:
    changes = [node_change(1), *put(2, "a1", "r1", 500, ttl_s=6), *expire(3, "a1", "r1")]
    history = [
        granted(1.0, "a1", "r1", expires_at=7.0),
        call("keepalive", "ok", 3.0, allocation_id="a1", expires_at=9.0, code="OK"),
        call("keepalive", "fail", 5.0, allocation_id="a1", code="NOT_FOUND"),
    ]
    assert list(judged(history, changes)) == [checker.KEPT_UNTIL_RELEASED]
    late = [*history[:2], call("keepalive", "fail", 9.5, allocation_id="a1", code="NOT_FOUND")]
    assert judged(late, changes) == {}


def test_an_allocation_made_by_a_refused_call_is_found() -> None:
    changes = [node_change(1), *put(2, "a1", "r1", 500), *release(3, "a1", "r1")]
    history = [call("allocate", "fail", 1.0, request_id="r1", code="RESOURCE_EXHAUSTED")]
    assert list(judged(history, changes)) == [checker.NOTHING_FROM_REFUSALS]


def test_two_live_grants_for_one_request_id_are_found() -> None:
    changes = [node_change(1), *put(2, "a1", "r1", 300), *put(3, "a2", "r1", 300),
               *release(4, "a1", "r1"), *release(5, "a2", "r1")]  # fmt: skip
    history = [granted(1.0, "a1", "r1"), granted(1.5, "a2", "r1"),
               released(2.0, "a1"), released(2.1, "a2")]  # fmt: skip
    assert set(judged(history, changes)) == {
        checker.ONE_LIVE_PER_REQUEST,
        checker.ONE_GRANT_PER_REQUEST,
    }


def test_an_unknown_outcome_never_replayed_is_found_and_a_replay_resolves_it() -> None:
    changes = [node_change(1)]
    unknown = call("allocate", "unknown", 1.0, request_id="r1", code="UNAVAILABLE")
    assert list(judged([unknown], changes)) == [checker.UNKNOWNS_RESOLVED]
    replay = call("replay", "fail", 5.0, request_id="r1", code="RESOURCE_EXHAUSTED")
    assert judged([unknown, replay], changes) == {}


def test_capacity_still_held_at_the_end_is_found() -> None:
    changes = [node_change(1), *put(2, "a1", "r1", 500, ttl_s=6)]
    assert list(judged([granted(1.0, "a1", "r1")], changes)) == [checker.CAPACITY_BACK]
    stats = {"kind": "stats", "answers": {"c0": {"allocatedMillis": "500"}}}
    done = [node_change(1), *put(2, "a1", "r1", 500, ttl_s=6), *expire(3, "a1", "r1")]
    assert list(judged([granted(1.0, "a1", "r1")], done, [stats])) == [checker.CAPACITY_BACK]


def test_a_placement_on_a_node_cut_off_past_its_ttl_is_found() -> None:
    cut = {"kind": "fault", "name": "cut", "start": 10.0, "end": 30.0, "cuts_off_node": "node-0",
           "offset_s": 10.0, "duration_s": 20.0}  # fmt: skip
    changes = [node_change(1), *put(2, "a1", "r1", 500), *release(3, "a1", "r1")]
    history = [granted(20.0, "a1", "r1"), released(21.0, "a1")]
    assert list(judged(history, changes, [cut])) == [checker.CUT_OFF_NODES]
    early = [granted(11.0, "a1", "r1"), released(21.0, "a1")]  # before the TTL ran out
    assert judged(early, changes, [cut]) == {}
    listed = {"kind": "nodes", "node": "node-0", "answers": {"c0": {"node-0": True}}}
    assert list(judged(early, changes, [cut, listed])) == [checker.CUT_OFF_NODES]


def test_recovery_is_the_first_grant_on_each_coordinator_after_the_fault() -> None:
    fault = {"kind": "fault", "name": "kill", "start": 10.0, "end": 15.0,
             "offset_s": 10.0, "duration_s": 5.0}  # fmt: skip
    changes = [node_change(1), *put(2, "a1", "r1", 100), *put(3, "a2", "r2", 100),
               *release(4, "a1", "r1"), *release(5, "a2", "r2")]  # fmt: skip
    history = [granted(12.0, "a1", "r1"), {**granted(16.0, "a2", "r2"), "coordinator": "c1"},
               released(17.0, "a1"), released(17.1, "a2")]  # fmt: skip
    report = checker.check(history, changes, [fault], prefix=PREFIX, node_ttl_s=4)
    recovered = {address: (after, healed) for _, address, after, healed in report.recoveries}
    after, healed = recovered["c0"]
    assert after == pytest.approx(2.1)
    assert healed is None  # c0 granted nothing after the fault's end
    after, healed = recovered["c1"]
    assert after == pytest.approx(6.1)
    assert healed == pytest.approx(1.1)


def test_a_grant_after_its_request_id_was_released_is_found() -> None:
    changes = [node_change(1), *put(2, "a1", "r1", 300), *release(3, "a1", "r1"),
               *put(4, "a2", "r1", 300), *release(5, "a2", "r1")]  # fmt: skip
    history = [granted(1.0, "a1", "r1"), released(2.0, "a1"),
               call("replay", "ok", 3.0, request_id="r1", allocation_id="a2", code="OK"),
               released(4.0, "a2")]  # fmt: skip
    assert list(judged(history, changes)) == [checker.ONE_GRANT_PER_REQUEST]


def test_a_release_the_coordinator_refused_does_not_explain_a_tombstone() -> None:
    changes = [node_change(1), *put(2, "a1", "r1", 500), *release(3, "a1", "r1")]
    history = [granted(1.0, "a1", "r1"), released(2.0, "a1", code="PERMISSION_DENIED")]
    assert list(judged(history, changes)) == [checker.KEPT_UNTIL_RELEASED]


def test_a_grant_on_a_gpu_its_node_no_longer_reports_is_found() -> None:
    shrunk = types_pb2.NodeStatus(name="node-0")  # re-registered without gpu-0
    shrunk.gpus.add(inventory=types_pb2.GpuInventory(uuid="gpu-1", vram_mib=1000))
    rewritten = EtcdChange(2, f"{PREFIX}nodes/node-0", shrunk.SerializeToString(), 0)
    changes = [node_change(1), rewritten, *put(3, "a1", "r1", 500), *release(4, "a1", "r1")]
    history = [granted(1.0, "a1", "r1"), released(2.0, "a1")]
    assert list(judged(history, changes)) == [checker.GPU_LIMITS]


def test_a_renewal_answered_after_the_expiry_it_was_sent_before_is_not_an_early_loss() -> None:
    """Sent to a frozen coordinator 1.7 s before the expiry, answered NOT_FOUND after it:
    the lease lapsed while the call waited (seen in the suite, a false alarm then)."""
    changes = [node_change(1), *put(2, "a1", "r1", 500, ttl_s=6), *expire(3, "a1", "r1")]
    sent = {**call("keepalive", "fail", 68.2, allocation_id="a1", code="NOT_FOUND"), "end": 70.1}
    assert judged([granted(62.3, "a1", "r1", expires_at=69.9), sent], changes) == {}


def test_a_lease_etcd_dropped_early_is_found_though_no_call_noticed() -> None:
    """Left to lapse at the end, nobody calls again: the stamps say when etcd dropped it."""
    changes = [node_change(1), *put(2, "a1", "r1", 500, ttl_s=6), *expire(3, "a1", "r1")]
    history = [granted(1.0, "a1", "r1", expires_at=7.0)]
    assert list(judged(history, changes, stamps={2: 1.1, 3: 4.0})) == [checker.KEPT_UNTIL_RELEASED]
    assert judged(history, changes, stamps={2: 1.1, 3: 7.5}) == {}
    assert judged(history, changes) == {}  # no stamps, nothing to judge by


def agent(revision: int, present: bool) -> EtcdChange:
    return EtcdChange(revision, f"{PREFIX}agents/node-0", b"coordinator" if present else None, 0)


def test_a_placement_asked_for_after_the_agent_lapsed_is_found() -> None:
    changes = [node_change(1), agent(2, present=True), agent(3, present=False),
               *put(5, "a1", "r1", 500), *release(6, "a1", "r1")]  # fmt: skip
    stamps = {3: 10.0, 5: 13.2, 6: 14.0}
    late = [granted(13.0, "a1", "r1"), released(14.0, "a1")]
    assert list(judged(late, changes, stamps=stamps)) == [checker.CUT_OFF_NODES]
    racing = [granted(10.5, "a1", "r1"), released(14.0, "a1")]  # decided as the lease lapsed
    assert judged(racing, changes, stamps=stamps) == {}
    back = [*changes[:3], agent(4, present=True), *changes[3:]]  # the agent came back first
    assert judged(late, back, stamps=stamps) == {}


def test_a_release_cut_short_by_a_kill_explains_its_tombstone() -> None:
    """The vanishing tenant is killed mid-Release: the invocation was written, no answer."""
    changes = [node_change(1), *put(2, "a1", "r1", 500), *release(3, "a1", "r1")]
    invoked = {**released(2.0, "a1"), "phase": "invoke", "call_id": "9-1"}
    del invoked["outcome"]
    assert judged([granted(1.0, "a1", "r1"), invoked], changes) == {}
    assert list(judged([granted(1.0, "a1", "r1")], changes)) == [checker.KEPT_UNTIL_RELEASED]
    answered = {**released(2.0, "a1"), "call_id": "9-1"}
    report = checker.check([granted(1.0, "a1", "r1"), invoked, answered], changes,
                           [{"kind": "clock", "wall": 0.0, "monotonic": 0.0}],
                           prefix=PREFIX, node_ttl_s=4)  # fmt: skip
    assert report.operations[("release", "ok")] == 1  # answered: counted once
    assert report.operations[("release", "unknown")] == 0
