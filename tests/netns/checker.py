"""Judges a fault-suite run: the clients' history against etcd's revision history.

Pure: it reads what the run wrote (history lines, etcd's changes under the prefix, the fault
log) and returns a report; nothing here talks to a server. Each invariant has one name, and
the report lists every invariant with its violations, so a table of zeros means each was
checked, not that nothing ran.
"""

from __future__ import annotations

import base64
import bisect
import itertools
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaiwo_gpu.coordinator.state.keys import KeyKind, KeyLayout
from kaiwo_gpu.coordinator.state.view_state import RELEASED_PREFIX
from kaiwo_gpu.v1 import types_pb2
from tests.harness import check_gpus

GPU_LIMITS = "no GPU past 1000 millis or its VRAM, no CU twice (every revision)"
ONE_LIVE_PER_REQUEST = "at most one live allocation per request id (every revision)"
ACKED_IN_ETCD = "every acknowledged allocation was written to etcd"
KEPT_UNTIL_RELEASED = "every acknowledged allocation kept until released or expired"
NOTHING_FROM_REFUSALS = "no allocation from a call that was refused"
ONE_GRANT_PER_REQUEST = "no two grants for one request id"
UNKNOWNS_RESOLVED = "every unknown outcome resolved by a replay"
CAPACITY_BACK = "all capacity back after the leases expire"
CUT_OFF_NODES = "no placement on a node cut off past its TTL"
INVARIANTS = (
    GPU_LIMITS, ONE_LIVE_PER_REQUEST, ACKED_IN_ETCD, KEPT_UNTIL_RELEASED,
    NOTHING_FROM_REFUSALS, ONE_GRANT_PER_REQUEST, UNKNOWNS_RESOLVED, CAPACITY_BACK,
    CUT_OFF_NODES,
)  # fmt: skip
EXPIRY_SLACK_S = 1.0
"""A lease read as lost this long before the expiry its last renewal returned is early."""
NODE_TTL_SLACK_S = 2.0
"""After the node TTL, this long for the coordinator's view to mark the node unschedulable."""
KEPT_MESSAGES = 10
VANISHING_TENANT = "bob"
"""Killed mid-run, it cannot replay its unknowns (see tests.netns.suite)."""


@dataclass(frozen=True)
class EtcdChange:
    revision: int
    key: str
    value: bytes | None
    lease: int


@dataclass
class Report:
    violations: dict[str, list[str]] = field(
        default_factory=lambda: {name: [] for name in INVARIANTS}
    )
    operations: Counter[tuple[str, str]] = field(default_factory=Counter)
    recoveries: list[tuple[str, str, float | None, float | None]] = field(default_factory=list)
    """(fault, coordinator, s from injection, s from the end) to the first granted Allocate."""
    faults: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What the run did not do, or did differently (a skew, a skipped fault)."""
    revisions_checked: int = 0

    def violate(self, invariant: str, message: str) -> None:
        self.violations[invariant].append(message)

    @property
    def violation_count(self) -> int:
        return sum(len(found) for found in self.violations.values())


def read_lines(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def read_changes(path: Path) -> list[EtcdChange]:
    return [
        EtcdChange(
            line["revision"],
            line["key"],
            None if line["value"] is None else base64.b64decode(line["value"]),
            line["lease"],
        )
        for line in read_lines(path)
    ]


@dataclass
class _Lifetime:
    """One allocation as etcd saw it."""

    request_id: str
    created: int
    ttl_s: int
    node: str = ""
    agent_gone_since: int | None = None
    """When it was put on a node whose agent's presence key had been deleted (the node
    lease lapsed): the revision of that delete."""
    deleted: int | None = None
    deleted_by_release: bool = False


@dataclass(frozen=True)
class Stamps:
    """When revisions were seen (`etcd_dump --stamps`): upper bounds, in monotonic time."""

    revisions: tuple[int, ...] = ()
    seen: tuple[float, ...] = ()

    @classmethod
    def of(cls, lines: Iterable[Mapping[str, Any]]) -> Stamps:
        pairs = sorted((line["revision"], line["seen"]) for line in lines)
        return cls(tuple(r for r, _ in pairs), tuple(s for _, s in pairs))

    def by(self, revision: int) -> float | None:
        """A time by which `revision` had happened (None when nothing was seen after it)."""
        index = bisect.bisect_left(self.revisions, revision)
        return min(self.seen[index:], default=None)


def _replay_revisions(
    changes: Sequence[EtcdChange], prefix: str, report: Report
) -> dict[str, _Lifetime]:
    """Applies etcd's changes revision by revision, checking each state; returns every
    allocation's lifetime."""
    layout = KeyLayout(prefix)
    allocations: dict[str, types_pb2.Allocation] = {}
    inventory_by_node: dict[str, dict[str, types_pb2.GpuInventory]] = {}
    lifetimes: dict[str, _Lifetime] = {}
    by_revision: dict[int, list[EtcdChange]] = defaultdict(list)
    for change in changes:
        by_revision[change.revision].append(change)
    seen: set[str] = set()
    agent_gone_since: dict[str, int | None] = {}  # node -> None while its agent is present
    for revision in sorted(by_revision):
        tombstoned = set()
        deleted = []
        for change in by_revision[revision]:
            parsed = layout.parse(change.key.encode())
            if parsed is None:
                continue
            kind, name = parsed
            if kind is KeyKind.NODE and change.value is not None:
                node = types_pb2.NodeStatus()
                node.ParseFromString(change.value)  # a shrunk node no longer has its old GPUs
                inventory_by_node[name] = {g.inventory.uuid: g.inventory for g in node.gpus}
            elif kind is KeyKind.REQUEST and change.value is not None:
                if change.value.startswith(RELEASED_PREFIX):
                    tombstoned.add(name)
            elif kind is KeyKind.AGENT:
                agent_gone_since[name] = None if change.value is not None else revision
            elif kind is KeyKind.ALLOCATION and change.value is not None:
                record = types_pb2.Allocation()
                record.ParseFromString(change.value)
                allocations[name] = record
                if name not in lifetimes:
                    lifetimes[name] = _Lifetime(
                        record.request_id,
                        revision,
                        record.request.ttl_seconds,
                        record.node,
                        agent_gone_since.get(record.node),
                    )
            elif kind is KeyKind.ALLOCATION:
                gone = allocations.pop(name, None)
                if gone is not None:
                    deleted.append(name)
        for name in deleted:
            lifetime = lifetimes[name]
            lifetime.deleted = revision
            lifetime.deleted_by_release = lifetime.request_id in tombstoned
        inventory = {u: g for gpus in inventory_by_node.values() for u, g in gpus.items()}
        try:
            check_gpus(allocations, inventory, f"revision {revision}")
        except AssertionError as error:
            message = str(error)
            if message not in seen:
                seen.add(message)
                report.violate(GPU_LIMITS, message)
        per_request = Counter(record.request_id for record in allocations.values())
        for request_id, count in per_request.items():
            if count > 1:
                report.violate(
                    ONE_LIVE_PER_REQUEST, f"revision {revision}: {count} for {request_id}"
                )
        report.revisions_checked += 1
    return lifetimes


def check(
    history: Sequence[Mapping[str, Any]],
    changes: Sequence[EtcdChange],
    faults: Sequence[Mapping[str, Any]],
    *,
    prefix: str,
    node_ttl_s: float,
    stamps: Stamps = Stamps(),
) -> Report:
    """The report of one run. `changes` must run until after every lease expired (the
    suite waits for that before it dumps etcd); `stamps` say when revisions were seen."""
    report = Report(
        faults=[dict(fault) for fault in faults if fault.get("kind") == "fault"],
        notes=[fault["name"] for fault in faults if fault.get("kind") == "note"],
    )
    lifetimes = _replay_revisions(changes, prefix, report)
    calls = _answered_or_cut_short(entry for entry in history if entry.get("op") != "end")
    for entry in calls:
        report.operations[(entry["op"], entry["outcome"])] += 1
    hand_deleted = {
        allocation_id for fault in faults for allocation_id in fault.get("allocation_ids", ())
    }
    clock = next((f for f in faults if f.get("kind") == "clock"), None)
    if clock is None and any(entry.get("expires_at") for entry in history):
        raise ValueError("expiries cannot be judged without the run's clock entry")
    wall_minus_monotonic = clock["wall"] - clock["monotonic"] if clock else 0.0
    _check_acknowledged(
        calls, lifetimes, hand_deleted, wall_minus_monotonic, stamps=stamps, report=report
    )
    _check_requests(calls, lifetimes, report)
    _check_capacity(lifetimes, faults, report)
    _check_cut_off_nodes(calls, faults, node_ttl_s, report)
    _check_placed_after_agent_lapsed(calls, lifetimes, stamps, report)
    _recoveries(calls, faults, report)
    for entry in history:
        if entry.get("op") == "end" and entry.get("unresolved"):
            report.violate(UNKNOWNS_RESOLVED, f"{entry['unresolved']} left unresolved")
    return report


def _answered_or_cut_short(history: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Every call once: its answer, or, for an invocation never answered (its process was
    killed meanwhile), an unknown outcome, since it may have taken effect."""
    invoked: dict[str, Mapping[str, Any]] = {}
    calls: list[Mapping[str, Any]] = []
    for entry in history:
        if entry.get("phase") == "invoke":
            invoked[entry["call_id"]] = entry
        else:
            calls.append(entry)
    answered = {entry.get("call_id") for entry in calls}
    for call_id, entry in invoked.items():
        if call_id not in answered:
            calls.append(
                {**entry, "outcome": "unknown", "code": "NO_ANSWER", "end": entry["start"]}
            )
    return calls


def _granted(calls: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [c for c in calls if c["op"] in ("allocate", "replay") and c["outcome"] == "ok"]


def _check_acknowledged(
    calls: Sequence[Mapping[str, Any]],
    lifetimes: Mapping[str, _Lifetime],
    hand_deleted: set[str],
    wall_minus_monotonic: float,
    *,
    stamps: Stamps,
    report: Report,
) -> None:
    """Calls are stamped with the monotonic clock, expiries with the coordinator's wall
    clock: `wall_minus_monotonic` maps one onto the other."""
    released = defaultdict(list)  # allocation id -> its release calls
    for entry in calls:
        if entry["op"] == "release" and entry["outcome"] in ("ok", "unknown"):
            released[entry["allocation_id"]].append(entry)
    for entry in _granted(calls):
        allocation_id = entry["allocation_id"]
        lifetime = lifetimes.get(allocation_id)
        if lifetime is None:
            report.violate(ACKED_IN_ETCD, f"{allocation_id} ({entry['request_id']}) never in etcd")
            continue
        if lifetime.deleted is None or allocation_id in hand_deleted:
            continue
        if lifetime.deleted_by_release and not released[allocation_id]:
            report.violate(KEPT_UNTIL_RELEASED, f"{allocation_id} released, never by its holder")
        if not lifetime.deleted_by_release and not lifetime.ttl_s:
            report.violate(KEPT_UNTIL_RELEASED, f"{allocation_id} has no lease yet vanished")
    # A lease read as gone before the expiry its last renewal (or grant) promised.
    expiry: dict[str, float] = {}
    released_before: set[str] = set()
    for entry in sorted(calls, key=lambda c: c["end"]):
        allocation_id = entry.get("allocation_id", "")
        if entry["outcome"] == "ok" and entry.get("expires_at") and allocation_id:
            expires = entry["expires_at"] - wall_minus_monotonic
            expiry[allocation_id] = max(expiry.get(allocation_id, expires), expires)
        if entry["op"] == "release":
            if entry.get("code") == "NOT_FOUND" and allocation_id not in released_before:
                _judge_missing(entry, expiry, hand_deleted, report)
            released_before.add(allocation_id)
        elif (
            entry["op"] == "keepalive"
            and entry.get("code") == "NOT_FOUND"
            and allocation_id not in released_before
        ):
            _judge_missing(entry, expiry, hand_deleted, report)
    # A lease etcd let lapse before that expiry, whether or not a later call noticed.
    for allocation_id in sorted({entry["allocation_id"] for entry in _granted(calls)}):
        lifetime = lifetimes.get(allocation_id)
        if (
            lifetime is None
            or lifetime.deleted is None
            or lifetime.deleted_by_release
            or allocation_id in hand_deleted
        ):
            continue
        gone_by, promised = stamps.by(lifetime.deleted), expiry.get(allocation_id)
        if gone_by is not None and promised is not None and gone_by < promised - EXPIRY_SLACK_S:
            report.violate(
                KEPT_UNTIL_RELEASED,
                f"{allocation_id} gone from etcd {promised - gone_by:.1f} s before its expiry",
            )


def _judge_missing(
    entry: Mapping[str, Any], expiry: Mapping[str, float], hand_deleted: set[str], report: Report
) -> None:
    allocation_id = entry["allocation_id"]
    if allocation_id in hand_deleted:
        return
    promised = expiry.get(allocation_id)
    if promised is None:
        report.violate(KEPT_UNTIL_RELEASED, f"{allocation_id} without lease gone at {entry['op']}")
    elif entry["end"] < promised - EXPIRY_SLACK_S:  # the server looked before the end
        report.violate(
            KEPT_UNTIL_RELEASED,
            f"{allocation_id} gone {promised - entry['end']:.1f} s before its lease's expiry",
        )


def _check_requests(
    calls: Sequence[Mapping[str, Any]], lifetimes: Mapping[str, _Lifetime], report: Report
) -> None:
    attempts: dict[str, set[str]] = defaultdict(set)  # request id -> outcomes of its Allocates
    for entry in calls:
        if entry["op"] in ("allocate", "replay"):
            attempts[entry["request_id"]].add(entry["outcome"])
    for allocation_id, lifetime in lifetimes.items():
        outcomes = attempts.get(lifetime.request_id)
        if outcomes is not None and not outcomes & {"ok", "unknown"}:
            report.violate(
                NOTHING_FROM_REFUSALS, f"{allocation_id} for refused {lifetime.request_id}"
            )
    grants: dict[str, list[str]] = defaultdict(list)
    for entry in _granted(calls):
        if entry["allocation_id"] not in grants[entry["request_id"]]:
            grants[entry["request_id"]].append(entry["allocation_id"])
    for request_id, ids in grants.items():
        spans = sorted(
            (lifetimes[i].created, lifetimes[i].deleted or 2**62) for i in ids if i in lifetimes
        )
        for (_, first_end), (second_start, _) in itertools.pairwise(spans):
            if second_start < first_end:
                report.violate(ONE_GRANT_PER_REQUEST, f"{request_id}: {ids} overlap")
        released_then_granted = sorted(
            (lifetimes[i] for i in ids if i in lifetimes), key=lambda one: one.created
        )
        for first, _ in itertools.pairwise(released_then_granted):
            if first.deleted_by_release:  # its tombstone must refuse the id from then on
                report.violate(ONE_GRANT_PER_REQUEST, f"{request_id} granted again after release")
    unknown = {r for r, outcomes in attempts.items() if "unknown" in outcomes}
    replayed = {
        entry["request_id"]
        for entry in calls
        if entry["op"] == "replay" and entry["outcome"] in ("ok", "fail")
    }
    library = {e["request_id"] for e in calls if e.get("coordinator") == "library"}
    for request_id in sorted(unknown - replayed - library):
        # The vanished tenant cannot replay: etcd's history resolves its unknowns.
        if not any(e.get("client", "").startswith(f"{VANISHING_TENANT}-") for e in calls
                   if e.get("request_id") == request_id):  # fmt: skip
            report.violate(UNKNOWNS_RESOLVED, f"{request_id} never replayed")


def _check_capacity(
    lifetimes: Mapping[str, _Lifetime], faults: Sequence[Mapping[str, Any]], report: Report
) -> None:
    for allocation_id, lifetime in lifetimes.items():
        if lifetime.deleted is None:
            report.violate(CAPACITY_BACK, f"{allocation_id} ({lifetime.request_id}) still held")
    for fault in faults:
        if fault.get("kind") != "stats":
            continue
        for address, stats in fault["answers"].items():
            allocated = int(stats.get("allocatedMillis", 0) or 0)
            if "error" in stats or allocated:
                report.violate(CAPACITY_BACK, f"{address} at the end: {stats}")


def _check_cut_off_nodes(
    calls: Sequence[Mapping[str, Any]],
    faults: Sequence[Mapping[str, Any]],
    node_ttl_s: float,
    report: Report,
) -> None:
    for fault in faults:
        if fault.get("kind") == "nodes":
            for address, nodes in fault["answers"].items():
                if nodes.get(fault["node"]) is True:
                    report.violate(
                        CUT_OFF_NODES, f"{address} lists {fault['node']} schedulable while cut off"
                    )
        if fault.get("kind") != "fault" or not fault.get("cuts_off_node"):
            continue
        node, unschedulable_from = fault["cuts_off_node"], fault["start"] + node_ttl_s
        for entry in _granted(calls):
            started = entry["start"] > unschedulable_from + NODE_TTL_SLACK_S
            if entry.get("node") == node and started and entry["end"] < fault["end"]:
                report.violate(CUT_OFF_NODES, f"{entry['allocation_id']} placed on cut-off {node}")


def _check_placed_after_agent_lapsed(
    calls: Sequence[Mapping[str, Any]],
    lifetimes: Mapping[str, _Lifetime],
    stamps: Stamps,
    report: Report,
) -> None:
    """An allocation asked for (its request's first Allocate was sent) well after its node's
    agent presence key had gone, i.e. after the node lease lapsed, was placed on a node
    that was not schedulable."""
    asked: dict[str, float] = {}
    for entry in calls:
        if entry["op"] in ("allocate", "replay"):
            request_id = entry["request_id"]
            asked[request_id] = min(asked.get(request_id, entry["start"]), entry["start"])
    for allocation_id, lifetime in lifetimes.items():
        if lifetime.agent_gone_since is None or lifetime.request_id not in asked:
            continue
        gone_by = stamps.by(lifetime.agent_gone_since)
        if gone_by is not None and asked[lifetime.request_id] > gone_by + NODE_TTL_SLACK_S:
            late = asked[lifetime.request_id] - gone_by
            report.violate(
                CUT_OFF_NODES,
                f"{allocation_id} asked for {late:.1f} s after {lifetime.node}'s agent lapsed",
            )


def _recoveries(
    calls: Sequence[Mapping[str, Any]], faults: Sequence[Mapping[str, Any]], report: Report
) -> None:
    coordinators = sorted({c["coordinator"] for c in calls if c["coordinator"] != "library"})
    grants = sorted((c for c in _granted(calls) if c["op"] == "allocate"), key=lambda c: c["start"])
    for fault in faults:
        if fault.get("kind") != "fault":
            continue
        for address in coordinators:
            mine = [c for c in grants if c["coordinator"] == address]
            after = next((c["end"] - fault["start"] for c in mine if c["start"] >= fault["start"]),
                         None)  # fmt: skip
            healed = next((c["end"] - fault["end"] for c in mine if c["start"] >= fault["end"]),
                          None)  # fmt: skip
            report.recoveries.append((fault["name"], address, after, healed))


def table(report: Report) -> str:
    """The run as the issue asks for it: faults, operations, violations, recovery times."""
    lines = ["faults injected:"]
    for fault in report.faults:
        lines.append(
            f"  {fault['name']:<52} at {fault['offset_s']:6.1f} s for {fault['duration_s']:5.1f} s"
        )
    lines.extend(f"  ({note})" for note in report.notes)
    lines.append("operations (invoked / ok / failed / unknown):")
    for op in sorted({op for op, _ in report.operations}):
        counts = [report.operations[(op, outcome)] for outcome in ("ok", "fail", "unknown")]
        lines.append(f"  {op:<10} {sum(counts):6d} {counts[0]:6d} {counts[1]:6d} {counts[2]:6d}")
    lines.append(f"invariants ({report.revisions_checked} etcd revisions replayed):")
    for name, found in report.violations.items():
        lines.append(f"  {len(found):4d}  {name}")
        lines.extend(f"          {message}" for message in found[:KEPT_MESSAGES])
    lines.append("time to the first granted Allocate (from the fault / from its end):")
    for fault_name, address, after, healed in report.recoveries:
        shown = [f"{s:5.1f} s" if s is not None else "  none " for s in (after, healed)]
        lines.append(f"  {fault_name:<52} {address:<20} {shown[0]}  {shown[1]}")
    return "\n".join(lines)
