"""Logging set-up for entry points: structlog, JSON for machines or console for people.

Only entry points call `configure_logging`. Server modules just `structlog.get_logger()`;
the modules a client command imports use `get_logger` here, which imports structlog when a
line is first logged: with rich installed, `import structlog` costs a client command about
a fifth of its start-up, and most client commands never log a line.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

_pending: list[tuple[str, int]] = []
"""The set-up `configure_logging(..., deferred=True)` asked for, until a line is logged."""
_first_use = threading.Lock()
"""Held while a deferred set-up is applied: a second thread's first line waits for it
rather than going out through structlog's defaults (stdout, unfiltered)."""


def configure_logging(
    log_format: str = "console", level: int = logging.INFO, *, deferred: bool = False
) -> None:
    """structlog's processors and renderer, and the standard library's logging, at `level`.

    `deferred`: structlog is set up (and imported) only when a `get_logger` logger first
    logs, so a command that logs nothing does not import it.
    """
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    with _first_use:
        if deferred:
            _pending[:] = [(log_format, level)]
            return
        _pending.clear()
        _configure_structlog(log_format, level)


def _configure_structlog(log_format: str, level: int) -> None:
    import structlog

    from kaiwo_gpu.common import tracing

    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            tracing.log_fields,  # trace_id, span_id: logs and traces join up
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


class _DeferredLogger:
    """structlog's logger for `name`, looked up (and structlog imported) on first use."""

    __slots__ = ("_logger", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: Any = None

    def __getattr__(self, attribute: str) -> Any:
        if self._logger is None:
            import structlog

            with _first_use:
                if _pending:
                    _configure_structlog(*_pending.pop())
                self._logger = structlog.get_logger(self._name)
        return getattr(self._logger, attribute)


def get_logger(name: str) -> FilteringBoundLogger:
    """A structlog logger that costs no import until it logs (see the module's docstring)."""
    return cast("FilteringBoundLogger", _DeferredLogger(name))
