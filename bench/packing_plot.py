"""The packing benchmark's plot: share of GPU capacity allocated against share requested, a
line per strategy and a panel per workload, with the offline bounds as marks.

matplotlib is imported only here and only when a plot is asked for (the `bench` extra).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Panel:
    """One workload: a curve of (requested, allocated) shares per strategy, and its bounds."""

    workload: str
    curves: Mapping[str, Sequence[tuple[float, float]]]
    requested: float  # where the bounds were computed
    achievable: float
    upper: float


def write_plot(path: Path, panels: Sequence[Panel]) -> None:
    """Writes a PNG of the panels side by side to `path`."""
    import matplotlib  # noqa: PLC0415  (an optional extra, loaded only to plot)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axes = plt.subplots(
        1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 5), squeeze=False
    )
    for axis, panel in zip(axes[0], panels, strict=False):
        for strategy, curve in panel.curves.items():
            axis.plot([r for r, _ in curve], [a for _, a in curve], label=strategy, linewidth=1.2)
        top = max([panel.requested, *(r for curve in panel.curves.values() for r, _ in curve)])
        axis.plot([0, 1, top], [0, 1, 1], color="grey", linestyle=":", label="min(requested, 1)")
        axis.plot([panel.requested], [panel.achievable], "k^", label="offline packing")
        axis.plot([panel.requested], [panel.upper], "kv", label="upper bound")
        axis.set_title(panel.workload)
        axis.set_xlabel("share of GPU capacity requested")
        axis.set_ylabel("share of GPU capacity allocated")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small", loc="lower right")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
