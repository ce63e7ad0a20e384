"""`kaiwo-gpu certs` as an operator runs it: files, modes, and what it refuses to replace."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from cryptography import x509

from kaiwo_gpu.cli.main import main


def certs(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        code = main(["certs", *argv])
    except SystemExit as leaving:
        code = int(leaving.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_issue_never_replaces_the_ca_or_a_name_in_use_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tls = str(tmp_path)
    assert certs(capsys, "init", "--dir", tls)[0] == 0
    ca_key = digest(tmp_path / "ca.key")
    code, said = certs(capsys, "issue", "--dir", tls, "--role", "user", "ca")
    assert code == 1
    assert "exists" in said
    assert digest(tmp_path / "ca.key") == ca_key, "the CA's key survives"
    assert certs(capsys, "issue", "--dir", tls, "--role", "coordinator", "coordinator")[0] == 0
    served = digest(tmp_path / "coordinator.crt")
    code, said = certs(capsys, "issue", "--dir", tls, "--role", "user", "coordinator")
    assert code == 1
    assert "--force" in said
    assert digest(tmp_path / "coordinator.crt") == served
    assert certs(capsys, "issue", "--dir", tls, "--force", "--role", "user", "coordinator")[0] == 0
    reissued = x509.load_pem_x509_certificate((tmp_path / "coordinator.crt").read_bytes())
    uris = reissued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [
        "kaiwo-gpu://user/coordinator"
    ]


def test_keys_and_tokens_are_written_0600_and_never_through_a_planted_symlink(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tls, victim = tmp_path / "tls", tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    assert certs(capsys, "init", "--dir", str(tls))[0] == 0
    (tls / "eve.key").symlink_to(victim)
    code, _ = certs(capsys, "issue", "--dir", str(tls), "--role", "user", "eve")
    assert code == 1  # a name that is there, even as a link, is refused
    assert certs(capsys, "issue", "--dir", str(tls), "--force", "--role", "user", "eve")[0] == 0
    assert victim.read_text() == "precious\n"
    assert mode(victim) == 0o644
    assert not (tls / "eve.key").is_symlink()
    assert mode(tls / "eve.key") == 0o600
    old = tls / "bob.token"
    old.write_text("old\n")
    old.chmod(0o644)
    assert certs(capsys, "token", "--dir", str(tls), "--force", "bob")[0] == 0
    assert mode(old) == 0o600
    assert old.read_text().strip() != "old"
    assert [p.name for p in tls.iterdir() if p.name.startswith(".")] == []
