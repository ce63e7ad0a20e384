"""The registry of benchmark suites: a name, the module that holds the suite, one line on it.

A suite's module is imported only when that suite runs or shows its help, so `python -m bench
--help` stays fast and one suite's imports cannot break another. A new suite is a module
that exports `SUITE` (a `SuiteSpec`) and one line in `SUITES`.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # bench.lib starts processes and imports grpc; listing suites needs neither
    from bench.lib import Outcome


@dataclass(frozen=True, slots=True)
class SuiteSpec:
    """What a suite module exports as `SUITE`.

    `quick` maps option names (argparse dests) to the values `--quick` uses instead of the
    defaults; an option given on the command line overrides either.
    """

    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Outcome]
    quick: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Suite:
    name: str
    module: str
    summary: str

    def load(self) -> SuiteSpec:
        spec = getattr(importlib.import_module(self.module), "SUITE", None)
        if not isinstance(spec, SuiteSpec):
            raise TypeError(f"{self.module} exports no SUITE (a bench.suites.SuiteSpec)")
        return spec


SUITES: Mapping[str, Suite] = {
    suite.name: suite
    for suite in (
        Suite("engine", "bench.engine", "decision time of the pure strategy engine"),
        Suite("packing", "bench.packing", "GPU capacity each strategy packs, against bounds"),
        Suite(
            "allocate",
            "bench.allocate",
            "Allocate and KeepAlive round trip and throughput against a bare etcd txn",
        ),
        Suite("telemetry", "bench.telemetry", "telemetry ingestion of one coordinator process"),
        Suite("tracing", "bench.tracing", "what tracing costs an Allocate: off against on"),
        Suite(
            "tls",
            "bench.tls",
            "Allocate and a new connection over mutual TLS against plaintext, with the ratios",
        ),
        Suite(
            "scrape",
            "bench.scrape",
            "a /metrics scrape of a full cluster, and Allocate while it is scraped",
        ),
        Suite(
            "startup",
            "bench.startup",
            "start-up time of kaiwo-gpu commands against bare python and a bare gRPC call",
        ),
        Suite(
            "reclaim",
            "bench.reclaim",
            "capacity back after 100,000 allocations' holders vanish: session leases against own",
        ),
        Suite(
            "etcd-space",
            "bench.etcd_space",
            "etcd bytes an allocate+release pair leaves, against bare puts of its keys",
        ),
    )
}
