"""Taking request messages off the Redis lists with no window in which one can be lost.

kombu's Redis transport pops a message with BRPOP and records it as unacked in a second round
trip; a worker killed, or a Redis stopped, between the two loses the message for good (kombu
issue #305; our SIGKILL and Redis-restart tests lost 1 request in 300-500 this way). Here one
Lua script pops messages and records them in kombu's own unacked hash and index, in the format
kombu writes, so kombu's visibility-timeout restore (run by the Celery worker's consumer) still
brings back a dead worker's messages, and an ack is kombu's ack.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any

import redis

# KEYS: request queues in priority order, then the unacked hash and its index.
# ARGV: how many messages at most, now. Returns tag, raw, queue triples; a message that is
# not a kombu envelope comes back with an empty tag and is not recorded (it is rejected).
FETCH = """
local n, now = tonumber(ARGV[1]), ARGV[2]
local unacked, index = KEYS[#KEYS - 1], KEYS[#KEYS]
local out = {}
for i = 1, #KEYS - 2 do
  while #out < 3 * n do
    local raw = redis.call('RPOP', KEYS[i])
    if not raw then break end
    local ok, msg = pcall(cjson.decode, raw)
    local tag, info = nil, nil
    if ok and type(msg) == 'table' and type(msg['properties']) == 'table' then
      tag = msg['properties']['delivery_tag']
      info = msg['properties']['delivery_info']
    end
    if type(tag) == 'string' and type(info) == 'table' then
      local ex, rk = info['exchange'] or KEYS[i], info['routing_key'] or KEYS[i]
      redis.call('HSET', unacked, tag,
                 '[' .. raw .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
      redis.call('ZADD', index, now, tag)
    else
      tag = ''
    end
    table.insert(out, tag)
    table.insert(out, raw)
    table.insert(out, KEYS[i])
  end
end
return out
"""


class Undecodable(ValueError):
    """A message that is not a JSON Celery message (pickle included): never executed."""


@dataclass(frozen=True)
class Delivery:
    """One message taken off a queue and held unacked."""

    tag: str
    raw: bytes
    queue: str

    def decode(self) -> tuple[Any, dict[str, Any]]:
        """(body, headers) of a JSON message; ``Undecodable`` for anything else."""
        try:
            envelope = json.loads(self.raw)
            content_type = envelope.get("content-type")
            if content_type != "application/json":
                raise Undecodable(f"content type {content_type!r} refused: JSON only, never pickle")
            body = envelope["body"]
            if envelope.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            return json.loads(body), envelope.get("headers") or {}
        except Undecodable:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise Undecodable(f"not a JSON message: {type(exc).__name__}") from None


class Inbox:
    """Fetch, ack and requeue request messages on a Redis broker, atomically."""

    def __init__(self, client: redis.Redis, queues: tuple[str, ...], transport: dict[str, Any]):
        self.redis = client
        self.queues = queues
        self.unacked = transport.get("unacked_key", "unacked")
        self.index = transport.get("unacked_index_key", "unacked_index")
        self._fetch = client.register_script(FETCH)

    def fetch(self, n: int) -> list[Delivery]:
        """Up to ``n`` messages, queues in priority order; each is unacked until acked."""
        if n <= 0:
            return []
        flat = self._fetch(keys=[*self.queues, self.unacked, self.index], args=[n, time.time()])
        return [Delivery(tag.decode(), raw, queue.decode())
                for tag, raw, queue in zip(flat[0::3], flat[1::3], flat[2::3], strict=True)]

    def ack(self, deliveries: list[Delivery]) -> None:
        """Forget these messages (their results are stored)."""
        tags = [d.tag for d in deliveries if d.tag]
        if tags:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrem(self.index, *tags)
            pipe.hdel(self.unacked, *tags)
            pipe.execute()

    def requeue(self, deliveries: list[Delivery]) -> None:
        """Put unstarted messages back at the head of their queues (warm shutdown)."""
        if not deliveries:
            return
        pipe = self.redis.pipeline(transaction=True)
        for d in deliveries:
            pipe.rpush(d.queue, d.raw)
            pipe.zrem(self.index, d.tag)
            pipe.hdel(self.unacked, d.tag)
        pipe.execute()

    def renew(self, deliveries: list[Delivery]) -> None:
        """Renew the visibility lease of messages still held (XX: only if still unacked)."""
        tags = [d.tag for d in deliveries if d.tag]
        if tags:
            self.redis.zadd(self.index, dict.fromkeys(tags, time.time()), xx=True)
