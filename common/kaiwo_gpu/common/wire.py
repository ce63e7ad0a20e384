"""Conversions between the v1 protobuf messages and the request model.

Proto3 has no "unset" for scalars, so zero means "not given" where the API says so; every
value is validated by the model, and errors name the proto field.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import cast

from google.protobuf.timestamp_pb2 import Timestamp

from kaiwo_gpu.common import names
from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.common.models import (
    ISOLATION_ALIASES,
    AllocationRequest,
    Health,
    Isolation,
    Selector,
    parse_isolation,
)
from kaiwo_gpu.v1 import types_pb2

_ISOLATION_FROM_PROTO: dict[types_pb2.Isolation.ValueType, Isolation] = {
    types_pb2.ISOLATION_UNSPECIFIED: Isolation.NONE,
    types_pb2.ISOLATION_NONE: Isolation.NONE,
    types_pb2.ISOLATION_CU_MASK: Isolation.CU_MASK,
    types_pb2.ISOLATION_PARTITION: Isolation.PARTITION,
    types_pb2.ISOLATION_EXCLUSIVE: Isolation.EXCLUSIVE,
}
_ISOLATION_TO_PROTO: dict[Isolation, types_pb2.Isolation.ValueType] = {
    isolation: value
    for value, isolation in _ISOLATION_FROM_PROTO.items()
    if value != types_pb2.ISOLATION_UNSPECIFIED
}

_HEALTH_FROM_PROTO: dict[types_pb2.Health.ValueType, Health] = {
    types_pb2.HEALTH_UNSPECIFIED: Health.HEALTHY,
    types_pb2.HEALTH_HEALTHY: Health.HEALTHY,
    types_pb2.HEALTH_DEGRADED: Health.DEGRADED,
    types_pb2.HEALTH_UNHEALTHY: Health.UNHEALTHY,
}
_HEALTH_TO_PROTO: dict[Health, types_pb2.Health.ValueType] = {
    health: value
    for value, health in _HEALTH_FROM_PROTO.items()
    if value != types_pb2.HEALTH_UNSPECIFIED
}
HEALTH_VERDICTS = frozenset(_HEALTH_TO_PROTO.values())
"""The health values an agent may report (UNSPECIFIED is no verdict)."""

_ALIAS_BY_NOTE = {note: alias for alias, (_, note) in ISOLATION_ALIASES.items()}


def moment_of(stamp: Timestamp) -> datetime | None:
    """The moment a timestamp says, or None when it says none that a datetime holds
    (seconds before year 1 or after 9999, nanos outside 0-999,999,999): a broken writer's
    or a hand edit's, which must not fail a read that converts it."""
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        return None


def isolation_from_proto(value: int) -> Isolation:
    """Proto3 enums are open: an unknown number from a newer client is an error, not 'none'."""
    isolation = _ISOLATION_FROM_PROTO.get(cast("types_pb2.Isolation.ValueType", value))
    if isolation is None:
        raise InvalidArgumentError("isolation", value, ", ".join(types_pb2.Isolation.keys()))
    return isolation


def isolation_to_proto(isolation: Isolation) -> types_pb2.Isolation.ValueType:
    return _ISOLATION_TO_PROTO[isolation]


def health_from_proto(value: int) -> Health:
    """A verdict this version does not know (from a newer writer) counts as unhealthy:
    placement fails closed rather than trust a GPU nobody can vouch for."""
    return _HEALTH_FROM_PROTO.get(cast("types_pb2.Health.ValueType", value), Health.UNHEALTHY)


def health_to_proto(health: Health) -> types_pb2.Health.ValueType:
    return _HEALTH_TO_PROTO[health]


def selector_from_proto(message: types_pb2.Selector) -> Selector:
    return Selector(
        node_labels=tuple(message.node_labels.items()),
        gpu_models=frozenset(message.gpu_models),
        exclude_nodes=frozenset(message.exclude_nodes),
        exclude_gpus=frozenset(message.exclude_gpus),
        nodes=frozenset(message.nodes),
    )


def request_from_proto(message: types_pb2.AllocationRequest) -> AllocationRequest:
    """Validates a wire request; raises InvalidArgumentError naming the first bad field."""
    try:
        if message.isolation_name:
            isolation, note = parse_isolation(message.isolation_name, "isolation_name")
        else:
            isolation, note = isolation_from_proto(message.isolation), ""
        return AllocationRequest(
            request_id=message.request_id,
            count=message.count or 1,
            fraction_millis=message.fraction_millis or None,
            memory_mib=message.memory_mib or None,
            sharing=message.sharing if message.HasField("sharing") else True,
            isolation=isolation,
            isolation_note=note,
            selector=selector_from_proto(message.selector),
            strategy=message.strategy or None,
            owner=message.owner,
            labels=tuple(message.labels.items()),
            ttl_seconds=message.ttl_seconds or None,
        )
    except InvalidArgumentError as error:
        if error.field.startswith("request."):
            raise
        raise InvalidArgumentError(f"request.{error.field}", error.value, error.allowed) from None


def session_from_proto(message: types_pb2.AllocationRequest) -> str:
    """The request's client session ("" for none), by the request_id rule: it is a key too.

    Apart from the request, because a retry from another session (a new process replaying
    by request_id) asks for the same allocation."""
    if not message.session:
        return ""
    return names.check_request_id(message.session, "request.session")


def request_to_proto(request: AllocationRequest) -> types_pb2.AllocationRequest:
    message = types_pb2.AllocationRequest(
        request_id=request.request_id,
        count=request.count,
        fraction_millis=request.fraction_millis or 0,
        memory_mib=request.memory_mib or 0,
        isolation=isolation_to_proto(request.isolation),
        selector=types_pb2.Selector(
            node_labels=dict(request.selector.node_labels),
            gpu_models=sorted(request.selector.gpu_models),
            exclude_nodes=sorted(request.selector.exclude_nodes),
            exclude_gpus=sorted(request.selector.exclude_gpus),
            nodes=sorted(request.selector.nodes),
        ),
        strategy=request.strategy or "",
        owner=request.owner,
        labels=dict(request.labels),
        ttl_seconds=request.ttl_seconds or 0,
    )
    message.sharing = request.sharing
    alias = _ALIAS_BY_NOTE.get(request.isolation_note)
    if alias is not None:
        message.isolation_name = alias
    return message
