"""The batching consumer: one thread that fills a pool of pending requests from Redis
(``delivery.Inbox``: popped and recorded as unacked atomically), runs the next batch on the
engine, stores every result, then acks.

Why not celery-batches: it flushes in arrival order on a timer that cuts batches short, cannot
choose among pending requests by length or priority, and needs workarounds for revoke, acks
and reconnects (see README). This loop runs inside a real Celery worker (a bootstep, see
``worker.queue.worker``), so ``celery inspect``, heartbeats and remote control still work.

Messages stay unacked until their result is stored. While held, their Redis visibility lease
is renewed, so a short visibility timeout brings back a dead worker's requests quickly even
though a batch may run for longer than that timeout.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import redis
import structlog
from celery.worker import state as celery_state
from kombu import Connection
from kombu.exceptions import OperationalError

from worker.errors import GenqError
from worker.ops.settings import Settings
from worker.queue.app import REQUEST_QUEUES, kombu_queue, transport_options
from worker.queue.batcher import Pending, Pool
from worker.queue.delivery import Delivery, Inbox, Undecodable
from worker.queue.messages import Envelope, MalformedMessage, parse
from worker.queue.results import ResultStore, empty_result

log = structlog.get_logger(__name__)
IDLE_POLL_MAX_S = 0.005  # an idle worker asks Redis about 200 times a second (one Lua call)


class BatchingConsumer:
    """Pulls requests from the genqueue queues and runs them on ``engine`` in batches."""

    def __init__(self, engine, settings: Settings, name: str, metrics=None,
                 self_check: dict | None = None):
        self.engine = engine
        self.settings = settings
        self.name = name
        self.metrics = metrics
        self.self_check = self_check
        self.store = ResultStore(settings.result_backend_url, settings.result_ttl_s)
        self.pool = Pool()
        self.pool_size = settings.pool_size or 8 * settings.max_batch_size
        self.wait_s = settings.batch_wait_ms / 1000
        self.running: list[Pending] = []
        self.batches = 0
        self._stop = threading.Event()
        self.broker = redis.Redis.from_url(settings.broker_url.get_secret_value(),
                                           health_check_interval=10)
        self.inbox = Inbox(self.broker, REQUEST_QUEUES, transport_options(settings))

    # -- lifecycle --------------------------------------------------------------------

    def stop(self) -> None:
        """Finish the batch in progress, hand back the rest, then return from ``run``."""
        self._stop.set()

    def check_broker(self) -> None:
        """Warn unless Redis evicts nothing (``noeviction``): eviction would drop requests."""
        try:
            found = self.broker.config_get("maxmemory-policy")
            policy = next(iter(found.values()), b"")
            policy = policy.decode() if isinstance(policy, bytes) else policy
        except redis.RedisError as exc:  # managed Redis may forbid CONFIG
            log.warning("broker_policy_unknown", worker=self.name, error=str(exc))
            return
        if policy != "noeviction":
            log.warning("broker_may_evict", worker=self.name, maxmemory_policy=policy,
                        advice="set maxmemory-policy noeviction: evicted keys are lost requests")

    def run(self) -> None:
        """Consume until stopped, reconnecting after broker failures."""
        self.check_broker()
        keeper = threading.Thread(target=self._keep_alive, name="genq-lease", daemon=True)
        keeper.start()
        backoff = 0.5
        while not self._stop.is_set():
            try:
                self._declare_queues()
                self._consume()
                backoff = 0.5
            except (redis.RedisError, OperationalError, OSError) as exc:
                # broker gone: the messages we held come back by themselves
                dropped = len(self.pool.drain())
                log.warning("broker_connection_lost", worker=self.name, error=repr(exc),
                            dropped_unacked=dropped, retry_in_s=backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        log.info("consumer_stopped", worker=self.name, batches=self.batches)

    def _declare_queues(self) -> None:
        """Declare the request queues as Celery does (kombu restores through their bindings)."""
        with Connection(self.settings.broker_url.get_secret_value(),
                        transport_options=transport_options(self.settings)) as conn:
            for name in REQUEST_QUEUES:
                kombu_queue(name)(conn.default_channel).declare()

    def _consume(self) -> None:
        log.info("consumer_ready", worker=self.name, queues=list(REQUEST_QUEUES),
                 pool_size=self.pool_size, batch_wait_ms=self.settings.batch_wait_ms)
        while not self._stop.is_set():
            self._fill()
            if len(self.pool):
                self._run_batch(self.pool.take_batch(
                    self.settings.max_batch_size, self.settings.max_batch_tokens,
                    max_wait_s=self.settings.max_wait_ms_for_bucket / 1000))
        # warm shutdown: unstarted requests go back to the head of their queues
        self.inbox.requeue([p.envelope.delivery for p in self.pool.drain()])

    # -- receiving --------------------------------------------------------------------

    def _fill(self) -> None:
        """Receive until the pool is full or the oldest request has waited ``batch_wait_ms``;
        while nothing arrives, poll every 1-5 ms (never past that deadline)."""
        idle = 0.001
        while not self._stop.is_set():
            got = self._receive(self.pool_size - len(self.pool))
            oldest = self.pool.oldest_arrival()
            if len(self.pool) >= self.pool_size:
                return
            if oldest is not None and time.monotonic() - oldest >= self.wait_s:
                return
            if got:
                idle = 0.001
                continue
            pause = idle if oldest is None else min(idle, oldest + self.wait_s - time.monotonic())
            self._stop.wait(max(pause, 0))
            idle = min(idle * 2, IDLE_POLL_MAX_S)

    def _receive(self, room: int) -> int:
        """Take up to ``room`` messages; the valid ones join the pool. How many were taken."""
        deliveries = self.inbox.fetch(room)
        for delivery in deliveries:
            self._on_delivery(delivery)
        return len(deliveries)

    def _on_delivery(self, delivery: Delivery) -> None:
        try:
            body, headers = delivery.decode()
            envelope = parse(body, headers, delivery)
        except Undecodable as exc:  # never executed; a poison message must not come back
            log.error("message_rejected", worker=self.name, reason=str(exc), queue=delivery.queue)
            self.inbox.ack([delivery])
            return
        except MalformedMessage as exc:
            log.error("message_rejected", worker=self.name, reason=str(exc),
                      request_id=exc.request_id)
            if exc.request_id:
                self._store_failure(exc.request_id, {}, None,
                                    {"code": "invalid_request", "message": str(exc)})
            self.inbox.ack([delivery])
            return
        try:
            tokens = self.engine.prepare(envelope.request)
        except GenqError as exc:
            self._store_failure(envelope.id, envelope.request, envelope.job_id, exc.as_error())
            self.inbox.ack([delivery])
            return
        self.pool.add(Pending(envelope, tokens))

    # -- running ----------------------------------------------------------------------

    def _run_batch(self, batch: list[Pending]) -> None:
        now = time.time()
        ids = [p.envelope.id for p in batch]
        cancelled = self._is_cancelled(ids)
        runnable: list[Pending] = []
        closing: list[dict[str, Any]] = []
        for pending, flag in zip(batch, cancelled, strict=True):
            env = pending.envelope
            if flag:
                closing.append(self._closed(env, "cancelled"))
            elif env.expires_at is not None and now > env.expires_at:
                closing.append(self._closed(env, "expired"))
            else:
                runnable.append(pending)
        if closing:
            self.store.finish(closing)
        fresh = self.store.start([self._running_record(p.envelope) for p in runnable])
        duplicates = [p for p, ok in zip(runnable, fresh, strict=True) if not ok]
        runnable = [p for p, ok in zip(runnable, fresh, strict=True) if ok]

        results: list[dict[str, Any]] = []
        if runnable:
            self.running = runnable
            if self.metrics is not None:
                self.metrics.busy.set(1)
            splits_before = self.engine.oom_splits
            started = time.time()
            results = self.engine.generate(
                [{**p.envelope.request, "id": p.envelope.id} for p in runnable],
                is_cancelled=self._is_cancelled,
            )
            finished = time.time()
            for pending, result in zip(runnable, results, strict=True):
                env = pending.envelope
                gen_ms = (result.get("timings") or {}).get("generate_ms")
                result.update(
                    worker=self.name,
                    job_id=env.job_id,
                    timings={"queued_ms": round((started - env.submitted_at) * 1000, 1),
                             "generate_ms": gen_ms,
                             "total_ms": round((finished - env.submitted_at) * 1000, 1)},
                )
            self._finish_with_retry(results)
            self.batches += 1
            self._log_batch(runnable, results, finished - started)
        self.inbox.ack([p.envelope.delivery for p in batch])
        self.running = []
        if self.metrics is not None:
            self.metrics.busy.set(0)
            if runnable:
                self.metrics.oom_splits.inc(self.engine.oom_splits - splits_before)
            self.metrics.observe_batch(runnable, results, closing, duplicates)

    def _finish_with_retry(self, results: list[dict[str, Any]]) -> None:
        """Store results; if Redis is down, keep trying (the work is done, keep it)."""
        delay = 0.2
        while True:
            try:
                self.store.finish(results)
                return
            except redis.ConnectionError as exc:
                log.warning("result_store_unavailable", worker=self.name, error=str(exc))
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _is_cancelled(self, ids: list[str]) -> list[bool]:
        flags = self.store.cancelled(ids)
        return [f or i in celery_state.revoked for f, i in zip(flags, ids, strict=True)]

    def _running_record(self, env: Envelope) -> dict[str, Any]:
        return {**empty_result(env.id, "running", env.request, env.job_id), "worker": self.name,
                "model": self.engine.model_name}

    def _closed(self, env: Envelope, status: str) -> dict[str, Any]:
        return {**empty_result(env.id, status, env.request, env.job_id), "worker": self.name,
                "finish_reason": "cancelled" if status == "cancelled" else None, "text": ""}

    def _store_failure(self, request_id, request, job_id, error) -> None:
        record = {**empty_result(request_id, "failed", request, job_id), "worker": self.name,
                  "model": self.engine.model_name, "error": error}
        self._finish_with_retry([record])
        log.info("request_failed", worker=self.name, request_id=request_id, job_id=job_id,
                 code=error["code"])
        if self.metrics is not None:
            self.metrics.observe_batch([], [], [record], [])

    def _log_batch(self, runnable: list[Pending], results, seconds: float) -> None:
        batch = next((r["batch"] for r in results if r.get("batch")), None) or {}
        log.info("batch_done", worker=self.name, batch_id=f"{self.name}:{self.batches}",
                 batch_size=len(runnable), pad_fraction=batch.get("pad_fraction"),
                 seconds=round(seconds, 3), request_ids=[p.envelope.id for p in runnable],
                 job_ids=sorted({p.envelope.job_id for p in runnable if p.envelope.job_id}),
                 statuses={s: sum(r["status"] == s for r in results)
                           for s in {r["status"] for r in results}})

    # -- leases and heartbeat ---------------------------------------------------------

    def _keep_alive(self) -> None:
        """Renew the visibility lease of held messages; publish this worker's heartbeat."""
        every = max(1.0, min(5.0, self.settings.visibility_timeout_s / 4))
        while True:
            held = [p.envelope.delivery for p in [*self.pool.items, *self.running]]
            try:
                self.inbox.renew(held)
                self.store.heartbeat(self.name, {
                    "name": self.name, "pid": os.getpid(), "model": self.engine.model_name,
                    "backend": self.engine.backend, "batches": self.batches,
                    "busy": bool(self.running), "held": len(held),
                    "self_check": self.self_check})
            except redis.RedisError as exc:
                log.warning("keep_alive_failed", worker=self.name, error=str(exc))
            if self._stop.wait(every):
                return
