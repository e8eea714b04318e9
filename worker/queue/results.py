"""The result store on Redis: one JSON record per request, jobs, cancel flags, heartbeats.

Every state change that must not happen twice (a redelivered request finishing again, a
cancel racing the worker) is one Lua script (``lua/*.lua``, loaded by ``worker.queue.scripts``),
so the first final state wins and job counters are bumped exactly once. Final results are
mirrored to Celery's ``celery-task-meta-<id>`` key and published on its channel, as Celery's
Redis result backend does, so ``AsyncResult(id).get()`` returns as soon as a result is stored
and ``.state`` reads PENDING (no meta), STARTED, then SUCCESS, FAILURE or REVOKED.

Keys (all expire after ``GENQ_RESULT_TTL_S``):
``genq:r:<id>`` result JSON · ``genq:cancel:<id>`` cancel flag · ``genq:job:<jid>`` counts
(hash) · ``genq:job:<jid>:ids`` submission order (list) · ``genq:job:<jid>:done`` and
``:running`` (sets) · ``genq:rjobs:<id>`` other jobs a request belongs to (idempotency keys) ·
``genq:idem:<scope>:<key>`` idempotency claims · ``genq:attempts:<id>`` how many times a
worker started it · ``genq:starts:<id>`` each start's token and whether it ran alone ·
``genq:owner:<id>`` who submitted it · ``genq:pending:<owner>`` how many of an owner's
requests are not final (the per-key quota) · ``genq:jobs:open`` jobs still being submitted, by
last sign of life (the reaper's index) · ``genq:hook:<id>`` a request's webhook URL ·
``genq:events`` webhook events for ``genq notifier`` (see ``worker.queue.webhooks``) ·
``genq:worker:<name>`` and the hash ``genq:workers`` heartbeats.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from worker.errors import NotFound
from worker.lifecycle import FINAL, is_final, job_counts, job_status
from worker.ops.redisconn import connect
from worker.ops.settings import Settings
from worker.queue.scripts import register
from worker.schema import result_record

CELERY_STATE = {"succeeded": "SUCCESS", "failed": "FAILURE", "cancelled": "REVOKED",
                "expired": "REVOKED"}
WORKERS_KEY = "genq:workers"  # hash: worker name -> its latest heartbeat (JSON)
OPEN_JOBS_KEY = "genq:jobs:open"  # zset: job id -> when its submitter last showed life


def meta_key(request_id: str) -> str:
    """Celery's result key (``RedisBackend.get_key_for_task``), also its pub/sub channel."""
    return f"celery-task-meta-{request_id}"


def celery_meta(record: dict[str, Any], worker: str | None = None) -> dict[str, Any]:
    """Celery's result meta for a record: STARTED while running (``result``: the worker, as
    Celery stores it), SUCCESS with the result dict, FAILURE with ``GenerationFailed("<code>:
    <message>")``, REVOKED (``TaskRevokedError``) when cancelled or expired."""
    status = record["status"]
    if status == "running":
        return {"status": "STARTED", "result": {"hostname": worker or record.get("worker"),
                                                "pid": None},
                "traceback": None, "children": [], "date_done": None, "task_id": record["id"]}
    if status == "failed":
        err = record.get("error") or {}
        payload: Any = {"exc_type": "GenerationFailed", "exc_module": "worker.errors",
                        "exc_message": [f"{err.get('code')}: {err.get('message')}"]}
    elif status in ("cancelled", "expired"):
        payload = {"exc_type": "TaskRevokedError", "exc_module": "celery.exceptions",
                   "exc_message": [status]}
    else:
        payload = record
    return {"status": CELERY_STATE[status], "result": payload, "traceback": None,
            "children": [], "date_done": datetime.now(UTC).isoformat(), "task_id": record["id"]}


def result_key(request_id: str) -> str:
    return f"genq:r:{request_id}"


def job_key(job_id: str) -> str:
    return f"genq:job:{job_id}"


def attempts_key(request_id: str) -> str:
    return f"genq:attempts:{request_id}"


def starts_key(request_id: str) -> str:
    return f"genq:starts:{request_id}"


def owner_key(request_id: str) -> str:
    return f"genq:owner:{request_id}"


def pending_key(owner: str) -> str:
    return f"genq:pending:{owner}"


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class ResultStore:
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

    # -- producers --------------------------------------------------------------------

    def record_queued(self, items: Iterable[tuple[str, dict[str, Any]]],
                      job_id: str | None = None, pipe=None, owner: str | None = None,
                      only_new: bool = False) -> None:
        """Write a ``queued`` record per (id, request), its owner and its ``webhook_url``, in
        one round trip. The record keeps the request's deadline (``expires_at``) so a reader
        can expire it. ``only_new``: never over a record that exists (a late replay)."""
        own = pipe is None
        pipe = pipe if pipe is not None else self.redis.pipeline(transaction=False)
        now = time.time()
        for request_id, request in items:
            record = result_record(request_id, "queued", request, job_id=job_id)
            if request.get("expires_in_s"):
                record["expires_at"] = now + float(request["expires_in_s"])
            pipe.set(result_key(request_id), _dumps(record), ex=self.ttl, nx=only_new)
            if owner:
                pipe.set(owner_key(request_id), owner, ex=self.ttl)
            if request.get("webhook_url"):
                pipe.set(f"genq:hook:{request_id}", request["webhook_url"], ex=self.ttl)
        if own:
            pipe.execute()

    def reserve(self, owner: str, n: int, limit: int | None) -> int | None:
        """Count ``n`` more pending requests for ``owner`` if they all fit under ``limit``;
        None if they do not (nothing counted), else the new count."""
        token = f"genq:resv:{uuid.uuid4().hex}"  # a replay of this call counts nothing twice
        got = int(self._reserve(keys=[pending_key(owner), token], args=[n, limit or 0, self.ttl]))
        return None if got < 0 else got

    def unreserve(self, owner: str, n: int) -> None:
        """Give back ``n`` reserved places that were never queued (once, replays included)."""
        if n > 0:
            self._release(keys=[pending_key(owner), f"genq:resv:{uuid.uuid4().hex}"],
                          args=[n, self.ttl])

    def pending(self, owner: str) -> int:
        """How many of ``owner``'s requests are not final."""
        return int(self.redis.get(pending_key(owner)) or 0)

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
                        args=[_dumps(rec), self.ttl, rec.get("job_id") or "", rec["id"], token,
                              int(solo), _dumps(celery_meta(rec))], client=pipe)
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
            self._progress(keys=[result_key(rec["id"])], args=[_dumps(rec), self.ttl], client=pipe)

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
                         args=[_dumps(res), res["status"], self.ttl, res.get("job_id") or "",
                               res["id"], _dumps(celery_meta(res))], client=pipe)
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

    # -- workers' heartbeats ----------------------------------------------------------

    def heartbeat(self, name: str, info: dict[str, Any], ttl_s: int = 15, pipe=None) -> None:
        """Say that worker ``name`` is alive, with what it holds (read by ``/readyz``, the
        demand metric and other workers' fair share)."""
        raw = _dumps({**info, "at": time.time(), "ttl": ttl_s})
        own = pipe is None
        pipe = pipe if pipe is not None else self.redis.pipeline(transaction=False)
        pipe.set(f"genq:worker:{name}", raw, ex=ttl_s)
        pipe.hset(WORKERS_KEY, name, raw)
        if own:
            pipe.execute()

    def forget_worker(self, name: str) -> None:
        """Remove a stopping worker's heartbeat."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(f"genq:worker:{name}")
        pipe.hdel(WORKERS_KEY, name)
        pipe.execute()

    def workers(self) -> list[dict[str, Any]]:
        """Heartbeats of the workers alive now (stale entries are removed)."""
        now = time.time()
        alive, stale = [], []
        for name, raw in self.redis.hgetall(WORKERS_KEY).items():
            try:
                info = json.loads(raw)
                fresh = now - float(info["at"]) < float(info.get("ttl", 15))
            except (ValueError, KeyError, TypeError):
                fresh = False
            (alive if fresh else stale).append(info if fresh else name)
        if stale:
            self.redis.hdel(WORKERS_KEY, *stale)
        return alive
