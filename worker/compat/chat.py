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

The body is read in ``chatbody`` and checked by ``worker.submission.checker`` (OpenAI's defaults,
the context left), the models are ``models``, the wait ``chatwait``, the stream ``chatstream``.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from worker.compat import shapes
from worker.compat.chatbody import json_body, openai_message, openai_names, stream_options
from worker.compat.chatstream import stream_events
from worker.compat.chatwait import CLIENT_ERRORS, wait_final
from worker.compat.models import model_object, resolve_model, served
from worker.compat.translate import CHAT_URL, COMPLETIONS_URL
from worker.submission.checker import Checker, OpenAIRoute


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
        return await complete(request, CHAT_URL, settings)

    @api.post("/v1/completions", openapi_extra=_body_schema("a legacy completions request"))
    async def completions(request: Request):
        """OpenAI's legacy Completions: a raw ``prompt`` (no chat template)."""
        return await complete(request, COMPLETIONS_URL, settings)

    return api


async def complete(request: Request, url: str, settings):
    """One chat or legacy completion: its body queued as an interactive request, answered
    once final (or past ``GENQ_SYNC_TIMEOUT_S``), or streamed."""
    owner = request.state.client
    body = await json_body(request)
    names = request.state.openai_names = openai_names(body, url)
    stream, include_usage = stream_options(body)
    asked = body.get("model")
    req = await run_in_threadpool(Checker(owner, OpenAIRoute(url=url)).check, body)
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


def _body_schema(what: str) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"type": "object", "description": f"{what}, as OpenAI's API takes it"}}}}}


# -- errors -------------------------------------------------------------------------------


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
