"""OpenAI's Chat Completions, Completions and Models routes over genqueue's queue.

``POST /v1/chat/completions`` and ``POST /v1/completions`` enqueue one *interactive* request
through the caller's client view (``request.state.client``: its key owns the request and its
quota applies) and answer with OpenAI's object once it is final, or stream it as server-sent
events from the running record's growing text. The wait is async polling (nothing blocks the
event loop); past ``GENQ_SYNC_TIMEOUT_S`` the answer is 504 naming the request id, which keeps
running and can be read at ``GET /v1/generations/{id}``. A streaming client that disconnects
cancels its request.

OpenAI's defaults apply where a body leaves a field out: it samples (``temperature`` 1), and a
chat completion without ``max_tokens`` writes until the model's context is full, capped by the
workers' ``GENQ_MAX_NEW_TOKENS_LIMIT`` (legacy completions: 16 tokens, as OpenAI's).

``model`` picks the adapter: the base model's id (or none) runs the base model, ``base:adapter``
or the adapter's name that adapter (``GET /v1/models`` lists what the live workers serve).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import structlog
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from worker.compat import shapes
from worker.compat.translate import CHAT_URL, COMPLETIONS_URL
from worker.errors import InvalidRequest, ModelNotFound
from worker.lifecycle import FINAL
from worker.submission.checker import Checker, OpenAIRoute
from worker.submission.lines import strict_json

log = structlog.get_logger(__name__)

# the demo model's two names (``GENQ_MODEL=demo``; workers report the display name). Not
# imported from worker.engine.demo: importing worker.engine loads torch, the gateway must not.
DEMO_NAME, DEMO_ID = "demo", "SmolLM2-135M-Instruct"
CLIENT_ERRORS = {"prompt_too_long", "invalid_request"}  # a failed result's code -> 400, else 500
STREAM_POLL_S = 0.05  # how often a stream reads a running record (it changes every 16 tokens
QUEUED_POLL_S = 0.2  # or 0.5 s); while queued (or when only the final answer is sent)
KEEPALIVE_S = 10.0  # an SSE comment this often while nothing else is sent


def router(client, settings, files) -> APIRouter:
    """The routes of this part of the OpenAI surface."""
    api = APIRouter(tags=["openai"])
    created = int(time.time())

    @api.get("/v1/models")
    def list_models(request: Request) -> dict:
        """The models the live workers serve: each base model and each of its adapters."""
        data = []
        for base, adapters in served(request.state.client, settings).items():
            data.append(model_object(base, created))
            data += [model_object(name, created) for name in adapters]
        return {"object": "list", "data": data}

    @api.get("/v1/models/{model_id:path}")
    def get_model(model_id: str, request: Request) -> dict:
        """One model (``model_not_found`` if no live worker serves it)."""
        resolve_model(model_id, served(request.state.client, settings))
        return model_object(model_id, created)

    @api.post("/v1/chat/completions", openapi_extra=_body_schema("a chat completions request"))
    async def chat_completions(request: Request):
        """OpenAI's Chat Completions: one interactive request, answered when it is final
        (``chat.completion``) or streamed (``chat.completion.chunk`` events)."""
        return await complete(request, CHAT_URL)

    @api.post("/v1/completions", openapi_extra=_body_schema("a legacy completions request"))
    async def completions(request: Request):
        """OpenAI's legacy Completions: a raw ``prompt`` (no chat template)."""
        return await complete(request, COMPLETIONS_URL)

    async def complete(request: Request, url: str):
        owner = request.state.client
        body = await json_body(request)
        names = request.state.openai_names = openai_names(body, url)
        stream, include_usage = stream_options(body)
        asked = body.get("model")
        req = await run_in_threadpool(
            Checker(owner, OpenAIRoute(url=url)).check, body)
        rid = await run_in_threadpool(owner.submit_checked, req)
        model = asked or ""
        chat = url == CHAT_URL
        if stream:
            stops = req.get("stop") or []
            whole = req.get("n", 1) != 1 or bool(req.get("logprobs"))
            events = stream_events(request, owner, rid, model, chat, include_usage,
                                   settings.sync_timeout_s, [stops] if isinstance(stops, str) else stops,
                                   whole)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                              "x-genq-request-id": rid})
        result = await wait_final(request, owner, rid, settings.sync_timeout_s)
        if result is None:
            return timeout_error(rid, settings.sync_timeout_s)
        if result["status"] in ("failed", "expired"):
            return failed_error(result, names)
        shape = shapes.chat_completion if chat else shapes.text_completion
        return JSONResponse(shape({**result, "text": result.get("text") or ""},
                                  model or result.get("model") or ""),
                            headers={"x-genq-request-id": rid})

    return api


# -- the request --------------------------------------------------------------------------


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


def served(owner, settings) -> dict[str, list[str]]:
    """Base model id -> its adapters, from the live workers' heartbeats; with no worker alive,
    what this gateway's settings name (``GENQ_MODEL``, ``GENQ_ADAPTERS``): requests may be
    queued before any worker starts (scale from zero), for the model the deployment runs."""
    return bases_of(owner.store.workers(), settings)


def bases_of(fleet: list[dict[str, Any]], settings) -> dict[str, list[str]]:
    """``served`` for the heartbeats ``fleet`` already read."""
    out: dict[str, set[str]] = {}
    for w in fleet:
        if isinstance(w.get("model"), str):
            out.setdefault(w["model"], set()).update(
                a for a in w.get("adapters") or () if isinstance(a, str))
    if not out:
        base = DEMO_ID if settings.model == DEMO_NAME else settings.model
        out[base] = set(settings.adapters)
    return {base: sorted(adapters) for base, adapters in sorted(out.items())}


def resolve_model(model: str | None, bases: dict[str, list[str]]) -> str | None:
    """The adapter a request's ``model`` selects (None: the base model), or ``ModelNotFound``.
    A base answers to its id (``demo`` too for the demo model), an adapter to ``base:name``
    and to its name."""
    if not model:
        return None
    names = {alias: base for base in bases for alias in _aliases(base)}
    if model in names:
        return None
    for base, adapters in bases.items():
        for alias in _aliases(base):
            if model.startswith(alias + ":") and model[len(alias) + 1:] in adapters:
                return model[len(alias) + 1:]
    if any(model in adapters for adapters in bases.values()):
        return model
    known = sorted(set(names) | {a for adapters in bases.values() for a in adapters})
    raise ModelNotFound(f"the model {model!r} does not exist here; served: "
                        f"{', '.join(known)[:400]} (GET /v1/models)")


def _aliases(base: str) -> tuple[str, ...]:
    return (base, DEMO_NAME) if base == DEMO_ID else (base,)


def model_object(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "genqueue"}


def _body_schema(what: str) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"type": "object", "description": f"{what}, as OpenAI's API takes it"}}}}}


# -- waiting ------------------------------------------------------------------------------


async def wait_final(request: Request, owner, rid: str, timeout_s: float) -> dict | None:
    """Poll until the request is final (None past ``timeout_s``); a client that goes away
    meanwhile cancels it (a task waits for the server's ``http.disconnect``)."""
    deadline = time.monotonic() + timeout_s
    gone = asyncio.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.ensure_future(watch())
    try:
        delay = 0.01
        while not gone.is_set():
            result = await run_in_threadpool(owner.get, rid)
            if result["status"] in FINAL:
                return result
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 0.25)
    finally:
        watcher.cancel()
    await cancel_quietly(owner, rid)
    return None


async def cancel_quietly(owner, rid: str) -> None:
    """Cancel ``rid`` even while the calling task is being cancelled."""
    with anyio.CancelScope(shield=True):
        try:
            await run_in_threadpool(owner.cancel, rid)
        except Exception as exc:  # Redis gone: the request runs to its end
            log.warning("cancel_failed", request_id=rid, error=f"{type(exc).__name__}: {exc}")


def timeout_error(rid: str, timeout_s: float) -> JSONResponse:
    """504 naming the request, which keeps running (the SDKs are told not to retry: a retry
    would queue it again)."""
    return _error(504, f"request {rid} did not finish within {timeout_s:g} s "
                  f"(GENQ_SYNC_TIMEOUT_S); it keeps running: GET /v1/generations/{rid}",
                  "timeout", rid, headers={"x-should-retry": "false"})


def failed_error(result: dict[str, Any], names: dict[str, str] | None = None) -> JSONResponse:
    """A failed (or expired) result as OpenAI's error: the caller's fault 400, else 500."""
    error = result.get("error") or {}
    code = error.get("code") or ("expired" if result["status"] == "expired" else "internal")
    message = error.get("message") or f"request {result['id']} {result['status']}"
    param = None
    if names and code in CLIENT_ERRORS:
        message, param = openai_message(message, names)
    return _error(400 if code in CLIENT_ERRORS else 500, message, code, result["id"],
                  param=param)


def _error(status: int, message: str, code: str, rid: str,
           headers: dict[str, str] | None = None, param: str | None = None) -> JSONResponse:
    return shapes.openai_error(status, message, code, param=param,
                               headers={"x-genq-request-id": rid, **(headers or {})})


# -- streaming ----------------------------------------------------------------------------


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
    created = int(time.time())
    base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model}
    fingerprint: str | None = None

    def chunk(delta: str | None = None, finish: str | None = None, role: bool = False,
              index: int = 0, logprobs: list | None = None) -> bytes:
        if chat:
            d: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {} if delta is None else {"content": delta})
            lp = None if logprobs is None else {"content": logprobs, "refusal": None}
            choice = {"index": index, "delta": d, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": index, "text": delta or "", "finish_reason": finish,
                      "logprobs": shapes.legacy_logprobs(logprobs)}
        obj = {**base, "system_fingerprint": fingerprint, "choices": [choice]}
        if include_usage:
            obj["usage"] = None
        return sse(obj)

    finished = False
    try:
        record = await run_in_threadpool(owner.get, rid)
        if chat:
            yield chunk(role=True)
        sent, deadline = "", time.monotonic() + timeout_s
        last_sent = time.monotonic()
        while True:
            if record.get("model") and fingerprint is None:
                fingerprint = shapes.fingerprint(record)
                base["model"] = base["model"] or record["model"]
            final = record["status"] in FINAL
            if final and record["status"] in ("failed", "expired"):
                error = record.get("error") or {}
                code = error.get("code") or record["status"]
                yield sse(shapes.error_object(400 if code in CLIENT_ERRORS else 500,
                                       error.get("message") or f"request {rid} {record['status']}",
                                       code))
                finished = True
                return
            text = record.get("text") or ""
            shown = text if final else visible_text(text, stops)
            if not whole and shown.startswith(sent) and len(shown) > len(sent):
                yield chunk(shown[len(sent):])
                sent, last_sent = shown, time.monotonic()
            elif not whole and final and not shown.startswith(sent):
                log.warning("stream_text_diverged", request_id=rid, sent=len(sent), final=len(shown))
            if final:
                if whole:  # every choice in one chunk each
                    for c in shapes.choices({**record, "text": text}):
                        if chat and c["index"]:
                            yield chunk(role=True, index=c["index"])
                        yield chunk(c["text"], index=c["index"], logprobs=c.get("logprobs"))
                        yield chunk(finish=shapes.finish(c), index=c["index"])
                else:
                    yield chunk(finish=shapes.finish(record))
                if include_usage:
                    yield sse({**base, "system_fingerprint": fingerprint, "choices": [],
                               "usage": shapes.usage(record)})
                yield b"data: [DONE]\n\n"
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


def sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n".encode()
