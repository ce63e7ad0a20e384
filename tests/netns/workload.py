"""The fault suite's clients: run on the client host, record every operation as history.

`python -m tests.netns.workload MODE ...` where MODE is
- `mixed`: tenants allocating, renewing and releasing mixed requests (time-shared, cu-mask,
  non-sharing, whole and multi-GPU, with and without a TTL) through both coordinators, each
  moving to the other coordinator when one does not answer; at the end it releases what has
  no lease, leaves what has one to expire, and replays every Allocate whose outcome it never
  learnt, so each "unknown" is resolved one way or the other;
- `vanish`: a tenant that takes leased allocations and keeps renewing them until it is
  SIGKILLed (its allocations must come back once their leases lapse);
- `library`: a tenant holding allocations through the client library (`Client.allocation`,
  its renewal thread and its retries), run under a skewed clock by the suite;
- `nodes`: one ListNodes per coordinator, printed as JSON (which nodes are schedulable);
- `stats`: GetClusterStats per coordinator, printed as JSON.

Every history line is one JSON object written and flushed when the call ends, so a process
killed mid-run leaves a history that is whole up to its last finished call. Its `start` and
`end` are CLOCK_MONOTONIC readings: one clock for every process on the machine, which the
skewed tenants' libfaketime leaves alone; `expires_at` is the coordinator's wall clock.
Bounded: every loop ends by its deadline, every call has a timeout, every tenant holds a few
allocations.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format

from kaiwo_gpu.client import Client, ClientSettings
from kaiwo_gpu.common.channels import open_aio_channel
from kaiwo_gpu.common.credentials import Credentials
from kaiwo_gpu.v1 import allocation_pb2, allocation_pb2_grpc, types_pb2

if TYPE_CHECKING:
    from kaiwo_gpu.v1.allocation_pb2_grpc import AllocationServiceAsyncStub

CALL_TIMEOUT_S = 2.0
_CALL_IDS = itertools.count()
LEASED_TTL_S = 6
HELD_PER_TENANT = 4
AWAY_AFTER_FAILURE_S = 2.0
DEFINITE = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED,
})  # fmt: skip
"""Codes that say the call did not take effect; any other failure may have (unknown)."""
KINDS: dict[str, dict[str, Any]] = {
    "time-shared": {"fraction_millis": 250},
    "cu-mask": {"fraction_millis": 500, "isolation_name": "cu-mask"},
    "non-sharing": {"fraction_millis": 500, "sharing": False},
    "whole": {"fraction_millis": 1000},
    "multi-gpu": {"count": 2, "fraction_millis": 500},
}


class History:
    """Appends one JSON line per finished operation."""

    def __init__(self, path: Path) -> None:
        self._file: IO[str] = path.open("a")

    def record(self, **entry: Any) -> None:
        self._file.write(json.dumps(entry, sort_keys=True) + "\n")
        self._file.flush()


@dataclass
class Coordinators:
    """One TLS channel per coordinator address."""

    addresses: list[str]
    credentials: Credentials
    stubs: dict[str, AllocationServiceAsyncStub] = field(default_factory=dict)
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    def open(self) -> None:
        for address in self.addresses:
            channel = open_aio_channel(address, self.credentials, ())
            self._channels.append(channel)
            self.stubs[address] = allocation_pb2_grpc.AllocationServiceStub(channel)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


async def call(
    history: History,
    op: str,
    address: str,
    invoke: Callable[[], Awaitable[Any]],
    **entry: Any,
) -> tuple[str, Any]:
    """One call, recorded: ("ok", reply), ("fail", code) or ("unknown", code).

    Its invocation is recorded first, so a call cut short by a SIGKILL still shows (the
    checker takes an invocation with no answer as unknown: it may have landed)."""
    start = time.monotonic()
    entry["call_id"] = f"{os.getpid()}-{next(_CALL_IDS)}"
    history.record(op=op, coordinator=address, start=start, phase="invoke", **entry)
    try:
        reply = await invoke()
    except grpc.aio.AioRpcError as error:
        outcome = "fail" if error.code() in DEFINITE else "unknown"
        history.record(op=op, coordinator=address, start=start, end=time.monotonic(),
                       outcome=outcome, code=error.code().name,
                       message=(error.details() or "")[:300], **entry)  # fmt: skip
        return outcome, error.code()
    history.record(op=op, coordinator=address, start=start, end=time.monotonic(), outcome="ok",
                   code="OK", **{**entry, **_reply_fields(reply)})  # fmt: skip
    return "ok", reply


def _reply_fields(reply: Any) -> dict[str, Any]:
    if isinstance(reply, allocation_pb2.AllocateResponse | allocation_pb2.ReleaseResponse):
        record = reply.allocation
        fields: dict[str, Any] = {
            "allocation_id": record.id,
            "node": record.node,
            "gpus": [[g.uuid, g.granted_millis] for g in record.gpus],
            "lease_id": record.lease_id,
        }
        if record.HasField("expires_at"):
            fields["expires_at"] = record.expires_at.ToDatetime(tzinfo=UTC).timestamp()
        if isinstance(reply, allocation_pb2.AllocateResponse):
            fields["replayed"] = reply.replayed
        return fields
    if isinstance(reply, allocation_pb2.KeepAliveResponse):
        return {"expires_at": reply.expires_at.ToDatetime(tzinfo=UTC).timestamp()}
    return {}


@dataclass
class Held:
    allocation_id: str
    request_id: str
    ttl_s: int
    coordinator: str
    renewed_at: float


@dataclass
class Tenant:
    """One client: a few allocations at a time, renewed, released, through its preferred
    coordinator first and the other when that one does not answer."""

    name: str
    coordinators: Coordinators
    history: History
    rng: random.Random
    preferred: int
    pinned: bool
    """A pinned tenant calls only its own coordinator, so each side's recovery shows."""
    session: str = ""
    """Allocations with a session share its lease (one per session and TTL)."""
    held: dict[str, Held] = field(default_factory=dict)
    unknown: dict[str, allocation_pb2.AllocateRequest] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _away_until: float = 0.0

    @property
    def address(self) -> str:
        addresses = self.coordinators.addresses
        away = time.monotonic() < self._away_until
        return addresses[(self.preferred + away) % len(addresses)]

    def _move_on(self) -> None:
        """After a call that got no answer, the other coordinator for a while."""
        if not self.pinned:
            self._away_until = time.monotonic() + AWAY_AFTER_FAILURE_S

    async def allocate(self, kind: str, ttl_s: int) -> None:
        request_id = f"{self.name}-{next(self._ids)}"
        request = allocation_pb2.AllocateRequest(
            request=types_pb2.AllocationRequest(
                request_id=request_id, ttl_seconds=ttl_s, session=self.session, **KINDS[kind]
            )
        )
        address = self.address
        stub = self.coordinators.stubs[address]
        outcome, reply = await call(
            self.history, "allocate", address,
            lambda: stub.Allocate(request, timeout=CALL_TIMEOUT_S),
            client=self.name, request_id=request_id, kind=kind, ttl_s=ttl_s,
        )  # fmt: skip
        if outcome == "ok":
            self.held[reply.allocation.id] = Held(
                reply.allocation.id, request_id, ttl_s, address, time.monotonic()
            )
        elif outcome == "unknown":
            self.unknown[request_id] = request
            self._move_on()

    async def renew_due(self) -> None:
        for held in list(self.held.values()):
            if not held.ttl_s or time.monotonic() - held.renewed_at < held.ttl_s / 4:
                continue
            address = self.address
            stub = self.coordinators.stubs[address]
            outcome, reply = await call(
                self.history, "keepalive", address,
                lambda held=held, stub=stub: stub.KeepAlive(  # type: ignore[misc]
                    allocation_pb2.KeepAliveRequest(allocation_id=held.allocation_id),
                    timeout=CALL_TIMEOUT_S,
                ),
                client=self.name, allocation_id=held.allocation_id, request_id=held.request_id,
            )  # fmt: skip
            if outcome == "ok":
                held.renewed_at = time.monotonic()
            elif reply == grpc.StatusCode.NOT_FOUND:
                self.held.pop(held.allocation_id)  # lapsed (the checker judges whether early)
            elif outcome == "unknown":
                self._move_on()

    async def release(self, held: Held) -> bool:
        """True once the release is definite (done, or the record is gone)."""
        address = self.address
        stub = self.coordinators.stubs[address]
        outcome, _ = await call(
            self.history, "release", address,
            lambda: stub.Release(
                allocation_pb2.ReleaseRequest(allocation_id=held.allocation_id),
                timeout=CALL_TIMEOUT_S,
            ),
            client=self.name, allocation_id=held.allocation_id, request_id=held.request_id,
        )  # fmt: skip
        if outcome == "unknown":
            self._move_on()
            return False
        self.held.pop(held.allocation_id, None)
        return True

    async def run(self, deadline: float, leased_share: float) -> None:
        while time.monotonic() < deadline:
            await self.renew_due()
            if len(self.held) < HELD_PER_TENANT and self.rng.random() < 0.6:
                ttl_s = LEASED_TTL_S if self.rng.random() < leased_share else 0
                await self.allocate(self.rng.choice(sorted(KINDS)), ttl_s)
            elif self.held:
                await self.release(self.held[self.rng.choice(sorted(self.held))])
            await asyncio.sleep(self.rng.uniform(0.05, 0.25))

    async def finish(self, deadline: float) -> None:
        """Releases what has no lease, leaves leased ones to lapse, and replays every
        Allocate of unknown outcome until a coordinator answers it (releasing what a replay
        shows was placed), all before `deadline`."""
        for held in [h for h in self.held.values() if not h.ttl_s]:
            while time.monotonic() < deadline and not await self.release(held):
                await asyncio.sleep(0.3)
        for request_id, request in list(self.unknown.items()):
            while time.monotonic() < deadline:
                address = self.address
                stub = self.coordinators.stubs[address]
                outcome, reply = await call(
                    self.history, "replay", address,
                    lambda stub=stub, request=request: stub.Allocate(  # type: ignore[misc]
                        request, timeout=CALL_TIMEOUT_S
                    ),
                    client=self.name, request_id=request_id, ttl_s=request.request.ttl_seconds,
                )  # fmt: skip
                if outcome == "unknown":
                    self._move_on()
                    await asyncio.sleep(0.3)
                    continue
                self.unknown.pop(request_id)
                if outcome == "ok" and not reply.allocation.request.ttl_seconds:
                    held = Held(reply.allocation.id, request_id, 0, address, time.monotonic())
                    while time.monotonic() < deadline and not await self.release(held):
                        await asyncio.sleep(0.3)
                break


async def run_tenants(args: argparse.Namespace, leased_share: float) -> None:
    coordinators = Coordinators(args.coordinators.split(","), _credentials(args))
    coordinators.open()
    history = History(args.history)
    rng = random.Random(args.seed)
    tenants = [
        Tenant(
            f"{args.user}-{args.seed}-{n}",
            coordinators,
            history,
            random.Random(rng.random()),
            preferred=n,
            pinned=n < 2,
            session=f"{args.user}-{args.seed}-{n}" if n % 2 else "",
        )
        for n in range(args.tenants)
    ]
    deadline = time.monotonic() + args.duration
    try:
        await asyncio.gather(*(tenant.run(deadline, leased_share) for tenant in tenants))
        if args.mode == "mixed":
            finish_by = time.monotonic() + args.finish_within
            await asyncio.gather(*(tenant.finish(finish_by) for tenant in tenants))
            unresolved = sum(len(tenant.unknown) for tenant in tenants)
            history.record(op="end", outcome="ok", unresolved=unresolved, start=time.monotonic())
    finally:
        await coordinators.close()


def run_library(args: argparse.Namespace) -> None:
    """Holds leased allocations one after another through the client library, whose clock
    the suite skews; every hold is recorded like a call."""
    history = History(args.history)
    settings = ClientSettings(
        target=args.coordinators, timeout_s=10.0, credentials=_credentials(args)
    )
    deadline = time.monotonic() + args.duration

    def record_lost(reason: str) -> None:
        """A lease the library lost, as a renewal refused with NOT_FOUND: the checker
        judges it against the expiry the grant promised."""
        history.record(op="keepalive", coordinator="library", start=time.monotonic(),
                       end=time.monotonic(), outcome="fail", code="NOT_FOUND",
                       client=f"{args.user}-lib", allocation_id=holding[0],
                       message=reason[:300])  # fmt: skip

    holding = [""]
    with Client(settings=settings) as client:
        for n in itertools.count():
            if time.monotonic() >= deadline:
                break
            request_id = f"{args.user}-{args.seed}-lib-{n}"
            start = time.monotonic()
            try:
                with client.allocation(
                    request_id=request_id, fraction=0.25, ttl=LEASED_TTL_S,
                    on_lost=record_lost,
                ) as held:  # fmt: skip
                    granted = held.allocation
                    holding[0] = granted.id
                    history.record(op="allocate", coordinator="library", start=start,
                                   end=time.monotonic(), outcome="ok", code="OK",
                                   client=f"{args.user}-lib", request_id=request_id,
                                   kind="time-shared", ttl_s=LEASED_TTL_S,
                                   allocation_id=granted.id, node=granted.node,
                                   gpus=[[g.uuid, g.granted_millis] for g in granted.gpus],
                                   lease_id=granted.lease_id, replayed=False,
                                   expires_at=granted.expires_at.ToDatetime(
                                       tzinfo=UTC).timestamp())  # fmt: skip
                    time.sleep(min(LEASED_TTL_S * 1.5, max(0.0, deadline - time.monotonic())))
                history.record(op="release", coordinator="library", start=time.monotonic(),
                               end=time.monotonic(), outcome="ok", code="OK",
                               client=f"{args.user}-lib", allocation_id=granted.id,
                               request_id=request_id)  # fmt: skip
            except Exception as error:  # recorded: the checker counts it
                history.record(op="allocate", coordinator="library", start=start,
                               end=time.monotonic(), outcome="unknown", code=type(error).__name__,
                               message=str(error)[:300], client=f"{args.user}-lib",
                               request_id=request_id, ttl_s=LEASED_TTL_S)  # fmt: skip
                time.sleep(0.5)


async def print_per_coordinator(args: argparse.Namespace, what: str) -> None:
    coordinators = Coordinators(args.coordinators.split(","), _credentials(args))
    coordinators.open()
    answers: dict[str, Any] = {}
    try:
        for address, stub in coordinators.stubs.items():
            try:
                if what == "nodes":
                    reply: Any = await stub.ListNodes(
                        allocation_pb2.ListNodesRequest(), timeout=CALL_TIMEOUT_S
                    )
                    answers[address] = {n.name: n.schedulable for n in reply.nodes}
                else:
                    reply = await stub.GetClusterStats(
                        allocation_pb2.GetClusterStatsRequest(), timeout=CALL_TIMEOUT_S
                    )
                    answers[address] = json_format.MessageToDict(reply)
            except grpc.aio.AioRpcError as error:
                answers[address] = {"error": error.code().name}
    finally:
        await coordinators.close()
    print(json.dumps(answers, sort_keys=True))


def _credentials(args: argparse.Namespace) -> Credentials:
    return Credentials(tls_ca=args.ca, tls_cert=args.cert, tls_key=args.key)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.netns.workload")
    parser.add_argument("mode", choices=["mixed", "vanish", "library", "nodes", "stats"])
    parser.add_argument("--coordinators", required=True, help="comma-separated host:port")
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--user", default="alice")
    parser.add_argument("--history", type=Path, default=Path("history.jsonl"))
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--finish-within", type=float, default=30.0)
    parser.add_argument("--tenants", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.mode in ("nodes", "stats"):
        asyncio.run(print_per_coordinator(args, args.mode))
    elif args.mode == "library":
        run_library(args)
    else:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_tenants(args, leased_share=1.0 if args.mode == "vanish" else 0.5))


if __name__ == "__main__":
    main(sys.argv[1:])
