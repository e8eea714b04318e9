"""What Celery tools see of the requests a worker holds: task events (``celery events``,
Flower: received, started, succeeded with its runtime, failed, revoked), ``celery inspect
active``/``reserved``, revokes and cancel flags, and the callbacks, errbacks and chain steps
published once a result is stored. A mixin of ``Link``."""

from __future__ import annotations

import os
import time
from typing import Any

import redis
import structlog
from celery.worker import state as celery_state

from worker.queue.app import TASK_NAME

log = structlog.get_logger(__name__)


class TaskEvents:
    """Celery task events sent as ``hostname`` (``celery events``, Flower): the dispatcher
    made on first use; best effort, never raises (events are for watching)."""

    def __init__(self, app, hostname: str):
        self.app, self.hostname, self._dispatcher = app, hostname, None

    def send(self, kind: str, **fields: Any) -> None:
        try:
            if self._dispatcher is None:
                self._dispatcher = self.app.events.Dispatcher(
                    self.app.connection_for_write(), hostname=self.hostname, enabled=True,
                    buffer_while_offline=False)
            self._dispatcher.send(kind, **fields)
        except Exception as exc:  # noqa: BLE001 - events are for watching, never in the way
            log.debug("event_failed", worker=self.hostname, kind=kind, error=repr(exc)[:200])


class TaskLog:
    """``Link``'s Celery side (it owns the state this reads and writes)."""

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
            self._event("task-succeeded", uuid=request_id, result=short(record.get("text")),
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
        self.events.send(kind, **fields)

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


def short(value: Any, limit: int = 200) -> str:
    """A value as Celery events show it (its repr, cut)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
