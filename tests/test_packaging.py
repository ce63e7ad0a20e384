"""The layout holds: one namespace over three source roots, one wheel with one top-level package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

import kaiwo_gpu
from kaiwo_gpu.cli.main import build_parser

REPO = Path(__file__).resolve().parent.parent
SOURCE_ROOTS = ("common", "agent", "coordinator")


def test_no_source_root_turns_the_namespace_into_a_regular_package() -> None:
    for root in SOURCE_ROOTS:
        assert (REPO / root / "kaiwo_gpu").is_dir(), f"{root}/kaiwo_gpu is missing"
        assert not (REPO / root / "kaiwo_gpu" / "__init__.py").exists(), (
            f"{root}/kaiwo_gpu/__init__.py would hide the other portions of kaiwo_gpu"
        )


def test_the_namespace_spans_every_root() -> None:
    portions = {Path(p).parent.name for p in kaiwo_gpu.__path__}
    assert set(SOURCE_ROOTS) <= portions


def test_the_top_level_layout_is_the_one_asked_for() -> None:
    for entry in (
        "pyproject.toml",
        "proto",
        "agent",
        "coordinator",
        "common",
        "tests",
        "deploy",
        "docker-compose.yml",
        "README.md",
    ):
        assert (REPO / entry).exists(), entry


@pytest.mark.integration
def test_the_wheel_has_kaiwo_gpu_as_its_only_top_level_package(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = tmp_path.glob("kaiwo_gpu-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {
        name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")
    }
    assert top_level == {"kaiwo_gpu"}
    assert "kaiwo_gpu/__init__.py" not in names
    for package in ("common", "agent", "coordinator", "cli", "v1"):
        assert f"kaiwo_gpu/{package}/__init__.py" in names, package
    assert "kaiwo_gpu/v1/allocation_pb2_grpc.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert (
        "kaiwo-gpu = kaiwo_gpu.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    )


def test_the_shipped_deployments_run_commands_the_cli_accepts() -> None:
    """docker-compose, the DaemonSet and the systemd units must not drift from the flags."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    commands = [
        service["command"] for service in compose["services"].values() if "build" in service
    ]
    daemonset = yaml.safe_load((REPO / "deploy/kubernetes/agent-daemonset.yaml").read_text())
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    commands.append(container["args"])
    for unit in ("kaiwo-gpu-agent.service", "kaiwo-gpu-coordinator.service"):
        text = (REPO / "deploy/systemd" / unit).read_text()
        (start,) = [line for line in text.splitlines() if line.startswith("ExecStart=")]
        commands.append(start.split()[1:])
    assert len(commands) == 6
    for command in commands:
        build_parser().parse_args(command)  # exits 2 on an unknown or bad flag
