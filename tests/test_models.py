from __future__ import annotations

import pytest

from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.common.models import AllocationRequest, Isolation, Selector, parse_isolation


def test_mps_maps_to_cu_mask_and_says_so() -> None:
    isolation, note = parse_isolation("MPS")
    assert isolation is Isolation.CU_MASK
    assert "mps" in note
    assert "cu-mask" in note


@pytest.mark.parametrize("value", ["none", "cu-mask", "partition", "exclusive"])
def test_isolation_values(value: str) -> None:
    assert parse_isolation(value) == (Isolation(value), "")


def test_unknown_isolation_lists_the_allowed_values() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        parse_isolation("mig", field="isolation")
    assert caught.value.field == "isolation"
    for allowed in ("none", "cu-mask", "partition", "exclusive", "mps"):
        assert allowed in caught.value.allowed


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"request_id": ""}, "request_id", "1-128"),
        ({"request_id": "has space"}, "request_id", "1-128"),
        ({"count": 0}, "count", "1-64"),
        ({"count": 65}, "count", "1-64"),
        ({"fraction_millis": 99}, "fraction_millis", "100-1000"),
        ({"fraction_millis": 1001}, "fraction_millis", "100-1000"),
        ({"memory_mib": 0}, "memory_mib", "MiB"),
        ({"ttl_seconds": 0}, "ttl_seconds", "s"),
        ({"strategy": "Best Fit"}, "strategy", "strategy name"),
        ({"labels": (("bad key!", "v"),)}, "labels.key", "label key"),
        ({"labels": (("team", "x" * 64),)}, "labels[team]", "63"),
        ({"fraction_millis": None, "memory_mib": None}, "fraction_millis", "neither"),
    ],
)
def test_every_field_is_validated(changes: dict[str, object], field: str, words: str) -> None:
    arguments: dict[str, object] = {"request_id": "r-1", "fraction_millis": 500, **changes}
    with pytest.raises(InvalidArgumentError) as caught:
        AllocationRequest(**arguments)  # type: ignore[arg-type]
    assert caught.value.field == field
    assert words in str(caught.value)


def test_selector_names_are_validated() -> None:
    with pytest.raises(InvalidArgumentError, match=r"selector\.exclude_nodes"):
        Selector(exclude_nodes=frozenset({"node 1"}))


def test_exclusive_needs_no_size_and_needs_an_idle_gpu() -> None:
    request = AllocationRequest("r", isolation=Isolation.EXCLUSIVE)
    assert request.needs_idle_gpu
    assert request.blocks_sharing


def test_whole_gpu_needs_idle_but_does_not_block_by_itself() -> None:
    request = AllocationRequest("r", fraction_millis=1000)
    assert request.needs_idle_gpu
    assert not request.blocks_sharing
    assert not AllocationRequest("r", fraction_millis=500).needs_idle_gpu
    assert AllocationRequest("r", fraction_millis=500, sharing=False).needs_idle_gpu
