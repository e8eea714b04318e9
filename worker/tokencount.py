"""Exact prompt-token counts at enqueue time, without torch or transformers.

Workers publish their tokenizer (``tokenizer.json``, chat template, special tokens, context
length) to Redis at start. The client and the gateway rebuild it with the ``tokenizers``
library and jinja2, render chat messages exactly as transformers does, and reject a request
whose prompt plus ``max_new_tokens`` does not fit before anything is queued. Without a
published tokenizer the check is left to the worker, as before.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

TOKENIZER_KEY = "genq:tokenizer"


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
        """Prompt tokens of a validated request dict (no padding)."""
        if request.get("messages") is not None:
            if self.template is None:
                raise ValueError("the model has no chat template")
            text = self.template.render(messages=request["messages"], add_generation_prompt=True,
                                        **self.special)
            return len(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return len(self.tokenizer.encode(request["prompt"], add_special_tokens=True).ids)

    def check(self, request: dict[str, Any]) -> int:
        """The count, or ``PromptTooLong`` exactly where the worker would say so."""
        from worker.errors import PromptTooLong

        n = self.count(request)
        new = int(request.get("max_new_tokens") or 256)
        if self.max_prompt_tokens and n > self.max_prompt_tokens:
            raise PromptTooLong(f"prompt has {n} tokens; the limit is {self.max_prompt_tokens}")
        if n + new > self.context_length:
            raise PromptTooLong(f"prompt has {n} tokens + max_new_tokens {new} > "
                                f"context {self.context_length}")
        return n


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
