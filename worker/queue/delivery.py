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
    logical_queue,
    pins_key,
    request_lists,
)

BULK_TURN_KEY = "genq:bulk:turn"  # whose turn it is among the bulk lists

# KEYS: the unacked hash and its index, the workers' heartbeat hash, the bulk turn counter, the
# bulk bell, the owners' lists hash, the set-aside counts, then the interactive lists, then the
# bulk lists. ARGV: now, how many this worker holds, how many interactive lists, how many it
# wants of each priority, the adapters it serves (JSON list), then one weight per bulk list.
# A worker takes at most its share of everything not finished, ceil((queued + held by every
# worker) / live workers) minus what it holds (at least one when it holds none), so a small job
# spreads across workers. Live workers are the fresh heartbeats; held messages are kombu's
# unacked index. Interactive lists are read in order; bulk lists in weighted turns (a list of
# weight w gets w turns in a round; the turn counter survives between calls), so one owner's
# backlog never holds another owner's job up. A message for an adapter this worker does not
# serve is never taken: it is moved once (at most 1000 a call) to ``<list>\x06\x17<adapter>``
# and counted in PARKED_KEY; a worker serving that adapter reads that list first in the turn of
# ``<list>`` (it holds older messages), so priority and owner turns hold, and the message goes
# back to ``<list>`` when kombu restores it. An owner's list is dropped from the owners' hash
# when it is empty and nothing pins it (``app.pins_key``: its messages held or set aside, and
# publishes in flight). Set-aside lists and pins are named in the script, not in KEYS (Redis
# Cluster is not supported). Returns the number of messages left per priority (set aside included),
# then tag, raw, list triples; a message that is not a kombu envelope comes back with an empty
# tag and is not recorded (it is rejected).
FETCH = """
local now, mine, ninter = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local want_inter, want_bulk = tonumber(ARGV[4]), tonumber(ARGV[5])
local unacked, index, workers, turn, bell, owners, parked =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local first, nlists = 8, #KEYS - 7
local served, serves = cjson.decode(ARGV[6]), {}
for _, a in ipairs(served) do serves[a] = true end
local function aside(key, a) return key .. '\\6\\23' .. a end
local function pins(key)
  if string.sub(key, 1, 10) == 'genq.bulk.' then return 'genq:pins:' .. key end
end
local live = 0
local beats = redis.call('HGETALL', workers)
for i = 2, #beats, 2 do
  local ok, w = pcall(cjson.decode, beats[i])
  if ok and type(w) == 'table' and tonumber(w['at']) and
     now - tonumber(w['at']) < (tonumber(w['ttl']) or 15) then
    live = live + 1
  end
end
local counts = redis.call('HMGET', parked, 'interactive', 'bulk')
local queued = {tonumber(counts[1]) or 0, tonumber(counts[2]) or 0}
local lens, ready = {}, {}
for i = 0, nlists - 1 do
  local key = KEYS[first + i]
  lens[i] = redis.call('LLEN', key)
  ready[i] = lens[i]
  for _, a in ipairs(served) do ready[i] = ready[i] + redis.call('LLEN', aside(key, a)) end
  local p = i < ninter and 1 or 2
  queued[p] = queued[p] + lens[i]
end
local total = redis.call('ZCARD', index) + queued[1] + queued[2]
local budget = math.ceil(total / math.max(live, 1)) - mine
if mine == 0 and budget < 1 then budget = 1 end
local out, taken, moves = {}, 0, 1000
local function envelope(raw)
  local ok, msg = pcall(cjson.decode, raw)
  if ok and type(msg) == 'table' and type(msg['properties']) == 'table' then
    local tag, info = msg['properties']['delivery_tag'], msg['properties']['delivery_info']
    if type(tag) == 'string' and type(info) == 'table' then
      local headers = type(msg['headers']) == 'table' and msg['headers'] or {}
      return tag, info, headers['genq_adapter']
    end
  end
end
local function hold(key, raw, tag, info)
  if tag then
    local ex, rk = info['exchange'] or key, info['routing_key'] or key
    redis.call('HSET', unacked, tag,
               '[' .. raw .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
    redis.call('ZADD', index, now, tag)
    if pins(key) then redis.call('SADD', pins(key), tag) end
  end
  table.insert(out, tag or '')
  table.insert(out, raw)
  table.insert(out, key)
  taken = taken + 1
  return true
end
local function take(key, priority)
  for _, a in ipairs(served) do
    local raw = redis.call('RPOP', aside(key, a))
    if raw then
      redis.call('HINCRBY', parked, priority, -1)
      local tag, info = envelope(raw)
      return hold(key, raw, tag, info)
    end
  end
  while moves > 0 do
    local raw = redis.call('RPOP', key)
    if not raw then return false end
    local tag, info, adapter = envelope(raw)
    if not (tag and type(adapter) == 'string' and not serves[adapter]) then
      return hold(key, raw, tag, info)
    end
    redis.call('LPUSH', aside(key, adapter), raw)
    redis.call('HINCRBY', parked, priority, 1)
    if pins(key) then redis.call('SADD', pins(key), tag) end
    moves = moves - 1
  end
  return false
end
local n = math.min(want_inter, budget)
for i = 0, ninter - 1 do
  while n > 0 and take(KEYS[first + i], 'interactive') do n = n - 1; budget = budget - 1 end
end
n = math.min(want_bulk, budget)
if want_bulk > 0 then redis.call('DEL', bell) end
local turns, taken_inter = {}, taken
for i = ninter, nlists - 1 do
  if ready[i] > 0 then
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
  if not empty[key] and take(key, 'bulk') then
    n = n - 1; budget = budget - 1; misses = 0
  else
    empty[key] = true; misses = misses + 1
  end
end
if at ~= start then redis.call('SET', turn, at) end
for i = ninter, nlists - 1 do
  local key = KEYS[first + i]
  if pins(key) and redis.call('LLEN', key) == 0 and redis.call('SCARD', pins(key)) == 0 then
    redis.call('HDEL', owners, key)
  end
end
local res = {queued[1] - taken_inter, queued[2] - (taken - taken_inter)}
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
