"""Every benchmark suite runs in its quickest form from the repository root and writes the
figures it should as JSON.

No time or ratio is judged: the machines are noisy, and printing those is the suites' job.
Each run is a subprocess (`python -m bench NAME --quick --json FILE`), as a person runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.suites import SUITES
from kaiwo_gpu.coordinator import BUILTIN_STRATEGIES

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 90
ALL_TIMEOUT_S = 420  # every suite's quick form: about 35 s on 2 idle cores
# They start etcd, a coordinator and load generators; the first quick test waits for the run
# of every suite, so the module's tests may take longer than the default limit.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(ALL_TIMEOUT_S + 60)]


def bench(*args: str, timeout_s: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`python -m bench --quick --json FILE` once, as the issue asks CI to run it: every
    suite in its quickest form, one document per suite, by name."""
    out = tmp_path_factory.mktemp("bench") / "all.json"
    done = bench("--quick", "--json", str(out), timeout_s=ALL_TIMEOUT_S)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    document = json.loads(out.read_text(encoding="utf-8"))
    assert document["suite"] == "all"
    by_name = {suite["suite"]: suite for suite in document["suites"]}
    assert list(by_name) == list(SUITES), "every suite ran, in order"
    for name in SUITES:
        assert f"== {name}" in done.stdout
    return by_name


def quick_figures(name: str, quick_run: dict[str, Any]) -> Any:
    """The figures of a suite's quick run (Any: the assertions say what they hold)."""
    document = quick_run[name]
    assert document["status"] == 0
    assert document["quick"] is True
    assert document["options"]
    assert document["machine"]["cpus"] > 0
    figures = document["figures"]
    assert figures["total_s"] > 0
    return figures


def rows(figures: Any, key: str) -> Any:
    value = figures[key]
    assert isinstance(value, list)
    assert value, f"no {key} rows"
    assert all(isinstance(row, dict) for row in value)
    return value


def test_help_lists_every_suite() -> None:
    done = bench("--help")
    assert done.returncode == 0, done.stderr
    for name in SUITES:
        assert name in done.stdout


@pytest.mark.parametrize("name", list(SUITES))
def test_each_suite_shows_its_options(name: str) -> None:
    done = bench(name, "--help")
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout
    assert "--json FILE" in done.stdout


def test_an_unknown_suite_is_refused_with_the_names() -> None:
    done = bench("no-such-suite")
    assert done.returncode == 2
    assert "engine" in done.stderr


def test_a_json_file_that_cannot_be_written_is_refused_before_the_run(tmp_path: Path) -> None:
    done = bench("engine", "--quick", "--json", str(tmp_path / "missing" / "out.json"))
    assert done.returncode == 2
    assert "cannot write" in done.stderr
    assert "Traceback" not in done.stderr
    assert "place() per decision" not in done.stdout  # nothing was run


def test_engine_quick(quick_run: dict[str, Any]) -> None:
    figures = quick_figures("engine", quick_run)
    assert figures["baseline"]["count"] > 0
    fills = rows(figures, "fills")
    decisions = rows(figures, "decisions")
    assert all(fill["allocations"] > 0 for fill in fills)
    assert {fill["level"] for fill in fills} == {0.5, 0.99}
    assert all(fill["filled"] <= fill["level"] for fill in fills)
    assert len(decisions) % len(fills) == 0
    for row in decisions:
        assert {"gpus", "fill", "stream", "strategy", "nofit_share"} <= set(row)
        timed = [row[part]["count"] for part in ("placements", "refusals") if row[part]]
        assert sum(timed) > 0
    heavy = [row for row in decisions if row["stream"] == "refusal-heavy" and row["fill"] > 0.9]
    assert heavy, "the refusal-heavy stream runs on the fullest cluster"
    assert all(row["refusals"]["count"] > 0 for row in heavy), "a full cluster must refuse"
    for row in rows(figures, "updates"):
        for part in ("with", "without", "pair"):
            assert row[part]["count"] > 0


def test_packing_quick(quick_run: dict[str, Any]) -> None:
    figures = quick_figures("packing", quick_run)
    assert figures["baseline"]["count"] > 0
    workloads = {row["name"]: row for row in rows(figures, "workloads")}
    assert set(workloads) == {"synthetic", "synthetic-fractional"}
    assert workloads["synthetic-fractional"]["fractional_share"] == 1.0
    strategies = set(BUILTIN_STRATEGIES)
    for protocol in ("arrivals", "departures"):
        found = rows(figures, protocol)
        assert {(row["workload"], row["strategy"]) for row in found} == {
            (workload, strategy) for workload in workloads for strategy in strategies
        }
    for row in figures["arrivals"]:
        bound = workloads[row["workload"]]["bound"]
        assert row["allocated_at_100"] <= row["allocated_at_130"] <= bound["upper"]
        assert row["place_all"]["count"] == row["requests"]
        assert row["update"]["count"] == row["requests"] - row["refused"]
        assert row["curve"]
        assert "p50_over_base" in row
    for row in figures["departures"]:
        assert 0 < row["time_averaged_allocated"] <= row["peak_allocated"] <= 1
        assert row["refused"] >= 0


def test_allocate_quick(quick_run: dict[str, Any]) -> None:
    figures = quick_figures("allocate", quick_run)
    latency = {row["operation"]: row for row in rows(figures, "latency")}
    assert any(name.startswith("KeepAlive") for name in latency)
    for row in latency.values():
        assert {"p50_ms", "p99_ms", "p50_over_txn", "p99_over_txn"} <= set(row)
        assert row["count"] > 0
    throughput = {row["operation"]: row for row in rows(figures, "throughput")}
    assert any(name.startswith("KeepAlive") for name in throughput)
    for row in throughput.values():
        assert {"per_s", "commits", "p50_ms", "p99_ms"} <= set(row)
        assert row["done"] > 0
    keepalive = figures["keepalive"]
    assert keepalive["held"] > 0
    for row in rows(keepalive, "revisions"):
        assert row["renewals"] > 0
        assert isinstance(row["revisions"], int)
        assert row["revisions"] >= 0
        assert "per_renewal" in row
    assert len(rows(figures, "cpu")) == len(latency) + len(throughput)  # one per timed phase
    assert {row["verdict"] for row in rows(figures, "targets")} <= {"PASS", "MISS"}


def test_telemetry_quick(quick_run: dict[str, Any]) -> None:
    figures = quick_figures("telemetry", quick_run)
    registration = figures["registration"]
    steady = figures["steady"]
    baseline = figures["baseline"]
    assert registration["registered"] > 0
    assert steady["batches_ingested"] > 0
    assert {"offered_batches_s", "received_batches_s", "sender_lag", "backlog_batches"} <= set(
        steady
    )
    assert baseline["batches"] > 0
    assert {"parse_check_us", "whole_pure_us", "coordinator_us_per_batch"} <= set(baseline)
    assert [row["phase"] for row in rows(figures, "cpu")] == [
        "registration",
        "steady state",
        "ListNodes, no load",
    ]
    assert isinstance(figures["keeps_up"], bool)


def test_etcd_space_quick(quick_run: dict[str, Any]) -> None:
    figures = quick_figures("etcd-space", quick_run)
    for phase in ("floor", "pairs"):
        assert figures[phase]["count"] > 0
        assert figures[phase]["kept_bytes_per_item"] >= 0
    assert figures["pairs"]["revisions_per_item"] == 2.0  # one Allocate, one Release
    assert set(figures["sizes"]) == {
        "allocation record",
        "request binding",
        "GPU version key",
        "tombstone",
    }
    assert figures["sizes"]["tombstone"]["value"] > 0


def test_tracing_quick(quick_run: dict[str, Any]) -> None:
    figures = quick_figures("tracing", quick_run)
    for mode in ("off", "on"):
        assert figures[mode]["p50_ms"] > 0
        assert figures[mode]["rounds"]
    assert figures["spans_received"] > 0  # tracing on really exported
    assert "overhead_p50_ms" in figures


def test_tls_quick(quick_run: dict[str, Any]) -> None:
    figures = quick_figures("tls", quick_run)
    assert set(figures["transports"]) == {"plaintext", "mTLS"}
    for transport in figures["transports"].values():
        for key in ("allocate_p50_ms", "allocate_p99_ms", "first_reply_p50_ms", "connect_p50_ms"):
            assert transport[key] > 0
        assert transport["allocate"]["count"] > 0
        assert transport["first_reply"]["count"] > 0
        assert transport["throughput"]["done"] > 0
        assert transport["allocations_per_s"] > 0
        assert len(transport["rounds"]) == figures["rounds"]
    ratios = figures["ratios"]  # mTLS / plaintext, by the same keys
    for key in ("allocate_p50_ms", "allocate_p99_ms", "allocations_per_s", "first_reply_p50_ms"):
        assert ratios[key] > 0
    assert "new_connection_extra_ms" in figures


def test_scrape_quick(quick_run: dict[str, Any]) -> None:
    figures = quick_figures("scrape", quick_run)
    assert figures["gpus"] == 160  # 20 nodes x 8
    assert figures["series"] > 5 * figures["gpus"]  # five share series per GPU at least
    assert figures["scraped"]["scrapes"] > 0  # the scraped round really scraped
    for mode in ("quiet", "scraped"):
        assert figures[mode]["p50_ms"] > 0


def test_startup_quick(quick_run: dict[str, Any]) -> None:
    figures = quick_figures("startup", quick_run)
    floor = figures["python: grpc + one health call"]
    assert floor["ratio_to_grpc_floor"] == 1.0
    bare = figures["python -c pass"]
    for row in (version := figures["kaiwo-gpu --version"], floor):
        assert row["median_ms"] > 0
        expected = row["median_ms"] / bare["median_ms"]
        assert row["ratio_to_bare_python"] == pytest.approx(expected, rel=0.05)
    assert version["ratio_to_grpc_floor"] == pytest.approx(
        version["median_ms"] / floor["median_ms"], rel=0.05
    )


def test_all_with_an_unwritable_json_file_is_refused_before_any_suite(tmp_path: Path) -> None:
    done = bench("all", "--quick", "--json", str(tmp_path / "missing" / "all.json"))
    assert done.returncode == 2
    assert "cannot write" in done.stderr
    assert "== engine" not in done.stdout
