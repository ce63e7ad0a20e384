"""docker-compose.yml, the multi-node harness, checked without a Docker engine: against the
Compose specification's JSON schema (vendored in tests/data/compose-spec), every kaiwo-gpu
command through the CLI's own parser, and the topology the design asks for (three etcd
members that agree on one cluster, two coordinators naming all three, three agents spread
over both, each service started once what it needs is healthy), loopback-only ports,
Prometheus' targets and the files it names; then its default services are run here as
processes on loopback, configured as the file configures them."""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import ipaddress
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema  # type: ignore[import-untyped]  # no types-jsonschema in the dev extra
import pytest
import yaml

from kaiwo_gpu.agent.simulated import simulated_uuid
from kaiwo_gpu.client import Client
from kaiwo_gpu.coordinator.local.etcd import find_etcd, free_port
from kaiwo_gpu.coordinator.state.inventory import load_inventory
from kaiwo_gpu.coordinator.transport import check_plaintext
from tests.deployments import (
    OWN_PREFIXES,
    PROJECT,
    REPO,
    check_command,
    clean_environment,
    pinned,
    port_of,
)
from tests.test_dockerfiles import (
    CLI,
    installed_requirements,
    parse_dockerfile,
    probe,
    requirement_name,
)
from tests.test_metrics import scrape, value

COMPOSE = REPO / "docker-compose.yml"
SPEC = REPO / "tests/data/compose-spec"
LOOPBACK = "127.0.0.1"
OBSERVABILITY = "observability"
INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?::-([^}]*))?\}|\$")
"""What docker-compose.yml uses of Compose's interpolation: $$, ${VAR} and ${VAR:-default};
the bare `$` alternative catches any other form, which the test then refuses."""

Service = dict[str, Any]


def interpolated(value: object, environment: Mapping[str, str]) -> Any:
    """The file as Compose reads it with `environment` as the shell's: ${VAR:-default}
    (the default when VAR is unset or empty), ${VAR} and $$; any other form fails here
    rather than being read with a meaning Compose does not give it."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            if match[0] == "$$":
                return "$"
            if match[1] is None:
                raise AssertionError(f"an interpolation the test does not read in {value!r}")
            if match[2] is None:
                return environment.get(match[1], "")
            return environment.get(match[1]) or match[2]

        return INTERPOLATION.sub(substitute, value)
    if isinstance(value, dict):
        return {key: interpolated(item, environment) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolated(item, environment) for item in value]
    return value


def test_interpolation_reads_what_the_file_uses_and_refuses_the_rest() -> None:
    shell = {"SET": "x", "EMPTY": ""}
    assert interpolated("${SET:-d} ${EMPTY:-d} ${UNSET:-d}", shell) == "x d d"
    assert interpolated(["${SET}", "${UNSET}", "$$SET"], shell) == ["x", "", "$SET"]
    for other in ("${SET-d}", "$SET", "${SET:?gone}", "${SET:+on}", "cost: $"):
        with pytest.raises(AssertionError, match="does not read"):
            interpolated({"key": other}, shell)


@functools.cache
def _document(environment: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    result = interpolated(loaded, dict(environment))
    assert isinstance(result, dict)
    return result


def compose(environment: Mapping[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml, anchors merged and variables filled from `environment` (none by
    default: what a plain `docker compose up` sees); a copy of its own for each caller."""
    return copy.deepcopy(_document(tuple(sorted((environment or {}).items()))))


def services() -> dict[str, Service]:
    found = compose()["services"]
    assert isinstance(found, dict)
    return found


def environment_of(service: Service) -> dict[str, str]:
    value = service.get("environment") or {}
    if isinstance(value, list):
        value = dict(item.partition("=")[::2] for item in value)
    return {str(k): "" if v is None else str(v) for k, v in value.items()}


def image_stage(service: Service) -> Any:
    build = service["build"]
    dockerfile = parse_dockerfile(build["dockerfile"])
    return dockerfile.stages[build["target"]] if "target" in build else dockerfile.final


def kaiwo_services() -> dict[str, Service]:
    """The services that run the kaiwo-gpu image (the ones compose builds)."""
    return {name: s for name, s in services().items() if "build" in s}


def command_of(service: Service) -> list[str]:
    stage = image_stage(service)
    entrypoint = service.get("entrypoint") or stage.last("ENTRYPOINT").exec_form()
    assert entrypoint == [CLI], f"runs {entrypoint}, not the kaiwo-gpu CLI"
    command = service.get("command") or stage.last("CMD").exec_form()
    assert isinstance(command, list), "command in shell form: give a list"
    return [str(part) for part in command]


@functools.cache
def parsed(name: str) -> argparse.Namespace:
    """A service's command as the CLI parses it inside its container: the image's
    environment, then the service's."""
    service = kaiwo_services()[name]
    environment = {**image_stage(service).environment(), **environment_of(service)}
    return check_command(command_of(service), environment)


def role(role_name: str) -> dict[str, argparse.Namespace]:
    return {
        name: parsed(name)
        for name, service in kaiwo_services().items()
        if command_of(service)[0] == role_name
    }


def test_the_vendored_schema_is_the_one_its_source_note_names() -> None:
    digest = hashlib.sha256((SPEC / "compose-spec.json").read_bytes()).hexdigest()
    assert digest in (SPEC / "SOURCE.md").read_text()
    assert "Apache License" in (SPEC / "LICENSE").read_text()


def test_the_file_follows_the_compose_specification() -> None:
    schema = json.loads((SPEC / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(compose())
    ]
    assert not errors, "\n".join(errors)


def test_the_schema_check_catches_a_misspelt_key() -> None:
    schema = json.loads((SPEC / "compose-spec.json").read_text())
    broken = compose()
    broken["services"]["coordinator-a"]["depend_on"] = ["etcd-0"]
    assert not jsonschema.Draft7Validator(schema).is_valid(broken)


def test_every_image_is_a_pinned_release() -> None:
    for name, service in services().items():
        if "image" in service:
            assert pinned(service["image"]), f"{name}: {service['image']}"


def test_every_kaiwo_gpu_command_parses_with_the_cli_parser() -> None:
    names = kaiwo_services()
    assert {command_of(s)[0] for s in names.values()} == {"coordinator", "agent"}
    for name in names:
        parsed(name)  # fails the test, naming the service's command, on a refused flag


def test_every_kaiwo_gpu_variable_is_one_its_command_reads() -> None:
    """A misspelt KAIWO_GPU_* variable is otherwise ignored without a word (check_command,
    through parsed(), holds the rule; a misspelt one shows that it can fail)."""
    names = kaiwo_services()
    assert names
    for name, service in names.items():
        assert parsed(name).command == command_of(service)[0], name
        environment = {**image_stage(service).environment(), **environment_of(service)}
        misspelt = {**environment, "KAIWO_GPU_LISTN": "0.0.0.0:1"}
        with pytest.raises(AssertionError, match="never reads"):
            check_command(command_of(service), misspelt)


def image_name(service: Service) -> str:
    """The name of a service's image, without registry, path or tag ("" when it builds)."""
    return str(service.get("image", "")).rpartition("/")[2].partition(":")[0]


def is_etcd(service: Service) -> bool:
    return image_name(service) == "etcd"


def etcd_members() -> dict[str, dict[str, str]]:
    """Each etcd member's settings by flag name: its ETCD_* environment, then its flags."""
    members: dict[str, dict[str, str]] = {}
    for name, service in services().items():
        if not is_etcd(service):
            continue
        settings = {
            k.removeprefix("ETCD_").lower().replace("_", "-"): v
            for k, v in environment_of(service).items()
            if k.startswith("ETCD_")
        }
        for flag in service.get("command") or []:
            key, _, value = flag.removeprefix("--").partition("=")
            if flag.startswith("--"):
                settings[key] = value
        members[name] = settings
    return members


def address_of(name: str) -> str:
    """A service's fixed IPv4 address on its network."""
    networks = services()[name].get("networks")
    assert isinstance(networks, dict), f"{name} has no fixed address"
    (config,) = networks.values()
    return str(config["ipv4_address"])


def test_there_are_three_etcd_members_two_coordinators_and_three_agents() -> None:
    assert len(etcd_members()) == 3
    assert len(role("coordinator")) == 2
    assert len(role("agent")) == 3


def test_the_etcd_members_agree_on_one_cluster() -> None:
    members = etcd_members()
    clusters = {settings["initial-cluster"] for settings in members.values()}
    assert len(clusters) == 1, f"the members disagree on --initial-cluster: {clusters}"
    (cluster,) = clusters
    peers = dict(entry.split("=", 1) for entry in cluster.split(","))
    names = {settings["name"]: service for service, settings in members.items()}
    assert len(names) == len(members), "two members share a --name"
    assert set(peers) == set(names), f"--initial-cluster names {set(peers)}, not {set(names)}"
    assert len({s["initial-cluster-token"] for s in members.values()}) == 1
    subnets = [
        ipaddress.ip_network(block["subnet"])
        for network in compose()["networks"].values()
        for block in network["ipam"]["config"]
    ]
    volumes = []
    for service, settings in members.items():
        where = f"{service} ({settings['name']})"
        assert settings["initial-cluster-state"] == "new", where
        address = address_of(service)
        assert any(ipaddress.ip_address(address) in subnet for subnet in subnets), where
        peer = urlsplit(settings["initial-advertise-peer-urls"])
        assert peers[settings["name"]] == settings["initial-advertise-peer-urls"], where
        assert peer.hostname == address, f"{where} advertises {peer.hostname}, is {address}"
        client = urlsplit(settings["advertise-client-urls"])
        assert client.hostname == address, where
        assert urlsplit(settings["listen-peer-urls"]).port == peer.port, where
        assert urlsplit(settings["listen-client-urls"]).port == client.port, where
        (volume,) = [v for v in services()[service]["volumes"] if v.endswith(settings["data-dir"])]
        volumes.append(volume.split(":")[0])
    assert len(set(volumes)) == len(volumes), "two members share a data volume"


def test_every_coordinator_names_every_etcd_member() -> None:
    members = etcd_members()
    clients = {urlsplit(s["advertise-client-urls"]).netloc for s in members.values()}
    for name, args in role("coordinator").items():
        assert set(args.etcd) == clients, f"{name} names {args.etcd}, not {clients}"
        check_plaintext(args.listen, args.insecure)  # a coordinator that would refuse to start


def depends_on(service: Service) -> dict[str, str]:
    """A service's dependencies and the condition each is waited for, either syntax."""
    value = service.get("depends_on") or {}
    if isinstance(value, list):
        return {str(name): "service_started" for name in value}
    return {
        str(name): str(spec.get("condition", "service_started")) for name, spec in value.items()
    }


def has_health_check(service: Service) -> bool:
    """Whether Docker probes the service: its own healthcheck, else its image's HEALTHCHECK
    (only the images compose builds can be read here)."""
    check = service.get("healthcheck")
    if check is not None:
        return not check.get("disable") and check.get("test") not in (["NONE"], "NONE")
    if "build" not in service:
        return False
    found = image_stage(service).last("HEALTHCHECK")
    return found is not None and found.arguments.split()[0].upper() != "NONE"


def test_every_service_waits_until_what_it_needs_is_healthy() -> None:
    """The coordinators start once every etcd member answers, the agents once both
    coordinators serve (an agent whose first choice is not up yet settles on the other);
    `docker compose up` fails when it is told to wait for a service nothing probes."""
    for name, service in services().items():
        for dependency, condition in depends_on(service).items():
            if condition == "service_healthy":
                assert has_health_check(services()[dependency]), (
                    f"{name} waits for {dependency} to be healthy; nothing checks it"
                )
    healthy = "service_healthy"
    for name in role("coordinator"):
        wanted = dict.fromkeys(etcd_members(), healthy)
        assert depends_on(services()[name]) == wanted, name
    for name in role("agent"):
        wanted = dict.fromkeys(role("coordinator"), healthy)
        assert depends_on(services()[name]) == wanted, name


def test_a_dependency_nothing_probes_is_caught() -> None:
    assert depends_on({"depends_on": ["a"]}) == {"a": "service_started"}
    assert not has_health_check({"image": "prom/prometheus:v2.53.0"})
    assert not has_health_check({"healthcheck": {"test": ["NONE"]}})
    coordinator = copy.deepcopy(kaiwo_services()["coordinator-a"])
    assert has_health_check(coordinator)
    coordinator["build"]["target"] = "runtime"  # the CLI image: no HEALTHCHECK
    assert not has_health_check(coordinator)


def test_the_agents_spread_over_both_coordinators() -> None:
    coordinators = {name: port_of(args.listen) for name, args in role("coordinator").items()}
    first: set[str] = set()
    for name, args in role("agent").items():
        hosts = []
        for address in args.coordinator:
            host, _, port = address.rpartition(":")
            assert host in coordinators, f"{name} dials {address}: no such coordinator"
            assert int(port) == coordinators[host], f"{name} dials {address}: not its port"
            hosts.append(host)
        assert set(hosts) == set(coordinators), f"{name} cannot fail over to every coordinator"
        first.add(hosts[0])
    assert first == set(coordinators), f"the agents all start on {first}"


def test_no_container_can_take_a_fixed_address() -> None:
    """Docker gives a container without a fixed address any free one of its network's
    ip_range (the whole subnet when none is set): one that starts first could take an etcd
    member's address, and the member would not start."""
    fixed = [
        (name, str(network), ipaddress.ip_address(config["ipv4_address"]))
        for name, service in services().items()
        if isinstance(service.get("networks"), dict)
        for network, config in service["networks"].items()
        if config and "ipv4_address" in config
    ]
    assert len(fixed) >= 3, "the etcd members have no fixed addresses"
    assert len({address for *_, address in fixed}) == len(fixed), "two share an address"
    for name, network, address in fixed:
        blocks = compose()["networks"][network]["ipam"]["config"]
        inside = [b for b in blocks if address in ipaddress.ip_network(b["subnet"])]
        assert len(inside) == 1, f"{name}'s {address} is in no subnet of {network}"
        (block,) = inside
        handed_out = ipaddress.ip_network(block.get("ip_range", block["subnet"]))
        assert address not in handed_out, f"{name}'s {address} is in {handed_out}"


def host_file(service: Service, target: str) -> Path:
    """The file of the host that a service sees at `target` (a config or a bind mount)."""
    declared = compose().get("configs", {})
    for config in service.get("configs", []):
        if isinstance(config, dict) and config.get("target") == target:
            return REPO / str(declared[config["source"]]["file"])
    for volume in service.get("volumes", []):
        source, _, rest = str(volume).partition(":")
        if rest.partition(":")[0] == target and source.startswith((".", "/")):
            return REPO / source
    raise AssertionError(f"nothing is mounted at {target}")


def inventory_file() -> Path:
    """The file of the host that every coordinator reads its static inventory from."""
    inventories = {
        host_file(kaiwo_services()[name], args.inventory)
        for name, args in role("coordinator").items()
    }
    assert len(inventories) == 1, f"the coordinators read different inventories: {inventories}"
    return inventories.pop()


def test_the_agents_do_not_claim_the_inventorys_nodes() -> None:
    """An agent may not register a node of the static inventory, nor a GPU it holds."""
    static = load_inventory(inventory_file())
    static_nodes = {node.name for node in static}
    static_gpus = {gpu.inventory.uuid for node in static for gpu in node.gpus}
    agents = role("agent")
    assert len({args.node for args in agents.values()}) == len(agents), "two agents share a node"
    for name, args in agents.items():
        assert args.node not in static_nodes, f"{name}'s node {args.node} is in the inventory"
        gpus = {simulated_uuid(args.node, index) for index in range(args.gpus)}
        assert not gpus & static_gpus, f"{name} simulates GPUs the inventory lists"


def published(service: Service) -> list[tuple[str, int]]:
    """(host address, container port) of each published port, short or long syntax."""
    ports = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.append((str(port.get("host_ip", "")), int(port["target"])))
            continue
        parts = str(port).split("/")[0].rsplit(":", 2)
        host = parts[0] if len(parts) == 3 else ""
        ports.append((host, int(parts[-1])))
    return ports


def test_published_ports_bind_to_loopback_only() -> None:
    for name, service in services().items():
        assert service.get("network_mode") != "host", name
        for host, port in published(service):
            assert host == LOOPBACK, f"{name} publishes {port} on {host or 'every address'}"
    for name, args in {**role("coordinator"), **role("agent")}.items():
        listening = {port_of(a) for a in (getattr(args, "listen", ""), args.metrics_listen) if a}
        for _, port in published(kaiwo_services()[name]):
            assert port in listening, f"{name} publishes {port}, which nothing serves"


def test_a_published_port_on_every_address_is_caught() -> None:
    assert published({"ports": ["50051:50051", "127.0.0.1:1:2/tcp", {"target": 3}]}) == [
        ("", 50051),
        (LOOPBACK, 2),
        ("", 3),
    ]


def metrics_targets() -> set[str]:
    return {
        f"{name}:{port_of(args.metrics_listen)}"
        for name, args in {**role("coordinator"), **role("agent")}.items()
        if args.metrics_listen
    }


def prometheus_config() -> Path:
    (service,) = [s for s in services().values() if "prometheus" in s.get("image", "")]
    (flag,) = [f for f in service["command"] if f.startswith("--config.file=")]
    return host_file(service, flag.partition("=")[2])


def scrape_targets() -> list[tuple[str, str]]:
    """(job name, `host:port`) of every target Prometheus' config lists."""
    config = yaml.safe_load(prometheus_config().read_text())
    return [
        (str(job["job_name"]), str(target))
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ]


def test_prometheus_scrapes_every_metrics_port() -> None:
    targets = [target for _, target in scrape_targets()]
    assert metrics_targets(), "no service serves /metrics"
    assert len(set(targets)) == len(targets), "a target is scraped twice"
    assert set(targets) == metrics_targets()


@pytest.mark.integration
def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: prometheus)")
    checked = subprocess.run(
        [promtool, "check", "config", str(prometheus_config())],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_traces_go_to_the_collector_only_when_asked_for() -> None:
    (collector,) = [
        n for n, s in services().items() if "opentelemetry-collector" in s.get("image", "")
    ]
    service = services()[collector]
    (flag,) = [f for f in service["command"] if f.startswith("--config=")]
    config = yaml.safe_load(host_file(service, flag.partition("=")[2]).read_text())
    port = port_of(config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])
    assert "otlp" in config["service"]["pipelines"]["traces"]["receivers"]
    asked = compose({"OTEL_TRACES_EXPORTER": "otlp"})["services"]
    for name, kaiwo in kaiwo_services().items():
        dockerfile = parse_dockerfile(kaiwo["build"]["dockerfile"])
        exporter = set(map(requirement_name, PROJECT["optional-dependencies"]["otel"]))
        assert exporter <= installed_requirements(dockerfile), f"{name}'s image cannot export"
        environment = environment_of(kaiwo)
        assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://{collector}:{port}", name
        assert environment["OTEL_TRACES_EXPORTER"] == "none", f"{name} traces by default"
        assert environment_of(asked[name])["OTEL_TRACES_EXPORTER"] == "otlp", name


def test_the_observability_profile_is_optional() -> None:
    optional = {n for n, s in services().items() if OBSERVABILITY in s.get("profiles", [])}
    tools = {n for n, s in services().items() if "build" not in s and not is_etcd(s)}
    assert len(tools) == 2, f"Prometheus and a collector, not {tools}"
    assert tools == optional, f"{tools - optional} run without --profile {OBSERVABILITY}"
    for name, service in services().items():
        if name not in optional:
            assert not set(depends_on(service)) & optional, f"{name} needs {optional}"


def test_every_name_and_file_the_compose_file_refers_to_exists() -> None:
    document = compose()
    declared_volumes = set(document.get("volumes", {}))
    declared_networks = set(document.get("networks", {}))
    declared_configs = document.get("configs", {})
    for config in declared_configs.values():
        assert (REPO / config["file"]).is_file(), config["file"]
    for name, service in services().items():
        build = service.get("build")
        if build is not None:
            context = REPO / build["context"]
            assert (context / build["dockerfile"]).is_file(), name
            dockerfile = parse_dockerfile(str(PurePosixPath(build["context"], build["dockerfile"])))
            assert build.get("target", dockerfile.final.name) in dockerfile.stages, name
        for dependency in depends_on(service):
            assert dependency in services(), f"{name} depends on {dependency}"
        for network in service.get("networks", []):
            assert network in declared_networks, f"{name} joins {network}"
        for config in service.get("configs", []):
            source = config["source"] if isinstance(config, dict) else config
            assert source in declared_configs, f"{name} reads config {source}"
        for volume in service.get("volumes", []):
            source = str(volume).partition(":")[0]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name} mounts {source}"
            else:
                assert source in declared_volumes, f"{name} mounts volume {source}"


class Harness:
    """docker-compose.yml's default services as processes on this machine: every address
    the file names (a service's name or fixed address, or 0.0.0.0 in its own settings, with
    a port) becomes 127.0.0.1 and a free port of its own."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ports: dict[tuple[str, int], int] = {}
        self.hosts = {name: name for name in services()}
        for name, service in services().items():
            if isinstance(service.get("networks"), dict):
                self.hosts[address_of(name)] = name
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def port(self, service: str, port: int) -> int:
        if (service, port) not in self.ports:
            taken = set(self.ports.values())
            fresh = (p for p in (free_port() for _ in range(100)) if p not in taken)
            self.ports[service, port] = next(fresh)
        return self.ports[service, port]

    def local(self, service: str, text: str) -> str:
        def replace(match: re.Match[str]) -> str:
            owner = service if match[1] == "0.0.0.0" else self.hosts.get(match[1])
            if owner is None:
                return match[0]
            return f"{LOOPBACK}:{self.port(owner, int(match[2]))}"

        return re.sub(r"([\w.-]+):(\d+)", replace, text)

    def start(self, name: str) -> None:
        service = services()[name]
        if "build" in service:
            environment = {**image_stage(service).environment(), **environment_of(service)}
            argv = [sys.executable, "-m", "kaiwo_gpu.cli.main", *command_of(service)]
        else:
            environment = environment_of(service)
            argv = [find_etcd(), *service["command"][1:]]
        own = {k: self.local(name, v) for k, v in environment.items() if k.startswith(OWN_PREFIXES)}
        if "ETCD_DATA_DIR" in own:
            own["ETCD_DATA_DIR"] = str(self.directory / name)
        if "KAIWO_GPU_INVENTORY" in own:
            own["KAIWO_GPU_INVENTORY"] = str(host_file(service, own["KAIWO_GPU_INVENTORY"]))
        with (self.directory / f"{name}.log").open("wb") as log:
            self.processes[name] = subprocess.Popen(
                argv, env={**clean_environment(), **own}, stdout=log, stderr=log, cwd=REPO
            )

    def logs(self) -> str:
        return "\n".join(
            f"== {log.name}\n{log.read_text()[-3000:]}" for log in self.directory.glob("*.log")
        )

    def stop(self) -> None:
        for process in reversed(self.processes.values()):
            process.terminate()
        for process in reversed(self.processes.values()):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for(what: str, ready: Callable[[], bool], harness: Harness, timeout_s: float = 60) -> None:
    """Poll until `ready`; fail at once when a service has exited (a flag or a setting
    it refused), else after `timeout_s`, with every service's log."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        exited = [name for name, process in harness.processes.items() if process.poll() is not None]
        if exited:
            pytest.fail(f"{what}: {', '.join(exited)} exited\n{harness.logs()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} after {timeout_s:g}s\n{harness.logs()}")
        time.sleep(0.3)


def fetch(port: int, path: str) -> str:
    """What an HTTP GET on loopback answers ("" when nothing does)."""
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}", timeout=5) as answer:
            return str(answer.read().decode())
    except OSError:
        return ""


def etcd_is_healthy(port: int) -> bool:
    return '"true"' in fetch(port, "/health")


def probe_passes(stage: Any, port: int) -> bool:
    return probe(stage, port).returncode == 0


def holds_agents(metrics_port: int, count: int) -> bool:
    try:
        samples = scrape(metrics_port)
    except OSError:  # not serving yet
        return False
    connected = "kaiwo_gpu_agents_connected"
    return connected in samples and value(samples, connected) == count


@pytest.mark.integration
def test_the_harness_runs_without_docker(tmp_path: Path) -> None:
    """The default services started here as the compose file configures them (addresses
    moved to loopback): the etcd members form one cluster from their ETCD_* settings, both
    coordinators serve over all three members, as the image's health check sees it, and the
    agents register through the coordinators they list first, where Prometheus looks."""
    harness = Harness(tmp_path)
    members = etcd_members()
    coordinators = role("coordinator")
    agents = role("agent")
    try:
        for name in [*members, *coordinators]:
            harness.start(name)
        for name, settings in members.items():
            client_port = urlsplit(settings["advertise-client-urls"]).port or 0
            health = functools.partial(etcd_is_healthy, harness.port(name, client_port))
            wait_for(f"{name} is not healthy", health, harness)
        for name, args in coordinators.items():
            stage = image_stage(kaiwo_services()[name])
            serving = functools.partial(
                probe_passes, stage, harness.port(name, port_of(args.listen))
            )
            wait_for(f"{name}'s health check fails", serving, harness)
        for name in agents:
            harness.start(name)
        first = [args.coordinator[0].rpartition(":")[0] for args in agents.values()]
        for name, args in coordinators.items():
            metrics_port = harness.port(name, port_of(args.metrics_listen))
            held = functools.partial(holds_agents, metrics_port, first.count(name))
            wait_for(f"{name} does not hold {first.count(name)} agents", held, harness)
        static = {n.name for n in load_inventory(inventory_file())}
        agent_nodes = {agent.node for agent in agents.values()}
        for name, args in coordinators.items():
            with Client(f"{LOOPBACK}:{harness.port(name, port_of(args.listen))}") as client:
                nodes = {node.name: node for node in client.nodes()}
            assert agent_nodes | static <= set(nodes), f"{name} lists {sorted(nodes)}"
            assert all(nodes[node].schedulable for node in agent_nodes), name
        targets = scrape_targets()
        assert targets
        for job, target in targets:
            service, _, target_port = target.rpartition(":")
            names = scrape(harness.port(service, int(target_port)))
            assert any(n.startswith("kaiwo_gpu_") for n in names), f"{target} ({job}): no metrics"
    finally:
        harness.stop()
