"""The request model: what a client may ask for, validated once at the edge.

Instances are frozen and always valid: every constructor checks its fields and raises
InvalidArgumentError naming the field, the value and the allowed range.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from kaiwo_gpu.common import names
from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.common.units import MAX_FRACTION_MILLIS, MILLIS_PER_GPU, MIN_FRACTION_MILLIS

MAX_GPUS_PER_REQUEST = 64
MAX_MEMORY_MIB = 16 * 1024 * 1024  # 16 TiB: far above any GPU, low enough to catch unit mistakes
MAX_TTL_SECONDS = 30 * 24 * 3600
MAX_LABELS = 64
MAX_SELECTOR_ITEMS = 256

_LABEL_KEY = re.compile(  # an optional DNS-1123 prefix, then a name
    rf"^({names.DNS_SUBDOMAIN.pattern}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_OWNER = re.compile(r"^[\x21-\x7e]{0,253}$")
_STRATEGY = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
MAX_NOTE_CHARS = 512

Labels = tuple[tuple[str, str], ...]


class Isolation(StrEnum):
    """What keeps shares of one GPU apart. AMD has no MPS, so each value says what is enforced."""

    NONE = "none"
    CU_MASK = "cu-mask"
    PARTITION = "partition"
    EXCLUSIVE = "exclusive"


class Health(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


ISOLATION_ALIASES: Mapping[str, tuple[Isolation, str]] = {
    "mps": (
        Isolation.CU_MASK,
        "isolation 'mps' is not available on AMD GPUs; mapped to 'cu-mask' "
        "(disjoint compute units through HSA_CU_MASK)",
    ),
    "time-slicing": (
        Isolation.NONE,
        "isolation 'time-slicing' is how AMD GPUs share without isolation; mapped to 'none' "
        "(time-shared, accounting only)",
    ),
}


def _isolation_value(value: object) -> Isolation:
    """An Isolation from its exact value ('cu-mask'); aliases need parse_isolation."""
    try:
        return Isolation(value)  # type: ignore[arg-type]  # any object may arrive here
    except ValueError:
        allowed = " | ".join(i.value for i in Isolation)
        raise InvalidArgumentError("isolation", value, allowed) from None


def parse_isolation(value: str, field: str = "isolation") -> tuple[Isolation, str]:
    """Returns the isolation and a note when the value was an alias ('mps' -> cu-mask)."""
    if not isinstance(value, str):
        raise InvalidArgumentError(field, value, "a name: none, cu-mask, partition, exclusive")
    text = value.strip().lower()
    if text == "":
        return Isolation.NONE, ""
    if text in ISOLATION_ALIASES:
        return ISOLATION_ALIASES[text]
    try:
        return Isolation(text), ""
    except ValueError:
        allowed = " | ".join([*(i.value for i in Isolation), *ISOLATION_ALIASES])
        raise InvalidArgumentError(field, value, allowed) from None


def freeze_labels(labels: object, field: str) -> Labels:
    """Validates Kubernetes-style labels and returns them sorted, so equal maps compare equal."""
    if isinstance(labels, str | bytes):
        raise InvalidArgumentError(field, labels, "a map of label keys to values")
    try:
        as_dict = dict(labels)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise InvalidArgumentError(field, labels, "a map of label keys to values") from None
    for key, value in as_dict.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgumentError(field, f"{key!r}: {value!r}", "string keys and values")
    pairs = tuple(sorted(as_dict.items()))
    if len(pairs) > MAX_LABELS:
        raise InvalidArgumentError(field, f"{len(pairs)} labels", f"at most {MAX_LABELS} labels")
    for key, value in pairs:
        if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
            raise InvalidArgumentError(
                f"{field}.key", key, "a label key: [prefix/]name, alphanumerics, '-', '_', '.'"
            )
        if not isinstance(value, str) or not _LABEL_VALUE.fullmatch(value):
            raise InvalidArgumentError(
                f"{field}[{key}]", value, "a label value: up to 63 alphanumerics, '-', '_', '.'"
            )
    return pairs


def _freeze_names(
    values: object, field: str, check: Callable[[object, str], str]
) -> frozenset[str]:
    """A set of names, each passing `check` (the rule for that kind of name)."""
    if isinstance(values, str | bytes):
        raise InvalidArgumentError(field, values, "a set of names, not one string")
    try:
        frozen: frozenset[str] = frozenset(values)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidArgumentError(field, values, "a set of names") from None
    if len(frozen) > MAX_SELECTOR_ITEMS:
        raise InvalidArgumentError(field, f"{len(frozen)} items", f"at most {MAX_SELECTOR_ITEMS}")
    for value in frozen:
        check(value, field)
    return frozen


def _check_int(value: object, field: str, allowed: str) -> None:
    """Exact integers only: a float, bool or string here is a unit mistake, not a size."""
    if type(value) is not int:
        raise InvalidArgumentError(field, value, allowed)


def _check_str(value: object, pattern: re.Pattern[str], field: str, allowed: str) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidArgumentError(field, value, allowed)


@dataclass(frozen=True, slots=True)
class Selector:
    """Where a request may land: node labels that must match, GPU models, nodes, exclusions."""

    node_labels: Labels = ()
    gpu_models: frozenset[str] = frozenset()
    exclude_nodes: frozenset[str] = frozenset()
    exclude_gpus: frozenset[str] = frozenset()
    nodes: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        # Accept any mapping or iterable, keep the frozen, validated form.
        set_field = object.__setattr__
        set_field(self, "node_labels", freeze_labels(self.node_labels, "selector.node_labels"))
        for name, check in (
            ("gpu_models", names.check_gpu_model),
            ("exclude_nodes", names.check_node_name),
            ("exclude_gpus", names.check_gpu_uuid),
            ("nodes", names.check_node_name),
        ):
            set_field(self, name, _freeze_names(getattr(self, name), f"selector.{name}", check))

    @property
    def is_empty(self) -> bool:
        return not (
            self.node_labels
            or self.gpu_models
            or self.exclude_nodes
            or self.exclude_gpus
            or self.nodes
        )


@dataclass(frozen=True, slots=True)
class AllocationRequest:
    """One request for `count` GPUs on one node, each with a compute share and/or memory.

    `fraction_millis` None means the share follows from memory (memory / VRAM, rounded up);
    `memory_mib` None means memory follows from the share (share x VRAM, rounded down).
    """

    request_id: str
    count: int = 1
    fraction_millis: int | None = None
    memory_mib: int | None = None
    sharing: bool = True
    isolation: Isolation = Isolation.NONE
    isolation_note: str = ""
    selector: Selector = field(default_factory=Selector)
    strategy: str | None = None
    owner: str = ""
    labels: Labels = ()
    ttl_seconds: int | None = None

    def __post_init__(self) -> None:
        set_field = object.__setattr__
        names.check_request_id(self.request_id, "request_id")
        _check_int(self.count, "count", f"1-{MAX_GPUS_PER_REQUEST} GPUs")
        if not 1 <= self.count <= MAX_GPUS_PER_REQUEST:
            raise InvalidArgumentError("count", self.count, f"1-{MAX_GPUS_PER_REQUEST} GPUs")
        for name, allowed in (
            ("fraction_millis", f"{MIN_FRACTION_MILLIS}-{MAX_FRACTION_MILLIS} millis, an integer"),
            ("memory_mib", f"1-{MAX_MEMORY_MIB} MiB, an integer"),
            ("ttl_seconds", f"1-{MAX_TTL_SECONDS} s, an integer"),
        ):
            value = getattr(self, name)
            if value is not None:
                _check_int(value, name, allowed)
        # Read as plain objects: callers from Python may pass anything, whatever the hints say.
        sharing: object = self.sharing
        isolation: object = self.isolation
        selector: object = self.selector
        if not isinstance(sharing, bool):
            raise InvalidArgumentError("sharing", sharing, "true or false")
        if not isinstance(isolation, Isolation):
            set_field(self, "isolation", _isolation_value(isolation))
        if not isinstance(selector, Selector):
            raise InvalidArgumentError("selector", selector, "a Selector")
        if self.fraction_millis is not None and not (
            MIN_FRACTION_MILLIS <= self.fraction_millis <= MAX_FRACTION_MILLIS
        ):
            raise InvalidArgumentError(
                "fraction_millis",
                self.fraction_millis,
                f"{MIN_FRACTION_MILLIS}-{MAX_FRACTION_MILLIS} millis (0.1-1.0 of a GPU)",
            )
        if self.memory_mib is not None and not 1 <= self.memory_mib <= MAX_MEMORY_MIB:
            raise InvalidArgumentError("memory_mib", self.memory_mib, f"1-{MAX_MEMORY_MIB} MiB")
        if (
            self.fraction_millis is None
            and self.memory_mib is None
            and self.isolation not in (Isolation.EXCLUSIVE, Isolation.PARTITION)
        ):
            raise InvalidArgumentError(
                "fraction_millis", None, "a fraction, a memory size or both (neither was given)"
            )
        if self.strategy is not None:
            _check_str(self.strategy, _STRATEGY, "strategy", "a strategy name like best-fit")
        _check_str(self.owner, _OWNER, "owner", "up to 253 printable ASCII characters, no spaces")
        names.check_text(self.isolation_note, "isolation_note", MAX_NOTE_CHARS)
        set_field(self, "labels", freeze_labels(self.labels, "labels"))
        if self.ttl_seconds is not None and not 1 <= self.ttl_seconds <= MAX_TTL_SECONDS:
            raise InvalidArgumentError("ttl_seconds", self.ttl_seconds, f"1-{MAX_TTL_SECONDS} s")

    @property
    def needs_idle_gpu(self) -> bool:
        """Whole, non-sharing, exclusive and partition requests need GPUs nobody else holds."""
        return (
            not self.sharing
            or self.isolation in (Isolation.EXCLUSIVE, Isolation.PARTITION)
            or self.fraction_millis == MILLIS_PER_GPU
        )

    @property
    def blocks_sharing(self) -> bool:
        """Once placed, nobody else may join the GPUs it holds."""
        return not self.sharing or self.isolation in (Isolation.EXCLUSIVE, Isolation.PARTITION)
