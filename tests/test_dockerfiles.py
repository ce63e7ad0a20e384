"""The images' Dockerfiles, read as a builder would read them (no Docker engine runs here):
pinned bases, multi-stage builds, a user of their own, the installed CLI as entry point,
COPY sources in the build context, and health checks that are run here against real
servers."""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kaiwo_gpu.agent.service import ENVIRONMENT as AGENT_ENVIRONMENT
from kaiwo_gpu.common.metrics_http import MetricsServer
from kaiwo_gpu.coordinator.local.etcd import free_port
from kaiwo_gpu.coordinator.server import SERVICE_NAME
from kaiwo_gpu.coordinator.settings import ENVIRONMENT as COORDINATOR_ENVIRONMENT
from tests.deployments import (
    OWN_PREFIXES,
    PROJECT,
    PYPROJECT,
    REPO,
    check_command,
    clean_environment,
    pinned,
)

DOCKERFILES = ("deploy/Dockerfile", "deploy/Dockerfile.agent")
VENV = "/opt/kaiwo-gpu"
CLI = f"{VENV}/bin/kaiwo-gpu"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    flags: Mapping[str, str]
    arguments: str
    line: int

    def exec_form(self) -> list[str]:
        """The JSON array of ENTRYPOINT, CMD or HEALTHCHECK CMD (the shell form fails)."""
        text = self.arguments.removeprefix("CMD").strip() if self.keyword == "HEALTHCHECK" else ""
        value = json.loads(text or self.arguments)
        assert isinstance(value, list), f"line {self.line}: {self.keyword} is not exec form"
        assert all(isinstance(part, str) for part in value), f"line {self.line}"
        return value


@dataclass
class Stage:
    name: str
    base: str
    parent: Stage | None
    instructions: list[Instruction] = field(default_factory=list)

    def chain(self) -> Iterator[Stage]:
        """This stage, then the stages it is built FROM, nearest first."""
        stage: Stage | None = self
        while stage is not None:
            yield stage
            stage = stage.parent

    def all(self, keyword: str) -> list[Instruction]:
        return [
            i for s in reversed(list(self.chain())) for i in s.instructions if i.keyword == keyword
        ]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def environment(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            words = shlex.split(instruction.arguments)
            if "=" not in words[0]:  # the legacy `ENV NAME value`
                values[words[0]] = " ".join(words[1:])
                continue
            for word in words:
                name, _, value = word.partition("=")
                values[name] = value
        return values


@dataclass
class Dockerfile:
    path: str
    stages: dict[str, Stage]
    directives: dict[str, str]

    @property
    def final(self) -> Stage:
        return list(self.stages.values())[-1]


FLAG = re.compile(r"--([a-z-]+)=(\S+)\s*")


def parse_dockerfile(path: str) -> Dockerfile:
    """Instructions by stage, as BuildKit reads them: parser directives, comments and line
    continuations; global ARGs substituted into FROM; `FROM <stage>` inherits that stage."""
    lines = (REPO / path).read_text().splitlines()
    directives: dict[str, str] = {}
    for line in lines:
        match = re.fullmatch(r"#\s*([a-z]+)\s*=\s*(\S+)\s*", line)
        if match is None:
            break
        directives[match[1]] = match[2]
    logical: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        if not pending:
            start = number
        pending.append(line.rstrip().removesuffix("\\").strip())
        if not line.rstrip().endswith("\\"):
            logical.append((start, " ".join(part for part in pending if part)))
            pending = []
    assert not pending, f"{path} ends inside a line continuation"
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for number, text in logical:
        keyword, _, rest = text.partition(" ")
        keyword = keyword.upper()
        flags: dict[str, str] = {}
        while match := FLAG.match(rest):
            flags[match[1]] = match[2]
            rest = rest[match.end() :]
        if keyword == "ARG" and stage is None:
            name, _, default = rest.partition("=")
            global_args[name.strip()] = default.strip()
            continue
        if keyword == "FROM":
            words = rest.split()
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m[1], m[0]), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stage = Stage(name, image, stages.get(image))
            stages[name] = stage
            continue
        assert stage is not None, f"{path}:{number}: {keyword} before FROM"
        stage.instructions.append(Instruction(keyword, flags, rest.strip(), number))
    return Dockerfile(path, stages, directives)


def run_targets() -> list[tuple[Dockerfile, Stage]]:
    """The stages that run as containers: each file's last stage and every stage
    docker-compose.yml builds."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    wanted = {(path, None) for path in DOCKERFILES}
    for service in compose["services"].values():
        build = service.get("build")
        if isinstance(build, dict):
            wanted.add((build.get("dockerfile", "Dockerfile"), build.get("target")))
    targets: dict[tuple[str, str], tuple[Dockerfile, Stage]] = {}
    for path, target in sorted(wanted, key=str):
        dockerfile = parse_dockerfile(path)
        stage = dockerfile.final if target is None else dockerfile.stages[target]
        targets[path, stage.name] = (dockerfile, stage)
    return list(targets.values())


def test_the_pin_rule_tells_a_release_from_a_moving_tag() -> None:
    assert pinned("python:3.11.13-slim-bookworm")
    assert pinned("quay.io/coreos/etcd:v3.5.17")
    assert pinned("rocm/dev-ubuntu-22.04:6.2.4")
    assert pinned(f"python:3.11.13-slim@sha256:{'a' * 64}")
    for moving in ("python:3.11-slim", "python", "python:latest", "localhost:5000/kaiwo"):
        assert not pinned(moving), moving
    assert not pinned("python:3.11.13-slim@sha256:1234")


@pytest.mark.parametrize("path", DOCKERFILES)
def test_every_base_image_is_a_pinned_release(path: str) -> None:
    dockerfile = parse_dockerfile(path)
    bases = [stage for stage in dockerfile.stages.values() if stage.parent is None]
    assert bases, f"{path}: no stage is FROM an image"
    for stage in bases:
        assert pinned(stage.base), f"{path}: stage {stage.name} is FROM {stage.base}"
    if "syntax" in dockerfile.directives:
        assert pinned(dockerfile.directives["syntax"]), f"{path}: # syntax= is not pinned"


@pytest.mark.parametrize("path", DOCKERFILES)
def test_the_image_that_runs_holds_only_what_a_build_stage_made(path: str) -> None:
    dockerfile = parse_dockerfile(path)
    assert len(dockerfile.stages) >= 2, f"{path} is not a multi-stage build"
    running = [stage for file, stage in run_targets() if file.path == path]
    assert running, f"{path}: no stage of it runs"
    for runs in running:
        copies = runs.all("COPY") + runs.all("ADD")
        assert copies, f"{path}:{runs.name} copies nothing from a build stage"
        for copy in copies:
            assert copy.flags.get("from") in dockerfile.stages, (
                f"{path}:{copy.line}: the stage that runs copies from the build context"
            )


def test_the_images_run_as_a_user_of_their_own() -> None:
    for dockerfile, stage in run_targets():
        where = f"{dockerfile.path}:{stage.name}"
        user = stage.last("USER")
        assert user is not None, f"{where} runs as root"
        uid, _, gid = user.arguments.partition(":")
        assert uid.isdigit(), f"{where}: USER {user.arguments} (name a numeric uid)"
        assert int(uid) != 0, f"{where} runs as root"
        runs = " ".join(i.arguments for i in stage.all("RUN"))
        assert re.search(rf"useradd [^&]*--uid {uid}\b", runs), f"{where}: no user {uid}"
        if gid:
            assert re.search(rf"groupadd [^&]*--gid {gid}\b", runs), f"{where}: no group {gid}"
        if re.search(r"useradd [^&]*--groups ", runs):
            # Docker (runc's user lookup) sets supplementary groups only for `USER uid`.
            assert not gid, f"{where}: USER {user.arguments} drops the user's other groups"


def test_the_gpu_agent_image_joins_the_groups_that_own_the_devices() -> None:
    stage = parse_dockerfile("deploy/Dockerfile.agent").final
    runs = " ".join(i.arguments for i in stage.all("RUN"))
    match = re.search(r"useradd [^&]*--groups (\S+)", runs)
    assert match is not None, "the agent's user joins no supplementary group"
    assert {"video", "render"} <= set(match[1].split(","))


def test_the_entry_point_is_the_cli_installed_in_the_build_stage() -> None:
    assert PurePosixPath(CLI).name in PROJECT["scripts"]
    for dockerfile, stage in run_targets():
        where = f"{dockerfile.path}:{stage.name}"
        entrypoint = stage.last("ENTRYPOINT")
        assert entrypoint is not None, where
        assert entrypoint.exec_form() == [CLI], where
        (venv,) = [c for c in stage.all("COPY") if c.arguments.split()[-1] == VENV]
        build = dockerfile.stages[venv.flags["from"]]
        runs = " && ".join(i.arguments for i in build.all("RUN"))
        assert f"-m venv {VENV}" in runs, f"{where}: the build stage makes no {VENV}"
        assert re.search(rf"{VENV}/bin/pip install \"?\.", runs), f"{where}: nothing installed"
        command = stage.last("CMD")
        assert command is not None, where
        check_command(command.exec_form(), stage.environment())


def test_the_images_set_only_variables_their_command_reads() -> None:
    """(check_command holds the rule; a misspelt variable shows it can fail.)"""
    for dockerfile, stage in run_targets():
        command = stage.last("CMD")
        assert command is not None, f"{dockerfile.path}:{stage.name}"
        role = command.exec_form()[0]
        args = check_command(command.exec_form(), stage.environment())
        assert args.command == role, f"{dockerfile.path}:{stage.name}"
        misspelt = {**stage.environment(), "KAIWO_GPU_LISTN": "0.0.0.0:1"}
        with pytest.raises(AssertionError, match="never reads"):
            check_command(command.exec_form(), misspelt)


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (excludes, pattern): the last pattern that matches a path or one of
    its parents decides; `*` stays within a path segment, `**` spans them."""
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for text in (REPO / ".dockerignore").read_text().splitlines():
        line = text.strip()
        if not line or line.startswith("#"):
            continue
        excludes = not line.startswith("!")
        glob = line.removeprefix("!").strip("/")
        parts = re.split(r"(\*\*/|\*\*|\*|\?)", glob)
        regex = "".join(
            {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(p, re.escape(p))
            for p in parts
        )
        rules.append((excludes, re.compile(regex)))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for excludes, pattern in rules:
        if any(pattern.fullmatch(prefix) for prefix in prefixes):
            verdict = excludes
    return verdict


def test_the_ignore_rules_read_as_docker_reads_them() -> None:
    rules = dockerignore()
    assert ignored(".venv/bin/python", rules)
    assert ignored("tests/test_dockerfiles.py", rules)
    assert ignored("common/kaiwo_gpu/__pycache__/x.pyc", rules)
    assert not ignored("common/kaiwo_gpu/cli/main.py", rules)
    assert not ignored("pyproject.toml", rules)


@pytest.mark.parametrize("path", DOCKERFILES)
def test_every_copy_source_is_in_the_build_context(path: str) -> None:
    """The build context is the repository root (as docker-compose.yml and the comments in
    the files build them); what the wheel is built from must all be copied."""
    rules = dockerignore()
    copied: set[str] = set()
    for stage in parse_dockerfile(path).stages.values():
        for copy in stage.instructions:
            if copy.keyword not in {"COPY", "ADD"} or "from" in copy.flags:
                continue
            for source in copy.arguments.split()[:-1]:
                where = f"{path}:{copy.line}: {source}"
                assert (REPO / source).exists(), f"{where} does not exist"
                files = [REPO / source]
                if (REPO / source).is_dir():
                    files = sorted((REPO / source).rglob("*.py"))
                    assert files, f"{where} holds no Python file"
                for file in files:
                    relative = file.relative_to(REPO).as_posix()
                    assert not ignored(relative, rules), f"{where}: .dockerignore drops {relative}"
                copied.add(source.rstrip("/"))
    wheel = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["only-include"]
    needed = {"pyproject.toml", PROJECT["readme"]} | {p.split("/")[0] for p in wheel}
    assert needed <= copied, f"{path} does not copy {needed - copied}"


def health_check(stage: Stage) -> Instruction:
    check = stage.last("HEALTHCHECK")
    assert check is not None, f"stage {stage.name} has no HEALTHCHECK"
    return check


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)", duration)
    assert match is not None, duration
    return int(match[1]) * {"ms": 0.001, "s": 1, "m": 60}[match[2]]


def test_every_image_that_runs_has_a_health_check() -> None:
    for dockerfile, stage in run_targets():
        where = f"{dockerfile.path}:{stage.name}"
        check = health_check(stage)
        assert check.exec_form()[:2] == ["python", "-c"], where
        compile(check.exec_form()[2], where, "exec")
        interval, timeout = seconds(check.flags["interval"]), seconds(check.flags["timeout"])
        assert 0 < timeout < interval, where
        assert int(check.flags["retries"]) >= 1, where


def requirement_name(requirement: str) -> str:
    """A requirement's project name, normalized (PEP 503)."""
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match is not None, requirement
    return re.sub(r"[-_.]+", "-", match[0]).lower()


def installed_requirements(dockerfile: Dockerfile) -> set[str]:
    """The projects the image's `pip install ".[extras]"` brings: the dependencies and
    those of the extras it names."""
    runs = " ".join(i.arguments for s in dockerfile.stages.values() for i in s.all("RUN"))
    match = re.search(rf"{VENV}/bin/pip install \"?\.(?:\[([\w,-]+)\])?", runs)
    assert match is not None, f"{dockerfile.path} does not install the project"
    extras = match[1].split(",") if match[1] else []
    wanted = list(PROJECT["dependencies"])
    for extra in extras:
        wanted += PROJECT["optional-dependencies"][extra]
    return {requirement_name(requirement) for requirement in wanted}


def imported_modules(code: str) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module.partition(".")[0])
    return modules


def test_the_health_checks_need_only_what_the_image_holds() -> None:
    """`python` is the virtual environment's (first on the image's PATH), and every module
    a probe imports is the standard library's or comes with a project the image installs:
    a probe that works here, in the dev environment, could otherwise fail in the image."""
    distributions = importlib.metadata.packages_distributions()
    for dockerfile, stage in run_targets():
        where = f"{dockerfile.path}:{stage.name}"
        assert stage.environment()["PATH"].split(":")[0] == f"{VENV}/bin", where
        installed = installed_requirements(dockerfile)
        modules = imported_modules(health_check(stage).exec_form()[2])
        for module in sorted(modules - sys.stdlib_module_names):
            projects = {requirement_name(name) for name in distributions.get(module, [])}
            assert projects & installed, f"{where}: the probe imports {module}, not installed"


def test_the_probe_import_check_sees_a_missing_project() -> None:
    dockerfile = parse_dockerfile("deploy/Dockerfile")
    assert "grpcio-health-checking" in installed_requirements(dockerfile)
    assert "pytest" not in installed_requirements(dockerfile)
    assert imported_modules("import os, grpc.aio; from grpc_health.v1 import h") == {
        "os",
        "grpc",
        "grpc_health",
    }


def test_both_agent_images_probe_alike() -> None:
    simulated = parse_dockerfile("deploy/Dockerfile").stages["agent"]
    rocm = parse_dockerfile("deploy/Dockerfile.agent").final
    assert health_check(simulated).exec_form() == health_check(rocm).exec_form()
    assert health_check(simulated).flags == health_check(rocm).flags


def probe(stage: Stage, port: int | None) -> subprocess.CompletedProcess[str]:
    """The stage's health check, run here: its environment with the port of the address
    it probes replaced by `port` (or that variable left out)."""
    argv = health_check(stage).exec_form()
    environment = clean_environment()
    for name, value in stage.environment().items():
        if name.startswith(OWN_PREFIXES) and port is not None:
            environment[name] = re.sub(r":\d+$", f":{port}", value)
    return subprocess.run(
        [sys.executable, *argv[1:]],
        env=environment,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@contextlib.contextmanager
def grpc_health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(None)


@pytest.mark.integration
def test_the_coordinator_health_check_follows_grpc_health() -> None:
    stage = parse_dockerfile("deploy/Dockerfile").stages["coordinator"]
    assert COORDINATOR_ENVIRONMENT["listen"] in stage.environment()
    with grpc_health_server() as (port, servicer):
        servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        serving = probe(stage, port)
        assert serving.returncode == 0, serving.stderr
        servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert probe(stage, port).returncode == 1
    gone = probe(stage, free_port())
    assert gone.returncode == 1, gone.stderr


@pytest.mark.integration
@pytest.mark.parametrize(
    ("path", "stage_name"), [("deploy/Dockerfile", "agent"), ("deploy/Dockerfile.agent", None)]
)
def test_the_agent_health_check_reads_its_metrics(path: str, stage_name: str | None) -> None:
    dockerfile = parse_dockerfile(path)
    stage = dockerfile.final if stage_name is None else dockerfile.stages[stage_name]
    assert AGENT_ENVIRONMENT["metrics_listen"] in stage.environment()
    metrics = MetricsServer()
    port = metrics.start("127.0.0.1:0")
    try:
        answering = probe(stage, port)
        assert answering.returncode == 0, answering.stderr
    finally:
        metrics.stop()
    assert probe(stage, port).returncode == 1
    unset = probe(stage, None)
    assert unset.returncode == 1
    assert "KAIWO_GPU_METRICS_LISTEN" in unset.stderr
