"""Workers' heartbeats: ``genq:worker:<name>`` (expiring) and the hash ``genq:workers``
(read by ``/readyz``, the status page, ``genq up`` and other workers' fair share)."""

from __future__ import annotations

import json
import time
from typing import Any

from worker.queue.rediskeys import WORKERS_KEY, dumps


class HeartbeatBook:
    """``ResultStore``'s heartbeat methods (its ``redis``)."""

    redis: Any

    def heartbeat(self, name: str, info: dict[str, Any], ttl_s: int = 15, pipe=None) -> None:
        """Say that worker ``name`` is alive, with what it holds (read by ``/readyz``, the
        demand metric and other workers' fair share)."""
        raw = dumps({**info, "at": time.time(), "ttl": ttl_s})
        own = pipe is None
        pipe = pipe if pipe is not None else self.redis.pipeline(transaction=False)
        pipe.set(f"genq:worker:{name}", raw, ex=ttl_s)
        pipe.hset(WORKERS_KEY, name, raw)
        if own:
            pipe.execute()

    def forget_worker(self, name: str) -> None:
        """Remove a stopping worker's heartbeat."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(f"genq:worker:{name}")
        pipe.hdel(WORKERS_KEY, name)
        pipe.execute()

    def workers(self) -> list[dict[str, Any]]:
        """Heartbeats of the workers alive now (stale entries are removed)."""
        now = time.time()
        alive, stale = [], []
        for name, raw in self.redis.hgetall(WORKERS_KEY).items():
            try:
                info = json.loads(raw)
                fresh = now - float(info["at"]) < float(info.get("ttl", 15))
            except (ValueError, KeyError, TypeError):
                fresh = False
            (alive if fresh else stale).append(info if fresh else name)
        if stale:
            self.redis.hdel(WORKERS_KEY, *stale)
        return alive
