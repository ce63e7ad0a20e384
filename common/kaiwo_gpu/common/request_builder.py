"""Builds an AllocationRequest from what people type: `0.5`, `4Gi`, `10m`, `team=ml`.

The client library, the CLI, `run` and the Slurm scripts all ask through this one function,
so a value means the same everywhere and a bad one names the same field.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal

from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.common.models import AllocationRequest, Selector, parse_isolation
from kaiwo_gpu.common.units import parse_duration_s, parse_fraction_millis, parse_memory_mib

Fraction = str | float | int | Decimal
Size = str | int
Duration = str | int


def parse_ttl_s(value: Duration, field: str = "ttl") -> int:
    """Seconds from an int or a duration text (`90`, `10m`, `2h`)."""
    if isinstance(value, bool):
        raise InvalidArgumentError(field, value, "a duration like 90s, 10m or 2h")
    if isinstance(value, int):
        return value
    return parse_duration_s(value.strip() if isinstance(value, str) else value, field)


def build_request(
    request_id: str,
    *,
    fraction: Fraction | None = None,
    memory: Size | None = None,
    count: int = 1,
    isolation: str = "",
    sharing: bool = True,
    ttl: Duration | None = None,
    owner: str = "",
    labels: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    strategy: str | None = None,
    nodes: Iterable[str] = (),
    node_labels: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    gpu_models: Iterable[str] = (),
    exclude_nodes: Iterable[str] = (),
) -> AllocationRequest:
    """A validated request; raises InvalidArgumentError naming the first bad field."""
    isolation_kind, note = parse_isolation(isolation)
    return AllocationRequest(
        request_id=request_id,
        count=count,
        fraction_millis=None if fraction is None else parse_fraction_millis(fraction),
        memory_mib=None if memory is None else parse_memory_mib(memory),
        sharing=sharing,
        isolation=isolation_kind,
        isolation_note=note,
        selector=Selector(
            node_labels=tuple(dict(node_labels).items()),
            gpu_models=frozenset(gpu_models),
            exclude_nodes=frozenset(exclude_nodes),
            nodes=frozenset(nodes),
        ),
        strategy=strategy or None,
        owner=owner,
        labels=tuple(dict(labels).items()),
        ttl_seconds=None if ttl is None else parse_ttl_s(ttl),
    )
