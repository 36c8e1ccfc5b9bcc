"""structlog set-up: JSON lines for daemons, a human console renderer for CLIs."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog


def setup_logging(fmt: Literal["json", "console"] = "json", level: str = "INFO") -> None:
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None, **context: object) -> structlog.typing.FilteringBoundLogger:
    log = structlog.get_logger(name) if name else structlog.get_logger()
    return log.bind(**context) if context else log
