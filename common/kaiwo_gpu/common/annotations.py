"""Kaiwo pod annotations and the `amd.com/gpu` resource, read into the shape of a request.

`kaiwo.ai/gpu-fraction`, `kaiwo.ai/gpu-memory` (MiB), `kaiwo.ai/gpu-sharing` and
`kaiwo.ai/gpu-isolation` map 1:1 onto request fields. `amd.com/gpu` is read in the `auto`
unit by default: below 100 it counts devices (each at the annotation's fraction, or whole),
from 100 on millis (500 = half a GPU). Neither reading can take the other's amounts (no
share is under 100 millis, no node has 100 GPUs), so `auto` never guesses; `milli` and
`device` pin one reading.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.common.models import MAX_GPUS_PER_REQUEST, Isolation, parse_isolation
from kaiwo_gpu.common.units import (
    MILLIS_PER_GPU,
    MIN_FRACTION_MILLIS,
    parse_fraction_millis,
    parse_memory_mib,
)

GPU_FRACTION = "kaiwo.ai/gpu-fraction"
GPU_MEMORY = "kaiwo.ai/gpu-memory"
GPU_SHARING = "kaiwo.ai/gpu-sharing"
GPU_ISOLATION = "kaiwo.ai/gpu-isolation"
KNOWN_GPU_ANNOTATIONS = frozenset({GPU_FRACTION, GPU_MEMORY, GPU_SHARING, GPU_ISOLATION})
AMD_GPU_RESOURCE = "amd.com/gpu"

_TRUE = frozenset({"true", "yes", "1", "on"})
_FALSE = frozenset({"false", "no", "0", "off"})


class AmdGpuUnit(StrEnum):
    """What one unit of `amd.com/gpu` means on this cluster; `auto` tells by the amount."""

    AUTO = "auto"
    MILLI = "milli"
    DEVICE = "device"


AUTO_UNIT_RULE = (
    f"the auto unit reads amounts below {MIN_FRACTION_MILLIS} as devices and the rest as millis"
)
_MILLI_AMOUNTS = (
    f"{MIN_FRACTION_MILLIS}-{MILLIS_PER_GPU} millis (one GPU) or a multiple of {MILLIS_PER_GPU} "
    f"up to {MAX_GPUS_PER_REQUEST * MILLIS_PER_GPU} (whole GPUs)"
)
_MAX_AMOUNT_DIGITS = 9
"""Far more digits than any amount allowed has (64,000 millis): longer is refused unread."""
_AMOUNTS: Mapping[AmdGpuUnit, str] = {
    AmdGpuUnit.MILLI: _MILLI_AMOUNTS,
    AmdGpuUnit.DEVICE: f"1-{MAX_GPUS_PER_REQUEST} devices",
    AmdGpuUnit.AUTO: f"1-{MAX_GPUS_PER_REQUEST} devices, or {_MILLI_AMOUNTS} ({AUTO_UNIT_RULE})",
}


@dataclass(frozen=True, slots=True)
class RequestShape:
    """The GPU part of a request as annotations and resources describe it."""

    count: int = 1
    fraction_millis: int | None = None
    memory_mib: int | None = None
    sharing: bool = True
    isolation: Isolation = Isolation.NONE
    isolation_note: str = ""


def parse_bool(value: str, field: str) -> bool:
    text = value.strip().lower() if isinstance(value, str) else ""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidArgumentError(field, value, "true or false")


def resolve_amd_gpu_unit(amount: int, unit: AmdGpuUnit) -> AmdGpuUnit:
    """The unit an `amd.com/gpu` amount is in: `auto` reads below 100 as devices (a share
    is never under 100 millis) and 100 or more as millis (a node never has 100 GPUs)."""
    if unit is not AmdGpuUnit.AUTO:
        return unit
    return AmdGpuUnit.DEVICE if amount < MIN_FRACTION_MILLIS else AmdGpuUnit.MILLI


def read_amd_gpu(value: str | int, unit: AmdGpuUnit) -> tuple[int, AmdGpuUnit]:
    """A valid `amd.com/gpu` quantity as a whole number and the unit it is in (never auto)."""
    field = f"resource {AMD_GPU_RESOURCE}"
    text = str(value).strip() if isinstance(value, str | int) and value is not True else ""
    if not (text.isascii() and text.isdigit()) or not text.strip("0"):  # none, or zero
        raise InvalidArgumentError(field, value, "a positive whole number (extended resources)")
    if len(text.lstrip("0")) > _MAX_AMOUNT_DIGITS:  # int() of 5,000 digits is an error
        raise InvalidArgumentError(field, value, _AMOUNTS[unit])
    amount = int(text)
    resolved = resolve_amd_gpu_unit(amount, unit)
    if resolved is AmdGpuUnit.DEVICE:
        valid = amount <= MAX_GPUS_PER_REQUEST
    else:
        whole, rest = divmod(amount, MILLIS_PER_GPU)
        valid = MIN_FRACTION_MILLIS <= amount <= MILLIS_PER_GPU or (
            rest == 0 and whole <= MAX_GPUS_PER_REQUEST
        )
    if not valid:
        raise InvalidArgumentError(field, value, _AMOUNTS[unit])
    return amount, resolved


def _count_and_millis(amount: int, unit: AmdGpuUnit) -> tuple[int, int]:
    """(count, millis per GPU) of an amount that read_amd_gpu found valid in `unit`."""
    if unit is AmdGpuUnit.DEVICE:
        return amount, MILLIS_PER_GPU
    if amount <= MILLIS_PER_GPU:
        return 1, amount
    return amount // MILLIS_PER_GPU, MILLIS_PER_GPU


def parse_amd_gpu(value: str | int, unit: AmdGpuUnit) -> tuple[int, int]:
    """Returns (count, millis per GPU) for an `amd.com/gpu` quantity in the given unit."""
    return _count_and_millis(*read_amd_gpu(value, unit))


def parse_gpu_annotations(
    annotations: Mapping[str, str],
    amd_gpu: str | int | None = None,
    amd_gpu_unit: AmdGpuUnit = AmdGpuUnit.AUTO,
) -> RequestShape:
    """Reads the Kaiwo annotations and an optional `amd.com/gpu` amount into a RequestShape.

    Unknown `kaiwo.ai/gpu-*` keys and values that contradict each other are errors that
    name the annotation, so a typo never silently turns into a default.
    """
    for key, value in annotations.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgumentError(f"annotation {key}", value, "string keys and values")
        if key.startswith("kaiwo.ai/gpu-") and key not in KNOWN_GPU_ANNOTATIONS:
            known = ", ".join(sorted(KNOWN_GPU_ANNOTATIONS))
            raise InvalidArgumentError(f"annotation {key}", value, f"one of {known}")

    fraction = (
        parse_fraction_millis(annotations[GPU_FRACTION], f"annotation {GPU_FRACTION}")
        if GPU_FRACTION in annotations
        else None
    )
    memory = (
        parse_memory_mib(annotations[GPU_MEMORY], f"annotation {GPU_MEMORY}")
        if GPU_MEMORY in annotations
        else None
    )
    sharing = (
        parse_bool(annotations[GPU_SHARING], f"annotation {GPU_SHARING}")
        if GPU_SHARING in annotations
        else True
    )
    isolation, note = parse_isolation(
        annotations.get(GPU_ISOLATION, ""), f"annotation {GPU_ISOLATION}"
    )

    count = 1
    if amd_gpu is not None:
        amount, unit = read_amd_gpu(amd_gpu, amd_gpu_unit)
        count, resource_millis = _count_and_millis(amount, unit)
        whole_devices = unit is AmdGpuUnit.DEVICE or count > 1
        if fraction is None:
            fraction = resource_millis
        elif not whole_devices and fraction != resource_millis:
            raise InvalidArgumentError(
                f"annotation {GPU_FRACTION}",
                annotations[GPU_FRACTION],
                f"the same share as {AMD_GPU_RESOURCE}: {amd_gpu} ({resource_millis} millis)",
            )
        elif count > 1 and unit is AmdGpuUnit.MILLI:
            raise InvalidArgumentError(
                f"annotation {GPU_FRACTION}",
                annotations[GPU_FRACTION],
                f"no fraction when {AMD_GPU_RESOURCE}: {amd_gpu} asks for whole GPUs",
            )
    return RequestShape(
        count=count,
        fraction_millis=fraction,
        memory_mib=memory,
        sharing=sharing,
        isolation=isolation,
        isolation_note=note,
    )
