"""The lines of an OpenAI Batch input file, each read, checked and tokenized once.

Two kinds of fault, as OpenAI tells them apart: a **file-level** one (not JSON, no
``custom_id`` or a duplicate one, another ``method`` or ``url`` than the batch's, an unknown
field, a ``body`` that is not an object) fails the whole batch; a **body** genqueue cannot run
(bad messages or parameters, a prompt too long, an unknown model) is that line's own answer
(400, or 404 for the model) in the error file, and the other lines run.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from worker.errors import InvalidRequest, ModelNotFound
from worker.submission.checker import Checker
from worker.submission.jobs import CHECK_BATCH
from worker.submission.lines import Line, batched, parse

PARAM = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")
LINE_FIELDS = {"custom_id", "method", "url", "body"}


@dataclass
class Fault:
    """A line with a file-level fault (an OpenAI batch error): the whole batch fails."""

    number: int
    fault: dict[str, Any]


def fault(code: str, message: str, line: int | None, param: str | None = None) -> dict:
    """An entry of a failed batch's ``errors.data``."""
    return {"code": code, "message": message, "param": param, "line": line}


def param_of(message: str, body: Any = None) -> str | None:
    """The OpenAI parameter an error message names first (``body.max_tokens`` for genqueue's
    ``max_new_tokens``)."""
    match = PARAM.match(message)
    if not match:
        return None
    name = match.group(1)
    if name.startswith(("body", "custom_id", "url", "method")):
        return name
    if name == "max_new_tokens":
        given = body if isinstance(body, dict) else {}
        name = "max_completion_tokens" if given.get("max_completion_tokens") is not None and \
            given.get("max_tokens") is None else "max_tokens"
    return f"body.{name}"


def entries(stream, endpoint: str, check: Checker) -> Iterator[Line | Fault]:
    """Each non-blank line of the open file ``stream``, in file order: a ``Line`` holding its
    request or its body's ``error`` (a JSON object: ``code``, ``message``, ``param``), or a
    file-level ``Fault``. Bodies are checked ``CHECK_BATCH`` at a time (their prompts counted
    together)."""
    seen: set[str] = set()
    parsed = (_parse_line(number, raw, endpoint, seen) for number, raw in enumerate(stream, 1))
    for chunk in batched((entry for entry in parsed if entry is not None), CHECK_BATCH):
        todo = [entry for entry in chunk if isinstance(entry, Line)]
        for entry, checked in zip(todo, check.check_many([e.body for e in todo]), strict=True):
            body, entry.body = entry.body["body"], None
            if isinstance(checked, ModelNotFound):
                entry.error = {"code": "model_not_found", "param": "body.model",
                               "message": f"body.model: {checked.message}"}
            elif isinstance(checked, InvalidRequest):
                param = param_of(checked.message, body)
                entry.error = {"code": checked.code, "message": checked.message,
                               **({"param": param} if param else {})}
            else:
                entry.request = checked
        yield from chunk


def _parse_line(number: int, raw: bytes, endpoint: str, seen: set[str]) -> Line | Fault | None:
    """A line to check (its ``body`` the whole Batch line), its file-level ``Fault``, or None
    for a blank line."""
    line, bad = parse(raw)
    if line is None and bad is None:
        return None
    bad = fault("invalid_json_line", bad, number) if bad is not None else \
        _check_line(number, line, endpoint, seen)
    if bad is not None:
        return Fault(number, fault=bad)
    return Line(number, custom_id=line["custom_id"], body=line)


def _check_line(number: int, line: Any, endpoint: str, seen: set[str]) -> dict | None:
    """The line's file-level fault, or None."""
    if not isinstance(line, dict):
        return fault("invalid_json_line", "a line must be a JSON object", number)
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return fault("missing_required_parameter", "custom_id: a non-empty string is required",
                     number, "custom_id")
    if custom_id in seen:
        return fault("duplicate_custom_id", f"custom_id {custom_id[:64]!r} is used by an "
                     "earlier line; custom_ids must be unique in the file", number, "custom_id")
    seen.add(custom_id)
    extra = set(line) - LINE_FIELDS
    if extra:
        return fault("invalid_request", f"unknown field(s): {', '.join(sorted(extra))}",
                     number, sorted(extra)[0])
    if line.get("method") != "POST":
        return fault("invalid_request", "method: must be 'POST'", number, "method")
    if line.get("url") != endpoint:
        return fault("invalid_url", f"url: {str(line.get('url'))[:64]!r} does not match the "
                     f"batch's endpoint {endpoint!r}", number, "url")
    if not isinstance(line.get("body"), dict):
        return fault("invalid_request", "body: must be an object", number, "body")
    return None
