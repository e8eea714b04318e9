"""The result store on Redis: one JSON record per request, jobs, cancel flags, heartbeats.

Every state change that must not happen twice (a redelivered request finishing again, a
cancel racing the worker) is one Lua script, so the first final state wins and job counters
are bumped exactly once. Final results are mirrored to Celery's ``celery-task-meta-<id>`` key
so ``AsyncResult(id)`` and Flower see them too.

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
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from worker.errors import NotFound
from worker.ops.redisconn import connect
from worker.ops.settings import Settings
from worker.schema import result_record

FINAL = ("succeeded", "failed", "cancelled", "expired")
JOB_COUNTS = ("total", "queued", "running", "succeeded", "failed", "cancelled", "expired")
CELERY_STATE = {"succeeded": "SUCCESS", "failed": "FAILURE", "cancelled": "REVOKED",
                "expired": "REVOKED"}

_IS_FINAL = """
local function is_final(raw)
  if not raw then return false end
  local ok, doc = pcall(cjson.decode, raw)
  if not ok then return false end
  local s = doc['status']
  return s == 'succeeded' or s == 'failed' or s == 'cancelled' or s == 'expired'
end
"""
# KEYS: result, celery meta. ARGV: result json, status, ttl, job id or '', request id, meta json.
# Every job the request belongs to is counted (its own and any linked by idempotency keys);
# an expired job is never resurrected by a late finish.
FINISH = _IS_FINAL + """
if is_final(redis.call('GET', KEYS[1])) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[6], 'EX', ARGV[3])
local owner = redis.call('GET', 'genq:owner:' .. ARGV[5])
if owner then
  if redis.call('DECR', 'genq:pending:' .. owner) < 0 then
    redis.call('SET', 'genq:pending:' .. owner, 0)
  end
end
local notify = redis.call('EXISTS', 'genq:webhooks:global') == 1
local hook = redis.call('GET', 'genq:hook:' .. ARGV[5])
if hook or (notify and ARGV[4] == '') then
  redis.call('LPUSH', 'genq:events',
             cjson.encode({type = 'generation', id = ARGV[5], url = hook or ''}))
end
local jobs = redis.call('SMEMBERS', 'genq:rjobs:' .. ARGV[5])
if ARGV[4] ~= '' then table.insert(jobs, ARGV[4]) end
for _, jid in ipairs(jobs) do
  local job = 'genq:job:' .. jid
  if redis.call('EXISTS', job) == 1 then
    redis.call('SREM', job .. ':running', ARGV[5])
    if redis.call('SADD', job .. ':done', ARGV[5]) == 1 then
      redis.call('HINCRBY', job, ARGV[2], 1)
      local f = redis.call('HMGET', job, 'total', 'succeeded', 'failed', 'cancelled', 'expired',
                           'webhook', 'state')
      local ended = 0
      for i = 2, 5 do ended = ended + (tonumber(f[i]) or 0) end
      if ended >= (tonumber(f[1]) or 0) and f[7] ~= 'validating' and (f[6] or notify)
         and redis.call('HSETNX', job, 'notified', 1) == 1 then
        redis.call('LPUSH', 'genq:events', cjson.encode({type = 'job', id = jid}))
      end
    end
  end
end
return 1
"""
# KEYS: result. ARGV: job id, request id, ttl. Adds a request submitted earlier (same
# idempotency key) to another job: counted at once if final, else when it finishes.
LINK = _IS_FINAL + """
local raw = redis.call('GET', KEYS[1])
local job = 'genq:job:' .. ARGV[1]
if is_final(raw) then
  if redis.call('SADD', job .. ':done', ARGV[2]) == 1 then
    redis.call('HINCRBY', job, cjson.decode(raw)['status'], 1)
  end
  redis.call('EXPIRE', job .. ':done', ARGV[3])
else
  redis.call('SADD', 'genq:rjobs:' .. ARGV[2], ARGV[1])
  redis.call('EXPIRE', 'genq:rjobs:' .. ARGV[2], ARGV[3])
end
return 1
"""
# KEYS: result, attempts, starts. ARGV: running json, ttl, job id or '', request id, start
# token, 1 if it runs alone else 0. Returns the attempt number (1 for the first start), or 0 if
# the request is already final. Idempotent: a start is counted once per token, so a retried
# write counts nothing twice.
START = _IS_FINAL + """
if is_final(redis.call('GET', KEYS[1])) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if ARGV[3] ~= '' then redis.call('SADD', 'genq:job:' .. ARGV[3] .. ':running', ARGV[4]) end
if redis.call('HSETNX', KEYS[3], ARGV[5], ARGV[6]) == 1 then redis.call('INCR', KEYS[2]) end
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[2])
return tonumber(redis.call('GET', KEYS[2]))
"""
# KEYS: attempts, starts. ARGV: start token. A start handed back unfinished by a worker that
# stops on purpose (warm shutdown): it never counts. Idempotent.
UNSTART = """
if redis.call('HDEL', KEYS[2], ARGV[1]) == 1 then
  if redis.call('DECR', KEYS[1]) < 0 then redis.call('SET', KEYS[1], 0, 'KEEPTTL') end
end
return 1
"""
# KEYS: result. ARGV: running json with the text so far, ttl. Never overwrites a final state.
PROGRESS = _IS_FINAL + """
if is_final(redis.call('GET', KEYS[1])) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""
# KEYS: job, the open-jobs index. ARGV: job id. The job leaves ``validating``; a job whose
# requests all ended already (twins of finished requests, fast workers) is notified here. A
# job no longer validating (reaped: its submitter was too slow) is left as it is.
SUBMITTED = """
if redis.call('HGET', KEYS[1], 'state') ~= 'validating' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'queued')
redis.call('ZREM', KEYS[2], ARGV[1])
local f = redis.call('HMGET', KEYS[1], 'total', 'succeeded', 'failed', 'cancelled', 'expired',
                     'webhook')
local ended = 0
for i = 2, 5 do ended = ended + (tonumber(f[i]) or 0) end
if ended >= (tonumber(f[1]) or 0) and (f[6] or redis.call('EXISTS', 'genq:webhooks:global') == 1)
   and redis.call('HSETNX', KEYS[1], 'notified', 1) == 1 then
  redis.call('LPUSH', 'genq:events', cjson.encode({type = 'job', id = ARGV[1]}))
end
return 1
"""
# KEYS: the owner's pending counter. ARGV: how many, the limit (0: none), ttl.
# Counts them in only if all fit: returns the new count, or -1 - the current count.
RESERVE = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local n, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
if limit > 0 and cur + n > limit then return -1 - cur end
redis.call('INCRBY', KEYS[1], n)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return cur + n
"""
WORKERS_KEY = "genq:workers"  # hash: worker name -> its latest heartbeat (JSON)
OPEN_JOBS_KEY = "genq:jobs:open"  # zset: job id -> when its submitter last showed life


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
        self._finish = self.redis.register_script(FINISH)
        self._start = self.redis.register_script(START)
        self._unstart = self.redis.register_script(UNSTART)
        self._progress = self.redis.register_script(PROGRESS)
        self._link = self.redis.register_script(LINK)
        self._reserve = self.redis.register_script(RESERVE)
        self._submitted = self.redis.register_script(SUBMITTED)

    # -- producers --------------------------------------------------------------------

    def record_queued(self, items: Iterable[tuple[str, dict[str, Any]]],
                      job_id: str | None = None, pipe=None, owner: str | None = None) -> None:
        """Write a ``queued`` record per (id, request), its owner and its ``webhook_url``, in
        one round trip. The record keeps the request's deadline (``expires_at``) so a reader
        can expire it."""
        own = pipe is None
        pipe = pipe if pipe is not None else self.redis.pipeline(transaction=False)
        now = time.time()
        for request_id, request in items:
            record = result_record(request_id, "queued", request, job_id=job_id)
            if request.get("expires_in_s"):
                record["expires_at"] = now + float(request["expires_in_s"])
            pipe.set(result_key(request_id), _dumps(record), ex=self.ttl)
            if owner:
                pipe.set(owner_key(request_id), owner, ex=self.ttl)
            if request.get("webhook_url"):
                pipe.set(f"genq:hook:{request_id}", request["webhook_url"], ex=self.ttl)
        if own:
            pipe.execute()

    def reserve(self, owner: str, n: int, limit: int | None) -> int | None:
        """Count ``n`` more pending requests for ``owner`` if they all fit under ``limit``;
        None if they do not (nothing counted), else the new count."""
        got = int(self._reserve(keys=[pending_key(owner)], args=[n, limit or 0, self.ttl]))
        return None if got < 0 else got

    def unreserve(self, owner: str, n: int) -> None:
        """Give back ``n`` reserved places that were never queued."""
        if n > 0:
            self.redis.decrby(pending_key(owner), n)

    def pending(self, owner: str) -> int:
        """How many of ``owner``'s requests are not final."""
        return int(self.redis.get(pending_key(owner)) or 0)

    def create_job(self, job_id: str, total: int, pipe, owner: str | None = None,
                   webhook_url: str | None = None) -> None:
        """Add the job (``validating`` until ``job_submitted``) to ``pipe``; its ids follow
        with ``add_job_ids``. A job whose submitter dies before that is reaped (``reap``)."""
        key = job_key(job_id)
        now = time.time()
        pipe.hset(key, mapping={"total": total, "created": now, "succeeded": 0, "failed": 0,
                                "cancelled": 0, "expired": 0, "state": "validating",
                                "owner": owner or ""})
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
        """Append request ids to the job, in submission order, to ``pipe``."""
        key = f"{job_key(job_id)}:ids"
        for start in range(0, len(ids), 10_000):
            pipe.rpush(key, *ids[start:start + 10_000])
        pipe.expire(key, self.ttl)

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
                              starts_key(rec["id"])],
                        args=[_dumps(rec), self.ttl, rec.get("job_id") or "", rec["id"], token,
                              int(solo)], client=pipe)
        for job_id in {rec["job_id"] for rec in records if rec.get("job_id")}:
            pipe.expire(f"{job_key(job_id)}:running", self.ttl)
        return [int(x) for x in pipe.execute()[:len(records)]] if own else None

    def unstart(self, starts: list[tuple[str, str]], pipe) -> None:
        """Queue on ``pipe``: these (request id, start token) starts never count (the worker
        hands the requests back on purpose)."""
        for request_id, token in starts:
            self._unstart(keys=[attempts_key(request_id), starts_key(request_id)], args=[token],
                          client=pipe)

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
        now = datetime.now(UTC).isoformat()
        for res in results:
            status = res["status"]
            if status == "failed":
                err = res.get("error") or {}
                payload: Any = {"exc_type": "RuntimeError", "exc_module": "builtins",
                                "exc_message": [f"{err.get('code')}: {err.get('message')}"]}
            elif status in ("cancelled", "expired"):
                payload = {"exc_type": "TaskRevokedError", "exc_module": "celery.exceptions",
                           "exc_message": [status]}
            else:
                payload = res
            meta = {"status": CELERY_STATE[status], "result": payload, "traceback": None,
                    "children": [], "date_done": now, "task_id": res["id"]}
            self._finish(keys=[result_key(res["id"]), f"celery-task-meta-{res['id']}"],
                         args=[_dumps(res), status, self.ttl, res.get("job_id") or "",
                               res["id"], _dumps(meta)], client=pipe)
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
        return [bool(rec and rec["status"] in ("queued", "running")) for rec in records]

    def job(self, job_id: str) -> dict[str, Any]:
        """Job status and counts in one round trip; ``NotFound`` if unknown."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(job_key(job_id))
        pipe.scard(f"{job_key(job_id)}:running")
        fields, running = pipe.execute()
        if not fields:
            raise NotFound(f"no job {job_id!r} (unknown or expired)")
        counts = {k: int(fields.get(k, 0)) for k in JOB_COUNTS if k not in ("queued", "running")}
        finished = sum(counts[k] for k in FINAL)
        counts["running"] = max(0, min(running, counts["total"] - finished))
        counts["queued"] = max(0, counts["total"] - finished - counts["running"])
        status = "completed" if finished == counts["total"] else (
            "running" if finished or counts["running"] else "queued")
        if status == "completed" and counts["cancelled"] and not counts["succeeded"]:
            status = "cancelled"
        if fields.get("state") in ("validating", "failed"):
            status = fields["state"]
        return {"id": job_id, "status": status, "counts": {k: counts[k] for k in JOB_COUNTS},
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
