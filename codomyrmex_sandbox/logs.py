"""Structured logging: JSON lines on stderr, configured once by the entry point.

stdout is the MCP stdio transport; nothing in this package writes to it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(level: str = "info") -> None:
    """Send structlog events, and the standard library's (the MCP SDK's), to stderr as JSON."""
    numeric = _LEVELS.get(level, logging.INFO)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # The SDK logs every request at INFO; keep that for debugging only.
    logging.getLogger("mcp").setLevel(numeric if numeric == logging.DEBUG else max(numeric, logging.WARNING))


def get_logger(name: str) -> Any:  # noqa: ANN401 - structlog's loggers are dynamically typed
    """structlog's logger when the application configured structlog, else JSON lines on stderr.

    A library must not write to stdout: an application that embeds the Sandbox may be an MCP
    server whose stdout is its transport, and structlog's unconfigured default prints there.
    Called at each use (not at import), so configuring structlog later still takes effect.
    """
    if structlog.is_configured():
        return structlog.get_logger(name)
    return structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        logger_name=name,
    )
