"""The shipped systemd units, checked by systemd's own `systemd-analyze`.

`verify` warns about unknown keys and bad values on stderr but still exits 0, so a unit
passes only with no output at all. It also insists that ExecStart's binary exists: the
copies checked here name this environment's kaiwo-gpu instead of /usr/local/bin's.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kaiwo_gpu.cli.main import build_parser

REPO = Path(__file__).resolve().parent.parent
UNITS = sorted((REPO / "deploy" / "systemd").glob("*.service"))
INSTALLED = "/usr/local/bin/kaiwo-gpu"
HERE = str(Path(sys.executable).parent / "kaiwo-gpu")
COORDINATOR_EXPOSURE_AT_MOST = 2.0
"""`systemd-analyze security` scores 0 (locked down) to 10; the coordinator needs only the
network, so it must stay near the bottom."""

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def _copy_for_here(unit: Path, directory: Path) -> Path:
    text = unit.read_text()
    assert f"ExecStart={INSTALLED} " in text
    copy = directory / unit.name
    copy.write_text(text.replace(INSTALLED, HERE))
    return copy


def test_both_units_ship() -> None:
    assert [unit.name for unit in UNITS] == [
        "kaiwo-gpu-agent.service",
        "kaiwo-gpu-coordinator.service",
    ]


def _systemd_analyze(*args: str, directory: Path) -> tuple[int, str]:
    """The exit status and everything `systemd-analyze ARGS` printed."""
    done = subprocess.run(
        ["systemd-analyze", *args],
        capture_output=True,
        text=True,
        cwd=directory,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("unit", UNITS, ids=[unit.stem for unit in UNITS])
@pytest.mark.integration
@needs_systemd_analyze
def test_systemd_analyze_verify_passes_without_a_warning(unit: Path, tmp_path: Path) -> None:
    copy = _copy_for_here(unit, tmp_path)
    assert _systemd_analyze("verify", str(copy), directory=tmp_path) == (0, "")


@pytest.mark.integration
@needs_systemd_analyze
def test_the_coordinator_unit_is_locked_down(tmp_path: Path) -> None:
    unit = _copy_for_here(REPO / "deploy/systemd/kaiwo-gpu-coordinator.service", tmp_path)
    _, printed = _systemd_analyze(
        "security", "--offline=yes", "--no-pager", str(unit), directory=tmp_path
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", printed)
    assert found, printed
    assert float(found.group(1)) <= COORDINATOR_EXPOSURE_AT_MOST


def test_the_coordinator_environment_file_names_only_real_variables() -> None:
    """(The units' ExecStart lines are parsed in test_packaging, with the other deployments.)"""
    (commands,) = [
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    help_text = commands.choices["coordinator"].format_help()
    example = (REPO / "deploy/systemd/coordinator.env.example").read_text()
    names = re.findall(r"^#?(KAIWO_GPU_[A-Z_]+)=", example, flags=re.MULTILINE)
    assert names
    for name in names:
        assert f"${name}" in help_text, name
