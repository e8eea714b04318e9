"""The result store on Redis: one JSON record per request, cancel flags, starts; with jobs
(``jobs``), quotas (``quotas``) and heartbeats (``heartbeats``) it is ``ResultStore``. Keys:
``worker.queue.rediskeys``.

Every state change that must not happen twice (a redelivered request finishing again, a
cancel racing the worker) is one Lua script (``lua/*.lua``, loaded by ``worker.queue.scripts``),
so the first final state wins and job counters are bumped exactly once. Final results are
mirrored to Celery's ``celery-task-meta-<id>`` key and published on its channel
(``worker.queue.celerymeta``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from worker.errors import NotFound
from worker.lifecycle import is_final
from worker.ops.redisconn import connect
from worker.ops.settings import Settings
from worker.queue.celerymeta import celery_meta, meta_key
from worker.queue.heartbeats import HeartbeatBook
from worker.queue.jobs import JobBook, queued_record
from worker.queue.quotas import QuotaBook
from worker.queue.rediskeys import (
    attempts_key,
    dumps,
    job_key,
    owner_key,
    result_key,
    starts_key,
)
from worker.queue.scripts import register


class ResultStore(JobBook, QuotaBook, HeartbeatBook):
    """Reads and writes results, jobs and flags; safe to share between threads."""

    def __init__(self, url: str, ttl_s: int, settings: Settings | None = None):
        self.redis = connect(url, settings, decode_responses=True, retry_on_timeout=True)
        self.ttl = ttl_s
        self._finish = register(self.redis, "finish")
        self._start = register(self.redis, "start")
        self._unstart = register(self.redis, "unstart")
        self._progress = register(self.redis, "progress")
        self._link = register(self.redis, "link")
        self._reserve = register(self.redis, "reserve")
        self._release = register(self.redis, "release")
        self._append_ids = register(self.redis, "append_ids")
        self._submitted = register(self.redis, "submitted")
        self._job_chunk = register(self.redis, "job_chunk")
        self._reap = register(self.redis, "reap")

    # -- producers --------------------------------------------------------------------

    def record_queued(self, items: Iterable[tuple[str, dict[str, Any]]],
                      job_id: str | None = None, pipe=None, owner: str | None = None,
                      only_new: bool = False) -> None:
        """Write a ``queued`` record per (id, request) (``jobs.queued_record``), its owner and
        its ``webhook_url``, in one round trip. ``only_new``: never over a record that exists
        (a late replay)."""
        own = pipe is None
        pipe = pipe if pipe is not None else self.redis.pipeline(transaction=False)
        now = time.time()
        for request_id, request in items:
            record = queued_record(request_id, request, job_id, now)
            pipe.set(result_key(request_id), dumps(record), ex=self.ttl, nx=only_new)
            if owner:
                pipe.set(owner_key(request_id), owner, ex=self.ttl)
            if request.get("webhook_url"):
                pipe.set(f"genq:hook:{request_id}", request["webhook_url"], ex=self.ttl)
        if own:
            pipe.execute()

    # -- workers ----------------------------------------------------------------------

    def start(self, records: list[dict[str, Any]], tokens: list[str], alone: list[bool],
              pipe=None) -> list[int] | None:
        """Mark requests running and count the attempt once per start token (``alone``: it
        runs with no other row, so a worker death now is evidence against it); per request
        its attempt number, or 0 if it is already final (a redelivered duplicate). With
        ``pipe``: queued on it."""
        own = pipe is None
        pipe = pipe if pipe is not None else self.redis.pipeline(transaction=False)
        for rec, token, solo in zip(records, tokens, alone, strict=True):
            self._start(keys=[result_key(rec["id"]), attempts_key(rec["id"]),
                              starts_key(rec["id"]), meta_key(rec["id"])],
                        args=[dumps(rec), self.ttl, rec.get("job_id") or "", rec["id"], token,
                              int(solo), dumps(celery_meta(rec))], client=pipe)
        for job_id in {rec["job_id"] for rec in records if rec.get("job_id")}:
            pipe.expire(f"{job_key(job_id)}:running", self.ttl)
        return [int(x) for x in pipe.execute()[:len(records)]] if own else None

    def unstart(self, starts: list[tuple[str, str]], pipe) -> None:
        """Queue on ``pipe``: these (request id, start token) starts never count (the worker
        hands the requests back on purpose)."""
        for request_id, token in starts:
            self._unstart(keys=[attempts_key(request_id), starts_key(request_id),
                                meta_key(request_id)], args=[token], client=pipe)

    def progress(self, records: list[dict[str, Any]], pipe) -> None:
        """Queue on ``pipe`` running records with the text so far (never over a final one)."""
        for rec in records:
            self._progress(keys=[result_key(rec["id"])], args=[dumps(rec), self.ttl], client=pipe)

    def admission_state(self, ids: list[str]) -> list[tuple[str | None, int, int]]:
        """Per request: its stored status (None if unknown), how many times a worker started
        it, and how many of those starts ran it alone (unfinished starts of a request that is
        not final: its worker died while it ran alone)."""
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        pipe.mget([result_key(i) for i in ids])
        pipe.mget([attempts_key(i) for i in ids])
        for i in ids:
            pipe.hvals(starts_key(i))
        records, attempts, *starts = pipe.execute()
        out = []
        for raw, n, modes in zip(records, attempts, starts, strict=True):
            try:
                status = json.loads(raw).get("status") if raw else None
            except ValueError:
                status = None
            out.append((status, int(n or 0), sum(m == "1" for m in modes)))
        return out

    def finish(self, results: list[dict[str, Any]], pipe=None) -> list[bool] | None:
        """Store final results (first final state wins); True where this call stored it.
        With ``pipe``: queued on it."""
        own = pipe is None
        pipe = pipe if pipe is not None else self.redis.pipeline(transaction=False)
        for res in results:
            self._finish(keys=[result_key(res["id"]), meta_key(res["id"])],
                         args=[dumps(res), res["status"], self.ttl, res.get("job_id") or "",
                               res["id"], dumps(celery_meta(res))], client=pipe)
        for job_id in {r["job_id"] for r in results if r.get("job_id")}:
            pipe.expire(f"{job_key(job_id)}:done", self.ttl)
        return [bool(x) for x in pipe.execute()[:len(results)]] if own else None

    def cancelled(self, ids: list[str]) -> list[bool]:
        """Which of these requests have a cancel flag."""
        if not ids:
            return []
        return [v is not None for v in self.redis.mget([f"genq:cancel:{i}" for i in ids])]

    # -- clients ----------------------------------------------------------------------

    def get(self, request_id: str, owner: str | None = None) -> dict[str, Any]:
        """The result record; ``NotFound`` if unknown or expired, or (with ``owner``) if
        another owner's. One round trip."""
        raw, recorded = self.redis.mget([result_key(request_id), owner_key(request_id)])
        if raw is None or (owner is not None and recorded != owner):
            raise NotFound(f"no request {request_id!r} (unknown or expired)")
        return json.loads(raw)

    def get_many(self, ids: list[str]) -> list[dict[str, Any] | None]:
        """Result records for ``ids`` in one round trip (None where unknown)."""
        if not ids:
            return []
        return [json.loads(r) if r else None for r in self.redis.mget(map(result_key, ids))]

    def expire(self, records: list[dict[str, Any]]) -> None:
        """End queued records whose deadline passed as ``expired`` (first final state wins)."""
        self.finish([{**rec, "status": "expired", "finish_reason": "expired", "text": ""}
                     for rec in records])

    def cancel(self, ids: list[str]) -> list[bool]:
        """Flag requests as cancelled; queued ones end ``cancelled`` at once.

        True for each request that was queued or running (so the cancel took effect).
        """
        pipe = self.redis.pipeline(transaction=False)
        for i in ids:
            pipe.set(f"genq:cancel:{i}", 1, ex=self.ttl)
        pipe.execute()
        records = self.get_many(ids)
        to_finish = []
        for rec in records:
            if rec and rec["status"] == "queued":
                to_finish.append({**rec, "status": "cancelled", "finish_reason": "cancelled",
                                  "text": ""})
        self.finish(to_finish)
        return [bool(rec and not is_final(rec["status"])) for rec in records]
