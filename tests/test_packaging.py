"""The layout holds: one namespace over three source roots, one wheel with one top-level package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

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
    """Every systemd unit must not drift from the flags (docker-compose.yml, the Dockerfiles
    and the Kubernetes manifests: tests/test_compose.py, tests/test_dockerfiles.py and
    tests/test_kubernetes_manifests.py)."""
    units = sorted((REPO / "deploy/systemd").glob("kaiwo-gpu-*.service"))
    assert [unit.name for unit in units] == [
        "kaiwo-gpu-agent.service",
        "kaiwo-gpu-coordinator.service",
    ]
    for unit in units:
        (start,) = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
        # exits 2 on an unknown or bad flag
        args = build_parser().parse_args(start.split()[1:])
        assert unit.name == f"kaiwo-gpu-{args.command}.service"
