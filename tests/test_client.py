"""The Python clients against a real coordinator and etcd; their retries against a fake server."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from kaiwo_gpu.client import AsyncClient, AsyncHeldAllocation, Client, ClientSettings, RetryPolicy
from kaiwo_gpu.client.retries import Failure, try_another_coordinator
from kaiwo_gpu.client.support import coordinator_target, dial_targets
from kaiwo_gpu.common import InvalidArgumentError, NoCapacityError, NotFoundError, UnavailableError
from kaiwo_gpu.common.errors import AlreadyExistsError, FailedPreconditionError
from kaiwo_gpu.coordinator.local.etcd import free_port
from kaiwo_gpu.v1 import allocation_pb2, types_pb2
from tests.conftest import Running
from tests.fake_coordinator import flaky, serving

FAST_RETRY = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05)


def until(condition: Callable[[], bool], what: str, limit_s: float = 20.0) -> None:
    """Polls a condition in a thread; the limit only stops a hung test."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.05)


async def test_sync_client_allocates_lists_and_releases(running: Running) -> None:
    def body() -> None:
        fields: dict[str, Any] = {
            "request_id": "sync-1",
            "fraction": 0.5,
            "memory": "4Gi",
            "ttl": "10m",
            "owner": "team/a",
            "labels": {"team": "ml"},
            "node_labels": {"zone": "a"},
        }
        with Client(running.target) as client:
            placed = client.allocate(**fields)
            assert placed.node == "node-a"
            assert placed.gpus[0].granted_millis == 500
            assert placed.gpus[0].granted_memory_mib == 4096
            assert placed.request.ttl_seconds == 600
            assert placed.environment["KAIWO_GPU_ALLOCATION_ID"] == placed.id
            assert client.allocate(**fields).id == placed.id  # the same request id replays
            assert client.get(placed.id).request.owner == "team/a"
            assert [a.id for a in client.list(owner="team/a")] == [placed.id]
            assert [a.id for a in client.list(labels={"team": "ml"})] == [placed.id]
            assert client.list(labels={"team": "other"}) == []
            assert client.list(node="node-b") == []
            assert sorted(n.name for n in client.nodes()) == ["node-a", "node-b"]
            assert [n.name for n in client.nodes(labels={"zone": "b"})] == ["node-b"]
            assert client.stats().allocated_millis == 500
            released = client.release(placed.id)
            assert released is not None
            assert released.id == placed.id
            with pytest.raises(NotFoundError, match=placed.id):
                client.release(placed.id)
            with pytest.raises(NotFoundError):
                client.get(placed.id)
            assert client.stats().allocated_millis == 0

    await asyncio.to_thread(body)


async def test_errors_come_back_as_the_project_error_tree(running: Running) -> None:
    def body() -> None:
        with Client(running.target) as client:
            with pytest.raises(NoCapacityError, match="no GPU can take"):
                client.allocate(fraction=1.0, count=5)
            client.allocate(request_id="reused", fraction=0.25)
            with pytest.raises(AlreadyExistsError, match="reused"):
                client.allocate(request_id="reused", fraction=0.5)
            with pytest.raises(InvalidArgumentError, match="allocation_id"):
                client.get("not an id")

    await asyncio.to_thread(body)


def test_bad_values_fail_before_any_call() -> None:
    # Nothing listens on port 1: a call would fail UNAVAILABLE, not INVALID_ARGUMENT.
    with Client("127.0.0.1:1") as client:
        with pytest.raises(InvalidArgumentError, match="fraction") as caught:
            client.allocate(fraction=2)
        assert caught.value.field == "fraction"
        with pytest.raises(InvalidArgumentError, match="memory"):
            client.allocate(memory="4GB")
        with pytest.raises(InvalidArgumentError, match="ttl"):
            client.allocate(fraction=0.5, ttl="soon")


async def test_context_manager_releases_when_the_body_raises(running: Running) -> None:
    def body() -> None:
        with Client(running.target) as client:
            seen: list[str] = []

            def fail_inside() -> None:
                with client.allocation(fraction=0.25) as held:
                    seen.append(held.id)
                    assert client.get(held.id).request.ttl_seconds == 120  # held means leased
                    assert held.environment["KAIWO_GPU_ALLOCATION_ID"] == held.id
                    raise RuntimeError("boom")

            with pytest.raises(RuntimeError, match="boom"):
                fail_inside()
            (held_id,) = seen
            with pytest.raises(NotFoundError):
                client.get(held_id)

    await asyncio.to_thread(body)


async def test_held_allocation_renews_its_lease_and_reports_a_lost_one(running: Running) -> None:
    lost: list[str] = []

    def body() -> None:
        with (
            Client(running.target) as client,
            client.allocation(fraction=0.25, ttl=3, on_lost=lost.append) as held,
        ):
            first = client.get(held.id).expires_at.ToDatetime()
            until(
                lambda: client.get(held.id).expires_at.ToDatetime() > first,
                "the lease to be renewed",
            )
            client.release(held.id)  # someone else releases it: the next renewal finds it gone
            until(lambda: held.lost, "the loss to be noticed")
        assert lost
        assert held.id in lost[0]

    await asyncio.to_thread(body)


async def test_async_client_watch_and_context_manager(running: Running) -> None:
    async with AsyncClient(running.target) as client:
        stream = client.watch(owner="async/owner")
        added = await client.allocate(fraction=0.5, owner="async/owner", request_id="async-1")
        first = await anext(stream)
        assert first.kind == allocation_pb2.AllocationEvent.KIND_ADDED
        assert first.allocation.id == added.id
        await client.release(added.id)
        gone = await anext(stream)
        assert gone.kind == allocation_pb2.AllocationEvent.KIND_REMOVED
        assert gone.allocation.id == added.id
        await stream.aclose()

        seen: list[str] = []

        async def fail_inside() -> None:
            async with client.allocation(fraction=0.25, owner="async/owner") as held:
                seen.append(held.id)
                assert [a.id for a in await client.list(owner="async/owner")] == [held.id]
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            await fail_inside()
        assert len(seen) == 1
        assert await client.list(owner="async/owner") == []
        assert (await client.stats()).allocation_count == 0
        assert len(await client.nodes()) == 2


async def test_unavailable_is_retried_with_the_same_request_id() -> None:
    fake = flaky(failures=2)
    async with serving(fake) as target:
        settings = ClientSettings(target=target, timeout_s=20, retry=FAST_RETRY)
        async with AsyncClient(settings=settings) as client:
            placed = await client.allocate(fraction=0.5)
        assert placed.id == "a1"
        assert len(fake.request_ids) == 3
        assert len(set(fake.request_ids)) == 1
        assert placed.request_id == fake.request_ids[0]

        fake.request_ids.clear()

        def blocking() -> str:
            with Client(settings=settings) as client:
                return client.allocate(fraction=0.5, request_id="given-id").request_id

        assert await asyncio.to_thread(blocking) == "given-id"
        assert fake.request_ids == ["given-id"] * 3


class FakeClock:
    """A monotonic clock that moves only when a test or a client's sleep moves it."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.now_s += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.now_s += seconds
        await asyncio.sleep(0)


class LongestPause(random.Random):
    """Backoff without jitter: every pause is the policy's ceiling, so the schedule is known."""

    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_retries_stop_at_the_deadline_with_the_servers_message(kind: str) -> None:
    # Three UNAVAILABLEs, pauses 0.1 + 0.2 + 0.4 s on the fake clock: the fourth attempt gets
    # the 0.3 s left of the 1 s deadline and the server never answers it.
    fake = flaky(failures=3, hang_after_failures=True)
    clock = FakeClock()
    retry = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.4, multiplier=2)
    async with serving(fake) as target:
        settings = ClientSettings(target=target, timeout_s=1, retry=retry)

        def blocking() -> None:
            with Client(settings=settings, rng=LongestPause(), clock=clock, sleep=clock.sleep) as c:
                c.allocate(fraction=0.5)

        async def allocate() -> None:
            if kind == "sync":
                await asyncio.to_thread(blocking)
                return
            async with AsyncClient(
                settings=settings, rng=LongestPause(), clock=clock, sleep=clock.async_sleep
            ) as client:
                await client.allocate(fraction=0.5)

        with pytest.raises(UnavailableError, match="etcd is unavailable") as caught:
            await allocate()
    assert "gave up after 4 attempts in " in caught.value.message
    assert "of the call's 1s; the last attempt timed out" in caught.value.message
    assert len(fake.request_ids) == 4
    assert clock.now_s == pytest.approx(1000.7)


async def test_the_sync_allocation_allocates_when_called() -> None:
    fake = flaky()
    async with serving(fake) as target:

        def body() -> None:
            with Client(target) as client:
                held = client.allocation(fraction=0.5)
                assert (held.id, len(fake.request_ids)) == ("a1", 1)  # placed before the with
                with held as entered:
                    assert entered is held
                    assert len(fake.request_ids) == 1
                assert fake.release_calls == 1

        await asyncio.to_thread(body)


async def test_the_async_allocation_allocates_when_awaited_or_entered() -> None:
    fake = flaky()
    async with serving(fake) as target, AsyncClient(target) as client:
        holding = client.allocation(fraction=0.5)
        assert (holding.id, fake.request_ids) == ("", [])  # nothing placed until entered
        async with holding as held:
            assert held is holding
            assert (held.id, len(fake.request_ids)) == ("a1", 1)
        assert fake.release_calls == 1

        awaited = await client.allocation(fraction=0.5)  # placed at once, like the sync call
        assert (awaited.id, len(fake.request_ids)) == ("a1", 2)
        assert await awaited is awaited
        async with awaited:  # entering what is placed already does not place it again
            assert len(fake.request_ids) == 2
        assert fake.release_calls == 2


async def test_a_released_holding_cannot_be_used_again(running: Running) -> None:
    """Entering or awaiting a holding after its release must fail, not run work without a
    share (review finding: the second block ran with the old id and no allocation)."""
    async with AsyncClient(running.target) as client:
        holding = client.allocation(fraction=0.25, owner="reuse/async")
        async with holding:
            pass
        with pytest.raises(FailedPreconditionError, match="was released"):
            async with holding:
                raise AssertionError("the body of a released holding ran")
        with pytest.raises(FailedPreconditionError, match="was released"):
            await holding
        assert await client.list(owner="reuse/async") == []

    def blocking() -> None:
        with Client(running.target) as client:
            held = client.allocation(fraction=0.25, owner="reuse/sync")
            with held:
                pass
            with pytest.raises(FailedPreconditionError, match="was released"), held:
                raise AssertionError("the body of a released holding ran")

    await asyncio.to_thread(blocking)


async def test_a_release_before_placing_releases_nothing_and_the_holding_still_works(
    running: Running,
) -> None:
    """Review finding: the early release marked the lease released, so the share placed on
    entry was neither renewed nor released at exit."""
    async with AsyncClient(running.target) as client:
        holding = client.allocation(fraction=0.25, owner="early/release")
        await holding.release()
        async with holding as held:
            assert [a.id for a in await client.list(owner="early/release")] == [held.id]
        assert await client.list(owner="early/release") == []


async def test_tasks_awaiting_one_holding_together_place_it_once() -> None:
    fake = flaky()
    async with serving(fake) as target, AsyncClient(target) as client:
        holding = client.allocation(fraction=0.5)

        async def awaiting() -> AsyncHeldAllocation:
            return await holding

        first, second = await asyncio.gather(awaiting(), awaiting())
        assert first is second is holding
        assert len(fake.request_ids) == 1
        renewers = [t for t in asyncio.all_tasks() if t.get_name().startswith("keepalive-")]
        assert len(renewers) == 1
        await holding.release()


@pytest.mark.integration  # renewals wait real seconds (a third of the TTL) on loopback gRPC
async def test_a_lease_no_renewal_reached_for_a_ttl_is_lost_on_the_clients_clock() -> None:
    """The loss is judged on the injected clock: both holdings see the lease lost at their
    first failed renewal (a third of the TTL in), long before a TTL passes in real time."""
    ttl_s = 9
    sync_clock, async_clock = FakeClock(), FakeClock()
    sync_lost: list[str] = []
    async_lost: list[str] = []
    fake = flaky(keepalive_status=grpc.StatusCode.UNAVAILABLE)
    async with serving(fake) as target:
        settings = ClientSettings(target=target, timeout_s=5, retry=FAST_RETRY)
        started = time.monotonic()

        def hold_sync() -> None:
            client = Client(settings=settings, clock=sync_clock, sleep=sync_clock.sleep)
            with client, client.allocation(fraction=0.5, ttl=ttl_s, on_lost=sync_lost.append):
                sync_clock.now_s += ttl_s  # no renewal has been sent yet: the first comes at 3 s
                until(lambda: bool(sync_lost), "the sync loss", limit_s=ttl_s - 0.5)

        async def hold_async() -> None:
            client = AsyncClient(
                settings=settings, clock=async_clock, sleep=async_clock.async_sleep
            )
            async with (
                client,
                client.allocation(fraction=0.5, ttl=ttl_s, on_lost=async_lost.append),
            ):
                async_clock.now_s += ttl_s
                for _ in range(int((ttl_s - 0.5) / 0.05)):  # bounded: less than a real TTL
                    if async_lost:
                        break
                    await asyncio.sleep(0.05)

        await asyncio.gather(asyncio.to_thread(hold_sync), hold_async())
        assert time.monotonic() - started < ttl_s
    for lost in (sync_lost, async_lost):
        [reason] = lost
        assert reason.startswith(f"no renewal succeeded for {ttl_s}s (etcd is unavailable")


async def test_a_retried_release_that_finds_nothing_was_a_success() -> None:
    fake = flaky(release=[grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND])
    async with serving(fake) as target:
        settings = ClientSettings(target=target, timeout_s=20, retry=FAST_RETRY)
        async with AsyncClient(settings=settings) as client:
            assert await client.release("a1") is None
        assert fake.release_calls == 2

        def blocking() -> types_pb2.Allocation | None:
            with Client(settings=settings) as client:
                return client.release("a1")

        fake.release_calls = 0
        assert await asyncio.to_thread(blocking) is None
        assert fake.release_calls == 2

        fake.release_calls = 0
        fake.release = [grpc.StatusCode.NOT_FOUND]
        with pytest.raises(NotFoundError):  # not retried: nothing can have released it
            await asyncio.to_thread(blocking)
        assert fake.release_calls == 1


async def test_a_retried_node_removal_that_finds_nothing_says_so() -> None:
    """Review finding: `kaiwo-gpu node remove ghost-typo` printed "removed node ghost-typo"
    (exit 0) when its first attempt timed out and the retry found no such node. A node
    name is typed by hand: NOT_FOUND stays NOT_FOUND."""
    fake = flaky(release=[grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND])
    async with serving(fake) as target:
        settings = ClientSettings(target=target, timeout_s=20, retry=FAST_RETRY)
        async with AsyncClient(settings=settings) as client:
            with pytest.raises(NotFoundError):
                await client.remove_node("ghost-typo")
        assert fake.release_calls == 2


async def test_aborted_is_retried_too() -> None:
    fake = flaky(failures=2, status=grpc.StatusCode.ABORTED)
    async with serving(fake) as target:
        settings = ClientSettings(target=target, timeout_s=20, retry=FAST_RETRY)
        async with AsyncClient(settings=settings) as client:
            assert (await client.allocate(fraction=0.5)).id == "a1"
    assert len(set(fake.request_ids)) == 1
    assert len(fake.request_ids) == 3


def test_an_unreachable_coordinator_is_unavailable() -> None:
    settings = ClientSettings(target="127.0.0.1:1", timeout_s=0.5, retry=FAST_RETRY)
    with Client(settings=settings) as client, pytest.raises(UnavailableError):
        client.stats()


async def test_async_held_allocation_renews_and_reports_a_lost_lease(running: Running) -> None:
    lost: list[str] = []
    async with AsyncClient(running.target) as client:
        async with client.allocation(fraction=0.25, ttl=3, on_lost=lost.append) as held:
            first = (await client.get(held.id)).expires_at.ToDatetime()
            for _ in range(400):  # bounded: 20 s
                if (await client.get(held.id)).expires_at.ToDatetime() > first:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the lease was never renewed")
            await client.release(held.id)
            for _ in range(400):
                if held.lost:
                    break
                await asyncio.sleep(0.05)
        assert lost
        assert held.id in lost[0]


async def test_a_closed_client_says_so_and_its_holdings_know(running: Running) -> None:
    lost: list[str] = []

    def body() -> None:
        client = Client(running.target)
        held = client.allocation(fraction=0.25, ttl=2, on_lost=lost.append)
        client.close()
        with pytest.raises(FailedPreconditionError, match="closed"):
            client.stats()
        until(lambda: held.lost, "the renewal to notice the closed client")
        with pytest.raises(FailedPreconditionError):
            held.release()

    await asyncio.to_thread(body)
    assert "closed" in lost[0]


async def test_the_default_target_comes_from_the_environment(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAIWO_GPU_COORDINATOR", f"127.0.0.1:1,{running.target}")
    async with AsyncClient() as client:  # port 1 refuses; gRPC moves on to the next address
        assert client.settings.target == f"ipv4:127.0.0.1:1,{running.target}"
        assert len(await client.nodes()) == 2
    monkeypatch.setenv("KAIWO_GPU_COORDINATOR", "")
    assert Client().settings.target == "127.0.0.1:50051"


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("coord.example:50051", "coord.example:50051"),
        ("dns:///coordinators.kaiwo:50051", "dns:///coordinators.kaiwo:50051"),
        ("10.0.0.1:50051, 10.0.0.2:50051", "ipv4:10.0.0.1:50051,10.0.0.2:50051"),
        ("[::1]:50051", "[::1]:50051"),
    ],
)
def test_coordinator_targets(text: str, target: str) -> None:
    assert coordinator_target(text) == target
    # Review finding: the CLI converts its flag, the client converted it again, and every
    # command given an address list failed with "'ipv4:...' is not allowed".
    assert coordinator_target(target) == target


def test_an_address_list_is_dialled_from_each_address_in_turn() -> None:
    assert dial_targets("ipv4:10.0.0.1:1,10.0.0.2:2,10.0.0.3:3") == (
        "ipv4:10.0.0.1:1,10.0.0.2:2,10.0.0.3:3",
        "ipv4:10.0.0.2:2,10.0.0.3:3,10.0.0.1:1",
        "ipv4:10.0.0.3:3,10.0.0.1:1,10.0.0.2:2",
    )
    assert dial_targets("ipv4:10.0.0.1:1") == ("ipv4:10.0.0.1:1",)
    assert dial_targets("dns:///coordinators.kaiwo:50051") == ("dns:///coordinators.kaiwo:50051",)


@pytest.mark.parametrize(
    ("status", "elsewhere"),
    [("UNAVAILABLE", True), ("DEADLINE_EXCEEDED", True), ("ABORTED", False), ("NOT_FOUND", False)],
)
def test_a_retry_goes_elsewhere_only_when_the_coordinator_did_not_answer(
    status: str, elsewhere: bool
) -> None:
    assert try_another_coordinator(Failure(status, "")) is elsewhere


@pytest.mark.parametrize("text", ["", "nowhere", "a.example:1,b.example:2", "host:port"])
def test_bad_coordinator_targets_name_the_forms(text: str) -> None:
    with pytest.raises(InvalidArgumentError, match="host:port"):
        coordinator_target(text)


async def test_a_client_given_several_addresses_fails_over_to_the_live_one(
    running: Running,
) -> None:
    """Review finding: `Client("h:p,h:p")` was dialled as one misformatted name and spent
    its whole timeout; it is now one `ipv4:` target, as the CLI and the environment make."""
    dead = f"127.0.0.1:{free_port()}"
    settings = ClientSettings(timeout_s=10.0)
    async with AsyncClient(f"{dead},{running.target}", settings=settings) as client:
        stats = await client.stats()
    assert stats.gpu_count > 0
    with pytest.raises(InvalidArgumentError, match="target"):
        AsyncClient("a b c", settings=settings)


async def test_a_dead_address_in_front_costs_no_call_and_no_move(running: Running) -> None:
    """A refused address is passed over inside the channel (its list holds every address),
    so the client neither fails a call nor moves: all calls go to one coordinator, which
    reads its own writes."""
    dead = f"127.0.0.1:{free_port()}"

    def calls() -> tuple[int, int]:
        settings = ClientSettings(timeout_s=10.0)
        with Client(f"{dead},{running.target}", settings=settings) as client:
            made = client.allocate(fraction=0.1)
            for _ in range(5):
                assert client.get(made.id).id == made.id
            client.release(made.id)
            return client._current, len(client._open_channels())

    # gRPC passes over the dead address itself: the client never had to move.
    assert await asyncio.to_thread(calls) == (0, 1)


async def test_the_cli_takes_an_address_list_whose_first_coordinator_is_dead(
    running: Running,
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "kaiwo_gpu.cli.main",
            "stats",
            "-o",
            "json",
            "--coordinator",
            f"{dead},{running.target}",
            "--timeout",
            "20s",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["gpu_count"] > 0
