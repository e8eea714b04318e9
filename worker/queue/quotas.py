"""The per-key quota: how many of an owner's requests are not final (``genq:pending:<owner>``),
counted by ``reserve.lua`` before a request is queued and given back by ``finish.lua``."""

from __future__ import annotations

import uuid
from typing import Any

from worker.queue.rediskeys import pending_key


class QuotaBook:
    """``ResultStore``'s quota methods (its ``redis``, ``ttl`` and the scripts it registers)."""

    redis: Any
    ttl: int
    _reserve: Any
    _release: Any

    def reserve(self, owner: str, n: int, limit: int | None) -> int | None:
        """Count ``n`` more pending requests for ``owner`` if they all fit under ``limit``;
        None if they do not (nothing counted), else the new count."""
        token = f"genq:resv:{uuid.uuid4().hex}"  # a replay of this call counts nothing twice
        got = int(self._reserve(keys=[pending_key(owner), token], args=[n, limit or 0, self.ttl]))
        return None if got < 0 else got

    def unreserve(self, owner: str, n: int) -> None:
        """Give back ``n`` reserved places that were never queued (once, replays included)."""
        if n > 0:
            self._release(keys=[pending_key(owner), f"genq:resv:{uuid.uuid4().hex}"],
                          args=[n, self.ttl])

    def pending(self, owner: str) -> int:
        """How many of ``owner``'s requests are not final."""
        return int(self.redis.get(pending_key(owner)) or 0)
