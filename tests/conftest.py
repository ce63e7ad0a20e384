"""Fixtures that start real services on loopback: a throwaway etcd and in-process coordinators.

Every test that uses one of them is marked `integration` at collection, so
`pytest -m "not integration"` is the fast loop of pure tests. A test that starts a process
without that mark fails at once (see `_processes_need_the_integration_mark`), so the fast
loop can never start one by accident.
"""

from __future__ import annotations

import _posixsubprocess  # what every spawn ends in
import contextlib
import itertools
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from hypothesis import settings

from kaiwo_gpu.coordinator.local.etcd import LocalEtcd
from kaiwo_gpu.coordinator.placement.strategies import BUILTIN_STRATEGIES, StrategyRegistry
from kaiwo_gpu.coordinator.server import Coordinator
from kaiwo_gpu.coordinator.settings import CoordinatorSettings
from kaiwo_gpu.v1 import allocation_pb2_grpc
from tests.harness import INVENTORY

if TYPE_CHECKING:
    from kaiwo_gpu.v1.allocation_pb2_grpc import AllocationServiceAsyncStub

# The long fuzz run (CI runs the fuzz files' own bounded counts, see tests/fuzz_strategies.py):
#   pytest tests/test_fuzz_rpcs.py tests/test_fuzz_agent_stream.py \
#       --hypothesis-profile=fuzz-long --timeout=1800
settings.register_profile("fuzz-long", max_examples=5000, deadline=None)

_prefixes = itertools.count()
SERVICE_FIXTURES = frozenset({"etcd", "own_etcd"})
"""Fixtures that start etcd; everything built on them (running, ...) depends on one."""
INTEGRATION = "integration"
PROCESS_STARTERS = ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & SERVICE_FIXTURES:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _processes_need_the_integration_mark(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside integration tests, starting a process is an error that names the fix."""
    if request.node.get_closest_marker(INTEGRATION) is not None:
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(
            f"{request.node.nodeid} starts a process; mark it @pytest.mark.integration "
            "so the fast loop (-m 'not integration') leaves it out"
        )

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    for name in PROCESS_STARTERS:  # fork, pty, posix_spawn, system, multiprocessing
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refuse)
    monkeypatch.setattr(_posixsubprocess, "fork_exec", refuse)


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    """One etcd for the session; tests keep apart by using their own key prefix."""
    server = LocalEtcd(tmp_path_factory.mktemp("etcd") / "data")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[LocalEtcd]:
    """An etcd for a test that stops or restarts it."""
    server = LocalEtcd(tmp_path / "etcd")
    server.start()
    yield server
    server.stop(kill=True)


@pytest.fixture
def prefix() -> str:
    return f"/kaiwo-test-{next(_prefixes)}/v1/"


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    path = tmp_path / "nodes.yaml"
    path.write_text(INVENTORY)
    return path


@dataclass
class Running:
    coordinator: Coordinator
    channel: grpc.aio.Channel
    api: AllocationServiceAsyncStub
    endpoint: str
    prefix: str
    target: str = ""  # host:port of the coordinator, for clients and the CLI


@contextlib.asynccontextmanager
async def coordinator_running(
    endpoint: str,
    prefix: str,
    inventory: Path | None,
    strategies: StrategyRegistry = BUILTIN_STRATEGIES,
    /,
    **settings: object,
) -> AsyncIterator[Running]:
    """A coordinator in this process on `prefix`, stopped (with its channel) on exit."""
    coordinator = Coordinator(
        CoordinatorSettings(
            listen="127.0.0.1:0",
            etcd_endpoints=(endpoint,),
            prefix=prefix,
            inventory=inventory,
            **settings,  # type: ignore[arg-type]
        ),
        strategies,
    )
    port = await coordinator.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Running(
            coordinator,
            channel,
            allocation_pb2_grpc.AllocationServiceStub(channel),
            endpoint,
            prefix,
            f"127.0.0.1:{port}",
        )
    finally:
        await channel.close()
        await coordinator.stop()


@pytest.fixture
async def running(etcd: LocalEtcd, prefix: str, inventory: Path) -> AsyncIterator[Running]:
    """A coordinator in this process, on its own prefix of the session's etcd."""
    async with coordinator_running(etcd.endpoint, prefix, inventory) as started:
        yield started
