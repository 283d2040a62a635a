"""Structured logging: one configuration for every role, JSON or console lines.

Log one line per request, tunnel or session transition when it ends; never one per data chunk
at info level. Secrets (tokens, tickets, passwords) are never passed to a logger.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

LogFormat = Literal["json", "console"]
LOG_FORMATS: tuple[LogFormat, ...] = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")


def configure_logging(
    fmt: LogFormat = "console", level: str = "info", stream: TextIO | None = None
) -> None:
    """Send structlog and standard-library logs to ``stream`` (stderr) as JSON or console lines."""
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    out = stream if stream is not None else sys.stderr
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(stream=out, level=max(numeric_level, logging.WARNING), force=True)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """Return the logger for one component (``gateway``, ``controller``, ``driver.local``)."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(component=name)
    return logger
