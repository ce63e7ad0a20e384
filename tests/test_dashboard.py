"""The Grafana dashboard (deploy/grafana/kaiwo-gpu.json) queries only what the project exports.

Every panel, rows' nested ones included, has a query; the panels cover the topics an operator
looks for; every PromQL expression parses (Debian's `promtool`, after Grafana's variables
are given placeholder values); and every series and label it names is one the coordinator or
the agent exports, read off their own collectors, so a typo in the dashboard, or a metric
renamed in the code, fails here rather than on a blank panel.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client.core import Metric

from kaiwo_gpu.agent.metrics import AgentMetrics
from kaiwo_gpu.agent.sampler import NodeSampler
from kaiwo_gpu.agent.simulated import SimulatedBackend
from kaiwo_gpu.agent.uplink_state import UplinkStatus
from kaiwo_gpu.common.gpu_metrics import GAUGES, LABELS
from kaiwo_gpu.coordinator.instruments import Instruments
from kaiwo_gpu.coordinator.metrics import CoordinatorCollector, Sources
from kaiwo_gpu.coordinator.state.changes import Store
from kaiwo_gpu.coordinator.state.keys import KeyLayout
from kaiwo_gpu.coordinator.state.view import ClusterView
from kaiwo_gpu.v1 import agent_pb2

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "kaiwo-gpu.json"
DATASOURCE = "${datasource}"
BUILTIN_INTERVALS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
SCRAPE_LABELS = frozenset({"job", "instance"})  # what Prometheus adds to every series

TOPICS = {
    # a panel whose title has the first, and whose queries name the second
    "share allocated vs capacity": "kaiwo_gpu_node_capacity_millis",
    "vram allocated vs capacity": "kaiwo_gpu_node_memory_bytes",
    "allocations by isolation": "kaiwo_gpu_allocations{",
    "allocated share per node": "kaiwo_gpu_node_allocated_millis",
    "gfx activity per node": "gpu_gfx_activity",
    "allocated share per gpu": "kaiwo_gpu_gpu_allocated_millis",
    "gfx activity per gpu": "gpu_gfx_activity",
    "per gpu: allocated share vs gfx activity": "gpu_gfx_activity",
    "refusals by reason": 'outcome="refused"',
    "requests by outcome": "kaiwo_gpu_requests_total",
    "releases by outcome": "kaiwo_gpu_releases_total",
    "allocate latency": 'grpc_method="Allocate"',
    "commit latency": "kaiwo_gpu_commit_seconds_bucket",
    "decision latency": "kaiwo_gpu_decision_seconds_bucket",
    "commit conflicts": "kaiwo_gpu_commit_conflicts_total",
    "unhealthy gpus": "gpu_health",
    "agents connected": "kaiwo_gpu_agents_connected",
    "telemetry age": "kaiwo_gpu_node_telemetry_age_seconds",
    "etcd watch up": "kaiwo_gpu_etcd_watch_up",
    "etcd space warning": "kaiwo_gpu_etcd_space_warning",
    "placement blocked": "kaiwo_gpu_placement_blocked",
}

STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(?:=~|!~|!=|=)\s*""')  # on strings emptied
REGEX_MATCHER = re.compile(r'(=~|!~)(\s*)"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
RANGE = re.compile(r"\[[^\]]*\]")
IDENTIFIER = re.compile(r"(?<![\w.])([a-zA-Z_:][\w:]*)\b(\s*\()?")
LABEL_WRITER = re.compile(r"\blabel_(?:replace|join)\s*\(")
DESTINATION = re.compile(r'\s*,\s*"(\w+)"')
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})


@dataclass(frozen=True, slots=True)
class Query:
    panel: str
    ref: str
    expr: str


def load() -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(DASHBOARD.read_text()))


def walk(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels a collapsed row holds included."""
    for panel in panels:
        yield panel
        yield from walk(panel.get("panels", ()))


def graphs(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in walk(dashboard["panels"]) if panel["type"] != "row"]


def queries(dashboard: dict[str, Any]) -> list[Query]:
    return [
        Query(panel["title"], target["refId"], target["expr"])
        for panel in graphs(dashboard)
        for target in panel.get("targets", ())
    ]


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in dashboard["templating"]["list"]}


def variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def placeholders(expr: str, defined: Iterable[str]) -> str:
    """`expr` as Prometheus gets it with every multi-value variable on All: `$node`,
    `${node}` or `${node:regex}` inside a regex matcher becomes `.*` (its All value), and
    Grafana's interval variables a duration. A variable anywhere else is left as it is: in
    PromQL it does not parse, and `test_every_variable_is_defined_and_in_a_regex` finds it
    in a string."""
    known = set(defined)

    def in_regex(match: re.Match[str]) -> str:
        value = VARIABLE.sub(lambda var: ".*" if (var[1] or var[2]) in known else var[0], match[3])
        return f'{match[1]}{match[2]}"{value}"'

    expr = REGEX_MATCHER.sub(in_regex, expr)
    return VARIABLE.sub(lambda var: BUILTIN_INTERVALS.get(var[1] or var[2], var[0]), expr)


# --- what the project exports -----------------------------------------------------------


def _series(family: Metric, labels: Iterable[str]) -> dict[str, frozenset[str]]:
    """The series names a family is exposed under, each with its label names."""
    label_names = frozenset(labels)
    if family.type == "counter":
        return {f"{family.name}_total": label_names}
    if family.type == "histogram":
        return {
            f"{family.name}_bucket": label_names | {"le"},
            f"{family.name}_sum": label_names,
            f"{family.name}_count": label_names,
        }
    return {family.name: label_names}


def exported() -> dict[str, frozenset[str]]:
    """Every series the coordinator and the agent expose, with its label names, from their
    collectors (an empty view and agent: each family is yielded even without samples)."""
    series: dict[str, frozenset[str]] = {}
    instruments = Instruments()
    for instrument in instruments.collectors():
        (family,) = instrument.describe()
        series |= _series(family, instrument._labelnames)
    # A scrape never touches the store: an object without methods proves it.
    view = ClusterView(cast(Store, object()), KeyLayout())
    coordinator = CoordinatorCollector(Sources(view, lambda: (), lambda: ""), instruments)
    sampler = NodeSampler(SimulatedBackend("n1", "MI300X", 1), ())
    sampler.last_batch = agent_pb2.TelemetryBatch(sampled_at=Timestamp(seconds=1))
    agent = AgentMetrics("n1", (), sampler, UplinkStatus())
    for family in coordinator.collect():
        for name, labels in _series(family, getattr(family, "_labelnames", ())).items():
            series.setdefault(name, labels)
    for text in [*coordinator.families(), *agent.families()]:  # gauges, written as text
        series.setdefault(text.name, frozenset(text.labels))
    for gauge in GAUGES:
        assert series.get(gauge.name) == frozenset(LABELS), gauge.name
    return series


@dataclass(frozen=True, slots=True)
class Names:
    metrics: set[str]
    selectors: list[tuple[str, set[str]]]  # a selector's metric and the labels it matches
    grouped: set[str]  # labels in by, without, on, ignoring, group_left, group_right
    made: set[str]  # labels label_replace or label_join write


def _destination(expr: str, call: re.Match[str]) -> str:
    """The label a label_replace or label_join call writes: its second argument, the string
    after the comma that ends its first (a vector, which may hold strings and calls)."""
    emptied = STRING.sub(lambda string: "_" * len(string[0]), expr)  # offsets kept
    depth = 0
    for at in range(call.end(), len(expr)):
        depth += {"(": 1, ")": -1}.get(emptied[at], 0)
        if depth < 0:
            break  # the call ended with one argument
        if depth == 0 and emptied[at] == ",":
            written = DESTINATION.match(expr, at)
            return written[1] if written else ""
    return ""


def names(expr: str) -> Names:
    """The series and labels an expression names (a lexical reading, enough for ours)."""
    made = {label for call in LABEL_WRITER.finditer(expr) if (label := _destination(expr, call))}
    rest = STRING.sub('""', expr)  # a string may hold anything: braces, "by (", a name
    selectors = [
        (metric, set(MATCHER.findall(matchers))) for metric, matchers in SELECTOR.findall(rest)
    ]
    rest = SELECTOR.sub(lambda match: match[1], rest)
    grouped = {
        label.strip() for labels in GROUPING.findall(rest) for label in labels.split(",")
    } - {""}
    rest = RANGE.sub("", GROUPING.sub("", rest))
    metrics = {
        identifier
        for identifier, call in IDENTIFIER.findall(rest)
        if not call and identifier not in KEYWORDS
    }
    return Names(metrics, selectors, grouped, made)


# --- the dashboard ------------------------------------------------------------------------


def test_the_dashboard_is_an_importable_grafana_dashboard() -> None:
    dashboard = load()
    assert dashboard["uid"] == "kaiwo-gpu"
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["id"] is None  # import assigns one
    every = list(walk(dashboard["panels"]))
    ids = [panel["id"] for panel in every]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in every:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE, panel["title"]
    assert any(panel["type"] == "row" and panel["panels"] for panel in every), (
        "no collapsed row: the walk over nested panels is not exercised"
    )


def test_its_variables_choose_the_datasource_job_and_node() -> None:
    found = variables(load())
    assert found["datasource"]["type"] == "datasource"
    assert found["datasource"]["query"] == "prometheus"
    node = found["node"]
    assert re.fullmatch(
        r'label_values\(kaiwo_gpu_node_capacity_millis(\{job=~"\$job"\})?, node\)',
        variable_query(node),
    )
    assert re.fullmatch(r"label_values\(kaiwo_gpu_\w+, job\)", variable_query(found["job"]))
    for variable in (node, found["job"]):
        assert variable["datasource"]["uid"] == DATASOURCE
        assert variable["multi"]
        assert variable["includeAll"]
        assert variable["allValue"] == ".*"  # so `=~"$node"` matches every node on All


def test_every_panel_has_a_query() -> None:
    for panel in graphs(load()):
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no query"
        refs = [target["refId"] for target in targets]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in targets:
            assert target["expr"].strip(), f"panel {panel['title']!r} has an empty query"


def test_the_panels_cover_every_topic() -> None:
    dashboard = load()
    by_title: dict[str, list[str]] = {}
    for query in queries(dashboard):
        by_title.setdefault(query.panel.casefold(), []).append(query.expr)
    for topic, metric in TOPICS.items():
        panels = {title: exprs for title, exprs in by_title.items() if topic in title}
        assert panels, f"no panel is titled for {topic!r}"
        assert any(metric in expr for exprs in panels.values() for expr in exprs), (
            f"the panels for {topic!r} ({sorted(panels)}) do not query {metric}"
        )


def test_every_variable_is_defined_and_in_a_regex() -> None:
    """A multi-value variable expands to `(a|b)`: it belongs in a `=~` or `!~` matcher."""
    dashboard = load()
    defined = set(variables(dashboard))
    uses = [(query.panel, query.expr) for query in queries(dashboard)]
    uses += [(f"variable {name}", variable_query(v)) for name, v in variables(dashboard).items()]
    for where, expr in uses:
        for match in VARIABLE.finditer(expr):
            name = match[1] or match[2]
            if name.isdigit():
                continue  # label_replace's $1: a regex group, which Grafana leaves alone
            assert name in defined | set(BUILTIN_INTERVALS), f"{where}: ${name} is not defined"
        left = {var[1] or var[2] for var in VARIABLE.finditer(placeholders(expr, defined))}
        assert not left & defined, f"{where}: {sorted(left & defined)} outside a regex, in {expr}"


def test_every_series_and_label_it_queries_is_one_the_project_exports() -> None:
    dashboard = load()
    series = exported()
    exprs = [(query.panel, query.expr) for query in queries(dashboard)]
    for name, variable in variables(dashboard).items():
        if variable["type"] == "query":
            values = re.fullmatch(r"label_values\((.*), (\w+)\)", variable_query(variable))
            assert values, f"variable {name}: not label_values(SERIES, LABEL)"
            exprs.append((f"variable {name}", values[1]))
            for metric in names(values[1]).metrics & set(series):
                assert values[2] in series[metric] | SCRAPE_LABELS, f"variable {name}"
    used: set[str] = set()
    for panel, expr in exprs:
        found = names(expr)
        unknown = found.metrics - set(series)
        assert not unknown, f"{panel}: {sorted(unknown)} is not exported, in {expr}"
        used |= found.metrics
        labels = set(SCRAPE_LABELS) | found.made
        for metric in found.metrics:
            labels |= series[metric]
        for metric, matched in found.selectors:
            stray = matched - series[metric] - SCRAPE_LABELS
            assert not stray, f"{panel}: {metric} has no label {sorted(stray)}, in {expr}"
        stray = found.grouped - labels
        assert not stray, f"{panel}: no series here has label {sorted(stray)}, in {expr}"
    # Nothing the README promises an operator is missing from the dashboard.
    assert {
        "kaiwo_gpu_node_allocated_millis",
        "kaiwo_gpu_gpu_allocated_millis",
        "kaiwo_gpu_requests_total",
        "kaiwo_gpu_commit_seconds_bucket",
        "kaiwo_gpu_decision_seconds_bucket",
        "kaiwo_gpu_grpc_server_handling_seconds_bucket",
        "kaiwo_gpu_commit_conflicts_total",
        "kaiwo_gpu_agents_connected",
        "kaiwo_gpu_node_telemetry_age_seconds",
        "kaiwo_gpu_etcd_watch_up",
        "kaiwo_gpu_etcd_space_warning",
        "kaiwo_gpu_placement_blocked",
        "gpu_gfx_activity",
        "gpu_health",
    } <= used


def test_the_name_reader_finds_a_typo_and_a_wrong_label() -> None:
    """The lexical reading above is what stands between a typo and a blank panel."""
    found = names(
        'sum by (hostname) (rate(kaiwo_gpu_request_total{node=~"$node", x="a{b}"}[5m])) '
        '/ on (node) max by (node) (label_replace(gpu_health, "node", "$1", "hostname", '
        '"(.*)")) > bool 0.5'
    )
    assert found.metrics == {"kaiwo_gpu_request_total", "gpu_health"}
    assert found.selectors == [("kaiwo_gpu_request_total", {"node", "x"})]
    assert found.grouped == {"hostname", "node"}
    assert found.made == {"node"}
    assert "kaiwo_gpu_request_total" not in exported()
    assert placeholders('a{node=~"$node|${job:regex}"}[$__rate_interval]', ["node", "job"]) == (
        'a{node=~".*|.*"}[5m]'
    )


@pytest.mark.integration
def test_every_expression_parses(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("Debian's prometheus is not installed (`.ci/run` installs it)")
    dashboard = load()
    defined = list(variables(dashboard))
    found = queries(dashboard)
    found += [
        Query(f"variable {name}", "query", values[1])
        for name, variable in variables(dashboard).items()
        if (values := re.fullmatch(r"label_values\((.*), \w+\)", variable_query(variable)))
    ]
    rules = [
        {"record": f"dashboard:expr_{index}", "expr": placeholders(query.expr, defined)}
        for index, query in enumerate(found)
    ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    listing = "\n".join(
        f"dashboard:expr_{index}: {query.panel} ({query.ref}): {rule['expr']}"
        for index, (query, rule) in enumerate(zip(found, rules, strict=True))
    )
    assert checked.returncode == 0, f"{checked.stdout}{checked.stderr}\n{listing}"
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout, checked.stdout
