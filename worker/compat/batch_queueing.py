"""Queueing a batch in the background: resumable, each line queued once.

``POST /v1/batches`` saves the batch (``validating``) and answers; a thread holding the batch's
submission lease (``genq:batch:<id>:lease``, ``worker.compat.lease``) then reads the input file
once into a spool, each line checked and tokenized once (``worker.compat.batch_input``). A
file-level fault fails the batch and queues nothing. Otherwise the batch's job is made and its
lines go in ``CHUNK`` at a time, line ``n`` under the request id ``uuid5(batch id, n)``. Each
step is one transaction that also advances a counter of the hash ``genq:batch:<id>:submit``
only if it still reads that step (``job``; per chunk ``queued``: its records, a bad body's
failed result counted in the job at once), so no step happens twice; ``sent`` then counts the
lines whose requests are published, ``SEND`` at a time. The job then leaves ``validating``
and the batch turns ``in_progress``.

A gateway killed part-way leaves the lease to lapse (``LEASE_S``); the next read of the batch,
on any gateway, takes it and starts over: the steps done are skipped, and of the chunk written
but perhaps not wholly published, only the requests no worker has seen are published again:
at most the ``SEND`` of the part being published when it died may then be queued twice, under
the same ids (a worker drops the copy of a request that already ended; each line is answered
once). Past ``MAX_STARTS`` starts the batch fails instead and its queued requests are
cancelled. The job is kept out of the workers' reaper of abandoned jobs: the batch resumes it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import structlog
from redis.exceptions import WatchError

from worker.compat.batch_input import Fault, entries, fault
from worker.compat.lease import Lease
from worker.errors import NotFound, QueueFull
from worker.queue.rediskeys import OPEN_JOBS_KEY, job_key, owner_key, pending_key
from worker.queue.webhooks import batch_ended
from worker.schema import result_record
from worker.submission.checker import Checker, OpenAIRoute
from worker.submission.lines import Line
from worker.submission.spool import Spool

log = structlog.get_logger(__name__)

CHUNK = 500  # lines per transaction
SEND = 50  # requests per publish: at most this many published twice after a kill
LEASE_S = 10.0  # a dead submitter's batch resumes this long after it stopped
MAX_STARTS = 5
MAX_REQUESTS = 200_000  # genqueue's bulk-job limit (OpenAI's is 50,000)
MAX_ERRORS = 1000  # file-level faults listed per failed batch
NAMESPACE = uuid.UUID("5f1d7c1e-3b0a-4c59-9f39-6b1f0d2a8e47")


def lease_key(batch_id: str) -> str:
    return f"genq:batch:{batch_id}:lease"


def progress_key(batch_id: str) -> str:
    return f"genq:batch:{batch_id}:submit"


def batch_starts_key(batch_id: str) -> str:
    return f"genq:batch:{batch_id}:starts"


def request_id(batch_id: str, number: int) -> str:
    """The request id of line ``number`` of the batch: the same on every start."""
    return str(uuid.uuid5(NAMESPACE, f"{batch_id}:{number}"))


class Submitter:
    """Submits batches for ``batches`` (a ``worker.compat.batches.Batches``)."""

    def __init__(self, batches):
        self.batches = batches
        self.redis, self.store = batches.redis, batches.client.store

    def start(self, record: dict[str, Any]) -> bool:
        """Submit the batch in a thread unless another submitter holds its lease."""
        lease = Lease(self.redis, lease_key(record["id"]), LEASE_S)
        if not lease.acquire():
            return False
        threading.Thread(target=self._run, args=(record["id"], lease), daemon=True,
                         name=f"submit {record['id']}").start()
        return True

    def _run(self, batch_id: str, lease: Lease) -> None:
        try:
            record = self.batches.load_any(batch_id)
            if record["status"] != "validating":
                return
            if self._count_start(batch_id, uuid.uuid4().hex) > MAX_STARTS:
                self._give_up(record)
            else:
                self._submit(record, lease)
        except Exception:  # Redis or storage down: the next read of the batch resumes it
            log.exception("batch_submission_stopped", batch_id=batch_id)
        finally:
            lease.release()

    def _count_start(self, batch_id: str, token: str) -> int:
        """Count this start (``token``) of the batch's submission; how many there were. A
        call replayed after a lost reply counts nothing twice (a set of start tokens)."""
        key = batch_starts_key(batch_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.sadd(key, token)
        pipe.expire(key, self.batches.ttl)
        pipe.scard(key)
        return pipe.execute()[-1]

    def _submit(self, record: dict[str, Any], lease: Lease) -> None:
        batch_id, progress = record["id"], progress_key(record["id"])
        view = self.batches.client.as_owner(record["owner"], **record["principal"])
        check = Checker(view, OpenAIRoute(url=record["endpoint"], priority="bulk",
                                          window_s=record["window_s"]))
        with Spool() as spool:
            faults = self._scan(view, record, check, spool)
            if faults:
                self._end(batch_id, "failed", faults)
                return
            if not int(self.redis.hget(progress, "job") or 0):  # nothing queued yet
                if self.batches.load_any(batch_id).get("ending"):
                    self._end(batch_id, "cancelled")
                    return
                try:
                    self._check_room(view, spool.runnable)
                except QueueFull as exc:
                    self._end(batch_id, "failed", [fault("queue_full", exc.message, None)])
                    return
                self._step(progress, "job", 0,
                           lambda pipe: self._create_job(record, spool.total, pipe))
            for k, chunk in enumerate(spool.chunks(CHUNK)):
                if not lease.held():
                    return  # another submitter took over
                self._queue(record, view, k, chunk)
            total = spool.total
        self.store.job_submitted(record["job_id"])
        now = int(time.time())
        counts = {"total": total, "completed": 0, "failed": 0}
        record = self.batches.update(batch_id, lambda cur: None if cur["status"] != "validating"
                                     else {**cur, "status": "in_progress", "in_progress_at": now,
                                           "request_counts": counts})
        if record.get("ending") == "cancelled":  # cancelled while validating
            self.batches.client.cancel_job(record["job_id"])

    def _scan(self, view, record: dict[str, Any], check: Checker, spool: Spool) -> list[dict]:
        """One pass over the input file into ``spool``: the file-level faults (after the first,
        nothing is kept: nothing will be queued)."""
        faults: list[dict] = []
        lines = 0
        try:
            stream = self.batches.files.open(record["input_file_id"], view.owner, view.admin)
        except NotFound:
            return [fault("file_not_found", "the input file was deleted", None, "input_file_id")]
        with stream:
            for entry in entries(stream, record["endpoint"], check):
                lines += 1
                if isinstance(entry, Fault):
                    if len(faults) < MAX_ERRORS:
                        faults.append(entry.fault)
                elif not faults:
                    spool.add(entry)
        if not lines:
            faults.append(fault("empty_file", "the input file has no requests", None,
                                "input_file_id"))
        elif lines > MAX_REQUESTS:
            faults.append(fault("too_many_tasks", f"{lines} requests; a batch takes at most "
                                f"{MAX_REQUESTS}", None, "input_file_id"))
        return faults

    def _check_room(self, view, n: int) -> None:
        """``QueueFull`` unless ``n`` more requests fit ``GENQ_MAX_PENDING`` and the key's
        ``GENQ_MAX_PENDING_PER_KEY`` (each chunk counts its own against the key)."""
        view._check_capacity(n)
        limit = self.batches.settings.max_pending_per_key
        if view.owner and limit and self.store.pending(view.owner) + n > limit:
            raise QueueFull(f"{self.store.pending(view.owner)} of this key's requests are "
                            f"pending; adding {n} would pass GENQ_MAX_PENDING_PER_KEY={limit}")

    def _create_job(self, record: dict[str, Any], total: int, pipe) -> None:
        job_id = record["job_id"]
        self.store.create_job(job_id, total, pipe, owner=record["owner"])
        pipe.hset(job_key(job_id), "batch", record["id"])  # webhook events name the batch
        pipe.zrem(OPEN_JOBS_KEY, job_id)  # the batch resumes it: no reaper

    def _queue(self, record: dict[str, Any], view, k: int, chunk: list[Line]) -> None:
        """Chunk ``k``: its records written once, then its requests published ``SEND`` at a
        time, ``sent`` (lines of the spool published) advanced after each part."""
        batch_id, job_id, progress = record["id"], record["job_id"], progress_key(record["id"])
        ids = [request_id(batch_id, line.number) for line in chunk]
        wrote = self._step(progress, "queued", k,
                           lambda pipe: self._write(job_id, record["owner"], ids, chunk, pipe))
        ending = self.batches.load_any(batch_id).get("ending")  # cancelled: queued, not sent
        sent = int(self.redis.hget(progress, "sent") or 0)
        for at in range(0, len(chunk), SEND):
            end = k * CHUNK + min(at + SEND, len(chunk))
            if sent >= end:
                continue
            todo = [(rid, line.request) for rid, line in
                    zip(ids[at:at + SEND], chunk[at:at + SEND], strict=True) if line.request]
            if not wrote:  # an earlier start may have published part of it: not what a worker saw
                states = self.store.admission_state([rid for rid, _ in todo])
                todo = [item for item, (status, attempts, *_) in zip(todo, states, strict=True)
                        if status == "queued" and not attempts]
            if todo and not ending:
                view._publish(todo, job_id)
            self.redis.hset(progress, "sent", end)

    def _write(self, job_id: str, owner: str | None, ids: list[str], chunk: list[Line],
               pipe) -> None:
        """A chunk's ids (input order), queued records and bad bodies' failed results."""
        ttl = self.batches.ttl
        self.store.add_job_ids(job_id, ids, pipe)
        good = [(rid, line.request) for rid, line in zip(ids, chunk, strict=True) if line.request]
        self.store.record_queued(good, job_id=job_id, pipe=pipe, owner=owner)
        if owner and good:  # the key's pending requests, given back as each one ends
            pipe.incrby(pending_key(owner), len(good))
            pipe.expire(pending_key(owner), ttl)
        bad = [result_record(rid, "failed", {"custom_id": line.custom_id}, job_id=job_id,
                             error=line.error) for rid, line in zip(ids, chunk, strict=True)
               if line.request is None]
        if bad:
            self.store.finish(bad, pipe=pipe)  # before the owner key: never counted pending
            for res in bad if owner else ():
                pipe.set(owner_key(res["id"]), owner, ex=ttl)

    def _step(self, key: str, field: str, at: int, write: Callable[[Any], None]) -> bool:
        """``write(pipe)`` in one transaction if ``field`` of the hash ``key`` still reads
        ``at`` (it then reads ``at + 1``); whether it ran."""
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    if int(pipe.hget(key, field) or 0) != at:
                        return False
                    pipe.multi()
                    write(pipe)
                    pipe.hset(key, field, at + 1)
                    pipe.expire(key, self.batches.ttl)
                    pipe.execute()
                    return True
                except WatchError:
                    continue

    def _end(self, batch_id: str, status: str, errors: list[dict] | None = None) -> None:
        """End a batch still ``validating`` as ``failed`` (with ``errors``) or ``cancelled``,
        its webhook event pushed in the same transaction (as the finalizer's would be)."""
        now = int(time.time())
        self.batches.update(batch_id, lambda cur: None if cur["status"] != "validating" else {
            **cur, "status": status, f"{status}_at": now,
            "errors": {"object": "list", "data": errors} if errors else cur["errors"]},
            also=lambda pipe, new: batch_ended(pipe, batch_id, new["job_id"], self.batches.ttl))

    def _give_up(self, record: dict[str, Any]) -> None:
        if int(self.redis.hget(progress_key(record["id"]), "job") or 0):
            self.batches.client.cancel_job(record["job_id"])
        self._end(record["id"], "failed", [fault(
            "submission_failed", f"the batch could not be queued in {MAX_STARTS} tries; "
            "none of its requests run", None)])

