"""The worker's link to Redis: one I/O thread between the step loop and the broker.

The step loop never talks to Redis and never waits on it (but for one bounded wait: the start
record that counts an attempt is written before a request's first forward pass, so a request
that kills workers is caught; during an outage the loop does not wait). The link thread takes
messages off the queues (``delivery.Inbox``), checks them, and hands them over; it stores
running records, progress snapshots and results, acks, renews leases and publishes the
heartbeat, in the order the loop asked, retrying until Redis answers. So a Redis outage in the
middle of a batch never strands a request: the rows go on, their results wait here, and
everything is stored and acked within a second of Redis coming back.

Also here: the stall watchdog (no decode step for ``GENQ_STALL_TIMEOUT_S`` while rows run:
log why and exit non-zero, so the requests are redelivered; leases are renewed only while
steps happen), cancel flags, each worker's fair share of the queues (a worker never holds more
than its share of what is queued and held, so a small job spreads across live workers),
and an idle wait that makes about three Redis calls a second.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog
from celery.worker import state as celery_state

from worker.lifecycle import is_final
from worker.ops.redisconn import connect
from worker.ops.settings import Settings
from worker.overview import note_failures
from worker.queue.app import (
    BULK_BELL,
    BULK_QUEUE,
    INTERACTIVE_QUEUE,
    PRIORITY_STEPS,
    REQUEST_QUEUES,
    TASK_NAME,
    transport_options,
)
from worker.queue.canvas import Follower
from worker.queue.delivery import Delivery, Doorbell, Inbox, Undecodable
from worker.queue.messages import Envelope, MalformedMessage, parse
from worker.queue.results import ResultStore
from worker.schema import result_record

log = structlog.get_logger(__name__)

QUEUE_OF = {"interactive": INTERACTIVE_QUEUE, "bulk": BULK_QUEUE}
HEARTBEAT_S = 2.0
RECHECK_S = 10.0  # queues found empty are looked at again this often, doorbell or not
CANCEL_POLL_S = 0.25
START_WAIT_S = 2.0
STALL_EXIT_CODE = 70


@dataclass
class Arrival:
    """A request message taken off a queue, decoded and checked, not started yet."""

    envelope: Envelope
    suspect: bool  # started on a worker that died before finishing it


@dataclass
class _Op:
    """A write the loop asked for, kept until Redis has taken it."""

    kind: str  # start | progress | finish | requeue
    records: list[dict[str, Any]] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    starts: list[tuple[str, str, bool]] = field(default_factory=list)  # (id, token, alone)
    done: threading.Event = field(default_factory=threading.Event)
    result: list[int] | None = None


class Link:
    """Everything the step loop needs from Redis, done on one thread of its own."""

    def __init__(self, settings: Settings, name: str, store: ResultStore, info: dict[str, Any],
                 metrics=None):
        self.settings = settings
        self.name = name
        self.store = store
        self.info = info
        self.metrics = metrics
        url = settings.broker_url.get_secret_value()
        self.broker = connect(url, settings)
        self.inbox = Inbox(self.broker, transport_options(settings),
                           adapters=list(settings.adapters))
        # (priority, list it rings for): each queue and its priority-step lists (a foreign
        # producer's ``priority=``); the bulk bell rings for every owner's bulk list
        lists = [(q, q + step) for q in REQUEST_QUEUES for step in ("", *PRIORITY_STEPS)]
        self.doorbells = [(q, Doorbell(connect(url, settings, socket_timeout=20), key, 5.0))
                          for q, key in [*lists, (BULK_QUEUE, BULK_BELL)]]
        self.max_attempts = settings.max_attempts
        self.stall_timeout_s = settings.stall_timeout_s
        self.lease_every_s = max(1.0, min(5.0, settings.visibility_timeout_s / 4))
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._arrived = threading.Event()
        self._stop = threading.Event()
        self._arrivals: deque[Arrival] = deque()
        self._ops: deque[_Op] = deque()
        self._progress: dict[str, dict[str, Any]] = {}
        self._held: dict[str, tuple[Delivery, str]] = {}  # request id -> (message, priority)
        self._tokens: dict[str, str] = {}  # running here: request id -> token of its start
        self._cancelled: set[str] = set()
        self._canvas: dict[str, dict[str, Any]] = {}  # request id -> its Celery canvas
        self._follow: deque[tuple[dict[str, Any], dict[str, Any]]] = deque()  # to publish
        self._since: dict[str, float] = {}  # id -> when it arrived here (time.time())
        self._started_at: dict[str, float] = {}  # id -> when its start was stored (wall)
        self.follower = Follower(settings)
        self._events = None  # Celery's event dispatcher (task events for Flower), on first use
        self._want = dict.fromkeys(REQUEST_QUEUES, 0)
        self._empty = dict.fromkeys(REQUEST_QUEUES, False)
        self._checking = dict.fromkeys(REQUEST_QUEUES, 0)  # fetched, not handed over yet
        self._armed = {q: threading.Event() for q in REQUEST_QUEUES}
        self._rechecked = 0.0
        self.healthy = True
        self.busy = False
        self.progress_at = time.monotonic()
        self.steps = 0
        self.tokens = 0  # generated so far (rows that produced a token, summed over steps)
        self._token_samples: deque[tuple[float, int]] = deque()  # (monotonic time, tokens)
        self._threads: list[threading.Thread] = []

    # -- the step loop's side ---------------------------------------------------------

    def start_threads(self) -> None:
        """Start the I/O thread and one doorbell thread per request queue."""
        self._threads = [threading.Thread(target=self._run, name="genq-link", daemon=True),
                         threading.Thread(target=self._guard, name="genq-watchdog", daemon=True)]
        self._threads += [threading.Thread(target=self._ring, args=(q, bell),
                                           name=f"genq-bell-{i}", daemon=True)
                          for i, (q, bell) in enumerate(self.doorbells)]
        for t in self._threads:
            t.start()

    def want(self, interactive: int, bulk: int) -> None:
        """How many more requests of each priority the loop can hold now (besides what
        arrived and it has not taken yet)."""
        with self._lock:  # fetched but not taken by the loop yet: being checked, or waiting
            pending = dict(self._checking)
            for a in self._arrivals:
                pending[QUEUE_OF[a.envelope.priority]] += 1
            want = {INTERACTIVE_QUEUE: max(0, interactive - pending[INTERACTIVE_QUEUE]),
                    BULK_QUEUE: max(0, bulk - pending[BULK_QUEUE])}
            changed = want != self._want
            self._want = want
        if changed:
            self._wake.set()

    def take_arrivals(self, timeout: float = 0.0) -> list[Arrival]:
        """Requests received since the last call (waits up to ``timeout`` for one)."""
        if timeout > 0 and not self._arrivals:
            self._arrived.wait(timeout)
        with self._lock:
            self._arrived.clear()
            out = list(self._arrivals)
            self._arrivals.clear()
        return out

    def take_cancelled(self) -> set[str]:
        """Ids of held requests cancelled (or revoked) since the last call."""
        with self._lock:
            out, self._cancelled = self._cancelled, set()
        return out

    def started(self, records: list[dict[str, Any]], alone: set[str]) -> dict[str, int]:
        """Store running records and count the attempts before the first forward pass (the
        ids in ``alone`` run with no other row: a death now is charged to them).

        Returns the attempt number per id (0: already final, a duplicate); ids missing from
        the answer are unknown (Redis did not answer in time: run them anyway)."""
        with self._lock:
            for r in records:
                self._tokens.setdefault(r["id"], f"{self.name}:{uuid.uuid4().hex[:12]}")
            starts = [(r["id"], self._tokens[r["id"]], r["id"] in alone) for r in records]
        op = _Op("start", records, starts=starts)
        self._push(op)
        if self.healthy and op.done.wait(START_WAIT_S) and op.result is not None:
            return {r["id"]: n for r, n in zip(records, op.result, strict=True)}
        return {}

    def progress(self, records: list[dict[str, Any]]) -> None:
        """Running records with the text so far (only the latest per request is written)."""
        with self._lock:
            self._progress.update((r["id"], r) for r in records)
        self._wake.set()

    def finished(self, results: list[dict[str, Any]]) -> None:
        """Store final results, then ack their messages."""
        self._push(_Op("finish", results, self._release([r["id"] for r in results])))

    def drop(self, ids: list[str]) -> None:
        """Ack messages that will not run (duplicates of finished requests)."""
        self._push(_Op("finish", [], self._release(ids)))

    def requeue(self, ids: list[str]) -> None:
        """Hand waiting requests back to the head of their queues (warm shutdown); one that
        started here and went back to waiting (evicted) is not charged for that start."""
        with self._lock:
            starts = [(i, self._tokens[i], False) for i in ids if i in self._tokens]
        for i in ids:  # it comes back with its message
            self._canvas.pop(i, None)
            self._started_at.pop(i, None)
        self._push(_Op("requeue", [], self._release(ids), starts=starts))

    def step_started(self) -> None:
        """A forward pass is about to run: from now on the watchdog expects it to end."""
        self.progress_at = time.monotonic()
        self.busy = True

    def step_ended(self, busy: bool, steps: int = 0, tokens: int = 0) -> None:
        """The loop is alive: a turn just ended (``busy``: rows are still running; ``tokens``:
        generated by its steps)."""
        self.busy = busy
        self.steps += steps
        self.tokens += tokens
        self.progress_at = time.monotonic()

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is pending (for up to ``timeout_s``), remove the heartbeat, stop."""
        deadline = time.monotonic() + timeout_s
        self._wake.set()
        while (self._ops or self._progress) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        try:
            self.store.forget_worker(self.name)
        except redis.RedisError:
            pass

    def _push(self, op: _Op) -> None:
        with self._lock:
            self._ops.append(op)
        self._wake.set()

    def _release(self, ids: list[str]) -> list[Delivery]:
        with self._lock:
            out = [self._held.pop(i)[0] for i in ids if i in self._held]
            for i in ids:
                self._since.pop(i, None)
                self._tokens.pop(i, None)
        return out

    # -- the I/O thread ---------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.2
        next_beat = next_cancel = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                self._write()
                if now >= next_beat:
                    self._beat(now)
                    next_beat = now + HEARTBEAT_S
                self._fetch()
                if now >= next_cancel:
                    self._poll_cancels()
                    next_cancel = now + CANCEL_POLL_S
            except (redis.RedisError, OSError) as exc:
                if self.healthy:
                    log.warning("broker_unavailable", worker=self.name, error=repr(exc)[:200],
                                pending_writes=len(self._ops))
                self.healthy = False
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 1.0)
                next_beat = 0.0  # renew leases first thing once Redis is back
                continue
            if not self.healthy:
                log.info("broker_back", worker=self.name)
                self.healthy = True
            backoff = 0.2
            pause = min(next_beat, next_cancel if self._held else next_beat) - time.monotonic()
            self._wake.wait(max(0.0, min(pause, 0.5)))
            self._wake.clear()

    def _write(self) -> None:
        """Write the pending ops in order: results and records first, then acks (each write is
        idempotent, so a batch cut short by a failure is written again whole)."""
        with self._lock:
            ops = list(self._ops)
            progress = [p for i, p in self._progress.items() if i in self._tokens]
            self._progress.clear()
        if not ops and not progress:
            return
        records = self.store.redis.pipeline(transaction=False)
        acks = self.broker.pipeline(transaction=False)
        starts: list[tuple[_Op, int]] = []
        finishes: list[tuple[_Op, int]] = []
        for op in ops:
            if op.kind == "start":
                starts.append((op, len(records.command_stack)))
                self.store.start(op.records, [t for _, t, _ in op.starts],
                                 [a for _, _, a in op.starts], pipe=records)
            elif op.kind == "finish":
                finishes.append((op, len(records.command_stack)))
                self.store.finish(op.records, pipe=records)
                note_failures(records, op.records, self.store.ttl)
                self.inbox.ack(op.deliveries, pipe=acks)
            else:
                self.store.unstart([(i, t) for i, t, _ in op.starts], pipe=records)
                self.inbox.requeue(op.deliveries, pipe=acks)
        self.store.progress(progress, pipe=records)
        try:
            replies = records.execute() if records.command_stack else []
            for op, at in finishes:  # stored now (not by an earlier try): what follows them
                for record, stored in zip(op.records, replies[at:at + len(op.records)],
                                          strict=True):
                    self._finished_one(record, bool(stored))
            self._publish_follow()  # before the acks: a callback is never lost to a retry
            if acks.command_stack:
                acks.execute()
        except Exception:
            with self._lock:  # keep these snapshots unless newer ones came meanwhile
                for p in progress:
                    self._progress.setdefault(p["id"], p)
            raise
        with self._lock:
            for _ in ops:
                self._ops.popleft()
        for op, at in starts:
            op.result = [int(x) for x in replies[at:at + len(op.records)]]
            for record, n in zip(op.records, op.result, strict=True):
                if n and record["id"] not in self._started_at:
                    self._started_at[record["id"]] = time.time()
                    self._event("task-started", uuid=record["id"])
        for op in ops:
            op.done.set()

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
                arrivals.append(Arrival(envelope, suspect=attempts > 0))
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
                        args=_short([a.envelope.request]), kwargs="{}",
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

    def _finished_one(self, record: dict[str, Any], stored: bool) -> None:
        """A final result was written (``stored``: by this call, not before): queue what
        follows it (its Celery canvas) and send its task event."""
        request_id = record["id"]
        canvas = self._canvas.pop(request_id, None)
        self._since.pop(request_id, None)
        started = self._started_at.pop(request_id, None)
        if not stored:
            return
        if canvas:
            self._follow.append((record, canvas))
        status = record["status"]
        if status == "succeeded":
            self._event("task-succeeded", uuid=request_id, result=_short(record.get("text")),
                        runtime=round(time.time() - started, 4) if started else 0.0)
        elif status == "failed":
            err = record.get("error") or {}
            self._event("task-failed", uuid=request_id, traceback=None,
                        exception=f"GenerationFailed('{err.get('code')}: {err.get('message')}')")
        else:
            self._event("task-revoked", uuid=request_id, terminated=started is not None,
                        signum=None, expired=status == "expired")

    def _publish_follow(self) -> None:
        """Publish the callbacks, errbacks and chain steps of stored results (in order; one
        that fails stays first in line and the link retries it)."""
        while self._follow:
            record, canvas = self._follow[0]
            try:
                self.follower.follow(record, canvas, self.store.redis)
            except (redis.RedisError, OSError):
                raise
            except Exception as exc:  # noqa: BLE001 - a bad signature must not stop the link
                log.error("callback_failed", worker=self.name, request_id=record["id"],
                          error=f"{type(exc).__name__}: {str(exc)[:300]}")
            self._follow.popleft()

    def _event(self, kind: str, **fields: Any) -> None:
        """Send a Celery task event (``celery events``, Flower); best effort, never raises."""
        try:
            if self._events is None:
                app = self.follower.app
                self._events = app.events.Dispatcher(app.connection_for_write(),
                                                     hostname=self.name, enabled=True,
                                                     buffer_while_offline=False)
            self._events.send(kind, **fields)
        except Exception as exc:  # noqa: BLE001 - events are for watching, never in the way
            log.debug("event_failed", worker=self.name, kind=kind, error=repr(exc)[:200])

    def requests(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(running, waiting) requests held here, as ``celery inspect active`` / ``reserved``
        describe a request."""
        with self._lock:
            held = {i: (d.queue, p, i in self._tokens) for i, (d, p) in self._held.items()}
            since = dict(self._since)
            started = dict(self._started_at)
        running, waiting = [], []
        for request_id, (queue, priority, is_running) in held.items():
            info = {"id": request_id, "name": TASK_NAME, "type": TASK_NAME,
                    "args": [], "kwargs": {}, "hostname": self.name, "worker_pid": os.getpid(),
                    "time_start": started.get(request_id) or since.get(request_id),
                    "acknowledged": False, "priority": priority,
                    "delivery_info": {"exchange": "", "routing_key": queue, "priority": None,
                                      "redelivered": None}}
            (running if is_running else waiting).append(info)
        return running, waiting

    def _poll_cancels(self) -> None:
        with self._lock:
            ids = list(self._held)
        if not ids:
            return
        flags = self.store.cancelled(ids)
        hits = {i for i, f in zip(ids, flags, strict=True) if f or i in celery_state.revoked}
        if hits:
            with self._lock:
                self._cancelled |= hits

    def _beat(self, now: float) -> None:
        """Renew leases (only while the loop makes progress) and publish the heartbeat with
        what this worker holds."""
        with self._lock:
            held = [d for d, _ in self._held.values()]
            counts = {"waiting": {"interactive": 0, "bulk": 0}, "running": {"interactive": 0, "bulk": 0}}
            for request_id, (_, priority) in self._held.items():
                counts["running" if request_id in self._tokens else "waiting"][priority] += 1
        pipe = self.broker.pipeline(transaction=False)
        if held and not self._stalled(now):
            self.inbox.renew(held, pipe=pipe)
        self.store.heartbeat(self.name, {
            **self.info, "name": self.name, "pid": os.getpid(), "steps": self.steps,
            "busy": self.busy, "held": len(held), **counts, "tokens": self.tokens,
            "tokens_per_s": self._token_rate(now)}, pipe=pipe)
        pipe.execute()
        if now - self._rechecked >= RECHECK_S:  # a missed ring costs at most this long
            self._rechecked = now
            for job_id in self.store.reap(self.settings.job_submit_timeout_s):
                log.warning("job_reaped", worker=self.name, job_id=job_id,
                            reason="its submitter stopped before every request was queued")
            for q in REQUEST_QUEUES:
                self._empty[q] = False
        self._wake.set()  # shares may have changed: look at the queues again

    def _token_rate(self, now: float, window_s: float = 10.0) -> float:
        """Tokens generated per second over about the last ``window_s`` seconds."""
        samples = self._token_samples
        samples.append((now, self.tokens))
        while len(samples) > 2 and samples[1][0] <= now - window_s:
            samples.popleft()
        (t0, n0), (t1, n1) = samples[0], samples[-1]
        return round((n1 - n0) / (t1 - t0), 2) if t1 > t0 else 0.0

    def _stalled(self, now: float) -> bool:
        return self.busy and now - self.progress_at > self.stall_timeout_s

    def _guard(self) -> None:
        """Watchdog thread, apart from the I/O it watches (a Redis call stuck on a half-open
        connection cannot hold it up): exit when the loop stalls or the link is stuck."""
        while not self._stop.wait(0.5):
            self._watchdog(time.monotonic())

    def _watchdog(self, now: float) -> None:
        if self._stalled(now):
            with self._lock:
                running = sorted(self._tokens)
            log.error("worker_stalled", worker=self.name, seconds=round(now - self.progress_at, 1),
                      stall_timeout_s=self.stall_timeout_s, request_ids=running,
                      action="exit so that the requests are redelivered")
            os._exit(STALL_EXIT_CODE)

    def _ring(self, queue: str, bell: Doorbell) -> None:
        """Doorbell thread: while the link waits for ``queue``, block until ``bell`` rings."""
        armed = self._armed[queue]
        while not self._stop.is_set():
            if not armed.wait(0.5):
                continue
            try:
                rang = bell.wait()
            except (redis.RedisError, OSError):
                self._stop.wait(1.0)
                continue
            if rang:
                armed.clear()
                self._empty[queue] = False
                self._wake.set()


def _short(value: Any, limit: int = 200) -> str:
    """A value as Celery events show it (its repr, cut)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
