from __future__ import annotations

import pytest

from kaiwo_gpu.common.annotations import (
    AmdGpuUnit,
    parse_amd_gpu,
    parse_gpu_annotations,
    resolve_amd_gpu_unit,
)
from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.common.models import Isolation


def test_kaiwo_annotations_map_one_to_one() -> None:
    shape = parse_gpu_annotations(
        {
            "kaiwo.ai/gpu-fraction": "0.5",
            "kaiwo.ai/gpu-memory": "16384",
            "kaiwo.ai/gpu-sharing": "false",
            "kaiwo.ai/gpu-isolation": "cu-mask",
            "kaiwo.ai/other": "ignored",
        }
    )
    assert shape.fraction_millis == 500
    assert shape.memory_mib == 16384
    assert shape.sharing is False
    assert shape.isolation is Isolation.CU_MASK
    assert shape.count == 1


def test_mps_annotation_is_mapped_and_reported() -> None:
    shape = parse_gpu_annotations({"kaiwo.ai/gpu-fraction": "0.3", "kaiwo.ai/gpu-isolation": "mps"})
    assert shape.isolation is Isolation.CU_MASK
    assert "mps" in shape.isolation_note


@pytest.mark.parametrize("spelling", ["time-slicing", "Time-Slicing "])
def test_time_slicing_annotation_is_none_and_reported(spelling: str) -> None:
    shape = parse_gpu_annotations({"kaiwo.ai/gpu-isolation": spelling}, amd_gpu=1)
    assert shape.isolation is Isolation.NONE
    assert "'time-slicing'" in shape.isolation_note
    assert "'none'" in shape.isolation_note
    assert parse_gpu_annotations({"kaiwo.ai/gpu-isolation": "none"}).isolation_note == ""


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        ("500", AmdGpuUnit.MILLI, (1, 500)),
        ("1000", AmdGpuUnit.MILLI, (1, 1000)),
        ("3000", AmdGpuUnit.MILLI, (3, 1000)),
        ("2", AmdGpuUnit.DEVICE, (2, 1000)),
        ("1", AmdGpuUnit.AUTO, (1, 1000)),
        ("64", AmdGpuUnit.AUTO, (64, 1000)),
        ("100", AmdGpuUnit.AUTO, (1, 100)),
        ("500", AmdGpuUnit.AUTO, (1, 500)),
        ("1000", AmdGpuUnit.AUTO, (1, 1000)),
        ("3000", AmdGpuUnit.AUTO, (3, 1000)),
    ],
)
def test_amd_gpu_resource_in_millis_or_devices(
    value: str, unit: AmdGpuUnit, expected: tuple[int, int]
) -> None:
    assert parse_amd_gpu(value, unit) == expected


@pytest.mark.parametrize("value", ["0", "50", "1500", "500m", "-1", "0.5", "65000"])
def test_bad_amd_gpu_amounts_name_the_resource(value: str) -> None:
    with pytest.raises(InvalidArgumentError, match=r"amd\.com/gpu"):
        parse_amd_gpu(value, AmdGpuUnit.MILLI)


@pytest.mark.parametrize(
    ("amount", "unit", "resolved"),
    [
        (1, AmdGpuUnit.AUTO, AmdGpuUnit.DEVICE),
        (99, AmdGpuUnit.AUTO, AmdGpuUnit.DEVICE),
        (100, AmdGpuUnit.AUTO, AmdGpuUnit.MILLI),
        (64000, AmdGpuUnit.AUTO, AmdGpuUnit.MILLI),
        (1, AmdGpuUnit.MILLI, AmdGpuUnit.MILLI),
        (500, AmdGpuUnit.DEVICE, AmdGpuUnit.DEVICE),
    ],
)
def test_auto_unit_resolves_by_the_amount_and_explicit_units_stay(
    amount: int, unit: AmdGpuUnit, resolved: AmdGpuUnit
) -> None:
    assert resolve_amd_gpu_unit(amount, unit) is resolved


@pytest.mark.parametrize(
    ("value", "unit", "allowed"),
    [
        ("99", AmdGpuUnit.AUTO, "below 100 as devices"),
        ("65", AmdGpuUnit.AUTO, "1-64 devices"),
        ("1500", AmdGpuUnit.AUTO, "below 100 as devices"),
        ("1", AmdGpuUnit.MILLI, "100-1000 millis"),
        ("65", AmdGpuUnit.DEVICE, "1-64 devices"),
    ],
)
def test_amounts_no_reading_takes_say_what_the_unit_allows(
    value: str, unit: AmdGpuUnit, allowed: str
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        parse_amd_gpu(value, unit)
    assert caught.value.field == "resource amd.com/gpu"
    assert allowed in caught.value.allowed
    if unit is not AmdGpuUnit.AUTO:
        assert "auto" not in caught.value.allowed


def test_default_unit_takes_one_device_at_the_annotations_fraction() -> None:
    shape = parse_gpu_annotations({"kaiwo.ai/gpu-fraction": "0.5"}, amd_gpu=1)
    assert (shape.count, shape.fraction_millis) == (1, 500)
    assert parse_gpu_annotations({}, amd_gpu=1).fraction_millis == 1000
    assert parse_gpu_annotations({}, amd_gpu="500").fraction_millis == 500
    with pytest.raises(InvalidArgumentError, match="100-1000 millis"):
        parse_gpu_annotations({}, amd_gpu=1, amd_gpu_unit=AmdGpuUnit.MILLI)


def test_resource_gives_the_fraction_when_no_annotation_does() -> None:
    assert parse_gpu_annotations({}, amd_gpu="250").fraction_millis == 250


def test_conflicting_fraction_and_resource_name_the_annotation() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        parse_gpu_annotations({"kaiwo.ai/gpu-fraction": "0.25"}, amd_gpu="500")
    assert caught.value.field == "annotation kaiwo.ai/gpu-fraction"
    assert "amd.com/gpu" in str(caught.value)


def test_device_unit_takes_count_from_resource_and_share_from_annotation() -> None:
    shape = parse_gpu_annotations(
        {"kaiwo.ai/gpu-fraction": "0.5"}, amd_gpu="2", amd_gpu_unit=AmdGpuUnit.DEVICE
    )
    assert (shape.count, shape.fraction_millis) == (2, 500)


@pytest.mark.parametrize(
    ("annotations", "named"),
    [
        ({"kaiwo.ai/gpu-fractoin": "0.5"}, "kaiwo.ai/gpu-fractoin"),
        ({"kaiwo.ai/gpu-fraction": "2"}, "kaiwo.ai/gpu-fraction"),
        ({"kaiwo.ai/gpu-memory": "lots"}, "kaiwo.ai/gpu-memory"),
        ({"kaiwo.ai/gpu-sharing": "maybe"}, "kaiwo.ai/gpu-sharing"),
        ({"kaiwo.ai/gpu-isolation": "mig"}, "kaiwo.ai/gpu-isolation"),
    ],
)
def test_bad_annotations_are_named(annotations: dict[str, str], named: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        parse_gpu_annotations(annotations)
    assert named in caught.value.field
