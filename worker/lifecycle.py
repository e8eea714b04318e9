"""The lifecycle of requests, jobs and OpenAI batches, defined once (pure: no Redis).

A request is ``queued``, then ``running`` (each progress write: ``running`` again), then one
final status that nothing overwrites; a queued request may end without running (cancelled,
expired). A job's status and an OpenAI batch's are derived from their requests' counts here,
and so is the webhook event each sends. The result store's Lua scripts are given ``FINAL``
from here (``worker.queue.scripts``), so Python and Lua cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

QUEUED, RUNNING = "queued", "running"
FINAL = ("succeeded", "failed", "cancelled", "expired")
STATUSES = (QUEUED, RUNNING, *FINAL)
# a stored status -> the statuses a write may replace it with (a final one is never replaced)
TRANSITIONS = {QUEUED: frozenset({RUNNING, *FINAL}), RUNNING: frozenset({RUNNING, *FINAL}),
               **{s: frozenset() for s in FINAL}}

JOB_COUNTS = ("total", QUEUED, RUNNING, *FINAL)
JOB_ENDED = ("completed", "cancelled", "failed")  # job statuses once every request ended
BATCH_FINAL = ("failed", "completed", "expired", "cancelled")  # an OpenAI batch's final ones
JOB_EVENTS = {"completed": "batch.completed", "failed": "batch.failed",
              "cancelled": "batch.cancelled", "expired": "batch.expired"}


def is_final(status: str | None) -> bool:
    return status in FINAL


def overdue(record: Mapping[str, Any] | None, now: float) -> bool:
    """A queued request whose deadline (``expires_at``) has passed: it is to end ``expired``."""
    return bool(record) and record["status"] == QUEUED and record.get("expires_at") is not None \
        and record["expires_at"] <= now


def job_counts(stored: Mapping[str, Any], running: int) -> dict[str, int]:
    """A job's counts from its stored hash (``total`` and one count per final status) and the
    size of its running set: the rest of its requests are queued."""
    counts = {k: int(stored.get(k, 0)) for k in ("total", *FINAL)}
    left = counts["total"] - sum(counts[k] for k in FINAL)
    counts[RUNNING] = max(0, min(running, left))
    counts[QUEUED] = max(0, left - counts[RUNNING])
    return {k: counts[k] for k in JOB_COUNTS}


def job_status(counts: Mapping[str, int], state: str | None = None) -> str:
    """``validating`` or ``failed`` while its stored ``state`` says so (being submitted; reaped),
    else ``queued``, ``running``, then once every request ended ``completed`` (``cancelled``
    if some were cancelled and none succeeded)."""
    if state in ("validating", "failed"):
        return state
    finished = sum(counts[k] for k in FINAL)
    if finished >= counts["total"]:
        return "cancelled" if counts["cancelled"] and not counts["succeeded"] else "completed"
    return RUNNING if finished or counts[RUNNING] else QUEUED


def batch_status(ending: str | None, job_status: str, expired: int) -> str:
    """The final status of an OpenAI batch whose job ended: the ending asked for (``cancelled``,
    ``expired``), else ``failed`` if its job failed, ``expired`` if ``expired`` of its requests
    did, else ``completed``."""
    return ending or ("failed" if job_status == "failed" else "expired" if expired else "completed")


def request_event(status: str) -> str:
    """The webhook event type of a request that ended ``status``."""
    return "generation.completed" if status == "succeeded" else "generation.failed"


def job_event(status: str) -> str:
    """The webhook event type of a job or batch that ended ``status``."""
    return JOB_EVENTS.get(status, "batch.completed")
