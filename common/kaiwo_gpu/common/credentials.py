"""Where a process finds its TLS files and bearer token, and which addresses may go without.

One set of names for every process: `--tls-ca`, `--tls-cert`, `--tls-key`, `--token-file`
and their KAIWO_GPU_* variables. A server serves with its certificate and key and, given a
CA, requires client certificates from it; a client trusts the CA (the system's roots
without one) and presents its certificate when it has one. The files are read when used,
so what reads them decides when to read them again (a server: on every change).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kaiwo_gpu.common.errors import FailedPreconditionError

VARIABLES = {
    "tls_ca": "KAIWO_GPU_TLS_CA",
    "tls_cert": "KAIWO_GPU_TLS_CERT",
    "tls_key": "KAIWO_GPU_TLS_KEY",
    "token_file": "KAIWO_GPU_TOKEN_FILE",
}
"""Field -> the environment variable that supplies it (also what `run` hands on)."""
BEARER = "bearer "
AUTHORIZATION = "authorization"
"""The metadata key a bearer token travels in (`authorization: Bearer TOKEN`)."""
MAX_TOKEN_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Credentials:
    """Paths only: the files are read by whoever opens a channel or serves."""

    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise FailedPreconditionError(
                "--tls-cert and --tls-key go together: a certificate and its private key"
            )

    @property
    def tls(self) -> bool:
        """Whether this end speaks TLS (a client with only a CA does: it checks the server)."""
        return any((self.tls_ca, self.tls_cert, self.tls_key))

    @property
    def identifies(self) -> bool:
        """Whether these credentials name who holds them (a certificate or a token), so the
        coordinator, not the client, knows the caller's name."""
        return self.tls_cert is not None or self.token_file is not None

    def environment(self) -> dict[str, str]:
        """The KAIWO_GPU_* variables that hand these credentials on to a child process, as
        absolute paths (the child may start elsewhere)."""
        return {
            VARIABLES[name]: str(path.absolute())
            for name in VARIABLES
            if (path := getattr(self, name)) is not None
        }


def from_environment(environment: Mapping[str, str]) -> Credentials:
    """Credentials from the KAIWO_GPU_* variables (empty ones are not set)."""
    paths = {
        name: Path(value)
        for name, variable in VARIABLES.items()
        if (value := environment.get(variable, "").strip())
    }
    return Credentials(**paths)


def read(path: Path | None, what: str) -> bytes | None:
    """A credential file's bytes, or an error that names the flag and the path."""
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as error:
        raise FailedPreconditionError(
            f"cannot read {what} {str(path)!r}: {error.strerror or error}"
        ) from None


def read_token(path: Path | None) -> str | None:
    """The bearer token a token file holds (its first line, whitespace trimmed)."""
    data = read(path, "--token-file")
    if data is None:
        return None
    token = data.decode("utf-8", "replace").strip().splitlines()[0:1]
    if not token or not token[0].strip() or len(data) > MAX_TOKEN_BYTES:
        raise FailedPreconditionError(
            f"--token-file {str(path)!r} holds no token (one line, at most {MAX_TOKEN_BYTES} bytes)"
        )
    text = token[0].strip()
    if not text.isascii() or not text.isprintable() or " " in text:
        raise FailedPreconditionError(
            f"--token-file {str(path)!r}: a token is printable ASCII without spaces"
        )
    return text


def token_digest(token: str) -> str:
    """What a coordinator's token file holds for `token`: `printf %s TOKEN | sha256sum`."""
    return hashlib.sha256(token.encode()).hexdigest()


def _host_of(address: str) -> str:
    if address.startswith("[") and "]" in address:
        return address[1 : address.index("]")]
    host, sep, _ = address.rpartition(":")
    return host if sep else address


def is_loopback(address: str) -> bool:
    """Whether plaintext to or from `address` stays on this machine: a `unix:` socket,
    `localhost`, or an address in 127.0.0.0/8 or ::1. A gRPC target (`ipv4:a,b`,
    `dns:///name:port`) is loopback only when every address in it is."""
    text = address.strip()
    if text.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("ipv4:", "ipv6:", "dns:///", "dns:"):
        if text.startswith(scheme):
            parts = text.removeprefix(scheme).split(",")
            return all(is_loopback(part) for part in parts if part)
    host = _host_of(text)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_name_options(target: str) -> tuple[tuple[str, str], ...]:
    """The name TLS checks servers against on a channel over several addresses.

    gRPC checks one name per channel, and for an `ipv4:a:p,b:q` target that is the whole
    target, which no certificate holds, so no handshake succeeds. The first address is
    checked instead: each server of the list must hold it in its certificate (a certificate
    shared by the servers, with all their addresses, does); or name them with one DNS name.
    """
    if not target.startswith("ipv4:") or "," not in target:
        return ()
    first = target.removeprefix("ipv4:").split(",", 1)[0]
    return (("grpc.ssl_target_name_override", _host_of(first)),)


FileStamp = tuple[tuple[int, int, int] | None, ...]


def stamp(*paths: Path | None) -> FileStamp:
    """What changes when any of `paths` is rewritten or replaced (inode, size, mtime), so
    a reader re-reads them only then; None for a file that cannot be read now."""
    stamps: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            status = os.stat(path) if path is not None else None
        except OSError:
            status = None
        stamps.append(
            (status.st_ino, status.st_size, status.st_mtime_ns) if status is not None else None
        )
    return tuple(stamps)


def authorization(held: Credentials, target: str) -> tuple[tuple[str, str], ...]:
    """The metadata that carries the bearer token of `held` to `target` (none without a
    token file); a token never crosses a network in plaintext."""
    token = read_token(held.token_file)
    if token is None:
        return ()
    if not held.tls and not is_loopback(target):
        raise FailedPreconditionError(
            f"a bearer token would travel in plaintext to {target}: give --tls-ca (or "
            f"${VARIABLES['tls_ca']}) to speak TLS to the coordinator"
        )
    return ((AUTHORIZATION, f"Bearer {token}"),)
