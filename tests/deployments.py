"""What the deploy tests (the Dockerfiles, docker-compose.yml, deploy/kubernetes) hold in
common: the project's metadata, the image-pin rule, the variables each service command
reads, and a command parsed by the CLI's own parser as its container would run it."""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from kaiwo_gpu.agent.service import ENVIRONMENT as AGENT_ENVIRONMENT
from kaiwo_gpu.cli.main import build_parser
from kaiwo_gpu.coordinator.settings import ENVIRONMENT as COORDINATOR_ENVIRONMENT

REPO = Path(__file__).resolve().parent.parent
PYPROJECT: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT: dict[str, Any] = PYPROJECT["project"]
ROLE_VARIABLES = {
    "coordinator": frozenset(COORDINATOR_ENVIRONMENT.values()),
    "agent": frozenset(AGENT_ENVIRONMENT.values()),
}
"""The KAIWO_GPU_* variables each service command reads (its flags' fallbacks)."""
OWN_PREFIXES = ("KAIWO_GPU_", "OTEL_", "ETCD_")
"""The variables a deployment file sets for its processes (kaiwo-gpu's, OpenTelemetry's,
etcd's): a process started here takes them from the file alone, never from this shell."""

PINNED = re.compile(r"(?<![\d.])\d+\.\d+\.\d+(?![\d.])")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def pinned(reference: str) -> bool:
    """An image named by a release (a tag carrying major.minor.patch) and, if a digest is
    given, a well-formed one."""
    name, _, digest = reference.partition("@")
    tag = name.rpartition(":")[2] if ":" in name.rpartition("/")[2] else ""
    return bool(PINNED.search(tag)) and (not digest or DIGEST.fullmatch(digest) is not None)


def port_of(address: str) -> int:
    """The port of a `host:port` address."""
    return int(address.rpartition(":")[2])


def clean_environment() -> dict[str, str]:
    """This shell's environment without any variable a deployment file sets, so that what
    a test runs sees only the file's settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(OWN_PREFIXES)}


def check_command(argv: Sequence[str], environment: Mapping[str, str]) -> argparse.Namespace:
    """`kaiwo-gpu ARGV` as the CLI parses it with exactly `environment`'s KAIWO_GPU_*/OTEL_*
    variables (the flags' fallbacks are read when the parser is built), once every
    KAIWO_GPU_* variable is known to be one the command reads: a misspelt one would
    otherwise be ignored without a word."""
    assert argv, "no command"
    role = argv[0]
    assert role in ROLE_VARIABLES, f"{role!r} is not a service command"
    ours = {k: v for k, v in environment.items() if k.startswith(OWN_PREFIXES)}
    unread = {k for k in ours if k.startswith("KAIWO_GPU_")} - ROLE_VARIABLES[role]
    assert not unread, f"`kaiwo-gpu {role}` never reads {sorted(unread)}"
    with mock.patch.dict(os.environ, {**clean_environment(), **ours}, clear=True):
        try:
            return build_parser().parse_args(list(argv))
        except SystemExit as stop:
            pytest.fail(f"{list(argv)} with {dict(environment)} is refused (exit {stop.code})")
