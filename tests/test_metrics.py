"""/metrics of the coordinator and the agent: scraped over HTTP, and by a real Prometheus.

What is counted must move with what happens (an allocation raises the allocated share, its
release lowers it; refusals count by reason), the GPU gauges carry AMD's exporter names and
labels, and no long-lived series is labelled by an allocation id or an owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import math
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from kaiwo_gpu.agent.metrics import AgentMetrics
from kaiwo_gpu.agent.uplink_state import UplinkStatus
from kaiwo_gpu.common import metrics_http
from kaiwo_gpu.common.errors import InvalidArgumentError, NoCapacityError, UnavailableError
from kaiwo_gpu.common.gpu_metrics import GAUGES, GpuMetricFamilies
from kaiwo_gpu.common.metrics_text import Family, Gauge, GaugeRows, single
from kaiwo_gpu.coordinator import metrics as coordinator_metrics
from kaiwo_gpu.coordinator.instruments import request_outcome
from kaiwo_gpu.coordinator.local.etcd import LocalEtcd, free_port
from kaiwo_gpu.coordinator.state.view_state import ViewState
from kaiwo_gpu.v1 import agent_pb2, allocation_pb2, types_pb2
from tests.agents import agents_running, eventually
from tests.conftest import coordinator_running
from tests.harness import request, status_of

FAST = {"node_ttl_s": 2, "sample_interval_ms": 200}
AMD_NAMES = {
    "gpu_gfx_activity",
    "gpu_umc_activity",
    "gpu_used_vram",
    "gpu_total_vram",
    "gpu_free_vram",
    "gpu_junction_temperature",
    "gpu_edge_temperature",
    "gpu_memory_temperature",
    "gpu_package_power",
    "gpu_power_usage",
    "gpu_ecc_correct_total",
    "gpu_ecc_uncorrect_total",
    "gpu_health",
}


# --- pure ---------------------------------------------------------------------------------


def test_a_gpu_row_becomes_amd_named_gauges_and_what_it_lacks_is_left_out() -> None:
    row = types_pb2.GpuStatus(
        inventory=types_pb2.GpuInventory(
            uuid="u0", index=3, model="MI300X", vram_mib=196_608, compute_partition="CPX"
        ),
        health=types_pb2.HEALTH_UNHEALTHY,
        telemetry=types_pb2.GpuTelemetry(gfx_activity_percent=87, used_vram_mib=1024),
    )
    families = GpuMetricFamilies()
    families.add("node-7", row)
    families.node("node-7", 8)  # its GPU count, whether each GPU was sampled or not
    samples = {
        family.name: family.samples for family in parsed(families.families()) if family.samples
    }
    assert {gauge.name for gauge in GAUGES} >= AMD_NAMES
    assert set(samples) == {
        "gpu_gfx_activity",
        "gpu_used_vram",
        "gpu_total_vram",
        "gpu_free_vram",
        "gpu_health",
        "gpu_nodes_total",
    }  # no temperature, power or ECC reading: no series, rather than a false 0
    labels = {
        "gpu_id": "3",
        "gpu_uuid": "u0",
        "card_model": "MI300X",
        "gpu_compute_partition_type": "cpx",
        "gpu_memory_partition_type": "",
        "hostname": "node-7",
    }
    assert [(s.labels, s.value) for s in samples["gpu_gfx_activity"]] == [(labels, 87.0)]
    assert samples["gpu_free_vram"][0].value == 196_608 - 1024
    assert samples["gpu_health"][0].value == 0.0
    assert [(s.labels, s.value) for s in samples["gpu_nodes_total"]] == [
        ({"hostname": "node-7"}, 8.0)
    ]


def parsed(families: Iterable[Family]) -> list[Metric]:
    """Families written as text, read back by prometheus-client's parser."""
    return list(text_string_to_metric_families("".join(family.text for family in families)))


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.text(), min_size=1, max_size=3), number=st.floats() | st.integers())
def test_gauge_rows_read_back_as_written_in_both_formats(
    values: list[str], number: float | int
) -> None:
    """Any label value (quotes, backslashes, newlines, any unicode) and any value, NaN and
    the infinities included, read back the same through both of prometheus-client's
    parsers; OpenMetrics's is strict about escaping and the end marker."""
    labels = [f"l{i}" for i in range(len(values))]
    rows = GaugeRows(labels, [Gauge("g_one", "one gauge"), Gauge("g_two", "another")])
    rows.add(values, (number, None))
    text = "".join(family.text for family in rows.families())
    for read in (
        list(text_string_to_metric_families(text)),
        list(openmetrics_families(text + "# EOF\n")),  # type: ignore[no-untyped-call]
    ):
        one, two = read
        assert (one.name, one.type, two.name, two.samples) == ("g_one", "gauge", "g_two", [])
        (sample,) = one.samples
        assert sample.labels == dict(zip(labels, values, strict=True))
        assert math.isnan(sample.value) if math.isnan(number) else sample.value == number


def test_a_help_text_the_formats_would_escape_differently_is_refused() -> None:
    with pytest.raises(ValueError, match="quote"):
        GaugeRows((), [Gauge("g", 'says "hi"')])
    with pytest.raises(ValueError, match="label name"):
        GaugeRows(("bad-label",), [Gauge("g", "fine")])


@pytest.mark.parametrize(
    ("error", "replayed", "outcome"),
    [
        (None, False, ("placed", "")),
        (None, True, ("replayed", "")),
        (
            NoCapacityError("full", [("memory", 3), ("unhealthy", 5)]),
            False,
            ("refused", "unhealthy"),
        ),
        (InvalidArgumentError("fraction", 2, "0.1-1"), False, ("invalid", "")),
        (UnavailableError("etcd down"), False, ("failed", "unavailable")),
    ],
)
def test_a_request_outcome_is_one_of_a_few_labels(
    error: Exception | None, replayed: bool, outcome: tuple[str, str]
) -> None:
    assert request_outcome(error, replayed) == outcome  # type: ignore[arg-type]


# --- over HTTP ----------------------------------------------------------------------------


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of a /metrics page, by sample name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    matching = [v for have, v in samples.get(name, []) if labels.items() <= have.items()]
    assert matching, f"no {name} with {labels}"
    return sum(matching)


@pytest.mark.integration
async def test_the_coordinator_counts_what_it_answers_and_shows_the_share_it_holds(
    etcd: LocalEtcd, prefix: str, inventory: Path
) -> None:
    async with coordinator_running(
        etcd.endpoint, prefix, inventory, metrics_listen="127.0.0.1:0", **FAST
    ) as running:
        port = running.coordinator.metrics.port
        before = await asyncio.to_thread(scrape, port)
        assert value(before, "kaiwo_gpu_node_capacity_millis", node="node-a") == 4000
        assert value(before, "kaiwo_gpu_node_allocated_millis", node="node-a") == 0
        made = await running.api.Allocate(
            request("m1", fraction_millis=500, selector=types_pb2.Selector(nodes=["node-a"]))
        )
        await running.api.Allocate(
            request("m1", fraction_millis=500, selector=made.allocation.request.selector)
        )
        code, _ = await status_of(
            running.api.Allocate(request("m2", fraction_millis=1000, count=8))
        )
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED  # no node has 8 GPUs
        code, _ = await status_of(running.api.Allocate(request("m3", fraction_millis=5000)))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        held = await asyncio.to_thread(scrape, port)
        assert value(held, "kaiwo_gpu_node_allocated_millis", node="node-a") == 500
        assert value(held, "kaiwo_gpu_gpu_allocated_millis", node="node-a") == 500
        assert value(held, "kaiwo_gpu_requests_total", outcome="placed") == 1
        assert value(held, "kaiwo_gpu_requests_total", outcome="replayed") == 1
        assert value(held, "kaiwo_gpu_requests_total", outcome="refused") == 1
        assert value(held, "kaiwo_gpu_requests_total", outcome="invalid") == 1
        invalid = value(held, "kaiwo_gpu_grpc_server_handled_total", grpc_code="INVALID_ARGUMENT")
        assert invalid == 1
        assert (
            value(
                held,
                "kaiwo_gpu_grpc_server_handled_total",
                grpc_method="Allocate",
                grpc_code="OK",
            )
            == 2
        )
        assert value(held, "kaiwo_gpu_allocations") == 1
        assert value(held, "kaiwo_gpu_commit_allocations_count") == 1
        await running.api.Release(allocation_pb2.ReleaseRequest(allocation_id=made.allocation.id))
        released = await asyncio.to_thread(scrape, port)
        assert value(released, "kaiwo_gpu_node_allocated_millis", node="node-a") == 0
        assert value(released, "kaiwo_gpu_releases_total", outcome="released") == 1
        assert value(released, "kaiwo_gpu_allocations_removed_total", reason="released") == 1
        everything = json.dumps(released)
        assert made.allocation.id not in everything  # no allocation id as a label
        assert "owner" not in everything


@pytest.mark.integration
async def test_an_agent_exports_its_gpus_under_amds_names_and_so_does_its_coordinator(
    etcd: LocalEtcd, prefix: str
) -> None:
    async with (
        coordinator_running(
            etcd.endpoint, prefix, None, metrics_listen="127.0.0.1:0", **FAST
        ) as running,
        agents_running(running.target, ["amd-0"], gpus=2) as (agent,),
    ):
        agent_port = agent.metrics.start("127.0.0.1:0")

        async def sampled() -> dict[str, list[tuple[dict[str, str], float]]] | None:
            # The agent samples from its start; it connects a moment later (CI caught the gap).
            found = await asyncio.to_thread(scrape, agent_port)
            connected = sum(v for _, v in found.get("kaiwo_gpu_agent_connected", []))
            return found if len(found.get("gpu_health", [])) == 2 and connected == 1 else None

        from_agent = await eventually(sampled)
        assert set(from_agent) >= AMD_NAMES
        assert {labels["gpu_id"] for labels, _ in from_agent["gpu_total_vram"]} == {"0", "1"}
        assert {labels["hostname"] for labels, _ in from_agent["gpu_total_vram"]} == {"amd-0"}

        async def reexported() -> dict[str, list[tuple[dict[str, str], float]]] | None:
            found = await asyncio.to_thread(scrape, running.coordinator.metrics.port)
            return found if len(found.get("gpu_health", [])) == 2 else None

        from_coordinator = await eventually(reexported)
        assert set(from_coordinator) >= AMD_NAMES
        assert value(from_coordinator, "kaiwo_gpu_agents_connected") == 1
        assert value(from_coordinator, "kaiwo_gpu_node_telemetry_age_seconds", node="amd-0") < 10


def fetched(port: int, query: str = "", headers: dict[str, str] | None = None) -> str:
    """A /metrics page as text, unzipped when it came zipped."""
    url = f"http://127.0.0.1:{port}/metrics{query}"
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as reply:
        body = reply.read()
        zipped = reply.headers.get("Content-Encoding") == "gzip"
    return (gzip.decompress(body) if zipped else body).decode()


def samples_of(families: Iterable[Metric]) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    return {
        (sample.name, tuple(sorted(sample.labels.items())), sample.value)
        for family in families
        for sample in family.samples
    }


@pytest.mark.integration
async def test_a_scrape_reads_the_same_as_openmetrics_zipped_as_plain_text(
    etcd: LocalEtcd, prefix: str, inventory: Path
) -> None:
    """The view's gauges are written as text after what prometheus-client writes: they must
    land before OpenMetrics's end marker, be zipped with the rest, and follow `name[]`."""
    async with coordinator_running(
        etcd.endpoint, prefix, inventory, metrics_listen="127.0.0.1:0"
    ) as running:
        port = running.coordinator.metrics.port
        await running.api.Allocate(request("formats", fraction_millis=500))
        plain = await asyncio.to_thread(fetched, port)
        openmetrics = await asyncio.to_thread(
            fetched,
            port,
            "",
            {
                "Accept": "application/openmetrics-text;version=1.0.0",
                "Accept-Encoding": "gzip",
            },
        )
        assert openmetrics.endswith("# EOF\n")
        assert openmetrics.count("# EOF") == 1
        assert "# EOF" not in plain
        from_plain = samples_of(text_string_to_metric_families(plain))
        from_openmetrics = samples_of(openmetrics_families(openmetrics))  # type: ignore[no-untyped-call]  # strict
        assert from_plain == from_openmetrics
        names = {name for name, _, _ in from_plain}
        assert {"kaiwo_gpu_gpu_allocated_millis", "kaiwo_gpu_requests_total"} <= names
        held = [v for name, _, v in from_plain if name == "kaiwo_gpu_node_allocated_millis"]
        assert sum(held) == 500
        # An isolation nothing uses is a 0, not a missing series (review finding).
        assert ("kaiwo_gpu_allocations", (("isolation", "partition"),), 0) in from_plain

        chosen = await asyncio.to_thread(
            fetched, port, "?name[]=kaiwo_gpu_node_allocated_millis&name[]=kaiwo_gpu_requests_total"
        )
        assert {name for name, _, _ in samples_of(text_string_to_metric_families(chosen))} == {
            "kaiwo_gpu_node_allocated_millis",
            "kaiwo_gpu_requests_total",
        }


@pytest.mark.integration
async def test_a_taken_metrics_port_stops_the_coordinator_with_the_reason(
    etcd: LocalEtcd, prefix: str
) -> None:
    async with coordinator_running(
        etcd.endpoint, prefix, None, metrics_listen="127.0.0.1:0"
    ) as first:
        taken = f"127.0.0.1:{first.coordinator.metrics.port}"
        with pytest.raises(UnavailableError, match=f"cannot serve metrics on {taken}"):
            async with coordinator_running(etcd.endpoint, prefix, None, metrics_listen=taken):
                pass


# --- a real Prometheus ------------------------------------------------------------------


@dataclass
class Prometheus:
    port: int

    def query(self, expression: str) -> list[dict[str, object]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expression}
        )
        with urllib.request.urlopen(url, timeout=10) as reply:
            answer = json.loads(reply.read())
        assert answer["status"] == "success", answer
        return answer["data"]["result"]  # type: ignore[no-any-return]


@contextlib.contextmanager
def prometheus_scraping(tmp_path: Path, targets: dict[str, list[str]]) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Debian's prometheus is not installed (`.ci/run` installs it)")
    config = tmp_path / "prometheus.yml"
    jobs = [
        {"job_name": job, "scrape_interval": "1s", "static_configs": [{"targets": addresses}]}
        for job, addresses in targets.items()
    ]
    config.write_text(json.dumps({"global": {"scrape_interval": "1s"}, "scrape_configs": jobs}))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield Prometheus(port)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()


@contextlib.asynccontextmanager
async def ready(prometheus: Prometheus) -> AsyncIterator[Prometheus]:
    async def up() -> bool | None:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{prometheus.port}/-/ready", timeout=2
            ) as reply:
                return True if reply.status == 200 else None
        except OSError:
            return None

    await eventually(up, timeout_s=60)
    yield prometheus


@pytest.mark.integration
async def test_a_real_prometheus_sees_the_share_rise_and_fall_and_every_gpu(
    etcd: LocalEtcd, prefix: str, tmp_path: Path
) -> None:
    async with (
        coordinator_running(
            etcd.endpoint, prefix, None, metrics_listen="127.0.0.1:0", **FAST
        ) as running,
        agents_running(running.target, ["prom-0", "prom-1"], gpus=2) as agents,
    ):
        agent_ports = [agent.metrics.start("127.0.0.1:0") for agent in agents]
        targets = {
            "coordinator": [f"127.0.0.1:{running.coordinator.metrics.port}"],
            "agent": [f"127.0.0.1:{port}" for port in agent_ports],
        }
        with prometheus_scraping(tmp_path, targets) as started:
            async with ready(started) as prometheus:
                allocated = 'sum(kaiwo_gpu_node_allocated_millis{job="coordinator"})'

                async def share(wanted: float) -> bool | None:
                    found = await asyncio.to_thread(prometheus.query, allocated)
                    have = float(found[0]["value"][1]) if found else None  # type: ignore[index]
                    return True if have == wanted else None

                async def every_gpu() -> bool | None:
                    found = await asyncio.to_thread(
                        prometheus.query, 'count(gpu_health{job="agent"} == 1)'
                    )
                    return True if found and found[0]["value"][1] == "4" else None  # type: ignore[index]

                await eventually(lambda: share(0), timeout_s=30)
                await eventually(every_gpu, timeout_s=30)
                for name in sorted(AMD_NAMES):
                    found = await asyncio.to_thread(
                        prometheus.query, f'count({name}{{job="agent"}})'
                    )
                    assert found, f"Prometheus has no {name}"
                    assert found[0]["value"][1] == "4", (name, found)  # type: ignore[index]
                made = await running.api.Allocate(request("prom", fraction_millis=750))
                await eventually(lambda: share(750), timeout_s=30)
                await running.api.Release(
                    allocation_pb2.ReleaseRequest(allocation_id=made.allocation.id)
                )
                await eventually(lambda: share(0), timeout_s=30)


@pytest.mark.integration
async def test_a_scrape_reads_the_view_on_the_event_loop_not_on_its_http_thread(
    etcd: LocalEtcd, prefix: str, inventory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: a scrape that found a snapshot rebuild due rebuilt it on the HTTP
    thread while the loop applied etcd changes, which were then lost (a coordinator kept
    2,000 millis allocated where etcd held 100). The view is read on its own loop now."""
    rebuilt_on: list[str] = []
    rebuild = ViewState._rebuild

    def recorded(state: ViewState) -> None:
        rebuilt_on.append(threading.current_thread().name)
        rebuild(state)

    monkeypatch.setattr(ViewState, "_rebuild", recorded)
    async with coordinator_running(
        etcd.endpoint, prefix, inventory, metrics_listen="127.0.0.1:0"
    ) as running:
        state = running.coordinator.view.state
        state._rebuild_due = True  # as a node that just registered leaves it
        rebuilt_on.clear()
        found = await asyncio.to_thread(scrape, running.coordinator.metrics.port)
        assert value(found, "kaiwo_gpu_node_capacity_millis", node="node-a") == 4000
        assert rebuilt_on == [threading.main_thread().name]  # the loop's thread, once


@pytest.mark.integration
async def test_a_scrape_the_loop_cannot_answer_is_a_503_and_is_not_read_later(
    etcd: LocalEtcd, prefix: str, inventory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: with the loop stuck, each scrape that gave up was a bare 500 with a
    traceback, and its reading still ran on the loop once it came back."""
    monkeypatch.setattr(coordinator_metrics, "SCRAPE_TIMEOUT_S", 0.3)
    async with coordinator_running(
        etcd.endpoint, prefix, inventory, metrics_listen="127.0.0.1:0"
    ) as running:
        collector = running.coordinator._collector
        readings: list[str] = []
        reading = collector._reading

        def counted() -> coordinator_metrics.ScrapeView:
            readings.append("read")
            return reading()

        monkeypatch.setattr(collector, "_reading", counted)
        answers: list[object] = []

        def scraping() -> None:
            try:
                fetched(running.coordinator.metrics.port)
            except urllib.error.HTTPError as error:
                answers.append((error.code, error.read().decode()))

        scraper = threading.Thread(target=scraping)
        scraper.start()
        time.sleep(1.5)  # the loop stuck: this test runs on it
        await asyncio.to_thread(scraper.join, 10)
        await asyncio.sleep(0.2)  # a reading left queued would run now
        assert answers == [(503, "the coordinator's event loop did not answer in 0.3 s\n")]
        assert readings == []
        found = await asyncio.to_thread(scrape, running.coordinator.metrics.port)
        assert value(found, "kaiwo_gpu_node_capacity_millis", node="node-a") == 4000
        assert readings == ["read"]


def test_a_connection_that_stalls_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding: a scraper that never finished its request, or never read the
    answer, held a thread (and the answer, 20 MB on 2,000 nodes) for as long as it stayed
    connected. The handler's socket now times out."""
    monkeypatch.setattr(metrics_http._QuietHandler, "timeout", 0.5)
    server = metrics_http.MetricsServer()
    port = server.start("127.0.0.1:0")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:
            stalled.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
            started = time.monotonic()
            assert stalled.recv(1024) == b""  # closed by the server, not by our 10 s
            assert time.monotonic() - started < 8
    finally:
        server.stop()


def test_a_bool_is_written_as_a_number() -> None:
    (family,) = parsed([single(Gauge("g", "a flag"), True)])  # review nit: it read "True"
    assert family.samples[0].value == 1


@pytest.mark.parametrize("zone", ["Asia/Tokyo", "America/Los_Angeles"])
def test_the_agents_sample_age_is_right_in_any_time_zone(
    zone: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: the sample's UTC stamp was read as local time: 32,400 s old in Tokyo
    for a fresh sample, 0 s forever west of UTC."""
    stamp = Timestamp()
    stamp.GetCurrentTime()
    stamp.seconds -= 30  # sampled 30 s ago
    sampler = SimpleNamespace(last_batch=agent_pb2.TelemetryBatch(sampled_at=stamp))
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        metrics = AgentMetrics("n", [], sampler, UplinkStatus())  # type: ignore[arg-type]
        (age,) = [m for m in parsed(metrics.families()) if m.name.endswith("sample_age_seconds")]
        assert 29 <= age.samples[0].value <= 60
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
