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
from worker.queue.rediskeys import OPEN_JOBS_KEY, job_key, result_key


class JobBook:
    """``ResultStore``'s job methods (its ``redis``, ``ttl``, the scripts it registers, and
    its ``cancel`` and quota)."""

    redis: Any
    ttl: int
    _link: Any
    _append_ids: Any
    _submitted: Any

    def create_job(self, job_id: str, total: int, pipe, owner: str | None = None,
                   webhook_url: str | None = None) -> None:
        """Add the job (``validating`` until ``job_submitted``) to ``pipe``; its ids follow
        with ``add_job_ids``. A job whose submitter dies before that is reaped (``reap``)."""
        key = job_key(job_id)
        now = time.time()
        pipe.hset(key, mapping={"total": total, "created": now, **dict.fromkeys(FINAL, 0),
                                "state": "validating", "owner": owner or ""})
        if webhook_url:
            pipe.hset(key, "webhook", webhook_url)
        pipe.expire(key, self.ttl)
        pipe.zadd(OPEN_JOBS_KEY, {job_id: now})

    def touch_job(self, job_id: str, pipe) -> None:
        """The submitter is alive: keep the job from being reaped. The pipe's last reply is
        None if it was reaped already (the submitter must stop)."""
        pipe.zadd(OPEN_JOBS_KEY, {job_id: time.time()}, xx=True)
        pipe.zscore(OPEN_JOBS_KEY, job_id)

    def job_submitted(self, job_id: str) -> None:
        """Every request of the job is queued: it leaves ``validating`` (and, if every request
        already ended meanwhile, its webhook event is sent now)."""
        self._submitted(keys=[job_key(job_id), OPEN_JOBS_KEY], args=[job_id])

    def reap(self, stale_s: float = 60.0) -> list[str]:
        """Fail jobs whose submitter stopped showing life ``stale_s`` ago while queueing (a
        gateway or client killed mid-upload): what was queued is cancelled, what was not is
        given back to the owner's quota, the job ends ``failed``. Safe to run anywhere, often."""
        reaped = []
        for job_id in self.redis.zrangebyscore(OPEN_JOBS_KEY, 0, time.time() - stale_s):
            if not self.redis.zrem(OPEN_JOBS_KEY, job_id):
                continue  # another reaper took it
            fields = self.redis.hgetall(job_key(job_id))
            ids = self.redis.lrange(f"{job_key(job_id)}:ids", 0, -1)
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(job_key(job_id), mapping={
                "total": len(ids), "state": "failed",
                "error": "the submitter stopped before every request was queued"})
            pipe.execute()
            for start in range(0, len(ids), 1000):
                self.cancel(ids[start:start + 1000])
            if fields.get("owner"):
                self.unreserve(fields["owner"], int(fields.get("total", 0)) - len(ids))
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
