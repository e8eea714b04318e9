"""A Redis lease: a lock one holder owns by its token, kept alive by a thread while held.

redis-py's ``Lock`` compares the token in Lua on every extend and release, so only the holder
refreshes or frees it; the keep-alive thread renews it every third of its TTL whatever the
holder is doing (a slow upload included). If the holder's process dies the lease lapses after
the TTL and another process may take it.
"""

from __future__ import annotations

import threading

from redis.exceptions import LockError, RedisError


class Lease:
    """``acquire()`` once (without waiting); ``held()`` while it is ours; ``release()``."""

    def __init__(self, redis_client, key: str, ttl_s: float):
        self._lock = redis_client.lock(key, timeout=ttl_s, thread_local=False)
        self._every = ttl_s / 3
        self._stop = threading.Event()
        self._lost = False
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self._lock.acquire(blocking=False):
            return False
        self._thread = threading.Thread(target=self._keep, name=f"lease {self._lock.name}",
                                        daemon=True)
        self._thread.start()
        return True

    def _keep(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._lock.reacquire()  # only while the stored token is ours
            except LockError:
                self._lost = True
                return
            except RedisError:  # a blip: the next try may still be in time
                continue

    def held(self) -> bool:
        """Whether the lease is still ours (one Redis read)."""
        return not self._lost and self._lock.owned()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._lock.release()
        except LockError:  # lapsed (and perhaps taken): nothing of ours to free
            pass
