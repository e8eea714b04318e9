"""Celery, for real: a web backend's own Celery app, in processes of its own that never import
``worker``, enqueues, polls, chains, revokes and watches genqueue requests on genqueue's Redis;
and a host Celery worker on the same Redis is a good neighbour (its long acks_late task runs
once while genqueue workers run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from worker.queue.messages import MalformedMessage, parse

pytestmark = pytest.mark.process

HOST_APP = '''
import os, time
from celery import Celery

app = Celery("host", broker=os.environ["HOST_BROKER"], backend=os.environ["HOST_BROKER"])
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                result_accept_content=["json"], worker_hijack_root_logger=False,
                broker_connection_retry_on_startup=True)


@app.task(name="host.postprocess")
def postprocess(result):
    return {"upper": result["text"].upper(), "from": result["id"]}


@app.task(name="host.on_error")
def on_error(task_id):
    return "errback for " + task_id


@app.task(name="host.slow", acks_late=True)
def slow(seconds):
    import redis
    redis.Redis.from_url(os.environ["HOST_BROKER"]).incr("host:slow:runs")
    time.sleep(seconds)
    return "slept"
'''

# every driver proves it is a plain Celery app: nothing of genqueue is imported
PRELUDE = '''
import json, sys, threading, time
from celery import signature
from host_app import app
def out(**kw):
    print(json.dumps(kw), flush=True)
def clean():
    assert not any(m == "worker" or m.startswith("worker.") for m in sys.modules), "imports worker"
'''


def _tiny(model_dir, **extra: str) -> dict[str, str]:
    return {"GENQ_MODEL": str(model_dir), "GENQ_MAX_BATCH_SIZE": "8", **extra}


@pytest.fixture
def host(tmp_path, redis_url):
    """Run driver scripts and a Celery worker of the host app (``host_app.py``), each in a
    process of its own with ``tmp_path`` as its only code."""
    yield from host_processes(tmp_path, redis_url)


def host_processes(tmp_path, redis_url):
    """The ``host`` fixture's body (a generator: the processes are killed when it resumes)."""
    (tmp_path / "host_app.py").write_text(HOST_APP)
    env = {**os.environ, "HOST_BROKER": redis_url, "PYTHONPATH": str(tmp_path)}
    env.pop("GENQ_BROKER_URL", None)
    procs: list[subprocess.Popen] = []

    class Host:
        def driver(self, code: str) -> subprocess.Popen:
            proc = subprocess.Popen([sys.executable, "-c", PRELUDE + code], cwd=tmp_path, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(proc)
            return proc

        def run(self, code: str, timeout: float = 180) -> list[dict]:
            proc = self.driver(code)
            stdout, stderr = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, stderr[-3000:]
            return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]

        def worker(self, *args: str) -> subprocess.Popen:
            log = open(tmp_path / "host-worker.log", "ab")  # noqa: SIM115
            proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "host_app", "worker",
                                     "--loglevel", "INFO", "-n", "host@test", *args],
                                    cwd=tmp_path, env=env, stdout=log, stderr=log)
            procs.append(proc)
            return proc

    yield Host()
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_host_app_enqueues_polls_chains_and_reads_failures(host, start_worker, tiny_model_dir):
    """send_task before any worker runs, with AsyncResult.get already waiting (the result is
    published on Celery's channel as it is stored); a signature chained into a host task; a
    signature's delay(); failures (an invalid request, a malformed one, an eta) read as FAILURE
    with genqueue's error; a link_error callback runs with the request id."""
    t0 = time.monotonic()
    host.worker("--pool", "solo", "-Q", "celery")
    waiting = host.driver('''
r = app.send_task("genq.generate", args=[{"prompt": "Hello", "max_new_tokens": 4}],
                  queue="genq.interactive")
out(state=r.state)
got = r.get(timeout=120)
out(state=r.state, ready=r.ready(), ok=r.successful(), status=got["status"], id=got["id"],
    rid=r.id, tokens=got["usage"]["completion_tokens"], got_at=time.time())
clean()
''')
    assert json.loads(waiting.stdout.readline()) == {"state": "PENDING"}  # get() is waiting now
    start_worker("g1@test", **_tiny(tiny_model_dir))
    stdout, stderr = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, stderr[-3000:]
    first = json.loads(stdout.strip().splitlines()[-1])
    assert first["state"] == "SUCCESS" and first["ready"] and first["ok"]
    assert first["status"] == "succeeded" and first["id"] == first["rid"] and first["tokens"] == 4

    lines = host.run('''
req = {"prompt": "Chained", "max_new_tokens": 3}
gen = signature("genq.generate", args=[req], queue="genq.interactive", app=app)
res = (gen | app.signature("host.postprocess")).apply_async()
value = res.get(timeout=120)
out(kind="chain", value=value, parent=res.parent.state)
d = signature("genq.generate", args=[{"prompt": "Delayed", "max_new_tokens": 2}],
              queue="genq.bulk", app=app).delay()
out(kind="delay", status=d.get(timeout=120)["status"])
errback = app.signature("host.on_error")
errback.freeze()
bad = app.send_task("genq.generate", args=[{"prompt": 5}], queue="genq.interactive",
                    link_error=errback)
malformed = app.send_task("genq.generate", args=["not a request"], queue="genq.interactive")
eta = app.send_task("genq.generate", args=[{"prompt": "x"}], queue="genq.interactive",
                    countdown=30)
for name, r in (("bad", bad), ("malformed", malformed), ("eta", eta)):
    r.get(timeout=120, propagate=False)
    out(kind=name, state=r.state, error=str(r.result), type=type(r.result).__name__,
        info=str(r.info))
out(kind="errback", value=app.AsyncResult(errback.id).get(timeout=180))
failed_chain = (signature("genq.generate", args=[{"prompt": 7}], queue="genq.interactive",
                          app=app) | app.signature("host.postprocess")).apply_async()
try:
    failed_chain.get(timeout=180)
    out(kind="failed_chain", raised=False)
except Exception as exc:  # Celery raises the parent's failure; the next step is marked after
    import time
    deadline = time.monotonic() + 60
    while failed_chain.state != "FAILURE" and time.monotonic() < deadline:
        time.sleep(0.1)
    out(kind="failed_chain", raised=True, error=str(exc), state=failed_chain.state)
clean()
''')
    by = {line.pop("kind"): line for line in lines}
    assert by["chain"]["value"]["upper"] and by["chain"]["parent"] == "SUCCESS"
    assert by["delay"]["status"] == "succeeded"
    for name in ("bad", "malformed", "eta"):
        assert by[name]["state"] == "FAILURE", by[name]
        assert by[name]["type"] == "GenerationFailed"
        assert by[name]["error"].startswith("invalid_request: ") and by[name]["info"] == by[name]["error"]
    assert "prompt" in by["bad"]["error"]
    assert "one request dict" in by["malformed"]["error"]
    assert "eta/countdown" in by["eta"]["error"]
    assert by["errback"]["value"].startswith("errback for ")
    assert by["failed_chain"]["raised"] and by["failed_chain"]["state"] == "FAILURE"
    assert by["failed_chain"]["error"].startswith("invalid_request: ")
    print(f"host app round trips: {time.monotonic() - t0:.1f} s")


def test_host_app_watches_inspects_and_revokes(host, start_worker, tiny_model_dir, redis_url):
    """STARTED while running, task events (what Flower reads) with a runtime, inspect active
    listing the running request, revoke cancelling it; a revoke reaches a request a worker
    started after the revoke fetches; celery -A worker.queue.app inspect ping answers."""
    g2 = start_worker("g2@test", **_tiny(tiny_model_dir))
    lines = host.run('''
events, ids = [], set()
def listen():
    with app.connection() as conn:
        recv = app.events.Receiver(conn, handlers={"*": lambda e: events.append(e)})
        recv.capture(limit=None, timeout=None, wakeup=True)
threading.Thread(target=listen, daemon=True).start()
time.sleep(1.0)
quick = app.send_task("genq.generate", args=[{"prompt": "Quick", "max_new_tokens": 2}],
                      queue="genq.interactive")
quick.get(timeout=60)
long = app.send_task("genq.generate", args=[{"prompt": "Long", "max_new_tokens": 2000}],
                     queue="genq.interactive")
states = []
deadline = time.time() + 60
while long.state != "STARTED" and time.time() < deadline:
    states.append(long.state)
    time.sleep(0.02)
states.append(long.state)
active = app.control.inspect(timeout=2).active() or {}
app.control.revoke(long.id)
long.get(timeout=60, propagate=False)
time.sleep(1.0)
mine = [(e["type"], e.get("runtime")) for e in events if e.get("uuid") in (quick.id, long.id)]
out(states=sorted(set(states)), final=long.state, active=[t["id"] for v in active.values() for t in v],
    long=long.id, quick=quick.id, events=mine)
clean()
''')
    [seen] = lines
    assert "STARTED" in seen["states"] and seen["final"] == "REVOKED"
    assert seen["long"] in seen["active"]
    kinds = [k for k, _ in seen["events"]]
    for kind in ("task-received", "task-started", "task-succeeded", "task-revoked"):
        assert kind in kinds, seen["events"]
    assert all(r is not None and r >= 0 for k, r in seen["events"] if k == "task-succeeded")

    # a revoke outlives the worker that received it: a worker started later honours it
    [revoked] = host.run('''
import uuid
rid = str(uuid.uuid4())
replies = app.control.revoke(rid, reply=True, timeout=2)
out(id=rid, replies=len(replies))
''')
    assert revoked["replies"] == 1
    g2.kill()
    g2.wait()
    start_worker("g3@test", **_tiny(tiny_model_dir))
    [late] = host.run(f'''
r = app.send_task("genq.generate", args=[{{"prompt": "Late", "max_new_tokens": 64}}],
                  queue="genq.interactive", task_id="{revoked['id']}")
r.get(timeout=60, propagate=False)
out(state=r.state)
''')
    assert late["state"] == "REVOKED"

    env = {**os.environ, "GENQ_BROKER_URL": redis_url}
    ping = subprocess.run([sys.executable, "-m", "celery", "-A", "worker.queue.app", "inspect",
                           "ping", "--timeout", "5"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr


def test_host_acks_late_task_runs_once_beside_genqueue(host, start_worker, tiny_model_dir,
                                                       redis_url):
    """A host task with acks_late that runs longer than genqueue's visibility timeout (2 s
    here), on the same Redis database, runs once while genqueue workers run (kombu's restore
    in genqueue processes scans only genqueue's unacked index)."""
    import redis

    start_worker("g4@test", **_tiny(tiny_model_dir, GENQ_VISIBILITY_TIMEOUT_S="2"))
    host.worker("--pool", "threads", "--concurrency", "2", "-Q", "celery")
    [sent] = host.run('''
r = app.send_task("host.slow", args=[8])
out(id=r.id, value=r.get(timeout=60))
clean()
''')
    assert sent["value"] == "slept"
    time.sleep(3)  # a redelivered copy would have started by now
    r = redis.Redis.from_url(redis_url)
    assert int(r.get("host:slow:runs")) == 1
    assert r.zcard("genq:unacked_index") == 0  # genqueue's own index held only its messages


def _message(headers: dict, body: list) -> tuple[list, dict]:
    return body, {"id": "r1", "task": "genq.generate", **headers}


def test_celery_options_are_honoured_or_refused():
    """expires is the deadline (the earlier of it and genqueue's); the canvas is kept;
    eta, time limits and chords are refused by name, with the canvas for the errbacks."""
    body, headers = _message({"expires": "2030-01-01T00:00:00+00:00", "root_id": "root"},
                             [[{"prompt": "x"}], {}, {"callbacks": [{"task": "host.cb"}],
                                                      "errbacks": None, "chain": None}])
    env = parse(body, headers)
    assert env.expires_at == pytest.approx(1893456000.0)
    assert env.canvas == {"callbacks": [{"task": "host.cb"}], "errbacks": [], "chain": [],
                          "root_id": "root"}
    assert env.foreign
    body, headers = _message({"expires": "2030-01-01T00:00:00", "genq_submitted": 1.0,
                              "genq_expires": 2.0}, [[{"prompt": "x"}], {}, {}])
    env = parse(body, headers)
    assert env.expires_at == 2.0 and env.canvas is None and not env.foreign
    for headers, embed, word in (({"eta": "2030-01-01T00:00:00"}, {}, "eta/countdown"),
                                 ({"timelimit": [10, None]}, {}, "time_limit"),
                                 ({}, {"chord": {"task": "x"}, "errbacks": [{"task": "e"}]},
                                  "chord")):
        body, full = _message(headers, [[{"prompt": "x"}], {}, embed])
        with pytest.raises(MalformedMessage, match=word) as caught:
            parse(body, full)
        assert caught.value.request_id == "r1"
    assert caught.value.canvas["errbacks"] == [{"task": "e"}]


