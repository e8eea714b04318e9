"""How the worker's link takes requests: what the step loop wants, fetched within this
worker's fair share, decoded, checked against what was stored (a finished duplicate is
acked, a request that killed workers alone too often fails ``worker_lost``, a poison message
is answered and acked), then handed over as ``Arrival``s. A mixin of ``Link``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis
import structlog

from worker.lifecycle import is_final
from worker.overview import note_failures
from worker.queue.app import BULK_QUEUE, REQUEST_QUEUES, TASK_NAME
from worker.queue.delivery import Delivery, Undecodable
from worker.queue.messages import Envelope, MalformedMessage, parse
from worker.queue.tasklog import short
from worker.schema import result_record

log = structlog.get_logger(__name__)


@dataclass
class Arrival:
    """A request message taken off a queue, decoded and checked, not started yet."""

    envelope: Envelope
    suspect: bool  # started on a worker that died before finishing it
    deaths_alone: int = 0  # workers that died while it ran alone


class Admission:
    """``Link``'s intake side (it owns the state this reads and writes)."""

    def _fetch(self) -> None:
        """Take what the loop wants, within this worker's fair share (computed by the fetch
        script against the live queue length)."""
        for q in REQUEST_QUEUES:  # the doorbell rings for queues found empty that we want
            if self._want[q] > 0 and self._empty[q]:
                self._armed[q].set()
            else:
                self._armed[q].clear()
        want = {q: n if not self._empty[q] else 0 for q, n in self._want.items()}
        if not any(want.values()):
            return
        with self._lock:
            held = len(self._held)
        deliveries, left = self.inbox.fetch(want, held)
        for q in REQUEST_QUEUES:
            got = sum(1 for d in deliveries if d.priority_queue == q)
            with self._lock:  # not the loop's yet: do not fetch them again meanwhile
                self._want[q] = max(0, self._want[q] - got)
                self._checking[q] += got
            if want[q] and not left[q]:  # drained it: the doorbell says when more comes
                self._empty[q] = True
                self._armed[q].set()
        if deliveries:
            self._wake.set()  # want changes as they arrive: look again
            try:
                self._admit_deliveries(deliveries)
            finally:
                with self._lock:
                    self._checking = dict.fromkeys(REQUEST_QUEUES, 0)

    def _admit_deliveries(self, deliveries: list[Delivery]) -> None:
        """Decode and check new messages; hand valid ones to the loop."""
        envelopes: list[Envelope] = []
        for delivery in deliveries:
            envelope = self._decode(delivery)
            if envelope is None:
                continue
            with self._lock:
                if envelope.id in self._held:  # our own lease ran out and kombu restored it
                    self._held[envelope.id] = (delivery, envelope.priority)
                    continue
            envelopes.append(envelope)
        try:
            states = self.store.admission_state([e.id for e in envelopes])
        except redis.RedisError:  # they are taken: run them (a finish is idempotent)
            states = [(None, 0, 0)] * len(envelopes)
        arrivals, done, lost = [], [], []
        unknown = [(e.id, e.request) for e, (status, _, _) in zip(envelopes, states, strict=True)
                   if status is None and e.foreign]
        if unknown:  # a Celery producer's request: readable (GET, genq status) from now on
            try:
                self.store.record_queued(unknown)
            except redis.RedisError:
                pass
        for envelope, (status, _, _) in zip(envelopes, states, strict=True):
            if envelope.canvas and not is_final(status):
                self._canvas[envelope.id] = envelope.canvas
        for envelope, (status, attempts, deaths_alone) in zip(envelopes, states, strict=True):
            if is_final(status):
                done.append(envelope.delivery)  # finished before: a redelivered duplicate
            elif deaths_alone >= self.max_attempts:
                lost.append(envelope)
            else:
                arrivals.append(Arrival(envelope, suspect=attempts > 0, deaths_alone=deaths_alone))
        if done:
            self.inbox.ack(done)
            if self.metrics is not None:
                self.metrics.duplicates.inc(len(done))
        for envelope in lost:
            log.error("request_worker_lost", worker=self.name, request_id=envelope.id,
                      job_id=envelope.job_id, attempts=self.max_attempts)
            self._fail(envelope, "worker_lost",
                       f"{self.max_attempts} workers stopped while running this request alone")
        now = time.time()
        for a in arrivals:
            self._since.setdefault(a.envelope.id, now)
            self._event("task-received", uuid=a.envelope.id, name=TASK_NAME,
                        args=short([a.envelope.request]), kwargs="{}",
                        root_id=(a.envelope.canvas or {}).get("root_id", a.envelope.id),
                        expires=a.envelope.expires_at, retries=0, eta=None)
        with self._lock:
            for a in arrivals:
                self._held[a.envelope.id] = (a.envelope.delivery, a.envelope.priority)
                self._arrivals.append(a)
            self._checking = dict.fromkeys(REQUEST_QUEUES, 0)
        if arrivals:
            self._arrived.set()

    def _decode(self, delivery: Delivery) -> Envelope | None:
        """The envelope of a request message; a poison message is logged, answered if it
        names a request id, and acked (never redelivered)."""
        try:
            body, headers = delivery.decode()
            envelope = parse(body, headers, delivery)
        except (Undecodable, MalformedMessage) as exc:
            request_id = getattr(exc, "request_id", None)
            log.error("message_rejected", worker=self.name, reason=str(exc)[:300],
                      queue=delivery.queue, request_id=request_id)
            if request_id:
                failed = [result_record(request_id, "failed", worker=self.name,
                                        error={"code": "invalid_request", "message": str(exc)})]
                if getattr(exc, "canvas", None):
                    self._canvas[request_id] = exc.canvas
                self._event("task-received", uuid=request_id, name=TASK_NAME)
                for record, stored in zip(failed, self.store.finish(failed), strict=True):
                    self._finished_one(record, stored)
                self._note_failures(failed)
                self._publish_follow()
            self.inbox.ack([delivery])
            return None
        if "priority" not in envelope.request and delivery.priority_queue == BULK_QUEUE:
            envelope.request["priority"] = "bulk"  # sent to genq.bulk by a Celery producer
        return envelope

    def _fail(self, envelope: Envelope, code: str, message: str) -> None:
        record = result_record(envelope.id, "failed", envelope.request, job_id=envelope.job_id,
                               worker=self.name, model=self.info.get("model"),
                               error={"code": code, "message": message})
        for stored in self.store.finish([record]):
            self._finished_one(record, stored)
        self._note_failures([record])
        self._publish_follow()
        self.inbox.ack([envelope.delivery])
        if self.metrics is not None:
            self.metrics.requests.labels(worker=self.name, status="failed").inc()

    def _note_failures(self, records: list[dict[str, Any]]) -> None:
        pipe = self.store.redis.pipeline(transaction=False)
        note_failures(pipe, records, self.store.ttl)
        pipe.execute()

