"""Checking a request once, for every way in: the schema and limits, what the fleet serves,
and the prompt's tokens counted as the workers count them (when one has published its
tokenizer), with the context left for OpenAI bodies that give no token limit."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from worker.compat.translate import (
    CHAT_URL,
    COMPLETION_MAX_TOKENS,
    from_openai,
    is_batch_line,
)
from worker.errors import GenqError, InvalidRequest, ModelNotFound, PromptTooLong
from worker.ops.settings import get_settings
from worker.schema import validate_request
from worker.submission.lines import Line


@dataclass(frozen=True)
class OpenAIRoute:
    """How OpenAI bodies are taken: the endpoint, the priority, the deadline (a Batch's
    completion window). OpenAI's defaults apply (temperature 1; with no token limit, chat
    writes as many tokens as fit the context and legacy completions 16 if they fit), and
    ``model`` names the base model or one of its adapters."""

    url: str = CHAT_URL
    priority: str = "interactive"
    window_s: int | None = None


class Checker:
    """Checks request bodies for ``client`` (a ``GenerationClient``, its owner's view): one
    read of the fleet and the tokenizer for all the bodies it checks. ``check(body)`` gives
    the request dict to queue, or raises ``InvalidRequest`` (``PromptTooLong``,
    ``ModelNotFound``) naming the field. Without a client (``settings`` only) it checks what
    needs no broker: the schema and this machine's limits."""

    def __init__(self, client=None, openai: OpenAIRoute | None = None, settings=None):
        self.client, self.openai = client, openai
        self.settings = settings = client.settings if client else settings or get_settings()
        fleet = client._fleet_info() if client else []
        limits = [int(w["max_new_tokens_limit"]) for w in fleet
                  if isinstance(w.get("max_new_tokens_limit"), int)]
        self.cap = min(limits) if limits else settings.max_new_tokens_limit
        # a request may wait for a worker to start, never for an adapter no one said would run
        self.adapters = ({a for w in fleet for a in w.get("adapters") or ()} if fleet
                         else set(settings.adapters))
        self.raw_tokens = client.raw_tokens if client else True
        self.counter = client.counter.get() if client else None
        self.bases = None
        if openai is not None:
            from worker.compat.models import bases_of

            self.bases = bases_of(fleet, settings)

    def check(self, body: Any) -> dict[str, Any]:
        """The request to queue for ``body`` (a request dict, an OpenAI Batch line, or with
        an ``OpenAIRoute`` an OpenAI body or Batch line): ``admit(schema(body))``."""
        checked = self.check_many([body])[0]
        if isinstance(checked, GenqError):
            raise checked
        return checked

    def check_many(self, bodies: list[Any]) -> list[dict[str, Any] | GenqError]:
        """``check`` for each body, the prompts counted together: per body its request or
        the error (``InvalidRequest``, ``ModelNotFound``) it would raise."""
        out: list[dict[str, Any] | GenqError] = []
        staged: list[tuple[int, dict[str, Any], bool]] = []  # (index, request, fit)
        for body in bodies:
            try:
                fit = False
                if self.openai is not None:
                    body, fit = self._from_openai(body)
                data = self.schema({**body, "max_new_tokens": 1} if fit else body)
                self._allowed(data)
            except (InvalidRequest, ModelNotFound) as exc:
                out.append(exc)
                continue
            staged.append((len(out), data, fit))
            out.append(data)
        prompts = self._count([data for _, data, _ in staged])
        for (i, data, fit), prompt in zip(staged, prompts, strict=True):
            try:
                self._fit(data, fit, prompt)
            except InvalidRequest as exc:
                out[i] = exc
        return out

    def schema(self, body: Any) -> dict[str, Any]:
        """The request dict, if ``body`` (a request or an OpenAI Batch line, translated) has
        the schema and keeps within the limits."""
        if is_batch_line(body):
            body = from_openai(body)
        request = validate_request(body, max_new_tokens_limit=self.cap,
                                   max_prompt_chars=self.settings.max_prompt_chars)
        return request.model_dump(exclude_none=True, by_alias=True)

    def admit(self, data: dict[str, Any]) -> dict[str, Any]:
        """What this key and the fleet allow of a request ``schema`` gave (``_allowed``), and
        its prompt's length as the workers count it."""
        self._allowed(data)
        self._fit(data, False, self._count([data])[0])
        return data

    def _allowed(self, data: dict[str, Any]) -> None:
        """The workers' token limit, the adapters they serve, raw special tokens for this
        key, a webhook's address."""
        if data.get("max_new_tokens", 0) > self.cap:
            raise InvalidRequest(f"max_new_tokens: {data['max_new_tokens']} is above the "
                                 f"limit {self.cap}")
        if data.get("raw_special_tokens") and not self.raw_tokens:
            raise InvalidRequest("raw_special_tokens: this API key may not send raw special tokens")
        if data.get("adapter") is not None and data["adapter"] not in self.adapters:
            raise InvalidRequest(f"adapter: no worker serves adapter {data['adapter']!r}")
        if data.get("webhook_url"):
            check_webhook(data["webhook_url"], self.settings)

    def _fit(self, data: dict[str, Any], fit: bool, prompt: int | None) -> None:
        """With ``fit``, ``max_new_tokens`` set to what fits the context; then
        ``PromptTooLong`` where the worker would say so (``prompt``: None when not counted)."""
        if fit:
            room = self.cap if prompt is None else self._room(prompt)
            data["max_new_tokens"] = room if self.openai.url == CHAT_URL else min(
                COMPLETION_MAX_TOKENS, room)
        if prompt is not None:
            self.counter.check_length(prompt, data.get("max_new_tokens") or 256)

    def _from_openai(self, body: Any) -> tuple[dict[str, Any], bool]:
        """(the genqueue request of an OpenAI body or Batch line, whether its token limit is
        left to fit the context)."""
        from worker.compat.models import resolve_model

        route = self.openai
        line = is_batch_line(body)
        inner = body.get("body") if line else body
        inner = inner if isinstance(inner, dict) else {}
        model = inner.get("model")
        if model is not None and not isinstance(model, str):
            raise InvalidRequest(f"{'body.' if line else ''}model: must be a string")
        limited = any(inner.get(k) is not None for k in ("max_tokens", "max_completion_tokens"))
        request = from_openai(body, url=route.url, openai_defaults=True)
        adapter = resolve_model(model, self.bases)
        if adapter is not None:
            request["adapter"] = adapter
        request["priority"] = route.priority
        if route.window_s is not None:
            request["expires_in_s"] = route.window_s
        return request, not limited

    def _count(self, requests: list[dict[str, Any]]) -> list[int | None]:
        """The prompts' tokens; None for each without a published tokenizer, or where the
        template fails on it (the worker then reports that for this request alone)."""
        if self.counter is None or not requests:
            return [None] * len(requests)
        return [None if isinstance(n, Exception) else n
                for n in self.counter.count_many(requests)]

    def _room(self, prompt: int) -> int:
        """The context left after the prompt, up to the cap."""
        room = self.counter.context_length - prompt
        if room < 1:
            raise PromptTooLong(f"prompt has {prompt} tokens; it fills the context "
                                f"{self.counter.context_length}")
        return min(self.cap, room)


def check_webhook(url: str | None, settings) -> str | None:
    """A webhook URL as given, or ``InvalidRequest`` when it is not http(s) or names a
    non-public address literally (names are resolved and checked at delivery)."""
    if url is not None:
        from worker.queue.webhooks import UnsafeURL, check_url

        try:
            check_url(url, settings.webhook_allow_private, resolve=False)
        except UnsafeURL as exc:
            raise InvalidRequest(f"webhook_url: {exc}") from None
    return url


def check_lines(lines: Iterable[Line], check: Callable[[Any], dict[str, Any]]) -> Iterator[Line]:
    """Each line with ``check(body)`` as its ``request``, or the error that raised (a line that
    is not JSON keeps its own)."""
    for line in lines:
        if line.error is None:
            try:
                line.request, line.body = check(line.body), None
            except InvalidRequest as exc:
                line.error = exc.message
        yield line
