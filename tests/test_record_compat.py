"""Records written by kaiwo-gpu 0.1.0 (environment stored, expiry of the grant) still read.

Since then the environment is derived from the grant wherever a record is shown, and a
renewal no longer rewrites the record; a coordinator of this version must read the old
records it finds in etcd and show the very same grant.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format

from kaiwo_gpu.coordinator.state.changes import KeyValue, Put, Txn
from kaiwo_gpu.coordinator.state.keys import KeyLayout
from kaiwo_gpu.coordinator.state.records import for_client, placed_from_record
from kaiwo_gpu.coordinator.state.store import EtcdStore
from kaiwo_gpu.coordinator.state.view_state import ViewState
from kaiwo_gpu.v1 import allocation_pb2, types_pb2
from tests.conftest import Running

OLD_RECORD = Path(__file__).parent / "data" / "allocation-record-0.1.0.txtpb"


def old_record() -> types_pb2.Allocation:
    return text_format.Parse(OLD_RECORD.read_text(), types_pb2.Allocation())


def test_an_old_record_is_read_and_shows_the_environment_it_stored() -> None:
    old = old_record()
    assert old.environment, "the fixture must be a record with a stored environment"
    layout = KeyLayout()
    state = ViewState.load(
        layout, 5, [KeyValue(layout.allocation(old.id), old.SerializeToString(), 5)]
    )
    assert state.blocked_reason is None
    assert state.allocations[old.id] == old
    held = placed_from_record(old)
    assert [share.millis for share in held.shares] == [302, 302]
    assert dict(for_client(state.allocations[old.id]).environment) == dict(old.environment)


def test_a_record_without_a_stored_environment_shows_the_same_one() -> None:
    old = old_record()
    new = types_pb2.Allocation()
    new.CopyFrom(old)
    new.ClearField("environment")
    assert dict(for_client(new).environment) == dict(old.environment)
    assert len(new.SerializeToString()) < len(old.SerializeToString())


async def test_an_old_record_in_etcd_reads_back_through_get_list_and_watch(
    running: Running,
) -> None:
    old = old_record()
    layout = KeyLayout(running.prefix)
    store = EtcdStore([running.endpoint])
    try:
        written = await store.commit(
            Txn(
                puts=(
                    Put(layout.allocation(old.id), old.SerializeToString()),
                    Put(layout.request(old.request_id), old.id.encode()),
                )
            )
        )
    finally:
        await store.close()
    await running.coordinator.view.wait_for(written.revision, 10)
    got = await running.api.GetAllocation(allocation_pb2.GetAllocationRequest(allocation_id=old.id))
    listed = await running.api.ListAllocations(allocation_pb2.ListAllocationsRequest())
    stream = running.api.WatchAllocations(allocation_pb2.WatchAllocationsRequest())
    first = await stream.read()
    stream.cancel()
    assert isinstance(first, allocation_pb2.AllocationEvent)
    for shown in (got.allocation, *listed.allocations, first.allocation):
        assert shown.id == old.id
        assert dict(shown.environment) == dict(old.environment)
        assert list(shown.gpus) == list(old.gpus)
