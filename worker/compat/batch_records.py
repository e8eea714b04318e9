"""OpenAI batches' records in the result Redis.

A batch is ``genq:batch:<id>`` (JSON: OpenAI's batch object plus genqueue's bookkeeping),
listed newest first from the sorted sets ``genq:batches`` (every batch) and
``genq:batches:by:<owner>`` (and, until the sweep sees them leave ``validating``,
``genq:batches:validating``); all expire after ``GENQ_RESULT_TTL_S``. An ``Idempotency-Key``
claim is ``genq:batch-idem:<scope>``, saved in the same transaction as the batch it made.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from redis.exceptions import WatchError

from worker.errors import IdempotencyConflict, NotFound

FIELDS = ("id", "object", "endpoint", "model", "errors", "input_file_id", "completion_window",
          "status", "output_file_id", "error_file_id", "created_at", "in_progress_at",
          "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
          "cancelling_at", "cancelled_at", "request_counts", "metadata", "usage")


def batch_key(batch_id: str) -> str:
    """The Redis key of a batch's record."""
    return f"genq:batch:{batch_id}"


def index_key(owner: str | None) -> str:
    """The sorted set listing ``owner``'s batches (every batch for None)."""
    return f"genq:batches:by:{owner}" if owner else "genq:batches"


VALIDATING_KEY = "genq:batches:validating"  # batches saved validating (swept, see ``Batches``)


def public(record: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI batch object (drops internal bookkeeping)."""
    return {k: record.get(k) for k in FIELDS}


class BatchRecords:
    """Batch records in Redis: load (as the caller sees them), save, update, page through."""

    def __init__(self, redis, ttl: int):
        self.redis, self.ttl = redis, ttl

    def _visible(self, view, record: dict[str, Any]) -> bool:
        return view.owner is None or view.admin or record.get("owner") == view.owner

    def load(self, view, batch_id: str) -> dict[str, Any]:
        """The batch as ``view`` (the caller's client) may see it; ``NotFound`` otherwise."""
        raw = self.redis.get(batch_key(batch_id)) if len(batch_id) <= 128 else None
        record = json.loads(raw) if raw else None
        if record is None or not self._visible(view, record):
            raise NotFound(f"No batch found with id '{batch_id[:128]}'.")
        return record

    def load_any(self, batch_id: str) -> dict[str, Any]:
        """The batch, whoever's it is; ``NotFound`` when there is none."""
        raw = self.redis.get(batch_key(batch_id))
        if raw is None:
            raise NotFound(f"No batch found with id '{batch_id}'.")
        return json.loads(raw)

    def save_new(self, record: dict[str, Any], idem: str | None = None,
                 fingerprint: str = "") -> dict[str, Any]:
        """Save a new batch, indexed; with an idempotency key (``idem``) used before, save
        nothing and return the batch it made (``IdempotencyConflict`` if that one was asked
        with other arguments). Claim and save are one transaction."""
        score = record["created_ns"] / 1e9
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    if idem:
                        pipe.watch(idem)
                        claim = json.loads(pipe.get(idem) or "null")
                        raw = pipe.get(batch_key(claim["id"])) if claim else None
                        if raw is not None:
                            if claim["fp"] != fingerprint:
                                raise IdempotencyConflict(
                                    "Idempotency-Key: used before with other arguments")
                            return json.loads(raw)
                    pipe.multi()
                    if idem:
                        pipe.set(idem, json.dumps({"id": record["id"], "fp": fingerprint}),
                                 ex=self.ttl)
                    pipe.set(batch_key(record["id"]), json.dumps(record), ex=self.ttl)
                    for key in {index_key(None), index_key(record.get("owner")), VALIDATING_KEY}:
                        pipe.zadd(key, {record["id"]: score})
                        pipe.expire(key, self.ttl)
                    pipe.execute()
                    return record
                except WatchError:
                    continue

    def update(self, batch_id: str, change: Callable[[dict], dict | None],
               also: Callable[[Any, dict], None] | None = None) -> dict[str, Any]:
        """Apply ``change`` to the stored record atomically (optimistic: WATCH and retry);
        ``change`` returns the new record, or None to leave it; ``also(pipe, new)`` queues
        more writes in the same transaction when it changes. The record as stored."""
        key = batch_key(batch_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise NotFound(f"No batch found with id '{batch_id}'.")
                    current = json.loads(raw)
                    new = change(current)
                    if new is None:
                        pipe.unwatch()
                        return current
                    pipe.multi()
                    pipe.set(key, json.dumps(new), keepttl=True)
                    if also is not None:
                        also(pipe, new)
                    pipe.execute()
                    return new
                except WatchError:
                    continue

    def page(self, view, after: str | None, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` + 1 of the caller's records, newest first, after the batch ``after``
        (none when ``after`` is not listed); index entries whose records expired are dropped."""
        key = index_key(None if view.owner is None or view.admin else view.owner)
        start = 0
        if after:
            rank = self.redis.zrevrank(key, after)
            if rank is None:
                return []
            start = rank + 1
        found: list[dict[str, Any]] = []
        while len(found) <= limit:
            ids = self.redis.zrevrange(key, start, start + limit)
            if not ids:
                break
            start += len(ids)
            raws = self.redis.mget([batch_key(i) for i in ids])
            gone = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
            if gone:
                self.redis.zrem(key, *gone)
                start -= len(gone)
            found += [json.loads(raw) for raw in raws if raw is not None]
        return found
