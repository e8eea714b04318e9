"""A bulk job from checked lines: every line checked once (all or nothing for the client and
``/v1/jobs``), then written chunk by chunk, each chunk one MULTI/EXEC (ids and records, only
while the job is still open) followed by its messages."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from worker.errors import GenqError, IdempotencyConflict, InvalidRequest, JobReaped
from worker.overview import index_job
from worker.submission import idempotency
from worker.submission.checker import Checker
from worker.submission.lines import Line, batched

CONFLICT_BATCH = 1000  # keys looked up per round trip while checking
CHECK_BATCH = 256  # lines checked (their prompts counted) together


def check_job(client, lines: Iterable[Line], keep: Callable[[Line], None]) -> int:
    """Check every line once (``CHECK_BATCH`` at a time) and ``keep`` each checked one, in
    order; how many. Raises ``InvalidRequest`` listing every bad line (a parse error, a bad
    request, two sharing an ``idempotency_key``), or ``IdempotencyConflict`` listing every
    key used before with another body; the caller then queues nothing."""
    checker = Checker(client)
    errors: list[str] = []
    seen: dict[str, str] = {}  # idempotency key -> where it first appeared
    keyed: list[tuple[str, dict[str, Any]]] = []  # (where, request) to look up
    conflicts: list[str] = []
    count = 0
    for chunk in batched(lines, CHECK_BATCH):
        todo = [line for line in chunk if line.error is None]
        for line, checked in zip(todo, checker.check_many([ln.body for ln in todo]), strict=True):
            line.body = None  # checked: only the request is kept
            if isinstance(checked, GenqError):
                line.error = checked.message
            else:
                line.request = checked
        for line in chunk:
            key = line.request.get("idempotency_key") if line.error is None else None
            if key is not None and key in seen:
                line.error = f"idempotency_key {key!r} is also on {seen[key]}"
            if line.error is not None:
                errors.append(f"{line.where}: {line.error}")
                continue
            if key is not None:
                seen[key] = line.where
                keyed.append((line.where, line.request))
            keep(line)
            count += 1
        if len(keyed) >= CONFLICT_BATCH:
            conflicts += idempotency.conflicts(client.store.redis, client.owner, keyed)
            keyed = []
    conflicts += idempotency.conflicts(client.store.redis, client.owner, keyed)
    if errors:
        raise InvalidRequest(listed(errors, "bad request(s)"))
    if conflicts:
        raise IdempotencyConflict(listed(conflicts, "idempotency conflict(s)"))
    return count


def enqueue_job(client, chunks: Iterable[list[dict[str, Any]]], total: int, priority: str,
                webhook_url: str | None = None) -> str:
    """Queue checked requests, given ``chunks`` at a time, as one job of ``total``; its id.
    Each chunk is one MULTI/EXEC (``queue_chunk``): a submitter killed while sending one
    leaves none of it (never ids without records, which nobody could end), and a chunk that
    finds the job reaped writes nothing (the reaper gave back the places of everything not
    queued; this submitter gives back nothing twice). A request whose idempotency key was
    claimed before joins the job under its earlier id and is not generated again."""
    if not total:
        raise InvalidRequest("submit_many needs at least one request")
    client._check_capacity(total)
    client._reserve(total)
    store, settings = client.store, client.settings
    job_id = f"job-{uuid.uuid4()}"
    pipe = store.redis.pipeline(transaction=True)
    store.create_job(job_id, total, pipe, owner=client.owner, webhook_url=webhook_url)
    index_job(pipe, job_id, client.owner, time.time(), settings.result_ttl_s)  # genq jobs
    queued = 0
    for requests in chunks:
        checked = [(str(uuid.uuid4()), {**r, "priority": r.get("priority", priority)})
                   for r in requests]
        earlier = idempotency.claim(store.redis, client.owner, checked, settings.result_ttl_s)
        fresh = [item for item, twin in zip(checked, earlier, strict=True) if twin is None]
        store.queue_chunk(job_id, [twin or rid for (rid, _), twin
                                   in zip(checked, earlier, strict=True)], fresh, client.owner, pipe)
        written = pipe.execute()[-1]
        if written != 1:  # reaped meanwhile (this submitter was too slow): nothing written
            idempotency.release(store.redis, client.owner, [req for _, req in fresh])
            if written < 0:  # the job expired: no reaper gave back its places
                client._unreserve(total - queued)
            raise JobReaped(f"job {job_id} failed: its submitter queued nothing for "
                            f"GENQ_JOB_SUBMIT_TIMEOUT_S={settings.job_submit_timeout_s}", job_id)
        queued += len(checked)
        # requests submitted before with the same key join this job instead of running again
        store.link([twin for twin in earlier if twin is not None], job_id)
        client._unreserve(len(checked) - len(fresh))
        if fresh:
            client._publish(fresh, job_id=job_id)
    store.job_submitted(job_id)
    return job_id


def listed(errors: list[str], what: str) -> str:
    """``3 bad request(s): line 2: ...; line 5: ...`` (the first 20)."""
    more = f" (+{len(errors) - 20} more)" if len(errors) > 20 else ""
    return f"{len(errors)} {what}: " + "; ".join(errors[:20]) + more

