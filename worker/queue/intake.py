"""The intake: a message from any Celery producer gets what genqueue's client gives a request.

A producer that does not use ``GenerationClient`` sends task ``genq.generate`` to the intake
queue ``genq`` (``app.send_task("genq.generate", args=[request], queue="genq")``). Every
worker and the notifier run an intake thread; within about a second of the message being
published (about 5 s on the lists of Celery's ``priority=`` steps), whether or not a worker
has room, one of them does what ``submit`` does:
validation (``submission.Checker``, as ``GenerationClient.validate``: schema, limits,
adapters, webhook URL, prompt length), ``GENQ_MAX_PENDING``, the ``idempotency_key``
(``worker.submission.idempotency``), the ``queued`` record (with the deadline of the request
or of Celery's ``expires``), then the
message goes on ``genq.interactive`` or ``genq.bulk`` (its ``priority``) marked as submitted.
A message it refuses ends ``failed`` at once (``invalid_request``, ``queue_full``,
``idempotency_conflict``), its errbacks sent and its chain marked, and is never run. A repeat
of an idempotency key with the same body is not run either: it reads ``queued`` until the
first request ends, then holds a copy of the first's result under its own id.

Crash safety: a consumer moves messages (LMOVE) into a processing list of its own and works
from that list. A message's outcome is stored first (a failure: first final state wins; a
queued record, with a repeat's twin entry in the same MULTI), then ``lua/intake_commit.lua``
removes it from the list and, only if it was still there, publishes it. A message found in a
list again is judged by what was stored: a queued record publishes it, a twin entry or any other
record (final, or running: published already) drops it. A consumer that stops beating
(``genq:intake:alive:<name>``, 10 s) has its list moved back onto the intake queue by a live one
(``lua/intake_recover.lua``); should it wake up after all, its commit finds its list empty and
publishes nothing, and its records are written only where none exists.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import structlog

from worker.errors import IdempotencyConflict, InvalidRequest
from worker.lifecycle import FINAL
from worker.ops.redisconn import connect
from worker.ops.settings import Settings
from worker.overview import note_failures
from worker.queue.app import PRIORITY_STEPS, TASK_NAME, pending_by_queue, queue_for
from worker.queue.canvas import Follower
from worker.queue.delivery import Delivery, Undecodable
from worker.queue.messages import Envelope, MalformedMessage, headers_for, parse
from worker.queue.results import result_key
from worker.queue.scripts import register
from worker.queue.tasklog import TaskEvents
from worker.schema import result_record
from worker.submission import idempotency
from worker.submission.checker import Checker

log = structlog.get_logger(__name__)

INTAKE_QUEUE = "genq"  # where a foreign producer sends requests
INTAKE_LISTS = (INTAKE_QUEUE, *(INTAKE_QUEUE + s for s in PRIORITY_STEPS))  # + Celery priority=
CONSUMERS_KEY = "genq:intake:consumers"  # set: intake consumers that may hold messages
TWINS_KEY = "genq:intake:twins"  # hash: repeat's id -> {"first": id, "canvas": ...} (JSON)
ALIVE_TTL_S = 10  # a consumer silent this long has its messages given back
BEAT_S = 5.0  # how often a consumer says it is alive (ALIVE_TTL_S is twice that)
RECOVER_S = 10.0  # how often it looks for dead consumers' lists
LIST_S = 60.0  # how often it (re)joins the consumers set and looks for others' waiting twins
# an idle consumer waits this long on ``genq`` (a message there wakes it at once) before it
# looks at the priority-step lists again
IDLE_WAIT_S = 5.0
BATCH = 100  # messages taken per pass


def processing_key(name: str) -> str:
    return f"genq:intake:processing:{name}"


def alive_key(name: str) -> str:
    return f"genq:intake:alive:{name}"


class Intake:
    """One intake consumer (a thread of a worker or of the notifier)."""

    def __init__(self, settings: Settings, name: str):
        from worker.client import GenerationClient  # the client's own rules, no model library

        self.settings = settings
        self.name = f"{name}/{uuid.uuid4().hex[:8]}"
        self.client = GenerationClient(settings=settings)
        self.store = self.client.store
        self.broker = connect(settings.broker_url.get_secret_value(), settings,
                              retry_on_timeout=True)  # every write below is idempotent
        self.processing = processing_key(self.name)
        self.follower = Follower(settings)
        self._recover = register(self.broker, "intake_recover")
        self._commit = register(self.broker, "intake_commit")
        self._take = register(self.broker, "intake_take")
        self._recovered_at = self._beat_at = self._listed_at = float("-inf")
        self._twins = False  # repeats wait for their first request
        self.events = TaskEvents(self.follower.app, self.name)  # what Flower lists

    def run(self, stop: threading.Event) -> None:
        """Until ``stop``: take and settle messages; wait on the intake queue when idle."""
        while not stop.is_set():
            try:
                if not self.step():
                    self.broker.blmove(INTAKE_QUEUE, INTAKE_QUEUE, IDLE_WAIT_S, "RIGHT", "RIGHT")
            except Exception as exc:  # noqa: BLE001 - Redis down, a bad canvas: retry, never die
                log.warning("intake_retry", consumer=self.name, error=repr(exc)[:300])
                stop.wait(1.0)

    def step(self) -> int:
        """One pass: beat (every ``BEAT_S``), give back dead consumers' lists (every
        ``RECOVER_S``), take up to ``BATCH`` messages and settle all in this consumer's list,
        resolve twins (when some wait); how many were settled. An idle pass is one script."""
        now = time.monotonic()
        if now - self._recovered_at > RECOVER_S:
            self._recovered_at = now
            moved = self._recover(keys=[CONSUMERS_KEY, INTAKE_QUEUE])
            if moved:
                log.warning("intake_recovered", consumer=self.name, messages=moved)
        if now - self._beat_at > BEAT_S:
            self._beat_at = now
            self.broker.set(alive_key(self.name), 1, ex=ALIVE_TTL_S)
        if now - self._listed_at > LIST_S:  # say it may hold messages; twins left by others
            self._listed_at = now
            pipe = self.broker.pipeline(transaction=False)
            pipe.sadd(CONSUMERS_KEY, self.name)
            pipe.hlen(TWINS_KEY)
            self._twins = pipe.execute()[1] > 0
        # oldest first; what an earlier pass took and left (a lost reply, a crash) included
        raws = self._take(keys=[self.processing, *INTAKE_LISTS], args=[BATCH])[::-1]
        if raws:
            self._settle(raws)
        if raws or self._twins:
            self._twins = self._resolve_twins()
        return len(raws)

    def _settle(self, raws: list[bytes]) -> None:
        """Decide each message, store the decisions, then publish or drop (one script)."""
        read = [_read(raw) for raw in raws]
        ids = [rid for rid, _, _ in read]
        pipe = self.store.redis.pipeline(transaction=False)
        for rid in ids:
            pipe.get(result_key(rid or "-"))
            pipe.hexists(TWINS_KEY, rid or "-")
        seen = pipe.execute()
        queued = self.store.redis.pipeline(transaction=True)  # records and twins: one MULTI
        pending: list[int] = []  # requests queued, counted once per pass
        failed: list[tuple[dict[str, Any], dict | None]] = []
        commit: list[Any] = []  # (message, target list or '', message to publish) each
        check = Checker(self.client)  # the fleet and the tokenizer read once a pass
        for i, (raw, (rid, envelope, error)) in enumerate(zip(raws, read, strict=True)):
            record, twin = seen[2 * i], seen[2 * i + 1]
            record = json.loads(record) if record else {}
            publish: float | None | bool = False  # False, or the deadline it is published with
            if rid is None or twin or record.get("status") not in (None, "queued"):
                pass  # nobody to answer, or settled before this replay
            elif record:
                publish = record.get("expires_at")  # recorded, not published from this list
            elif error is not None:
                failed.append(self._failure(rid, "invalid_request", error, envelope))
            else:
                code, why, deadline = self._admit(envelope, queued, pending, check)
                if code is not None:
                    failed.append(self._failure(rid, code, why, envelope))
                elif why == "queued":
                    publish = deadline
            if publish is False:
                commit += [raw, "", ""]
            else:
                commit += [raw, queue_for(envelope.request.get("priority")),
                           _marked(raw, envelope, publish)]
        if queued.command_stack:
            queued.execute()
        stored = self._store_failures(failed)
        self._commit(keys=[self.processing], args=commit)
        for (record, canvas), first in zip(failed, stored, strict=True):
            if first:
                self._refused_event(record)
            if first and canvas:
                self._follow(record, canvas)

    def _admit(self, envelope: Envelope, pipe, pending: list[int],
               check: Checker) -> tuple[str | None, str, float | None]:
        """What ``submit`` does for a new request, its writes queued on ``pipe``: (None,
        "queued" or "twin", its deadline), or (error code, why, None)."""
        try:
            data = check.check(envelope.request)
        except InvalidRequest as exc:
            return exc.code, exc.message, None
        if not pending:
            pending.append(sum(pending_by_queue(self.broker).values()))
        if pending[0] + 1 > self.settings.max_pending:
            return "queue_full", (f"{pending[0]} requests pending; adding 1 would pass "
                                  f"GENQ_MAX_PENDING={self.settings.max_pending}"), None
        try:
            earlier = idempotency.claim(self.store.redis, None, [(envelope.id, data)],
                                        self.settings.result_ttl_s)[0]
        except IdempotencyConflict as exc:
            return "idempotency_conflict", exc.message, None
        now = time.time()
        ends = [t for t in (envelope.expires_at,
                            now + data["expires_in_s"] if data.get("expires_in_s") else None) if t]
        deadline = min(ends) if ends else None
        if deadline is not None:  # the record keeps it: a reader expires the request at once
            data = {**data, "expires_in_s": max(deadline - now, 1e-6)}
        self.store.record_queued([(envelope.id, data)], pipe=pipe, only_new=True)
        if earlier is not None:  # the same request, sent again
            pipe.hset(TWINS_KEY, envelope.id, json.dumps({"first": earlier,
                                                          "canvas": envelope.canvas}))
            return None, "twin", None
        pending[0] += 1
        return None, "queued", deadline

    def _failure(self, rid: str, code: str, message: str,
                 envelope: Envelope | None) -> tuple[dict[str, Any], dict | None]:
        log.info("intake_refused", consumer=self.name, request_id=rid, code=code,
                 reason=message[:300])
        request = envelope.request if envelope is not None else None
        record = result_record(rid, "failed", request,
                               error={"code": code, "message": message})
        return record, envelope.canvas if envelope is not None else None

    def _store_failures(self, failed: list[tuple[dict[str, Any], dict | None]]) -> list[bool]:
        if not failed:
            return []
        records = [record for record, _ in failed]
        stored = self.store.finish(records)
        pipe = self.store.redis.pipeline(transaction=False)
        note_failures(pipe, records, self.store.ttl)
        pipe.execute()
        return stored

    def _refused_event(self, record: dict[str, Any]) -> None:
        """Task events for a refused request, as a worker sends them (Flower, ``celery
        events``); best effort, never raises."""
        err = record["error"]
        self.events.send("task-received", uuid=record["id"], name=TASK_NAME)
        self.events.send("task-failed", uuid=record["id"], traceback=None,
                         exception=f"GenerationFailed('{err['code']}: {err['message']}')")

    def _follow(self, record: dict[str, Any], canvas: dict[str, Any]) -> None:
        try:
            self.follower.follow(record, canvas, self.store.redis)
        except Exception as exc:  # noqa: BLE001 - at most once, as a worker's callbacks
            log.error("callback_failed", consumer=self.name, request_id=record["id"],
                      error=f"{type(exc).__name__}: {str(exc)[:300]}")

    def _resolve_twins(self) -> bool:
        """Repeats whose first request ended take a copy of its result (first write wins);
        whether some still wait."""
        twins = {rid: json.loads(v) for rid, v in self.store.redis.hgetall(TWINS_KEY).items()}
        if not twins:
            return False
        firsts = self.store.get_many([t["first"] for t in twins.values()])
        done = []
        for (rid, twin), first in zip(twins.items(), firsts, strict=True):
            if first is not None and first["status"] not in FINAL:
                continue
            record = ({**first, "id": rid, "job_id": None} if first is not None
                      else result_record(rid, "expired"))
            record.pop("expires_at", None)
            if self.store.finish([record])[0] and twin.get("canvas"):
                self._follow(record, twin["canvas"])
            done.append(rid)
        if done:
            self.store.redis.hdel(TWINS_KEY, *done)
        return len(done) < len(twins)


def _read(raw: bytes) -> tuple[str | None, Envelope | None, str | None]:
    """(request id, envelope, why it is refused) of a message as published."""
    try:
        body, headers = Delivery("", raw, INTAKE_QUEUE).decode()
    except Undecodable as exc:
        log.error("message_rejected", queue=INTAKE_QUEUE, reason=str(exc)[:300])
        return None, None, str(exc)
    try:
        return headers.get("id"), parse(body, headers), None
    except MalformedMessage as exc:
        envelope = Envelope(exc.request_id or "", {}, None, time.time(), None, canvas=exc.canvas)
        return exc.request_id, envelope, str(exc)
    except Exception as exc:  # noqa: BLE001 - e.g. a header of Infinity: this message alone fails
        rid = headers.get("id") if isinstance(headers.get("id"), str) else None
        return rid, Envelope(rid or "", {}, None, time.time(), None), \
            f"not a genqueue request message ({type(exc).__name__})"


def _marked(raw: bytes, envelope: Envelope, deadline: float | None) -> str:
    """The message as the client would have published it: genqueue's headers (submitted,
    deadline, adapter), routed to its priority's list (where kombu restores it)."""
    message = json.loads(raw)
    now, adapter = time.time(), envelope.request.get("adapter")
    expires = max(deadline - now, 1e-6) if deadline is not None else None
    message["headers"].update(headers_for(None, now, expires, adapter=adapter))
    target = queue_for(envelope.request.get("priority"))
    properties = message.get("properties") or {}  # kombu's restore reads where it went
    message["properties"] = {**properties,
                             "delivery_info": {"exchange": target, "routing_key": target}}
    return json.dumps(message)


def start_intake(settings: Settings, name: str) -> threading.Event:
    """Run an intake consumer on a daemon thread; set the returned event to stop it."""
    stop = threading.Event()
    intake = Intake(settings, name)
    threading.Thread(target=intake.run, args=(stop,), name="genq-intake", daemon=True).start()
    return stop
