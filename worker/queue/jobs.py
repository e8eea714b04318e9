"""Bulk jobs in the result store: created ``validating`` with their submitter's sign of life,
their request ids appended in order, ``queued`` once every request is; read as counts and ids.
A submitter that stops showing life is reaped (its job fails, what it queued is cancelled)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from worker.errors import NotFound
from worker.lifecycle import FINAL, job_counts, job_status
from worker.queue.rediskeys import OPEN_JOBS_KEY, dumps, job_key, owner_key, result_key
from worker.schema import result_record

REAPED = "the submitter stopped before every request was queued"


def queued_record(request_id: str, request: dict[str, Any], job_id: str | None,
                  now: float) -> dict[str, Any]:
    """A request's ``queued`` record; it keeps the request's deadline (``expires_at``) so a
    reader can expire it."""
    record = result_record(request_id, "queued", request, job_id=job_id)
    if request.get("expires_in_s"):
        record["expires_at"] = now + float(request["expires_in_s"])
    return record


class JobBook:
    """``ResultStore``'s job methods (its ``redis``, ``ttl``, the scripts it registers, and
    its ``cancel`` and quota)."""

    redis: Any
    ttl: int
    _link: Any
    _append_ids: Any
    _submitted: Any
    _job_chunk: Any
    _reap: Any

    def create_job(self, job_id: str, total: int, pipe, owner: str | None = None,
                   webhook_url: str | None = None) -> None:
        """Add the job (``validating`` until ``job_submitted``) to ``pipe``; its ids follow
        with ``queue_chunk`` (a batch's: ``add_job_ids``). A job whose submitter dies before
        that is reaped (``reap``)."""
        key = job_key(job_id)
        now = time.time()
        pipe.hset(key, mapping={"total": total, "created": now, **dict.fromkeys(FINAL, 0),
                                "state": "validating", "owner": owner or ""})
        if webhook_url:
            pipe.hset(key, "webhook", webhook_url)
        pipe.expire(key, self.ttl)
        pipe.zadd(OPEN_JOBS_KEY, {job_id: now})

    def queue_chunk(self, job_id: str, ids: list[str], fresh: list[tuple[str, dict[str, Any]]],
                    owner: str | None, pipe) -> None:
        """Queue on ``pipe`` the next part of a job being submitted: ``ids`` appended in order,
        a ``queued`` record (its owner, its ``webhook_url``) per ``fresh`` (id, request), and
        the submitter seen alive; all of it only while the job is ``validating``. The pipe's
        last reply: 1 written, 0 nothing written (reaped meanwhile), -1 nothing written (the
        job expired). Replayed after a lost reply, it writes nothing twice."""
        base = [job_key(job_id), f"{job_key(job_id)}:ids", f"{job_key(job_id)}:chunks",
                OPEN_JOBS_KEY]
        now = time.time()
        new = dict(fresh)
        for start in range(0, max(len(ids), 1), 1000):  # per 1000 ids; all or none (MULTI)
            part = ids[start:start + 1000]
            keys, args = list(base), [job_id, self.ttl, uuid.uuid4().hex, now, len(part), *part]
            for request_id in (i for i in part if i in new):
                request = new[request_id]
                keys += [result_key(request_id), owner_key(request_id),
                         f"genq:hook:{request_id}"]
                args += [dumps(queued_record(request_id, request, job_id, now)), owner or "",
                         request.get("webhook_url") or ""]
            self._job_chunk(keys=keys, args=args, client=pipe)

    def job_submitted(self, job_id: str) -> None:
        """Every request of the job is queued: it leaves ``validating`` (and, if every request
        already ended meanwhile, its webhook event is sent now)."""
        self._submitted(keys=[job_key(job_id), OPEN_JOBS_KEY], args=[job_id])

    def reap(self, stale_s: float = 60.0) -> list[str]:
        """Fail jobs whose submitter stopped showing life ``stale_s`` ago while queueing (a
        gateway or client killed mid-upload): claimed and rewritten in one step
        (``reap.lua``: the job ends ``failed``, what was never queued is given back to the
        owner's quota), then what was queued is cancelled and the job unlisted. A reaper
        killed or a reply lost in between leaves it listed: the next run finishes it. Safe
        to run anywhere, often."""
        reaped = []
        for job_id in self.redis.zrangebyscore(OPEN_JOBS_KEY, 0, time.time() - stale_s):
            if not self._reap(keys=[job_key(job_id), f"{job_key(job_id)}:ids", OPEN_JOBS_KEY],
                              args=[job_id, time.time() - stale_s, REAPED, "failed"]):
                continue  # alive, submitted or gone
            for ids in self.job_ids(job_id):
                self.cancel(ids)
            self.redis.zrem(OPEN_JOBS_KEY, job_id)
            reaped.append(job_id)
        return reaped

    def add_job_ids(self, job_id: str, ids: list[str], pipe) -> None:
        """Append request ids to the job, in submission order, to ``pipe`` (once per call: the
        pipeline replayed after a lost reply appends nothing twice)."""
        keys = [f"{job_key(job_id)}:ids", f"{job_key(job_id)}:chunks"]
        for start in range(0, len(ids), 10_000):
            self._append_ids(keys=keys, args=[self.ttl, uuid.uuid4().hex,
                                              *ids[start:start + 10_000]], client=pipe)

    def link(self, ids: list[str], job_id: str) -> None:
        """Make requests submitted earlier (same idempotency key) members of ``job_id``."""
        if not ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for request_id in ids:
            self._link(keys=[result_key(request_id)], args=[job_id, request_id, self.ttl],
                       client=pipe)
        pipe.execute()

    def job(self, job_id: str) -> dict[str, Any]:
        """Job status and counts in one round trip; ``NotFound`` if unknown."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(job_key(job_id))
        pipe.scard(f"{job_key(job_id)}:running")
        fields, running = pipe.execute()
        if not fields:
            raise NotFound(f"no job {job_id!r} (unknown or expired)")
        counts = job_counts(fields, running)
        return {"id": job_id, "status": job_status(counts, fields.get("state")), "counts": counts,
                "created": float(fields.get("created", 0)), "owner": fields.get("owner") or None,
                "error": fields.get("error")}

    def job_ids(self, job_id: str, chunk: int = 1000) -> Iterator[list[str]]:
        """The job's request ids in submission order, ``chunk`` at a time."""
        key = f"{job_key(job_id)}:ids"
        if not self.redis.exists(job_key(job_id)):
            raise NotFound(f"no job {job_id!r} (unknown or expired)")
        start = 0
        while True:
            ids = self.redis.lrange(key, start, start + chunk - 1)
            if not ids:
                return
            yield ids
            start += len(ids)
