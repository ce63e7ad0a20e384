"""Whatever a caller passes, the model either accepts a valid request or names the field.

Anything other than InvalidArgumentError escaping here would reach a user as a traceback.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kaiwo_gpu.common.annotations import AmdGpuUnit, parse_amd_gpu, parse_gpu_annotations
from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.common.models import AllocationRequest, Isolation, Selector
from kaiwo_gpu.common.units import parse_memory_mib

anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.text(alphabet="0123456789\u00b2\u0665\u0660\u0967\n\t -/.", max_size=8),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.one_of(st.text(max_size=5), st.integers()), st.text(max_size=5), max_size=3),
)


@given(
    st.sampled_from(
        ["request_id", "count", "fraction_millis", "memory_mib", "sharing", "isolation",
         "strategy", "owner", "labels", "ttl_seconds", "selector", "isolation_note"]
    ),
    anything,
)  # fmt: skip
def test_any_field_value_is_accepted_validly_or_named(field: str, value: Any) -> None:
    arguments: dict[str, Any] = {"request_id": "r-1", "fraction_millis": 500, field: value}
    try:
        request = AllocationRequest(**arguments)
    except InvalidArgumentError as error:
        assert error.field.split(".")[0].split("[")[0] in {field, "fraction_millis"}  # noqa: PT017
        return
    assert isinstance(request.isolation, Isolation)
    assert type(request.count) is int
    assert request.fraction_millis is None or type(request.fraction_millis) is int
    assert isinstance(request.labels, tuple)


@given(st.sampled_from(["node_labels", "gpu_models", "exclude_nodes", "exclude_gpus"]), anything)
def test_any_selector_value_is_accepted_validly_or_named(field: str, value: Any) -> None:
    try:
        selector = Selector(**{field: value})
    except InvalidArgumentError as error:
        assert error.field.startswith(f"selector.{field}")  # noqa: PT017
        return
    assert isinstance(selector.node_labels, tuple)
    assert all(isinstance(name, str) for name in selector.gpu_models)


@given(st.dictionaries(st.sampled_from(["kaiwo.ai/gpu-fraction", "kaiwo.ai/gpu-memory",
       "kaiwo.ai/gpu-sharing", "kaiwo.ai/gpu-isolation", "kaiwo.ai/gpu-x"]), anything),
       anything, st.sampled_from(list(AmdGpuUnit)))  # fmt: skip
def test_any_annotations_parse_or_name_the_annotation(
    annotations: dict[str, Any], amd_gpu: Any, unit: AmdGpuUnit
) -> None:
    try:
        parse_gpu_annotations(annotations, amd_gpu, unit)
    except InvalidArgumentError as error:
        assert error.field.startswith(("annotation kaiwo.ai/", "resource amd.com/gpu"))  # noqa: PT017


@pytest.mark.parametrize("value", ["job-1\n", "job 1", "jöb", "", "x" * 129])
def test_request_ids_are_exact(value: str) -> None:
    with pytest.raises(InvalidArgumentError, match="request_id"):
        AllocationRequest(value, fraction_millis=500)


@pytest.mark.parametrize("value", ["\u00b2", "\u0665\u0660\u0660", "1e3", "500\n\n"])
def test_only_ascii_digits_count_as_amounts(value: str) -> None:
    if value.strip().isascii() and value.strip().isdigit():
        assert parse_amd_gpu(value, AmdGpuUnit.MILLI) == (1, 500)
        return
    with pytest.raises(InvalidArgumentError):
        parse_amd_gpu(value, AmdGpuUnit.MILLI)
    with pytest.raises(InvalidArgumentError):
        parse_memory_mib(value + "Gi")


@pytest.mark.parametrize(
    ("field", "value"),
    [("fraction_millis", 500.5), ("memory_mib", 100.5), ("ttl_seconds", 1.5), ("count", True)],
)
def test_no_floats_or_bools_in_accounted_fields(field: str, value: object) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        AllocationRequest("r", **{"fraction_millis": 500, field: value})  # type: ignore[arg-type]
    assert caught.value.field == field


def test_strings_are_coerced_to_their_frozen_forms() -> None:
    request = AllocationRequest(
        "r",
        fraction_millis=300,
        isolation="cu-mask",  # type: ignore[arg-type]
        labels={"team": "ml"},  # type: ignore[arg-type]
        selector=Selector(node_labels={"zone": "a"}, gpu_models=["MI300X"]),  # type: ignore[arg-type]
    )
    assert request.isolation is Isolation.CU_MASK
    assert request.labels == (("team", "ml"),)
    assert request.selector.node_labels == (("zone", "a"),)
    assert request.selector.gpu_models == frozenset({"MI300X"})
    with pytest.raises(InvalidArgumentError, match=r"selector\.gpu_models"):
        Selector(gpu_models="MI300X")  # type: ignore[arg-type]
