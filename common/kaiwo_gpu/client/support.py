"""What the clients and the CLI share that needs no connection: settings, the coordinator's
address, the request a call or a held allocation asks for, and the workload's environment.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kaiwo_gpu.client.retries import RetryPolicy
from kaiwo_gpu.common import credentials
from kaiwo_gpu.common.credentials import Credentials
from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.common.grant_variables import GRANT_VARIABLES
from kaiwo_gpu.common.models import AllocationRequest
from kaiwo_gpu.common.request_builder import build_request
from kaiwo_gpu.v1 import types_pb2

DEFAULT_COORDINATOR = "127.0.0.1:50051"
COORDINATOR_VARIABLE = "KAIWO_GPU_COORDINATOR"
# A held allocation (context manager, `run`) always has a lease, so a holder that dies
# without releasing frees its share within this long.
DEFAULT_HELD_TTL_S = 120


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Where the coordinator is, how to prove who calls it, and how long one call may take,
    retries included."""

    target: str = DEFAULT_COORDINATOR
    timeout_s: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    credentials: Credentials = field(default_factory=Credentials)


_IPV4_ADDRESS = re.compile(r"^(\d{1,3}\.){3}\d{1,3}:\d{1,5}$")
_HOST_PORT = re.compile(r"^[A-Za-z0-9.\-]+:\d{1,5}$|^\[[0-9A-Fa-f:.]+\]:\d{1,5}$")
_GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:")


def coordinator_target(text: str, field: str = "coordinator") -> str:
    """A gRPC target from `host:port`, a gRPC URI, or a comma list (as agents take it).

    Several IPv4 addresses become one `ipv4:` target, which the clients dial one address at a
    time (`dial_targets`); several names cannot (give one DNS name that resolves to every
    coordinator instead). A target this returned reads back as itself.
    """
    stripped = text.strip() if text else ""
    if stripped.startswith("ipv4:") and len(stripped) > len("ipv4:"):
        parts = stripped.removeprefix("ipv4:").split(",")
        if all(_IPV4_ADDRESS.match(part) for part in parts):
            return stripped
    parts = [part.strip() for part in stripped.split(",") if part.strip()]
    if len(parts) == 1 and (parts[0].startswith(_GRPC_SCHEMES) or _HOST_PORT.match(parts[0])):
        return parts[0]
    if len(parts) > 1 and all(_IPV4_ADDRESS.match(part) for part in parts):
        return "ipv4:" + ",".join(parts)
    raise InvalidArgumentError(
        field,
        text,
        "host:port, a gRPC target (dns:///name:port) or IPv4 host:port,host:port,...",
    )


def dial_targets(target: str) -> tuple[str, ...]:
    """The channel targets a client moves through: for an `ipv4:` list, the list rotated to
    start at each address in turn, else the target alone. Each channel holds every address,
    so gRPC itself passes over one that refuses or never answers its handshake (a frozen
    coordinator whose kernel still accepts); the rotation moves the client off one that it
    was connected to when it froze, which no channel notices by itself."""
    if target.startswith("ipv4:") and "," in target:
        addresses = target.removeprefix("ipv4:").split(",")
        return tuple(
            "ipv4:" + ",".join(addresses[start:] + addresses[:start])
            for start in range(len(addresses))
        )
    return (target,)


def client_settings(target: str | None, settings: ClientSettings | None) -> ClientSettings:
    """An explicit target wins, then the settings' target, then $KAIWO_GPU_COORDINATOR;
    each read by `coordinator_target`, as the CLI and the environment are (so
    `Client("h:p,h:p")` fails over instead of dialling a misformatted name). Without
    settings the credentials come from $KAIWO_GPU_TLS_* and $KAIWO_GPU_TOKEN_FILE, so a
    command started by `kaiwo-gpu run` proves the same identity."""
    if settings is None:
        held = credentials.from_environment(os.environ)
        if target:
            return ClientSettings(target=coordinator_target(target, "target"), credentials=held)
        return ClientSettings(target=target_from_environment(os.environ), credentials=held)
    chosen = target or settings.target
    return replace(settings, target=coordinator_target(chosen, "target"))


def target_from_environment(environment: Mapping[str, str]) -> str:
    """$KAIWO_GPU_COORDINATOR when set and not empty, else the local default."""
    value = environment.get(COORDINATOR_VARIABLE, "").strip()
    return coordinator_target(value, f"${COORDINATOR_VARIABLE}") if value else DEFAULT_COORDINATOR


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def as_request(request: AllocationRequest | None, fields: Mapping[str, Any]) -> AllocationRequest:
    """The caller's request, or one built from keyword fields (`fraction=0.5, ttl="10m"`)."""
    if request is not None:
        if fields:
            raise TypeError("pass either an AllocationRequest or keyword fields, not both")
        return request
    options = dict(fields)
    return build_request(options.pop("request_id", None) or new_request_id(), **options)


def workload_environment(
    inherited: Mapping[str, str], allocation: types_pb2.Allocation
) -> dict[str, str]:
    """The environment to start work under a grant: the inherited one without any grant
    variable (a mask or device list from another allocation must not leak in), plus this
    grant's own."""
    kept = {k: v for k, v in inherited.items() if k not in GRANT_VARIABLES}
    return {**kept, **allocation.environment}


def with_lease(request: AllocationRequest, default_ttl_s: int) -> AllocationRequest:
    """A held allocation needs a lease; keep the caller's TTL when it gave one."""
    if request.ttl_seconds is not None:
        return request
    return replace(request, ttl_seconds=default_ttl_s)


def held_request(
    request: AllocationRequest | None, fields: Mapping[str, Any], default_ttl_s: int
) -> AllocationRequest:
    """What `allocation(...)` asks for: a held allocation always has a lease."""
    return with_lease(as_request(request, fields), default_ttl_s)


def quietly(action: Callable[..., object], *args: Any, **kwargs: Any) -> None:
    """Runs a log call or callback from a background thread or task; its failure (a closed
    stderr, a buggy callback) must not end the renewal or hide the loss."""
    try:
        action(*args, **kwargs)
    except Exception:  # nothing better to do with it from the background
        return
