"""Persistent vectors and sorted runs behave as a list and a sorted list, and never change."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kaiwo_gpu.coordinator.placement.persistent import CHUNK, RUN, ChunkedVector, SortedRuns


@given(st.lists(st.integers(), max_size=3 * CHUNK + 5), st.data())
def test_replaced_equals_assignment_and_leaves_the_original(
    items: list[int], data: st.DataObject
) -> None:
    vector = ChunkedVector(items)
    assert list(vector) == items
    assert len(vector) == len(items)
    if not items:
        return
    changes = data.draw(
        st.dictionaries(st.integers(0, len(items) - 1), st.integers(), max_size=2 * CHUNK)
    )
    expected = list(items)
    for position, value in changes.items():
        expected[position] = value
    after = vector.replaced(changes)
    assert list(after) == expected
    assert [after[i] for i in range(len(items))] == expected
    assert after[-1] == expected[-1]
    assert after == ChunkedVector(expected)
    assert after == expected
    assert list(vector) == items, "replaced() must not change the original"


@pytest.mark.parametrize("bad", [3, -4])
def test_a_position_outside_the_vector_is_refused(bad: int) -> None:
    vector = ChunkedVector(range(3))
    with pytest.raises(IndexError):
        vector[bad]
    with pytest.raises(IndexError):
        vector.replaced({bad: 0})


distinct = st.lists(st.integers(0, 5000), unique=True, max_size=4 * RUN)


@settings(max_examples=60)
@given(distinct, st.data())
def test_changed_equals_a_sorted_list(items: list[int], data: st.DataObject) -> None:
    runs = SortedRuns(items)
    removals = data.draw(st.lists(st.sampled_from(items), unique=True)) if items else []
    kept = set(items) - set(removals)
    insertions = data.draw(
        st.lists(
            st.integers(0, 5000).filter(lambda x: x not in kept), unique=True, max_size=3 * RUN
        )
    )
    expected = sorted(kept | set(insertions))
    after = runs.changed(removals, insertions)
    assert list(after) == expected
    assert len(after) == len(expected)
    assert after == SortedRuns(expected)
    assert list(runs) == sorted(items), "changed() must not change the original"
    low = data.draw(st.integers(-1, 5001))
    assert list(after.ascending_from(low)) == [x for x in expected if x >= low]
    assert list(after.descending_to(low)) == [x for x in reversed(expected) if x >= low]
    assert after.count_from(low) == sum(1 for x in expected if x >= low)
    assert after.first_from(low) == next((x for x in expected if x >= low), None)


def test_removing_what_is_not_there_is_an_error() -> None:
    with pytest.raises(KeyError):
        SortedRuns([1, 2]).changed([3], [])


def test_many_edits_in_one_region_stay_in_order() -> None:
    runs: SortedRuns[int] = SortedRuns()
    expected: list[int] = []
    for start in range(0, 10 * RUN, 7):  # every insert lands at the end: runs must split
        runs = runs.changed([], range(start, start + 7))
        expected.extend(range(start, start + 7))
    assert list(runs) == expected
    runs = runs.changed(range(5 * RUN), [])
    assert list(runs.ascending_from(0)) == expected[5 * RUN :]
    assert list(runs.descending_to(6 * RUN)) == sorted(expected[6 * RUN :], reverse=True)
