"""The Python client for web backends and scripts. Imports no model library (no torch).

    from worker.client import GenerationClient
    client = GenerationClient()                      # GENQ_BROKER_URL, or the default
    rid = client.submit("Write a haiku", max_new_tokens=32)
    print(client.wait(rid)["text"])
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pydantic import SecretStr

from worker.batchfile import Line, from_openai, is_batch_line
from worker.errors import IdempotencyConflict, InvalidRequest, JobReaped, NotFound, QueueFull
from worker.lifecycle import FINAL
from worker.ops.redisconn import connect
from worker.ops.settings import Settings, get_settings
from worker.overview import index_job
from worker.queue.app import (
    BULK_BELL,
    OWNER_LISTS_KEY,
    TASK_NAME,
    make_app,
    pending_by_queue,
    pins_key,
    queue_for,
)
from worker.queue.messages import headers_for
from worker.queue.results import ResultStore
from worker.schema import GenerationRequest, validate_request
from worker.tokencount import CounterCache

PUBLISH_BATCH = 250  # messages per pipelined publish: bounds memory (a message holds its prompt)


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
        data = self._validated(body)
        self._check_capacity(1)
        self._reserve(1)
        request_id = str(uuid.uuid4())
        try:
            earlier = self._claim([(request_id, data)])[0]
            if earlier is not None:
                self._unreserve(1)
                return earlier
            try:
                self.store.record_queued([(request_id, data)], owner=self.owner)
                self._publish([(request_id, data)], job_id=None)
            except BaseException:
                self._release([data])
                raise
        except BaseException:
            self._unreserve(1)
            raise
        return request_id

    def _idem_key(self, request: dict) -> str:
        scope_hash = hashlib.sha256((self.owner or "").encode()).hexdigest()[:16]
        return f"genq:idem:{scope_hash}:{request['idempotency_key']}"

    def _claim(self, items: list[tuple[str, dict]]) -> list[str | None]:
        """Claim each request's idempotency key (one ``SET NX`` each, pipelined): per item the
        id of an earlier twin, or None where this id now owns the key (or there is no key)."""
        keyed = [(i, rid, req) for i, (rid, req) in enumerate(items) if req.get("idempotency_key")]
        earlier: list[str | None] = [None] * len(items)
        if not keyed:
            return earlier
        claims = []
        pipe = self.store.redis.pipeline(transaction=False)
        for _, rid, req in keyed:
            fingerprint = _fingerprint(req)
            claims.append(fingerprint)
            pipe.set(self._idem_key(req), json.dumps({"id": rid, "fp": fingerprint}),
                     nx=True, ex=self.settings.result_ttl_s)
        won = pipe.execute()
        lost = [(k, fp) for k, fp, ok in zip(keyed, claims, won, strict=True) if not ok]
        if lost:
            values = self.store.redis.mget([self._idem_key(req) for (_, _, req), _ in lost])
            for ((i, _, req), fp), raw in zip(lost, values, strict=True):
                twin = json.loads(raw) if raw else None
                if twin is None:  # expired between SET and GET: treat as new
                    continue
                if twin["fp"] != fp:
                    raise IdempotencyConflict(f"idempotency_key {req['idempotency_key']!r} "
                                              "was used with another request")
                earlier[i] = twin["id"]
        return earlier

    def _release(self, requests: list[dict]) -> None:
        keys = [self._idem_key(r) for r in requests if r.get("idempotency_key")]
        if keys:
            self.store.redis.delete(*keys)

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
        checked = self._check_all(requests)
        return self._enqueue_job([checked], len(checked), priority, self._hook(webhook_url))

    def submit_stream(self, source: Callable[[], Iterable[dict[str, Any] | Line]], *,
                      priority: str = "bulk", chunk: int = 1000,
                      webhook_url: str | None = None) -> str:
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

        return self._enqueue_job(chunks(), total, priority, self._hook(webhook_url))

    def validate(self, body: Any) -> dict[str, Any]:
        """The request as ``submit`` would queue it (schema, limits and prompt length, as the
        workers count it), or ``InvalidRequest`` / ``PromptTooLong``; queues nothing."""
        return self._validated(body)

    def _check_all(self, items: Iterable[Any], keep: bool = True) -> list[dict[str, Any]]:
        """Validate every item in one pass; ``InvalidRequest`` lists all the bad ones (two
        sharing an ``idempotency_key`` included), ``IdempotencyConflict`` every key used before
        with another body. Nothing is queued either way."""
        checked: list[dict[str, Any]] = []
        errors: list[str] = []
        seen: dict[str, str] = {}  # idempotency key -> where it first appeared
        keyed: list[tuple[str, dict[str, Any]]] = []  # (where, request) to check for conflicts
        conflicts: list[str] = []
        for index, item in enumerate(items):
            where, body, error = _body(item, index)
            if error is None:
                try:
                    data = self._validated(body)
                except InvalidRequest as exc:
                    error = exc.message
                else:
                    key = data.get("idempotency_key")
                    if key is not None and key in seen:
                        error = f"idempotency_key {key!r} is also on {seen[key]}"
                    else:
                        if key is not None:
                            seen[key] = where
                            keyed.append((where, data))
                        checked.append(data if keep else {})
            if error is not None:
                errors.append(f"{where}: {error}")
            if len(keyed) >= 1000:
                conflicts += self._conflicts(keyed)
                keyed = []
        conflicts += self._conflicts(keyed)
        if errors:
            raise InvalidRequest(_listed(errors, "bad request(s)"))
        if conflicts:
            raise IdempotencyConflict(_listed(conflicts, "idempotency conflict(s)"))
        return checked

    def _conflicts(self, keyed: list[tuple[str, dict[str, Any]]]) -> list[str]:
        """Where a request's ``idempotency_key`` was used before with another body."""
        if not keyed:
            return []
        values = self.store.redis.mget([self._idem_key(req) for _, req in keyed])
        return [f"{where}: idempotency_key {req['idempotency_key']!r} was used with another "
                "request" for (where, req), raw in zip(keyed, values, strict=True)
                if raw and json.loads(raw)["fp"] != _fingerprint(req)]

    def _enqueue_job(self, chunks: Iterable[list[dict[str, Any]]], total: int,
                     priority: str, webhook_url: str | None = None) -> str:
        if not total:
            raise InvalidRequest("submit_many needs at least one request")
        self._check_capacity(total)
        self._reserve(total)
        job_id = f"job-{uuid.uuid4()}"
        # each chunk is one MULTI/EXEC: a submitter killed in the middle of sending one leaves
        # none of it (never ids without records, which nobody could end)
        pipe = self.store.redis.pipeline(transaction=True)
        self.store.create_job(job_id, total, pipe, owner=self.owner, webhook_url=webhook_url)
        index_job(pipe, job_id, self.owner, time.time(), self.settings.result_ttl_s)  # genq jobs
        for requests in chunks:
            checked = [(str(uuid.uuid4()), {**r, "priority": r.get("priority", priority)})
                       for r in requests]
            earlier = self._claim(checked)
            self.store.add_job_ids(job_id, [twin or rid for (rid, _), twin
                                            in zip(checked, earlier, strict=True)], pipe)
            fresh = [item for item, twin in zip(checked, earlier, strict=True) if twin is None]
            self.store.record_queued(fresh, job_id=job_id, pipe=pipe, owner=self.owner)
            self.store.touch_job(job_id, pipe)
            if pipe.execute()[-1] is None:  # reaped meanwhile: this submitter was too slow
                self.store.cancel([rid for rid, _ in fresh])
                self._unreserve(len(checked) - len(fresh))
                raise JobReaped(f"job {job_id} failed: its submitter queued nothing for "
                                f"GENQ_JOB_SUBMIT_TIMEOUT_S={self.settings.job_submit_timeout_s}",
                                job_id)
            # requests submitted before with the same key join this job instead of running again
            self.store.link([twin for twin in earlier if twin is not None], job_id)
            self._unreserve(len(checked) - len(fresh))
            if fresh:
                self._publish(fresh, job_id=job_id)
        self.store.job_submitted(job_id)
        return job_id

    def _validated(self, body: Any, count_tokens: bool = True) -> dict[str, Any]:
        """Validate the schema, then count prompt tokens exactly as the workers will (when a
        worker has published its tokenizer) and raise ``PromptTooLong`` before queueing."""
        if is_batch_line(body):
            body = from_openai(body)
        fleet = self._fleet_info()
        limits = [int(w["max_new_tokens_limit"]) for w in fleet
                  if isinstance(w.get("max_new_tokens_limit"), int)]
        request = validate_request(
            body, max_new_tokens_limit=min(limits) if limits else self.settings.max_new_tokens_limit,
            max_prompt_chars=self.settings.max_prompt_chars)
        if request.raw_special_tokens and not self.raw_tokens:
            raise InvalidRequest("raw_special_tokens: this API key may not send raw special tokens")
        # a request may wait for a worker to start, never for an adapter no one said would run
        served = ({a for w in fleet for a in w.get("adapters") or ()} if fleet
                  else set(self.settings.adapters))
        if request.adapter is not None and request.adapter not in served:
            raise InvalidRequest(f"adapter: no worker serves adapter {request.adapter!r}")
        if request.webhook_url:
            self._hook(request.webhook_url)
        data = request.model_dump(exclude_none=True, by_alias=True)
        counter = self.counter.get() if count_tokens else None
        if counter is not None:
            try:
                counter.check(data)
            except ValueError as exc:
                if isinstance(exc, InvalidRequest):
                    raise
                # a template error: the worker reports it for this request alone
        return data

    def _hook(self, url: str | None) -> str | None:
        """A webhook URL as given, or ``InvalidRequest`` when it is not http(s) or names a
        non-public address literally (names are resolved and checked at delivery)."""
        if url is not None:
            from worker.queue.webhooks import UnsafeURL, check_url

            try:
                check_url(url, self.settings.webhook_allow_private, resolve=False)
            except UnsafeURL as exc:
                raise InvalidRequest(f"webhook_url: {exc}") from None
        return url

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
        """Publish; an owner's bulk list is registered and pinned first (no fetch script drops
        it meanwhile: ``pins_key``), unpinned after, and the bulk bell rung."""
        now = time.time()
        queues = [queue_for(request.get("priority"), self.owner) for _, request in items]
        pins = {q: pins_key(q) for q in set(queues) if pins_key(q)}
        pin = f"publish:{uuid.uuid4()}"
        if pins:
            pipe = self.broker.pipeline(transaction=False)
            for key in pins.values():
                pipe.sadd(key, pin)
            pipe.hset(OWNER_LISTS_KEY, mapping=dict.fromkeys(pins, self.weight))
            pipe.execute()
        with self.app.producer_or_acquire() as producer, producer.batch(max_size=PUBLISH_BATCH):
            for (request_id, request), queue in zip(items, queues, strict=True):
                self.app.send_task(
                    TASK_NAME, args=[request], task_id=request_id, producer=producer,
                    queue=queue, retry=False,
                    headers=headers_for(job_id, now, request.get("expires_in_s"), self.owner,
                                        self.weight, request.get("adapter")),
                    # the worker stores results itself; no prompt text in events or Flower
                    ignore_result=True, argsrepr=f"<request {request_id}>", kwargsrepr="{}",
                )
        if pins:
            pipe = self.broker.pipeline(transaction=False)
            for key in pins.values():
                pipe.srem(key, pin)
            pipe.rpush(BULK_BELL, 1)
            pipe.expire(BULK_BELL, 60)
            pipe.execute()

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
        due = [r for r in records if r and r["status"] == "queued"
               and r.get("expires_at") is not None and r["expires_at"] <= now]
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


def _fingerprint(request: dict[str, Any]) -> str:
    """What makes two requests with one ``idempotency_key`` the same request (its priority
    only says how soon it runs)."""
    body = {k: v for k, v in request.items() if k not in ("idempotency_key", "priority")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _listed(errors: list[str], what: str) -> str:
    more = f" (+{len(errors) - 20} more)" if len(errors) > 20 else ""
    return f"{len(errors)} {what}: " + "; ".join(errors[:20]) + more


__all__ = ["GenerationClient", "InvalidRequest", "NotFound", "QueueFull"]


def _body(item: Any, index: int = 0) -> tuple[str, Any, str | None]:
    """(where, request body, parse error) of a request dict or a file ``Line``."""
    if isinstance(item, Line):
        return f"line {item.number}", item.request, item.error
    return f"request {index}", item, None
