"""`kaiwo-gpu coordinator` as a child process on loopback, for tests and benchmarks.

A separate process, so it can be SIGKILLed and restarted, and so a load generator does not
share its event loop. It logs JSON to a file and is ready once gRPC health says SERVING.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kaiwo_gpu.common import channels
from kaiwo_gpu.common.credentials import Credentials
from kaiwo_gpu.common.errors import UnavailableError
from kaiwo_gpu.coordinator.local.children import interrupts_held, spawn_logged
from kaiwo_gpu.coordinator.local.etcd import free_port


class CoordinatorProcess:
    def __init__(
        self,
        etcd_endpoint: str,
        prefix: str,
        inventory: Path | None,
        log_path: Path,
        *,
        python_args: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        address: str | None = None,
        pid_path: Path | None = None,
    ) -> None:
        self.address = address or f"127.0.0.1:{free_port()}"
        self.args = [
            sys.executable,
            *python_args,
            "-m",
            "kaiwo_gpu.cli.main",
            "coordinator",
            f"--listen={self.address}",
            f"--etcd={etcd_endpoint}",
            f"--prefix={prefix}",
            *([f"--inventory={inventory}"] if inventory else []),
            "--log-format=json",
            *extra_args,
        ]
        self.log_path = log_path
        self.pid_path = pid_path
        """Where the pid is written as soon as the process starts (`kaiwo-gpu up`'s)."""
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with interrupts_held():
            self.process = spawn_logged(self.args, self.log_path, self.pid_path, environment)

    async def wait_serving(self, timeout_s: float = 30.0, held: Credentials | None = None) -> None:
        """Returns once health says SERVING (asked over TLS with `held`, else plaintext);
        raises with the log's tail if it never does."""
        deadline = time.monotonic() + timeout_s
        async with channels.open_aio_channel(self.address, held or Credentials(), ()) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if not self.alive():
                    raise UnavailableError(f"the coordinator exited:\n{self.log_tail()}")
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)
        raise UnavailableError(
            f"the coordinator was not serving in {timeout_s:g}s:\n{self.log_tail()}"
        )

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    def send(self, sig: int) -> None:
        """Sends `sig` without waiting (SIGKILL or SIGSTOP a coordinator in a test)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int:
        """Sends `sig` and waits; SIGKILL when it does not exit in time. Its exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            status = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait()
        if self.pid_path is not None:
            self.pid_path.unlink(missing_ok=True)
        return status
