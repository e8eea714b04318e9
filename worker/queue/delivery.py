"""Taking request messages off the Redis lists with no window in which one can be lost.

kombu's Redis transport pops a message with BRPOP and records it as unacked in a second round
trip; a worker killed, or a Redis stopped, between the two loses the message for good (kombu
issue #305; our SIGKILL and Redis-restart tests lost 1 request in 300-500 this way). Here one
Lua script (``lua/fetch.lua``) pops messages and records them in kombu's own unacked hash and
index, in the format kombu writes (``KOMBU_UNACKED``), so kombu's visibility-timeout restore
(run by the Celery worker's consumer) still brings back a dead worker's messages, and an ack is
kombu's ack. ``tests/test_delivery.py`` pins that format against the installed kombu.

An idle worker does not poll: ``Doorbell`` blocks on ``BLMOVE q q RIGHT RIGHT`` (pop the
oldest message and push it straight back: the list is unchanged) until a message arrives, one
call every few seconds per queue while nothing does (Redis 6.2 or newer).

Adapters: a worker never takes a request (``genq_adapter`` header) for an adapter it does not
serve, whatever the queues hold. The fetch script sets such a message aside once, on a list per
list and adapter that only workers serving that adapter read, so nobody scans it again; it
arrives on the usual lists, so the doorbells ring for it. At enqueue the client refuses an
adapter that no live worker's heartbeat lists (with none alive: one not in its
``GENQ_ADAPTERS``); a request whose adapter's workers all stopped after it was queued waits for
one to start, until it is cancelled or its deadline passes (it then reads ``expired``).
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from worker.queue.app import (
    BULK_BELL,
    BULK_QUEUE,
    INTERACTIVE_QUEUE,
    OWNER_LISTS_KEY,
    PARKED_KEY,
    PARKED_LISTS_KEY,
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    logical_queue,
    pins_key,
    request_lists,
)
from worker.queue.scripts import register

BULK_TURN_KEY = "genq:bulk:turn"  # whose turn it is among the bulk lists
ASIDE = "\x06\x17"  # a set-aside list is ``<list>\x06\x17<adapter>`` (lua/fetch.lua)

# kombu's unacked record, the internal format genqueue writes for kombu (stated here once). Its
# Redis transport (``kombu.transport.redis.QoS.append``) holds a message it delivered as the hash
# ``unacked``: delivery tag -> the JSON array ``[message as published, exchange, routing key]``
# and the sorted set ``unacked_index``: tag -> when it was taken; its restore reads them back.
# genqueue gives kombu names of its own for both (``app.UNACKED_KEY``, ``UNACKED_INDEX_KEY``,
# transport options), so a host Celery app on the same Redis keeps its own.
# The fetch script (``lua/fetch.lua``) writes exactly that, and ``publishing.wrap`` writes a
# message as the transport's publish does (``{"body", "content-encoding", "content-type",
# "headers", "properties"}``, the body base64). Checked against these kombu versions
# (major.minor) by ``tests/test_delivery.py`` and ``tests/test_publishing.py``, which fail on
# any other version or a different record.
KOMBU_UNACKED = ("message", "exchange", "routing_key")
KOMBU_CHECKED = ("5.7",)
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class Undecodable(ValueError):
    """A message that is not a JSON Celery message (pickle included): never executed."""


@dataclass(frozen=True)
class Delivery:
    """One message taken off a queue and held unacked."""

    tag: str
    raw: bytes
    queue: str  # the Redis list it came from

    @property
    def priority_queue(self) -> str:
        """``genq.interactive`` or ``genq.bulk``: the priority it was queued at."""
        return logical_queue(self.queue)

    def decode(self) -> tuple[Any, dict[str, Any]]:
        """(body, headers) of a JSON message; ``Undecodable`` for anything else, whatever its
        shape, nesting depth or size (a poison message must never take a worker down)."""
        if len(self.raw) > MAX_MESSAGE_BYTES:
            raise Undecodable(f"message is {len(self.raw)} bytes, more than {MAX_MESSAGE_BYTES}")
        try:
            envelope = json.loads(self.raw)
            if not isinstance(envelope, dict):
                raise Undecodable(f"envelope is a JSON {type(envelope).__name__}, not an object")
            content_type = envelope.get("content-type")
            if content_type != "application/json":
                raise Undecodable(f"content type {str(content_type)[:40]!r} refused: JSON only, "
                                  "never pickle")
            headers = envelope.get("headers") or {}
            properties = envelope.get("properties") or {}
            body = envelope.get("body")
            if not isinstance(headers, dict) or not isinstance(properties, dict):
                raise Undecodable("headers and properties must be JSON objects")
            if not isinstance(body, str):
                raise Undecodable(f"body is a JSON {type(body).__name__}, not an encoded string")
            if properties.get("body_encoding") == "base64":
                body = base64.b64decode(body, validate=True)
            return json.loads(body), headers
        except Undecodable:
            raise
        except Exception as exc:  # ValueError, RecursionError (deep nesting), binascii.Error...
            raise Undecodable(f"not a JSON message: {type(exc).__name__}") from None


class Inbox:
    """Fetch, ack and requeue request messages on a Redis broker, atomically."""

    def __init__(self, client: redis.Redis, transport: dict[str, Any],
                 workers_key: str = "genq:workers", adapters: list[str] | None = None):
        self.redis = client
        self.unacked = transport.get("unacked_key", UNACKED_KEY)
        self.index = transport.get("unacked_index_key", UNACKED_INDEX_KEY)
        self.workers_key = workers_key
        self.adapters = json.dumps(sorted(adapters or []))
        self._fetch = register(client, "fetch")
        self._unpark = register(client, "unpark")

    def fetch(self, want: dict[str, int], held: int = 0) -> tuple[list[Delivery], dict[str, int]]:
        """Up to ``want[queue]`` messages of each priority (``genq.interactive``,
        ``genq.bulk``: every list of that priority), interactive first, within the share of a
        worker that holds ``held`` messages, each unacked until acked; and how many messages
        of each priority are still queued."""
        interactive, bulk, weights = request_lists(self.redis)
        args = [time.time(), held, len(interactive), max(0, want.get(INTERACTIVE_QUEUE, 0)),
                max(0, want.get(BULK_QUEUE, 0)), self.adapters, *weights]
        flat = self._fetch(keys=[self.unacked, self.index, self.workers_key, BULK_TURN_KEY,
                                 BULK_BELL, OWNER_LISTS_KEY, PARKED_KEY, *interactive, *bulk],
                           args=args)
        left = {INTERACTIVE_QUEUE: int(flat[0]), BULK_QUEUE: int(flat[1])}
        flat = flat[2:]
        return [Delivery(tag.decode(), raw, queue.decode())
                for tag, raw, queue in zip(flat[0::3], flat[1::3], flat[2::3], strict=True)], left

    def ack(self, deliveries: list[Delivery], pipe=None) -> None:
        """Forget these messages (their results are stored) and unpin their owners' lists.
        With ``pipe``: queued on it."""
        tags = [d.tag for d in deliveries if d.tag]
        if tags:
            own = pipe is None
            pipe = pipe if pipe is not None else self.redis.pipeline(transaction=False)
            pipe.zrem(self.index, *tags)
            pipe.hdel(self.unacked, *tags)
            pinned: dict[str, list[str]] = {}
            for d in deliveries:
                if d.tag and (key := pins_key(d.queue)):
                    pinned.setdefault(key, []).append(d.tag)
            for key, keep in pinned.items():
                pipe.srem(key, *keep)
            if own:
                pipe.execute()

    def requeue(self, deliveries: list[Delivery], pipe=None) -> None:
        """Put unstarted messages back at the head of their queues (warm shutdown). A message
        requeued twice (the first reply was lost) is run twice: its finish is idempotent."""
        if not deliveries:
            return
        own = pipe is None
        pipe = pipe if pipe is not None else self.redis.pipeline(transaction=True)
        for d in deliveries:
            pipe.rpush(d.queue, d.raw)
            if d.tag:
                pipe.zrem(self.index, d.tag)
                pipe.hdel(self.unacked, d.tag)
        if own:
            pipe.execute()

    def parked(self, limit: int = 1000) -> list[Delivery]:
        """Messages set aside for an adapter (see ``lua/fetch.lua``), up to ``limit`` per
        list, oldest first, each with the set-aside list it is on as its ``queue``."""
        out = []
        for name in sorted(n.decode() for n in self.redis.smembers(PARKED_LISTS_KEY)):
            raws = self.redis.lrange(name, -limit, -1)
            if not raws:  # a worker serving the adapter emptied it: the script unlists it
                self._unpark(keys=[name, PARKED_KEY, PARKED_LISTS_KEY], args=["", ""])
            for raw in reversed(raws):
                try:
                    tag = json.loads(raw)["properties"]["delivery_tag"]
                except (ValueError, KeyError, TypeError):
                    tag = ""
                out.append(Delivery(tag if isinstance(tag, str) else "", raw, name))
        return out

    def unpark(self, deliveries: list[Delivery]) -> int:
        """Drop these set-aside messages (their requests ended while they waited) where they
        still are; how many were dropped (``lua/unpark.lua``: replay-safe)."""
        lists: dict[str, list[Delivery]] = {}
        for d in deliveries:
            lists.setdefault(d.queue, []).append(d)
        removed = 0
        for name, ds in lists.items():
            base = name.split(ASIDE)[0]
            args = [logical_queue(base).removeprefix("genq."), pins_key(base) or ""]
            for d in ds:
                args += [d.tag, d.raw]
            removed += self._unpark(keys=[name, PARKED_KEY, PARKED_LISTS_KEY], args=args)
        return removed

    def renew(self, deliveries: list[Delivery], pipe=None) -> None:
        """Renew the visibility lease of messages still held (XX: only if still unacked)."""
        tags = [d.tag for d in deliveries if d.tag]
        if tags:
            (pipe or self.redis).zadd(self.index, dict.fromkeys(tags, time.time()), xx=True)


class Doorbell:
    """Blocks until a message is on ``queue`` (``BLMOVE queue queue RIGHT RIGHT``: the list is
    left as it was), so an idle worker waits without polling."""

    def __init__(self, client: redis.Redis, queue: str, timeout_s: float = 1.0):
        self.redis = client
        self.queue = queue
        self.timeout_s = timeout_s

    def wait(self) -> bool:
        """True once the queue holds a message; False after ``timeout_s`` without one."""
        return self.redis.blmove(self.queue, self.queue, self.timeout_s, "RIGHT", "RIGHT") is not None
