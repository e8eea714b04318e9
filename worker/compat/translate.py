"""OpenAI request bodies as genqueue requests: chat and legacy completions bodies, bare or as
Batch API lines (``{"custom_id", "method", "url", "body"}``). Every field genqueue does not
implement is refused by name."""

from __future__ import annotations

import json
from typing import Any

from worker.errors import InvalidRequest

# OpenAI chat-completions body fields -> genqueue request fields
OPENAI_FIELDS = {"messages": "messages", "max_tokens": "max_new_tokens",
                 "max_completion_tokens": "max_new_tokens", "temperature": "temperature",
                 "top_p": "top_p", "stop": "stop", "seed": "seed", "metadata": "metadata",
                 "n": "n", "logprobs": "logprobs", "top_logprobs": "top_logprobs",
                 "response_format": "response_format"}
# accepted and not used: the worker's model answers; ``user`` is the caller's own label
OPENAI_IGNORED = {"model", "user"}
# accepted only at the value that asks for nothing genqueue does not do
OPENAI_NEUTRAL = {"stream": (False,), "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0),
                  "stream_options": (None,), "logit_bias": ({},), "store": (False,)}
# the same for OpenAI's legacy ``/v1/completions`` (a raw ``prompt``, no chat template); its
# ``logprobs`` is a count of candidates (``top_logprobs``), and genqueue's ``response_format``
# is taken there too
COMPLETION_FIELDS = {"prompt": "prompt", "max_tokens": "max_new_tokens",
                     "temperature": "temperature", "top_p": "top_p", "stop": "stop",
                     "seed": "seed", "n": "n", "logprobs": "top_logprobs",
                     "response_format": "response_format"}
COMPLETION_NEUTRAL = {"best_of": (1,), "stream": (False,),
                      "echo": (False,), "suffix": (None,), "frequency_penalty": (0, 0.0),
                      "presence_penalty": (0, 0.0), "stream_options": (None,),
                      "logit_bias": ({},)}
CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
# OpenAI's defaults where a body leaves a field out: it samples (temperature 1) and, for chat,
# writes until the context is full; legacy completions stop at 16 tokens (the token limits are
# set by ``worker.submission.checker``, which knows the prompt's length)
OPENAI_TEMPERATURE = 1.0
COMPLETION_MAX_TOKENS = 16


def from_openai(line: dict[str, Any], *, openai_defaults: bool = False,
                url: str | None = None) -> dict[str, Any]:
    """Translate an OpenAI request into a genqueue request dict: a Batch line (``{"custom_id",
    "method", "url", "body"}``) or a bare request body (then ``url`` says which endpoint's,
    default ``/v1/chat/completions``). Chat and legacy completions bodies are taken.

    Message ``content`` may be a list of text parts (joined with newlines); ``stop`` a string
    or a list; a field set to null counts as absent. Every field genqueue does not implement
    is refused by name, as is a neutral field (``stream``, ``logit_bias``...) at any other value.

    ``openai_defaults`` (the OpenAI HTTP surface): OpenAI's ``temperature`` 1 (sampling) where
    the body gives none; its token-limit defaults need the prompt's length
    (``worker.submission.checker``). Without it (the native routes, ``genq run``) genqueue's
    defaults stay: greedy, 256 tokens.
    """
    if "body" in line:
        prefix, url, body = "body.", line.get("url"), _line_body(line)
    else:
        prefix, body = "", line
    chat = (url or CHAT_URL) == CHAT_URL
    request = _fields(body, prefix, *((OPENAI_FIELDS, OPENAI_NEUTRAL) if chat
                                      else (COMPLETION_FIELDS, COMPLETION_NEUTRAL)))
    if not chat and "top_logprobs" in request:  # legacy: ``logprobs: 3`` = 3 candidates
        request["logprobs"] = True
    if "messages" in request:
        request["messages"] = _messages(request["messages"], prefix)
    if "prompt" in request:
        request["prompt"] = _prompt(request["prompt"], prefix)
    if openai_defaults:
        request.setdefault("temperature", OPENAI_TEMPERATURE)
    if "custom_id" in line and prefix:
        request["custom_id"] = line["custom_id"]
    return request


def _line_body(line: dict[str, Any]) -> dict[str, Any]:
    """A Batch line's ``body``, once its ``url`` and ``method`` are ones genqueue serves."""
    url = line.get("url")
    if url not in (None, CHAT_URL, COMPLETIONS_URL):
        raise InvalidRequest(f"url: only {CHAT_URL} and {COMPLETIONS_URL} are supported, "
                             f"not {url!r}")
    if line.get("method", "POST") != "POST":
        raise InvalidRequest("method: only POST is supported")
    body = line.get("body")
    if not isinstance(body, dict):
        raise InvalidRequest("body: must be an object")
    return body


def _fields(body: dict[str, Any], prefix: str, fields: dict[str, str],
            neutral: dict[str, tuple]) -> dict[str, Any]:
    """The body's fields under genqueue's names; any other refused by name (genqueue's own
    name of an OpenAI field told OpenAI's)."""
    native: dict[str, str] = {}  # genqueue's name -> OpenAI's, where they differ
    for theirs, ours in fields.items():
        if ours not in fields:
            native.setdefault(ours, theirs)
    request: dict[str, Any] = {}
    for key, value in body.items():
        if key in fields:
            if value is None:  # OpenAI: null is the default
                continue
            target = fields[key]
            if target in request and request[target] != value:
                raise InvalidRequest(f"{prefix}{key}: differs from the other token limit "
                                     "(max_tokens and max_completion_tokens); give one")
            request[target] = value
        elif key in neutral:
            if value is not None and (isinstance(value, bool) != isinstance(
                    neutral[key][0], bool) or value not in neutral[key]):
                raise InvalidRequest(f"{prefix}{key}: {json.dumps(value)[:40]} is not supported "
                                     f"(only {json.dumps(neutral[key][0])})")
        elif key in native:
            raise InvalidRequest(f"{prefix}{key}: {key} is genqueue's native name; the OpenAI "
                                 f"routes take {native[key]}")
        elif key not in OPENAI_IGNORED:
            raise InvalidRequest(f"{prefix}{key}: not supported")
    return request


def _messages(messages: Any, prefix: str) -> Any:
    """OpenAI messages as genqueue's: ``content`` as a list of text parts joined with newlines
    (any other part refused by name), the ``developer`` role as ``system``."""
    if not isinstance(messages, list):
        return messages  # the schema says what is wrong
    out = []
    for i, message in enumerate(messages):
        if isinstance(message, dict):
            message = dict(message)
            if message.get("role") == "developer":
                message["role"] = "system"
            content = message.get("content")
            if isinstance(content, list):
                message["content"] = "\n".join(_text_parts(content, f"{prefix}messages[{i}].content"))
        out.append(message)
    return out


def _text_parts(parts: list[Any], where: str) -> list[str]:
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            shown = repr(kind) if isinstance(kind, str) else "a part without a type"
            raise InvalidRequest(f"{where}[{j}]: only text parts ({{\"type\": \"text\", "
                                 f"\"text\": ...}}) are supported, not {shown[:60]}")
        if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
            raise InvalidRequest(f"{where}[{j}]: a text part is {{\"type\": \"text\", "
                                 f"\"text\": \"...\"}} and nothing else")
        texts.append(part["text"])
    if not texts:
        raise InvalidRequest(f"{where}: an empty list of parts")
    return texts


def _prompt(prompt: Any, prefix: str) -> Any:
    """A completions ``prompt``: one string (or a list holding one); token ids are refused."""
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            return prompt[0]
        raise InvalidRequest(f"{prefix}prompt: only one prompt, as text, is supported "
                             "(not a list of prompts or token ids)")
    return prompt


def is_batch_line(obj: Any) -> bool:
    """Whether ``obj`` is an OpenAI Batch line rather than a plain request."""
    return isinstance(obj, dict) and "body" in obj and ("url" in obj or "method" in obj)
