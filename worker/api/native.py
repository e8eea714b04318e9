"""genqueue's own routes: one request (``/v1/generations``), bulk jobs (``/v1/jobs``) and what
the status page shows (``/v1/overview``). Each answers as the caller's client
(``request.state.client``: their requests and jobs only, unless an admin)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from worker import overview
from worker.api.limits import MAX_JSON_LIST_BYTES, MAX_UPLOAD_LINES, is_json_list
from worker.errors import InvalidRequest
from worker.schema import GenerationRequest, Result
from worker.submission.lines import Line, json_list, read_items, read_lines

router = APIRouter()


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


@router.post("/v1/generations", status_code=202, response_model=Accepted)
def create_generation(body: GenerationRequest, request: Request) -> Accepted:
    """Queue one generation request (repeats with the same ``idempotency_key`` return
    the first id; keys are scoped per API key)."""
    rid = request.state.client.submit(request=body)  # validated once, here
    return Accepted(id=rid, status="queued")


@router.get("/v1/generations/{request_id}", response_model=Result)
def get_generation(request_id: str, request: Request) -> dict:
    """The result as it stands (queued, running or final)."""
    return request.state.client.get(request_id)


@router.delete("/v1/generations/{request_id}", response_model=Cancelled)
def cancel_generation(request_id: str, request: Request) -> Cancelled:
    """Cancel a queued or running request."""
    return Cancelled(id=request_id, cancelled=request.state.client.cancel(request_id))


@router.post("/v1/jobs", status_code=202, response_model=Job,
             openapi_extra={"requestBody": {"content": {
                 "application/json": {"schema": {"type": "array", "items": {"type": "object"}}},
                 "application/jsonl": {"schema": {"type": "string"}}}, "required": True}})
async def create_job(request: Request, webhook_url: str | None = None) -> dict:
    """Queue a bulk job: JSONL (request objects or OpenAI Batch lines, streamed to a spool
    file, up to 512 MB) or a JSON list (parsed whole, so capped at 32 MB; a body whose first
    byte is ``[`` is one whatever its content type says: no JSONL line is a list). With
    ``?webhook_url=``, the job's ``batch.*`` event is posted there when it ends."""
    owner = request.state.client
    content_type = request.headers.get("content-type", "")
    # closed on every way out (a body over the limit included), never left to the collector
    with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024) as spool:
        async for chunk in request.stream():
            spool.write(chunk)  # LimitBody counts the bytes
        job_id = await run_in_threadpool(lambda: owner.submit_stream(
            lambda: _upload_lines(spool, content_type), webhook_url=webhook_url))
    return await run_in_threadpool(owner.job, job_id)


@router.get("/v1/jobs")
def list_jobs(request: Request, after: str | None = Query(None, max_length=128),
              limit: int = Query(20, ge=1, le=100)) -> dict:
    """The caller's jobs, newest first, paged like ``/v1/batches`` (``after``: the
    ``last_id`` of the page before); admins see every job. Each job has its status,
    counts, ``created``, ``progress`` (0-1), ``rate`` (requests finished per second over the
    last minute) and ``eta_s``."""
    return overview.list_jobs(request.state.client, after, limit)


@router.get("/v1/overview")
def get_overview(request: Request) -> dict:
    """What the status page (``/ui``) shows: live workers, queues, the newest jobs and
    batches, recent failures; the caller's own work (admins: everyone's)."""
    return overview.build_overview(request.state.client)


@router.get("/v1/jobs/{job_id}", response_model=Job)
def get_job(job_id: str, request: Request) -> dict:
    """A bulk job's status and counts."""
    return request.state.client.job(job_id)


@router.get("/v1/jobs/{job_id}/results", response_class=StreamingResponse,
            responses={200: {"content": {"application/jsonl": {}}}})
def job_results(job_id: str, request: Request) -> StreamingResponse:
    """Every result of the job as JSONL, in submission order."""
    owner = request.state.client
    owner.job(job_id)  # 404 before streaming starts

    def lines() -> Iterator[bytes]:
        for res in owner.job_results(job_id):
            yield (json.dumps(res, ensure_ascii=False, allow_nan=False) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/jsonl")


@router.delete("/v1/jobs/{job_id}", response_model=Job)
def cancel_job(job_id: str, request: Request) -> dict:
    """Cancel every unfinished request of the job."""
    request.state.client.cancel_job(job_id)
    return request.state.client.job(job_id)


def _upload_lines(spool, content_type: str) -> Iterator[Line]:
    """The upload's items as ``Line``s, each parsed once: a JSON list's items (named by index),
    or JSONL's non-blank lines (by line number); ``InvalidRequest`` when it holds none or more
    than ``MAX_UPLOAD_LINES``."""
    if _json_list_upload(spool, content_type):
        if spool.seek(0, 2) > MAX_JSON_LIST_BYTES:
            raise InvalidRequest(f"a JSON list is parsed whole: at most {MAX_JSON_LIST_BYTES} "
                                 "bytes; send JSONL (one request per line) for more")
        spool.seek(0)
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


def _json_list_upload(spool, content_type: str) -> bool:
    """Whether a ``/v1/jobs`` upload is a JSON list: its content type says so, or its first
    non-blank byte is ``[`` (a JSONL line is an object); the spool is left at its start."""
    spool.seek(0)
    found = is_json_list(content_type)
    while not found and (chunk := spool.read(64 * 1024)):
        head = chunk.lstrip()
        if head:
            found = head.startswith(b"[")
            break
    spool.seek(0)
    return found
