"""structlog JSON logging: one JSON object per line, with request/job/batch ids as keys."""

from __future__ import annotations

import logging
import sys

import structlog


def _stderr():
    """The process's real stderr: Celery redirects ``sys.stderr`` into logging (a loop), and
    test runners swap it for a file they later close."""
    return sys.__stderr__ or sys.stderr


def configure_logging(level: str = "INFO") -> None:
    """Route structlog and the standard library (Celery, transformers) to stderr as JSON lines."""
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *_: structlog.PrintLogger(_stderr()),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(_stderr())
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
    root.setLevel(level.upper())
