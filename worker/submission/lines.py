"""Reading a source once: JSONL lines (numbered from 1) or a JSON list's items, each parsed
into a ``Line`` holding the object, or the reason it is not JSON. Nothing is validated here
(``worker.submission.checker`` does that, once)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from worker.errors import InvalidRequest


@dataclass
class Line:
    """One item of a source: its number (from 1), its parsed ``body`` before checking, its
    ``request`` after, or its ``error``; ``custom_id`` for OpenAI Batch lines."""

    number: int
    request: dict[str, Any] | None = None
    error: str | None = None
    body: Any = None
    custom_id: str | None = None
    item: bool = False  # one of a list of requests (named by index from 0), not a file's line

    @property
    def where(self) -> str:
        """``line 3`` of a file, ``request 2`` of a list."""
        return f"request {self.number - 1}" if self.item else f"line {self.number}"


def parse(raw: str | bytes) -> tuple[Any, str | None]:
    """(the JSON value, None) or (None, why it is not JSON); a blank line is (None, None)."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        return None, "not UTF-8"
    if not text.strip():
        return None, None
    try:
        return json.loads(text, parse_constant=strict_json), None
    except json.JSONDecodeError as exc:
        return None, json_error(exc)
    except RecursionError:
        return None, "JSON nested too deeply"
    except ValueError as exc:  # NaN or Infinity
        return None, str(exc)


def read_lines(lines: Iterable[str | bytes], limit: int | None = None) -> Iterator[Line]:
    """Each non-blank line parsed (``body``) or with its ``error``; ``InvalidRequest`` past
    ``limit`` non-blank lines."""
    count = 0
    for number, raw in enumerate(lines, start=1):
        body, error = parse(raw)
        if body is None and error is None:
            continue
        count += 1
        if limit is not None and count > limit:
            raise InvalidRequest(f"more than {limit} requests in one batch")
        yield Line(number, body=body, error=error)


def read_items(items: Iterable[Any]) -> Iterator[Line]:
    """Items already parsed (request dicts, OpenAI Batch lines), numbered from 1."""
    for number, item in enumerate(items, start=1):
        yield item if isinstance(item, Line) else Line(number, body=item, item=True)


def json_list(stream: IO[bytes]) -> list[Any]:
    """The items of a JSON list (a whole upload), or ``InvalidRequest``."""
    try:
        items = json.load(stream, parse_constant=strict_json)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(f"body is not JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("body is JSON nested too deeply") from None
    if not isinstance(items, list):
        raise InvalidRequest("body must be a JSON list of requests (or JSONL)")
    return items


def strict_json(constant: str) -> Any:
    """``json.loads(..., parse_constant=strict_json)``: NaN and Infinity are not JSON."""
    raise ValueError(f"not JSON: {constant} is not a JSON number")


def json_error(exc: json.JSONDecodeError) -> str:
    """A one-line description of a JSON syntax error in one line of a file."""
    text = exc.doc.rstrip("\r\n")
    if exc.pos >= len(text.rstrip()):
        return (f"not JSON: the line ends before the value does ({exc.msg}): "
                "a missing '}', ']' or '\"'?")
    at = "" if exc.msg.endswith(" at") else " at"
    return f"not JSON: {exc.msg}{at} character {exc.pos + 1}"


def batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    """Lists of ``n`` items (the last one shorter)."""
    it = iter(items)
    while part := list(itertools.islice(it, n)):
        yield part
