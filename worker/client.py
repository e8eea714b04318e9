"""The Python client for web backends and scripts. Imports no model library (no torch).

    from worker.client import GenerationClient
    client = GenerationClient()                      # GENQ_BROKER_URL, or the default
    rid = client.submit("Write a haiku", max_new_tokens=32)
    print(client.wait(rid)["text"])
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import redis
from pydantic import SecretStr

from worker.batchfile import Line, from_openai, is_batch_line
from worker.errors import IdempotencyConflict, InvalidRequest, NotFound, QueueFull
from worker.ops.settings import Settings, get_settings
from worker.queue.app import REQUEST_QUEUES, TASK_NAME, make_app, queue_for
from worker.queue.messages import headers_for
from worker.queue.results import FINAL, ResultStore
from worker.schema import validate_request
from worker.tokencount import CounterCache


class GenerationClient:
    """Submit requests and bulk jobs; read, wait for and cancel their results."""

    def __init__(self, broker_url: str | None = None, *, settings: Settings | None = None):
        settings = settings or get_settings()
        if broker_url:
            update: dict[str, Any] = {"broker_url": SecretStr(broker_url)}
            if settings.result_url is None:
                update["result_url"] = SecretStr(broker_url)
            settings = settings.model_copy(update=update)
        self.settings = settings
        self.app = make_app(settings, batch_publish=True)
        self.store = ResultStore(settings.result_backend_url, settings.result_ttl_s)
        self.broker = redis.Redis.from_url(settings.broker_url.get_secret_value())
        self.counter = CounterCache(self.store.redis)

    # -- submitting -------------------------------------------------------------------

    def submit(self, prompt: str | None = None, messages: list[dict] | None = None, *,
               idempotency_scope: str = "", **params: Any) -> str:
        """Validate and enqueue one request (interactive unless ``priority="bulk"``); its id.

        With an ``idempotency_key`` (scoped by ``idempotency_scope``, e.g. the API key), a
        repeat returns the first request's id and generates nothing; the same key with another
        body raises ``IdempotencyConflict``. Races are settled by one Redis ``SET NX``.
        """
        body = {k: v for k, v in {"prompt": prompt, "messages": messages, **params}.items()
                if v is not None}
        request = self._validated(body)
        self._check_capacity(1)
        request_id = str(uuid.uuid4())
        earlier = self._claim([(request_id, request)], idempotency_scope)[0]
        if earlier is not None:
            return earlier
        try:
            self.store.record_queued([(request_id, request)])
            self._publish([(request_id, request)], job_id=None)
        except BaseException:
            self._release([request], idempotency_scope)
            raise
        return request_id

    @staticmethod
    def _idem_key(request: dict, scope: str) -> str:
        scope_hash = hashlib.sha256(scope.encode()).hexdigest()[:16]
        return f"genq:idem:{scope_hash}:{request['idempotency_key']}"

    def _claim(self, items: list[tuple[str, dict]], scope: str) -> list[str | None]:
        """Claim each request's idempotency key (one ``SET NX`` each, pipelined): per item the
        id of an earlier twin, or None where this id now owns the key (or there is no key)."""
        keyed = [(i, rid, req) for i, (rid, req) in enumerate(items) if req.get("idempotency_key")]
        earlier: list[str | None] = [None] * len(items)
        if not keyed:
            return earlier
        claims = []
        pipe = self.store.redis.pipeline(transaction=False)
        for _, rid, req in keyed:
            body = {k: v for k, v in req.items() if k != "idempotency_key"}
            fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
            claims.append(fingerprint)
            pipe.set(self._idem_key(req, scope), json.dumps({"id": rid, "fp": fingerprint}),
                     nx=True, ex=self.settings.result_ttl_s)
        won = pipe.execute()
        lost = [(k, fp) for k, fp, ok in zip(keyed, claims, won, strict=True) if not ok]
        if lost:
            values = self.store.redis.mget([self._idem_key(req, scope) for (_, _, req), _ in lost])
            for ((i, _, req), fp), raw in zip(lost, values, strict=True):
                twin = json.loads(raw) if raw else None
                if twin is None:  # expired between SET and GET: treat as new
                    continue
                if twin["fp"] != fp:
                    raise IdempotencyConflict(f"idempotency_key {req['idempotency_key']!r} "
                                              "was used with another request")
                earlier[i] = twin["id"]
        return earlier

    def _release(self, requests: list[dict], scope: str) -> None:
        keys = [self._idem_key(r, scope) for r in requests if r.get("idempotency_key")]
        if keys:
            self.store.redis.delete(*keys)

    def submit_many(self, requests: Iterable[dict[str, Any]], *, priority: str = "bulk",
                    idempotency_scope: str = "") -> str:
        """Validate every request, then enqueue them all as one job; the job id.

        Items are request dicts or OpenAI Batch lines (``{"custom_id", "method", "url",
        "body"}``). Nothing is queued if any request is invalid (``InvalidRequest`` lists every
        bad one by its index from 0) or the queue cannot take them all (``QueueFull``).
        Publishing is pipelined. A request whose ``idempotency_key`` was seen before joins the
        job with its earlier id and is not generated again (finished ones count at once).
        """
        checked = self._check_all(requests)
        return self._enqueue_job([checked], len(checked), priority, idempotency_scope)

    def submit_stream(self, source: Callable[[], Iterable[dict[str, Any] | Line]], *,
                      priority: str = "bulk", idempotency_scope: str = "",
                      chunk: int = 1000) -> str:
        """``submit_many`` for inputs too big to hold: ``source()`` is read twice, once to
        validate every request and count its prompt tokens (keeping none), once to enqueue
        them ``chunk`` at a time. ``source()`` yields request dicts (errors name their index)
        or the ``Line``s of a file from ``worker.batchfile.read_lines`` (errors name the line)."""
        total = sum(1 for _ in self._check_all(source(), keep=False))

        def chunks() -> Iterator[list[dict[str, Any]]]:
            bodies = (_body(item)[1] for item in source())
            while part := [self._validated(b, count_tokens=False)
                           for b in itertools.islice(bodies, chunk)]:
                yield part

        return self._enqueue_job(chunks(), total, priority, idempotency_scope)

    def validate(self, body: Any) -> dict[str, Any]:
        """The request as ``submit`` would queue it (schema, limits and prompt length, as the
        workers count it), or ``InvalidRequest`` / ``PromptTooLong``; queues nothing."""
        return self._validated(body)

    def _check_all(self, items: Iterable[Any], keep: bool = True) -> list[dict[str, Any]]:
        """Validate every item in one pass; ``InvalidRequest`` lists all the bad ones."""
        checked: list[dict[str, Any]] = []
        errors: list[str] = []
        for index, item in enumerate(items):
            where, body, error = _body(item, index)
            if error is None:
                try:
                    data = self._validated(body)
                except InvalidRequest as exc:
                    error = exc.message
                else:
                    checked.append(data if keep else {})
            if error is not None:
                errors.append(f"{where}: {error}")
        if errors:
            more = f" (+{len(errors) - 20} more)" if len(errors) > 20 else ""
            raise InvalidRequest(f"{len(errors)} bad request(s): " + "; ".join(errors[:20]) + more)
        return checked

    def _enqueue_job(self, chunks: Iterable[list[dict[str, Any]]], total: int, priority: str,
                     idempotency_scope: str) -> str:
        if not total:
            raise InvalidRequest("submit_many needs at least one request")
        self._check_capacity(total)
        job_id = f"job-{uuid.uuid4()}"
        pipe = self.store.redis.pipeline(transaction=False)
        self.store.create_job(job_id, total, pipe)
        for requests in chunks:
            checked = [(str(uuid.uuid4()), {**r, "priority": r.get("priority", priority)})
                       for r in requests]
            earlier = self._claim(checked, idempotency_scope)
            self.store.add_job_ids(job_id, [twin or rid for (rid, _), twin
                                            in zip(checked, earlier, strict=True)], pipe)
            fresh = [item for item, twin in zip(checked, earlier, strict=True) if twin is None]
            self.store.record_queued(fresh, job_id=job_id, pipe=pipe)
            pipe.execute()
            # requests submitted before with the same key join this job instead of running again
            self.store.link([twin for twin in earlier if twin is not None], job_id)
            if fresh:
                self._publish(fresh, job_id=job_id)
        return job_id

    def _validated(self, body: Any, count_tokens: bool = True) -> dict[str, Any]:
        """Validate the schema, then count prompt tokens exactly as the workers will (when a
        worker has published its tokenizer) and raise ``PromptTooLong`` before queueing."""
        if is_batch_line(body):
            body = from_openai(body)
        request = validate_request(body, max_new_tokens_limit=self.settings.max_new_tokens_limit)
        data = request.model_dump(exclude_none=True, exclude_defaults=False)
        counter = self.counter.get() if count_tokens else None
        if counter is not None:
            try:
                counter.check(data)
            except ValueError as exc:
                if isinstance(exc, InvalidRequest):
                    raise
                # a template error: the worker reports it for this request alone
        return data

    def _check_capacity(self, n: int) -> None:
        pipe = self.broker.pipeline(transaction=False)
        for q in REQUEST_QUEUES:
            pipe.llen(q)
        pending = sum(pipe.execute())
        if pending + n > self.settings.max_pending:
            raise QueueFull(f"{pending} requests pending; adding {n} would pass "
                            f"GENQ_MAX_PENDING={self.settings.max_pending}")

    def _publish(self, items: list[tuple[str, dict[str, Any]]], job_id: str | None) -> None:
        now = time.time()
        with self.app.producer_or_acquire() as producer, producer.batch(max_size=1000):
            for request_id, request in items:
                queue = queue_for(request.get("priority"))
                self.app.send_task(
                    TASK_NAME, args=[request], task_id=request_id, producer=producer,
                    queue=queue, retry=False,
                    headers=headers_for(job_id, now, request.get("expires_in_s")),
                    # the worker stores results itself; no prompt text in events or Flower
                    ignore_result=True, argsrepr=f"<request {request_id}>", kwargsrepr="{}",
                )

    # -- reading ----------------------------------------------------------------------

    def get(self, request_id: str) -> dict[str, Any]:
        """The result as it stands now (never blocks); ``NotFound`` if unknown/expired."""
        return _public(self.store.get(request_id))

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
        self.store.get(request_id)  # NotFound for unknown ids
        return self.store.cancel([request_id])[0]

    def job(self, job_id: str) -> dict[str, Any]:
        """``{"id", "status", "counts"}`` in one read; ``NotFound`` if unknown/expired."""
        info = self.store.job(job_id)
        return {"id": info["id"], "status": info["status"], "counts": info["counts"]}

    def job_results(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Every result of the job, in submission order (as they stand now)."""
        for ids in self.store.job_ids(job_id):
            for request_id, record in zip(ids, self.store.get_many(ids), strict=True):
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
        return sum(sum(self.store.cancel(ids)) for ids in self.store.job_ids(job_id))


def _public(record: dict[str, Any]) -> dict[str, Any]:
    """The contract's result fields (drops internal bookkeeping)."""
    return {k: v for k, v in record.items() if k != "job_id"}


__all__ = ["GenerationClient", "InvalidRequest", "NotFound", "QueueFull"]


def _body(item: Any, index: int = 0) -> tuple[str, Any, str | None]:
    """(where, request body, parse error) of a request dict or a file ``Line``."""
    if isinstance(item, Line):
        return f"line {item.number}", item.request, item.error
    return f"request {index}", item, None
