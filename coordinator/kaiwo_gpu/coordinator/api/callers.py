"""Who a call comes from: the identity its client certificate or bearer token names.

With neither client certificates (a CA to check them) nor a token file, authorization is
off and every caller is `ANONYMOUS`. Otherwise a call carries a bearer token (looked up in
the token file; a token that is not there is refused even when a certificate came too) or
a certificate from the CA: its `kaiwo-gpu://ROLE/NAME` URI SAN, or, from a CA that does not
write one, the user its CN names. Anything else is UNAUTHENTICATED. Tokens are never logged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from kaiwo_gpu.common import credentials
from kaiwo_gpu.common.errors import InvalidArgumentError, KaiwoGpuError, UnauthenticatedError
from kaiwo_gpu.common.identity import ANONYMOUS, Identity, Role, from_uri, identity
from kaiwo_gpu.coordinator.api.tokens import TokenFile

log = structlog.get_logger(__name__)

REFUSALS = frozenset({"PERMISSION_DENIED", "UNAUTHENTICATED"})


def refused(rpc: str, caller: Identity | None, error: KaiwoGpuError, peer: str) -> None:
    """The log line of every refusal: who, what, why (a token never appears in any)."""
    if error.status_code in REFUSALS:
        log.warning(
            "refused",
            method=rpc,
            identity=str(caller) if caller else None,
            peer=peer,
            status=error.status_code,
            reason=error.message,
        )


def _strings(auth: Mapping[str, Sequence[bytes]], key: str) -> list[str]:
    return [value.decode("utf-8", "replace") for value in auth.get(key, ())]


def certificate_identity(auth: Mapping[str, Sequence[bytes]]) -> Identity | None:
    """The identity a verified peer certificate names (gRPC's auth context of the call),
    None without a certificate."""
    if not auth.get("x509_pem_cert"):
        return None
    try:
        named = [found for uri in _strings(auth, "peer_uri") if (found := from_uri(uri))]
        if len(named) > 1:
            raise UnauthenticatedError("the client certificate names more than one identity")
        if named:
            return named[0]
        common_names = _strings(auth, "x509_common_name")
        if len(common_names) == 1:
            return identity(Role.USER.value, common_names[0], "certificate CN")
    except InvalidArgumentError as error:
        raise UnauthenticatedError(f"the client certificate: {error.message}") from None
    raise UnauthenticatedError(
        "the client certificate names no identity: it needs a URI SAN kaiwo-gpu://ROLE/NAME "
        "or a CN that is a name"
    )


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == credentials.AUTHORIZATION and isinstance(value, str):
            if not value.lower().startswith(credentials.BEARER):
                raise UnauthenticatedError("the authorization header is not 'Bearer TOKEN'")
            return value[len(credentials.BEARER) :].strip()
    return None


class Callers:
    """Identifies the caller of each call, by the coordinator's settings."""

    def __init__(self, tokens: TokenFile | None, client_certificates: bool) -> None:
        self.tokens = tokens
        self.client_certificates = client_certificates

    @property
    def enabled(self) -> bool:
        return self.tokens is not None or self.client_certificates

    def identify(self, context: Any) -> Identity:
        """The caller of the call `context` belongs to, or UNAUTHENTICATED."""
        if not self.enabled:
            return ANONYMOUS
        token = bearer_token(context.invocation_metadata())
        if token is not None:
            found = self.tokens.identity_of(token) if self.tokens is not None else None
            if found is None:
                raise UnauthenticatedError("the bearer token is not one this coordinator accepts")
            return found
        found = certificate_identity(context.auth_context()) if self.client_certificates else None
        if found is None:
            raise UnauthenticatedError(
                "this coordinator needs a bearer token"
                + (" or a client certificate" if self.client_certificates else "")
            )
        return found
