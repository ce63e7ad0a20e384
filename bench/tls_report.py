"""The table of the tls suite, and the same figures for `--json`: each transport's pooled
figures side by side, and mutual TLS over plaintext."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from bench.lib import Figures, Stats, print_header
from bench.tls_measure import Samples, pooled


@dataclass(frozen=True, slots=True)
class Summary:
    """One transport's figures, every round together."""

    allocate: Stats
    ready: Stats
    first_reply: Stats
    done: int
    failed: int
    seconds: float
    load_p50_ms: float  # per-call latency under load, median of the rounds
    load_p99_ms: float
    coordinator_cpu_ms: float | None  # per allocation under load
    client_cpu_ms: float | None

    @property
    def per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @staticmethod
    def of(measured: Samples) -> Summary:
        throughputs = measured.throughputs
        done = sum(t.done for t in throughputs)

        def cpu_ms(role: str) -> float | None:
            used = [use.by_role.get(role) for use in measured.cpu]
            if not done or None in used:
                return None
            return sum(u or 0.0 for u in used) * 1000 / done

        return Summary(
            allocate=pooled(measured.allocate_ns),
            ready=pooled(measured.ready_ns),
            first_reply=pooled(measured.first_reply_ns),
            done=done,
            failed=sum(t.failed for t in throughputs),
            seconds=sum(t.seconds for t in throughputs),
            load_p50_ms=statistics.median(t.latency.p50_ms for t in throughputs),
            load_p99_ms=statistics.median(t.latency.p99_ms for t in throughputs),
            coordinator_cpu_ms=cpu_ms("coordinator"),
            client_cpu_ms=cpu_ms("client"),
        )


Row = tuple[str, str, Callable[[Summary], float | None], int]
"""(label, JSON key, value of a summary, decimals)."""


def rows(clients: int) -> list[Row]:
    return [
        ("sequential Allocate p50 ms", "allocate_p50_ms", lambda s: s.allocate.p50_ms, 3),
        ("sequential Allocate p99 ms", "allocate_p99_ms", lambda s: s.allocate.p99_ms, 3),
        (f"Allocate x{clients} clients, per s", "allocations_per_s", lambda s: s.per_s, 0),
        ("  per-call p50 ms under load", "load_p50_ms", lambda s: s.load_p50_ms, 3),
        ("  per-call p99 ms under load", "load_p99_ms", lambda s: s.load_p99_ms, 3),
        ("  coordinator CPU ms per alloc", "coordinator_cpu_ms", lambda s: s.coordinator_cpu_ms, 3),
        ("  client CPU ms per alloc", "client_cpu_ms", lambda s: s.client_cpu_ms, 3),
        ("new connection: ready p50 ms", "connect_p50_ms", lambda s: s.ready.p50_ms, 3),
        ("new connection: ready p99 ms", "connect_p99_ms", lambda s: s.ready.p99_ms, 3),
        (
            "new connection: 1st reply p50 ms",
            "first_reply_p50_ms",
            lambda s: s.first_reply.p50_ms,
            3,
        ),
        (
            "new connection: 1st reply p99 ms",
            "first_reply_p99_ms",
            lambda s: s.first_reply.p99_ms,
            3,
        ),
    ]


def _ratio(over: float | None, under: float | None) -> float | None:
    return over / under if over is not None and under else None


def _cell(value: float | None, decimals: int, width: int) -> str:
    return f"{value:>{width}.{decimals}f}" if value is not None else f"{'?':>{width}}"


def report(names: tuple[str, str], samples: tuple[Samples, Samples], clients: int) -> Figures:
    """Prints the table (plaintext, mTLS, mTLS / plaintext); returns the same figures."""
    plain, secure = Summary.of(samples[0]), Summary.of(samples[1])
    rounds = len(samples[0].allocate_ns)
    print()
    print(
        f"{rounds} rounds pooled; {plain.allocate.count} sequential Allocates, "
        f"{plain.first_reply.count} new connections, {plain.done} + {secure.done} allocations "
        f"under load; per-call under load = median of the rounds"
    )
    ratio_name = f"{names[1]}/{names[0]}"
    print_header(f"{'':<34}{names[0]:>11}{names[1]:>11}{ratio_name:>16}")
    ratios: Figures = {}
    for label, key, value, decimals in rows(clients):
        ratio = _ratio(value(secure), value(plain))
        ratios[key] = ratio
        print(
            f"{label:<34}{_cell(value(plain), decimals, 11)}{_cell(value(secure), decimals, 11)}"
            f"{_cell(ratio, 2, 16)}"
        )
    if plain.failed or secure.failed:
        print(f"failed under load: {names[0]} {plain.failed}, {names[1]} {secure.failed}")
    extra_ms = secure.first_reply.p50_ms - plain.first_reply.p50_ms
    print()
    print(
        f"a new {names[1]} connection costs {extra_ms:+.3f} ms (p50) more than a "
        f"{names[0]} one before its first reply; over a warm connection an Allocate costs "
        f"{secure.allocate.p50_ms - plain.allocate.p50_ms:+.3f} ms (p50)"
    )
    for name, measured in zip(names, samples, strict=True):
        p50s = [Stats.of(one).p50_ms for one in measured.allocate_ns]
        rates = [t.per_s for t in measured.throughputs]
        print(
            f"spread over rounds, {name}: Allocate p50 {min(p50s):.3f}-{max(p50s):.3f} ms, "
            f"{min(rates):.0f}-{max(rates):.0f} allocations/s"
        )
    return {
        "rounds": rounds,
        "clients": clients,
        "transports": {
            name: _figures(summary, measured, clients)
            for name, summary, measured in zip(names, (plain, secure), samples, strict=True)
        },
        "ratios": ratios,
        "new_connection_extra_ms": extra_ms,
    }


def _figures(summary: Summary, measured: Samples, clients: int) -> Figures:
    """The table's column of one transport (by the rows' keys), and what it came from."""
    return {
        **{key: value(summary) for _, key, value, _ in rows(clients)},
        "allocate": summary.allocate.figures("ms"),
        "connect": summary.ready.figures("ms"),
        "first_reply": summary.first_reply.figures("ms"),
        "throughput": {"done": summary.done, "failed": summary.failed, "seconds": summary.seconds},
        "rounds": [
            {
                "allocate_p50_ms": Stats.of(allocate).p50_ms,
                "allocate_p99_ms": Stats.of(allocate).p99_ms,
                "first_reply_p50_ms": Stats.of(first).p50_ms,
                "per_s": throughput.per_s,
            }
            for allocate, first, throughput in zip(
                measured.allocate_ns, measured.first_reply_ns, measured.throughputs, strict=True
            )
        ],
    }
