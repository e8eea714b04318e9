"""Exact prompt-token counts at enqueue time, without torch or transformers.

Workers publish their tokenizer (``tokenizer.json``, chat template, special tokens, context
length) to Redis at start. The client and the gateway rebuild it with the ``tokenizers``
library and jinja2, render chat messages exactly as transformers does, and reject a request
whose prompt plus ``max_new_tokens`` does not fit before anything is queued. Without a
published tokenizer the check is left to the worker, as before.

User text never yields control tokens: ``prompt_parts`` (shared with the worker's
``worker.engine.prompts.encode``) says which text is tokenized with special tokens split.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from typing import Any

TOKENIZER_KEY = "genq:tokenizer"
UNSPLITTABLE = "the chat template alters a message holding special-token text; it cannot be kept plain"


def special_pattern(added_tokens: dict[int, Any]) -> re.Pattern | None:
    """A regex matching the text of any special added token (``None`` if there are none);
    ``added_tokens`` maps id to ``AddedToken``, as ``Tokenizer.get_added_tokens_decoder()``
    and transformers' ``added_tokens_decoder`` give it."""
    texts = sorted({t.content for t in added_tokens.values() if t.special}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def chat_parts(render: Callable[[list[dict]], str], messages: list[dict],
               pattern: re.Pattern | None) -> list[tuple[str, bool]]:
    """The chat prompt ``render(messages)`` as ``(text, plain)`` parts, in order.

    A message content holding special-token text is a plain part: tokenized with special
    tokens split, it cannot forge the template's markup. Everything else (the template's
    text and every other content) is one part tokenized as before, since tokenizing ordinary
    text in pieces can change its ids at the seams. Plain contents are found by rendering
    again with each replaced by a sentinel: the template text between sentinels must frame
    the content (or ``content.strip()``, for templates that trim it) in the real rendering,
    else ``ValueError`` (a template that rewrites such a content cannot be split safely).
    """
    text = render(messages)
    flagged = {i for i, m in enumerate(messages) if pattern and pattern.search(m["content"])}
    if not flagged:
        return [(text, False)]
    used = set(text)
    mark = next((chr(c) for c in range(0xE000, 0xF900) if chr(c) not in used), None)
    if mark is None:
        raise ValueError("the prompt uses every private-use character; none is left to mark it")
    skeleton = render([{**m, "content": f"{mark}{i}{mark}"} if i in flagged else m
                       for i, m in enumerate(messages)])
    pieces = re.split(f"{mark}(\\d+){mark}", skeleton)
    parts: list[tuple[str, bool]] = []
    pos = 0
    for k in range(0, len(pieces) - 1, 2):
        frame, content, after = pieces[k], messages[int(pieces[k + 1])]["content"], pieces[k + 2]
        if not text.startswith(frame, pos):
            raise ValueError(UNSPLITTABLE)
        pos += len(frame)
        found = next((c for c in (content, content.strip()) if text.startswith(c + after, pos)),
                     None)
        if found is None:
            raise ValueError(UNSPLITTABLE)
        parts += [(frame, False), (found, True)]
        pos += len(found)
    if text[pos:] != pieces[-1]:
        raise ValueError(UNSPLITTABLE)
    parts.append((pieces[-1], False))
    return [p for p in parts if p[0]]


def prompt_parts(messages: list[dict] | None, prompt: str | None, raw_special_tokens: bool,
                 render: Callable[[list[dict]], str],
                 pattern: re.Pattern | None) -> list[tuple[str, bool, bool]]:
    """``(text, add_special_tokens, split_special_tokens)`` parts whose ids, concatenated,
    are the prompt: chat messages as ``chat_parts`` splits them (the template holds any BOS),
    a raw prompt with the tokenizer's special tokens added and any special-token text in it
    split, unless the request sets ``raw_special_tokens``."""
    if messages is not None:
        return [(text, False, plain) for text, plain in chat_parts(render, messages, pattern)]
    return [(prompt, True, not raw_special_tokens)]


def publish(redis_client, engine, ttl_s: int) -> None:
    """Store the engine's tokenizer for enqueue-time counting (a worker calls this at start)."""
    tok = engine.tokenizer
    spec = {
        "model": engine.model_name,
        "tokenizer_json": tok.backend_tokenizer.to_str(),
        "chat_template": tok.chat_template,
        "special_tokens": {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)},
        "context_length": engine.context_length,
        "max_prompt_tokens": engine.max_prompt_tokens,
    }
    raw = json.dumps(spec)
    spec_hash = hashlib.sha256(raw.encode()).hexdigest()[:16]
    pipe = redis_client.pipeline(transaction=False)
    pipe.set(TOKENIZER_KEY, raw, ex=ttl_s)
    pipe.set(f"{TOKENIZER_KEY}:hash", spec_hash, ex=ttl_s)
    pipe.execute()


class PromptCounter:
    """Counts prompt tokens the way the worker will; reloads when the workers' tokenizer changes."""

    def __init__(self, spec: dict[str, Any]):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        self.model = spec["model"]
        self.tokenizer = Tokenizer.from_str(spec["tokenizer_json"])
        # a second instance for user text: the gateway counts from several threads at once
        self.plain = Tokenizer.from_str(spec["tokenizer_json"])
        self.plain.encode_special_tokens = True
        self.pattern = special_pattern(self.tokenizer.get_added_tokens_decoder())
        self.special = spec["special_tokens"]
        self.context_length = spec["context_length"]
        self.max_prompt_tokens = spec.get("max_prompt_tokens")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, **kw)

        def raise_exception(message):
            raise ValueError(message)

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        self.template = env.from_string(spec["chat_template"]) if spec["chat_template"] else None

    def count(self, request: dict[str, Any]) -> int:
        """Prompt tokens of a validated request dict (no padding), as the worker's ``encode``;
        ``ValueError`` when its template cannot render it."""
        counted = self.count_many([request])[0]
        if isinstance(counted, Exception):
            raise counted
        return counted

    def count_many(self, requests: list[dict[str, Any]]) -> list[int | Exception]:
        """``count`` for many requests, their text tokenized in one batch per tokenizer (its
        threads, not one call per prompt); a request its template cannot render gets the
        exception instead."""
        counts: list[int | Exception] = [0] * len(requests)
        groups: dict[tuple[bool, bool], list[tuple[int, str]]] = {}
        for i, request in enumerate(requests):
            try:
                for text, add, split in self._parts(request):
                    groups.setdefault((add, split), []).append((i, text))
            except Exception as exc:  # noqa: BLE001 - the template's error, for this one alone
                counts[i] = exc
        for (add, split), items in groups.items():
            tokenizer = self.plain if split else self.tokenizer
            encoded = tokenizer.encode_batch([text for _, text in items], add_special_tokens=add)
            for (i, _), enc in zip(items, encoded, strict=True):
                if not isinstance(counts[i], Exception):
                    counts[i] += len(enc.ids)
        return counts

    def _parts(self, request: dict[str, Any]) -> list[tuple[str, bool, bool]]:
        messages = request.get("messages")
        if messages is not None and self.template is None:
            raise ValueError("the model has no chat template")
        return prompt_parts(messages, request.get("prompt"),
                            bool(request.get("raw_special_tokens")), self._render, self.pattern)

    def _render(self, messages: list[dict]) -> str:
        return self.template.render(messages=messages, add_generation_prompt=True, **self.special)

    def check_length(self, prompt: int, new: int) -> None:
        """``PromptTooLong`` where a prompt of ``prompt`` tokens and ``new`` more do not fit."""
        from worker.errors import PromptTooLong

        if self.max_prompt_tokens and prompt > self.max_prompt_tokens:
            raise PromptTooLong(f"prompt has {prompt} tokens; the limit is {self.max_prompt_tokens}")
        if prompt + new > self.context_length:
            raise PromptTooLong(f"prompt has {prompt} tokens + max_new_tokens {new} > "
                                f"context {self.context_length}")


class CounterCache:
    """The current ``PromptCounter`` for a Redis, re-read when the published hash changes."""

    def __init__(self, redis_client, refresh_s: float = 30.0):
        self.redis = redis_client
        self.refresh_s = refresh_s
        self._counter: PromptCounter | None = None
        self._hash: str | None = None
        self._checked = 0.0

    def get(self) -> PromptCounter | None:
        now = time.monotonic()
        if now - self._checked < self.refresh_s:
            return self._counter
        self._checked = now
        current = self.redis.get(f"{TOKENIZER_KEY}:hash")
        if current is None:
            self._counter = self._hash = None
        elif current != self._hash:
            raw = self.redis.get(TOKENIZER_KEY)
            self._counter = PromptCounter(json.loads(raw)) if raw else None
            self._hash = current
        return self._counter
