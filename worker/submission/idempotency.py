"""Idempotency keys: a request repeated with the same ``idempotency_key`` (scoped by owner)
resolves to the first one's id and generates nothing; the same key with another body is a
conflict. Claims are one ``SET NX`` each, so racing submitters settle on one request."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from worker.errors import IdempotencyConflict


def key(owner: str | None, request: dict[str, Any]) -> str:
    """The Redis key of a request's ``idempotency_key`` for ``owner``."""
    scope = hashlib.sha256((owner or "").encode()).hexdigest()[:16]
    return f"genq:idem:{scope}:{request['idempotency_key']}"


def fingerprint(request: dict[str, Any]) -> str:
    """What makes two requests with one ``idempotency_key`` the same request (its priority
    only says how soon it runs)."""
    body = {k: v for k, v in request.items() if k not in ("idempotency_key", "priority")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def claim(redis, owner: str | None, items: list[tuple[str, dict]], ttl_s: int
          ) -> list[str | None]:
    """Claim each request's key (pipelined): per item the id of an earlier twin, or None
    where this id now owns the key (or there is no key). A claim replayed after a lost reply
    finds its own id there: still None. ``IdempotencyConflict`` when a key was used with
    another body."""
    keyed = [(i, rid, req) for i, (rid, req) in enumerate(items) if req.get("idempotency_key")]
    earlier: list[str | None] = [None] * len(items)
    if not keyed:
        return earlier
    prints = [fingerprint(req) for _, _, req in keyed]
    pipe = redis.pipeline(transaction=False)
    for (_, rid, req), fp in zip(keyed, prints, strict=True):
        pipe.set(key(owner, req), json.dumps({"id": rid, "fp": fp}), nx=True, ex=ttl_s)
    lost = [(k, fp) for k, fp, won in zip(keyed, prints, pipe.execute(), strict=True) if not won]
    if lost:
        values = redis.mget([key(owner, req) for (_, _, req), _ in lost])
        for ((i, rid, req), fp), raw in zip(lost, values, strict=True):
            twin = json.loads(raw) if raw else None
            if twin is None or twin["id"] == rid:  # expired meanwhile, or our own SET replayed
                continue
            if twin["fp"] != fp:
                raise IdempotencyConflict(f"idempotency_key {req['idempotency_key']!r} "
                                          "was used with another request")
            earlier[i] = twin["id"]
    return earlier


def conflicts(redis, owner: str | None, keyed: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """For ``(where, request)`` pairs: where a request's key was used before with another body."""
    if not keyed:
        return []
    values = redis.mget([key(owner, req) for _, req in keyed])
    return [f"{where}: idempotency_key {req['idempotency_key']!r} was used with another "
            "request" for (where, req), raw in zip(keyed, values, strict=True)
            if raw and json.loads(raw)["fp"] != fingerprint(req)]


def release(redis, owner: str | None, requests: list[dict[str, Any]]) -> None:
    """Give back the keys of requests that were not queued after all."""
    keys = [key(owner, r) for r in requests if r.get("idempotency_key")]
    if keys:
        redis.delete(*keys)
