"""Exact integer units: compute share in millis (1000 = one GPU) and memory in MiB.

Accounting never touches floats, so 0.1 + 0.2 can never over-commit; every conversion that
cannot be exact says which way it rounds.
"""

from __future__ import annotations

import re
from decimal import ROUND_CEILING, Decimal, InvalidOperation

from kaiwo_gpu.common.errors import InvalidArgumentError

MILLIS_PER_GPU = 1000
MIN_FRACTION_MILLIS = 100
MAX_FRACTION_MILLIS = 1000

_MEMORY_SUFFIX_MIB = {"": 1, "mi": 1, "gi": 1024, "ti": 1024 * 1024}
_MEMORY_PATTERN = re.compile(r"\s*([0-9]+)\s*([A-Za-z]*)\s*")


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def parse_fraction_millis(value: str | float | int | Decimal, field: str = "fraction") -> int:
    """Turns a fraction of a GPU (0.1-1.0) into millis, rounding up to a whole milli."""
    try:
        fraction = Decimal(str(value).strip())
    except InvalidOperation:
        raise InvalidArgumentError(field, value, "a number from 0.1 to 1.0") from None
    if not fraction.is_finite() or not Decimal("0.1") <= fraction <= Decimal(1):
        raise InvalidArgumentError(field, value, "a number from 0.1 to 1.0")
    return int((fraction * MILLIS_PER_GPU).to_integral_value(rounding=ROUND_CEILING))


def format_fraction(millis: int) -> str:
    """Renders millis as a fraction of a GPU without float noise (250 -> '0.25')."""
    text = str(Decimal(millis) / MILLIS_PER_GPU)
    return text.rstrip("0").rstrip(".") if "." in text else text


def parse_memory_mib(value: str | int, field: str = "memory") -> int:
    """Parses MiB: a plain integer, or with a binary suffix Mi, Gi or Ti ('4Gi' -> 4096)."""
    if isinstance(value, int) and not isinstance(value, bool):
        mib = value
    else:
        match = _MEMORY_PATTERN.fullmatch(value) if isinstance(value, str) else None
        suffix = match.group(2).lower() if match else ""
        if match is None or suffix not in _MEMORY_SUFFIX_MIB:
            raise InvalidArgumentError(
                field, value, "MiB as an integer, or a size like 4Gi or 512Mi"
            )
        mib = int(match.group(1)) * _MEMORY_SUFFIX_MIB[suffix]
    if mib <= 0:
        raise InvalidArgumentError(field, value, "a positive size in MiB")
    return mib


def millis_for_memory(memory_mib: int, vram_mib: int) -> int:
    """Compute share that goes with a memory-only request: memory / VRAM, rounded up."""
    return min(MILLIS_PER_GPU, max(1, ceil_div(memory_mib * MILLIS_PER_GPU, vram_mib)))


def memory_for_millis(millis: int, vram_mib: int) -> int:
    """Memory that goes with a fraction-only request: fraction x VRAM, rounded down."""
    return millis * vram_mib // MILLIS_PER_GPU


def compute_units_for_millis(millis: int, total_compute_units: int) -> int:
    """Whole CUs needed to honour a share, rounded up so the grant is never less than asked."""
    return ceil_div(millis * total_compute_units, MILLIS_PER_GPU)


def millis_for_compute_units(compute_units: int, total_compute_units: int) -> int:
    """The share that a set of CUs amounts to, rounded down.

    Down, so that disjoint CU sets never add up past 1000 millis (three 1-CU shares of a
    3-CU GPU are 333 each, not 334). The grant still covers the request: for a share of m
    millis, ceil(m x CUs / 1000) CUs are worth at least m.
    """
    return compute_units * MILLIS_PER_GPU // total_compute_units


_DURATION_UNITS_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^([0-9]{1,9})([smhd]?)$")


def parse_duration_s(value: str, field: str = "duration") -> int:
    """Whole seconds from `90`, `90s`, `10m`, `2h` or `1d` (ASCII digits, one unit)."""
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise InvalidArgumentError(field, value, "a duration like 90s, 10m, 2h or 1d")
    return int(match.group(1)) * _DURATION_UNITS_S[match.group(2)]
