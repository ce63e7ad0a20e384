"""The pure rules of identity and access: who may do what, how identities and tokens read."""

from __future__ import annotations

from pathlib import Path

import pytest

from kaiwo_gpu.common import credentials
from kaiwo_gpu.common.credentials import Credentials
from kaiwo_gpu.common.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from kaiwo_gpu.common.identity import ANONYMOUS, Identity, Role, from_uri
from kaiwo_gpu.coordinator.api import permissions
from kaiwo_gpu.coordinator.api.callers import Callers, bearer_token, certificate_identity
from kaiwo_gpu.coordinator.api.tokens import TokenFile, parse_tokens

ALICE = Identity(Role.USER, "alice")
SLURM = Identity(Role.SCHEDULER, "slurm")
ROOT = Identity(Role.ADMIN, "root")
NODE = Identity(Role.AGENT, "gpu-1")


def test_a_user_allocates_as_itself_and_nobody_else() -> None:
    assert permissions.owner_for(ALICE, "") == "alice"
    assert permissions.owner_for(ALICE, "alice") == "alice"
    with pytest.raises(PermissionDeniedError, match="owner 'bob'"):
        permissions.owner_for(ALICE, "bob")
    with pytest.raises(PermissionDeniedError):
        permissions.owner_for(ALICE, "alice/x")


def test_a_scheduler_names_owners_under_its_prefix() -> None:
    assert permissions.owner_for(SLURM, "slurm/123") == "slurm/123"
    assert permissions.owner_for(SLURM, "") == "slurm"
    for owner in ("slurmx/1", "alice", "slur", "/slurm/1"):
        with pytest.raises(PermissionDeniedError, match="slurm/"):
            permissions.owner_for(SLURM, owner)
    assert permissions.owns(SLURM, "slurm/9")
    assert not permissions.owns(SLURM, "slurm-other/9")


def test_agents_and_coordinators_do_not_allocate_and_admins_name_anyone() -> None:
    for caller in (NODE, Identity(Role.COORDINATOR, "c1")):
        with pytest.raises(PermissionDeniedError, match="may not allocate"):
            permissions.owner_for(caller, "")
        assert not permissions.owns(caller, caller.name)
    assert permissions.owner_for(ROOT, "bob") == "bob"
    assert permissions.owner_for(ROOT, "") == "root"
    assert permissions.owner_for(ANONYMOUS, "") == ""  # authorization off: as before


def test_listing_another_owner_is_refused_and_an_agent_speaks_for_its_node_only() -> None:
    permissions.check_listing(ALICE, "")
    permissions.check_listing(ALICE, "alice")
    with pytest.raises(PermissionDeniedError):
        permissions.check_listing(ALICE, "bob")
    permissions.check_speaks_for(NODE, "gpu-1")
    permissions.check_speaks_for(ROOT, "gpu-2")
    with pytest.raises(PermissionDeniedError, match="'gpu-2'"):
        permissions.check_speaks_for(NODE, "gpu-2")
    with pytest.raises(PermissionDeniedError, match="not an agent"):
        permissions.check_speaks_for(ALICE, "gpu-1")
    with pytest.raises(PermissionDeniedError, match="admin"):
        permissions.check_admin(ALICE, "remove nodes")


def test_identity_uris_read_back_and_malformed_ones_are_errors() -> None:
    assert from_uri(ALICE.uri) == ALICE
    assert from_uri("spiffe://example.org/alice") is None
    for bad in (
        "kaiwo-gpu://wizard/alice",
        "kaiwo-gpu://user/",
        "kaiwo-gpu://user",
        "kaiwo-gpu://user/a b",
    ):
        with pytest.raises(InvalidArgumentError):
            from_uri(bad)


def test_certificates_name_one_identity_or_fall_back_to_their_cn() -> None:
    pem = {"x509_pem_cert": [b"-----BEGIN CERTIFICATE-----"]}
    assert certificate_identity({}) is None
    assert certificate_identity({**pem, "peer_uri": [ALICE.uri.encode()]}) == ALICE
    assert certificate_identity({**pem, "x509_common_name": [b"carol"]}) == Identity(
        Role.USER, "carol"
    )
    two = {**pem, "peer_uri": [ALICE.uri.encode(), ROOT.uri.encode()]}
    with pytest.raises(UnauthenticatedError, match="more than one"):
        certificate_identity(two)
    with pytest.raises(UnauthenticatedError):
        certificate_identity({**pem, "x509_common_name": [b"not a name!"]})


def test_token_files_parse_strictly() -> None:
    digest = credentials.token_digest("secret")
    assert parse_tokens(f"# comment\n\n{digest} ci scheduler  # the CI\n") == {
        digest: Identity(Role.SCHEDULER, "ci")
    }
    for bad in (
        f"{digest} ci",
        f"{digest[:-1]} ci user",
        f"{digest.upper()} ci user",
        f"{digest} ci wizard",
        f"{digest} ci user\n{digest} other user",
    ):
        with pytest.raises(InvalidArgumentError):
            parse_tokens(bad)


def test_a_token_file_that_breaks_accepts_no_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{credentials.token_digest('t1')} ci user\n")
    table = TokenFile(path)
    assert table.identity_of("t1") == Identity(Role.USER, "ci")
    assert table.identity_of("t2") is None
    path.write_text("garbage\n")
    assert table.identity_of("t1") is None
    path.write_text(f"{credentials.token_digest('t2')} ci2 admin\n")
    assert table.identity_of("t2") == Identity(Role.ADMIN, "ci2")


class _Context:
    def __init__(self, metadata: tuple[tuple[str, str], ...], auth: dict[str, list[bytes]]):
        self._metadata, self._auth = metadata, auth

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth


def test_callers_need_a_token_or_certificate_once_authorization_is_on(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{credentials.token_digest('t1')} ci scheduler\n")
    off = Callers(None, client_certificates=False)
    assert not off.enabled
    assert off.identify(_Context((), {})) == ANONYMOUS
    on = Callers(TokenFile(path), client_certificates=True)
    certificate = {"x509_pem_cert": [b"pem"], "peer_uri": [ALICE.uri.encode()]}
    assert on.identify(_Context((), certificate)) == ALICE
    bearer = _Context((("authorization", "Bearer t1"),), certificate)  # the token wins
    assert on.identify(bearer) == Identity(Role.SCHEDULER, "ci")
    for metadata in ((("authorization", "Bearer t2"),), (("authorization", "Basic x"),), ()):
        with pytest.raises(UnauthenticatedError):
            on.identify(_Context(metadata, {}))
    assert bearer_token(()) is None


def test_plaintext_is_loopback_only_and_tokens_never_travel_in_it(tmp_path: Path) -> None:
    for address in (
        "127.0.0.1:1",
        "127.9.9.9:1",
        "localhost:1",
        "[::1]:1",
        "unix:/tmp/s",
        "ipv4:127.0.0.1:1,127.0.0.2:1",
        "dns:///localhost:1",
    ):
        assert credentials.is_loopback(address), address
    for address in (
        "0.0.0.0:1",
        "10.0.0.1:1",
        "[::]:1",
        "example.com:1",
        "ipv4:127.0.0.1:1,10.0.0.1:1",
        "dns:///coord:1",
    ):
        assert not credentials.is_loopback(address), address
    token = tmp_path / "token"
    token.write_text("abc\n")
    assert credentials.authorization(Credentials(token_file=token), "127.0.0.1:1") == (
        ("authorization", "Bearer abc"),
    )
    with pytest.raises(FailedPreconditionError, match="plaintext"):
        credentials.authorization(Credentials(token_file=token), "10.0.0.1:1")
    assert credentials.authorization(Credentials(tls_ca=token, token_file=token), "10.0.0.1:1")
    with pytest.raises(FailedPreconditionError, match="go together"):
        Credentials(tls_cert=token)
    assert Credentials(tls_ca=Path("ca.crt")).environment() == {
        "KAIWO_GPU_TLS_CA": str(Path("ca.crt").absolute())
    }
    assert credentials.from_environment({"KAIWO_GPU_TOKEN_FILE": str(token)}).token_file == token


@pytest.mark.parametrize(
    ("target", "checked_name"),
    [
        ("ipv4:127.0.0.1:2379,127.0.0.2:2379", "127.0.0.1"),
        ("ipv4:10.0.0.5:50051,10.0.0.6:50051,10.0.0.7:50051", "10.0.0.5"),
        ("127.0.0.1:50051", None),  # one address: gRPC checks that one by itself
        ("ipv4:127.0.0.1:2379", None),
        ("dns:///coordinator.example:50051", None),  # the DNS name is what is checked
    ],
)
def test_tls_over_an_address_list_checks_the_first_address(
    target: str, checked_name: str | None
) -> None:
    """Without an override gRPC checks certificates against the whole `ipv4:a,b` target,
    which no certificate holds, and every TLS handshake to a list fails."""
    options = dict(credentials.tls_name_options(target))
    assert options.get("grpc.ssl_target_name_override") == checked_name
