"""structlog set-up shared by the ARI service, the AGI script and the CLI."""

from __future__ import annotations

import logging
import sys

import structlog


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    # sys.stderr as it is when the line is written, not when logging was set up (a test runner
    # or a daemon may replace it).
    return structlog.PrintLogger(file=sys.stderr)


def configure_logging(fmt: str = "json", level: int = logging.INFO) -> None:
    """JSON lines on stderr (journald-friendly); 'console' for people at a terminal."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
