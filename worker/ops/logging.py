"""structlog logging: on a terminal, one readable line per event (structlog's console
renderer); elsewhere (a log file, a pipe, a container) or with ``GENQ_LOG_FORMAT=json``, one
JSON object per line, with request/job/batch ids as keys. Neither carries banners or progress
bars."""

from __future__ import annotations

import logging
import os
import re
import sys
from urllib.parse import parse_qsl, urlencode, urlsplit

import structlog

# libraries that print banners, deprecation notes and load warnings nobody can act on; their
# records go to the log only at DEBUG (GENQ_LOG_LEVEL=DEBUG shows them)
NOISY = ("py.warnings", "torchao", "torch.utils._pytree", "transformers", "huggingface_hub",
         "accelerate", "peft", "unsloth", "unsloth_zoo", "bitsandbytes")
# their warnings are for operators (a worker's log at INFO keeps them, not their INFO lines); a
# command run at the CLI's WARNING level shows only their errors
CHATTY = ("vllm",)
LIBRARY_LEVELS: dict[str, int] = {}  # theirs, by logger name (quiet_libraries)


# the password in a URL's user info (up to its last ``@``), a URL (``;`` separates the nodes
# of a kombu sentinel URL), and ``key=value`` or ``"key": value`` where the key names a password;
# each pattern starts only where a run of its characters starts (a long value is read once)
USERINFO = re.compile(r"""(://[^\s/?#@:'"]*):[^\s/'"]*@""")
URL = re.compile(r"""(?<![A-Za-z])[A-Za-z][A-Za-z0-9+.-]*://[^\s'"<>;]+""")
SECRET_WORD = re.compile(r"passw(?:or)?d", re.IGNORECASE)
SECRET_PAIR = re.compile(
    r"""(?<![\w.-])([\w.-]*passw(?:or)?d[\w.-]*["']?\s*[=:]\s*)("[^"]*"|'[^']*'|[^\s&,;'"})\]]+)""",
    re.IGNORECASE)


def _mask_query(url: str) -> str:
    """``url`` with every query parameter that names or holds a password (``password=``,
    ``sentinel_kwargs={"password": ...}``, percent-encoded or not) as ``***``."""
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:  # not parseable: show only the scheme
        return url.split("://", 1)[0] + "://***"
    if not any(SECRET_WORD.search(k + v) for k, v in query):
        return url
    query = [(k, "***" if SECRET_WORD.search(k + v) else v) for k, v in query]
    return parts._replace(query=urlencode(query, safe="*")).geturl()


def _mask_value(match: re.Match) -> str:
    quote = match.group(2)[0] if match.group(2)[0] in "\"'" else ""
    return f"{match.group(1)}{quote}***{quote}"


def mask_secrets(text: str) -> str:
    """``text`` with the passwords in its URLs and ``password=...`` values masked."""
    text = URL.sub(lambda m: _mask_query(m.group(0)), USERINFO.sub(r"\1:***@", text))
    return SECRET_PAIR.sub(_mask_value, text)


LOG_VALUE_CHARS = 8192  # a longer value is cut (a poison message's 100 KB id, a 17 MB body)


def _clipped(text: str, keep_end: bool = False) -> str:
    """``text`` cut to ``LOG_VALUE_CHARS`` at a space, the cut token dropped whole (a password
    is never shown in part); tracebacks keep their end."""
    if len(text) <= LOG_VALUE_CHARS:
        return text
    if keep_end:
        tail = text[-LOG_VALUE_CHARS:]
        space = re.search(r"\s", tail)
        tail = tail[space.start():] if space else ""
        return f"[{len(text) - len(tail)} characters cut]{tail}"
    head = text[:LOG_VALUE_CHARS]
    head = head[:max(head.rfind(c) for c in " \t\n\r\f\v") + 1]
    return f"{head}[{len(text) - len(head)} characters cut]"


def _masked(value, key: str = ""):
    if isinstance(value, str):
        return mask_secrets(_clipped(value, keep_end=key == "exception"))
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return mask_secrets(_clipped(repr(value)))  # what JSONRenderer would print, masked


def mask_processor(_logger, _method, event_dict: dict) -> dict:
    """structlog processor: mask passwords in every value (URLs, ``password=``), each value cut
    to ``LOG_VALUE_CHARS``."""
    return {k: _masked(v, k) for k, v in event_dict.items()}


def _stderr():
    """The process's real stderr: Celery redirects ``sys.stderr`` into logging (a loop), and
    test runners swap it for a file they later close."""
    return sys.__stderr__ or sys.stderr


LOG_FORMATS = ("auto", "json", "console")
# a progress bar redrawn in place (tqdm: ``\r`` and ``12%|###  | 3/25``)
PROGRESS_BAR = re.compile(r"\r|\d+%\|")


def log_format(requested: str | None = None) -> str:
    """``json`` or ``console``: ``GENQ_LOG_FORMAT`` (``auto`` by default: console on a
    terminal, JSON when stderr is a file or a pipe)."""
    fmt = (requested or os.environ.get("GENQ_LOG_FORMAT") or "auto").strip().lower()
    if fmt not in LOG_FORMATS:
        raise ValueError(f"GENQ_LOG_FORMAT takes {', '.join(LOG_FORMATS)}; not {fmt!r}")
    if fmt == "auto":
        stream = _stderr()
        fmt = "console" if hasattr(stream, "isatty") and stream.isatty() else "json"
    return fmt


class DropProgressBars(logging.Filter):
    """Progress bars and banners that reach logging through Celery's redirected stdout and
    stderr (tqdm bars are redrawn with ``\r``: as log lines they are noise) are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "celery.redirected":
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot format: keep it as it is
            return True
        return not PROGRESS_BAR.search(message) and bool(message.strip())


def configure_logging(level: str = "INFO", fmt: str | None = None) -> None:
    """Route structlog and the standard library (Celery, transformers) to stderr: readable
    lines on a terminal, JSON lines elsewhere (``fmt`` or ``GENQ_LOG_FORMAT``)."""
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    console = log_format(fmt) == "console"
    if console:  # it renders exceptions itself
        stream = _stderr()
        colors = hasattr(stream, "isatty") and stream.isatty() and "NO_COLOR" not in os.environ
        tail = [mask_processor, structlog.dev.ConsoleRenderer(colors=colors)]
        shared[-1] = structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False)
    else:
        tail = [structlog.processors.format_exc_info, mask_processor,
                structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=[*shared, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *_: structlog.PrintLogger(_stderr()),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(_stderr())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    handler.addFilter(DropProgressBars())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet_libraries(level)


def quiet_libraries(level: str) -> None:
    """Banners, progress bars and library warnings to the log at DEBUG only: set before
    torch, transformers, vLLM and Unsloth load (they read these at import)."""
    debug = level.upper() == "DEBUG"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm reads it at import (vLLM's loading bars)
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # no handler of its own: ours
    # the level huggingface_hub and transformers set when they load, until adopt_library_loggers
    for variable in ("HF_HUB_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(variable, "debug" if debug else "error")
    if not debug:  # torch's C++ warnings (vLLM's NUMA binding) are raw lines on stderr
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    logging.captureWarnings(True)
    cli = logging.getLevelName(level.upper()) in (logging.WARNING, logging.ERROR, logging.CRITICAL)
    LIBRARY_LEVELS.clear()
    LIBRARY_LEVELS.update({name: logging.DEBUG if debug else logging.ERROR for name in NOISY})
    LIBRARY_LEVELS.update({name: logging.DEBUG if debug else logging.ERROR if cli
                           else logging.WARNING for name in CHATTY})
    adopt_library_loggers()


def adopt_library_loggers() -> None:
    """Give the libraries' loggers back to genqueue's one handler: huggingface_hub and
    transformers add a handler of their own when they load (a second, plain copy of each
    line), transformers stops propagating, and they reset their level. Call again after
    they are imported (``worker.engine.loading`` does); idempotent."""
    for name, level in LIBRARY_LEVELS.items():
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(level)


def say(message: str, _file=None) -> None:
    """Celery's ``safe_say`` (the shutdown notes its signal handlers print to stdout, between
    blank lines) as one log line in this process's format; written with ``os.write`` as
    Celery's is, so a signal handler takes no lock."""
    event = {"event": message.strip(), "logger": "celery.apps.worker"}
    for processor in structlog.get_config()["processors"]:
        event = processor(None, "info", event)
    os.write(_stderr().fileno(), f"{event}\n".encode())


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
