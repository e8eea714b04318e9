"""An OpenAI Chat Completions or Completions body as the routes read it: strict JSON, the
stream options, and genqueue's messages in OpenAI's field names (the request itself is
checked by ``worker.submission.checker``)."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request

from worker.compat.translate import CHAT_URL, COMPLETIONS_URL
from worker.errors import InvalidRequest
from worker.submission.lines import strict_json


async def json_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object (strict JSON: no NaN or Infinity)."""
    raw = await request.body()
    try:
        body = json.loads(raw, parse_constant=strict_json)
    except ValueError as exc:
        raise InvalidRequest(f"the body is not JSON: {str(exc)[:200]}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


def openai_names(body: dict[str, Any], url: str) -> dict[str, str]:
    """genqueue's field names -> the OpenAI names this body used, for its error messages; a
    native name the body itself sent (``max_new_tokens``, refused by name) stays as sent."""
    names = {"max_new_tokens": "max_completion_tokens" if body.get("max_completion_tokens")
             is not None and body.get("max_tokens") is None and url == CHAT_URL else "max_tokens"}
    if url == COMPLETIONS_URL:
        names["top_logprobs"] = "logprobs"
    return {ours: theirs for ours, theirs in names.items() if ours not in body}


def openai_message(message: str, names: dict[str, str]) -> tuple[str, str | None]:
    """(``message`` in OpenAI's field names, the ``param`` it is about): genqueue's
    ``max_new_tokens: 5000 is above the limit 2048`` is ``max_tokens: 5000 ...``, param
    ``max_tokens``."""
    for ours, theirs in names.items():
        message = re.sub(rf"\b{ours}\b", theirs, message)
    head = message.split(":", 1)[0] if ":" in message else ""
    param = head if re.fullmatch(r"[A-Za-z_][\w.\[\]]*", head) else None
    return message, param


def stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage), taken out of ``body``."""
    stream = body.pop("stream", None)
    options = body.pop("stream_options", None)
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream: must be a boolean")
    if options is not None:
        if not stream:
            raise InvalidRequest("stream_options: only with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage",
                                                            "include_obfuscation"}:
            raise InvalidRequest("stream_options: only include_usage is supported")
        if not isinstance(options.get("include_usage", False), bool):
            raise InvalidRequest("stream_options.include_usage: must be a boolean")
    return bool(stream), bool((options or {}).get("include_usage"))
