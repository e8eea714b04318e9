"""A worker's signs of life: the heartbeat (what it holds, its token rate), lease renewal
while the step loop makes progress, the stall watchdog on a thread of its own, and the
doorbell threads that wake the link when an empty queue gets a message. A mixin of ``Link``."""

from __future__ import annotations

import os
import time

import redis
import structlog

from worker.lifecycle import is_final, overdue
from worker.queue.app import REQUEST_QUEUES
from worker.queue.delivery import Doorbell, Undecodable

log = structlog.get_logger(__name__)

RECHECK_S = 10.0  # queues found empty are looked at again this often, doorbell or not
STALL_EXIT_CODE = 70


def drop_ended_parked(inbox, store, now: float) -> list[str]:
    """Drop the messages set aside for an adapter (one no live worker may serve) whose requests
    ended while they waited: cancelled, or past their deadline (ended ``expired`` here), so
    that queue depths and ``/demand`` stop counting them. The ids dropped."""
    parked = inbox.parked()
    ids = []
    for delivery in parked:
        try:
            ids.append(delivery.decode()[1].get("id"))
        except Undecodable:
            ids.append(None)
    known = [i for i in ids if isinstance(i, str)]
    records = dict(zip(known, store.get_many(known), strict=True))
    due = {i: rec for i, rec in records.items() if overdue(rec, now)}
    if due:
        store.expire(list(due.values()))
    ended = {i: d for d, i in zip(parked, ids, strict=True) if i in due
             or (isinstance(i, str) and (rec := records.get(i)) and is_final(rec["status"]))}
    inbox.unpark(list(ended.values()))
    return list(ended)


class Health:
    """``Link``'s liveness side (it owns the state this reads and writes)."""

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
            self._sweep_parked(time.time())
            for q in REQUEST_QUEUES:
                self._empty[q] = False
        self._wake.set()  # shares may have changed: look at the queues again

    def _sweep_parked(self, now: float) -> None:
        """Drop set-aside requests that ended while they waited (``drop_ended_parked``)."""
        dropped = drop_ended_parked(self.inbox, self.store, now)
        if dropped:
            log.info("parked_requests_dropped", worker=self.name, count=len(dropped),
                     request_ids=dropped[:20])

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
