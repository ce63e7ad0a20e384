"""Shared pieces of the integration tests: requests and an etcd audit.

The audit reads etcd directly (never through a coordinator) and checks the invariants that
must hold whatever the coordinators did: no GPU past 1000 millis or its VRAM, no CU granted
twice, one allocation per request_id, and a GPU version key for every placed GPU.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import grpc

from kaiwo_gpu.coordinator.state.changes import Change, Put, Txn
from kaiwo_gpu.coordinator.state.keys import KeyKind, KeyLayout
from kaiwo_gpu.coordinator.state.store import EtcdStore
from kaiwo_gpu.coordinator.state.view_state import (
    RELEASED_PREFIX,
    bound_allocation,
    released_allocation,
)
from kaiwo_gpu.v1 import allocation_pb2, types_pb2

INVENTORY = """\
nodes:
  - name: node-a
    labels: {zone: a}
    gpus: [{model: MI300X, count: 4}]
  - name: node-b
    labels: {zone: b}
    gpus: [{model: MI210, count: 2}]
"""


def request(request_id: str, **fields: object) -> allocation_pb2.AllocateRequest:
    return allocation_pb2.AllocateRequest(
        request=types_pb2.AllocationRequest(request_id=request_id, **fields)  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class EtcdAudit:
    revision: int
    allocations: dict[str, types_pb2.Allocation]
    request_keys: dict[str, str]
    nodes: dict[str, types_pb2.NodeStatus]
    tombstones: dict[str, frozenset[str]]
    """Request id -> the owner tags its tombstone names."""

    @property
    def millis_by_gpu(self) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for record in self.allocations.values():
            for grant in record.gpus:
                totals[grant.uuid] += grant.granted_millis
        return dict(totals)


async def audit_etcd(endpoint: str, prefix: str) -> EtcdAudit:
    """Reads every key under `prefix` and asserts the allocation invariants."""
    layout = KeyLayout(prefix)
    store = EtcdStore([endpoint])
    try:
        revision, kvs = await store.read_prefix(layout.all_keys)
    finally:
        await store.close()
    allocations: dict[str, types_pb2.Allocation] = {}
    request_keys: dict[str, str] = {}
    tombstones: dict[str, frozenset[str]] = {}
    nodes: dict[str, types_pb2.NodeStatus] = {}
    gpu_keys: set[str] = set()
    for kv in kvs:
        parsed = layout.parse(kv.key)
        assert parsed is not None, kv.key
        kind, name = parsed
        if kind is KeyKind.ALLOCATION:
            record = types_pb2.Allocation()
            record.ParseFromString(kv.value)
            assert record.id == name
            assert kv.lease == record.lease_id
            allocations[name] = record
        elif kind is KeyKind.REQUEST and kv.value.startswith(RELEASED_PREFIX):
            tombstones[name] = released_allocation(kv.value)[1]
        elif kind is KeyKind.REQUEST:
            request_keys[name] = bound_allocation(kv.value)
        elif kind is KeyKind.NODE:
            node = types_pb2.NodeStatus()
            node.ParseFromString(kv.value)
            nodes[name] = node
        else:
            gpu_keys.add(name)
    inventory = {gpu.inventory.uuid: gpu.inventory for node in nodes.values() for gpu in node.gpus}
    for record in allocations.values():
        assert request_keys.get(record.request_id) == record.id, record.request_id
        for grant in record.gpus:
            assert grant.uuid in gpu_keys
    check_gpus(allocations, inventory, f"revision {revision}")
    assert set(request_keys.values()) == set(allocations), "a request key without allocation"
    # (A live allocation whose request key is a tombstone fails the binding check above.)
    return EtcdAudit(revision, allocations, request_keys, nodes, tombstones)


def check_gpus(
    allocations: dict[str, types_pb2.Allocation],
    inventory: dict[str, types_pb2.GpuInventory],
    when: str,
) -> None:
    """Per GPU: at most 1000 millis and its VRAM, no CU twice, no sharing with a non-sharer,
    and cu-mask and unmasked work never together."""
    millis: dict[str, int] = defaultdict(int)
    memory: dict[str, int] = defaultdict(int)
    units: dict[str, set[int]] = defaultdict(set)
    holders: dict[str, list[types_pb2.Allocation]] = defaultdict(list)
    for record in allocations.values():
        for grant in record.gpus:
            assert grant.uuid in inventory, f"{when}: unknown GPU {grant.uuid}"
            millis[grant.uuid] += grant.granted_millis
            memory[grant.uuid] += grant.granted_memory_mib
            assert not units[grant.uuid] & set(grant.compute_units), f"{when}: a CU granted twice"
            units[grant.uuid] |= set(grant.compute_units)
            holders[grant.uuid].append(record)
    for uuid, total in millis.items():
        assert total <= 1000, f"GPU {uuid} over-committed at {when}: {total} millis"
        assert memory[uuid] <= inventory[uuid].vram_mib, f"GPU {uuid} VRAM over at {when}"
        on_gpu = holders[uuid]
        if len(on_gpu) > 1:
            assert all(h.request.sharing for h in on_gpu), f"GPU {uuid} shared unshareable"
            kinds = {h.isolation == types_pb2.ISOLATION_CU_MASK for h in on_gpu}
            assert len(kinds) == 1, f"GPU {uuid}: cu-mask and unmasked work together at {when}"


END_MARKER = b"audit-end"


async def history_until_now(store: EtcdStore, prefix: bytes) -> AsyncIterator[Change]:
    """Every change under `prefix` from revision 1 to now, in order. It writes an end marker
    under the prefix first and reads up to it, since the etcd may be shared and its last
    revision somebody else's; the marker's own put and delete are left out."""
    marker = prefix + END_MARKER
    final = (await store.commit(Txn(puts=(Put(marker, b""),)))).revision
    async for revision, changes in store.watch(prefix, 1):
        for change in changes:
            if change.key != marker:
                yield change
        if revision >= final:
            break
    await store.commit(Txn(deletes=(marker,)))


async def audit_history(endpoint: str, prefix: str) -> int:
    """Replays every revision under `prefix` from etcd's history and checks each state.

    A final-state audit cannot see an over-commit that was released before the end; this
    one can. Returns revisions checked.
    """
    layout = KeyLayout(prefix)
    store = EtcdStore([endpoint])
    allocations: dict[str, types_pb2.Allocation] = {}
    inventory: dict[str, types_pb2.GpuInventory] = {}
    checked = 0
    try:
        previous = 0
        async for change in history_until_now(store, layout.all_keys):
            if change.revision != previous and previous:
                check_gpus(allocations, inventory, f"revision {previous}")
                checked += 1
            previous = change.revision
            parsed = layout.parse(change.key)
            if parsed is None:
                continue
            kind, name = parsed
            if kind is KeyKind.NODE and change.value is not None:
                node = types_pb2.NodeStatus()
                node.ParseFromString(change.value)
                inventory.update({g.inventory.uuid: g.inventory for g in node.gpus})
            elif kind is KeyKind.ALLOCATION:
                allocations.pop(name, None)
                if change.value is not None:
                    record = types_pb2.Allocation()
                    record.ParseFromString(change.value)
                    allocations[name] = record
        if previous:  # the last revision's state
            check_gpus(allocations, inventory, f"revision {previous}")
            checked += 1
    finally:
        await store.close()
    return checked


@contextlib.contextmanager
def child(args: Sequence[str], **popen: object) -> Iterator[subprocess.Popen[str]]:
    """A child process with stdout and stderr on one text pipe, killed if still running."""
    process = subprocess.Popen(
        list(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,  # type: ignore[call-overload]
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


async def status_of(call: object) -> tuple[grpc.StatusCode, str]:
    """The status code and message a call that must fail ended with."""
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    raise AssertionError("the call succeeded")
