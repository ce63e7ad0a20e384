"""Expiry of agent-registered nodes whose agent has been gone for a set time (off by default).

A node whose agent stopped for good (the host was retired, renamed or reinstalled) would
otherwise stay listed, unschedulable, forever. Each coordinator that is asked to expire
nodes times every agentless node from the moment it saw it without its agent (its own
start, at the latest: a restart only ever makes a node live longer), and removes it by the
same rules and guarded delete as `kaiwo-gpu node remove`, so a node that still holds an
allocation stays until it is released, and an agent that comes back in time keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from kaiwo_gpu.common.errors import FailedPreconditionError, KaiwoGpuError, NotFoundError
from kaiwo_gpu.coordinator.state.changes import Store
from kaiwo_gpu.coordinator.state.node_removal import (
    agentless_since,
    expired_nodes,
    remove_node,
)
from kaiwo_gpu.coordinator.state.view import ClusterView

log = structlog.get_logger(__name__)
MAX_CHECK_S = 30.0
"""The longest wait between two checks, whatever the expiry."""


class NodeExpiry:
    """Removes nodes that have had no agent for `after_s` seconds, checked every
    `after_s / 4` (at most MAX_CHECK_S), so one goes at most a quarter late."""

    def __init__(self, store: Store, view: ClusterView, after_s: float) -> None:
        self._store = store
        self._view = view
        self.after_s = after_s
        self.check_s = min(max(after_s / 4, 0.1), MAX_CHECK_S)
        self._since: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="node-expiry")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.check(loop.time())
            await asyncio.sleep(self.check_s)

    async def check(self, now: float) -> list[str]:
        """One pass at monotonic time `now`: the nodes it removed. A node that the rules
        keep (it holds an allocation, its agent is back) or that another coordinator
        removed first is left for now without a word; anything else is logged."""
        self._since = agentless_since(self._since, self._view.state, now)
        removed = []
        for name in expired_nodes(self._since, now, self.after_s):
            try:
                await remove_node(self._store, self._view, name)
            except (FailedPreconditionError, NotFoundError):
                continue
            except KaiwoGpuError as error:
                log.warning("could not expire node", node=name, error=error.message)
                continue
            agentless_s = round(now - self._since[name])
            log.info("node expired: no agent", node=name, agentless_s=agentless_s)
            removed.append(name)
        return removed
