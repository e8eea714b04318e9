"""Taking request messages off the Redis lists with no window in which one can be lost.

kombu's Redis transport pops a message with BRPOP and records it as unacked in a second round
trip; a worker killed, or a Redis stopped, between the two loses the message for good (kombu
issue #305; our SIGKILL and Redis-restart tests lost 1 request in 300-500 this way). Here one
Lua script pops messages and records them in kombu's own unacked hash and index, in the format
kombu writes, so kombu's visibility-timeout restore (run by the Celery worker's consumer) still
brings back a dead worker's messages, and an ack is kombu's ack. ``tests/test_delivery.py``
pins that format against the installed kombu.

An idle worker does not poll: ``Doorbell`` blocks on ``BLMOVE q q RIGHT RIGHT`` (pop the
oldest message and push it straight back: the list is unchanged) until a message arrives, one
call every few seconds per queue while nothing does (Redis 6.2 or newer).
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any

import redis

# KEYS: request queues in priority order, the unacked hash and its index, the workers' heartbeat
# hash. ARGV: now, how many this worker holds, then how many it wants from each queue.
# A worker takes at most its share of everything not finished, ceil((queued + held by every
# worker) / live workers) minus what it holds (at least one when it holds none), so a small job
# spreads across workers. Live workers are the fresh heartbeats; held messages are kombu's
# unacked index. Returns the length of each queue left, then tag, raw, queue triples; a message
# that is not a kombu envelope comes back with an empty tag and is not recorded (it is rejected).
FETCH = """
local now, mine = tonumber(ARGV[1]), tonumber(ARGV[2])
local nq = #KEYS - 3
local unacked, index, workers = KEYS[nq + 1], KEYS[nq + 2], KEYS[nq + 3]
local live = 0
local beats = redis.call('HGETALL', workers)
for i = 2, #beats, 2 do
  local ok, w = pcall(cjson.decode, beats[i])
  if ok and type(w) == 'table' and tonumber(w['at']) and
     now - tonumber(w['at']) < (tonumber(w['ttl']) or 15) then live = live + 1 end
end
local total = redis.call('ZCARD', index)
for i = 1, nq do total = total + redis.call('LLEN', KEYS[i]) end
local budget = math.ceil(total / math.max(live, 1)) - mine
if mine == 0 and budget < 1 then budget = 1 end
local out = {}
for i = 1, nq do
  local n = math.min(tonumber(ARGV[2 + i]), budget)
  local taken = 0
  while taken < n do
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
    taken = taken + 1
  end
  budget = budget - taken
end
local left = {}
for i = 1, nq do table.insert(left, redis.call('LLEN', KEYS[i])) end
for _, v in ipairs(out) do table.insert(left, v) end
return left
"""
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class Undecodable(ValueError):
    """A message that is not a JSON Celery message (pickle included): never executed."""


@dataclass(frozen=True)
class Delivery:
    """One message taken off a queue and held unacked."""

    tag: str
    raw: bytes
    queue: str

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

    def __init__(self, client: redis.Redis, queues: tuple[str, ...], transport: dict[str, Any],
                 workers_key: str = "genq:workers"):
        self.redis = client
        self.queues = queues
        self.unacked = transport.get("unacked_key", "unacked")
        self.index = transport.get("unacked_index_key", "unacked_index")
        self.workers_key = workers_key
        self._fetch = client.register_script(FETCH)

    def fetch(self, want: dict[str, int], held: int = 0) -> tuple[list[Delivery], dict[str, int]]:
        """Up to ``want[queue]`` messages from each queue, in priority order, within the share
        of a worker that holds ``held`` messages, each unacked until acked; and how many
        messages each queue still holds."""
        args = [time.time(), held, *(max(0, want.get(q, 0)) for q in self.queues)]
        flat = self._fetch(keys=[*self.queues, self.unacked, self.index, self.workers_key],
                           args=args)
        left = dict(zip(self.queues, (int(x) for x in flat[:len(self.queues)]), strict=True))
        flat = flat[len(self.queues):]
        return [Delivery(tag.decode(), raw, queue.decode())
                for tag, raw, queue in zip(flat[0::3], flat[1::3], flat[2::3], strict=True)], left

    def ack(self, deliveries: list[Delivery], pipe=None) -> None:
        """Forget these messages (their results are stored). With ``pipe``: queued on it."""
        tags = [d.tag for d in deliveries if d.tag]
        if tags:
            own = pipe is None
            pipe = pipe if pipe is not None else self.redis.pipeline(transaction=False)
            pipe.zrem(self.index, *tags)
            pipe.hdel(self.unacked, *tags)
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
