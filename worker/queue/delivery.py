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

from worker.queue.app import (
    BULK_BELL,
    BULK_QUEUE,
    INTERACTIVE_QUEUE,
    logical_queue,
    request_lists,
)

BULK_TURN_KEY = "genq:bulk:turn"  # whose turn it is among the bulk lists

# KEYS: the unacked hash and its index, the workers' heartbeat hash, the bulk turn counter, the
# bulk bell, then the interactive lists, then the bulk lists. ARGV: now, how many this worker
# holds, how many interactive lists, how many it wants of each priority, the adapters it serves
# (JSON list), then one weight per bulk list.
# A worker takes at most its share of everything not finished, ceil((queued + held by every
# worker) / live workers) minus what it holds (at least one when it holds none), so a small job
# spreads across workers. Live workers are the fresh heartbeats; held messages are kombu's
# unacked index. Interactive lists are read in order; bulk lists in weighted turns (a list of
# weight w gets w turns in a round; the turn counter survives between calls), so one owner's
# backlog never holds another owner's job up. A message for an adapter this worker lacks but a
# live worker serves is left in place (in order) for that worker. Returns the number of messages
# left per priority, then tag, raw, list triples; a message that is not a kombu envelope comes
# back with an empty tag and is not recorded (it is rejected).
FETCH = """
local now, mine, ninter = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local want_inter, want_bulk = tonumber(ARGV[4]), tonumber(ARGV[5])
local unacked, index, workers, turn, bell = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local first, nlists = 6, #KEYS - 5
local served = {}
for _, a in ipairs(cjson.decode(ARGV[6])) do served[a] = true end
local live, elsewhere = 0, {}
local beats = redis.call('HGETALL', workers)
for i = 2, #beats, 2 do
  local ok, w = pcall(cjson.decode, beats[i])
  if ok and type(w) == 'table' and tonumber(w['at']) and
     now - tonumber(w['at']) < (tonumber(w['ttl']) or 15) then
    live = live + 1
    if type(w['adapters']) == 'table' then
      for _, a in ipairs(w['adapters']) do elsewhere[a] = true end
    end
  end
end
local total, lens = redis.call('ZCARD', index), {}
for i = 0, nlists - 1 do
  lens[i] = redis.call('LLEN', KEYS[first + i])
  total = total + lens[i]
end
local budget = math.ceil(total / math.max(live, 1)) - mine
if mine == 0 and budget < 1 then budget = 1 end
local out, taken = {}, 0
local function take(key)
  local passed = {}
  local got = false
  while not got do
    local raw = redis.call('RPOP', key)
    if not raw then break end
    local ok, msg = pcall(cjson.decode, raw)
    local tag, info, adapter = nil, nil, nil
    if ok and type(msg) == 'table' and type(msg['properties']) == 'table' then
      tag = msg['properties']['delivery_tag']
      info = msg['properties']['delivery_info']
      if type(msg['headers']) == 'table' then adapter = msg['headers']['genq_adapter'] end
    end
    if type(adapter) == 'string' and not served[adapter] and elsewhere[adapter]
       and #passed < 64 then
      table.insert(passed, raw)
    else
      if type(tag) == 'string' and type(info) == 'table' then
        local ex, rk = info['exchange'] or key, info['routing_key'] or key
        redis.call('HSET', unacked, tag,
                   '[' .. raw .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
        redis.call('ZADD', index, now, tag)
      else
        tag = ''
      end
      table.insert(out, tag)
      table.insert(out, raw)
      table.insert(out, key)
      taken = taken + 1
      got = true
    end
  end
  for j = #passed, 1, -1 do redis.call('RPUSH', key, passed[j]) end
  return got
end
local n = math.min(want_inter, budget)
for i = 0, ninter - 1 do
  while n > 0 and take(KEYS[first + i]) do n = n - 1; budget = budget - 1 end
end
n = math.min(want_bulk, budget)
if want_bulk > 0 then redis.call('DEL', bell) end
local turns, taken_inter = {}, taken
for i = ninter, nlists - 1 do
  if lens[i] > 0 then
    for _ = 1, math.max(1, tonumber(ARGV[7 + i - ninter]) or 1) do
      table.insert(turns, KEYS[first + i])
    end
  end
end
local at = 0
if n > 0 and #turns > 0 then at = tonumber(redis.call('GET', turn) or '0') or 0 end
local misses, empty, start = 0, {}, at
while n > 0 and #turns > 0 and misses < #turns do
  local key = turns[at % #turns + 1]
  at = at + 1
  if not empty[key] and take(key) then
    n = n - 1; budget = budget - 1; misses = 0
  else
    empty[key] = true; misses = misses + 1
  end
end
if at ~= start then redis.call('SET', turn, at) end
local left_inter, left_bulk = -taken_inter, -(taken - taken_inter)
for i = 0, nlists - 1 do
  if i < ninter then left_inter = left_inter + lens[i] else left_bulk = left_bulk + lens[i] end
end
local res = {left_inter, left_bulk}
for _, v in ipairs(out) do table.insert(res, v) end
return res
"""
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
        self.unacked = transport.get("unacked_key", "unacked")
        self.index = transport.get("unacked_index_key", "unacked_index")
        self.workers_key = workers_key
        self.adapters = json.dumps(sorted(adapters or []))
        self._fetch = client.register_script(FETCH)

    def fetch(self, want: dict[str, int], held: int = 0) -> tuple[list[Delivery], dict[str, int]]:
        """Up to ``want[queue]`` messages of each priority (``genq.interactive``,
        ``genq.bulk``: every list of that priority), interactive first, within the share of a
        worker that holds ``held`` messages, each unacked until acked; and how many messages
        of each priority are still queued."""
        interactive, bulk, weights = request_lists(self.redis)
        args = [time.time(), held, len(interactive), max(0, want.get(INTERACTIVE_QUEUE, 0)),
                max(0, want.get(BULK_QUEUE, 0)), self.adapters, *weights]
        flat = self._fetch(keys=[self.unacked, self.index, self.workers_key, BULK_TURN_KEY,
                                 BULK_BELL, *interactive, *bulk], args=args)
        left = {INTERACTIVE_QUEUE: int(flat[0]), BULK_QUEUE: int(flat[1])}
        flat = flat[2:]
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
