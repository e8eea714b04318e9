"""The gateway's errors, in the shape of the route: OpenAI's error object on the OpenAI
surface, genqueue's ``{"detail", "code"}`` elsewhere. Bad input is 422 (400 on the OpenAI
surface) with field-level messages, a full queue 429 with ``Retry-After``, unknown ids 404,
an unreachable Redis 503."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker.compat import chat as compat_chat
from worker.compat.shapes import openai_error
from worker.errors import GenqError, IdempotencyConflict, InvalidRequest, NotFound, QueueFull
from worker.schema import GenerationRequest, error_message

UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OperationalError)
OPENAI_ROUTES = ("/v1/files", "/v1/batches", "/v1/chat/", "/v1/completions", "/v1/models")
REQUEST_FIELDS = set(GenerationRequest.model_fields)


def is_openai_route(path: str) -> bool:
    """Whether ``path`` is on the OpenAI-compatible surface (OpenAI's error object there)."""
    return path.startswith(OPENAI_ROUTES)


def error_response(request: Request, status: int, message: str, code: str | None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in the shape of the route: OpenAI's object on the OpenAI surface, genqueue's
    ``{"detail", "code"}`` elsewhere."""
    if is_openai_route(request.url.path):
        return openai_error(status, message, code, headers=headers)
    return JSONResponse(native_error(message, code), status_code=status, headers=headers)


def native_error(message: str, code: str | None) -> dict[str, Any]:
    """genqueue's error body, one shape for every status: ``{"detail": [{"loc", "msg",
    "type"}, ...], "code"}``, as FastAPI's validation errors; ``loc`` names the field when
    the message starts with one (``max_new_tokens: 5000 is above the limit 2048``)."""
    field = message.split(":", 1)[0] if ":" in message else ""
    loc = ["body", *field.split(".")] if field.split(".")[0] in REQUEST_FIELDS else []
    return {"detail": [{"loc": loc, "msg": message, "type": code or "error"}], "code": code}


def jsonable_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Field-level validation errors without the offending input (it may be huge), the
    request's as ``worker.schema.error_message`` words them (OpenAI's ``max_tokens`` is told
    genqueue's name)."""
    out = []
    for e in exc.errors():
        loc = list(e.get("loc", ()))
        msg = error_message(e, loc[1:] if loc[:1] == ["body"] else loc)
        if e.get("type") == "model_attributes_type" and loc == ["body"]:
            msg = f"{msg}: the body must be a JSON object (content-type: application/json)"
        out.append({"loc": loc, "msg": msg, "type": e.get("type")})
    return out


def add_error_handlers(app: FastAPI) -> None:
    """Answer each of genqueue's errors (and FastAPI's own) in the shape of the route."""
    app.add_exception_handler(RecursionError, too_deep)
    for error in UNAVAILABLE:
        app.add_exception_handler(error, unavailable)
    app.add_exception_handler(ResponseError, refused)
    app.add_exception_handler(InvalidRequest, invalid)
    app.add_exception_handler(QueueFull, full)
    app.add_exception_handler(IdempotencyConflict, conflict)
    app.add_exception_handler(NotFound, not_found)
    app.add_exception_handler(GenqError, other)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation)


async def too_deep(request: Request, __: RecursionError) -> JSONResponse:
    """A body nested past Python's recursion limit: 422."""
    return error_response(request, 422, "JSON nested too deeply", "invalid_request")


async def unavailable(request: Request, __: Exception) -> JSONResponse:
    """Redis (or the broker) unreachable: 503, retry in a few seconds."""
    return error_response(request, 503, "the queue (Redis) is unreachable; retry later",
                          "unavailable", headers={"Retry-After": "5"})


async def refused(request: Request, exc: ResponseError) -> JSONResponse:
    """A primary that cannot take writes right now (no replica in sync, a read-only
    replica during a failover, loading): retry later. Anything else is a bug: 500."""
    message = str(exc)  # in a pipeline: "Command # 1 (...) of pipeline caused error: ..."
    if isinstance(exc, ReadOnlyError) or any(
            code in message for code in ("NOREPLICAS ", "MASTERDOWN ", "TRYAGAIN ")):
        return await unavailable(request, exc)
    raise exc


async def invalid(request: Request, exc: InvalidRequest) -> JSONResponse:
    """A request genqueue cannot run: 422, in OpenAI's names on the OpenAI routes."""
    names = getattr(request.state, "openai_names", None)
    if names is not None:  # OpenAI's field names in OpenAI's error, with its ``param``
        message, param = compat_chat.openai_message(exc.message, names)
        return openai_error(422, message, exc.code, param=param)
    return error_response(request, 422, exc.message, exc.code)


async def full(request: Request, exc: QueueFull) -> JSONResponse:
    """The queue (or the key's pending quota) is full: 429 with ``Retry-After``."""
    return error_response(request, 429, exc.message, "queue_full",
                          headers={"Retry-After": str(exc.retry_after_s)})


async def conflict(request: Request, exc: IdempotencyConflict) -> JSONResponse:
    """An idempotency key used before with other arguments: 409."""
    return error_response(request, 409, exc.message, "idempotency_conflict")


async def not_found(request: Request, exc: NotFound) -> JSONResponse:
    """An unknown id (or another key's): 404."""
    return error_response(request, 404, exc.message, exc.name)


async def other(request: Request, exc: GenqError) -> JSONResponse:
    """Any other of genqueue's errors: 400."""
    return error_response(request, 400, exc.message, exc.code)


async def http_error(request: Request, exc: StarletteHTTPException):
    """The router's own 404/405 (a path no route matches, say ``/v1/models/%0A``) in
    OpenAI's shape on the OpenAI surface; FastAPI's elsewhere."""
    if is_openai_route(request.url.path):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return openai_error(exc.status_code, str(exc.detail), code, headers=exc.headers)
    if not isinstance(exc.detail, str):
        return await http_exception_handler(request, exc)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(native_error(exc.detail, code), status_code=exc.status_code,
                        headers=exc.headers)


async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's validation errors: 422 with every field's message (OpenAI's 400 with the
    first one on the OpenAI surface)."""
    errors = jsonable_errors(exc)
    if is_openai_route(request.url.path):
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        return openai_error(400, f"{param or 'request'}: {first['msg']}", "invalid_request",
                            param=param)
    return JSONResponse({"detail": errors, "code": "invalid_request"}, status_code=422)
