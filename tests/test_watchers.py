"""Watch streams are bounded: in all, per client address, and when they stop reading."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from kaiwo_gpu.coordinator.api.watchers import (
    MAX_WATCHERS_PER_ADDRESS,
    WatcherSlots,
    peer_address,
)
from kaiwo_gpu.v1 import allocation_pb2
from tests.conftest import Running
from tests.harness import request


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:10.0.0.7:51234", "10.0.0.7"),
        ("ipv6:[::1]:5000", "[::1]"),
        ("unix:/run/kaiwo.sock", "/run/kaiwo.sock"),
        ("", ""),
    ],
)
def test_a_watchers_address_is_its_host(peer: str, address: str) -> None:
    assert peer_address(peer) == address


def test_watchers_are_admitted_up_to_a_total_and_a_per_address_limit() -> None:
    slots = WatcherSlots(total_limit=5, per_address_limit=3)
    assert [slots.take("a") for _ in range(3)] == [None, None, None]
    refused = slots.take("a")
    assert refused is not None
    assert "a holds 3 watchers" in refused
    assert slots.take("b") is None
    assert slots.take("c") is None
    full = slots.take("d")
    assert full is not None
    assert "serves 5 watchers" in full
    slots.give_back("a")
    assert slots.take("d") is None  # a slot came back


async def test_one_address_cannot_hold_more_than_its_share_of_watchers(running: Running) -> None:
    """Review finding: 500 watchers that never read raised the coordinator's memory from 83
    to 222 MiB and every Allocate's latency tenfold; one client could open them all."""
    await running.api.Allocate(request("watched", fraction_millis=100))  # one event each
    streams = [
        running.api.WatchAllocations(allocation_pb2.WatchAllocationsRequest())
        for _ in range(MAX_WATCHERS_PER_ADDRESS + 1)
    ]
    try:
        refused: list[str] = []
        for stream in streams:
            try:
                await asyncio.wait_for(stream.read(), 10)
            except grpc.aio.AioRpcError as error:
                refused.append(f"{error.code().name}: {error.details()}")
        assert len(refused) == 1, refused
        assert refused[0].startswith("RESOURCE_EXHAUSTED: "), refused
        assert "the most one address may" in refused[0]
    finally:
        for stream in streams:
            stream.cancel()
