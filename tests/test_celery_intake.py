"""The intake queue ``genq``, for real: a host Celery app (its own process, never importing
``worker``) sends requests there; a notifier's or a worker's intake thread gives each its
queued record before any worker runs it, validates it, applies GENQ_MAX_PENDING and
idempotency keys, and loses nothing and records nothing twice when SIGKILLed mid-way."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import redis

from tests.test_celery_host import _tiny, host_processes
from worker.client import GenerationClient
from worker.ops.settings import Settings
from worker.queue.intake import CONSUMERS_KEY, INTAKE_QUEUE, processing_key

pytestmark = pytest.mark.process


@pytest.fixture
def host(tmp_path, redis_url):
    """A host Celery app's processes (``tests.test_celery_host``)."""
    yield from host_processes(tmp_path, redis_url)


@pytest.fixture
def notifier(redis_url, tmp_path):
    """Start ``genq notifier`` processes (each runs an intake thread); killed after the test."""
    procs: list[subprocess.Popen] = []

    def start(name: str, **env: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "notifier", "--name", name],
                                env={**_env(redis_url), **env}, stdout=log, stderr=log)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _env(redis_url: str) -> dict[str, str]:
    import os

    return {**os.environ, "GENQ_BROKER_URL": redis_url}


def _until(check, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(step)


def test_intake_records_validates_and_applies_quotas_and_idempotency(
        host, notifier, start_worker, tiny_model_dir, redis_url):
    """With no worker running: each request sent to ``genq`` reads queued within about a
    second; a bad request and bad envelopes end FAILURE (AsyncResult) at once; a repeated
    idempotency key with the same body resolves to the first request's result, with another
    body fails idempotency_conflict; past GENQ_MAX_PENDING a request fails queue_full. Then a
    worker runs what was queued, each request once."""
    client = GenerationClient(settings=Settings(broker_url=redis_url))
    notifier("n1@test", GENQ_MAX_PENDING="3")
    r = redis.Redis.from_url(redis_url)
    _until(lambda: r.scard(CONSUMERS_KEY), 60, "the notifier's intake did not start")
    driver = host.driver(f'''
def send(args, **kw):
    return app.send_task("genq.generate", args=args, queue="{INTAKE_QUEUE}", **kw)
sent = {{}}
sent["good"] = send([{{"prompt": "Hello", "max_new_tokens": 3}}])
out(kind="sent", id=sent["good"].id, at=time.time())
sent["bad"] = send([{{"prompt": 5}}])
sent["not_dict"] = send(["not a request"])
sent["two_args"] = send([{{"prompt": "a"}}, {{"prompt": "b"}}])
sent["first"] = send([{{"prompt": "Twice", "max_new_tokens": 3, "idempotency_key": "k1"}}])
sent["repeat"] = send([{{"prompt": "Twice", "max_new_tokens": 3, "idempotency_key": "k1"}}])
sent["conflict"] = send([{{"prompt": "Other", "max_new_tokens": 3, "idempotency_key": "k1"}}])
sent["third"] = send([{{"prompt": "Third", "max_new_tokens": 3}}])
sent["over"] = send([{{"prompt": "Over", "max_new_tokens": 3}}])
out(kind="ids", **{{k: r.id for k, r in sent.items()}})
for name in ("bad", "not_dict", "two_args", "conflict", "over"):
    r = sent[name]
    r.get(timeout=60, propagate=False)
    out(kind=name, state=r.state, error=str(r.result))
for name in ("good", "first", "repeat", "third"):  # the test starts a worker meanwhile
    got = sent[name].get(timeout=300)
    out(kind=name, state=sent[name].state, text=got["text"], id=got["id"])
clean()
''')
    sent = _line(driver)
    record = _until(lambda: _queued(client, sent["id"]), 20, "no queued record", step=0.01)
    assert record["status"] == "queued"
    assert time.time() - sent["at"] < 3.0  # about a second (2 shared CPU cores here)
    ids = _line(driver)
    by = {}
    for _ in range(5):
        line = _line(driver)
        by[line.pop("kind")] = line
    for name, code, words in (("bad", "invalid_request", "prompt"),
                              ("not_dict", "invalid_request", "expected one request dict"),
                              ("two_args", "invalid_request", "expected one request dict"),
                              ("conflict", "idempotency_conflict", "idempotency_key 'k1'"),
                              ("over", "queue_full", "3 requests pending")):
        error = by[name]["error"]
        assert by[name]["state"] == "FAILURE" and error.startswith(code + ": "), by[name]
        assert words in error, by[name]
    for name in ("good", "first", "repeat", "third"):  # queued, nothing run yet
        assert client.get(ids[name])["status"] == "queued"
    assert client.get(ids["over"])["error"]["code"] == "queue_full"
    assert r.llen("genq.interactive") == 3  # good, first, third: the repeat is not queued

    start_worker("g1@test", **_tiny(tiny_model_dir))
    stdout, stderr = driver.communicate(timeout=360)
    assert driver.returncode == 0, stderr[-3000:]
    for line in map(json.loads, stdout.splitlines()):
        by[line.pop("kind")] = line
    for name in ("good", "first", "repeat", "third"):
        assert by[name]["state"] == "SUCCESS", by[name]
    assert by["repeat"]["text"] == by["first"]["text"] and by["repeat"]["id"] == ids["repeat"]
    for name in ("good", "first", "third"):
        assert int(r.get(f"genq:attempts:{ids[name]}")) == 1
    assert r.get(f"genq:attempts:{ids['repeat']}") is None  # resolved, never run


# messages on the intake queue and in every processing list, read at one instant
WAITING = """local n = redis.call('LLEN', KEYS[1])
for _, k in ipairs(redis.call('KEYS', ARGV[1])) do n = n + redis.call('LLEN', k) end
return n"""


def _line(proc: subprocess.Popen) -> dict:
    """The driver's next JSON line (its stderr if it ended instead)."""
    line = proc.stdout.readline()
    assert line, proc.communicate(timeout=10)[1][-3000:]
    return json.loads(line)


def _queued(client: GenerationClient, request_id: str):
    from worker.errors import NotFound

    try:
        return client.get(request_id)
    except NotFound:
        return None


def test_intake_killed_mid_way_loses_nothing_and_records_nothing_twice(
        host, notifier, start_worker, tiny_model_dir, redis_url):
    """Requests wait on ``genq``; a worker is SIGKILLed while messages are in its intake's
    processing list (its intake runs while the model loads); a notifier's intake gives them
    back (after the dead one's beat expires) and settles them: every request is published
    once and recorded, and a worker runs each once."""
    n = 400
    [sent] = host.run(f'''
ids = [app.send_task("genq.generate", args=[{{"prompt": "n%d" % i, "max_new_tokens": 1}}],
                     queue="{INTAKE_QUEUE}").id for i in range({n})]
out(ids=ids)
clean()
''')
    ids = sent["ids"]
    r = redis.Redis.from_url(redis_url)
    for attempt in range(5):
        proc = start_worker(f"k{attempt}@test", wait_ready=False, **_tiny(tiny_model_dir))
        held = _until(lambda proc=proc: [k for k in r.keys(processing_key("*")) if r.llen(k)]
                      or proc.poll() is not None or not r.llen(INTAKE_QUEUE),
                      120, "the intake took nothing", step=0.005)
        proc.kill()
        proc.wait()
        if isinstance(held, list) and any(r.llen(k) for k in held):
            break
    else:
        pytest.fail("never killed an intake while it held messages")
    assert not r.hlen("genq:unacked")  # killed before it ran anything: only its intake held
    notifier("survivor@test")
    _until(lambda: not r.eval(WAITING, 1, INTAKE_QUEUE, processing_key("*")), 60,
           "the dead intake's messages were not given back")
    assert r.scard(CONSUMERS_KEY) == 1  # the dead consumers were forgotten
    queued = [json.loads(m)["headers"]["id"] for m in r.lrange("genq.interactive", 0, -1)]
    assert sorted(queued) == sorted(ids)  # each published once
    client = GenerationClient(settings=Settings(broker_url=redis_url))
    assert {client.get(i)["status"] for i in ids} == {"queued"}

    start_worker("g2@test", **_tiny(tiny_model_dir, GENQ_MAX_BATCH_SIZE="32"))
    for i in ids:
        assert client.wait(i, timeout=300)["status"] == "succeeded"
    assert [int(a) for a in r.mget([f"genq:attempts:{i}" for i in ids])] == [1] * n


def test_celery_options_through_the_real_api(host, start_worker, tiny_model_dir, redis_url):
    """``send_task(expires=...)`` is the deadline (REVOKED, the record ``expired``);
    ``time_limit``, ``soft_time_limit``, ``countdown`` and a real ``chord(...)`` whose header
    holds genq.generate fail invalid_request naming the option; on the intake queue and on
    genq.interactive alike."""
    start_worker("g3@test", **_tiny(tiny_model_dir))
    lines = host.run(f'''
import uuid
from datetime import datetime, timedelta, timezone
from celery import chord
past = datetime.now(timezone.utc) - timedelta(seconds=5)
for q in ("{INTAKE_QUEUE}", "genq.interactive"):
    def send(**options):
        return app.send_task("genq.generate", args=[{{"prompt": "opt", "max_new_tokens": 2}}],
                             queue=q, **options)
    sent = {{"expires": send(expires=past), "time_limit": send(time_limit=30),
            "soft_time_limit": send(soft_time_limit=10), "countdown": send(countdown=30)}}
    header = [signature("genq.generate", args=[{{"prompt": "c%d" % i, "max_new_tokens": 2}}],
                        queue=q, app=app).set(task_id=str(uuid.uuid4())) for i in range(2)]
    chord(header)(app.signature("host.postprocess"))
    for i, sig in enumerate(header):
        sent["chord%d" % i] = app.AsyncResult(sig.options["task_id"])
    for name, r in sent.items():
        r.get(timeout=120, propagate=False)
        out(queue=q, kind=name, id=r.id, state=r.state, error=str(r.result))
clean()
''')
    client = GenerationClient(settings=Settings(broker_url=redis_url))
    words = {"time_limit": "time_limit/soft_time_limit", "soft_time_limit": "time_limit/soft",
             "countdown": "eta/countdown", "chord0": "chord", "chord1": "chord"}
    assert len(lines) == 2 * (len(words) + 1)
    for line in lines:
        if line["kind"] == "expires":
            assert line["state"] == "REVOKED", line
            assert client.get(line["id"])["status"] == "expired"
        else:
            assert line["state"] == "FAILURE" and line["error"].startswith("invalid_request: ")
            assert words[line["kind"]] in line["error"], line


def test_flower_lists_genqueue_tasks_with_states(host, start_worker, tiny_model_dir, redis_url,
                                                 tmp_path):
    """A real Flower process on genqueue's Redis (``celery -A worker.queue.app flower``): its
    HTTP API lists the requests a host app sent, by name, with their final states (one run,
    one refused by a worker, one refused by the intake)."""
    import httpx

    from tests.conftest import wait_answering
    from worker.stack import free_port

    start_worker("g4@test", **_tiny(tiny_model_dir))
    port = free_port()
    log = open(tmp_path / "flower.log", "ab")  # noqa: SIM115
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.queue.app", "flower",
                               f"--port={port}", "--address=127.0.0.1"], stdout=log, stderr=log,
                              env={**_env(redis_url), "FLOWER_UNAUTHENTICATED_API": "true"})
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        wait_answering(http, flower, path="/healthcheck", timeout=120)
        time.sleep(2.0)  # Flower has enabled events and listens
        [sent] = host.run(f'''
good = app.send_task("genq.generate", args=[{{"prompt": "Watched", "max_new_tokens": 2}}],
                     queue="{INTAKE_QUEUE}")
bad = app.send_task("genq.generate", args=[{{"prompt": 5}}], queue="genq.interactive")
refused = app.send_task("genq.generate", args=[{{"prompt": 6}}], queue="{INTAKE_QUEUE}")
good.get(timeout=120)
for r in (bad, refused):
    r.get(timeout=120, propagate=False)
out(good=good.id, bad=bad.id, refused=refused.id)
clean()
''')

        def listed():
            tasks = http.get("/api/tasks").json()
            got = {k: (tasks[v]["name"], tasks[v]["state"]) for k, v in sent.items() if v in tasks}
            return got if got == {"good": ("genq.generate", "SUCCESS"),
                                  "bad": ("genq.generate", "FAILURE"),
                                  "refused": ("genq.generate", "FAILURE")} else None

        _until(listed, 60, "Flower does not list the tasks with their states", step=0.5)
        workers = http.get("/api/workers", params={"refresh": "true"}).json()
        assert "g4@test" in workers
    finally:
        flower.kill()
        flower.wait()


def test_intake_replays_settle_each_message_once(redis_url):
    """The states a crash can leave, replayed by a live intake: outcomes stored but nothing
    committed (each queued request is published once, a repeat never, a failure not stored
    again); a dead consumer's list (given back, then settled); a message already started
    (dropped); a commit replayed after a lost reply (publishes nothing twice); a message whose
    header breaks parsing (fails alone)."""
    from celery import Celery

    from worker.queue.intake import Intake, alive_key

    app = Celery("t", broker=redis_url, backend=redis_url)
    app.conf.update(task_serializer="json", accept_content=["json"])

    def send(request) -> str:
        return app.send_task("genq.generate", args=[request], queue=INTAKE_QUEUE).id

    ids = [send({"prompt": "a", "idempotency_key": "k"}), send({"prompt": "a", "idempotency_key": "k"}),
           send({"prompt": 5}), send({"prompt": "b"})]
    r = redis.Redis.from_url(redis_url)
    raws = r.lrange(INTAKE_QUEUE, 0, -1)[::-1]  # oldest first, as ids
    intake = Intake(Settings(broker_url=redis_url), "t")
    assert intake.step() == 4
    published = r.lrange("genq.interactive", 0, -1)
    records = r.mget([f"genq:r:{i}" for i in ids])
    assert len(published) == 2 and not r.llen(intake.processing)

    r.delete("genq.interactive")  # as if killed before its commit: all stored, nothing sent
    r.lpush(intake.processing, *raws)
    assert intake.step() == 4
    assert sorted(json.loads(m)["headers"]["id"] for m in r.lrange("genq.interactive", 0, -1)) \
        == sorted([ids[0], ids[3]])
    assert r.mget([f"genq:r:{i}" for i in ids]) == records

    r.delete("genq.interactive")
    dead = "dead/1"
    r.lpush(processing_key(dead), *raws)
    r.sadd(CONSUMERS_KEY, dead)
    intake._recovered_at = 0.0
    assert intake.step() == 4 and not r.exists(processing_key(dead))
    assert r.smembers(CONSUMERS_KEY) == {intake.name.encode()} and r.exists(alive_key(intake.name))
    assert r.llen("genq.interactive") == 2

    # a consumer that wakes after its list was given back: a started request is not sent again
    running = {**json.loads(r.get(f"genq:r:{ids[3]}")), "status": "running"}
    r.set(f"genq:r:{ids[3]}", json.dumps(running))
    r.delete("genq.interactive")
    r.lpush(intake.processing, raws[3])
    assert intake.step() == 1 and not r.llen("genq.interactive")
    assert json.loads(r.get(f"genq:r:{ids[3]}"))["status"] == "running"

    r.lpush(intake.processing, raws[0])
    for _ in range(2):  # the same commit twice: the second finds nothing to un-list
        intake._commit(keys=[intake.processing], args=[raws[0], "genq.interactive", b"copy"])
    assert r.lrange("genq.interactive", 0, -1).count(b"copy") == 1

    poison = json.loads(raws[3])
    poison["headers"].update(id="poison", genq_weight=float("inf"))
    r.lpush(INTAKE_QUEUE, json.dumps(poison), raws[3].replace(ids[3].encode(), b"after"))
    assert intake.step() == 2
    failed = GenerationClient(settings=Settings(broker_url=redis_url)).get("poison")
    assert failed["error"]["code"] == "invalid_request" and "OverflowError" in failed["error"]["message"]
    assert GenerationClient(settings=Settings(broker_url=redis_url)).get("after")["status"] == "queued"
