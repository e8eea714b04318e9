"""An OpenAI Chat Completions or Completions body as a genqueue request: strict JSON, the
stream options, OpenAI's defaults (``max_tokens`` absent: as many as fit), ``model`` as the
adapter, interactive priority; and genqueue's messages in OpenAI's field names."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request

from worker.batchfile import CHAT_URL, COMPLETION_MAX_TOKENS, COMPLETIONS_URL, from_openai, strict_json
from worker.compat.models import resolve_model, served
from worker.errors import InvalidRequest, PromptTooLong


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
    """genqueue's field names -> the OpenAI names this body used, for its error messages."""
    names = {"max_new_tokens": "max_completion_tokens" if body.get("max_completion_tokens")
             is not None and body.get("max_tokens") is None and url == CHAT_URL else "max_tokens"}
    if url == COMPLETIONS_URL:
        names["top_logprobs"] = "logprobs"
    return names


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


def openai_request(owner, settings, body: dict[str, Any], url: str,
                   model: str | None) -> dict[str, Any]:
    """The genqueue request for an OpenAI body: OpenAI's defaults, ``model`` as the adapter,
    interactive priority. Reads the fleet and the published tokenizer (blocking: run it in
    a thread)."""
    adapter = resolve_model(model, served(owner, settings))
    limited = any(body.get(k) is not None for k in ("max_tokens", "max_completion_tokens"))
    req = from_openai(body, url=url, openai_defaults=True)
    if adapter is not None:
        req["adapter"] = adapter
    req["priority"] = "interactive"
    if not limited:  # chat: as many as fit; legacy completions: 16 if they fit
        fit = max_tokens_default(owner, settings, req)
        req["max_new_tokens"] = fit if url == CHAT_URL else min(COMPLETION_MAX_TOKENS, fit)
    return req


def max_tokens_default(owner, settings, request: dict[str, Any]) -> int:
    """OpenAI's absent ``max_tokens`` (write until the context is full): the model's context
    left after the prompt, as the workers count it, capped by the workers' (else this
    gateway's) ``GENQ_MAX_NEW_TOKENS_LIMIT``. Until a worker has published its tokenizer,
    the cap alone (a worker then refuses a prompt that leaves less room: ``prompt_too_long``)."""
    limits = [int(w["max_new_tokens_limit"]) for w in owner.store.workers()
              if isinstance(w.get("max_new_tokens_limit"), int)]
    cap = min(limits) if limits else settings.max_new_tokens_limit
    counter = owner.counter.get()
    if counter is None:
        return cap
    try:
        prompt = counter.count({**request, "max_new_tokens": 1})
    except InvalidRequest:
        raise
    except Exception:  # a template error: the worker reports it for this request alone
        return cap
    room = counter.context_length - prompt
    if room < 1:
        raise PromptTooLong(f"prompt has {prompt} tokens; it fills the context "
                            f"{counter.context_length}")
    return min(cap, room)
