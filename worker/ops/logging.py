"""structlog JSON logging: one JSON object per line, with request/job/batch ids as keys."""

from __future__ import annotations

import logging
import os
import sys

import structlog

# libraries that print banners, deprecation notes and load warnings nobody can act on; their
# records go to the log only at DEBUG (GENQ_LOG_LEVEL=DEBUG shows them)
NOISY = ("py.warnings", "torchao", "torch.utils._pytree", "transformers", "huggingface_hub",
         "accelerate", "peft", "unsloth", "unsloth_zoo", "bitsandbytes", "celery.redirected")


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
    quiet_libraries(level)


def quiet_libraries(level: str) -> None:
    """Banners, progress bars and library warnings to the log at DEBUG only: set before
    torch, transformers and Unsloth load (they read these at import)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.captureWarnings(True)
    debug = level.upper() == "DEBUG"
    for name in NOISY:
        if name != "celery.redirected":  # Celery's stdout/stderr: tracebacks come that way too
            logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.ERROR)


class StdoutToLog:
    """A file-like object for ``contextlib.redirect_stdout``: what libraries print (Unsloth's
    banner) becomes debug log lines, so stdout stays clean for results."""

    def __init__(self, logger):
        self.logger = logger
        self.fallback = sys.stderr  # where a logger that itself prints to stdout ends up
        self._writing = False

    def write(self, text: str) -> int:
        if self._writing:  # logging was never configured: structlog prints to stdout (us)
            return self.fallback.write(text)
        self._writing = True
        try:
            for line in text.splitlines():
                if line.strip():
                    self.logger.debug("library_output", line=line)
        finally:
            self._writing = False
        return len(text)

    def flush(self) -> None:
        pass
