"""The HTTP gateway (FastAPI; ``genq api``): a thin shell over ``GenerationClient``.

Routes are the contract's. Bad input gets 422 with field-level messages, a full queue (or a
key over ``GENQ_MAX_PENDING_PER_KEY``) 429 with ``Retry-After``, unknown ids 404, an unreachable
Redis 503. Bodies are limited by the bytes actually read (chunked uploads included). With
``GENQ_API_KEYS`` set, every route but the health and metrics routes needs ``Authorization:
Bearer <key>``; each key owns what it submits, and another key's requests and jobs answer 404
(``GENQ_ADMIN_KEYS`` see everything).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from kombu.exceptions import OperationalError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker import overview
from worker.client import GenerationClient
from worker.compat import batches as compat_batches
from worker.compat import chat as compat_chat
from worker.compat import files as compat_files
from worker.compat.shapes import openai_error
from worker.compat.storage import FileStore
from worker.errors import GenqError, IdempotencyConflict, InvalidRequest, NotFound, QueueFull
from worker.ops.keys import KeyRing
from worker.ops.settings import Settings, get_settings
from worker.queue.app import BULK_QUEUE, INTERACTIVE_QUEUE, pending_by_queue
from worker.schema import GenerationRequest, Result
from worker.submission.lines import Line, json_list, read_items, read_lines

MAX_BODY_BYTES = 2 * 1024 * 1024  # one generation request (and any other body)
MAX_UPLOAD_BYTES = 512 * 1024 * 1024  # one JSONL batch upload, streamed to a spool file
MAX_JSON_LIST_BYTES = 32 * 1024 * 1024  # a JSON-list upload is parsed whole: send JSONL for more
MAX_UPLOAD_LINES = 200_000
OPEN_PATHS = {"/healthz", "/readyz", "/metrics", "/demand", "/", "/ui"}
OPEN_PREFIXES = ("/docs", "/openapi", "/ui/")  # the status page's files hold no data
STATIC_DIR = Path(__file__).resolve().parent / "static"
UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OperationalError)


class BodyTooLarge(Exception):
    """More body bytes arrived than the route takes."""


def body_limit(path: str, content_type: str, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> int:
    """How many body bytes a route takes (a multipart file upload: the file plus 1 MB)."""
    if path == "/v1/jobs":
        return MAX_JSON_LIST_BYTES if _is_json_list(content_type) else MAX_UPLOAD_BYTES
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


# a POST body without a content type (or curl -d's default form type) is read as JSON there
JSON_BODY_ROUTES = ("/v1/generations",)
FORM = "application/x-www-form-urlencoded"


class JsonByDefault:
    """ASGI middleware: ``POST /v1/generations`` takes JSON. A body sent with no content type,
    or with curl ``-d``'s default ``application/x-www-form-urlencoded``, is read as JSON;
    any other non-JSON type is refused with 415 naming the one to send."""

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
            return await JSONResponse(native_error(
                f"content-type {kind!r} is not taken here: send the request as JSON "
                "(content-type: application/json)", "unsupported_media_type"),
                status_code=415)(scope, receive, send)
        return await self.app(scope, receive, send)


class Accepted(BaseModel):
    id: str
    status: str


class Cancelled(BaseModel):
    id: str
    cancelled: bool


class Counts(BaseModel):
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    expired: int


class Job(BaseModel):
    id: str
    status: str
    counts: Counts


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway app for these settings (tests build one per Redis)."""
    settings = settings or get_settings()
    client = GenerationClient(settings=settings)
    keyring = KeyRing(settings)
    registry = CollectorRegistry()
    http_requests = Counter("genq_http_requests", "HTTP requests by route and status",
                            ["route", "status"], registry=registry)
    depth = Gauge("genq_queue_depth", "Requests on each Redis list, not yet taken by a worker",
                  ["queue"], registry=registry)
    demand = Gauge("genq_demand", "Requests not finished: queued + held by workers + running "
                   "(what autoscaling should follow)", ["priority"], registry=registry)
    workers_up = Gauge("genq_workers_alive", "Workers with a fresh heartbeat", registry=registry)

    app = FastAPI(title="genqueue", version="0.1.0",
                  description="Batched LLM generation on a Celery/Redis queue.")
    app.state.client = client

    @app.middleware("http")
    async def auth(request: Request, call_next):
        path = request.url.path
        request.state.client = client
        if keyring.enabled:
            principal = keyring.authenticate(request.headers.get("authorization", ""))
            if principal is not None:
                request.state.client = client.as_owner(
                    principal.id, admin=principal.admin, weight=principal.weight,
                    raw_tokens=principal.raw_tokens)
            elif path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
                return error_response(request, 401, "missing or invalid API key", "invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
            request.state.authenticated = principal is not None
        else:
            request.state.authenticated = True
        response = await call_next(request)
        route = request.scope.get("route")
        http_requests.labels(route=getattr(route, "path", "unmatched"),
                             status=response.status_code).inc()
        return response

    app.add_middleware(LimitBody, max_upload_bytes=settings.max_upload_bytes)
    app.add_middleware(JsonByDefault)

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, __: RecursionError):
        return error_response(request, 422, "JSON nested too deeply", "invalid_request")

    async def unavailable(request: Request, __: Exception):
        return error_response(request, 503, "the queue (Redis) is unreachable; retry later",
                              "unavailable", headers={"Retry-After": "5"})

    for error in UNAVAILABLE:
        app.add_exception_handler(error, unavailable)

    @app.exception_handler(ResponseError)
    async def refused(request: Request, exc: ResponseError):
        """A primary that cannot take writes right now (no replica in sync, a read-only
        replica during a failover, loading): retry later. Anything else is a bug: 500."""
        message = str(exc)  # in a pipeline: "Command # 1 (...) of pipeline caused error: ..."
        if isinstance(exc, ReadOnlyError) or any(
                code in message for code in ("NOREPLICAS ", "MASTERDOWN ", "TRYAGAIN ")):
            return await unavailable(request, exc)
        raise exc

    @app.exception_handler(InvalidRequest)
    async def invalid(request: Request, exc: InvalidRequest):
        names = getattr(request.state, "openai_names", None)
        if names is not None:  # OpenAI's field names in OpenAI's error, with its ``param``
            message, param = compat_chat.openai_message(exc.message, names)
            return openai_error(422, message, exc.code, param=param)
        return error_response(request, 422, exc.message, exc.code)

    @app.exception_handler(QueueFull)
    async def full(request: Request, exc: QueueFull):
        return error_response(request, 429, exc.message, "queue_full",
                              headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(IdempotencyConflict)
    async def conflict(request: Request, exc: IdempotencyConflict):
        return error_response(request, 409, exc.message, "idempotency_conflict")

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        return error_response(request, 404, exc.message, exc.name)

    @app.exception_handler(GenqError)
    async def other(request: Request, exc: GenqError):
        return error_response(request, 400, exc.message, exc.code)

    @app.exception_handler(StarletteHTTPException)
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

    @app.post("/v1/generations", status_code=202, response_model=Accepted)
    def create_generation(body: GenerationRequest, request: Request) -> Accepted:
        """Queue one generation request (repeats with the same ``idempotency_key`` return
        the first id; keys are scoped per API key)."""
        rid = request.state.client.submit(request=body)  # validated once, here
        return Accepted(id=rid, status="queued")

    @app.get("/v1/generations/{request_id}", response_model=Result)
    def get_generation(request_id: str, request: Request) -> dict:
        """The result as it stands (queued, running or final)."""
        return request.state.client.get(request_id)

    @app.delete("/v1/generations/{request_id}", response_model=Cancelled)
    def cancel_generation(request_id: str, request: Request) -> Cancelled:
        """Cancel a queued or running request."""
        return Cancelled(id=request_id, cancelled=request.state.client.cancel(request_id))

    @app.post("/v1/jobs", status_code=202, response_model=Job,
              openapi_extra={"requestBody": {"content": {
                  "application/json": {"schema": {"type": "array", "items": {"type": "object"}}},
                  "application/jsonl": {"schema": {"type": "string"}}}, "required": True}})
    async def create_job(request: Request, webhook_url: str | None = None) -> dict:
        """Queue a bulk job: JSONL (request objects or OpenAI Batch lines, streamed to a spool
        file, up to 512 MB) or a JSON list (parsed whole, so capped at 32 MB). With
        ``?webhook_url=``, the job's ``batch.*`` event is posted there when it ends."""
        owner = request.state.client
        spool = tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024)
        async for chunk in request.stream():
            spool.write(chunk)  # LimitBody counts the bytes
        content_type = request.headers.get("content-type", "")
        job_id = await run_in_threadpool(lambda: owner.submit_stream(
            lambda: _upload_lines(spool, content_type), webhook_url=webhook_url))
        return await run_in_threadpool(owner.job, job_id)

    @app.get("/v1/jobs")
    def list_jobs(request: Request, after: str | None = Query(None, max_length=128),
                  limit: int = Query(20, ge=1, le=100)) -> dict:
        """The caller's jobs, newest first, paged like ``/v1/batches`` (``after``: the
        ``last_id`` of the page before); admins see every job. Each job has its status,
        counts, ``created``, ``progress`` (0-1), ``rate`` (requests finished per second) and
        ``eta_s``."""
        return overview.list_jobs(request.state.client, after, limit)

    @app.get("/v1/overview")
    def get_overview(request: Request) -> dict:
        """What the status page (``/ui``) shows: live workers, queues, the newest jobs and
        batches, recent failures; the caller's own work (admins: everyone's)."""
        return overview.build_overview(request.state.client)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui")

    @app.get("/ui", include_in_schema=False)
    def status_page() -> FileResponse:
        """The status page: plain HTML and JavaScript, no build step, nothing from a CDN."""
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/v1/jobs/{job_id}", response_model=Job)
    def get_job(job_id: str, request: Request) -> dict:
        """A bulk job's status and counts."""
        return request.state.client.job(job_id)

    @app.get("/v1/jobs/{job_id}/results", response_class=StreamingResponse,
             responses={200: {"content": {"application/jsonl": {}}}})
    def job_results(job_id: str, request: Request) -> StreamingResponse:
        """Every result of the job as JSONL, in submission order."""
        owner = request.state.client
        owner.job(job_id)  # 404 before streaming starts

        def lines() -> Iterator[bytes]:
            for res in owner.job_results(job_id):
                yield (json.dumps(res, ensure_ascii=False, allow_nan=False) + "\n").encode()

        return StreamingResponse(lines(), media_type="application/jsonl")

    @app.delete("/v1/jobs/{job_id}", response_model=Job)
    def cancel_job(job_id: str, request: Request) -> dict:
        """Cancel every unfinished request of the job."""
        request.state.client.cancel_job(job_id)
        return request.state.client.job(job_id)

    @app.get("/healthz")
    def healthz() -> dict:
        """The gateway process answers."""
        return {"ok": True}

    @app.get("/readyz")
    def readyz(request: Request, response: Response) -> dict:
        """Ready when the broker answers and at least one worker heartbeat is fresh. Without
        a valid API key (when keys are set) it says only whether it is ready."""
        try:
            broker = bool(client.broker.ping())
            workers = client.store.workers()
        except Exception as exc:  # redis down: not ready, say why
            response.status_code = 503
            out = {"ready": False, "broker": False, "workers": [], "error": str(exc)[:200]}
        else:
            ready = broker and bool(workers)
            response.status_code = 200 if ready else 503
            out = {"ready": ready, "broker": broker, "workers": workers}
        return out if request.state.authenticated else {"ready": out["ready"]}

    def current_demand() -> tuple[dict[str, int], dict[str, int], int]:
        """(list lengths, demand per priority: queued + held + running, live workers)."""
        lengths = pending_by_queue(client.broker)
        workers = client.store.workers()
        per_priority = {}
        for priority, q in (("interactive", INTERACTIVE_QUEUE), ("bulk", BULK_QUEUE)):
            held = sum(int((w.get(state) or {}).get(priority, 0)) for w in workers
                       for state in ("waiting", "running"))
            per_priority[priority] = lengths[q] + held
        return lengths, per_priority, len(workers)

    @app.get("/demand")
    def get_demand(response: Response) -> dict:
        """Requests not finished, per priority and in total (what KEDA scales workers on)."""
        try:
            _, per_priority, alive = current_demand()
        except Exception as exc:  # redis down: say so, do not scale on a guess
            response.status_code = 503
            return {"error": str(exc)[:200]}
        return {**per_priority, "total": sum(per_priority.values()), "workers": alive}

    @app.get("/metrics")
    def metrics() -> Response:
        """Prometheus metrics of the gateway: queue depth, demand per priority, live workers."""
        try:
            lengths, per_priority, alive = current_demand()
            for q, n in lengths.items():
                depth.labels(queue=q).set(n)
            for priority, n in per_priority.items():
                demand.labels(priority=priority).set(n)
            workers_up.set(alive)
        except Exception:  # scrape still answers while Redis is down
            workers_up.set(0)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError):
        errors = jsonable_errors(exc)
        if is_openai_route(request.url.path):
            first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
            param = ".".join(str(p) for p in first["loc"][1:]) or None
            return openai_error(400, f"{param or 'request'}: {first['msg']}", "invalid_request",
                                param=param)
        return JSONResponse({"detail": errors, "code": "invalid_request"}, status_code=422)

    files = FileStore(settings.files_root, settings.max_upload_bytes, **settings.files_options)
    app.state.files = files
    for module in (compat_files, compat_batches, compat_chat):
        app.include_router(module.router(client, settings, files))

    return app


OPENAI_ROUTES = ("/v1/files", "/v1/batches", "/v1/chat/", "/v1/completions", "/v1/models")
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


REQUEST_FIELDS = set(GenerationRequest.model_fields)
# OpenAI's names given to a native route: the hint names genqueue's
NATIVE_NAMES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens"}


def jsonable_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Field-level validation errors without the offending input (it may be huge); OpenAI's
    ``max_tokens`` given here is told genqueue's name."""
    out = []
    for e in exc.errors():
        loc = list(e.get("loc", ()))
        msg = str(e.get("msg")).removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden" and loc and loc[-1] in NATIVE_NAMES and len(loc) == 2:
            msg = (f"{loc[-1]} is OpenAI's name: genqueue's routes take "
                   f"{NATIVE_NAMES[loc[-1]]} (the OpenAI routes, /v1/chat/completions and "
                   f"/v1/completions, take {loc[-1]})")
        elif e.get("type") == "model_attributes_type" and loc == ["body"]:
            msg = f"{msg}: the body must be a JSON object (content-type: application/json)"
        out.append({"loc": loc, "msg": msg, "type": e.get("type")})
    return out


def _upload_lines(spool, content_type: str) -> Iterator[Line]:
    """The upload's items as ``Line``s, each parsed once: a JSON list's items (named by index),
    or JSONL's non-blank lines (by line number); ``InvalidRequest`` when it holds none or more
    than ``MAX_UPLOAD_LINES``."""
    spool.seek(0)
    if _is_json_list(content_type):
        items = json_list(spool)
        if len(items) > MAX_UPLOAD_LINES:
            raise InvalidRequest(f"more than {MAX_UPLOAD_LINES} requests in one batch")
        lines = read_items(items)
    else:
        lines = read_lines(spool, limit=MAX_UPLOAD_LINES)
    empty = True
    for line in lines:
        empty = False
        yield line
    if empty:
        raise InvalidRequest("the batch is empty")


def _is_json_list(content_type: str) -> bool:
    return "json" in content_type and "jsonl" not in content_type and "ndjson" not in content_type


def serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the gateway under uvicorn."""
    import uvicorn

    uvicorn.run(create_app(), host=host, port=port, log_config=None)
