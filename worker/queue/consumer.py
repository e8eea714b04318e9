"""The worker's step loop: requests from Redis join the engine's scheduler between decode
steps, and each row's result is stored and its message acked at the step it finishes.

One thread runs this loop (torch); the ``Link`` thread does every Redis call, so the loop
never blocks on the broker. Per turn: take what arrived, apply cancels and deadlines, let the
scheduler serve one lane (admit joiners, one decode step), hand finished results and progress
snapshots to the link. A request's running record, which counts its attempt, is written before
its first forward pass (``Link.started``), marked *alone* when no other request's rows run
beside it, so a request that kills workers ends ``worker_lost`` after ``GENQ_MAX_ATTEMPTS``
deaths while it ran alone instead of killing the next worker (RELIABILITY.md).

Why not celery-batches: it flushes in arrival order on a timer that cuts batches short, cannot
choose among pending requests by length or priority, and needs workarounds for revoke, acks
and reconnects (see README). This loop runs inside a real Celery worker (a bootstep, see
``worker.queue.worker``), so ``celery inspect``, heartbeats and remote control still work.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis
import structlog
from kombu import Connection

from worker.engine.sequence import Sequence
from worker.errors import GenqError, InvalidRequest
from worker.ops.redisconn import celery_options
from worker.ops.settings import Settings
from worker.queue.app import REQUEST_QUEUES, kombu_queue, transport_options
from worker.queue.link import Link
from worker.queue.link_admit import Arrival
from worker.queue.results import ResultStore
from worker.schema import result_record

log = structlog.get_logger(__name__)
SNAPSHOT_TOKENS = 16  # a running result's text is refreshed at least every 16 tokens...
SNAPSHOT_S = 0.5  # ...or every half second


def device_label(engine) -> str:
    """What the worker runs on, for the status page: ``cpu`` or ``cuda:<GPU index> (<name>)``."""
    import os

    device = getattr(engine, "device", None)
    kind = getattr(device, "type", None) or str(device or "cpu")
    if kind != "cuda":
        return kind
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0] or "0"
    try:
        import torch

        return f"cuda:{gpu} ({torch.cuda.get_device_name(0)})"
    except Exception:  # noqa: BLE001 - a label only
        return f"cuda:{gpu}"


class Consumer:
    """Pulls requests from the genqueue queues and runs them on ``engine`` step by step."""

    def __init__(self, engine, settings: Settings, name: str, metrics=None,
                 self_check: dict | None = None):
        self.engine = engine
        self.settings = settings
        self.name = name
        self.metrics = metrics
        self.store = ResultStore(settings.result_backend_url, settings.result_ttl_s, settings)
        self.loop = engine.scheduler(settings.scheduler)
        self.loop.before_admit = self._before_admit
        self.mode = "static" if self.loop.limits.static else "continuous"
        self.link = Link(settings, name, self.store, metrics=metrics, info={
            "model": engine.model_name, "backend": engine.backend, "scheduler": self.mode,
            "device": device_label(engine),
            "self_check": self_check, "adapters": sorted(engine.adapters),
            "max_new_tokens_limit": engine.max_new_tokens_limit})
        self.max_rows = engine.max_batch_size
        self.pool_size = settings.pool_size or self.max_rows
        self.wait_s = settings.batch_wait_ms / 1000
        self.arrivals: dict[str, Arrival] = {}  # held requests: waiting or running
        self.received: dict[str, float] = {}
        self.announced: set[str] = set()  # running record written (attempt counted)
        self.alone: str | None = None  # started with no other request's rows, none joined since
        self.snapshots: dict[str, tuple[int, float]] = {}
        self._stop = threading.Event()

    # -- lifecycle --------------------------------------------------------------------

    def stop(self) -> None:
        """Finish the rows running, hand back the requests waiting, then return from ``run``."""
        self._stop.set()

    def check_broker(self) -> None:
        """Warn unless Redis evicts nothing (``noeviction``): eviction would drop requests."""
        try:
            found = self.link.broker.config_get("maxmemory-policy")
            policy = next(iter(found.values()), b"")
            policy = policy.decode() if isinstance(policy, bytes) else policy
        except redis.RedisError as exc:  # managed Redis may forbid CONFIG
            log.warning("broker_policy_unknown", worker=self.name, error=str(exc))
            return
        if policy != "noeviction":
            log.warning("broker_may_evict", worker=self.name, maxmemory_policy=policy,
                        advice="set maxmemory-policy noeviction: evicted keys are lost requests")

    def run(self) -> None:
        """Consume until stopped."""
        self._declare_queues()
        self.check_broker()
        self.link.start_threads()
        log.info("consumer_ready", worker=self.name, queues=list(REQUEST_QUEUES),
                 scheduler=self.mode, max_batch_size=self.max_rows,
                 pool_size=self.pool_size)
        try:
            while not self._stop.is_set():
                self._turn()
            self._drain()
        finally:
            self.link.close()
        log.info("consumer_stopped", worker=self.name, steps=self.loop.steps)

    def _declare_queues(self) -> None:
        """Declare the request queues as Celery does (kombu restores through their bindings),
        waiting for Redis if it is not up yet."""
        delay = 0.5
        while not self._stop.is_set():
            try:
                with Connection(self.settings.broker_url.get_secret_value(),
                                transport_options=transport_options(self.settings),
                                ssl=celery_options(self.settings).get("broker_use_ssl")) as conn:
                    for name in REQUEST_QUEUES:
                        kombu_queue(name)(conn.default_channel).declare()
                return
            except Exception as exc:  # noqa: BLE001 - kombu wraps redis errors in its own
                log.warning("broker_unavailable", worker=self.name, error=repr(exc)[:200])
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)

    # -- one turn ---------------------------------------------------------------------

    def _turn(self) -> None:
        self._ask_for_more()
        for arrival in self.link.take_arrivals(timeout=0.5 if self.loop.idle else 0.0):
            self._arrive(arrival)
        ended = self.loop.expire()
        cancelled = self.link.take_cancelled()
        if cancelled:
            ended += self.loop.stop(cancelled)
        self._finish(ended)
        if self._gathering():
            self.link.step_ended(busy=False)
            return
        steps, tokens = self.loop.steps, self.loop.useful_row_steps
        self.link.step_started()
        finished = self.loop.step()
        self._finish(finished)
        self._snapshot()
        self.link.step_ended(busy=bool(self.loop.running), steps=self.loop.steps - steps,
                             tokens=self.loop.useful_row_steps - tokens)
        if self.loop.steps == steps and not finished and self.loop.waiting:
            # nothing could move (say, waiting for KV room that only a cancel frees): no spin
            for arrival in self.link.take_arrivals(timeout=0.05):
                self._arrive(arrival)
        if self.metrics is not None:
            self.metrics.observe_step(self.loop)

    def _ask_for_more(self) -> None:
        """Tell the link how many more requests of each priority this worker can hold."""
        waiting = {"interactive": 0, "bulk": 0}
        for seq in self.loop.waiting.values():
            waiting[seq.priority] += 1
        if self._stop.is_set():
            self.link.want(0, 0)
        else:
            self.link.want(self.max_rows - waiting["interactive"],
                           self.pool_size - waiting["bulk"])

    def _gathering(self) -> bool:
        """Nothing runs and only bulk requests wait, fewer than a batch, the oldest for less
        than ``GENQ_BATCH_WAIT_MS``: wait briefly for batch-mates (interactive never waits)."""
        if self.loop.running or not self.loop.waiting:
            return False
        waiting = list(self.loop.waiting.values())
        if any(s.priority == "interactive" for s in waiting):
            return False
        if len(waiting) >= self.max_rows:
            return False
        left = min(self.received.get(s.id, 0.0) for s in waiting) + self.wait_s - time.monotonic()
        if left <= 0:
            return False
        for arrival in self.link.take_arrivals(timeout=min(left, 0.05)):
            self._arrive(arrival)
        return True

    # -- requests in ------------------------------------------------------------------

    def _arrive(self, arrival: Arrival) -> None:
        env = arrival.envelope
        if env.id in self.arrivals:  # the same request again (restored while we held it)
            return
        try:
            seq = self.engine.sequence(env.request, env.id, submitted_at=env.submitted_at,
                                       expires_at=env.expires_at, suspect=arrival.suspect)
        except Exception as exc:  # noqa: BLE001 - whatever a request does, it fails alone
            error = exc if isinstance(exc, GenqError) else InvalidRequest(
                f"the request cannot be prepared: {type(exc).__name__}: {str(exc)[:200]}")
            result = {**self.engine.failed(env.id, env.request, error), "job_id": env.job_id,
                      "worker": self.name}
            self.arrivals[env.id] = arrival
            self._store([result])
            return
        seq.owner, seq.job, seq.weight = env.owner, env.job_id, env.weight
        seq.deaths_alone = arrival.deaths_alone
        if arrival.deaths_alone:  # the rest of what its dead worker held comes back by then
            seq.not_before = time.monotonic() + self.settings.visibility_timeout_s
        self.arrivals[env.id] = arrival
        self.received[env.id] = time.monotonic()
        self.loop.add(seq)

    def _before_admit(self, joiners: list[Sequence]) -> list[Sequence]:
        """Write the running records (counting attempts) before the first forward pass;
        drop duplicates of requests that are already final.

        A request that starts with no other request's rows running (a suspect always does)
        is charged for a worker death until another request's rows join it: the start is
        marked alone, and unmarked before the joiners' first forward pass."""
        batch = {s.id for s in self.loop.running} | {s.id for s in joiners}
        shared = [self.alone] if self.alone is not None and batch != {self.alone} else []
        fresh = list({s.id: s for s in joiners if s.id not in self.announced}.values())
        if not fresh and not shared:
            return joiners
        alone = {s.id for s in fresh} if len(batch) == 1 else set()
        attempts = self.link.started([self._running_record(s) for s in fresh], alone=alone,
                                     shared=shared)
        self.announced.update(s.id for s in fresh)
        duplicates = {s.id for s in fresh if attempts.get(s.id) == 0}
        if shared or alone - duplicates:
            self.alone = next(iter(alone - duplicates), None)
        if duplicates:
            self.link.drop(sorted(duplicates))
            self.loop.forget(duplicates)  # other samples of them still waiting
            for request_id in duplicates:
                self._forget(request_id)
            if self.metrics is not None:
                self.metrics.duplicates.inc(len(duplicates))
        return [s for s in joiners if s.id not in duplicates]

    # -- results out ------------------------------------------------------------------

    def _finish(self, seqs: list[Sequence]) -> None:
        if seqs:
            batches = sorted({f"{self.name}:{s.batch_id}" for s in seqs if s.batch_id})
            self._store([self._result(s) for s in seqs], batches)

    def _result(self, seq: Sequence) -> dict[str, Any]:
        env = self.arrivals[seq.id].envelope
        result = {**self.engine.result(seq), "job_id": env.job_id, "worker": self.name}
        if seq.admitted_at is None:  # ended before it ran (cancelled, expired)
            result.update(usage=None, batch=None, text="",
                          finish_reason="cancelled" if result["status"] == "cancelled" else None)
        return result

    def _store(self, results: list[dict[str, Any]], batch_ids: list[str] | None = None) -> None:
        self.link.finished(results)
        for result in results:
            self._forget(result["id"])
        log.info("rows_finished", worker=self.name, step=self.loop.steps, batch_ids=batch_ids or [],
                 request_ids=[r["id"] for r in results],
                 job_ids=sorted({r["job_id"] for r in results if r.get("job_id")}),
                 statuses={s: sum(r["status"] == s for r in results)
                           for s in {r["status"] for r in results}})
        if self.metrics is not None:
            self.metrics.observe_results(results)

    def _forget(self, request_id: str) -> None:
        if self.alone == request_id:
            self.alone = None
        self.arrivals.pop(request_id, None)
        self.received.pop(request_id, None)
        self.announced.discard(request_id)
        self.snapshots.pop(request_id, None)

    def _running_record(self, seq: Sequence) -> dict[str, Any]:
        env = self.arrivals[seq.id].envelope
        return result_record(seq.id, "running", env.request, job_id=env.job_id, worker=self.name,
                             model=self.engine.model_name)

    def _snapshot(self) -> None:
        """Partial text of running rows, at least every 16 tokens or half second."""
        now = time.monotonic()
        records = []
        for seq in self.loop.running:
            if seq.sample:  # a request's progress is its first sample's
                continue
            count = len(seq.tokens)
            last_count, last_at = self.snapshots.get(seq.id, (0, self.received.get(seq.id, now)))
            if seq.done or count <= last_count:
                continue
            if count - last_count >= SNAPSHOT_TOKENS or now - last_at >= SNAPSHOT_S:
                records.append({**self._running_record(seq), "text": seq.text(self.engine.tokenizer),
                                "usage": {"prompt_tokens": seq.prompt_tokens,
                                          "completion_tokens": count}})
                self.snapshots[seq.id] = (count, now)
        if records:
            self.link.progress(records)

    # -- warm shutdown ----------------------------------------------------------------

    def _drain(self) -> None:
        """Requeue what waits, run what runs to its end."""
        self.link.want(0, 0)
        for arrival in self.link.take_arrivals():
            self._arrive(arrival)
        running = {s.id for s in self.loop.running}  # their other samples run here too
        waiting = sorted({s.id for s in self.loop.waiting.values()} - running)
        self.loop.forget(set(waiting))
        self.link.requeue(waiting)
        for request_id in waiting:
            self._forget(request_id)
        log.info("draining", worker=self.name, requeued=len(waiting), running=len(self.loop.running))
        while not self.loop.idle:
            self.link.step_started()
            self._finish(self.loop.step())
            self.link.step_ended(busy=bool(self.loop.running), steps=1)
        leftover = [a.envelope.id for a in self.link.take_arrivals()]
        self.link.requeue(leftover)
