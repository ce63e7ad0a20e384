"""Compute-unit sets for cu-mask isolation and their HSA_CU_MASK rendering.

HSA_CU_MASK syntax (ROCm): `GPU_list:CU_list[;GPU_list:CU_list]`, where GPU indices count
after ROCR_VISIBLE_DEVICES reordering, so the n-th granted GPU is index n.
"""

from __future__ import annotations

from collections.abc import Sequence


def choose_compute_units(used_mask: int, total: int, needed: int) -> tuple[int, ...] | None:
    """The `needed` lowest free CU ids, or None when fewer are free."""
    chosen: list[int] = []
    for cu in range(total):
        if not used_mask >> cu & 1:
            chosen.append(cu)
            if len(chosen) == needed:
                return tuple(chosen)
    return None


def format_id_ranges(ids: Sequence[int]) -> str:
    """(0, 1, 2, 5, 7, 8) -> '0-2,5,7-8'."""
    parts: list[str] = []
    ordered = sorted(ids)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def parse_id_ranges(text: str) -> tuple[int, ...]:
    """'0-2,5' -> (0, 1, 2, 5); the inverse of format_id_ranges."""
    ids: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        ids.extend(range(int(low), int(high or low) + 1))
    return tuple(ids)


def render_hsa_cu_mask(compute_units_per_gpu: Sequence[Sequence[int]]) -> str:
    """One CU set per visible GPU, in ROCR_VISIBLE_DEVICES order."""
    return ";".join(
        f"{visible_index}:{format_id_ranges(cus)}"
        for visible_index, cus in enumerate(compute_units_per_gpu)
    )
