"""The coordinator's counters and histograms: what happened, counted where it happens.

One `Instruments` per coordinator, its metrics registered nowhere (several coordinators in
one process, as tests run them, must not share series); the exporter (`metrics`) collects
them with the gauges it reads from the view at scrape time. Labels are bounded sets
(outcomes, reasons, RPC names, status codes): never an allocation id or an owner.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram
from prometheus_client.metrics import MetricWrapperBase

from kaiwo_gpu.common.errors import InvalidArgumentError, KaiwoGpuError, NoCapacityError

LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _counter(name: str, documentation: str, labels: Iterable[str] = ()) -> Counter:
    return Counter(name, documentation, tuple(labels), registry=None)


def _histogram(
    name: str,
    documentation: str,
    labels: Iterable[str] = (),
    buckets: tuple[float, ...] = LATENCY_BUCKETS_S,
) -> Histogram:
    return Histogram(name, documentation, tuple(labels), registry=None, buckets=buckets)


@dataclass(frozen=True, slots=True)
class Instruments:
    requests: Counter = field(
        default_factory=lambda: _counter(
            "kaiwo_gpu_requests",
            "Allocate requests answered by this coordinator, by outcome (placed, replayed, "
            "refused, invalid, failed) and, for refusals, the constraint most GPUs failed",
            ("outcome", "reason"),
        )
    )
    releases: Counter = field(
        default_factory=lambda: _counter(
            "kaiwo_gpu_releases", "Release requests by outcome (released, not_found, failed)",
            ("outcome",),
        )
    )  # fmt: skip
    decision_seconds: Histogram = field(
        default_factory=lambda: _histogram(
            "kaiwo_gpu_decision_seconds",
            "Time to decide one batch of requests on the placement snapshot",
        )
    )
    commit_seconds: Histogram = field(
        default_factory=lambda: _histogram(
            "kaiwo_gpu_commit_seconds", "Time of one placement transaction in etcd"
        )
    )
    commit_allocations: Histogram = field(
        default_factory=lambda: _histogram(
            "kaiwo_gpu_commit_allocations",
            "Allocations placed by one committed etcd transaction",
            buckets=BATCH_BUCKETS,
        )
    )
    commit_conflicts: Counter = field(
        default_factory=lambda: _counter(
            "kaiwo_gpu_commit_conflicts",
            "Placement transactions that failed their compare (another writer moved a key) "
            "and were decided again",
        )
    )
    lease_grants: Counter = field(
        default_factory=lambda: _counter(
            "kaiwo_gpu_lease_grants", "etcd leases granted for allocations with a TTL"
        )
    )
    lease_renewals: Counter = field(
        default_factory=lambda: _counter(
            "kaiwo_gpu_lease_renewals", "KeepAlive calls that renewed an allocation's lease"
        )
    )
    grpc_handled: Counter = field(
        default_factory=lambda: _counter(
            "kaiwo_gpu_grpc_server_handled",
            "RPCs completed by the coordinator's gRPC server, by method and status code",
            ("grpc_service", "grpc_method", "grpc_code"),
        )
    )
    grpc_seconds: Histogram = field(
        default_factory=lambda: _histogram(
            "kaiwo_gpu_grpc_server_handling_seconds",
            "Time the coordinator took to answer a unary RPC, by method",
            ("grpc_service", "grpc_method"),
        )
    )

    def collectors(self) -> tuple[MetricWrapperBase, ...]:
        return tuple(getattr(self, name) for name in self.__dataclass_fields__)


def request_outcome(error: KaiwoGpuError | None, replayed: bool = False) -> tuple[str, str]:
    """(outcome, reason) of one Allocate: placed or replayed; refused, with the constraint
    most GPUs failed; invalid; or failed, with the status it answered."""
    if error is None:
        return ("replayed" if replayed else "placed"), ""
    if isinstance(error, NoCapacityError):
        reason = max(error.reasons, key=lambda pair: pair[1])[0] if error.reasons else ""
        return "refused", reason
    if isinstance(error, InvalidArgumentError):
        return "invalid", ""
    return "failed", error.status_code.lower()
