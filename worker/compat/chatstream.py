"""A chat request streamed as OpenAI's server-sent events (``chat.completion.chunk`` or
``text_completion``) from its running record's growing text."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog
from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from worker.compat import shapes
from worker.compat.chatwait import CLIENT_ERRORS, cancel_quietly
from worker.lifecycle import FINAL

log = structlog.get_logger(__name__)

STREAM_POLL_S = 0.05  # how often a stream reads a running record (it changes every 16 tokens
QUEUED_POLL_S = 0.2  # or 0.5 s); while queued (or when only the final answer is sent)
KEEPALIVE_S = 10.0  # an SSE comment this often while nothing else is sent


def visible_text(text: str, stops: list[str]) -> str:
    """The part of a running record's text that is sure to stay: cut at a stop string, less
    a tail that may begin one, less a trailing replacement character (an incomplete UTF-8
    sequence decoded early)."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    if cuts:
        return text[:min(cuts)]
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return text[:len(text) - hold].rstrip("\ufffd")


async def stream_events(request: Request, owner, rid: str, model: str, chat: bool,
                        include_usage: bool, timeout_s: float, stops: list[str],
                        whole: bool = False) -> AsyncIterator[bytes]:
    """Server-sent events for one request: chunks as its text grows, then ``[DONE]``. The
    client going away cancels the request: the response stops this generator when the server
    reports the disconnect, or a send fails (a keep-alive comment goes out while nothing else
    does). ``whole`` (``n`` > 1 or ``logprobs``): each choice is sent in one chunk, with its
    log-probabilities, once the request is final (the running record holds sample 0's text
    only)."""
    chunks = Chunks(rid, model, chat, include_usage)
    finished = False
    try:
        record = await run_in_threadpool(owner.get, rid)
        if chat:
            yield chunks.chunk(role=True)
        sent, deadline = "", time.monotonic() + timeout_s
        last_sent = time.monotonic()
        while True:
            chunks.saw(record)
            final = record["status"] in FINAL
            if final and record["status"] in ("failed", "expired"):
                yield failure_event(record, rid)
                finished = True
                return
            text = record.get("text") or ""
            shown = text if final else visible_text(text, stops)
            if not whole and shown.startswith(sent) and len(shown) > len(sent):
                yield chunks.chunk(shown[len(sent):])
                sent, last_sent = shown, time.monotonic()
            elif not whole and final and not shown.startswith(sent):
                log.warning("stream_text_diverged", request_id=rid, sent=len(sent), final=len(shown))
            if final:
                for event in chunks.ending(record, text, whole):
                    yield event
                finished = True
                return
            if time.monotonic() >= deadline:
                yield sse(shapes.error_object(504, f"request {rid} did not finish within {timeout_s:g} s "
                                       f"(GENQ_SYNC_TIMEOUT_S); it keeps running: "
                                       f"GET /v1/generations/{rid}", "timeout"))
                finished = True
                return
            if time.monotonic() - last_sent >= KEEPALIVE_S:
                yield b": keep-alive\n\n"  # also how a gone client is noticed while queued
                last_sent = time.monotonic()
            await asyncio.sleep(QUEUED_POLL_S if record["status"] == "queued" or whole
                                else STREAM_POLL_S)
            record = await run_in_threadpool(owner.get, rid)
    finally:
        if not finished:
            await cancel_quietly(owner, rid)


class Chunks:
    """One stream's events: ``chat.completion.chunk`` (``chat``) or ``text_completion``
    objects with the stream's id, creation time, model and (once a record names it) the
    system fingerprint; ``usage: null`` in each when ``include_usage``."""

    def __init__(self, rid: str, model: str, chat: bool, include_usage: bool):
        self.chat, self.include_usage = chat, include_usage
        self.base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}",
                     "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": model}
        self.fingerprint: str | None = None

    def saw(self, record: dict[str, Any]) -> None:
        """Take the fingerprint (and the model, if the request named none) from the first
        record that has a model."""
        if record.get("model") and self.fingerprint is None:
            self.fingerprint = shapes.fingerprint(record)
            self.base["model"] = self.base["model"] or record["model"]

    def chunk(self, delta: str | None = None, finish: str | None = None, role: bool = False,
              index: int = 0, logprobs: list | None = None) -> bytes:
        """One event: a text ``delta``, a ``finish`` reason, or the assistant ``role``."""
        if self.chat:
            d: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {} if delta is None else {"content": delta})
            lp = None if logprobs is None else {"content": logprobs, "refusal": None}
            choice = {"index": index, "delta": d, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": index, "text": delta or "", "finish_reason": finish,
                      "logprobs": shapes.legacy_logprobs(logprobs)}
        obj = {**self.base, "system_fingerprint": self.fingerprint, "choices": [choice]}
        if self.include_usage:
            obj["usage"] = None
        return sse(obj)

    def ending(self, record: dict[str, Any], text: str, whole: bool) -> list[bytes]:
        """The events after a final record's ``text``: each choice whole (``whole``) or the
        finish reason, the usage if asked, ``[DONE]``."""
        out = []
        if whole:  # every choice in one chunk each
            for c in shapes.choices({**record, "text": text}):
                if self.chat and c["index"]:
                    out.append(self.chunk(role=True, index=c["index"]))
                out.append(self.chunk(c["text"], index=c["index"], logprobs=c.get("logprobs")))
                out.append(self.chunk(finish=shapes.finish(c), index=c["index"]))
        else:
            out.append(self.chunk(finish=shapes.finish(record)))
        if self.include_usage:
            out.append(sse({**self.base, "system_fingerprint": self.fingerprint, "choices": [],
                            "usage": shapes.usage(record)}))
        out.append(b"data: [DONE]\n\n")
        return out


def failure_event(record: dict[str, Any], rid: str) -> bytes:
    """A failed or expired record as an error event: the caller's fault 400, else 500."""
    error = record.get("error") or {}
    code = error.get("code") or record["status"]
    return sse(shapes.error_object(400 if code in CLIENT_ERRORS else 500,
                                   error.get("message") or f"request {rid} {record['status']}",
                                   code))


def sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event holding ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n".encode()
