"""JSONL batch input: plain request objects or OpenAI Batch API lines, validated line by line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from worker.errors import InvalidRequest
from worker.schema import validate_request

# OpenAI chat-completions body fields -> genqueue request fields
OPENAI_FIELDS = {"messages": "messages", "max_tokens": "max_new_tokens",
                 "max_completion_tokens": "max_new_tokens", "temperature": "temperature",
                 "top_p": "top_p", "stop": "stop", "seed": "seed", "metadata": "metadata"}
# accepted and not used: the worker's model answers; ``user`` is the caller's own label
OPENAI_IGNORED = {"model", "user"}
# accepted only at the value that asks for nothing genqueue does not do
OPENAI_NEUTRAL = {"n": (1,), "stream": (False,), "logprobs": (False,), "top_logprobs": (0,),
                  "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0)}


@dataclass
class Line:
    """One input line: its number (from 1), and the request or the error."""

    number: int
    request: dict[str, Any] | None = None
    error: str | None = None


def from_openai(line: dict[str, Any]) -> dict[str, Any]:
    """Translate an OpenAI Batch line (``/v1/chat/completions``) into a request dict."""
    if line.get("url") not in (None, "/v1/chat/completions"):
        raise InvalidRequest(f"url: only /v1/chat/completions is supported, not {line['url']!r}")
    if line.get("method", "POST") != "POST":
        raise InvalidRequest("method: only POST is supported")
    body = line.get("body")
    if not isinstance(body, dict):
        raise InvalidRequest("body: must be an object")
    request: dict[str, Any] = {}
    for key, value in body.items():
        if key in OPENAI_FIELDS:
            request[OPENAI_FIELDS[key]] = value
        elif key in OPENAI_NEUTRAL:
            if value is not None and (isinstance(value, bool) != isinstance(
                    OPENAI_NEUTRAL[key][0], bool) or value not in OPENAI_NEUTRAL[key]):
                raise InvalidRequest(f"body.{key}: {json.dumps(value)[:40]} is not supported "
                                     f"(only {json.dumps(OPENAI_NEUTRAL[key][0])})")
        elif key not in OPENAI_IGNORED:
            raise InvalidRequest(f"body.{key}: not supported")
    if "custom_id" in line:
        request["custom_id"] = line["custom_id"]
    return request


def is_batch_line(obj: Any) -> bool:
    """Whether ``obj`` is an OpenAI Batch line rather than a plain request."""
    return isinstance(obj, dict) and "body" in obj and ("url" in obj or "method" in obj)


def to_request(obj: Any, max_new_tokens_limit: int | None = None) -> dict[str, Any]:
    """A validated request dict from a plain request object or an OpenAI Batch line."""
    if is_batch_line(obj):
        obj = from_openai(obj)
    return validate_request(obj, max_new_tokens_limit=max_new_tokens_limit).model_dump(
        exclude_none=True)


def read_lines(lines: Iterable[str | bytes], max_new_tokens_limit: int | None = None
               ) -> Iterator[Line]:
    """Parse and validate each non-blank line (schema and limits); errors are reported, never
    raised."""
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:
            yield Line(number, error="not UTF-8")
            continue
        if not text.strip():
            continue
        try:
            yield Line(number, request=to_request(json.loads(text, parse_constant=strict_json),
                                                  max_new_tokens_limit))
        except json.JSONDecodeError as exc:
            yield Line(number, error=json_error(exc))
        except InvalidRequest as exc:
            yield Line(number, error=exc.message)
        except RecursionError:
            yield Line(number, error="JSON nested too deeply")
        except ValueError as exc:  # NaN or Infinity
            yield Line(number, error=str(exc))


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
