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
COORDINATOR_UNIT = REPO / "deploy/systemd/kaiwo-gpu-coordinator.service"
COORDINATOR_ENV_EXAMPLE = REPO / "deploy/systemd/coordinator.env.example"
CREDENTIAL = re.compile(r"/run/credentials/([^/\s]+)/([^/\s]+)")
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
    unit = _copy_for_here(COORDINATOR_UNIT, tmp_path)
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
    example = COORDINATOR_ENV_EXAMPLE.read_text()
    names = re.findall(r"^#?(KAIWO_GPU_[A-Z_]+)=", example, flags=re.MULTILINE)
    assert names
    for name in names:
        assert f"${name}" in help_text, name


def _settings(lines: list[str], key: str) -> dict[str, bool]:
    """Each `KEY=value` line's value and whether it is active (not commented out)."""
    found: dict[str, bool] = {}
    for line in lines:
        active = not line.startswith("#")
        name, equals, value = line.removeprefix("#").partition("=")
        if equals and re.fullmatch(key, name):
            found[value] = active
    return found


def test_every_credential_the_environment_file_names_is_loaded() -> None:
    """A path under /run/credentials exists only if the unit's LoadCredential makes it: an
    active variable naming one the unit does not load stops the coordinator at start
    ("cannot read --etcd-key"). A commented one goes with a commented LoadCredential, so
    that enabling a feature means uncommenting both."""
    variables = _settings(COORDINATOR_ENV_EXAMPLE.read_text().splitlines(), "KAIWO_GPU_[A-Z_]+")
    loaded = {
        value.partition(":")[0]: active
        for value, active in _settings(
            COORDINATOR_UNIT.read_text().splitlines(), "LoadCredential"
        ).items()
    }
    named = 0
    for value, active in variables.items():
        for unit, credential in CREDENTIAL.findall(value):
            assert unit == COORDINATOR_UNIT.name, value
            state = {True: "active", False: "commented out", None: "missing"}
            assert loaded.get(credential) is active, (
                f"{value} is {state[active]}, its LoadCredential {state[loaded.get(credential)]}"
            )
            named += 1
    assert named, "the example names the TLS key's credential"
