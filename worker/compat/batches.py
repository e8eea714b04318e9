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

The batch record (``worker.compat.batch_records``) is read with its job on every read once
queued: ``in_progress`` while requests are open; past ``expires_at`` the rest are cancelled
(``finalizing``, then ``expired``); ``POST /v1/batches/{id}/cancel`` cancels the rest
(``cancelling``, then ``cancelled``). Once every request is final, the first read that sees it
writes the output and error files and ends the batch (``worker.compat.batch_finalizing``).
A batch left ``validating`` by a gateway killed mid-batch resumes on its next read, or within
``LEASE_S`` after its lease lapsed: each gateway sweeps the validating batches that often.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import time
import uuid
from typing import Any, Literal

import structlog
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from worker.compat.batch_finalizing import Finalizer
from worker.compat.batch_queueing import LEASE_S, Submitter
from worker.compat.batch_records import VALIDATING_KEY, BatchRecords, batch_key, public
from worker.errors import InvalidRequest, NotFound
from worker.lifecycle import BATCH_FINAL, JOB_ENDED

log = structlog.get_logger(__name__)

MAX_WINDOW_S = 30 * 24 * 3600
WINDOW = re.compile(r"^([1-9][0-9]{0,7})([smhd])$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class CreateBatch(BaseModel):
    """The body of ``POST /v1/batches`` (OpenAI's fields)."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=128)
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: str = Field(max_length=16)
    metadata: dict[str, str] | None = None
    output_expires_after: dict[str, Any] | None = None  # accepted; files live until deleted


def window_seconds(window: str) -> int:
    """Seconds of a completion window (``24h``; genqueue also takes ``<n>s|m|h|d``)."""
    match = WINDOW.match(window)
    seconds = int(match.group(1)) * UNIT_S[match.group(2)] if match else 0
    if not 0 < seconds <= MAX_WINDOW_S:
        raise InvalidRequest(f"completion_window: {window[:20]!r} is not supported; use '24h' "
                             "(or a shorter '<n>s', '<n>m', '<n>h', '<n>d', at most 30d)")
    return seconds


class Batches(BatchRecords):
    """The Batch API's logic over the batch records (``view``: the caller's client)."""

    def __init__(self, client, settings, files):
        super().__init__(client.store.redis, settings.result_ttl_s)
        self.client, self.settings, self.files = client, settings, files
        self.submitter = Submitter(self)
        self.finalizer = Finalizer(self)

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
                return self.finalizer.finalize(record)
            return {**record, "status": "finalizing", "request_counts": _counts(job["counts"])}
        if record["status"] in BATCH_FINAL:
            return record
        status = {"cancelled": "cancelling", "expired": "finalizing"}.get(
            record.get("ending") or "", "validating" if job["status"] == "validating"
            else "in_progress")
        if record["status"] == "finalizing":
            status = "finalizing"
        return {**record, "status": status, "request_counts": _counts(job["counts"])}

    def sweep(self) -> list[str]:
        """Resume every batch still ``validating`` whose submitter stopped (its lease lapsed: a
        gateway killed mid-batch) without waiting for someone to read it; unlist the batches
        that left ``validating``. The ids resumed."""
        resumed = []
        for batch_id in self.redis.zrange(VALIDATING_KEY, 0, -1):
            raw = self.redis.get(batch_key(batch_id))
            record = json.loads(raw) if raw else None
            if record is None or record["status"] != "validating":
                self.redis.zrem(VALIDATING_KEY, batch_id)
            elif self.submitter.start(record):
                resumed.append(batch_id)
        return resumed

    def sweep_every(self, every_s: float, stop: threading.Event) -> None:
        """``sweep`` every ``every_s`` seconds until ``stop`` (the gateway's thread)."""
        while not stop.wait(every_s):
            try:
                for batch_id in self.sweep():
                    log.warning("batch_resumed", batch_id=batch_id,
                                reason="its submitter stopped while it was validating")
            except Exception as exc:  # noqa: BLE001 - Redis down: the next sweep tries again
                log.warning("batch_sweep_failed", error=repr(exc)[:200])

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
        """The caller's batches, newest first, ``limit`` a page after the batch ``after``."""
        found = self.page(view, after, limit)
        data = [public(self.refresh(r, finalize=False)) for r in found[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(found) > limit}


def _counts(counts: dict[str, int]) -> dict[str, int]:
    """OpenAI's ``request_counts`` from a job's counts."""
    return {"total": counts["total"], "completed": counts["succeeded"],
            "failed": counts["failed"] + counts["cancelled"] + counts["expired"]}


def router(client, settings, files) -> APIRouter:
    """The routes of this part of the OpenAI surface: ``/v1/batches``."""
    batches = Batches(client, settings, files)

    @contextlib.asynccontextmanager
    async def sweeping(_app):  # while the gateway runs, stale validating batches resume
        stop = threading.Event()
        threading.Thread(target=batches.sweep_every, args=(LEASE_S, stop), daemon=True,
                         name="batch sweep").start()
        try:
            yield
        finally:
            stop.set()

    api = APIRouter(tags=["openai"], lifespan=sweeping)

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
