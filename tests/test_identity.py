"""Identity and access over real TLS on 127.0.0.1 and a real etcd: who may do what.

Each refusal is checked twice: the status the caller gets, and etcd's revision before and
after (nothing was written). A coordinator here serves TLS with client certificates from a
test CA and also accepts the bearer tokens of a token file.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import structlog
from cryptography import x509

from kaiwo_gpu.client import ClientSettings
from kaiwo_gpu.client.aio import AsyncClient
from kaiwo_gpu.common import credentials, pki
from kaiwo_gpu.common.channels import open_aio_channel
from kaiwo_gpu.common.credentials import Credentials
from kaiwo_gpu.common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from kaiwo_gpu.common.identity import Identity, Role
from kaiwo_gpu.coordinator.local.etcd import LocalEtcd
from kaiwo_gpu.coordinator.server import Coordinator
from kaiwo_gpu.coordinator.settings import CoordinatorSettings
from kaiwo_gpu.coordinator.transport import ServingCertificates
from kaiwo_gpu.v1 import agent_pb2, allocation_pb2, allocation_pb2_grpc
from tests.agents import RawAgent, raw_inventory
from tests.conftest import Running, coordinator_running
from tests.harness import audit_etcd, request
from tests.test_slurm import epilog, epilog_environment, site_file, task_environment, task_prolog

pytestmark = pytest.mark.integration
KAIWO_GPU = (sys.executable, "-m", "kaiwo_gpu.cli.main")


@dataclass
class Pki:
    directory: Path
    ca: pki.KeyPair

    def holder(self, role: Role, name: str, **issued: object) -> Credentials:
        """Credentials of a client holding a certificate for `role`/`name` from this CA."""
        pair = pki.issue(self.ca, Identity(role, name), **issued)  # type: ignore[arg-type]
        certificate, key = pki.write_pair(self.directory, f"{role.value}-{name}", pair)
        return Credentials(tls_ca=self.ca_path, tls_cert=certificate, tls_key=key)

    @property
    def ca_path(self) -> Path:
        return self.directory / "ca.crt"

    def token(self, token: str) -> Credentials:
        path = self.directory / f"token-{credentials.token_digest(token)[:8]}"
        path.write_text(token + "\n")
        return Credentials(tls_ca=self.ca_path, token_file=path)


@pytest.fixture
def test_pki(tmp_path: Path) -> Pki:
    directory = tmp_path / "tls"
    ca = pki.load_or_make_ca(directory)
    pki.issue_into(directory, ca, Identity(Role.COORDINATOR, "coordinator"))
    return Pki(directory, ca)


TOKENS = {"carol-token-1": ("carol", "user"), "ci-token-1": ("ci", "scheduler")}


def write_tokens(path: Path, tokens: dict[str, tuple[str, str]]) -> None:
    path.write_text(
        "# digest name role\n"
        + "".join(f"{credentials.token_digest(t)} {n} {r}\n" for t, (n, r) in tokens.items())
    )


@contextlib.asynccontextmanager
async def secured(
    etcd: LocalEtcd, prefix: str, inventory: Path | None, tls: Pki, *, client_ca: bool = True
) -> AsyncIterator[Running]:
    """A coordinator serving TLS, requiring client certificates from the test CA (unless
    not `client_ca`: then callers prove themselves with the tokens of TOKENS alone)."""
    tokens = tls.directory / "tokens.txt"
    write_tokens(tokens, TOKENS)
    async with coordinator_running(
        etcd.endpoint,
        prefix,
        inventory,
        tls=Credentials(
            tls_ca=tls.ca_path if client_ca else None,
            tls_cert=tls.directory / "coordinator.crt",
            tls_key=tls.directory / "coordinator.key",
        ),
        tokens=tokens,
    ) as running:
        yield running


def client(running: Running, held: Credentials) -> AsyncClient:
    return AsyncClient(
        settings=ClientSettings(
            target=running.target,
            timeout_s=5,
            credentials=held,
        )
    )


def stub(running: Running, held: Credentials | None) -> tuple[grpc.aio.Channel, object]:
    """A bare stub over TLS with `held` (plaintext without), for statuses unretried."""
    if held is None:
        channel = grpc.aio.insecure_channel(running.target)
    else:
        channel = open_aio_channel(running.target, held, ())
    return channel, allocation_pb2_grpc.AllocationServiceStub(channel)


async def revision(running: Running) -> int:
    return (await audit_etcd(running.endpoint, running.prefix)).revision


async def test_a_handshake_without_a_good_certificate_is_refused_and_writes_nothing(
    etcd: LocalEtcd, prefix: str, inventory: Path, test_pki: Pki, tmp_path: Path
) -> None:
    other = Pki(tmp_path / "other", pki.load_or_make_ca(tmp_path / "other"))
    expired = test_pki.holder(
        Role.USER,
        "alice",
        days=1,
        not_before=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3),
    )
    cases = {
        "plaintext": None,
        "no certificate": Credentials(tls_ca=test_pki.ca_path),
        "another CA": Credentials(
            tls_ca=test_pki.ca_path,
            tls_cert=other.holder(Role.ADMIN, "root").tls_cert,
            tls_key=other.holder(Role.ADMIN, "root").tls_key,
        ),
        "expired": expired,
    }
    async with secured(etcd, prefix, inventory, test_pki) as running:
        before = await revision(running)
        for case, held in cases.items():
            channel, api = stub(running, held)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await api.Allocate(request(f"r-{case}", fraction_millis=500), timeout=5)  # type: ignore[attr-defined]
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, case
            await channel.close()
        assert await revision(running) == before


async def test_users_see_and_change_only_their_own_allocations(
    etcd: LocalEtcd, prefix: str, inventory: Path, test_pki: Pki
) -> None:
    alice, bob = test_pki.holder(Role.USER, "alice"), test_pki.holder(Role.USER, "bob")
    root = test_pki.holder(Role.ADMIN, "root")
    async with (
        secured(etcd, prefix, inventory, test_pki) as running,
        client(running, alice) as as_alice,
        client(running, bob) as as_bob,
    ):
        with structlog.testing.capture_logs() as logs:
            mine = await as_alice.allocate(request_id="a-1", fraction=0.5, ttl="5m")
        assert mine.request.owner == "alice"  # from the certificate, not the request
        stored = (await audit_etcd(running.endpoint, running.prefix)).allocations
        assert stored[mine.id].request.owner == "alice"
        assert {"event": "allocated", "identity": "user/alice"}.items() <= logs[-1].items()
        before = await revision(running)
        for action, call in (
            ("release", as_bob.release(mine.id)),
            ("renew", as_bob.keep_alive(mine.id)),
            ("read", as_bob.get(mine.id)),
            ("list", as_bob.list(owner="alice")),
            ("allocate", as_bob.allocate(request_id="b-1", fraction=0.5, owner="alice")),
        ):
            with pytest.raises(PermissionDeniedError) as refused:
                await call
            assert "user/bob" in refused.value.message, action
        with pytest.raises(AlreadyExistsError) as taken:  # alice's request id, bob's owner
            await as_bob.allocate(request_id="a-1", fraction=0.5, ttl="5m")
        assert mine.id not in taken.value.message, "another owner's allocation is not named"
        assert [a.id for a in await as_bob.list()] == []
        assert [a.id for a in await as_alice.list()] == [mine.id]
        assert await revision(running) == before  # nothing written by any refusal
        async with client(running, root) as as_root:
            assert (await as_root.get(mine.id)).id == mine.id
            assert [a.id for a in await as_root.list(owner="alice")] == [mine.id]
            theirs = await as_root.allocate(request_id="r-1", fraction=0.25, owner="bob")
            assert theirs.request.owner == "bob"
            assert [a.id for a in await as_bob.list()] == [theirs.id]
            with structlog.testing.capture_logs() as logs:
                await as_root.release(theirs.id)
            assert {"event": "released", "identity": "admin/root", "owner": "bob"}.items() <= (
                logs[-1].items()
            )
        await as_alice.keep_alive(mine.id)
        await as_alice.release(mine.id)
        assert mine.id not in (await audit_etcd(running.endpoint, running.prefix)).allocations


async def test_a_watch_shows_only_the_callers_allocations(
    etcd: LocalEtcd, prefix: str, inventory: Path, test_pki: Pki
) -> None:
    alice, bob = test_pki.holder(Role.USER, "alice"), test_pki.holder(Role.USER, "bob")
    async with (
        secured(etcd, prefix, inventory, test_pki) as running,
        client(running, alice) as as_alice,
        client(running, bob) as as_bob,
    ):
        first = await as_alice.allocate(request_id="w-a1", fraction=0.25)
        channel, api = stub(running, bob)
        events = api.WatchAllocations(allocation_pb2.WatchAllocationsRequest())  # type: ignore[attr-defined]
        await as_alice.allocate(request_id="w-a2", fraction=0.25)
        own = await as_bob.allocate(request_id="w-b1", fraction=0.25)
        event = await asyncio.wait_for(events.read(), 10)
        assert event.allocation.id == own.id  # not alice's, made before and after it
        events.cancel()
        denied = api.WatchAllocations(allocation_pb2.WatchAllocationsRequest(owner="alice"))  # type: ignore[attr-defined]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await denied.read()
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await channel.close()
        assert first.request.owner == "alice"


async def test_a_scheduler_names_owners_under_its_own_prefix_only(
    etcd: LocalEtcd, prefix: str, inventory: Path, test_pki: Pki
) -> None:
    slurm = test_pki.holder(Role.SCHEDULER, "slurm")
    async with (
        secured(etcd, prefix, inventory, test_pki) as running,
        client(running, slurm) as scheduler,
    ):
        job = await scheduler.allocate(request_id="job-1", fraction=0.5, owner="slurm/1")
        assert job.request.owner == "slurm/1"
        before = await revision(running)
        for owner in ("alice", "slurmx/1", "slur"):
            with pytest.raises(PermissionDeniedError, match="slurm/"):
                await scheduler.allocate(request_id=f"job-{owner}", fraction=0.5, owner=owner)
        assert await revision(running) == before
        assert [a.id for a in await scheduler.list(owner="slurm/1")] == [job.id]
        assert (await scheduler.release(job.id)) is not None


async def test_an_agent_registers_only_its_own_node(
    etcd: LocalEtcd, prefix: str, inventory: Path, test_pki: Pki
) -> None:
    async with secured(etcd, prefix, None, test_pki) as running:
        before = await revision(running)
        for holder, node in (
            (test_pki.holder(Role.AGENT, "gpu-1"), "gpu-2"),
            (test_pki.holder(Role.USER, "gpu-2"), "gpu-2"),
        ):
            channel = open_aio_channel(running.target, holder, ())
            agent = RawAgent(channel, node, raw_inventory(node))
            await agent.send(agent_message(node))
            code, details = await agent.status()
            assert code == grpc.StatusCode.PERMISSION_DENIED, details
            assert repr(node) in details
            await channel.close()
        assert await revision(running) == before
        channel = open_aio_channel(running.target, test_pki.holder(Role.AGENT, "gpu-1"), ())
        agent = RawAgent(channel, "gpu-1", raw_inventory("gpu-1"))
        directive = await agent.register()
        assert directive is not None
        assert "gpu-1" in (await audit_etcd(running.endpoint, running.prefix)).nodes
        agent.close()
        await channel.close()


def agent_message(node: str) -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(
        register=agent_pb2.Register(node=node, gpus=raw_inventory(node), backend="simulated")
    )


async def test_bearer_tokens_identify_callers_and_are_read_again_when_the_file_changes(
    etcd: LocalEtcd, prefix: str, inventory: Path, test_pki: Pki
) -> None:
    async with secured(etcd, prefix, inventory, test_pki, client_ca=False) as running:
        before = await revision(running)
        for held in (test_pki.token("not-a-token"), Credentials(tls_ca=test_pki.ca_path)):
            channel, api = stub(running, held)
            metadata = credentials.authorization(held, running.target)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await api.Allocate(request("t-0", fraction_millis=500), metadata=metadata)  # type: ignore[attr-defined]
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await channel.close()
        assert await revision(running) == before
        async with client(running, test_pki.token("carol-token-1")) as carol:
            mine = await carol.allocate(request_id="t-1", fraction=0.25)
            assert mine.request.owner == "carol"
            tokens = running.coordinator.settings.tokens
            assert tokens is not None
            write_tokens(tokens, {"dave-token-1": ("dave", "user")})  # carol's is revoked
            with pytest.raises(UnauthenticatedError):
                await carol.get(mine.id)
        async with client(running, test_pki.token("dave-token-1")) as dave:
            with pytest.raises(PermissionDeniedError):
                await dave.release(mine.id)
        tokens.write_text("not a token line\n")  # a broken file accepts nothing
        async with client(running, test_pki.token("dave-token-1")) as dave:
            with pytest.raises(UnauthenticatedError):
                await dave.list()
        assert "carol-token-1" not in tokens.read_text()


def served_serial(target: str, ca: Path, held: Credentials) -> int:
    """The serial number of the certificate a new TLS connection to `target` is shown."""
    context = ssl.create_default_context(cafile=str(ca))
    assert held.tls_cert is not None
    assert held.tls_key is not None
    context.load_cert_chain(str(held.tls_cert), str(held.tls_key))
    context.set_alpn_protocols(["h2"])
    host, _, port = target.rpartition(":")
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as wrapped,
    ):
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_the_server_certificate_rotates_under_a_live_client(
    etcd: LocalEtcd, prefix: str, inventory: Path, test_pki: Pki
) -> None:
    alice = test_pki.holder(Role.USER, "alice")
    async with secured(etcd, prefix, inventory, test_pki) as running:
        ca = test_pki.ca_path
        first = await asyncio.to_thread(served_serial, running.target, ca, alice)
        async with client(running, alice) as live:
            held = await live.allocate(request_id="rot-1", fraction=0.25)
            renewed = pki.issue(test_pki.ca, Identity(Role.COORDINATOR, "coordinator"))
            pki.write_pair(test_pki.directory, "coordinator", renewed)
            second = await asyncio.to_thread(served_serial, running.target, ca, alice)
            assert second != first
            assert second == x509.load_pem_x509_certificate(renewed.certificate_pem).serial_number
            assert (await live.get(held.id)).id == held.id  # the live client goes on
            # A half-written rotation (a key that is not the certificate's) is not loaded.
            other_key = pki.issue(test_pki.ca, Identity(Role.COORDINATOR, "x")).key_pem
            (test_pki.directory / "coordinator.key").write_bytes(other_key)
            with structlog.testing.capture_logs() as logs:
                third = await asyncio.to_thread(served_serial, running.target, ca, alice)
            assert third == second
            assert any("not loaded" in entry["event"] for entry in logs)
        async with client(running, alice) as fresh:
            assert (await fresh.release(held.id)) is not None


async def test_plaintext_beyond_loopback_is_refused_before_anything_binds(
    etcd: LocalEtcd, prefix: str
) -> None:
    coordinator = Coordinator(
        CoordinatorSettings(listen="0.0.0.0:0", etcd_endpoints=(etcd.endpoint,), prefix=prefix)
    )
    with pytest.raises(FailedPreconditionError, match="--tls-cert") as refused:
        await coordinator.start()
    assert "--insecure" in str(refused.value)
    assert coordinator.port == 0
    await coordinator.server.stop(0)
    await coordinator.store.close()


async def test_the_cli_says_permission_denied_when_releasing_anothers_allocation(
    etcd: LocalEtcd, prefix: str, inventory: Path, test_pki: Pki
) -> None:
    alice, bob = test_pki.holder(Role.USER, "alice"), test_pki.holder(Role.USER, "bob")
    async with (
        secured(etcd, prefix, inventory, test_pki) as running,
        client(running, alice) as as_alice,
    ):
        mine = await as_alice.allocate(request_id="cli-1", fraction=0.25)
        process = await asyncio.create_subprocess_exec(
            *KAIWO_GPU,
            "release",
            mine.id,
            "--coordinator",
            running.target,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **bob.environment()},
        )
        _, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 1, err
        assert b"PERMISSION_DENIED" in err
        assert b"Traceback" not in err
        assert mine.id in (await audit_etcd(running.endpoint, running.prefix)).allocations


async def test_the_slurm_scripts_speak_tls_as_the_slurm_scheduler(
    etcd: LocalEtcd, prefix: str, inventory: Path, test_pki: Pki, tmp_path: Path
) -> None:
    """slurm.env names the `slurm` scheduler's certificate: the TaskProlog (as the job's
    user) allocates for owner slurm/JOBID over mutual TLS and the Epilog releases it."""
    slurm = test_pki.holder(Role.SCHEDULER, "slurm")
    async with secured(etcd, prefix, inventory, test_pki) as running:
        site = site_file(tmp_path, running.target, **slurm.environment())
        node = next(iter((await audit_etcd(running.endpoint, running.prefix)).nodes))
        # The job names a coordinator of its own, which the TaskProlog ignores.
        job = task_environment(
            site, "77", node, KAIWO_GPU_COORDINATOR="127.0.0.1:1", KAIWO_GPU_FRACTION="0.5"
        )
        start = await task_prolog(job)
        assert start.status == 0, start.printed
        (held,) = (await audit_etcd(running.endpoint, running.prefix)).allocations.values()
        assert held.request.owner == "slurm/77"
        ended = await epilog(epilog_environment(site, "77", node))
        assert (ended.status, ended.output) == (0, "")
        assert not (await audit_etcd(running.endpoint, running.prefix)).allocations


@pytest.mark.parametrize("ca_text", ["", "garbage\n", "leaf"])
def test_a_client_ca_that_cannot_check_certificates_stops_the_coordinator_with_its_flag(
    test_pki: Pki, ca_text: str
) -> None:
    """gRPC takes an empty CA file and refuses every client, and a garbage one fails as
    a bind error: both must name --tls-ca instead."""
    bad = test_pki.directory / "bad-ca.crt"
    leaf = (test_pki.directory / "coordinator.crt").read_text()
    bad.write_text(leaf if ca_text == "leaf" else ca_text)
    files = Credentials(
        tls_ca=bad,
        tls_cert=test_pki.directory / "coordinator.crt",
        tls_key=test_pki.directory / "coordinator.key",
    )
    with pytest.raises(FailedPreconditionError) as refused:
        ServingCertificates(files)
    assert f"--tls-ca {str(bad)!r}" in refused.value.message


async def test_a_watch_ends_when_its_token_is_revoked(
    etcd: LocalEtcd, prefix: str, inventory: Path, test_pki: Pki
) -> None:
    async with secured(etcd, prefix, inventory, test_pki, client_ca=False) as running:
        tokens = running.coordinator.settings.tokens
        assert tokens is not None
        write_tokens(tokens, {**TOKENS, "root-token-1": ("root", "admin")})
        carol_holds = test_pki.token("carol-token-1")
        async with client(running, carol_holds) as carol:
            mine = await carol.allocate(request_id="w-1", fraction=0.25)
        channel, api = stub(running, carol_holds)
        watch = api.WatchAllocations(  # type: ignore[attr-defined]
            allocation_pb2.WatchAllocationsRequest(),
            metadata=credentials.authorization(carol_holds, running.target),
        )
        first = await asyncio.wait_for(watch.read(), 10)
        assert first.allocation.id == mine.id
        write_tokens(tokens, {"root-token-1": ("root", "admin")})  # carol's is revoked
        async with client(running, test_pki.token("root-token-1")) as root:
            await root.release(mine.id)  # a change carol's watch would have been sent
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(watch.read(), 10)
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await channel.close()
