"""What the gateway takes as a body: how many bytes per route (counted as they arrive, chunked
uploads included) and, on the routes that take one JSON object, JSON when no content type (or
curl ``-d``'s form type) says otherwise."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from worker.api.errors import is_openai_route, native_error
from worker.compat.shapes import openai_error

MAX_BODY_BYTES = 2 * 1024 * 1024  # one generation request (and any other body)
MAX_UPLOAD_BYTES = 512 * 1024 * 1024  # one JSONL batch upload, streamed to a spool file
MAX_JSON_LIST_BYTES = 32 * 1024 * 1024  # a JSON-list upload is parsed whole: send JSONL for more
MAX_UPLOAD_LINES = 200_000
# a POST body without a content type (or curl -d's default form type) is read as JSON there
# (``/v1/jobs`` tells a JSON list from JSONL by its first byte; ``/v1/files`` is a form)
JSON_BODY_ROUTES = ("/v1/generations", "/v1/batches", "/v1/chat/completions", "/v1/completions")
FORM = "application/x-www-form-urlencoded"


class BodyTooLarge(Exception):
    """More body bytes arrived than the route takes."""


def is_json_list(content_type: str) -> bool:
    """Whether a ``/v1/jobs`` upload is a JSON list (else JSONL)."""
    return "json" in content_type and "jsonl" not in content_type and "ndjson" not in content_type


def body_limit(path: str, content_type: str, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> int:
    """How many body bytes a route takes (a multipart file upload: the file plus 1 MB)."""
    if path == "/v1/jobs":
        return MAX_JSON_LIST_BYTES if is_json_list(content_type) else MAX_UPLOAD_BYTES
    if path == "/v1/files":
        return max_upload_bytes + 1024 * 1024
    return MAX_BODY_BYTES


class LimitBody:
    """ASGI middleware: count the body bytes actually received (``Content-Length`` or chunked)
    and stop at the route's limit with 413, before the body is parsed or stored. Reading stops
    with ``BodyTooLarge``; whatever the app makes of that, the answer sent is the 413."""

    def __init__(self, app, max_upload_bytes: int = MAX_UPLOAD_BYTES):
        self.app = app
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        limit = body_limit(scope["path"], headers.get("content-type", ""), self.max_upload_bytes)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return await _too_large(limit, scope["path"])(scope, receive, send)
        seen, over, answered = 0, False, False

        async def counted():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    raise BodyTooLarge(limit)
            return message

        async def answer(message):
            nonlocal answered
            if not over:
                answered = True
                return await send(message)
            if message["type"] == "http.response.start" and not answered:
                answered = True
                await _too_large(limit, scope["path"])(scope, receive, send)

        try:
            await self.app(scope, counted, answer)
        except Exception:  # BodyTooLarge, maybe wrapped in an ExceptionGroup by a middleware
            if not over:
                raise
            if not answered:
                await _too_large(limit, scope["path"])(scope, receive, send)


def _too_large(limit: int, path: str = "") -> JSONResponse:
    message = f"body larger than {limit} bytes"
    if is_openai_route(path):
        return openai_error(413, message, "too_large")
    return JSONResponse(native_error(message, "too_large"), status_code=413)


class JsonByDefault:
    """ASGI middleware: a POST to one of ``JSON_BODY_ROUTES`` takes JSON. A body sent with no
    content type, or with curl ``-d``'s default ``application/x-www-form-urlencoded``, is read
    as JSON; any other non-JSON type is refused with 415 (in the route's error shape) naming
    the one to send."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope.get("method") != "POST"
                or scope["path"].rstrip("/") not in JSON_BODY_ROUTES):
            return await self.app(scope, receive, send)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
        given = next((v.decode("latin-1") for k, v in scope["headers"]
                      if k.lower() == b"content-type"), "")
        kind = given.split(";", 1)[0].strip().lower()
        if kind in ("", FORM):
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        elif kind != "application/json" and not kind.endswith("+json"):
            message = (f"content-type {kind!r} is not taken here: send the request as JSON "
                       "(content-type: application/json)")
            refusal = (openai_error(415, message, "unsupported_media_type")
                       if is_openai_route(scope["path"]) else JSONResponse(
                           native_error(message, "unsupported_media_type"), status_code=415))
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)
