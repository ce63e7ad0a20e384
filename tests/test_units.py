from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.common.units import (
    compute_units_for_millis,
    format_fraction,
    memory_for_millis,
    millis_for_compute_units,
    millis_for_memory,
    parse_fraction_millis,
    parse_memory_mib,
)


@pytest.mark.parametrize(
    ("text", "millis"),
    [("0.1", 100), ("0.25", 250), ("1", 1000), ("1.0", 1000), (" 0.5 ", 500), ("0.3333", 334)],
)
def test_fractions_become_exact_millis(text: str, millis: int) -> None:
    assert parse_fraction_millis(text) == millis


def test_float_noise_never_adds_up_to_over_commit() -> None:
    assert parse_fraction_millis(0.1) + parse_fraction_millis(0.2) == 300
    assert sum(parse_fraction_millis(0.1) for _ in range(10)) == 1000


@pytest.mark.parametrize("bad", ["0.09", "1.01", "0", "-0.5", "nan", "inf", "half", ""])
def test_fraction_out_of_range_names_field_and_range(bad: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        parse_fraction_millis(bad, field="kaiwo.ai/gpu-fraction")
    assert caught.value.field == "kaiwo.ai/gpu-fraction"
    assert "0.1 to 1.0" in str(caught.value)
    assert repr(bad) in str(caught.value)


@pytest.mark.parametrize(
    ("text", "mib"), [("4000", 4000), ("4Gi", 4096), ("512Mi", 512), ("1Ti", 1048576), (7, 7)]
)
def test_memory_sizes(text: str | int, mib: int) -> None:
    assert parse_memory_mib(text) == mib


@pytest.mark.parametrize("bad", ["4GB", "-1", "0", "1.5Gi", "lots", True])
def test_bad_memory_sizes(bad: str | bool) -> None:
    with pytest.raises(InvalidArgumentError, match="memory"):
        parse_memory_mib(bad)


def test_format_fraction_round_trips() -> None:
    for millis in range(100, 1001):
        assert parse_fraction_millis(format_fraction(millis)) == millis
    assert format_fraction(250) == "0.25"
    assert format_fraction(1000) == "1"


@given(st.integers(1, 1000), st.integers(1, 512))
def test_cu_rounding_never_grants_less(millis: int, total: int) -> None:
    units = compute_units_for_millis(millis, total)
    granted = millis_for_compute_units(units, total)
    assert units <= total
    assert granted >= millis
    assert Decimal(units) / total >= Decimal(millis) / 1000
    assert compute_units_for_millis(granted, total) == units


@given(st.integers(1, 512), st.data())
def test_disjoint_cu_sets_never_add_past_a_gpu(total: int, data: st.DataObject) -> None:
    sizes = data.draw(st.lists(st.integers(1, total), max_size=total))
    while sum(sizes) > total:
        sizes.pop()
    assert sum(millis_for_compute_units(size, total) for size in sizes) <= 1000


@given(st.integers(1, 200_000), st.integers(1024, 200_000))
def test_memory_and_share_conversions_round_the_safe_way(memory: int, vram: int) -> None:
    millis = millis_for_memory(min(memory, vram), vram)
    assert 1 <= millis <= 1000
    assert millis * vram >= min(memory, vram) * 1000
    assert memory_for_millis(millis, vram) * 1000 <= millis * vram
