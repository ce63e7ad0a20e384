"""How the coordinator proves itself to etcd (TLS files, an etcd user) and which endpoints
go with it: one home for the rules that the flags and the store both apply.

Paths and words only: the store reads the files when it builds its channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kaiwo_gpu.common.errors import FailedPreconditionError, InvalidArgumentError

PASSWORD_SOURCES = "--etcd-password-file or $KAIWO_GPU_ETCD_PASSWORD"
"""Where the password of --etcd-user comes from (never a flag value: `ps` shows those)."""
PLAINTEXT = "http://"
TLS = "https://"


@dataclass(frozen=True, slots=True)
class EtcdSecurity:
    """TLS to etcd when `ca` is set (with a client certificate when `cert` and `key` are),
    and etcd's user/password authentication when `user` is. The password never shows in
    a repr, so a logged settings object cannot leak it."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            given, missing = (
                ("--etcd-cert", "--etcd-key") if self.key is None else ("--etcd-key", "--etcd-cert")
            )
            raise FailedPreconditionError(
                f"{given} needs {missing}: a client certificate and its private key go together"
            )
        if self.cert is not None and self.ca is None:
            raise FailedPreconditionError(
                "--etcd-cert needs --etcd-ca: the CA that etcd's own certificate comes from"
            )
        if self.user is not None and not self.user:
            raise FailedPreconditionError("--etcd-user is empty")
        if self.user is None and self.password is not None:
            raise FailedPreconditionError(
                f"a password ({PASSWORD_SOURCES}) was given without --etcd-user"
            )
        if self.user is not None and not self.password:
            raise FailedPreconditionError(
                f"--etcd-user {self.user!r} needs its password: {PASSWORD_SOURCES}"
            )

    @property
    def tls(self) -> bool:
        return self.ca is not None


def check_endpoints(endpoints: Sequence[str], security: EtcdSecurity | None) -> bool:
    """Whether the endpoints are dialed over TLS: `https://` ones need --etcd-ca, `http://`
    ones refuse it, and a bare host:port follows it (as etcdctl's do)."""
    tls = security is not None and security.tls
    for endpoint in endpoints:
        if endpoint.startswith(TLS) and not tls:
            raise InvalidArgumentError(
                "etcd endpoint", endpoint, "https:// together with --etcd-ca (the CA of etcd)"
            )
        if endpoint.startswith(PLAINTEXT) and tls:
            raise InvalidArgumentError(
                "etcd endpoint",
                endpoint,
                "https://host:port or host:port with --etcd-ca (http:// is plaintext)",
            )
    return tls
