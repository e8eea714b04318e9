"""Idempotent submission: racing duplicates get one id and one generation."""

from __future__ import annotations

import threading

import pytest
import redis

from worker.errors import IdempotencyConflict


def test_racing_submitters_get_one_request(client, redis_url):
    ids: list[str] = []
    barrier = threading.Barrier(8)

    def submit():
        barrier.wait()
        ids.append(client.submit(prompt="same", max_new_tokens=4, idempotency_key="k-1"))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 8 and len(set(ids)) == 1
    assert redis.Redis.from_url(redis_url).llen("genq.interactive") == 1  # queued once
    with pytest.raises(IdempotencyConflict):
        client.submit(prompt="different", max_new_tokens=4, idempotency_key="k-1")
    assert client.submit(prompt="same", max_new_tokens=4, idempotency_key="k-1",
                         idempotency_scope="another tenant") != ids[0]


def test_bulk_jobs_refuse_idempotency_keys_for_now(client):
    from worker.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="request 0: idempotency_key"):
        client.submit_many([{"prompt": "a", "idempotency_key": "x"}])
