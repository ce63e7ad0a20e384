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


@pytest.mark.parametrize("unit", UNITS, ids=[unit.stem for unit in UNITS])
@pytest.mark.integration
@needs_systemd_analyze
def test_systemd_analyze_verify_passes_without_a_warning(unit: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        ["systemd-analyze", "verify", str(_copy_for_here(unit, tmp_path))],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.integration
@needs_systemd_analyze
def test_the_coordinator_unit_is_locked_down(tmp_path: Path) -> None:
    unit = _copy_for_here(REPO / "deploy/systemd/kaiwo-gpu-coordinator.service", tmp_path)
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout + done.stderr)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) <= COORDINATOR_EXPOSURE_AT_MOST


def test_the_coordinator_unit_and_its_environment_file_name_real_flags() -> None:
    unit = (REPO / "deploy/systemd/kaiwo-gpu-coordinator.service").read_text()
    (start,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    build_parser().parse_args(start.split()[1:])
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
        assert f"${name}" in help_text or name == "KAIWO_GPU_LOG_FORMAT", name
