"""Tenants on one Redis, through the Python client (no worker needed): ownership, quotas,
jobs that always finish, deadlines, strict JSON, and the fetch script's turns and routing."""

from __future__ import annotations

import json
import time

import pytest
import redis

from worker.errors import IdempotencyConflict, InvalidRequest, JobReaped, NotFound, QueueFull
from worker.ops.keys import KeyRing, key_id
from worker.ops.settings import Settings
from worker.queue.app import BULK_QUEUE, INTERACTIVE_QUEUE, transport_options
from worker.queue.delivery import Inbox
from worker.queue.rediskeys import OPEN_JOBS_KEY, job_key


def test_owners_see_only_their_own_and_admins_see_all(client):
    a, b = client.as_owner("team-a"), client.as_owner("team-b")
    admin = client.as_owner("ops", admin=True)
    rid = a.submit(prompt="mine", max_new_tokens=2)
    job = a.submit_many([{"prompt": "x", "max_new_tokens": 2}] * 3)
    assert a.get(rid)["status"] == "queued" and a.job(job)["counts"]["total"] == 3
    for call in (lambda: b.get(rid), lambda: b.cancel(rid), lambda: b.job(job),
                 lambda: list(b.job_results(job)), lambda: b.cancel_job(job)):
        with pytest.raises(NotFound):
            call()
    assert a.get(rid)["status"] == "queued"  # b's cancel did nothing
    assert admin.get(rid)["id"] == rid and admin.job(job)["id"] == job
    assert admin.cancel_job(job) == 3 and a.job(job)["status"] == "cancelled"
    assert client.get(rid)["id"] == rid  # no owner: one trusted backend sees everything


def test_idempotency_keys_are_per_owner(client):
    a, b = client.as_owner("team-a"), client.as_owner("team-b")
    first = a.submit(prompt="p", max_new_tokens=2, idempotency_key="k")
    assert a.submit(prompt="p", max_new_tokens=2, idempotency_key="k") == first
    assert b.submit(prompt="p", max_new_tokens=2, idempotency_key="k") != first
    with pytest.raises(NotFound):  # b's twin is b's own request, not a's
        b.get(first)


def test_key_ids_never_hold_the_key():
    assert key_id("team-a:s3cret") == ("team-a", "s3cret")
    ident, secret = key_id("s3cret-bare-key")
    assert secret == "s3cret-bare-key" and ident.startswith("key-") and "s3cret" not in ident
    ring = KeyRing(Settings(api_keys="team-a:k1,bare-k2", admin_keys="root:k3",
                            raw_token_keys="team-a", key_weights="team-a=3"))
    assert ring.authenticate("Bearer k1") == ring.authenticate("bearer k1")  # one scope
    assert ring.authenticate("Bearer k1").weight == 3 and ring.authenticate("Bearer k1").raw_tokens
    assert ring.authenticate("Bearer k3").admin and not ring.authenticate("Bearer bare-k2").admin
    assert ring.authenticate("Bearer nope") is None and ring.authenticate("Basic k1") is None


def test_quota_per_key_is_all_or_nothing(redis_url):
    from worker.client import GenerationClient

    base = GenerationClient(settings=Settings(broker_url=redis_url, max_pending_per_key=5))
    a, b = base.as_owner("team-a"), base.as_owner("team-b")
    a.submit_many([{"prompt": "x", "max_new_tokens": 2}] * 4)
    r = redis.Redis.from_url(redis_url)
    before = r.llen(f"{BULK_QUEUE}.team-a")
    with pytest.raises(QueueFull, match="GENQ_MAX_PENDING_PER_KEY=5"):
        a.submit_many([{"prompt": "x", "max_new_tokens": 2}] * 2)
    assert r.llen(f"{BULK_QUEUE}.team-a") == before  # nothing half-queued
    last = a.submit(prompt="fits", max_new_tokens=2)
    with pytest.raises(QueueFull):
        a.submit(prompt="one too many", max_new_tokens=2)
    b.submit_many([{"prompt": "y", "max_new_tokens": 2}] * 5)  # another key: its own quota
    a.cancel(last)  # a final state gives the place back
    a.submit(prompt="fits again", max_new_tokens=2)


def test_duplicate_idempotency_keys_in_one_upload_are_refused_by_line(client):
    from worker.submission.lines import read_lines

    lines = [json.dumps({"prompt": f"p{i}", "idempotency_key": "same" if i in (1, 4) else f"k{i}"})
             for i in range(6)]
    with pytest.raises(InvalidRequest) as err:
        client.submit_stream(lambda: read_lines(lines))
    assert "line 5: idempotency_key 'same' is also on line 2" in err.value.message
    assert not redis.Redis.from_url(client.settings.broker_url.get_secret_value()).keys("genq:job:*")


def test_an_idempotency_conflict_is_found_before_anything_is_queued(client):
    client.submit(prompt="original", max_new_tokens=2, idempotency_key="k-500")
    r = redis.Redis.from_url(client.settings.broker_url.get_secret_value())
    queued = r.llen(INTERACTIVE_QUEUE) + r.llen(BULK_QUEUE)
    reqs = [{"prompt": f"p{i}", "max_new_tokens": 2, "idempotency_key": f"k-{i}"}
            for i in range(1000)]
    with pytest.raises(IdempotencyConflict, match="request 500: idempotency_key 'k-500'"):
        client.submit_many(reqs)
    assert r.llen(INTERACTIVE_QUEUE) + r.llen(BULK_QUEUE) == queued
    assert not r.keys("genq:job:*")  # no orphan job


def test_a_job_whose_submitter_died_is_reaped(client):
    """What a killed gateway leaves: a job created, part of its requests queued."""
    a = client.as_owner("team-a")
    store = a.store
    pipe = store.redis.pipeline(transaction=False)
    store.create_job("job-orphan", 10, pipe, owner="team-a")
    store.add_job_ids("job-orphan", ["r1", "r2"], pipe)
    store.record_queued([("r1", {"prompt": "a"}), ("r2", {"prompt": "b"})], job_id="job-orphan",
                        pipe=pipe, owner="team-a")
    pipe.execute()
    store.reserve("team-a", 10, None)
    assert a.job("job-orphan")["status"] == "validating"
    assert store.reap(stale_s=60) == []  # still fresh
    assert store.reap(stale_s=0) == ["job-orphan"] and store.reap(stale_s=0) == []
    job = a.job("job-orphan")
    assert job["status"] == "failed" and "submitter stopped" in job["error"]
    assert job["counts"] == {"total": 2, "queued": 0, "running": 0, "succeeded": 0, "failed": 0,
                             "cancelled": 2, "expired": 0}
    assert a.wait_job("job-orphan", timeout=1)["status"] == "failed"
    assert store.pending("team-a") == 0  # queued ones finished, the rest given back


def test_a_passed_deadline_reads_expired_at_once(client):
    rid = client.submit(prompt="late", max_new_tokens=2, expires_in_s=0.2)
    assert client.get(rid)["status"] == "queued"
    time.sleep(0.3)
    got = client.get(rid)
    assert got["status"] == "expired" and "expires_at" not in got
    job = client.submit_many([{"prompt": "x", "expires_in_s": 0.2}, {"prompt": "y"}])
    time.sleep(0.3)
    assert [r["status"] for r in client.job_results(job)] == ["expired", "queued"]
    assert client.job(job)["counts"]["expired"] == 1


@pytest.mark.parametrize("body, message", [
    ({"prompt": "x", "temperature": float("nan")}, "finite"),
    ({"prompt": "x", "top_p": float("inf")}, "finite"),
    ({"prompt": "x", "metadata": {"a": [float("nan")]}}, "NaN or Infinity"),
    ({"prompt": "x", "max_new_tokens": True}, "not a boolean"),
    ({"prompt": "x", "seed": False}, "not a boolean"),
    ({"prompt": "x" * 101}, "GENQ_MAX_PROMPT_CHARS"),
    ({"messages": [{"role": "user", "content": "x" * 60}] * 2}, "GENQ_MAX_PROMPT_CHARS"),
    ({"prompt": "x", "raw_special_tokens": True}, "may not send raw special tokens"),
    ({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
      "body": {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 2}}},
     "body.logit_bias"),
    ({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
      "body": {"messages": [{"role": "user", "content": "x"}], "n": 17}}, "^n: "),
    ({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
      "body": {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}},
     "top_logprobs needs logprobs"),
    ({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
      "body": {"messages": [{"role": "user", "content": "x"}], "response_format": {
          "type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "strng"}}}}},
     "response_format: .*Invalid type: strng"),
])
def test_strict_requests(redis_url, body, message):
    from worker.client import GenerationClient

    c = GenerationClient(settings=Settings(broker_url=redis_url, max_prompt_chars=100))
    with pytest.raises(InvalidRequest, match=message):
        c.as_owner("team-a").validate(body)
    assert c.validate({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"messages": [{"role": "user", "content": "x"}], "n": 1,
                                "logprobs": False}})


def test_strict_json_lines():
    from worker.submission.lines import read_lines

    lines = list(read_lines(['{"prompt": "x", "temperature": NaN}', '{"prompt": "y"}',
                             '{"prompt": "z", "metadata": {"v": Infinity}}']))
    assert [ln.error is not None for ln in lines] == [True, False, True]
    assert "NaN is not a JSON number" in lines[0].error


def _publish(client, owner, n, prefix):
    c = client.as_owner(owner) if owner else client
    return c.submit_many([{"prompt": f"{prefix}{i}", "max_new_tokens": 1} for i in range(n)])


def test_the_fetch_takes_owners_in_weighted_turns(client, redis_url):
    _publish(client, "big", 300, "b")
    _publish(client, "small", 10, "s")
    client.as_owner("heavy", weight=2).submit_many(
        [{"prompt": f"h{i}", "max_new_tokens": 1} for i in range(20)])
    inbox = Inbox(redis.Redis.from_url(redis_url), transport_options(client.settings))
    got = []
    for _ in range(8):  # a worker taking a few at a time, as its pool frees up
        deliveries, left = inbox.fetch({BULK_QUEUE: 4})
        got += [d.queue.rsplit(".", 1)[-1] for d in deliveries]
    first = got[:32]
    assert first.count("small") == 8 and first.count("heavy") == 16 and first.count("big") == 8
    assert left[BULK_QUEUE] == 330 - 32


def test_the_fetch_reads_celery_priority_lists_and_routes_adapters(client, redis_url):
    """A foreign producer's ``priority=`` lands where workers read; a request for an adapter
    another live worker serves is left for that worker, in order."""
    r = redis.Redis.from_url(redis_url)
    client.app.send_task("genq.generate", args=[{"prompt": "prio"}], queue=INTERACTIVE_QUEUE,
                         priority=5)
    assert r.llen(INTERACTIVE_QUEUE + "\x06\x163") == 1  # kombu's step for 5
    client.store.heartbeat("other@test", {"adapters": ["pirate"]})
    client.submit(prompt="for the pirate", adapter="pirate")
    plain = client.submit(prompt="plain")
    inbox = Inbox(r, transport_options(client.settings), adapters=[])
    deliveries, left = inbox.fetch({INTERACTIVE_QUEUE: 10}, held=0)
    ids = [json.loads(d.raw)["headers"]["id"] for d in deliveries]
    assert plain in ids and len(ids) == 2 and left[INTERACTIVE_QUEUE] == 1  # + the priority one
    pirate = Inbox(r, transport_options(client.settings), adapters=["pirate"])
    [mine], _ = pirate.fetch({INTERACTIVE_QUEUE: 10}, held=0)
    assert json.loads(mine.raw)["headers"]["genq_adapter"] == "pirate"


def test_unknown_adapters_and_limits_come_from_the_workers(client):
    client.store.heartbeat("w@test", {"adapters": ["pirate"], "max_new_tokens_limit": 64})
    with pytest.raises(InvalidRequest) as err:
        client.validate({"prompt": "x", "adapter": "secret-customer-adapter"})
    assert "pirate" not in err.value.message  # configured names are not shown to callers
    assert client.validate({"prompt": "x", "adapter": "pirate", "max_new_tokens": 64})
    with pytest.raises(InvalidRequest, match="above the limit 64"):
        client.validate({"prompt": "x", "max_new_tokens": 65})


def test_a_slow_submitter_whose_job_was_reaped_stops_and_the_job_ends(client, monkeypatch):
    """The reaper fails a job whose submitter looked dead, but the submitter was only slow:
    its next chunk finds the job reaped and writes nothing, and it raises; the job stays
    ``failed`` (never back to ``queued``), counts exactly what was queued, ``wait_job``
    returns, and the owner's quota counts exactly its other pending requests."""
    a = client.as_owner("team-slow")
    others = [a.submit(prompt=f"other {i}", max_new_tokens=2) for i in range(10)]
    publish, published = type(a)._publish, []

    def slow(self, items, job_id):  # the reaper runs between chunks 1 and 2
        publish(self, items, job_id)
        published.extend(rid for rid, _ in items)
        if len(published) == 2:
            self.store.reap(stale_s=0)

    monkeypatch.setattr(type(a), "_publish", slow)
    source = lambda: ({"prompt": f"slow {i}", "max_new_tokens": 2} for i in range(6))  # noqa: E731
    with pytest.raises(JobReaped, match="GENQ_JOB_SUBMIT_TIMEOUT_S") as caught:
        a.submit_stream(source, chunk=2)
    job_id = caught.value.job_id
    info = a.wait_job(job_id, timeout=5)
    assert info["status"] == "failed"
    assert info["counts"] == {"total": 2, "queued": 0, "running": 0, "succeeded": 0,
                              "failed": 0, "cancelled": 2, "expired": 0}
    assert [i for ids in a.store.job_ids(job_id) for i in ids] == published
    assert a.store.pending("team-slow") == 10
    records = {k[7:]: a.store.get(k[7:]) for k in a.store.redis.keys("genq:r:*")}
    assert set(records) == {*others, *published}  # the refused chunk wrote no record
    assert all(records[rid]["status"] == "cancelled" for rid in published)
    assert all(records[rid]["status"] == "queued" for rid in others)


def test_the_reaper_claims_and_rewrites_in_one_step_that_a_replay_or_a_dead_reaper_finishes(
        client):
    """``reap.lua`` replayed (a lost reply retried) gives the quota back once; a reaper that
    died after the claim leaves the job listed, and the next run cancels what was queued.
    A job seen alive, a batch's job (unlisted) and a job that expired are left alone."""
    a = client.as_owner("team-a")
    store = a.store
    pipe = store.redis.pipeline(transaction=False)
    for job_id in ("job-orphan", "job-alive", "job-batch", "job-gone"):
        store.create_job(job_id, 10, pipe, owner="team-a")
    store.add_job_ids("job-orphan", ["r1", "r2"], pipe)
    store.record_queued([("r1", {"prompt": "a"}), ("r2", {"prompt": "b"})], job_id="job-orphan",
                        pipe=pipe, owner="team-a")
    pipe.zrem(OPEN_JOBS_KEY, "job-batch")
    pipe.delete(job_key("job-gone"))
    pipe.execute()
    store.reserve("team-a", 12, None)  # the orphan's 10, two others
    cutoff = time.time() - 1
    store.redis.zadd(OPEN_JOBS_KEY, {"job-orphan": 0, "job-gone": 0})

    def claim(job_id):
        return store._reap(keys=[job_key(job_id), f"{job_key(job_id)}:ids", OPEN_JOBS_KEY],
                           args=[job_id, cutoff, "gone", "failed"])

    assert claim("job-orphan") == 1 and claim("job-orphan") == 1  # the replay: the same answer
    assert store.pending("team-a") == 4  # the 8 never queued given back once
    assert a.job("job-orphan")["status"] == "failed" and a.job("job-orphan")["counts"]["total"] == 2
    assert [claim(j) for j in ("job-alive", "job-batch", "job-gone")] == [0, 0, 0]
    assert not store.redis.exists(job_key("job-gone"))  # never resurrected
    assert store.redis.zrange(OPEN_JOBS_KEY, 0, -1) == ["job-orphan", "job-alive"]
    # the reaper died before cancelling: the next run finishes the job
    assert store.reap(stale_s=60) == ["job-orphan"] and store.reap(stale_s=60) == []
    assert a.job("job-orphan")["counts"]["cancelled"] == 2
    assert store.pending("team-a") == 2
    assert a.job("job-alive")["status"] == "validating" and a.job("job-batch")["status"] == "validating"
