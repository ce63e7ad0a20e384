"""The index agrees with a brute-force reading of the GPUs it was built from."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kaiwo_gpu.coordinator.placement.capacity_index import CapacityIndex, IndexEntry
from kaiwo_gpu.coordinator.placement.persistent import CHUNK

entries = st.lists(
    st.none()
    | st.builds(IndexEntry, st.integers(1, 1000), st.integers(-5, 5000), st.integers(0, 3000)),
    max_size=40,
)


def brute_first(items: list[IndexEntry | None], start: int, wanted: int) -> int:
    for pos in range(start, len(items)):
        item = items[pos]
        if item is not None and item.free_millis >= wanted:
            return pos
    return -1


@given(entries, st.integers(0, 45), st.integers(0, 1001))
def test_first_at_least_matches_a_scan(
    items: list[IndexEntry | None], start: int, wanted: int
) -> None:
    index = CapacityIndex.build(items)
    assert index.first_at_least(start, wanted) == brute_first(items, start, wanted)


@given(entries, st.integers(0, 1001))
def test_free_orders_hold_every_gpu_with_enough_share(
    items: list[IndexEntry | None], wanted: int
) -> None:
    index = CapacityIndex.build(items)
    expected = {p for p, e in enumerate(items) if e is not None and e.free_millis >= wanted}
    ascending = list(index.ascending_free(wanted))
    descending = list(index.descending_free(wanted))
    assert set(ascending) == expected
    assert ascending == list(reversed(descending))
    keys = [(items[p].free_millis, items[p].free_memory_mib) for p in ascending]  # type: ignore[union-attr]
    assert keys == sorted(keys)
    loads = [items[p].load for p in index.ascending_load()]  # type: ignore[union-attr]
    assert loads == sorted(loads)


@given(entries, st.data())
def test_updated_equals_rebuilt(items: list[IndexEntry | None], data: st.DataObject) -> None:
    if not items:
        return
    index = CapacityIndex.build(items)
    changes = data.draw(
        st.dictionaries(
            st.integers(0, len(items) - 1),
            st.none()
            | st.builds(IndexEntry, st.integers(1, 1000), st.integers(0, 100), st.integers(0, 9)),
        )
    )
    after = list(items)
    for pos, entry in changes.items():
        after[pos] = entry
    updated = index.updated(changes)
    rebuilt = CapacityIndex.build(after)
    assert updated == rebuilt
    assert index == CapacityIndex.build(items), "updated() must not change the original"


many_entries = st.lists(
    st.none() | st.builds(IndexEntry, st.sampled_from([1, 250, 999, 1000]), st.just(0), st.just(0)),
    max_size=3 * CHUNK + 5,
)


@given(
    many_entries,
    st.integers(0, 3 * CHUNK + 9),
    st.integers(0, 3 * CHUNK + 9),
    st.sampled_from([0, 1, 250, 999, 1000]),
)
def test_canonical_order_matches_a_scan(
    items: list[IndexEntry | None], start: int, stop: int, wanted: int
) -> None:
    index = CapacityIndex.build(items)
    expected = [
        pos
        for pos in range(start, min(stop, len(items)))
        if (item := items[pos]) is not None and item.free_millis >= wanted
    ]
    assert list(index.canonical_at_least(start, stop, wanted)) == expected
