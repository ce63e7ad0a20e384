"""A client command's start-up: structlog (and what it pulls in) loads only when a line is
logged, and a deferred set-up still applies to that first line."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import structlog

from kaiwo_gpu.common import logs

NOT_FOR_CLIENTS = ("structlog", "rich", "yaml", "aetcd", "kaiwo_gpu.coordinator.settings")
"""Modules a client command that logs nothing and prints a table must not import."""


@pytest.fixture
def fresh_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.mark.integration
def test_a_client_command_that_logs_nothing_imports_no_logging_or_server_machinery() -> None:
    script = (
        "import sys\n"
        "from kaiwo_gpu.cli.main import main\n"
        "status = main(['nodes', '--coordinator', '127.0.0.1:1', '--timeout', '1s'])\n"
        f"print(status, [m for m in {NOT_FOR_CLIENTS!r} if m in sys.modules])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    status, loaded = result.stdout.split(" ", 1)
    assert status == "5", result.stderr  # nobody listens on port 1: unavailable
    assert loaded.strip() == "[]"


@pytest.mark.usefixtures("fresh_structlog")
def test_a_deferred_set_up_applies_to_the_first_line_logged(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure_logging("json", logging.WARNING, deferred=True)
    log = logs.get_logger("kaiwo_gpu.test")
    log.info("below the level")
    log.warning("lease renewal failed", allocation_id="a-1")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    record = json.loads(lines[0])
    assert record["event"] == "lease renewal failed"
    assert record["level"] == "warning"
    assert record["allocation_id"] == "a-1"


@pytest.mark.usefixtures("fresh_structlog")
def test_an_eager_set_up_cancels_a_deferred_one(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure_logging("json", logging.WARNING, deferred=True)
    logs.configure_logging("console", logging.INFO)
    logs.get_logger("kaiwo_gpu.test").info("started", port=1)
    (line,) = capsys.readouterr().err.splitlines()
    assert "started" in line
    assert not line.startswith("{")  # the console renderer's, not the deferred JSON one


def _log_first(log: structlog.typing.FilteringBoundLogger, start: threading.Barrier) -> None:
    start.wait(10)
    log.info("below the level")


@pytest.mark.usefixtures("fresh_structlog")
def test_threads_logging_their_first_lines_at_once_all_wait_for_the_deferred_set_up(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The main thread and a lease-renewal thread may log first together: none of their
    lines may go out through structlog's defaults (stdout, nothing filtered)."""
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race shows
    try:
        for _ in range(100):
            structlog.reset_defaults()
            logs.configure_logging("json", logging.WARNING, deferred=True)
            loggers = [logs.get_logger(f"kaiwo_gpu.test.{n}") for n in range(4)]
            start = threading.Barrier(len(loggers))

            threads = [threading.Thread(target=_log_first, args=(log, start)) for log in loggers]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
    finally:
        sys.setswitchinterval(switch)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""
