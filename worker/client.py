"""The Python client for web backends and scripts. Imports no model library (no torch).

    from worker.client import GenerationClient
    client = GenerationClient()                      # GENQ_BROKER_URL, or the default
    rid = client.submit("Write a haiku", max_new_tokens=32)
    print(client.wait(rid)["text"])
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pydantic import SecretStr
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.errors import InvalidRequest, NotFound, QueueFull
from worker.lifecycle import FINAL, overdue
from worker.ops.redisconn import connect
from worker.ops.settings import Settings, get_settings
from worker.queue.app import make_app, pending_by_queue
from worker.queue.publishing import publish
from worker.queue.results import ResultStore
from worker.schema import GenerationRequest
from worker.submission import idempotency
from worker.submission.checker import Checker, check_webhook
from worker.submission.jobs import check_job, enqueue_job
from worker.submission.lines import Line, read_items
from worker.submission.spool import Spool
from worker.tokencount import CounterCache


class GenerationClient:
    """Submit requests and bulk jobs; read, wait for and cancel their results.

    With an ``owner`` (the gateway uses the API key's id), what it submits belongs to that
    owner: another owner's client gets ``NotFound`` for it (existence is not revealed), its
    pending requests count against ``GENQ_MAX_PENDING_PER_KEY``, its idempotency keys are its
    own, and its bulk requests take turns with other owners'. Without an owner (one trusted
    backend) everything is visible. ``admin`` sees and cancels every owner's work.
    """

    def __init__(self, broker_url: str | None = None, *, settings: Settings | None = None,
                 owner: str | None = None, admin: bool = False, weight: int = 1,
                 raw_tokens: bool | None = None):
        settings = settings or get_settings()
        if broker_url:
            update: dict[str, Any] = {"broker_url": SecretStr(broker_url)}
            if settings.result_url is None:
                update["result_url"] = SecretStr(broker_url)
            settings = settings.model_copy(update=update)
        self.settings = settings
        self.app = make_app(settings, batch_publish=True)
        self.store = ResultStore(settings.result_backend_url, settings.result_ttl_s, settings)
        self.broker = connect(settings.broker_url.get_secret_value(), settings)
        # publishing is never replayed: a publish that timed out fails visibly, never twice
        self.publisher = connect(settings.broker_url.get_secret_value(), settings,
                                 retry=Retry(NoBackoff(), 0))
        self.counter = CounterCache(self.store.redis)
        self._fleet: tuple[float, list[dict[str, Any]]] = (float("-inf"), [])
        self.owner, self.admin, self.weight = owner or None, admin, weight
        self.raw_tokens = owner is None if raw_tokens is None else raw_tokens

    def as_owner(self, owner: str | None, *, admin: bool = False, weight: int = 1,
                 raw_tokens: bool = False) -> GenerationClient:
        """A view of this client for another owner (sharing its connections)."""
        view = copy.copy(self)
        view.owner, view.admin, view.weight, view.raw_tokens = owner or None, admin, weight, raw_tokens
        return view

    # -- submitting -------------------------------------------------------------------

    def submit(self, prompt: str | None = None, messages: list[dict] | None = None, *,
               request: GenerationRequest | None = None, **params: Any) -> str:
        """Validate and enqueue one request (interactive unless ``priority="bulk"``); its id.
        ``request``: one already parsed (the gateway's), instead of the fields.

        With an ``idempotency_key`` (scoped by the owner), a repeat returns the first
        request's id and generates nothing; the same key with another body raises
        ``IdempotencyConflict``. Races are settled by one Redis ``SET NX``.
        """
        body = request or {k: v for k, v in {"prompt": prompt, "messages": messages,
                                             **params}.items() if v is not None}
        return self.submit_checked(Checker(self).check(body))

    def submit_checked(self, data: dict[str, Any]) -> str:
        """Enqueue one request a ``Checker`` of this client gave; its id."""
        self._check_capacity(1)
        self._reserve(1)
        request_id = str(uuid.uuid4())
        try:
            earlier = idempotency.claim(self.store.redis, self.owner, [(request_id, data)],
                                        self.settings.result_ttl_s)[0]
            if earlier is not None:
                self._unreserve(1)
                return earlier
            try:
                self.store.record_queued([(request_id, data)], owner=self.owner)
                self._publish([(request_id, data)], job_id=None)
            except BaseException:
                idempotency.release(self.store.redis, self.owner, [data])
                raise
        except BaseException:
            self._unreserve(1)
            raise
        return request_id

    def submit_many(self, requests: Iterable[dict[str, Any]], *, priority: str = "bulk",
                    webhook_url: str | None = None) -> str:
        """Validate every request, then enqueue them all as one job; the job id.

        Items are request dicts or OpenAI Batch lines (``{"custom_id", "method", "url",
        "body"}``). Nothing is queued if any request is invalid (``InvalidRequest`` lists every
        bad one by its index from 0, two requests sharing an ``idempotency_key`` included),
        an ``idempotency_key`` was used before with another body (``IdempotencyConflict``), or
        the queue cannot take them all (``QueueFull``). Publishing is pipelined; until every
        request is queued the job reads ``validating``. A request whose ``idempotency_key`` was
        seen before joins the job with its earlier id and is not generated again. With
        ``webhook_url``, ``genq notifier`` posts the job's ``batch.*`` event there when it ends.
        """
        hook = self._hook(webhook_url)
        checked: list[Line] = []
        check_job(self, read_items(requests), checked.append)
        return enqueue_job(self, [[ln.request for ln in checked]], len(checked), priority, hook)

    def submit_stream(self, source: Callable[[], Iterable[dict[str, Any] | Line]], *,
                      priority: str = "bulk", chunk: int = 1000,
                      webhook_url: str | None = None) -> str:
        """``submit_many`` for inputs too big to hold: ``source()`` is read once, each item
        checked once into a spool (memory, then a temporary file), then queued ``chunk`` at
        a time. ``source()`` yields request dicts (errors name their index) or the ``Line``s
        of a file from ``worker.submission.lines.read_lines`` (errors name the line)."""
        hook = self._hook(webhook_url)
        with Spool() as spool:
            total = check_job(self, read_items(source()), spool.add)
            chunks = ([ln.request for ln in part] for part in spool.chunks(chunk))
            return enqueue_job(self, chunks, total, priority, hook)

    def validate(self, body: Any) -> dict[str, Any]:
        """The request as ``submit`` would queue it (schema, limits and prompt length, as the
        workers count it), or ``InvalidRequest`` / ``PromptTooLong``; queues nothing."""
        return Checker(self).check(body)

    def _hook(self, url: str | None) -> str | None:
        return check_webhook(url, self.settings)

    def _fleet_info(self) -> list[dict[str, Any]]:
        """The live workers' published heartbeats (adapters, limits), re-read every 5 s."""
        at, fleet = self._fleet
        if time.monotonic() - at > 5.0:
            fleet = self.store.workers()
            self._fleet = (time.monotonic(), fleet)
        return fleet

    def _check_capacity(self, n: int) -> None:
        pending = sum(pending_by_queue(self.broker).values())
        if pending + n > self.settings.max_pending:
            raise QueueFull(f"{pending} requests pending; adding {n} would pass "
                            f"GENQ_MAX_PENDING={self.settings.max_pending}")

    def _reserve(self, n: int) -> None:
        """Count ``n`` more pending requests against the owner's quota, all or none."""
        if self.owner is None:
            return
        limit = self.settings.max_pending_per_key
        if self.store.reserve(self.owner, n, limit) is None:
            raise QueueFull(f"{self.store.pending(self.owner)} of this key's requests are "
                            f"pending; adding {n} would pass GENQ_MAX_PENDING_PER_KEY={limit}")

    def _unreserve(self, n: int) -> None:
        if self.owner is not None:
            self.store.unreserve(self.owner, n)

    def _publish(self, items: list[tuple[str, dict[str, Any]]], job_id: str | None) -> None:
        """Publish ``(request id, request)`` pairs as this client's owner."""
        publish(self.app, self.publisher, items, job_id, self.owner, self.weight)

    # -- reading ----------------------------------------------------------------------

    def get(self, request_id: str) -> dict[str, Any]:
        """The result as it stands now (never blocks); ``NotFound`` if unknown/expired or
        another owner's. A queued request whose deadline passed reads ``expired`` at once."""
        return _public(self._expire_due([self.store.get(request_id, self._scope)])[0])

    @property
    def _scope(self) -> str | None:
        """The owner whose work this client may see (None: everyone's)."""
        return None if self.admin else self.owner

    def _visible(self, owner: str | None) -> bool:
        return self._scope is None or owner == self._scope

    def _expire_due(self, records: list[dict[str, Any] | None]) -> list[dict[str, Any] | None]:
        """Records as they read now: queued ones past their deadline end ``expired``."""
        now = time.time()
        due = [r for r in records if overdue(r, now)]
        if not due:
            return records
        self.store.expire(due)
        return [self.store.get_many([r["id"]])[0] if r in due else r for r in records]

    def wait(self, request_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Poll until the request is final; ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while True:
            result = self.get(request_id)
            if result["status"] in FINAL:
                return result
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"request {request_id} still {result['status']}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def cancel(self, request_id: str) -> bool:
        """Cancel one request; True if it was still queued or running."""
        self.store.get(request_id, self._scope)  # NotFound for unknown ids and others' 
        return self.store.cancel([request_id])[0]

    def job(self, job_id: str) -> dict[str, Any]:
        """``{"id", "status", "counts"}`` in one read (status ``validating`` while its requests
        are being queued, ``failed`` if its submitter died meanwhile); ``NotFound`` if
        unknown/expired or another owner's."""
        info = self.store.job(job_id)
        if not self._visible(info["owner"]):
            raise NotFound(f"no job {job_id!r} (unknown or expired)")
        out = {"id": info["id"], "status": info["status"], "counts": info["counts"]}
        if info.get("error"):
            out["error"] = info["error"]
        return out

    def job_results(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Every result of the job, in submission order (as they stand now)."""
        self.job(job_id)  # NotFound for another owner's job
        for ids in self.store.job_ids(job_id):
            records = self._expire_due(self.store.get_many(ids))
            for request_id, record in zip(ids, records, strict=True):
                yield _public(record) if record else {"id": request_id, "status": "expired"}

    def wait_job(self, job_id: str, timeout: float | None = None, poll_s: float = 0.2,
                 on_progress=None) -> dict[str, Any]:
        """Poll ``job`` until every request is final; ``on_progress(job)`` after each poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if on_progress is not None:
                on_progress(info)
            if info["counts"]["queued"] == 0 and info["counts"]["running"] == 0:
                return info
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} not finished: {info['counts']}")
            time.sleep(poll_s)

    def cancel_job(self, job_id: str) -> int:
        """Cancel every unfinished request of the job; how many were still open."""
        self.job(job_id)  # NotFound for another owner's job
        return sum(sum(self.store.cancel(ids)) for ids in self.store.job_ids(job_id))


INTERNAL = ("job_id", "expires_at")


def _public(record: dict[str, Any]) -> dict[str, Any]:
    """The contract's result fields (drops internal bookkeeping)."""
    return {k: v for k, v in record.items() if k not in INTERNAL}


__all__ = ["GenerationClient", "InvalidRequest", "NotFound", "QueueFull"]

