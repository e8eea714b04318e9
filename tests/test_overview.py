"""The overview's read side against a real Redis: the jobs index (per owner, paged like
/v1/batches), workers from heartbeats, queue depth and oldest wait, recent failures (an
owner's own only), GET /v1/jobs and /v1/overview over HTTP, and `genq status` / `genq jobs`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, ctrl_c_default
from worker import overview

pytestmark = pytest.mark.process


def genq(*args: str, env: dict) -> subprocess.CompletedProcess:
    """``genq ARGS`` piped, as ``genq status | grep`` runs it: no COLUMNS, stdout not a TTY."""
    plain = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True,
                          text=True, env={**plain, **env}, timeout=120, cwd=ROOT)


def fail(client, request_id: str, code: str = "out_of_memory") -> None:
    """Store a request failed as a worker does, and note it."""
    client.store.finish([{"id": request_id, "status": "failed", "job_id": None, "worker": "w9",
                          "error": {"code": code, "message": f"{code} happened"}}])
    pipe = client.store.redis.pipeline()
    overview.note_failures(pipe, [{"id": request_id, "status": "failed"}], 3600)
    pipe.execute()


def test_jobs_index_is_per_owner_newest_first_and_pages_like_batches(client):
    alice, bob = client.as_owner("alice"), client.as_owner("bob")
    mine = [alice.submit_many([{"prompt": f"a{i}"}]) for i in range(5)]
    theirs = bob.submit_many([{"prompt": "b"}, {"prompt": "c"}])
    unowned = client.submit_many([{"prompt": "u"}])

    first = overview.list_jobs(alice, limit=2)
    assert [j["id"] for j in first["data"]] == mine[::-1][:2] and first["has_more"]
    assert first["first_id"] == mine[4] and first["last_id"] == mine[3]
    rest = overview.list_jobs(alice, after=first["last_id"], limit=10)
    assert [j["id"] for j in rest["data"]] == mine[::-1][2:] and not rest["has_more"]
    assert overview.list_jobs(alice, after="job-unknown")["data"] == []
    assert [j["id"] for j in overview.list_jobs(bob)["data"]] == [theirs]
    job = overview.list_jobs(bob)["data"][0]
    assert job["counts"]["total"] == 2 and job["status"] == "queued" and job["progress"] == 0
    assert job["owner"] == "bob" and job["rate"] is None and job["eta_s"] is None
    every = [j["id"] for j in overview.list_jobs(client, limit=100)["data"]]
    assert every == [unowned, theirs, *mine[::-1]]
    admin = client.as_owner("root", admin=True)
    assert len(overview.list_jobs(admin, limit=100)["data"]) == 7

    client.store.redis.delete(f"genq:job:{mine[2]}")  # expired: dropped from the index
    assert mine[2] not in [j["id"] for j in overview.list_jobs(alice, limit=100)["data"]]
    assert client.store.redis.zscore(overview.jobs_key("alice"), mine[2]) is None
    ttl = client.store.redis.ttl(overview.jobs_key("alice"))
    assert 0 < ttl <= client.settings.result_ttl_s

    client.cancel_job(theirs)
    done = overview.list_jobs(bob)["data"][0]
    assert done["status"] == "cancelled" and done["progress"] == 1.0


def test_rates_are_over_the_last_minute_not_since_creation(client):
    """A job created long ago (resumed after a pause) reads its present speed; a young one its
    speed since it started; nothing known at the first look or once stalled for the window;
    the samples bounded and expiring."""
    redis, t0 = client.store.redis, 1_000_000.0
    old, young = "job-old", "job-young"
    rates = overview.moving_rates
    assert rates(redis, [(old, 100, t0 - 3600), (young, 5, t0 - 10)], t0) == [None, 0.5]
    assert rates(redis, [(old, 120, t0 - 3600)], t0 + 10) == [2.0]  # not 120 / 3610 s
    assert rates(redis, [(old, 150, t0 - 3600)], t0 + 40) == [50 / 40]
    assert rates(redis, [(old, 150, t0 - 3600)], t0 + 70) == [30 / 60]  # t0 left the window
    assert rates(redis, [(old, 150, t0 - 3600)], t0 + 200) == [None]  # stalled a whole window
    for k in range(3 * overview.RATE_SAMPLES):
        rates(redis, [(old, 150 + k, t0 - 3600)], t0 + 201 + k / 10)
    assert redis.zcard("genq:rate:job-old") == overview.RATE_SAMPLES
    assert 0 < redis.ttl("genq:rate:job-old") <= 2 * overview.RATE_WINDOW_S

    job = client.submit_many([{"prompt": "a"}, {"prompt": "b"}])
    assert overview.list_jobs(client)["data"][0]["rate"] is None  # nothing finished
    first = next(iter(client.store.job_ids(job)))[0]
    time.sleep(1.0)  # a rate needs a second of history
    client.store.finish([{"id": first, "status": "succeeded",
                          "job_id": job, "worker": "w1", "text": "x"}])
    [listed] = overview.list_jobs(client)["data"]
    assert listed["rate"] > 0 and listed["eta_s"] == pytest.approx(1 / listed["rate"])


def test_overview_workers_queues_and_failures(client):
    store = client.store
    store.heartbeat("w1@test", {"name": "w1@test", "model": "demo", "backend": "vllm",
                                "device": "cpu", "adapters": ["a1"], "tokens_per_s": 12.5,
                                "self_check": {"ok": True},
                                "running": {"interactive": 1, "bulk": 2},
                                "waiting": {"interactive": 0, "bulk": 3}})
    alice, bob = client.as_owner("alice"), client.as_owner("bob")
    alice.submit(prompt="hi")
    bob.submit_many([{"prompt": "x"}, {"prompt": "y"}])
    time.sleep(0.3)
    failed_alice, failed_bob = alice.submit(prompt="f1"), bob.submit(prompt="f2")
    fail(client, failed_alice)
    fail(client, failed_bob, "internal")
    cancelled = alice.submit(prompt="f3")
    alice.cancel(cancelled)
    fail(client, cancelled)  # a cancel won: it did not fail, so it is not listed

    data = overview.build_overview(client)
    [w] = data["workers"]
    assert w["name"] == "w1@test" and w["device"] == "cpu" and w["backend"] == "vllm"
    assert w["running"] == 3 and w["waiting"] == 3 and w["tokens_per_s"] == 12.5
    assert w["adapters"] == ["a1"] and 0 <= w["heartbeat_age_s"] < 5
    q = data["queues"]
    # the messages of the requests that ended meanwhile stay listed until a worker takes them
    assert q["interactive"]["queued"] == 4 and q["bulk"]["queued"] == 2
    assert q["interactive"]["running"] == 1 and q["bulk"]["held"] == 3
    assert q["bulk"]["oldest_wait_s"] >= 0.3
    # owners: those with a bulk list, and the configured keys (none here)
    assert q["owners"] == [{"owner": "bob", "pending": 2, "bulk_queued": 2}]
    assert [f["id"] for f in data["failures"]] == [failed_bob, failed_alice]
    assert data["failures"][0]["code"] == "internal" and data["failures"][0]["worker"] == "w9"
    assert data["scope"] == {"owner": None, "admin": True}

    mine = overview.build_overview(alice)
    assert [f["id"] for f in mine["failures"]] == [failed_alice]
    assert mine["queues"]["owners"] == [{"owner": "alice", "pending": 1, "bulk_queued": 0}]
    assert mine["jobs"] == [] and len(mine["workers"]) == 1
    assert mine["scope"] == {"owner": "alice", "admin": False}
    assert [j["id"] for j in overview.build_overview(bob)["jobs"]] != []


def test_jobs_and_overview_over_http_with_keys(gateway):
    http = gateway(api_keys="alice:ka,bob:kb", admin_keys="root:kr")
    a, b, r = ({"Authorization": f"Bearer {k}"} for k in ("ka", "kb", "kr"))
    ids = [http.post("/v1/jobs", json=[{"prompt": f"p{i}"}], headers=a).json()["id"]
           for i in range(3)]
    http.post("/v1/jobs", json=[{"prompt": "q"}], headers=b)
    assert http.get("/v1/jobs").status_code == 401
    assert http.get("/v1/overview").status_code == 401
    page = http.get("/v1/jobs", params={"limit": 2}, headers=a).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    page = http.get("/v1/jobs", params={"limit": 2, "after": page["last_id"]}, headers=a).json()
    assert [j["id"] for j in page["data"]] == [ids[0]] and not page["has_more"]
    assert len(http.get("/v1/jobs", headers=b).json()["data"]) == 1
    assert len(http.get("/v1/jobs", headers=r).json()["data"]) == 4
    assert http.get("/v1/jobs", params={"limit": 0}, headers=a).status_code == 422
    assert http.get("/v1/jobs", params={"limit": 101}, headers=a).status_code == 422
    assert http.get(f"/v1/jobs/{ids[0]}", headers=a).json()["id"] == ids[0]  # still the job
    view = http.get("/v1/overview", headers=b).json()
    assert view["scope"] == {"owner": "bob", "admin": False} and len(view["jobs"]) == 1

    lines = "".join(json.dumps({"custom_id": f"c{i}", "method": "POST",
                                "url": "/v1/chat/completions", "body": {
                                    "messages": [{"role": "user", "content": "hi"}],
                                    "max_tokens": 4}}) + "\n" for i in range(3))
    upload = http.post("/v1/files", headers=b, data={"purpose": "batch"},
                       files={"file": ("in.jsonl", lines)})
    assert upload.status_code == 200, upload.text
    batch = http.post("/v1/batches", headers=b, json={
        "input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).json()

    def listed(headers):
        return {x["id"]: x for x in http.get("/v1/overview", headers=headers).json()["batches"]}

    deadline = time.monotonic() + 30
    while listed(b)[batch["id"]]["status"] == "validating":  # queued in the background
        assert time.monotonic() < deadline
        time.sleep(0.1)
    shown = listed(b)[batch["id"]]
    assert shown["status"] == "in_progress" and shown["request_counts"]["total"] == 3
    assert shown["progress"] == 0 and "owner" not in shown
    assert batch["id"] not in listed(a) and listed(r)[batch["id"]]["owner"] == "bob"
    page = http.get("/ui")  # the page itself is open (it holds no data), and offline
    assert page.status_code == 200 and "/ui/static/status.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text
    js = http.get("/ui/static/status.js")
    assert js.status_code == 200 and "/v1/overview" in js.text and "https://" not in js.text
    assert http.get("/ui/static/status.css").status_code == 200
    assert http.get("/", follow_redirects=False).headers["location"] == "/ui"
    assert "/v1/jobs" in http.get("/openapi.json").json()["paths"]


def test_genq_status_and_genq_jobs(client, redis_url):
    env = {"GENQ_BROKER_URL": redis_url}
    ids = [client.submit_many([{"prompt": f"p{i}"}, {"prompt": "x"}]) for i in range(3)]
    out = genq("status", "--json", env=env)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["object"] == "overview" and [j["id"] for j in data["jobs"]] == ids[::-1]
    assert data["queues"]["bulk"]["queued"] == 6
    table = genq("status", env=env).stdout
    assert "Workers" in table and "Queues" in table and "no worker alive" in table
    # piped at the default width: every id whole on one line, so `genq status | grep ID` finds it
    lines = table.splitlines()
    assert all(any(i in line for line in lines) for i in ids), table
    name = "cpu-2@a-rather-long-host-name.internal.example.com"
    model = "Qwen/Qwen2.5-0.5B-Instruct-with-a-long-revision"
    client.store.heartbeat(name, {"name": name, "model": model, "device": "cpu",
                                  "adapters": ["an-adapter-named-at-length"]})
    fail(client, client.submit(prompt="f", custom_id="c"))
    lines = genq("status", env=env).stdout.splitlines()
    failed = client.store.redis.zrange(overview.FAILURES_KEY, 0, -1)
    for whole in (name, model, "an-adapter-named-at-length", *failed):
        assert any(whole in line for line in lines), (whole, lines)
    assert not any("…" in line for line in lines)
    workers = genq("workers", env=env).stdout
    assert name in workers and model in workers and "an-adapter-named-at-length" in workers
    [listed_worker] = json.loads(genq("workers", "--json", env=env).stdout)
    assert listed_worker["name"] == name and listed_worker["device"] == "cpu"
    jobs = json.loads(genq("jobs", "--limit", "2", "--json", env=env).stdout)
    assert [j["id"] for j in jobs["data"]] == ids[::-1][:2] and jobs["has_more"]
    listed = genq("jobs", "--limit", "2", env=env)
    assert ids[2] in listed.stdout and ids[1] in listed.stdout and "…" not in listed.stdout
    assert f"--after {ids[1]}" in listed.stderr
    rid = client.submit(prompt="one")
    assert json.loads(genq("status", rid, "--json", env=env).stdout) == {"id": rid,
                                                                        "status": "queued"}

    watch = subprocess.Popen([sys.executable, "-m", "worker.cli", "status", "--watch", "--json",
                              "--interval", "0.3"], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, **env}, cwd=ROOT, preexec_fn=ctrl_c_default)
    lines = [watch.stdout.readline() for _ in range(3)]  # one JSON line per refresh
    watch.send_signal(signal.SIGINT)
    assert watch.wait(20) == 0
    assert all(json.loads(x)["object"] == "overview" for x in lines)
