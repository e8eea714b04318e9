"""Requests as Celery task messages, and reading them back (protocol 2, JSON only).

A message is task ``genq.generate`` with the request dict as its only argument and the
request id as the task id; genqueue's bookkeeping rides in message headers
(``genq_job``, ``genq_submitted``, ``genq_expires``, ``genq_owner``, ``genq_weight``, and
``genq_adapter`` so the fetch script can leave a request for a worker that has its adapter),
so a foreign Celery producer can enqueue with
``app.send_task("genq.generate", args=[{"prompt": "..."}], queue="genq.interactive")``.

Celery's own options: ``expires`` is the request's deadline (the earlier of it and
``genq_expires``); the canvas in the body's third element (``callbacks``, ``errbacks``,
``chain``: ``link``, ``link_error``, a chain) is kept for the worker to publish once the result
is stored (``worker.queue.canvas``); what genqueue cannot honour (``eta``/``countdown``,
``time_limit``/``soft_time_limit``, a chord) is refused: the request fails ``invalid_request``
naming the option, never silently run without it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from worker.queue.app import TASK_NAME


class MalformedMessage(ValueError):
    """A message on a request queue that is not a genqueue request."""

    def __init__(self, message: str, request_id: str | None = None,
                 canvas: dict[str, Any] | None = None):
        super().__init__(message)
        self.request_id = request_id
        self.canvas = canvas  # what to publish after its failure is stored (errbacks, chain)


@dataclass
class Envelope:
    """One request as the worker received it."""

    id: str
    request: dict[str, Any]
    job_id: str | None
    submitted_at: float
    expires_at: float | None
    delivery: Any = field(repr=False, default=None)
    owner: str | None = None  # the API key id (or client owner) that submitted it
    weight: int = 1  # the owner's share of bulk admission
    canvas: dict[str, Any] | None = None  # Celery callbacks, errbacks, chain, root id
    foreign: bool = False  # not published by genqueue's client (no ``genq_submitted``)

    @property
    def priority(self) -> str:
        return "bulk" if self.request.get("priority") == "bulk" else "interactive"

    @property
    def adapter(self) -> str | None:
        return self.request.get("adapter")

    @property
    def max_new_tokens(self) -> int:
        return int(self.request.get("max_new_tokens") or 256)


def headers_for(job_id: str | None, submitted_at: float, expires_in_s: float | None,
                owner: str | None = None, weight: int = 1, adapter: str | None = None) -> dict:
    """The genqueue headers of a request message."""
    headers: dict[str, Any] = {"genq_submitted": submitted_at}
    if job_id:
        headers["genq_job"] = job_id
    if expires_in_s:
        headers["genq_expires"] = submitted_at + expires_in_s
    if owner:
        headers["genq_owner"] = owner
        headers["genq_weight"] = weight
    if adapter:
        headers["genq_adapter"] = adapter
    return headers


def parse(body: Any, headers: dict[str, Any], delivery=None) -> Envelope:
    """Read a decoded Celery protocol-2 message; ``MalformedMessage`` if it is not one."""
    request_id = headers.get("id")
    if not isinstance(request_id, str) or not request_id:
        raise MalformedMessage("message has no task id header (not Celery protocol 2)")
    if headers.get("task") != TASK_NAME:
        raise MalformedMessage(f"task {headers.get('task')!r} is not {TASK_NAME}", request_id)
    if not (isinstance(body, (list, tuple)) and len(body) == 3):
        raise MalformedMessage("body is not [args, kwargs, embed]", request_id)
    args, kwargs, embed = body
    canvas = canvas_of(embed, headers, request_id)
    refused = refused_options(headers, embed)
    if refused:
        raise MalformedMessage(refused, request_id, canvas)
    if isinstance(args, (list, tuple)) and len(args) == 1 and isinstance(args[0], dict) and not kwargs:
        request = args[0]
    elif not args and isinstance(kwargs, dict) and kwargs:
        request = kwargs
    else:
        raise MalformedMessage("expected one request dict as the only argument", request_id,
                               canvas)

    def number(name: str) -> float | None:
        value = headers.get(name)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    job_id, owner, weight = headers.get("genq_job"), headers.get("genq_owner"), number("genq_weight")
    deadlines = [t for t in (number("genq_expires"), _timestamp(headers.get("expires"))) if t]
    return Envelope(
        id=request_id,
        request=dict(request),
        job_id=job_id if isinstance(job_id, str) else None,
        submitted_at=number("genq_submitted") or time.time(),
        expires_at=min(deadlines) if deadlines else None,
        delivery=delivery,
        owner=owner if isinstance(owner, str) else None,
        weight=max(1, min(int(weight or 1), 1000)),
        canvas=canvas,
        foreign=number("genq_submitted") is None,
    )


def canvas_of(embed: Any, headers: dict[str, Any], request_id: str) -> dict[str, Any] | None:
    """What Celery would run after this task (protocol 2's embed): ``callbacks`` (``link``),
    ``errbacks`` (``link_error``), ``chain`` (the rest of a chain, last step first), with the
    ``root_id``; None when there is nothing."""
    if not isinstance(embed, dict):
        return None
    out = {k: [s for s in embed.get(k) or [] if isinstance(s, dict)]
           for k in ("callbacks", "errbacks", "chain")}
    if not any(out.values()):
        return None
    root = headers.get("root_id")
    return {**out, "root_id": root if isinstance(root, str) else request_id}


def refused_options(headers: dict[str, Any], embed: Any) -> str | None:
    """Why a message asks for what genqueue cannot honour (None if it does not)."""
    names = []
    if headers.get("eta") is not None:
        names.append("eta/countdown (genqueue runs a request as soon as a worker has room)")
    limits = headers.get("timelimit")
    if isinstance(limits, (list, tuple)) and any(x is not None for x in limits):
        names.append("time_limit/soft_time_limit (use max_new_tokens, or expires for a deadline)")
    if isinstance(embed, dict) and embed.get("chord") is not None:
        names.append("chord (a chord's header cannot hold genq.generate; a chain or a group "
                     "can)")
    if not names:
        return None
    return "Celery option(s) genqueue cannot honour: " + "; ".join(names)


def _timestamp(value: Any) -> float | None:
    """Celery's ``expires`` header (ISO 8601; naive means UTC) as a Unix time."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
