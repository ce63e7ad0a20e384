"""etcd over TLS with client certificates, and etcd's user/password authentication.

A real etcd on loopback, serving TLS (with --client-cert-auth, or with auth enabled and
simple tokens that lapse after a second idle), and a coordinator in this process; the
coordinator's own gRPC port stays plaintext loopback. The flag rules run through the CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kaiwo_gpu.cli.main import main
from kaiwo_gpu.common import pki
from kaiwo_gpu.common.errors import (
    FailedPreconditionError,
    UnauthenticatedError,
    UnavailableError,
)
from kaiwo_gpu.common.identity import Identity, Role
from kaiwo_gpu.coordinator.local.etcd import EtcdServingTls, LocalEtcd
from kaiwo_gpu.coordinator.server import Coordinator
from kaiwo_gpu.coordinator.settings import CoordinatorSettings
from kaiwo_gpu.coordinator.state.changes import Put, Txn
from kaiwo_gpu.coordinator.state.etcd_security import EtcdSecurity
from kaiwo_gpu.coordinator.state.keys import KeyLayout
from kaiwo_gpu.coordinator.state.store import EtcdStore
from tests.conftest import coordinator_running
from tests.harness import request

PASSWORD = "Etcd-Root-Pass-8c1f"
WRONG_PASSWORD = "Not-The-Pass-93d2"
TOKEN_TTL_S = 1


@dataclass(frozen=True)
class Certificates:
    ca: Path
    member: tuple[Path, Path]
    """etcd's own certificate and key (serverAuth, and clientAuth for the probe)."""
    client: tuple[Path, Path]
    """The coordinator's client certificate, from the same CA."""
    stranger: tuple[Path, Path]
    """A client certificate from another CA."""


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("etcd-pki")
    ca = pki.new_ca("etcd test CA")
    (directory / "ca.crt").write_bytes(ca.certificate_pem)
    member = pki.issue(ca, Identity(Role.COORDINATOR, "etcd"), sans=("127.0.0.1", "localhost"))
    client = pki.issue(ca, Identity(Role.COORDINATOR, "kaiwo"))
    stranger = pki.issue(pki.new_ca("another CA"), Identity(Role.COORDINATOR, "kaiwo"))
    return Certificates(
        directory / "ca.crt",
        pki.write_pair(directory, "etcd", member),
        pki.write_pair(directory, "client", client),
        pki.write_pair(directory, "stranger", stranger),
    )


@pytest.fixture(scope="module")
def mtls_etcd(
    certificates: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalEtcd]:
    """etcd serving TLS and requiring a client certificate from the test CA."""
    cert, key = certificates.member
    server = LocalEtcd(
        tmp_path_factory.mktemp("mtls-etcd") / "data",
        tls=EtcdServingTls(cert, key, certificates.ca, client_cert_auth=True),
    )
    server.start()
    yield server
    server.stop(kill=True)


def _gateway(etcd: LocalEtcd, context: ssl.SSLContext, path: str, body: object) -> None:
    """One call of etcd's v3 JSON gateway (what etcdctl would do, without etcdctl)."""
    call = urllib.request.Request(
        f"{etcd.url}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(call, context=context, timeout=5) as reply:
        assert reply.status == 200, reply.read()


@pytest.fixture(scope="module")
def auth_etcd(
    certificates: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalEtcd]:
    """etcd serving TLS with auth on: user root (role root) with PASSWORD, simple tokens
    that lapse after TOKEN_TTL_S idle."""
    cert, key = certificates.member
    server = LocalEtcd(
        tmp_path_factory.mktemp("auth-etcd") / "data",
        tls=EtcdServingTls(cert, key, certificates.ca, client_cert_auth=False),
        auth_token_ttl_s=TOKEN_TTL_S,
    )
    server.start()
    context = ssl.create_default_context(cafile=str(certificates.ca))
    try:
        _gateway(server, context, "/v3/auth/user/add", {"name": "root", "password": PASSWORD})
        _gateway(server, context, "/v3/auth/role/add", {"name": "root"})
        _gateway(server, context, "/v3/auth/user/grant", {"user": "root", "role": "root"})
        _gateway(server, context, "/v3/auth/enable", {})
        yield server
    finally:
        server.stop(kill=True)


def _settings(
    endpoint: str, prefix: str, security: EtcdSecurity, inventory: Path | None = None
) -> CoordinatorSettings:
    """Waits for etcd at most a second: a refused handshake looks like an etcd not up yet."""
    return CoordinatorSettings(
        listen="127.0.0.1:0",
        etcd_endpoints=(endpoint,),
        prefix=prefix,
        inventory=inventory,
        etcd_security=security,
        etcd_timeout_s=1.0,
        startup_wait_s=1.0,
    )


async def _keys(endpoint: str, prefix: str, security: EtcdSecurity) -> dict[bytes, bytes]:
    store = EtcdStore([endpoint], security=security)
    try:
        return {kv.key: kv.value for kv in (await store.read_prefix(prefix.encode()))[1]}
    finally:
        await store.close()


@pytest.mark.integration
async def test_a_coordinator_allocates_through_etcd_with_tls_and_client_certificates(
    mtls_etcd: LocalEtcd, certificates: Certificates, prefix: str, inventory: Path
) -> None:
    assert mtls_etcd.endpoint.startswith("https://127.0.0.1:")
    cert, key = certificates.client
    security = EtcdSecurity(ca=certificates.ca, cert=cert, key=key)
    async with coordinator_running(
        mtls_etcd.endpoint, prefix, inventory, etcd_security=security
    ) as running:
        reply = await running.api.Allocate(request("tls-1", fraction_millis=500, ttl_seconds=60))
        assert reply.allocation.lease_id != 0
    stored = await _keys(mtls_etcd.endpoint, prefix, security)
    assert KeyLayout(prefix).allocation(reply.allocation.id) in stored


@pytest.mark.integration
@pytest.mark.parametrize("client", ["no certificate", "another CA's certificate"])
async def test_etcd_refuses_a_coordinator_without_a_certificate_from_its_ca(
    mtls_etcd: LocalEtcd, certificates: Certificates, prefix: str, inventory: Path, client: str
) -> None:
    cert, key = certificates.stranger if client == "another CA's certificate" else (None, None)
    security = EtcdSecurity(certificates.ca, cert, key)
    coordinator = Coordinator(_settings(mtls_etcd.endpoint, prefix, security, inventory))
    started = time.monotonic()
    try:
        with pytest.raises(
            UnavailableError, match=r"etcd at 127\.0\.0\.1:\d+ is unavailable"
        ) as down:
            await coordinator.start()
    finally:
        await coordinator.stop()
    assert time.monotonic() - started < 15
    assert "--etcd-cert" in down.value.message  # says what to check
    cert, key = certificates.client
    trusted = EtcdSecurity(ca=certificates.ca, cert=cert, key=key)
    assert await _keys(mtls_etcd.endpoint, prefix, trusted) == {}  # not even the inventory


@pytest.mark.integration
async def test_the_right_password_works_and_a_lapsed_token_is_renewed(
    auth_etcd: LocalEtcd,
    certificates: Certificates,
    prefix: str,
    inventory: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    security = EtcdSecurity(ca=certificates.ca, user="root", password=PASSWORD)
    assert PASSWORD not in repr(security)
    async with coordinator_running(
        auth_etcd.endpoint, prefix, inventory, etcd_security=security
    ) as running:
        store = running.coordinator.store
        await running.api.Allocate(request("auth-1", fraction_millis=250, ttl_seconds=60))
        first_token = store._token
        await asyncio.sleep(TOKEN_TTL_S + 1.5)  # the token lapses in etcd, idle
        reply = await running.api.Allocate(request("auth-2", fraction_millis=250, ttl_seconds=60))
        assert store._token != first_token  # etcd refused the old one; the store got another
    stored = await _keys(auth_etcd.endpoint, prefix, security)
    assert KeyLayout(prefix).allocation(reply.allocation.id) in stored
    output = capfd.readouterr()
    assert PASSWORD not in output.out + output.err


@pytest.mark.integration
async def test_every_kind_of_call_survives_a_token_etcd_no_longer_takes(
    auth_etcd: LocalEtcd, certificates: Certificates, prefix: str
) -> None:
    """Unary calls, the lease keep-alive stream and the watch stream each meet a token
    etcd does not know, authenticate again once and go on."""
    store = EtcdStore(
        [auth_etcd.endpoint],
        security=EtcdSecurity(ca=certificates.ca, user="root", password=PASSWORD),
    )
    stale = (("token", "no-such-token.1"),)
    key = f"{prefix}probe".encode()
    try:
        await store.connect()
        store._token = stale
        lease_id, _ = await store.grant_lease(30)
        store._token = stale
        result = await store.commit(Txn(puts=(Put(key, b"v", lease_id),)))
        assert result.succeeded
        store._token = stale
        assert await store.refresh_lease(lease_id) > 0
        store._token = stale
        watch = store.watch(prefix.encode(), result.revision)
        try:
            revision, changes = await asyncio.wait_for(anext(watch), 5)
            if not changes:  # the response that confirms the watch
                revision, changes = await asyncio.wait_for(anext(watch), 5)
        finally:
            await watch.aclose()  # type: ignore[attr-defined]
        assert [change.key for change in changes] == [key]
        assert revision == result.revision
        assert store._token != stale
    finally:
        await store.close()


@pytest.mark.integration
async def test_a_wrong_password_is_a_clear_error_that_never_shows_the_password(
    auth_etcd: LocalEtcd, certificates: Certificates, prefix: str, tmp_path: Path
) -> None:
    security = EtcdSecurity(ca=certificates.ca, user="root", password=WRONG_PASSWORD)
    coordinator = Coordinator(_settings(auth_etcd.endpoint, prefix, security))
    try:
        with pytest.raises(UnauthenticatedError, match="--etcd-user 'root'") as refused:
            await coordinator.start()
    finally:
        await coordinator.stop()
    assert WRONG_PASSWORD not in str(refused.value)
    anonymous = Coordinator(_settings(auth_etcd.endpoint, prefix, EtcdSecurity(certificates.ca)))
    try:
        with pytest.raises(UnauthenticatedError, match="--etcd-user"):
            await anonymous.start()
    finally:
        await anonymous.stop()

    password_file = tmp_path / "etcd-password"
    password_file.write_text(WRONG_PASSWORD + "\n")
    for password_flags, environment in (
        ([f"--etcd-password-file={password_file}"], {}),
        ([], {"KAIWO_GPU_ETCD_PASSWORD": WRONG_PASSWORD}),
    ):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "kaiwo_gpu.cli.main",
                "coordinator",
                f"--etcd={auth_etcd.endpoint}",
                f"--etcd-ca={certificates.ca}",
                "--etcd-user=root",
                *password_flags,
                "--listen=127.0.0.1:0",
                "--etcd-wait=2",
                f"--prefix={prefix}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **environment},
            check=False,
        )
        assert done.returncode == 1, done.stderr
        assert "--etcd-user 'root'" in done.stderr
        assert "Traceback" not in done.stderr
        assert WRONG_PASSWORD not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--etcd-cert", "x"], "--etcd-key"),
        (["--etcd-key", "x"], "--etcd-cert"),
        (["--etcd-cert", "x", "--etcd-key", "y"], "--etcd-ca"),
        (["--etcd-user", "root"], "--etcd-password-file"),
        (["--etcd-user", "root", "--etcd-password-file", "/nonexistent/pw"], "/nonexistent/pw"),
        (["--etcd", "https://127.0.0.1:2379"], "--etcd-ca"),
        (["--etcd", "http://127.0.0.1:2379", "--etcd-ca", "ca.crt"], "http://"),
    ],
)
def test_etcd_flags_that_do_not_go_together_are_usage_errors(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["coordinator", *argv])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert named in error
    assert len(error.splitlines()) == 1, error


def test_etcd_flags_fall_back_to_their_variables(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KAIWO_GPU_ETCD_CERT", "client.crt")
    with pytest.raises(SystemExit) as exited:
        main(["coordinator"])
    assert exited.value.code == 2
    assert "--etcd-key" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("endpoints", "refused"),
    [
        (["10.0.0.5:2379"], True),
        (["http://etcd.example:2379"], True),
        (["127.0.0.1:2379", "10.0.0.6:2379"], True),
        (["127.0.0.1:2379"], False),
        (["localhost:2379"], False),
    ],
)
def test_an_etcd_password_never_goes_beyond_loopback_in_plaintext(
    endpoints: list[str], refused: bool
) -> None:
    security = EtcdSecurity(user="kaiwo", password="s3cret-pw")
    if not refused:
        assert EtcdStore(endpoints, security=security).target
        return
    with pytest.raises(FailedPreconditionError) as error:
        EtcdStore(endpoints, security=security)
    assert "--etcd-ca" in error.value.message
    assert "s3cret-pw" not in error.value.message
