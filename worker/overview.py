"""The read side of the status page, ``GET /v1/overview``, ``GET /v1/jobs``, ``genq status`` and
``genq jobs``: one overview of workers, queues, jobs, batches and recent failures, built from
what Redis holds (worker heartbeats, the request lists, job counts, batch records).

Two small indexes are written for it (both idempotent, so a replayed write changes nothing):

- ``genq:jobs:all`` and ``genq:jobs:by:<owner>``: sorted sets, job id -> creation time, added
  where a job is created (``index_job``), expiring with the results (``GENQ_RESULT_TTL_S``);
  ids whose job expired are dropped when read.
- ``genq:failures``: sorted set, request id -> when a worker stored it ``failed``
  (``note_failures``), the newest ``FAILURES_KEPT`` kept. The result record is read back when
  the overview is built, so an entry whose request ended otherwise (a cancel won) is skipped.
- ``genq:rate:<job or batch id>``: sorted set of ``<time>:<finished>`` samples (score: the
  time) of an open job or batch, added each time it is listed (``moving_rates``), those of the
  last ``RATE_WINDOW_S`` kept (at most ``RATE_SAMPLES``), expiring soon after: its ``rate`` is
  requests finished per second over that window, so a job resumed after a pause, or one that
  sped up, reads its present speed, not its average since creation.

Visibility follows the API: a client with an owner (an API key) sees its own jobs, batches,
failures and pending count; an admin (or a client without owner) sees everything. Workers and
the queue totals are the fleet's and shown to every caller.
"""

from __future__ import annotations

import json
import time
from typing import Any

JOBS_ALL_KEY = "genq:jobs:all"
FAILURES_KEY = "genq:failures"
FAILURES_KEPT = 1000
JOB_FINAL = ("completed", "cancelled", "failed")  # a job's statuses once every request ended
BATCH_FINAL = ("failed", "completed", "expired", "cancelled")  # an OpenAI batch's final ones
MAX_LIMIT = 100
RATE_WINDOW_S = 60.0
RATE_SAMPLES = 64


def jobs_key(owner: str | None) -> str:
    """The jobs index of ``owner`` (None: every job)."""
    return f"genq:jobs:by:{owner}" if owner else JOBS_ALL_KEY


def index_job(pipe, job_id: str, owner: str | None, created: float, ttl_s: int) -> None:
    """Queue on ``pipe``: list ``job_id`` (newest first) for its owner and for admins."""
    for key in {jobs_key(None), jobs_key(owner)}:
        pipe.zadd(key, {job_id: created})
        pipe.expire(key, ttl_s)


def note_failures(pipe, results: list[dict[str, Any]], ttl_s: int) -> None:
    """Queue on ``pipe``: remember the failed ones among ``results`` (by id) for the overview's
    recent failures; keeps the newest ``FAILURES_KEPT``. A replayed write keeps each entry's
    first time (``NX``)."""
    failed = {r["id"]: time.time() for r in results if r.get("status") == "failed"}
    if not failed:
        return
    pipe.zadd(FAILURES_KEY, failed, nx=True)
    pipe.zremrangebyrank(FAILURES_KEY, 0, -FAILURES_KEPT - 1)
    pipe.expire(FAILURES_KEY, ttl_s)


# -- jobs ---------------------------------------------------------------------------------


def _scope(view) -> str | None:
    """The owner whose work ``view`` (a ``GenerationClient``) sees; None: everyone's."""
    return None if view.admin or view.owner is None else view.owner


def moving_rates(redis, items: list[tuple[str, int, float]], now: float) -> list[float | None]:
    """Per ``(id, finished, started)`` of an open job or batch: requests finished per second
    over the last ``RATE_WINDOW_S`` (since ``started`` when younger), from the samples this
    and earlier listings added; None when unknown (its first look) or nothing finished."""
    if not items:
        return []
    pipe = redis.pipeline(transaction=False)
    for item_id, finished, _ in items:
        key = f"genq:rate:{item_id}"
        pipe.zadd(key, {f"{now!r}:{finished}": now})
        pipe.zremrangebyscore(key, "-inf", f"({now - RATE_WINDOW_S}")
        pipe.zremrangebyrank(key, 0, -RATE_SAMPLES - 1)
        pipe.expire(key, int(RATE_WINDOW_S * 2))
        pipe.zrange(key, 0, 0, withscores=True)
    oldest = pipe.execute()[4::5]
    rates: list[float | None] = []
    for (_, finished, started), first in zip(items, oldest, strict=True):
        if now - started <= RATE_WINDOW_S:
            span, done = now - started, finished
        else:  # the oldest sample of the window (the one just added at the least)
            member, at = first[0]
            span, done = now - at, finished - int(member.rsplit(":", 1)[1])
        rates.append(done / span if done > 0 and span >= 1.0 else None)
    return rates


def job_summary(info: dict[str, Any], rate: float | None = None) -> dict[str, Any]:
    """A job as listed: id, status, counts, created, progress (0-1), ``rate`` (finished
    requests per second, from ``moving_rates``; None once it ended) and the seconds left at
    that rate (None when unknown)."""
    counts = info["counts"]
    total = counts["total"]
    finished = job_finished(info)
    rate = rate if info["status"] not in JOB_FINAL else None
    eta = (total - finished) / rate if rate else None
    out = {"id": info["id"], "object": "job", "status": info["status"], "counts": counts,
           "created": info.get("created"), "progress": finished / total if total else 1.0,
           "rate": rate, "eta_s": eta}
    if info.get("owner"):
        out["owner"] = info["owner"]
    if info.get("error"):
        out["error"] = info["error"]
    return out


def job_finished(info: dict[str, Any]) -> int:
    """How many of a job's requests ended."""
    return sum(info["counts"][k] for k in ("succeeded", "failed", "cancelled", "expired"))


def list_jobs(view, after: str | None = None, limit: int = 20) -> dict[str, Any]:
    """The caller's jobs, newest first, as ``GET /v1/batches`` pages (``after``: the last id
    of the page before; ``limit``: 1-100): ``{"object": "list", "data", "first_id", "last_id",
    "has_more"}``. Admins (and a client without owner) see every job."""
    from worker.errors import NotFound

    limit = max(1, min(int(limit), MAX_LIMIT))
    redis = view.store.redis
    key = jobs_key(_scope(view))
    start = 0
    if after:
        rank = redis.zrevrank(key, after)
        if rank is None:
            return {"object": "list", "data": [], "first_id": None, "last_id": None,
                    "has_more": False}
        start = rank + 1
    found: list[dict[str, Any]] = []
    while len(found) <= limit:
        ids = redis.zrevrange(key, start, start + limit)
        if not ids:
            break
        start += len(ids)
        gone = []
        for job_id in ids:
            try:
                info = view.store.job(job_id)
            except NotFound:
                gone.append(job_id)
                continue
            found.append(info)
        if gone:
            redis.zrem(key, *gone)
            start -= len(gone)
    now = time.time()
    open_ = [i for i in found[:limit] if i["status"] not in JOB_FINAL]
    rates = dict(zip((i["id"] for i in open_), moving_rates(
        redis, [(i["id"], job_finished(i), float(i.get("created") or now)) for i in open_], now),
        strict=True))
    data = [job_summary(info, rates.get(info["id"])) for info in found[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(found) > limit}


# -- batches ------------------------------------------------------------------------------


def list_batches(view, limit: int = 20) -> list[dict[str, Any]]:
    """The caller's newest OpenAI batches, as ``GET /v1/batches/{id}`` answers them except
    that none is finalized here (a batch whose requests all ended reads ``finalizing`` until
    it is retrieved), with ``progress``, ``rate`` and ``eta_s`` added."""
    from worker.compat.batch_records import batch_key, index_key, public
    from worker.compat.batches import Batches

    redis = view.store.redis
    ids = redis.zrevrange(index_key(_scope(view)), 0, max(0, limit - 1))
    if not ids:
        return []
    reader = Batches(view, view.settings, None)
    out = []
    for raw in redis.mget([batch_key(i) for i in ids]):
        if raw is None:
            continue
        record = json.loads(raw)
        if record["status"] not in ("validating", *BATCH_FINAL):
            record = reader.refresh(record, finalize=False)
        batch = public(record)
        if view.admin or view.owner is None:
            batch["owner"] = record.get("owner")
        out.append(batch)
    now = time.time()
    finished = {b["id"]: (b.get("request_counts") or {}).get("completed", 0)
                + (b.get("request_counts") or {}).get("failed", 0) for b in out}
    open_ = [b for b in out if b["status"] not in BATCH_FINAL]
    rates = dict(zip((b["id"] for b in open_), moving_rates(redis, [
        (b["id"], finished[b["id"]], b.get("in_progress_at") or b.get("created_at") or now)
        for b in open_], now), strict=True))
    for batch in out:
        total, done, rate = ((batch.get("request_counts") or {}).get("total") or 0,
                             finished[batch["id"]], rates.get(batch["id"]))
        batch.update(progress=done / total if total else 0.0 if batch["id"] in rates else 1.0,
                     rate=rate, eta_s=(total - done) / rate if rate else None)
    return out


# -- workers, queues, failures ------------------------------------------------------------


def workers(view, now: float | None = None) -> list[dict[str, Any]]:
    """The live workers, from their heartbeats, by name."""
    now = time.time() if now is None else now
    out = []
    for w in view.store.workers():
        running = w.get("running") or {}
        waiting = w.get("waiting") or {}
        out.append({
            "name": w.get("name"), "device": w.get("device"), "model": w.get("model"),
            "backend": w.get("backend"), "scheduler": w.get("scheduler"),
            "adapters": w.get("adapters") or [],
            "running": sum(int(v) for v in running.values()),
            "waiting": sum(int(v) for v in waiting.values()),
            "tokens_per_s": w.get("tokens_per_s"), "tokens": w.get("tokens"),
            "busy": bool(w.get("busy")), "steps": w.get("steps"),
            "last_heartbeat": w.get("at"), "heartbeat_age_s": max(0.0, now - float(w.get("at") or now)),
            "self_check": w.get("self_check"), "pid": w.get("pid"),
            "held": {"running": running, "waiting": waiting}})
    return sorted(out, key=lambda w: w["name"] or "")


def _submitted_at(raw: str | bytes | None) -> float | None:
    """When a queued Celery message was submitted (genqueue's header), or None."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)["headers"].get("genq_submitted")
        return float(value) if value is not None else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def queues(view, fleet: list[dict[str, Any]], now: float | None = None) -> dict[str, Any]:
    """Per priority: requests on Redis, held by workers waiting to join, running, and how long
    the oldest one on Redis has waited; per owner (yours alone unless admin): requests not
    final and bulk requests on their own list."""
    from worker.queue.app import (
        BULK_QUEUE,
        INTERACTIVE_QUEUE,
        OWNER_LISTS_KEY,
        pending_by_queue,
        request_lists,
    )

    now = time.time() if now is None else now
    broker = view.broker
    lengths = pending_by_queue(broker)
    interactive, bulk, _ = request_lists(broker)
    pipe = broker.pipeline(transaction=False)
    for name in (*interactive, *bulk):
        pipe.lindex(name, -1)  # kombu pushes on the left and takes from the right: the oldest
    tails = pipe.execute()
    oldest = {INTERACTIVE_QUEUE: None, BULK_QUEUE: None}
    for name, raw in zip((*interactive, *bulk), tails, strict=True):
        at = _submitted_at(raw)
        q = INTERACTIVE_QUEUE if name in interactive else BULK_QUEUE
        if at is not None and (oldest[q] is None or at < oldest[q]):
            oldest[q] = at
    per_priority = {}
    for priority, q in (("interactive", INTERACTIVE_QUEUE), ("bulk", BULK_QUEUE)):
        per_priority[priority] = {
            "queued": lengths[q],
            "held": sum(int((w["held"]["waiting"] or {}).get(priority, 0)) for w in fleet),
            "running": sum(int((w["held"]["running"] or {}).get(priority, 0)) for w in fleet),
            "oldest_wait_s": max(0.0, now - oldest[q]) if oldest[q] is not None else None}
    scope = _scope(view)
    owner_lists = {}
    for name in broker.hkeys(OWNER_LISTS_KEY):
        name = name.decode() if isinstance(name, bytes) else name
        owner_lists[name.removeprefix(BULK_QUEUE + ".")] = name
    owners = sorted(set(owner_lists) | set(_known_owners(view.settings)))
    if scope is not None:
        owners = [scope]
    pipe = broker.pipeline(transaction=False)
    for owner in owners:
        pipe.llen(owner_lists.get(owner) or f"{BULK_QUEUE}.{owner}")
    bulk_lengths = pipe.execute() if owners else []
    pending = [view.store.pending(o) for o in owners]
    by_owner = [{"owner": o, "pending": p, "bulk_queued": int(n)}
                for o, p, n in zip(owners, pending, bulk_lengths, strict=True)]
    return {**per_priority, "owners": by_owner}


def _known_owners(settings) -> list[str]:
    """The ids of the configured API keys (owners may have work without a bulk list)."""
    from worker.ops.keys import key_id

    out = []
    for entry in (*settings.api_keys, *settings.admin_keys):
        value = entry.get_secret_value() if hasattr(entry, "get_secret_value") else entry
        out.append(key_id(value)[0])
    return out


def failures(view, limit: int = 20) -> list[dict[str, Any]]:
    """The newest requests that failed (yours alone unless admin): id, error code and message,
    worker, job, custom id, when."""
    from worker.queue.rediskeys import owner_key

    redis = view.store.redis
    scope = _scope(view)
    entries = redis.zrevrange(FAILURES_KEY, 0, FAILURES_KEPT - 1, withscores=True)
    out: list[dict[str, Any]] = []
    for start in range(0, len(entries), 100):
        part = entries[start:start + 100]
        ids = [i for i, _ in part]
        records = view.store.get_many(ids)
        owners = redis.mget([owner_key(i) for i in ids]) if scope is not None else [None] * len(ids)
        for (request_id, at), rec, owner in zip(part, records, owners, strict=True):
            if rec is None or rec.get("status") != "failed":
                continue
            if scope is not None and owner != scope:
                continue
            err = rec.get("error") or {}
            out.append({"id": request_id, "code": err.get("code"), "message": err.get("message"),
                        "worker": rec.get("worker"), "job_id": rec.get("job_id"),
                        "custom_id": rec.get("custom_id"), "at": at})
            if len(out) >= limit:
                return out
    return out


def build_overview(view, jobs: int = 20, batches: int = 20, recent_failures: int = 20
                   ) -> dict[str, Any]:
    """Everything the status page shows, for ``view`` (a ``GenerationClient``, maybe an
    owner's): workers, queues, the newest jobs and batches, recent failures."""
    now = time.time()
    fleet = workers(view, now)
    job_list = list_jobs(view, limit=jobs)["data"]
    batch_list = list_batches(view, limit=batches)
    return {
        "object": "overview", "at": now,
        "scope": {"owner": view.owner, "admin": bool(view.admin or view.owner is None)},
        "workers": fleet,
        "queues": queues(view, fleet, now),
        "jobs": job_list,
        "job_statuses": _tally(j["status"] for j in job_list),
        "batches": batch_list,
        "batch_statuses": _tally(b["status"] for b in batch_list),
        "failures": failures(view, recent_failures),
    }


def _tally(statuses) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in statuses:
        out[s] = out.get(s, 0) + 1
    return out
