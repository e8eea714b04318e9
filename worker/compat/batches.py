"""OpenAI's Batch API (``/v1/batches``) over genqueue's bulk jobs, driven unchanged by the SDKs.

``POST /v1/batches`` checks the call (the input file is the caller's, purpose ``batch``; the
window; the metadata), saves the batch as ``validating`` and answers at once; the file is then
read, checked and queued in the background as one bulk job of the caller's
(``worker.compat.batch_queueing``: resumable by any gateway, each line queued once). Lines are
OpenAI Batch lines (``custom_id`` unique in the file, ``method`` POST, ``url`` the batch's
``endpoint``), their bodies translated as the synchronous routes translate theirs
(``worker.compat.batch_input``). A file-level fault makes a ``failed`` batch whose ``errors``
name each line (from 1), and nothing is queued; a body genqueue cannot run answers that line
alone, in the error file. Each request carries the completion window as its deadline
(``expires_in_s``): ``24h``, OpenAI's only value, or a shorter ``<n>s|m|h|d`` (a genqueue
extension). An ``Idempotency-Key`` header (else ``metadata.idempotency_key``), per API key,
makes a repeated create answer the batch the first one made.

The batch record is ``genq:batch:<id>`` (JSON) in the result Redis, listed newest first from
the sorted sets ``genq:batches`` (every batch) and ``genq:batches:by:<owner>``; all expire
after ``GENQ_RESULT_TTL_S``. Once queued, its status is read from the job on every read:
``in_progress`` while requests are open; past ``expires_at`` the rest are cancelled
(``finalizing``, then ``expired``); ``POST /v1/batches/{id}/cancel`` cancels the rest
(``cancelling``, then ``cancelled``). Once every request is final, the first read that sees it
(a lease kept alive while it works, ``worker.compat.lease``; reads meanwhile answer
``finalizing``) writes the output file (succeeded requests) and the error file (the others),
both purpose ``batch_output``, lines in input order, in OpenAI's documented format: an HTTP
answer in ``response`` (a bad body: 400, an unknown model: 404, OpenAI's error object as its
body), any other failure in ``error``::

    {"id": "batch_req_<request id>", "custom_id": ..., "error": null,
     "response": {"status_code": 200, "request_id": <request id>, "body": <chat.completion>}}
    {"id": "batch_req_<request id>", "custom_id": ..., "error": null,
     "response": {"status_code": 400, "request_id": <request id>,
                  "body": {"error": {"message", "type", "param", "code"}}}}
    {"id": "batch_req_<request id>", "custom_id": ..., "response": null,
     "error": {"code": "batch_expired" | "batch_cancelled" | "out_of_memory" | ..., "message": ...}}

``request_counts``: ``completed`` the succeeded requests, ``failed`` every other final one.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import WatchError

from worker.compat.batch_input import fault
from worker.compat.batch_queueing import Submitter
from worker.compat.lease import Lease
from worker.compat.shapes import chat_completion, error_object, text_completion
from worker.errors import IdempotencyConflict, InvalidRequest, NotFound
from worker.lifecycle import BATCH_FINAL, JOB_ENDED, batch_status

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
MAX_WINDOW_S = 30 * 24 * 3600
LOCK_S = 30  # the finalization lease (kept alive while the files are written and uploaded)
SPOOL_BYTES = 8 * 1024 * 1024
WINDOW = re.compile(r"^([1-9][0-9]{0,7})([smhd])$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
HTTP_ERRORS = {"invalid_request": 400, "prompt_too_long": 400, "model_not_found": 404}
FIELDS = ("id", "object", "endpoint", "model", "errors", "input_file_id", "completion_window",
          "status", "output_file_id", "error_file_id", "created_at", "in_progress_at",
          "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
          "cancelling_at", "cancelled_at", "request_counts", "metadata", "usage")
MESSAGES = {"batch_expired": "This request could not be executed before the completion window "
                             "expired.",
            "batch_cancelled": "This request was cancelled before it finished.",
            "batch_failed": "This request was not run: the batch failed."}


class CreateBatch(BaseModel):
    """The body of ``POST /v1/batches`` (OpenAI's fields)."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=128)
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: str = Field(max_length=16)
    metadata: dict[str, str] | None = None
    output_expires_after: dict[str, Any] | None = None  # accepted; files live until deleted


def batch_key(batch_id: str) -> str:
    return f"genq:batch:{batch_id}"


def index_key(owner: str | None) -> str:
    return f"genq:batches:by:{owner}" if owner else "genq:batches"


def window_seconds(window: str) -> int:
    """Seconds of a completion window (``24h``; genqueue also takes ``<n>s|m|h|d``)."""
    match = WINDOW.match(window)
    seconds = int(match.group(1)) * UNIT_S[match.group(2)] if match else 0
    if not 0 < seconds <= MAX_WINDOW_S:
        raise InvalidRequest(f"completion_window: {window[:20]!r} is not supported; use '24h' "
                             "(or a shorter '<n>s', '<n>m', '<n>h', '<n>d', at most 30d)")
    return seconds


class Batches:
    """Batch records in Redis and the routes' logic (``view``: the caller's client)."""

    def __init__(self, client, settings, files):
        self.client, self.settings, self.files = client, settings, files
        self.redis = client.store.redis
        self.ttl = settings.result_ttl_s
        self.submitter = Submitter(self)

    # -- records ----------------------------------------------------------------------

    def _visible(self, view, record: dict[str, Any]) -> bool:
        return view.owner is None or view.admin or record.get("owner") == view.owner

    def load(self, view, batch_id: str) -> dict[str, Any]:
        raw = self.redis.get(batch_key(batch_id)) if len(batch_id) <= 128 else None
        record = json.loads(raw) if raw else None
        if record is None or not self._visible(view, record):
            raise NotFound(f"No batch found with id '{batch_id[:128]}'.")
        return record

    def save_new(self, record: dict[str, Any], idem: str | None = None,
                 fingerprint: str = "") -> dict[str, Any]:
        """Save a new batch, indexed; with an idempotency key (``idem``) used before, save
        nothing and return the batch it made (``IdempotencyConflict`` if that one was asked
        with other arguments). Claim and save are one transaction."""
        score = record["created_ns"] / 1e9
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    if idem:
                        pipe.watch(idem)
                        claim = json.loads(pipe.get(idem) or "null")
                        raw = pipe.get(batch_key(claim["id"])) if claim else None
                        if raw is not None:
                            if claim["fp"] != fingerprint:
                                raise IdempotencyConflict(
                                    "Idempotency-Key: used before with other arguments")
                            return json.loads(raw)
                    pipe.multi()
                    if idem:
                        pipe.set(idem, json.dumps({"id": record["id"], "fp": fingerprint}),
                                 ex=self.ttl)
                    pipe.set(batch_key(record["id"]), json.dumps(record), ex=self.ttl)
                    for key in {index_key(None), index_key(record.get("owner"))}:
                        pipe.zadd(key, {record["id"]: score})
                        pipe.expire(key, self.ttl)
                    pipe.execute()
                    return record
                except WatchError:
                    continue

    def update(self, batch_id: str, change: Callable[[dict], dict | None]) -> dict[str, Any]:
        """Apply ``change`` to the stored record atomically (optimistic: WATCH and retry);
        ``change`` returns the new record, or None to leave it. The record as stored."""
        key = batch_key(batch_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise NotFound(f"No batch found with id '{batch_id}'.")
                    current = json.loads(raw)
                    new = change(current)
                    if new is None:
                        pipe.unwatch()
                        return current
                    pipe.multi()
                    pipe.set(key, json.dumps(new), keepttl=True)
                    pipe.execute()
                    return new
                except WatchError:
                    continue

    # -- creating ---------------------------------------------------------------------

    def create(self, view, body: CreateBatch, key: str | None = None) -> dict[str, Any]:
        """Save the batch (``validating``) and start queueing it in the background; with an
        idempotency ``key`` used before by this API key, the batch that one made."""
        window_s = window_seconds(body.completion_window)
        if body.metadata is not None and (len(body.metadata) > 16 or any(
                len(k) > 64 or len(v) > 512 for k, v in body.metadata.items())):
            raise InvalidRequest("metadata: at most 16 pairs, keys up to 64 characters and "
                                 "values up to 512")
        info = self.files.get(body.input_file_id, view.owner, view.admin)
        if info.get("purpose") != "batch":
            raise InvalidRequest(f"input_file_id: file {body.input_file_id!r} has purpose "
                                 f"{info.get('purpose')!r}, not 'batch'")
        key = key or (body.metadata or {}).get("idempotency_key")
        idem, fingerprint = None, ""
        if key:
            scope = hashlib.sha256(f"{view.owner or ''}\n{key}".encode()).hexdigest()[:32]
            idem = f"genq:batch-idem:{scope}"
            fingerprint = hashlib.sha256(body.model_dump_json().encode()).hexdigest()[:32]
        now_ns = time.time_ns()
        now = now_ns // 1_000_000_000
        hex_id = uuid.uuid4().hex
        record: dict[str, Any] = {
            "id": f"batch_{hex_id}", "object": "batch", "endpoint": body.endpoint,
            "model": None, "errors": None, "input_file_id": body.input_file_id,
            "completion_window": body.completion_window, "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now,
            "in_progress_at": None, "expires_at": now + window_s, "finalizing_at": None,
            "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
            "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.metadata, "usage": None,
            # internal: whose it is (the submitter queues as them), its job, its window
            "owner": view.owner, "principal": {"admin": view.admin, "weight": view.weight,
                                               "raw_tokens": view.raw_tokens},
            "job_id": f"job-{uuid.UUID(hex_id)}", "window_s": window_s, "ending": None,
            "created_ns": now_ns,
        }
        saved = self.save_new(record, idem, fingerprint)
        if saved["id"] != record["id"]:
            return self.refresh(saved)
        self.submitter.start(record)
        return record

    # -- reading ----------------------------------------------------------------------

    def refresh(self, record: dict[str, Any], finalize: bool = True) -> dict[str, Any]:
        """The batch as it stands now: status and counts from its job; expiry applied; the
        files written once every request is final (unless ``finalize`` is False: then it
        reads ``finalizing``). A batch still ``validating`` whose submitter stopped (its
        lease lapsed) is taken up here."""
        if record["status"] in BATCH_FINAL:
            return record
        if record["status"] == "validating":
            self.submitter.start(record)
            return {**record, "status": "cancelling"} if record.get("ending") else record
        try:
            job = self.client.store.job(record["job_id"])
        except NotFound:  # the job's records expired before the batch's
            return {**record, "status": "expired"}
        done = self._done(job)
        if not done and record.get("ending") is None and time.time() >= record["expires_at"]:
            record = self.update(record["id"], lambda cur: None if cur.get("ending") else {
                **cur, "ending": "expired"})
            if record["ending"] == "expired" and record["status"] not in BATCH_FINAL:
                self.client.cancel_job(record["job_id"])
                job = self.client.store.job(record["job_id"])
                done = self._done(job)
        if done and record["status"] not in BATCH_FINAL:
            if finalize:
                return self.finalize(record)
            return {**record, "status": "finalizing", "request_counts": _counts(job["counts"])}
        if record["status"] in BATCH_FINAL:
            return record
        status = {"cancelled": "cancelling", "expired": "finalizing"}.get(
            record.get("ending") or "", "validating" if job["status"] == "validating"
            else "in_progress")
        if record["status"] == "finalizing":
            status = "finalizing"
        return {**record, "status": status, "request_counts": _counts(job["counts"])}

    @staticmethod
    def _done(job: dict[str, Any]) -> bool:
        return job["status"] in JOB_ENDED

    def cancel(self, view, batch_id: str) -> dict[str, Any]:
        """Cancel the batch: its unfinished requests (while ``validating``: its submitter
        cancels what it queued once it is done)."""
        record = self.load(view, batch_id)
        if record["status"] in ("failed", "completed", "expired"):
            raise InvalidRequest(f"Cannot cancel a batch with status '{record['status']}'.")
        if record["status"] != "validating" and \
                self.refresh(record, finalize=False)["status"] == "finalizing":
            return self.refresh(record)  # every request is final (or expired): nothing to cancel

        def mark(cur: dict) -> dict | None:
            if cur["status"] in (*BATCH_FINAL, "finalizing") or cur.get("ending"):
                return None
            return {**cur, "ending": "cancelled", "cancelling_at": int(time.time())}

        record = self.update(batch_id, mark)
        if record.get("ending") == "cancelled" and record["status"] not in BATCH_FINAL:
            if record["status"] != "validating":
                self.client.cancel_job(record["job_id"])
            return {**self.refresh(record, finalize=False), "status": "cancelling"}
        return self.refresh(record)

    def list(self, view, after: str | None, limit: int) -> dict[str, Any]:
        key = index_key(None if view.owner is None or view.admin else view.owner)
        start = 0
        if after:
            rank = self.redis.zrevrank(key, after)
            if rank is None:
                return {"object": "list", "data": [], "first_id": None, "last_id": None,
                        "has_more": False}
            start = rank + 1
        found: list[dict[str, Any]] = []
        while len(found) <= limit:
            ids = self.redis.zrevrange(key, start, start + limit)
            if not ids:
                break
            start += len(ids)
            raws = self.redis.mget([batch_key(i) for i in ids])
            gone = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
            if gone:
                self.redis.zrem(key, *gone)
                start -= len(gone)
            found += [json.loads(raw) for raw in raws if raw is not None]
        data = [public(self.refresh(r, finalize=False)) for r in found[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(found) > limit}

    # -- finalizing -------------------------------------------------------------------

    def finalize(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write the output and error files once and end the batch: completed, expired or
        cancelled. One finalizer at a time: it holds a lease (others answer ``finalizing``),
        renewed by its token alone and kept alive through the uploads; one that lost it
        leaves the batch to the finalizer that took it."""
        batch_id = record["id"]
        lease = Lease(self.redis, f"{batch_key(batch_id)}:lock", LOCK_S)
        if not lease.acquire():
            current = self.load_any(batch_id)
            return current if current["status"] in BATCH_FINAL else {**current, "status": "finalizing"}
        try:
            record = self.update(batch_id, lambda cur: None if cur["status"] in BATCH_FINAL else {
                **cur, "status": "finalizing", "finalizing_at": cur.get("finalizing_at")
                or int(time.time())})
            if record["status"] in BATCH_FINAL:
                return record
            written = self._write_files(record)
            job = self.client.store.job(record["job_id"])
            if not lease.held():
                return {**self.load_any(batch_id), "status": "finalizing"}

            def end(cur: dict) -> dict | None:
                if cur["status"] in BATCH_FINAL:
                    return None
                now = int(time.time())
                status = batch_status(cur.get("ending"), job["status"], job["counts"]["expired"])
                errors = cur.get("errors")
                if job["status"] == "failed" and not errors:
                    errors = {"object": "list", "data": [fault(
                        "batch_failed", job.get("error") or "the batch failed", None)]}
                return {**cur, "status": status, f"{status}_at": now, "errors": errors,
                        "output_file_id": written["output_file_id"],
                        "error_file_id": written["error_file_id"],
                        "request_counts": written["request_counts"], "usage": written["usage"],
                        "model": written["model"]}

            return self.update(batch_id, end)
        finally:
            lease.release()

    def load_any(self, batch_id: str) -> dict[str, Any]:
        raw = self.redis.get(batch_key(batch_id))
        if raw is None:
            raise NotFound(f"No batch found with id '{batch_id}'.")
        return json.loads(raw)

    def _write_files(self, record: dict[str, Any]) -> dict:
        """One pass over the job's results, in input order, into the two files."""
        shape = chat_completion if record["endpoint"] == "/v1/chat/completions" else text_completion
        expiring = record.get("ending") == "expired"
        outputs = [tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) for _ in range(2)]
        counts = {"total": 0, "completed": 0, "failed": 0}
        usage = {"input_tokens": 0, "output_tokens": 0}
        model = None
        now = int(time.time())
        try:
            for res in self.client.job_results(record["job_id"]):
                rid = res["id"]
                line: dict[str, Any] = {"id": f"batch_req_{rid}", "custom_id": res.get("custom_id")}
                counts["total"] += 1
                if res["status"] == "failed" and (res.get("error") or {}).get("code") in HTTP_ERRORS:
                    line.update(response=_refused(res), error=None)
                    counts["failed"] += 1
                    out = outputs[1]
                elif res["status"] == "succeeded":
                    model = model or res.get("model")
                    body = shape(res, res.get("model") or self.settings.model, created=now)
                    line.update(response={"status_code": 200, "request_id": rid, "body": body},
                                error=None)
                    counts["completed"] += 1
                    usage["input_tokens"] += body["usage"]["prompt_tokens"]
                    usage["output_tokens"] += body["usage"]["completion_tokens"]
                    out = outputs[0]
                else:
                    if res["status"] == "failed":
                        err = res.get("error") or {}
                        code = err.get("code") or "internal"
                        message = err.get("message") or "the request failed"
                    else:
                        code = ("batch_expired" if res["status"] == "expired" or expiring
                                else "batch_cancelled" if res["status"] == "cancelled"
                                else "batch_failed")
                        message = MESSAGES[code]
                    line.update(response=None, error={"code": code, "message": message})
                    counts["failed"] += 1
                    out = outputs[1]
                out.write((json.dumps(line, ensure_ascii=False) + "\n").encode())
            ids = []
            for out, kind in zip(outputs, ("output", "error"), strict=True):
                if not out.tell():
                    ids.append(None)
                    continue
                out.seek(0)
                ids.append(self.files.create(iter(lambda f=out: f.read(1024 * 1024), b""),
                                           filename=f"{record['id']}_{kind}.jsonl",
                                           purpose="batch_output", owner=record.get("owner"))["id"])
        finally:
            for out in outputs:
                out.close()
        return {"output_file_id": ids[0], "error_file_id": ids[1], "request_counts": counts,
                "model": model,
                "usage": {"input_tokens": usage["input_tokens"],
                          "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens": usage["output_tokens"],
                          "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": usage["input_tokens"] + usage["output_tokens"]}}


def _counts(counts: dict[str, int]) -> dict[str, int]:
    """OpenAI's ``request_counts`` from a job's counts."""
    return {"total": counts["total"], "completed": counts["succeeded"],
            "failed": counts["failed"] + counts["cancelled"] + counts["expired"]}


def _refused(res: dict[str, Any]) -> dict[str, Any]:
    """The HTTP answer to a request the endpoint would have refused (a bad body: 400, an
    unknown model: 404), OpenAI's error object as its body."""
    err = res["error"]
    status = HTTP_ERRORS[err["code"]]
    return {"status_code": status, "request_id": res["id"],
            "body": error_object(status, err.get("message") or "invalid request", err["code"],
                                 err.get("param"))}


def public(record: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI batch object (drops internal bookkeeping)."""
    return {k: record.get(k) for k in FIELDS}


def router(client, settings, files) -> APIRouter:
    """The routes of this part of the OpenAI surface: ``/v1/batches``."""
    api = APIRouter(tags=["openai"])
    batches = Batches(client, settings, files)

    @api.post("/v1/batches")
    def create_batch(body: CreateBatch, request: Request) -> dict:
        """Create a batch from an uploaded file of OpenAI Batch lines (purpose ``batch``): it
        answers ``validating`` at once and queues in the background. A repeat with the same
        ``Idempotency-Key`` header answers the batch the first call made."""
        return public(batches.create(request.state.client, body,
                                     request.headers.get("idempotency-key")))

    @api.get("/v1/batches")
    def list_batches(request: Request, after: str | None = Query(None, max_length=128),
                     limit: int = Query(20, ge=1, le=100)) -> dict:
        """The caller's batches, newest first (admins: every batch)."""
        return batches.list(request.state.client, after, limit)

    @api.get("/v1/batches/{batch_id}")
    def retrieve_batch(batch_id: str, request: Request) -> dict:
        """The batch as it stands (its files are written once every request is final)."""
        return public(batches.refresh(batches.load(request.state.client, batch_id)))

    @api.post("/v1/batches/{batch_id}/cancel")
    def cancel_batch(batch_id: str, request: Request) -> dict:
        """Cancel the batch's unfinished requests: ``cancelling``, then ``cancelled``."""
        return public(batches.cancel(request.state.client, batch_id))

    return api
