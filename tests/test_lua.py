"""Each Lua script's contract, run on the test session's real Redis, and the scripts checked
against ``worker.lifecycle`` (the fetch script: ``test_delivery.py``)."""

from __future__ import annotations

import json
from importlib.resources import files

import pytest
import redis

from worker.lifecycle import FINAL, JOB_ENDED, STATUSES, TRANSITIONS, job_counts, job_status
from worker.queue.rediskeys import job_key, pending_key, result_key
from worker.queue.results import ResultStore
from worker.queue.scripts import LIFECYCLE, source

pytestmark = pytest.mark.process

SCRIPTS = sorted(p.name[:-4] for p in files("worker.queue").joinpath("lua").iterdir()
                 if p.name.endswith(".lua") and p.name != "lifecycle.lua")


@pytest.fixture
def store(redis_url):
    return ResultStore(redis_url, ttl_s=60)


def _record(rid: str, status: str, job_id: str | None = None) -> dict:
    return {"id": rid, "status": status, "job_id": job_id, "text": status}


def _events(store) -> list[dict]:
    return [json.loads(e) for e in store.redis.lrange("genq:events", 0, -1)]


def test_every_script_states_its_keys_and_argv_and_takes_final_statuses_from_lifecycle(redis_url):
    """A final status is spelled in no script: those that need one say ``--! lifecycle`` and get
    ``FINAL`` from Python; every script compiles on Redis."""
    r = redis.Redis.from_url(redis_url)
    lua = files("worker.queue").joinpath("lua")
    for name in SCRIPTS:
        text = lua.joinpath(f"{name}.lua").read_text()
        header = text.split("\n\n")[0]
        assert "KEYS" in header and "ARGV" in header, name
        assert not any(f"'{s}'" in text for s in FINAL), f"{name}.lua spells a final status"
        assert ("is_final" in text or "notify_job" in text) == text.startswith(LIFECYCLE), name
        r.script_load(source(name))
    assert source("finish").startswith(f"local FINAL = {{{', '.join(map(repr, FINAL))}}}\n")


@pytest.mark.parametrize("old", [None, *STATUSES])
def test_writes_follow_the_lifecycle_transitions(store, old):
    """START and PROGRESS write ``running``, FINISH a final status: each only where
    ``TRANSITIONS`` allows it (no record yet: anything)."""
    writes = [("start", "running"), ("progress", "running"), *[("finish", s) for s in FINAL]]
    for i, (script, new) in enumerate(writes):
        rid = f"r{i}"
        if old is not None:
            store.redis.set(result_key(rid), json.dumps(_record(rid, old)))
        if script == "start":
            [got] = store.start([_record(rid, new)], ["t1"], [False])
        elif script == "progress":
            pipe = store.redis.pipeline()
            store.progress([_record(rid, new)], pipe)
            [got] = pipe.execute()
        else:
            [got] = store.finish([_record(rid, new)])
        allowed = old is None or new in TRANSITIONS[old]
        assert bool(got) == allowed, (old, script, new)
        assert store.get(rid)["status"] == (new if allowed else old)


def test_finish_first_final_state_wins_and_counts_each_job_once(store):
    store.redis.set(pending_key("alice"), 1)
    store.redis.set("genq:owner:r1", "alice")
    pipe = store.redis.pipeline()
    store.create_job("j1", 1, pipe, owner="alice", webhook_url="http://hook.example")
    pipe.execute()
    store.job_submitted("j1")
    assert store.finish([_record("r1", "succeeded", "j1")]) == [True]
    assert store.finish([_record("r1", "failed", "j1")]) == [False]
    assert store.get("r1")["status"] == "succeeded"
    assert json.loads(store.redis.get("celery-task-meta-r1"))["status"] == "SUCCESS"
    assert store.job("j1")["counts"]["succeeded"] == 1 and store.pending("alice") == 0
    assert _events(store) == [{"type": "job", "id": "j1"}]
    store.redis.delete(result_key("r1"))  # a redelivered finish after the record expired
    store.finish([_record("r1", "failed", "j1")])
    assert store.job("j1")["counts"]["failed"] == 0 and store.pending("alice") == 0


def test_the_job_event_is_sent_exactly_when_python_reads_the_job_ended(store):
    """FINISH and SUBMITTED push a job's event when ``lifecycle.job_status`` says it ended
    (never while validating)."""
    for submit_first in (True, False):
        job = f"j-{submit_first}"
        pipe = store.redis.pipeline()
        store.create_job(job, 3, pipe, webhook_url="http://hook.example")
        pipe.execute()
        if submit_first:
            store.job_submitted(job)
        for i, status in enumerate(["cancelled", "expired", "failed"]):
            store.finish([_record(f"{job}-{i}", status, job)])
            info = store.job(job)
            sent = store.redis.llen("genq:events") > 0
            assert sent == (info["status"] in JOB_ENDED), (submit_first, i, info)
        if not submit_first:
            store.job_submitted(job)
        assert store.job(job)["status"] == "cancelled"  # none succeeded
        assert _events(store) == [{"type": "job", "id": job}]
        store.redis.delete("genq:events")


def test_start_counts_once_per_token_and_unstart_takes_it_back(store):
    rec = _record("r1", "running", "j1")
    assert store.start([rec], ["t1"], [True]) == [1]
    assert store.start([rec], ["t1"], [True]) == [1]  # a retried write
    assert store.start([rec], ["t2"], [False]) == [2]
    assert store.admission_state(["r1"]) == [("running", 2, 1)]
    assert store.redis.smembers(f"{job_key('j1')}:running") == {"r1"}
    for _ in range(2):  # idempotent
        pipe = store.redis.pipeline()
        store.unstart([("r1", "t2")], pipe)
        pipe.execute()
        assert store.admission_state(["r1"]) == [("running", 1, 1)]
    store.redis.set("genq:attempts:r1", 0)  # never below zero
    pipe = store.redis.pipeline()
    store.unstart([("r1", "t1")], pipe)
    pipe.execute()
    assert store.admission_state(["r1"]) == [("running", 0, 0)]


def test_reserve_counts_all_or_none(store):
    assert store.reserve("bob", 3, 5) == 3
    assert store.reserve("bob", 3, 5) is None  # 6 > 5: nothing counted
    assert store.pending("bob") == 3
    assert store.reserve("bob", 2, 5) == 5
    assert store.reserve("bob", 100, None) == 105  # no limit


def test_submitted_leaves_a_reaped_job_alone(store):
    pipe = store.redis.pipeline()
    store.create_job("j1", 2, pipe)
    pipe.execute()
    store.redis.hset(job_key("j1"), "state", "failed")  # reaped
    store.job_submitted("j1")
    assert store.job("j1")["status"] == "failed"
    store.redis.hset(job_key("j1"), "state", "validating")
    store.job_submitted("j1")
    assert store.job("j1")["status"] == "queued"
    assert store.redis.zscore("genq:jobs:open", "j1") is None
    assert store.redis.llen("genq:events") == 0  # no webhook


def test_link_counts_a_final_request_at_once_and_an_open_one_when_it_ends(store):
    pipe = store.redis.pipeline()
    store.create_job("j2", 2, pipe)
    pipe.execute()
    store.job_submitted("j2")
    store.finish([_record("done", "succeeded", "j1")])
    store.record_queued([("open", {"prompt": "p"})], job_id="j1")
    for _ in range(2):  # a repeated link counts nothing twice
        store.link(["done", "open"], "j2")
        assert job_counts(store.redis.hgetall(job_key("j2")), 0)["succeeded"] == 1
    store.finish([_record("open", "expired", "j1")])
    counts = store.job("j2")["counts"]
    assert (counts["succeeded"], counts["expired"]) == (1, 1)
    assert job_status(counts) == store.job("j2")["status"] == "completed"


def test_reserve_release_and_append_ids_count_a_replayed_call_once(store):
    """A call replayed with the same token (what redis-py's retry does after a lost reply)
    changes nothing twice: a reservation, a release, a chunk of job ids."""
    counter = pending_key("replay")
    args = [3, 10, 60]
    assert store._reserve(keys=[counter, "genq:resv:a"], args=args) == 3
    assert store._reserve(keys=[counter, "genq:resv:a"], args=args) == 3  # replay: the same answer
    assert int(store.redis.get(counter)) == 3
    store._release(keys=[counter, "genq:resv:b"], args=[2, 60])
    store._release(keys=[counter, "genq:resv:b"], args=[2, 60])
    assert int(store.redis.get(counter)) == 1
    store._release(keys=[counter, "genq:resv:c"], args=[5, 60])
    assert int(store.redis.get(counter)) == 0  # never below zero
    keys = [f"{job_key('j')}:ids", f"{job_key('j')}:chunks"]
    ids = [f"id{i}" for i in range(2500)]
    for _ in range(2):
        store._append_ids(keys=keys, args=[60, "chunk-1", *ids])
    store._append_ids(keys=keys, args=[60, "chunk-2", "last"])
    assert store.redis.lrange(keys[0], 0, -1) == [*ids, "last"]
    pipe = store.redis.pipeline(transaction=False)  # the public call, through a pipeline
    store.add_job_ids("k", ["a", "b"], pipe)
    pipe.execute()
    assert store.redis.lrange(f"{job_key('k')}:ids", 0, -1) == ["a", "b"]
