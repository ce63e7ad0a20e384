"""Large gauge families written straight to Prometheus's exposition text.

prometheus-client builds a Sample per series and checks and escapes each of its labels when
it writes it: about 11 us a series, 1.3 s for the 90,000 series of a 2,000-node cluster, all
of it on the coordinator's one interpreter (`python -m bench scrape`). Gauges that share
their labels row by row (a GPU's share series, its AMD gauges, a node's totals) are written
here a row at a time: the label set is escaped once and every gauge of the row reuses it.
Gauge lines read the same in the text format 0.0.4 and in OpenMetrics 1.0, so
`metrics_http` serves them in either, after what the library writes for everything else.
Pure: rows in, text out.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.utils import floatToGoString

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def escaped(value: str) -> str:
    """A label value as both formats escape it: backslash, quote, newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def number(value: float) -> str:
    """A sample's value: an integer as it is, a float as Prometheus's Go client writes it."""
    if isinstance(value, bool):  # an int to Python, "True" to a parser
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return str(floatToGoString(value))  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class Gauge:
    name: str
    documentation: str


@dataclass(frozen=True, slots=True)
class Family:
    """One family's text: its name (for `name[]` selection), its label names and its lines."""

    name: str
    labels: tuple[str, ...]
    text: str


class GaugeRows:
    """Gauge families over one label set, filled a row (one value per gauge) at a time."""

    def __init__(self, labels: Sequence[str], gauges: Sequence[Gauge]) -> None:
        for label in labels:
            if not _LABEL.fullmatch(label):
                raise ValueError(f"not a label name: {label!r}")
        for gauge in gauges:
            if not _NAME.fullmatch(gauge.name):
                raise ValueError(f"not a metric name: {gauge.name!r}")
            if any(c in gauge.documentation for c in '\\"\n'):  # the formats escape them apart
                raise ValueError(f"{gauge.name}: help text with a backslash, quote or newline")
        self._labels = tuple(labels)
        self._gauges = tuple(gauges)
        self._lines: tuple[list[str], ...] = tuple([] for _ in gauges)

    def add(self, labels: Sequence[str], values: Sequence[float | None]) -> None:
        """One row: its label values, and a value per gauge (None: no series for it)."""
        if len(labels) != len(self._labels) or len(values) != len(self._gauges):
            raise ValueError(
                f"a row has {len(self._labels)} labels and {len(self._gauges)} values; "
                f"got {len(labels)} and {len(values)}"
            )
        pairs = ",".join(
            f'{name}="{escaped(value)}"' for name, value in zip(self._labels, labels, strict=True)
        )
        head = f"{{{pairs}}} " if pairs else " "
        for lines, value in zip(self._lines, values, strict=True):
            if value is not None:
                lines.append(head + number(value))

    def families(self) -> Iterator[Family]:
        for gauge, lines in zip(self._gauges, self._lines, strict=True):
            header = f"# HELP {gauge.name} {gauge.documentation}\n# TYPE {gauge.name} gauge\n"
            body = "".join(f"{gauge.name}{line}\n" for line in lines)
            yield Family(gauge.name, self._labels, header + body)


def single(gauge: Gauge, value: float) -> Family:
    """A gauge without labels and its one value."""
    rows = GaugeRows((), [gauge])
    rows.add((), (value,))
    (family,) = rows.families()
    return family
