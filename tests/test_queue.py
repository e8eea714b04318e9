"""The queue against real processes: a private redis-server, real `genq worker` subprocesses
running the real demo model on the CPU, and the client. Nothing here is mocked."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

from tests.conftest import example_requests
from worker.errors import InvalidRequest, NotFound, QueueFull

pytestmark = pytest.mark.slow


def chat(i: int, n: int = 8) -> dict:
    topics = ["the sea", "a robot", "bread", "the moon", "a river", "music", "chess", "rain"]
    words = " ".join(["please"] * (i % 7) * 5)  # mixed prompt lengths
    return {"messages": [{"role": "user", "content": f"Say something about {topics[i % 8]}. {words}"}],
            "max_new_tokens": n}


def test_200_requests_from_4_producers_match_the_engine(client, start_worker, demo_engine):
    start_worker()
    requests = [chat(i) for i in range(200)]
    ids: dict[int, str] = {}

    def produce(k: int) -> None:
        mine = list(range(k, 200, 4))
        if k % 2:
            for i in mine:
                ids[i] = client.submit(**requests[i])
        else:
            job = client.submit_many([requests[i] for i in mine], priority="interactive")
            for i, res in zip(mine, client.job_results(job), strict=True):
                ids[i] = res["id"]

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = [client.wait(ids[i], timeout=300) for i in range(200)]
    unique = {json.dumps(r, sort_keys=True): r for r in requests}  # 56 distinct: greedy repeats
    alone = dict(zip(unique, (e["text"] for e in demo_engine.generate(list(unique.values()))),
                     strict=True))
    assert [r["status"] for r in results] == ["succeeded"] * 200
    assert [r["text"] for r in results] == [alone[json.dumps(r, sort_keys=True)] for r in requests]
    assert all(r["worker"] == "w1@test" and r["usage"]["completion_tokens"] >= 1 for r in results)
    sizes = [r["batch"]["size"] for r in results]
    assert sum(sizes) / len(sizes) > 4, "batches did not form"
    assert all(r["timings"]["total_ms"] >= r["timings"]["generate_ms"] for r in results)
    # Celery users read the same result through AsyncResult
    from celery.result import AsyncResult

    assert AsyncResult(ids[0], app=client.app).get(timeout=5)["text"] == results[0]["text"]


def test_sigkill_mid_batch_then_new_worker_finishes_everything_once(client, start_worker,
                                                                      demo_engine):
    requests = [chat(i, n=48) for i in range(40)]
    first = start_worker("victim@test", GENQ_MAX_BATCH_SIZE="8")
    job = client.submit_many(requests)
    deadline = time.monotonic() + 60
    while client.job(job)["counts"]["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # mid-batch
    first.kill()
    first.wait()
    killed_at = time.monotonic()
    start_worker("rescuer@test", GENQ_MAX_BATCH_SIZE="8")
    info = client.wait_job(job, timeout=300)
    assert info["counts"] == {"total": 40, "queued": 0, "running": 0, "succeeded": 40,
                              "failed": 0, "cancelled": 0, "expired": 0}
    results = list(client.job_results(job))
    assert [r["text"] for r in results] == [e["text"] for e in demo_engine.generate(requests)]
    assert {r["worker"] for r in results} >= {"rescuer@test"}
    print(f"redelivered and finished {time.monotonic() - killed_at:.1f}s after SIGKILL")


def test_redis_restart_with_queued_requests_loses_none(client, start_worker, redis_server):
    requests = [chat(i, n=16) for i in range(60)]
    job = client.submit_many(requests)
    ids = [r["id"] for r in client.job_results(job)]
    redis_server.stop()  # SIGTERM: the append-only file is flushed
    redis_server.start()
    assert redis.Redis.from_url(redis_server.url).llen("genq.bulk") == 60
    start_worker()
    info = client.wait_job(job, timeout=300)
    assert info["counts"]["succeeded"] == 60 and info["counts"]["total"] == 60
    assert [r["id"] for r in client.job_results(job)] == ids


def test_redis_restart_while_a_worker_runs(client, start_worker, redis_server):
    start_worker()
    job = client.submit_many([chat(i, n=24) for i in range(48)])
    time.sleep(1.0)
    redis_server.stop()
    time.sleep(1.0)
    redis_server.start()
    info = client.wait_job(job, timeout=300)
    assert info["counts"]["succeeded"] == 48 and info["counts"]["failed"] == 0


def test_cancel_queued_and_running_and_expiry(client, start_worker):
    queued = client.submit(**chat(1))
    expiring = client.submit(**chat(2), expires_in_s=0.5)
    assert client.cancel(queued) is True
    assert client.get(queued)["status"] == "cancelled"
    time.sleep(1.0)
    start_worker()
    assert client.wait(expiring, timeout=60)["status"] == "expired"
    assert client.wait(queued, timeout=60)["status"] == "cancelled"
    assert client.get(queued)["usage"] is None  # never generated

    running = client.submit(prompt="Once upon a time, in a land far away,", max_new_tokens=400)
    deadline = time.monotonic() + 60
    while client.get(running)["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.3)
    assert client.cancel(running) is True
    res = client.wait(running, timeout=60)
    assert res["status"] == "cancelled" and res["finish_reason"] == "cancelled"
    assert 0 < res["usage"]["completion_tokens"] < 400 and res["text"]
    assert client.cancel(running) is False  # already final
    with pytest.raises(NotFound):
        client.cancel("no-such-id")


def test_cancel_job(client, start_worker):
    job = client.submit_many([chat(i) for i in range(30)])
    assert client.cancel_job(job) == 30
    start_worker()
    info = client.wait_job(job, timeout=60)
    assert info["counts"]["cancelled"] == 30 and info["status"] == "cancelled"


def test_interactive_served_before_queued_bulk(client, start_worker):
    t_bulk = time.time()
    bulk = client.submit_many([chat(i, n=16) for i in range(24)])
    t_inter = time.time()
    interactive = [client.submit(**chat(i, n=16)) for i in range(4)]
    start_worker(GENQ_MAX_BATCH_SIZE="4", GENQ_BATCH_WAIT_MS="300")
    client.wait_job(bulk, timeout=300)
    # absolute finish times, from each request's submit time and its total_ms
    inter_done = [t_inter + client.wait(i, timeout=60)["timings"]["total_ms"] / 1000
                  for i in interactive]
    bulk_done = sorted(t_bulk + r["timings"]["total_ms"] / 1000 for r in client.job_results(bulk))
    assert max(inter_done) < bulk_done[0] + 0.05  # the first batch was the interactive one


def test_poison_requests_fail_alone(client, start_worker, redis_url):
    from kombu import Connection

    from worker.queue.app import TASK_NAME

    start_worker(GENQ_BATCH_WAIT_MS="500")
    good = [client.submit(**chat(i)) for i in range(3)]
    too_long = "too-long"  # sent by a foreign producer: the client would refuse it
    client.app.send_task(TASK_NAME, args=[{"prompt": "word " * 9000, "max_new_tokens": 8}],
                         task_id=too_long, queue="genq.interactive")
    client.app.send_task(TASK_NAME, args=[{"prompt": 5}], task_id="foreign-bad",
                         queue="genq.interactive")
    client.app.send_task(TASK_NAME, args=["not a dict", 2], task_id="foreign-args",
                         queue="genq.interactive")
    with Connection(redis_url) as conn:  # a pickled message: must be refused, never run
        conn.Producer().publish({"prompt": "x"}, routing_key="genq.interactive",
                                exchange="genq.interactive", serializer="pickle",
                                headers={"id": "pickled", "task": TASK_NAME})
    more = [client.submit(**chat(i)) for i in range(3, 6)]
    for rid in good + more:
        assert client.wait(rid, timeout=120)["status"] == "succeeded"
    assert client.wait(too_long, timeout=60)["error"]["code"] == "prompt_too_long"
    assert client.wait("foreign-bad", timeout=60)["error"]["code"] == "invalid_request"
    assert client.wait("foreign-args", timeout=60)["error"]["code"] == "invalid_request"
    with pytest.raises(NotFound):
        client.get("pickled")
    log = (start_worker.log_dir / "w1@test.log").read_text()
    assert "message_rejected" in log and "pickle" in log.lower()


def test_invalid_and_full_queue_enqueue_nothing(redis_url):
    from worker.client import GenerationClient
    from worker.ops.settings import Settings

    small = GenerationClient(settings=Settings(broker_url=redis_url, max_pending=5))
    r = redis.Redis.from_url(redis_url)
    with pytest.raises(InvalidRequest, match="request 1: max_new_tokens"):
        small.submit_many([chat(0), {**chat(1), "max_new_tokens": 0}])
    small.submit_many([chat(i) for i in range(5)])
    before = set(r.keys("*"))
    with pytest.raises(QueueFull):
        small.submit_many([chat(i) for i in range(2)])
    with pytest.raises(QueueFull):
        small.submit(**chat(0))
    assert set(r.keys("*")) == before and r.llen("genq.bulk") == 5


def test_example_prompts_through_the_service_equal_the_engine(client, start_worker, demo_engine):
    start_worker()
    requests = example_requests(max_new_tokens=24)
    job = client.submit_many(requests)
    client.wait_job(job, timeout=600)
    results = list(client.job_results(job))
    assert [r["text"] for r in results] == [e["text"] for e in demo_engine.generate(requests)]
    assert all(r["batch"]["size"] > 1 for r in results)


def test_worker_metrics_match_what_was_done(client, start_worker):
    import urllib.request

    from worker.stack import free_port

    port = free_port()
    start_worker(GENQ_METRICS_PORT=str(port))
    job = client.submit_many([chat(i) for i in range(20)])
    bad = "too-long"
    client.app.send_task("genq.generate", args=[{"prompt": "word " * 9000}], task_id=bad,
                         queue="genq.bulk")
    client.wait_job(job, timeout=300)
    assert client.wait(bad, timeout=60)["status"] == "failed"
    results = list(client.job_results(job))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    def value(name: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith(name + " ") or x.startswith(name + "{"))
        return float(line.rsplit(" ", 1)[1])

    assert value('genq_requests_total{status="succeeded",worker="w1@test"}') == 20
    assert value('genq_requests_total{status="failed",worker="w1@test"}') == 1
    assert value("genq_generated_tokens_total") == sum(r["usage"]["completion_tokens"] for r in results)
    # one observation per decode step; each row's first token comes from its prefill
    assert value("genq_batch_size_count") == value("genq_decode_steps_total") > 0
    assert value("genq_batch_size_sum") == value("genq_row_steps_total")
    assert value("genq_useful_row_steps_total") == sum(r["usage"]["completion_tokens"] - 1
                                                       for r in results)
    assert value("genq_useful_row_steps_total") == value("genq_row_steps_total")  # continuous
    assert value("genq_worker_up") == 1 and value("genq_worker_busy") == 0
    assert value("genq_out_of_memory_total") == 0 and value("genq_running_rows") == 0
    log = (start_worker.log_dir / "w1@test.log").read_text()
    assert "broker_may_evict" not in log  # the test Redis runs with noeviction


def test_sigterm_finishes_the_batch_and_hands_back_the_rest(client, start_worker):
    import signal

    first = start_worker("leaving@test", GENQ_MAX_BATCH_SIZE="4")
    job = client.submit_many([chat(i, n=32) for i in range(24)])
    deadline = time.monotonic() + 60
    while client.job(job)["counts"]["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    running = {r["id"] for r in client.job_results(job) if r["status"] == "running"}
    first.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert first.wait(60) == 0
    stopped_in = time.monotonic() - t0
    after = {r["id"]: r for r in client.job_results(job)}
    assert all(after[i]["status"] == "succeeded" for i in running)  # the batch in flight finished
    counts = client.job(job)["counts"]
    assert counts["running"] == 0 and counts["succeeded"] < 24
    start_worker("arriving@test")
    info = client.wait_job(job, timeout=300)
    assert info["counts"]["succeeded"] == 24 and info["counts"]["total"] == 24
    assert stopped_in < 30


def test_enqueue_time_token_count_equals_the_workers(client, start_worker, redis_url):
    from worker.errors import PromptTooLong

    start_worker()
    counter = client.counter.get()
    assert counter is not None and counter.model == "SmolLM2-135M-Instruct"
    requests = [*example_requests(6, max_new_tokens=4),
                {"prompt": "Raw text, no template: ünïcödé and emoji 🚀", "max_new_tokens": 4},
                {"prompt": "short", "max_new_tokens": 4}]
    ids = [client.submit(**r) for r in requests]
    for request, rid in zip(requests, ids, strict=True):
        expected = counter.count(client.validate(request))
        assert client.wait(rid, timeout=120)["usage"]["prompt_tokens"] == expected
    before = redis.Redis.from_url(redis_url).llen("genq.interactive")
    with pytest.raises(PromptTooLong, match="context 8192"):
        client.submit(prompt="word " * 8190, max_new_tokens=8)
    assert redis.Redis.from_url(redis_url).llen("genq.interactive") == before


def test_the_static_scheduler_gives_the_same_texts_through_the_service(client, start_worker,
                                                                       demo_engine):
    """GENQ_SCHEDULER=static (kept for comparison) runs whole batches; same texts as the
    continuous engine, rows with smaller max_new_tokens end on time."""
    start_worker(GENQ_SCHEDULER="static", GENQ_MAX_BATCH_SIZE="4")
    requests = [{**r, "max_new_tokens": n} for r, n in
                zip(example_requests(8), [4, 24, 8, 24, 16, 4, 24, 8], strict=True)]
    job = client.submit_many(requests)
    client.wait_job(job, timeout=300)
    results = list(client.job_results(job))
    assert [r["text"] for r in results] == [e["text"] for e in demo_engine.generate(requests)]
    assert all(r["usage"]["completion_tokens"] <= q["max_new_tokens"]
               for r, q in zip(results, requests, strict=True))
    assert {r["worker"] for r in results} == {"w1@test"} and max(r["batch"]["size"] for r in results) > 1
    heartbeat = next(w for w in client.store.workers() if w["name"] == "w1@test")
    assert heartbeat["scheduler"] == "static"


def test_worker_log_carries_no_library_noise(client, start_worker):
    """Banners, progress bars and library warnings stay out of the JSON log (debug only)."""
    start_worker(GENQ_BACKEND="auto")  # unsloth's import included
    assert client.wait(client.submit(prompt="Hi", max_new_tokens=2), timeout=120)["status"] == \
        "succeeded"
    log = (start_worker.log_dir / "w1@test.log").read_text()
    for noise in ("SecurityWarning", "_pytree", "Loading weights", "Failed to load",
                  "Unsloth 20", "should be imported before", "it/s]"):
        assert noise not in log, noise


def test_submit_many_publishes_in_pipelined_batches(client, redis_url):
    """kombu pipelines ``Producer.batch`` only when a timed-out command is never replayed;
    the client's transport must allow it (a worker keeps its retries). Messages carry no
    prompt text in their ``argsrepr`` (Celery events, Flower)."""
    import json

    with client.app.connection_for_write() as conn:
        assert conn.default_channel.supports_batch_publish
    client.submit_many([{"prompt": "secret words", "max_new_tokens": 2}])
    raw = redis.Redis.from_url(redis_url).lrange("genq.bulk", 0, -1)
    assert len(raw) == 1 and b"secret words" not in json.dumps(json.loads(raw[0])["headers"]).encode()
