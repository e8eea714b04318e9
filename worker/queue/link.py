"""The worker's link to Redis: one I/O thread between the step loop and the broker.

The step loop never talks to Redis and never waits on it (but for one bounded wait: the start
record that counts an attempt is written before a request's first forward pass, so a request
that kills workers is caught; during an outage the loop does not wait). The link thread takes
messages off the queues (``delivery.Inbox``), checks them, and hands them over; it stores
running records, progress snapshots and results, acks, renews leases and publishes the
heartbeat, in the order the loop asked, retrying until Redis answers. So a Redis outage in the
middle of a batch never strands a request: the rows go on, their results wait here, and
everything is stored and acked within a second of Redis coming back.

Three sides of the link live in modules of their own, as mixins of ``Link``:
``link_admit`` (fetching within this worker's fair share, so a small job spreads across live
workers, and checking what arrives), ``tasklog`` (Celery task events, ``inspect``, revokes and
cancel flags, callbacks) and ``link_health`` (heartbeat, leases renewed only while steps
happen, the stall watchdog: no decode step for ``GENQ_STALL_TIMEOUT_S`` while rows run, log why
and exit non-zero so the requests are redelivered; the doorbells, so an idle worker makes
about three Redis calls a second).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog

from worker.ops.redisconn import connect
from worker.ops.settings import Settings
from worker.overview import note_failures
from worker.queue.app import (
    BULK_BELL,
    BULK_QUEUE,
    INTERACTIVE_QUEUE,
    PRIORITY_STEPS,
    REQUEST_QUEUES,
    transport_options,
)
from worker.queue.canvas import Follower
from worker.queue.delivery import Delivery, Doorbell, Inbox
from worker.queue.link_admit import Admission, Arrival
from worker.queue.link_health import Health
from worker.queue.rediskeys import starts_key
from worker.queue.results import ResultStore
from worker.queue.tasklog import TaskEvents, TaskLog

log = structlog.get_logger(__name__)

QUEUE_OF = {"interactive": INTERACTIVE_QUEUE, "bulk": BULK_QUEUE}
HEARTBEAT_S = 2.0
CANCEL_POLL_S = 0.25
START_WAIT_S = 2.0


@dataclass
class _Op:
    """A write the loop asked for, kept until Redis has taken it."""

    kind: str  # start | progress | finish | requeue
    records: list[dict[str, Any]] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    starts: list[tuple[str, str, bool]] = field(default_factory=list)  # (id, token, alone)
    shared: list[tuple[str, str]] = field(default_factory=list)  # (id, token): no longer alone
    done: threading.Event = field(default_factory=threading.Event)
    result: list[int] | None = None


class Link(Admission, TaskLog, Health):
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
        self.events = TaskEvents(self.follower.app, name)  # task events for Flower
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

    def started(self, records: list[dict[str, Any]], alone: set[str],
                shared: list[str] | None = None) -> dict[str, int]:
        """Store running records and count the attempts before the first forward pass (the
        ids in ``alone`` run with no other row: a death now is charged to them; the ids in
        ``shared`` started alone here and other rows join them now: a death no longer is).

        Returns the attempt number per id (0: already final, a duplicate); ids missing from
        the answer are unknown (Redis did not answer in time: run them anyway)."""
        with self._lock:
            for r in records:
                self._tokens.setdefault(r["id"], f"{self.name}:{uuid.uuid4().hex[:12]}")
            starts = [(r["id"], self._tokens[r["id"]], r["id"] in alone) for r in records]
            joined = [(i, self._tokens[i]) for i in shared or () if i in self._tokens]
        op = _Op("start", records, starts=starts, shared=joined)
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
                for request_id, token in op.shared:  # batch-mates join: no longer alone
                    records.hset(starts_key(request_id), token, "0")
                    records.expire(starts_key(request_id), self.store.ttl)
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
