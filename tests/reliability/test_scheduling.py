"""The step loop under faults, on real processes: a private redis-server, `genq worker`
subprocesses, the client. Faults happen where they really happen: Redis stopped in the middle
of a batch with no other traffic; a process killed, or a forward pass hung, inside a real
forward pass (``tests/faults/sitecustomize.py`` on the worker's path); malformed envelopes
pushed straight onto the queue. Figures printed here go into RELIABILITY.md."""

from __future__ import annotations

import base64
import json
import random
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

pytestmark = pytest.mark.slow
FAULTS = str(Path(__file__).resolve().parent.parent / "faults")
POISON = "Xyzzy"  # its last token triggers the injected fault


def tiny_env(tiny_model_dir: Path, **extra: str) -> dict[str, str]:
    return {"GENQ_MODEL": str(tiny_model_dir), "GENQ_MAX_BATCH_SIZE": "8",
            "GENQ_VISIBILITY_TIMEOUT_S": "6", **extra}


def fault_env(tiny_model_dir: Path, mode: str, **extra: str) -> dict[str, str]:
    from transformers import AutoTokenizer

    token = AutoTokenizer.from_pretrained(tiny_model_dir).encode(POISON)[-1]
    return tiny_env(tiny_model_dir, PYTHONPATH=FAULTS, GENQ_FAULT_TOKEN=str(token),
                    GENQ_FAULT_MODE=mode, **extra)


def wait_until(predicate, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(every)
    return value


def test_redis_stopped_mid_batch_on_a_quiet_system(client, start_worker, tiny_model_dir,
                                                   redis_server, redis_url):
    """Rows go on while Redis is down; once it is back every result is stored within seconds,
    with no other traffic to nudge the worker and no visibility timeout to wait for."""
    start_worker("quiet@test", **tiny_env(tiny_model_dir))
    job = client.submit_many([{"prompt": f"story {i}", "max_new_tokens": 1200 + 40 * i}
                              for i in range(6)], priority="interactive")
    wait_until(lambda: client.job(job)["counts"]["running"] == 6, 60, "rows did not start")
    redis_server.stop()
    time.sleep(8)  # longer than the visibility timeout (6 s)
    redis_server.start()
    back = time.monotonic()
    info = client.wait_job(job, timeout=120, poll_s=0.1)
    settled_s = time.monotonic() - back
    assert info["counts"]["succeeded"] == 6 and info["counts"]["running"] == 0
    r = redis.Redis.from_url(redis_url)
    ids = [res["id"] for res in client.job_results(job)]
    assert [int(r.get(f"genq:attempts:{i}")) for i in ids] == [1] * 6  # each ran once
    # acked a round trip after its result is stored: soon, not at once
    wait_until(lambda: r.hlen("genq:unacked") == 0, 30, "a message stays unacked")
    assert r.llen("genq.interactive") == 0
    log = (start_worker.log_dir / "quiet@test.log").read_text()
    assert "broker_unavailable" in log and "broker_back" in log
    assert settled_s < 10, settled_s
    print(json.dumps({"scenario": "redis stopped 8 s mid-batch, quiet system", "lost": 0,
                      "ran_twice": 0, "all_stored_s_after_redis_back": round(settled_s, 1)}))


def charged(r: redis.Redis, result: dict) -> list[str]:
    """Workers that died while this finished request ran alone there (its starts marked alone
    by any worker but the one that finished it)."""
    starts = {k.decode(): v.decode() for k, v in r.hgetall(f"genq:starts:{result['id']}").items()}
    return sorted(t.split(":")[0] for t, alone in starts.items()
                  if alone == "1" and t.split(":")[0] != result["worker"])


def run_until(done, start_worker, env: dict[str, str]) -> list:
    """Start a worker, and a new one whenever the last died, until ``done()``; the workers
    started."""
    started = []
    while not done():
        if not started or started[-1].poll() is not None:
            assert len(started) < 5, "a fifth worker died: the attempt limit did not hold"
            started.append(start_worker(f"victim{len(started)}@test", wait_ready=False, **env))
        time.sleep(0.2)
    return started


def test_a_request_that_kills_workers_in_a_batch_ends_worker_lost(client, start_worker,
                                                                  tiny_model_dir, redis_url):
    """A request whose forward pass kills the process fails ``worker_lost`` once
    GENQ_MAX_ATTEMPTS (2) workers died while it ran alone: the first death happens in a batch
    (evidence against nobody: every row there becomes a suspect), then it runs alone twice.
    Its batch-mates are never charged and succeed."""
    env = fault_env(tiny_model_dir, "exit", GENQ_BATCH_WAIT_MS="200")
    good = [{"prompt": f"good request {i}", "max_new_tokens": 24} for i in range(10)]
    job = client.submit_many([*good[:5], {"prompt": POISON, "max_new_tokens": 24}, *good[5:]],
                             priority="interactive")
    started = run_until(lambda: not (client.job(job)["counts"]["queued"]
                                     + client.job(job)["counts"]["running"]), start_worker, env)
    results = list(client.job_results(job))
    poison = results[5]
    assert poison["status"] == "failed" and poison["error"]["code"] == "worker_lost"
    assert [r["status"] for r in results[:5] + results[6:]] == ["succeeded"] * 10
    assert [p.poll() for p in started[:3]] == [134] * 3 and started[3].poll() is None
    r = redis.Redis.from_url(redis_url)
    assert list(r.hgetall(f"genq:starts:{poison['id']}").values()).count(b"1") == 2
    assert [charged(r, res) for res in results[:5] + results[6:]] == [[]] * 10
    print(json.dumps({"scenario": "poison request (kills its worker)", "workers_killed": 3,
                      "killed_while_alone": 2, "poison": "worker_lost", "others_succeeded": 10}))


def test_a_request_that_kills_workers_alone_ends_worker_lost_after_max_attempts_deaths(
        client, start_worker, tiny_model_dir, redis_url):
    """A poison request that runs alone from its first start is charged for every death:
    with GENQ_MAX_ATTEMPTS=N it ends ``worker_lost`` after N dead workers, not N + 1. A request
    that joins it later makes the start shared again (not charged): here the poison dies in
    its first forward pass, before anything can join."""
    env = fault_env(tiny_model_dir, "exit", GENQ_MAX_ATTEMPTS="3")
    rid = client.submit(prompt=POISON, max_new_tokens=24)
    started = run_until(lambda: client.get(rid)["status"] == "failed", start_worker, env)
    assert client.get(rid)["error"]["code"] == "worker_lost"
    assert [p.poll() for p in started[:3]] == [134] * 3 and len(started) == 4
    r = redis.Redis.from_url(redis_url)
    assert list(r.hgetall(f"genq:starts:{rid}").values()) == [b"1"] * 3
    after = client.wait(client.submit(prompt="after the poison", max_new_tokens=4), timeout=60)
    assert after["status"] == "succeeded" and started[3].poll() is None
    print(json.dumps({"scenario": "poison request alone from its first start",
                      "max_attempts": 3, "workers_killed": 3, "poison": "worker_lost"}))


def running_suspect(r: redis.Redis, job: str, worker: str) -> str | None:
    """A request of ``job`` that ``worker`` runs as a suspect (started before): it runs alone."""
    for rid in sorted(m.decode() for m in r.smembers(f"genq:job:{job}:running")):
        record = json.loads(r.get(f"genq:r:{rid}") or "null")
        if (record and record["status"] == "running" and record["worker"] == worker
                and int(r.get(f"genq:attempts:{rid}") or 0) > 1):
            return rid
    return None


def started_again(r: redis.Redis, job: str) -> dict[str, tuple]:
    """For a failure message: each request of ``job`` started more than once, its status,
    worker and starts (token -> alone)."""
    out = {}
    for rid in (m.decode() for m in r.lrange(f"genq:job:{job}:ids", 0, -1)):
        if int(r.get(f"genq:attempts:{rid}") or 0) > 1:
            record = json.loads(r.get(f"genq:r:{rid}") or "{}")
            out[rid] = (record.get("status"), record.get("worker"),
                        {k.decode(): v.decode() for k, v in r.hgetall(f"genq:starts:{rid}").items()})
    return out


def test_three_sigkills_at_random_moments_fail_nobody(client, start_worker, tiny_model_dir,
                                                      redis_url):
    """Random deaths are not evidence: with the default GENQ_MAX_ATTEMPTS (2), three SIGKILLs
    during a 100-request job, the first mid-batch and the next two at a random moment while a
    suspect of the one before runs alone (so they are charged to innocents), end with 100/100
    succeeded, each start counted once. The suspect charged by the second kill sits out one
    visibility timeout on the next worker, then runs after the uncharged ones, so the third
    kill charges another one. Every forward pass lasts 30 ms at least, so that a suspect's
    run (a prefill and 31 decode steps) lasts about a second and a kill aimed at it lands in
    it, on a quiet machine as on a busy one."""
    requests = [{"prompt": f"request {i}: " + "lorem " * (i % 30), "max_new_tokens": 32}
                for i in range(100)]
    job = client.submit_many(requests)
    rng = random.Random()
    env = tiny_env(tiny_model_dir, GENQ_BATCH_WAIT_MS="20", PYTHONPATH=FAULTS,
                   GENQ_FAULT_STEP_S="0.03")
    r = redis.Redis.from_url(redis_url)
    name = "random0@test"
    worker = start_worker(name, **env)
    wait_until(lambda: client.job(job)["counts"]["running"], 60, "nothing ran")
    time.sleep(rng.uniform(0.2, 2.0))
    hit = [client.job(job)["counts"]["running"]]
    for k in range(1, 4):
        worker.kill()
        worker.wait()
        if k == 3:
            break
        name = f"random{k}@test"
        worker = start_worker(name, **env)
        try:
            hit.append(wait_until(lambda n=name: running_suspect(r, job, n), 300, "none"))
        except AssertionError:
            raise AssertionError(f"no suspect ran on {name}: {client.job(job)['counts']}, "
                                 f"{started_again(r, job)}") from None
        time.sleep(rng.uniform(0.0, 0.3))  # inside the suspect's run (a second at least)
    start_worker("random3@test", **env)
    info = client.wait_job(job, timeout=600)
    assert info["counts"] == {"total": 100, "queued": 0, "running": 0, "succeeded": 100,
                              "failed": 0, "cancelled": 0, "expired": 0}, started_again(r, job)
    results = list(client.job_results(job))
    assert len({res["id"] for res in results}) == 100
    assert r.scard(f"genq:job:{job}:done") == 100
    wait_until(lambda: r.hlen("genq:unacked") == 0, 30, "a message stays unacked")
    killed = {"random0@test", "random1@test", "random2@test"}
    for res in results:  # one counted start per worker that started it, all but one killed
        starters = [t.decode().split(":")[0] for t in r.hkeys(f"genq:starts:{res['id']}")]
        assert int(r.get(f"genq:attempts:{res['id']}")) == len(starters) == len(set(starters))
        assert res["worker"] in starters and set(starters) - {res["worker"]} <= killed
    charges = {res["id"]: charged(r, res) for res in results if charged(r, res)}
    assert hit[0] and all(len(c) == 1 for c in charges.values()), charges
    assert set().union(*charges.values()) >= {"random1@test", "random2@test"}  # hit alone runs
    restarted = sum(int(r.get(f"genq:attempts:{res['id']}")) > 1 for res in results)
    print(json.dumps({"scenario": "3 SIGKILLs (mid-batch, then twice mid-suspect), 100 "
                      "requests, GENQ_MAX_ATTEMPTS=2", "running_at_first_kill": hit[0],
                      "lost": 0, "failed": 0, "requests_restarted": restarted,
                      "charged_once": len(charges)}))


def test_rolling_restarts_never_count_as_attempts(client, start_worker, tiny_model_dir,
                                                  redis_url):
    """SIGTERM (a rolling deploy) finishes the rows running and hands the rest back, rows that
    started and were evicted (interactive first, KV room) included: no start is charged, so
    every request ends with one counted start, and nothing runs as a suspect."""
    env = tiny_env(tiny_model_dir, GENQ_MAX_BATCH_TOKENS="1600", GENQ_BATCH_WAIT_MS="20")
    job = client.submit_many([{"prompt": f"bulk story {i}", "max_new_tokens": 300}
                              for i in range(40)])
    interactive = []
    for k in range(3):
        worker = start_worker(f"rolling{k}@test", **env)
        wait_until(lambda: client.job(job)["counts"]["running"], 60, "bulk rows running")
        for i in range(6):  # each needs KV room that only evicting bulk rows frees
            interactive.append(client.submit(prompt=f"urgent {k}.{i}", max_new_tokens=300))
            time.sleep(0.15)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(120) == 0
    start_worker("rolling-last@test", **env)
    info = client.wait_job(job, timeout=600)
    assert info["counts"]["succeeded"] == 40
    for rid in interactive:
        assert client.wait(rid, timeout=300)["status"] == "succeeded"
    r = redis.Redis.from_url(redis_url)
    ids = [res["id"] for res in client.job_results(job)] + interactive
    assert [int(r.get(f"genq:attempts:{i}")) for i in ids] == [1] * len(ids)
    logs = "".join(p.read_text() for p in start_worker.log_dir.glob("rolling*.log"))
    assert "rows_evicted" in logs and "draining" in logs


def test_a_failing_pipeline_in_the_middle_of_steps_counts_nothing_twice(
        client, start_worker, tiny_model_dir, redis_url):
    """The worker's connections are killed again and again while rows run (a write cut short
    after Redis applied part of it, then replayed whole): attempts, job counts and the
    owner's pending count still come out exact."""
    from worker.client import GenerationClient
    from worker.ops.settings import Settings

    owner = GenerationClient(settings=Settings(broker_url=redis_url), owner="key-a")
    start_worker("cut@test", **tiny_env(tiny_model_dir, GENQ_BATCH_WAIT_MS="20"))
    r = redis.Redis.from_url(redis_url, client_name="test-reader")  # named: never cut
    killer = redis.Redis.from_url(redis_url, single_connection_client=True)
    stop = threading.Event()
    cuts = []  # the worker's connections cut (every unnamed client is the worker's meanwhile)

    def cut():
        me = killer.client_id()
        while not stop.wait(0.03):
            for c in killer.client_list():
                if int(c["id"]) != me and not c.get("name"):
                    killer.client_kill_filter(_id=c["id"])
                    cuts.append(c["cmd"])

    def done() -> bool:
        return r.scard(f"genq:job:{job}:done") == 80

    job = owner.submit_many([{"prompt": f"cut {i}", "max_new_tokens": 60} for i in range(80)])
    cutter = threading.Thread(target=cut, daemon=True)
    cutter.start()
    try:
        wait_until(done, 300, "job did not finish", every=0.2)
    finally:
        stop.set()
        cutter.join()
    info = owner.job(job)
    assert info["counts"]["succeeded"] == 80 and info["counts"]["total"] == 80
    ids = [res["id"] for res in owner.job_results(job)]
    assert [int(r.get(f"genq:attempts:{i}")) for i in ids] == [1] * 80
    assert int(r.get("genq:pending:key-a") or 0) == 0
    writes = [c for c in cuts if c.startswith(("evalsha", "exec", "set", "hset", "multi"))]
    assert len(cuts) >= 20 and writes, cuts[:20]  # the cuts hit the worker, writes included


def test_a_frozen_redis_freezes_no_worker(client, start_worker, tiny_model_dir, redis_server):
    """Redis stopped with SIGSTOP (connections half-open: no FIN, no answer) for longer than
    the socket timeout in the middle of a batch: the worker's calls time out, rows go on,
    and once Redis runs again every result is stored; nothing lost, the worker never exits."""
    worker = start_worker("frozen@test", **tiny_env(tiny_model_dir))
    job = client.submit_many([{"prompt": f"frozen {i}", "max_new_tokens": 600 + 20 * i}
                              for i in range(6)], priority="interactive")
    wait_until(lambda: client.job(job)["counts"]["running"] == 6, 60, "rows did not start")
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(14)  # past the 10 s socket timeout
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    back = time.monotonic()
    info = client.wait_job(job, timeout=120, poll_s=0.2)
    settled_s = time.monotonic() - back
    assert info["counts"]["succeeded"] == 6 and info["counts"]["running"] == 0
    assert worker.poll() is None  # it recovered by itself: no supervisor needed
    r = redis.Redis.from_url(redis_server.url)
    ids = [res["id"] for res in client.job_results(job)]
    # the last ack may land just after the last result is read (retried writes after the freeze)
    wait_until(lambda: r.hlen("genq:unacked") == 0, 30, "a message stayed unacked")
    assert [int(r.get(f"genq:attempts:{i}")) for i in ids] == [1] * 6  # none ran again
    print(json.dumps({"scenario": "redis frozen (SIGSTOP) 14 s mid-batch", "lost": 0,
                      "ran_twice": 0, "all_stored_s_after_redis_back": round(settled_s, 1)}))


def test_stall_watchdog_exits_and_the_request_runs_elsewhere(client, start_worker,
                                                            tiny_model_dir, redis_url):
    hung = start_worker("hung@test", **fault_env(tiny_model_dir, "hang", GENQ_STALL_TIMEOUT_S="3"))
    rid = client.submit(prompt=POISON, max_new_tokens=8)
    other = client.submit(prompt="an ordinary request", max_new_tokens=8)
    assert hung.wait(60) == 70
    log = (start_worker.log_dir / "hung@test.log").read_text()
    assert "worker_stalled" in log and rid in log
    start_worker("healthy@test", **tiny_env(tiny_model_dir))
    for request_id in (rid, other):
        res = client.wait(request_id, timeout=60)  # redelivered after the visibility timeout
        assert res["status"] == "succeeded" and res["worker"] == "healthy@test"
    assert int(redis.Redis.from_url(redis_url).get(f"genq:attempts:{rid}")) == 2


def test_cancel_and_deadline_in_the_middle_of_a_running_batch(client, start_worker, demo_engine):
    start_worker(GENQ_BATCH_WAIT_MS="300")
    base = {"messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
            "max_new_tokens": 160}
    short = [{"messages": [{"role": "user", "content": f"Describe {t}."}], "max_new_tokens": 40}
             for t in ("the sea", "a forest", "a city")]
    keep = [client.submit(**r) for r in short]
    cancel_me = client.submit(**base)
    expire_me = client.submit(**base, expires_in_s=6)
    wait_until(lambda: client.get(cancel_me)["status"] == "running", 120, "did not start")
    wait_until(lambda: (client.get(cancel_me)["text"] or "").strip(), 120, "no partial text")
    assert client.cancel(cancel_me) is True
    cancelled = client.wait(cancel_me, timeout=60)
    expired = client.wait(expire_me, timeout=120)
    others = [client.wait(i, timeout=300) for i in keep]
    assert cancelled["status"] == "cancelled" and cancelled["finish_reason"] == "cancelled"
    assert 0 < cancelled["usage"]["completion_tokens"] < 160 and cancelled["text"]
    assert expired["status"] == "expired" and 0 < expired["usage"]["completion_tokens"] < 160
    alone = [demo_engine.generate([r])[0]["text"] for r in short]
    assert [o["text"] for o in others] == alone  # batch-mates went on, untouched
    full = demo_engine.generate([base])[0]["text"]
    assert full.startswith(cancelled["text"]) and full.startswith(expired["text"])


def test_running_results_show_the_text_so_far(client, start_worker, tiny_model_dir):
    start_worker("progress@test", **tiny_env(tiny_model_dir))
    rid = client.submit(prompt="Once upon a time", max_new_tokens=1500)
    seen: list[tuple[int, str]] = []
    while (res := client.get(rid))["status"] != "succeeded":
        if res["status"] == "running" and res["text"]:
            seen.append((res["usage"]["completion_tokens"], res["text"]))
        time.sleep(0.02)
    assert len({n for n, _ in seen}) >= 3, seen[:3]  # it grew while running
    assert all(res["text"].startswith(text) for _, text in seen)
    assert [n for n, _ in seen] == sorted(n for n, _ in seen)


def poison_envelopes(rng: random.Random) -> list[bytes]:
    """Messages as nobody should send them: the envelope itself broken in every way."""
    good_body = base64.b64encode(json.dumps([[{"prompt": "x"}], {}, {}]).encode()).decode()

    def kombu(**over):
        msg = {"body": good_body, "content-encoding": "utf-8", "content-type": "application/json",
               "headers": {"id": str(uuid.uuid4()), "task": "genq.generate"},
               "properties": {"body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
                              "delivery_info": {"exchange": "", "routing_key": "genq.bulk"}}}
        msg.update(over)
        return json.dumps(msg).encode()

    weird = [None, 1, -1.5, "text", [], [1, [2]], {"a": {"b": None}}, True, "x" * 100_000]
    out = [b"", b"\x00\xff\xfe", b"not json", b"[" * 100_000 + b"]" * 100_000,
           b'{"a":' * 50_000 + b"1" + b"}" * 50_000, json.dumps(weird).encode(),
           kombu(body="!!!not base64!!!"), kombu(body=base64.b64encode(b"[" * 60_000).decode()),
           kombu(body=base64.b64encode(b'{"x": 1}').decode()),
           kombu(**{"content-type": "application/x-python-serialize"}),
           kombu(body="x" * (17 * 1024 * 1024))]
    for field in ("headers", "properties", "body", "content-type"):
        for value in weird:
            out.append(kombu(**{field: value}))
    for value in weird:
        out.append(kombu(properties={"body_encoding": "base64", "delivery_tag": value,
                                     "delivery_info": value}))
        out.append(kombu(headers={"id": value, "task": value, "genq_submitted": value,
                                  "genq_job": value, "genq_expires": value}))
    rng.shuffle(out)
    return out


def test_malformed_envelopes_never_take_a_worker_down(client, start_worker, tiny_model_dir,
                                                      redis_url):
    worker = start_worker("envelopes@test", **tiny_env(tiny_model_dir, GENQ_BATCH_WAIT_MS="20"))
    r = redis.Redis.from_url(redis_url)
    valid = []
    for i, raw in enumerate(poison_envelopes(random.Random(7))):
        r.lpush("genq.bulk" if i % 2 else "genq.interactive", raw)
        if i % 8 == 0:
            valid.append(client.submit(prompt=f"valid {i}", max_new_tokens=3))
    for rid in valid:
        assert client.wait(rid, timeout=300)["status"] == "succeeded"
    wait_until(lambda: r.llen("genq.bulk") + r.llen("genq.interactive") == 0, 60, "not drained")
    last = client.submit(prompt="after the fuzz", max_new_tokens=3)
    assert client.wait(last, timeout=60)["worker"] == "envelopes@test"
    # a result is stored before its message is acked (a round trip later): nothing stays held
    wait_until(lambda: r.hlen("genq:unacked") == 0, 30, "a message stays unacked")
    assert worker.poll() is None
    log = (start_worker.log_dir / "envelopes@test.log").read_text()
    assert log.count("message_rejected") >= 40


def test_an_idle_worker_barely_touches_redis(client, start_worker, tiny_model_dir, redis_url):
    start_worker("idle@test", **tiny_env(tiny_model_dir, GENQ_BATCH_WAIT_MS="50"))
    r = redis.Redis.from_url(redis_url)
    time.sleep(3)  # settle after start-up
    before = r.info("stats")["total_commands_processed"]
    t0 = time.monotonic()
    time.sleep(10)
    rate = (r.info("stats")["total_commands_processed"] - before - 1) / (time.monotonic() - t0)
    latencies = []
    for i in range(20):  # an idle worker still answers at once
        t = time.perf_counter()
        res = client.wait(client.submit(prompt=f"ping {i}", max_new_tokens=1), timeout=30)
        latencies.append((time.perf_counter() - t) * 1000 - res["timings"]["generate_ms"])
        time.sleep(0.3)
    assert rate <= 10, rate  # every Redis command of the worker process, Celery's included
    print(json.dumps({"scenario": "idle worker", "redis_commands_per_s": round(rate, 1),
                      "added_latency_ms_p50": round(sorted(latencies)[10], 1),
                      "added_latency_ms_max": round(max(latencies), 1)}))


def test_demand_counts_held_and_running_and_a_small_job_spreads(client, start_worker, gateway,
                                                                tiny_model_dir):
    http = gateway()
    env = tiny_env(tiny_model_dir, GENQ_MAX_BATCH_SIZE="4", GENQ_POOL_SIZE="4")
    start_worker("share1@test", **env)
    start_worker("share2@test", **env)
    wait_until(lambda: len(client.store.workers()) == 2, 30, "two heartbeats")
    # long rows: between two finishes the heartbeats have time to agree with the counts
    job = client.submit_many([{"prompt": f"share {i}", "max_new_tokens": 800} for i in range(16)])
    wait_until(lambda: client.job(job)["counts"]["running"] >= 4, 60, "nothing ran")

    def demand_matches() -> bool:  # queued + held in pools + running, from the heartbeats
        text = http.get("/metrics").text
        demand = next(float(x.rsplit(" ", 1)[1]) for x in text.splitlines()
                      if x.startswith('genq_demand{priority="bulk"}'))
        counts = client.job(job)["counts"]
        return demand == counts["queued"] + counts["running"] > 0

    wait_until(demand_matches, 60, "the demand metric does not count held and running requests")
    client.wait_job(job, timeout=300)
    workers = [r["worker"] for r in client.job_results(job)]
    assert set(workers) == {"share1@test", "share2@test"}, workers
    assert min(workers.count("share1@test"), workers.count("share2@test")) >= 4
