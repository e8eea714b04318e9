"""What Celery runs after a task, run after a request: ``link``, ``link_error`` and chains.

A host Celery app may enqueue ``genq.generate`` with callbacks (``sig.link(...)``,
``link_error``) or as the first step of a chain (``generate_sig | postprocess.s()``); Celery's
protocol 2 carries them in the message body (``callbacks``, ``errbacks``, ``chain``). The
worker publishes them once the request's result is stored, the way Celery's tracer does:

- succeeded: each callback, and the chain's next step (with the rest of the chain), is sent
  with the result dict prepended to its arguments (an immutable signature takes none);
- failed, cancelled or expired: each errback is sent with the request id as its argument
  (Celery's form for an errback the publisher does not know), and every later step of the
  chain is marked with the same failure (as Celery's ``mark_as_failure`` does), so
  ``chain.apply_async().get()`` raises instead of waiting forever.

They are published by a Celery app on genqueue's broker that knows none of the host's tasks:
a signature's own ``queue`` option is honoured, one without goes to Celery's default queue
``celery`` (the host's ``task_routes`` are not applied: give callbacks a queue). At most once:
a worker killed between storing a result and publishing its callbacks loses them.
"""

from __future__ import annotations

import json
from typing import Any

import structlog

from worker.ops.settings import Settings
from worker.queue.celerymeta import celery_meta, meta_key

log = structlog.get_logger(__name__)
DEFAULT_QUEUE = "celery"  # Celery's default queue: where a callback with no queue goes


class Follower:
    """Publishes the canvas of finished requests (used on the link thread only)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._app = None

    @property
    def app(self):
        if self._app is None:
            from worker.queue.app import make_app

            app = make_app(self.settings)
            app.conf.task_default_queue = DEFAULT_QUEUE
            app.conf.task_queues = None
            self._app = app
        return self._app

    def follow(self, record: dict[str, Any], canvas: dict[str, Any], results) -> int:
        """Publish what follows ``record`` (a final result) per ``canvas``; ``results`` is a
        Redis client for the chain's failure metas. Returns how many messages were sent."""
        from celery.canvas import signature

        task_id, root_id = record["id"], canvas.get("root_id") or record["id"]
        common = {"parent_id": task_id, "root_id": root_id}
        sent = 0
        if record["status"] == "succeeded":
            for callback in canvas.get("callbacks") or []:
                signature(callback, app=self.app).apply_async((record,), **common)
                sent += 1
            chain = list(canvas.get("chain") or [])
            if chain:
                step = signature(chain.pop(), app=self.app)
                step.apply_async((record,), chain=chain or None, **common)
                sent += 1
            return sent
        for errback in canvas.get("errbacks") or []:
            signature(errback, app=self.app).apply_async((task_id,), **common)
            sent += 1
        pipe = results.pipeline(transaction=False)
        for step in canvas.get("chain") or []:
            options = step.get("options") or {}
            step_id = options.get("task_id")
            if not isinstance(step_id, str):
                continue
            meta = json.dumps({**celery_meta(record), "task_id": step_id})
            pipe.set(meta_key(step_id), meta, ex=self.settings.result_ttl_s)
            pipe.publish(meta_key(step_id), meta)
        if pipe.command_stack:
            pipe.execute()
        return sent
