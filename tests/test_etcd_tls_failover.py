"""A store over a three-member TLS etcd outlives its first member (issue 15).

Each member serves its own certificate, naming only its own address (127.0.0.1, .2, .3:
Linux routes all of 127/8 to lo), as operators issue them. SIGKILL of the member the
store talks to must leave commits and the watch working on the other two, with client
certificates and with etcd's user/password auth (whose tokens each member checks); and a
coordinator over that cluster goes on allocating, its view's watch back on a live member.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc
import pytest

from kaiwo_gpu.common import pki
from kaiwo_gpu.common.errors import UnavailableError
from kaiwo_gpu.common.identity import Identity, Role
from kaiwo_gpu.coordinator.local.etcd import (
    EtcdServingTls,
    LocalEtcd,
    local_etcd_cluster,
    start_cluster,
)
from kaiwo_gpu.coordinator.server import Coordinator
from kaiwo_gpu.coordinator.settings import CoordinatorSettings
from kaiwo_gpu.coordinator.state.changes import Change, Put, Txn
from kaiwo_gpu.coordinator.state.etcd_security import EtcdSecurity
from kaiwo_gpu.coordinator.state.store import EtcdStore, _unavailable
from kaiwo_gpu.v1 import allocation_pb2, allocation_pb2_grpc
from tests.harness import request

if TYPE_CHECKING:
    from kaiwo_gpu.v1.allocation_pb2_grpc import AllocationServiceAsyncStub

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
PASSWORD = "Etcd-Root-Pass-5e2a"
BOUND_S = 15.0
"""What any one step may take after the kill: a new leader, if member one led, plus a call."""
TRIES = 5
"""Attempts of a step after the kill. If member one led, a write forwarded to it before
the others notice is lost and ends UNAVAILABLE at its deadline (outcome unknown), and a
client sends it again (Allocate with the same request_id); so does the view's watch loop.
The old store failed every attempt, for as long as member one was down."""
T = TypeVar("T")


@dataclass(frozen=True)
class Pki:
    ca: Path
    members: tuple[tuple[Path, Path], ...]
    """Member i's certificate and key: only HOSTS[i] in its SAN."""
    client: tuple[Path, Path]


@pytest.fixture(scope="module")
def member_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("member-pki")
    ca = pki.new_ca("etcd members' CA")
    (directory / "ca.crt").write_bytes(ca.certificate_pem)
    members = tuple(
        pki.issue_into(directory, ca, Identity(Role.COORDINATOR, f"etcd-{n}"), sans=(host,))
        for n, host in enumerate(HOSTS)
    )
    client = pki.issue_into(directory, ca, Identity(Role.COORDINATOR, "kaiwo"))
    return Pki(directory / "ca.crt", members, client)


def _cluster(tmp_path: Path, member_pki: Pki, *, client_cert_auth: bool) -> list[LocalEtcd]:
    serving = [
        EtcdServingTls(cert, key, member_pki.ca, client_cert_auth=client_cert_auth)
        for cert, key in member_pki.members
    ]
    return local_etcd_cluster(tmp_path / "etcd", len(HOSTS), tls=serving, hosts=HOSTS)


def _enable_auth(member: LocalEtcd, ca: Path) -> None:
    """User root (role root) with PASSWORD, then auth on, through etcd's JSON gateway."""
    context = ssl.create_default_context(cafile=str(ca))
    for path, body in (
        ("/v3/auth/user/add", {"name": "root", "password": PASSWORD}),
        ("/v3/auth/role/add", {"name": "root"}),
        ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
        ("/v3/auth/enable", {}),
    ):
        call = urllib.request.Request(
            f"{member.url}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(call, context=context, timeout=5) as reply:
            assert reply.status == 200, reply.read()


@pytest.fixture(params=["client certificates", "user and password"])
def secured(
    request: pytest.FixtureRequest, tmp_path: Path, member_pki: Pki
) -> Iterator[tuple[list[LocalEtcd], EtcdSecurity]]:
    """A started cluster, and how the store proves itself to it."""
    with_password = request.param == "user and password"
    cluster = _cluster(tmp_path, member_pki, client_cert_auth=not with_password)
    start_cluster(cluster)
    try:
        if with_password:
            _enable_auth(cluster[0], member_pki.ca)
            security = EtcdSecurity(ca=member_pki.ca, user="root", password=PASSWORD)
        else:
            cert, key = member_pki.client
            security = EtcdSecurity(ca=member_pki.ca, cert=cert, key=key)
        yield cluster, security
    finally:
        for member in cluster:  # the data goes with tmp_path: no need to stop gently
            member.stop(kill=True)


@pytest.fixture
async def store(secured: tuple[list[LocalEtcd], EtcdSecurity]) -> AsyncIterator[EtcdStore]:
    cluster, security = secured
    store = EtcdStore([member.endpoint for member in cluster], security=security)
    yield store
    await store.close()


async def _retried(step: Callable[[], Awaitable[T]]) -> T:
    """`step` again while etcd is unavailable, at most TRIES times."""
    for _ in range(TRIES - 1):
        try:
            return await asyncio.wait_for(step(), BOUND_S)
        except UnavailableError:
            await asyncio.sleep(0.2)
    return await asyncio.wait_for(step(), BOUND_S)


async def _changes_from(store: EtcdStore, prefix: bytes, revision: int) -> list[Change]:
    """The first changes a new watch from `revision` delivers."""
    watch = store.watch(prefix, revision)
    try:
        while True:
            _, changes = await asyncio.wait_for(anext(watch), BOUND_S)
            if changes:
                return changes
    finally:
        await watch.aclose()  # type: ignore[attr-defined]


@pytest.mark.integration
async def test_commits_and_the_watch_go_on_after_the_first_member_is_killed(
    secured: tuple[list[LocalEtcd], EtcdSecurity], store: EtcdStore, prefix: str
) -> None:
    cluster, _ = secured
    key = f"{prefix}probe".encode()
    before = await store.commit(Txn(puts=(Put(key, b"before"),)))
    assert before.succeeded
    watch = store.watch(prefix.encode(), before.revision + 1)
    try:
        assert await asyncio.wait_for(anext(watch), BOUND_S) == (0, [])  # the watch is up
        cluster[0].stop(kill=True)  # the member the store dialed first
        read = await _retried(lambda: store.get(key))
        assert read is not None
        assert read.value == b"before"
        with pytest.raises(UnavailableError):  # the view's loop then watches again
            await asyncio.wait_for(anext(watch), BOUND_S)
    finally:
        await watch.aclose()  # type: ignore[attr-defined]

    after = await _retried(lambda: store.commit(Txn(puts=(Put(key, b"after"),))))
    assert after.succeeded
    changes = await _retried(lambda: _changes_from(store, prefix.encode(), before.revision + 1))
    assert [(change.key, change.value) for change in changes] == [(key, b"after")]
    stored = await store.get(key)
    assert stored is not None
    assert stored.value == b"after"


async def _allocate(
    api: AllocationServiceAsyncStub, request_id: str
) -> allocation_pb2.AllocateResponse:
    """Allocate as a client does: again with the same request_id while UNAVAILABLE."""
    for _ in range(TRIES - 1):
        try:
            return await api.Allocate(request(request_id, fraction_millis=250), timeout=BOUND_S)
        except grpc.aio.AioRpcError as error:
            if error.code() is not grpc.StatusCode.UNAVAILABLE:
                raise
        await asyncio.sleep(0.2)
    return await api.Allocate(request(request_id, fraction_millis=250), timeout=BOUND_S)


@pytest.mark.integration
async def test_a_coordinator_goes_on_allocating_after_the_first_member_is_killed(
    secured: tuple[list[LocalEtcd], EtcdSecurity], prefix: str, inventory: Path
) -> None:
    cluster, security = secured
    coordinator = Coordinator(
        CoordinatorSettings(
            listen="127.0.0.1:0",
            etcd_endpoints=tuple(member.endpoint for member in cluster),
            prefix=prefix,
            inventory=inventory,
            etcd_security=security,
            startup_wait_s=BOUND_S,
        )
    )
    port = await coordinator.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            api: AllocationServiceAsyncStub = allocation_pb2_grpc.AllocationServiceStub(channel)
            first = await _allocate(api, "before-the-kill")
            cluster[0].stop(kill=True)
            second = await _allocate(api, "after-the-kill")
            # The next decision waits for the view to hold the last commit: only a watch
            # re-opened on a live member delivers it.
            third = await _allocate(api, "after-the-watch")
            assert coordinator.view.connected
            held = set(coordinator.view.state.allocations)
    finally:
        await coordinator.stop()
    assert {first.allocation.id, second.allocation.id, third.allocation.id} <= held


NEVER_SENT = "failed to connect to all addresses; last error: UNAVAILABLE: Connection refused"


@pytest.mark.parametrize(
    ("code", "details", "idempotent", "resent"),
    [
        (grpc.StatusCode.UNAVAILABLE, NEVER_SENT, False, True),  # nothing left: even a txn
        (grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)", False, False),
        (grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)", True, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", True, False),  # time spent
    ],
)
def test_a_call_goes_to_the_next_member_only_when_that_cannot_do_harm(
    code: grpc.StatusCode, details: str, idempotent: bool, resent: bool
) -> None:
    error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
    assert _unavailable(error, "127.0.0.1:2379").may_resend(idempotent=idempotent) is resent
