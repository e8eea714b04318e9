"""The lines of a Batch input file, each read, checked and tokenized once.

Two kinds of fault, as OpenAI tells them apart: a **file-level** one (not JSON, no
``custom_id`` or a duplicate one, another ``method`` or ``url`` than the batch's, an unknown
field, a ``body`` that is not an object) fails the whole batch; a **body** genqueue cannot run
(bad messages or parameters, a prompt too long, an unknown model) is that line's own answer
(400, or 404 for the model) in the error file, and the other lines run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from worker.batchfile import from_openai, json_error, strict_json
from worker.compat.models import resolve_model, served
from worker.errors import InvalidRequest, ModelNotFound, PromptTooLong

CHAT = "/v1/chat/completions"
PARAM = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")
LINE_FIELDS = {"custom_id", "method", "url", "body"}


@dataclass
class Entry:
    """One non-blank line: its number (from 1) and the request to queue, or its body's error
    (``code``, ``message``, ``param``), or a file-level ``fault`` (an OpenAI batch error)."""

    number: int
    custom_id: str | None = None
    request: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    fault: dict[str, Any] | None = None


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


class Translator:
    """OpenAI Batch lines as validated genqueue requests, as the synchronous routes take their
    bodies: OpenAI's defaults (temperature 1; chat writes as many tokens as fit the context,
    legacy completions 16), ``body.model`` naming the base model or an adapter, bulk priority,
    the completion window as the deadline. The prompt is tokenized once, as the workers count
    it (when one has published its tokenizer), for both the room left and the length check."""

    def __init__(self, view, settings, window_s: int):
        self.view, self.window_s = view, window_s
        self.bases = served(view, settings)
        limits = [int(w["max_new_tokens_limit"]) for w in view.store.workers()
                  if isinstance(w.get("max_new_tokens_limit"), int)]
        self.cap = min(limits) if limits else settings.max_new_tokens_limit
        self.counter = view.counter.get()

    def __call__(self, line: dict[str, Any]) -> dict[str, Any]:
        """The request to queue, or ``InvalidRequest`` (``PromptTooLong``) naming the field."""
        request = from_openai(line, openai_defaults=True)
        model = line["body"].get("model")
        if model is not None and not isinstance(model, str):
            raise InvalidRequest("body.model: must be a string")
        try:
            adapter = resolve_model(model, self.bases)
        except ModelNotFound as exc:
            raise InvalidRequest(f"body.model: {exc.message}") from None
        if adapter is not None:
            request["adapter"] = adapter
        request.update(priority="bulk", expires_in_s=self.window_s)
        fit = line.get("url") == CHAT and "max_new_tokens" not in request
        # schema and limits (no tokens yet; a placeholder where the room is not known yet)
        data = self.view._validated({**request, "max_new_tokens": 1} if fit else request,
                                    count_tokens=False)
        prompt = self._count(data)
        if fit:
            data["max_new_tokens"] = self.cap if prompt is None else self._room(prompt)
        if prompt is not None:
            self._check(prompt, data["max_new_tokens"])
        return data

    def _count(self, data: dict[str, Any]) -> int | None:
        if self.counter is None:
            return None
        try:
            return self.counter.count(data)
        except Exception:  # a template error: the worker reports it for this request alone
            return None

    def _room(self, prompt: int) -> int:
        """OpenAI's absent ``max_tokens``: the context left after the prompt, up to the cap."""
        room = self.counter.context_length - prompt
        if room < 1:
            raise PromptTooLong(f"prompt has {prompt} tokens; it fills the context "
                                f"{self.counter.context_length}")
        return min(self.cap, room)

    def _check(self, prompt: int, new: int) -> None:
        """``PromptTooLong`` exactly where the worker would say so."""
        limit, context = self.counter.max_prompt_tokens, self.counter.context_length
        if limit and prompt > limit:
            raise PromptTooLong(f"prompt has {prompt} tokens; the limit is {limit}")
        if prompt + new > context:
            raise PromptTooLong(f"prompt has {prompt} tokens + max_new_tokens {new} > "
                                f"context {context}")


def entries(stream, endpoint: str, translate: Translator) -> Iterator[Entry]:
    """Each non-blank line of the open file ``stream`` as an ``Entry``, in file order."""
    seen: set[str] = set()
    for number, raw in enumerate(stream, start=1):
        line, bad = _parse(number, raw)
        if line is None and bad is None:
            continue  # blank
        if bad is None:
            bad = _check_line(number, line, endpoint, seen)
        if bad is not None:
            yield Entry(number, fault=bad)
            continue
        entry = Entry(number, custom_id=line["custom_id"])
        try:
            entry.request = translate(line)
        except InvalidRequest as exc:
            code = "model_not_found" if exc.message.startswith("body.model:") else exc.code
            param = param_of(exc.message, line["body"])
            entry.error = {"code": code, "message": exc.message,
                           **({"param": param} if param else {})}
        yield entry


def _parse(number: int, raw: bytes) -> tuple[Any, dict | None]:
    """(the parsed line, None), (None, its fault), or (None, None) for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, fault("invalid_json_line", "not UTF-8", number)
    if not text.strip():
        return None, None
    try:
        return json.loads(text, parse_constant=strict_json), None
    except json.JSONDecodeError as exc:
        return None, fault("invalid_json_line", json_error(exc), number)
    except RecursionError:
        return None, fault("invalid_json_line", "JSON nested too deeply", number)
    except ValueError as exc:  # NaN or Infinity
        return None, fault("invalid_json_line", str(exc), number)


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
