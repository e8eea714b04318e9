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
    assert client.as_owner("another-tenant").submit(
        prompt="same", max_new_tokens=4, idempotency_key="k-1") != ids[0]


@pytest.mark.slow
def test_bulk_resubmission_generates_nothing_twice(client, start_worker, redis_url):
    r = redis.Redis.from_url(redis_url)
    reqs = [{"prompt": f"line {i}", "max_new_tokens": 4, "idempotency_key": f"run-1:{i}"}
            for i in range(12)]
    first = client.submit_many(reqs[:8])
    second = client.submit_many(reqs)  # 8 repeats and 4 new lines
    assert r.llen("genq.bulk") == 12
    ids1 = [x["id"] for x in client.job_results(first)]
    ids2 = [x["id"] for x in client.job_results(second)]
    assert ids2[:8] == ids1 and not set(ids2[8:]) & set(ids1)
    start_worker()
    assert client.wait_job(first, timeout=120)["counts"]["succeeded"] == 8
    assert client.wait_job(second, timeout=120)["counts"]["succeeded"] == 12
    third = client.submit_many(reqs)  # everything finished before: nothing to run
    assert r.llen("genq.bulk") == 0
    done = client.job(third)
    assert done["status"] == "completed" and done["counts"]["succeeded"] == 12
    assert [x["text"] for x in client.job_results(third)] == [
        x["text"] for x in client.job_results(second)]
    with pytest.raises(IdempotencyConflict):
        client.submit_many([{**reqs[0], "prompt": "changed"}])
