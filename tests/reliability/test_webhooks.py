"""Webhooks end to end: a real receiver verifies every Standard Webhooks signature, answers
500 twice then 200 for each event, and must see exactly one accepted delivery per event."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
from standardwebhooks.webhooks import Webhook

from tests.test_openai_batches import CHAT, Surface, chat_line
from worker.errors import InvalidRequest
from worker.queue.webhooks import EVENTS_KEY, GLOBAL_KEY, TASK, UnsafeURL, build_event, check_url
from worker.stack import free_port

SECRET = "whsec_" + base64.b64encode(b"genqueue-test-secret-32-bytes!!!").decode()


class Receiver:
    """An HTTP server that fails each event's first two deliveries, then accepts it."""

    def __init__(self):
        self.attempts: Counter = Counter()
        self.accepted: list[tuple[str, str, str]] = []  # (path, event id, type)
        self.bad_signatures = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                try:
                    event = Webhook(SECRET).verify(body, dict(self.headers))
                except Exception:  # noqa: BLE001 - any verification failure
                    receiver.bad_signatures += 1
                    self.send_response(400)
                    self.end_headers()
                    return
                key = (self.path, self.headers["webhook-id"])
                receiver.attempts[key] += 1
                ok = receiver.attempts[key] > 2
                if ok:
                    receiver.accepted.append((*key, event["type"]))
                self.send_response(200 if ok else 500)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_private_and_odd_targets_are_refused(client):
    for url in ("http://127.0.0.1:9/x", "http://169.254.169.254/latest", "http://10.1.2.3/",
                "http://[::1]:80/", "http://localhost/hook"):
        with pytest.raises(UnsafeURL):
            check_url(url, allow_private=False)
    with pytest.raises(UnsafeURL):
        check_url("ftp://example.com/x", allow_private=True)
    check_url("http://127.0.0.1:9/x", allow_private=True)
    with pytest.raises(InvalidRequest, match="not a public address"):
        client.submit(prompt="x", webhook_url="http://169.254.169.254/latest")
    with pytest.raises(InvalidRequest, match="webhook_url"):
        client.submit(prompt="x", webhook_url="file:///etc/passwd")


@pytest.mark.slow
def test_signed_deliveries_retry_until_accepted_once_per_event(redis_url, start_worker,
                                                               tiny_model_dir, tmp_path):
    from worker.client import GenerationClient
    from worker.ops.settings import Settings

    receiver = Receiver()
    env = {**os.environ, "GENQ_BROKER_URL": redis_url, "GENQ_WEBHOOK_SECRET": SECRET,
           "GENQ_WEBHOOK_URL": receiver.url + "/global", "GENQ_WEBHOOK_ALLOW_PRIVATE": "1",
           "GENQ_VISIBILITY_TIMEOUT_S": "60"}
    log = open(tmp_path / "notifier.log", "wb")  # noqa: SIM115
    notifier = subprocess.Popen([sys.executable, "-m", "worker.cli", "notifier"], env=env,
                                stdout=log, stderr=log)
    try:
        r = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 60
        while not r.exists("genq:webhooks:global"):
            assert notifier.poll() is None, (tmp_path / "notifier.log").read_text()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        start_worker(GENQ_MODEL=str(tiny_model_dir))
        client = GenerationClient(settings=Settings(broker_url=redis_url,
                                                    webhook_allow_private=True))
        rid = client.submit(prompt="hello", max_new_tokens=3, webhook_url=receiver.url + "/req")
        job = client.submit_many([{"prompt": f"p{i}", "max_new_tokens": 3} for i in range(4)],
                                 webhook_url=receiver.url + "/job")
        gone = client.submit_many([{"prompt": "never", "max_new_tokens": 3, "priority": "bulk",
                                    "expires_in_s": 600}] * 2, webhook_url=receiver.url + "/job")
        client.cancel_job(gone)
        client.wait(rid, timeout=120)
        client.wait_job(job, timeout=120)
        expected = {("/req", "generation.completed"), ("/global", "generation.completed"),
                    ("/job", "batch.completed"), ("/global", "batch.completed"),
                    ("/job", "batch.cancelled"), ("/global", "batch.cancelled")}
        deadline = time.monotonic() + 90
        while {(p, t) for p, _, t in receiver.accepted} != expected:
            assert time.monotonic() < deadline, (receiver.accepted, dict(receiver.attempts))
            time.sleep(0.2)
        time.sleep(3)  # nothing more arrives: no duplicate acceptance
    finally:
        notifier.terminate()
        notifier.wait(30)
        receiver.server.shutdown()
    ids = [(p, i) for p, i, _ in receiver.accepted]
    assert len(ids) == len(set(ids)) == 6  # exactly one accepted delivery per event and target
    assert all(receiver.attempts[k] == 3 for k in ids)  # 500, 500, then 200
    assert receiver.bad_signatures == 0
    print(json.dumps({"accepted": receiver.accepted}))


def test_an_openai_batch_event_names_the_batch(client):
    """Events are written by the finish script itself; a job behind an OpenAI batch is
    reported with the batch's id."""
    r = client.store.redis
    r.set(GLOBAL_KEY, 1, ex=60)
    job = client.submit_many([{"prompt": "a"}, {"prompt": "b"}])
    r.hset(f"genq:job:{job}", "batch", "batch_abc")
    r.set("genq:batch:batch_abc", json.dumps({"status": "in_progress", "ending": "cancelled"}))
    assert client.cancel_job(job) == 2
    [raw] = r.lrange(EVENTS_KEY, 0, -1)
    event_id, payload, own = build_event(raw, client.store)
    assert payload["type"] == "batch.cancelled" and own is None
    assert payload["data"]["id"] == "batch_abc" and payload["data"]["job_id"] == job
    assert build_event(raw, client.store)[0] == event_id  # the same id on every redelivery


def test_logs_name_a_webhook_by_its_origin_only():
    from worker.queue.webhooks import _origin

    assert _origin("https://u:pw@hooks.example:8443/in/s3cr3t?token=abc") == "https://hooks.example:8443"
    assert _origin("http://10.0.0.1/x") == "http://10.0.0.1"
    assert _origin("http://[::1") == "(unparseable URL)"


class Sink:
    """An HTTP server on 127.0.0.1 that answers 204 and keeps each request's path and headers."""

    def __init__(self):
        self.seen: list[tuple[str, dict]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                sink.seen.append((self.path, {**headers, "body": body}))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def delivery_task(allow_private: bool):
    """The notifier's delivery task, called in this process (not through a broker)."""
    from celery import Celery

    from worker.ops.settings import Settings
    from worker.queue.webhooks import register

    app = Celery("webhooks-test")
    register(app, Settings(webhook_allow_private=allow_private, webhook_secret=SECRET))
    return app.tasks[TASK]


def test_a_rebinding_name_is_resolved_once_and_only_the_checked_address_is_connected(monkeypatch):
    """A name that resolves to a public address, then to 127.0.0.1 (DNS rebinding): the
    delivery connects to the public address it checked and never reaches the private one."""
    sink, public = Sink(), "93.184.215.14"
    answers = iter([public])
    real_resolve, real_connect = socket.getaddrinfo, socket.create_connection

    def rebinding(host, *args, **kwargs):
        if host != "hooks.rebind.test":
            return real_resolve(host, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers, "127.0.0.1"), 0))]

    connected = []

    def connect(address, *args, **kwargs):  # the public address is not reachable from here
        connected.append(address[0])
        if address[0] == public:
            raise ConnectionRefusedError("test: the public address refuses")
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    monkeypatch.setattr(socket, "create_connection", connect)
    deliver = delivery_task(allow_private=False)
    deliver(f"http://hooks.rebind.test:{sink.port}/in", "evt_rebind", "{}", 0.0)  # 0: no retry
    assert connected == [public] and sink.seen == []
    sink.server.shutdown()


def test_a_delivery_to_a_name_keeps_its_host_and_signature():
    """Allowed private targets (GENQ_WEBHOOK_ALLOW_PRIVATE=1) still get the POST through the
    pinned address, with the URL's Host header and a valid signature."""
    sink = Sink()
    delivery_task(allow_private=True)(f"http://localhost:{sink.port}/in?t=1", "evt_ok",
                                      '{"type":"x"}', time.time())
    [(path, headers)] = sink.seen
    assert path == "/in?t=1" and headers["host"] == f"localhost:{sink.port}"
    assert Webhook(SECRET).verify(headers.pop("body"), headers) == {"type": "x"}
    sink.server.shutdown()


def test_an_ended_job_reports_the_status_it_reads(gateway, client, tmp_path):
    """A cancelled OpenAI batch with a success reads ``cancelled`` and its event is
    ``batch.cancelled``; a plain job cancelled after a success reads ``completed`` and its event
    is ``batch.completed``: the event follows the status read back."""
    r, store = client.store.redis, client.store
    r.set(GLOBAL_KEY, 1, ex=60)

    def succeed_first(job: str) -> None:
        record = store.get_many([next(store.job_ids(job))[0]])[0]
        store.finish([{**record, "status": "succeeded", "text": "hi", "finish_reason": "stop",
                       "usage": {"prompt_tokens": 3, "completion_tokens": 1}}])

    def event() -> dict:
        [raw] = r.lrange(EVENTS_KEY, 0, -1)
        r.delete(EVENTS_KEY)
        return build_event(raw, store)[1]

    s = Surface(gateway(files_url=str(tmp_path / "files")), tmp_path / "files")
    batch = s.oai.batches.create(input_file_id=s.upload([chat_line("a", "x"), chat_line("b", "y")]),
                                 endpoint=CHAT, completion_window="24h")
    s.wait(batch.id, until=("in_progress",), timeout=30)  # its job queued
    succeed_first(json.loads(r.get(f"genq:batch:{batch.id}"))["job_id"])
    assert s.oai.batches.cancel(batch.id).status == "cancelling"
    payload = event()
    done = s.wait(batch.id, timeout=30)
    assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("cancelled", 1, 1)
    assert payload["type"] == "batch.cancelled" and payload["data"]["status"] == done.status
    assert payload["data"]["id"] == batch.id

    job = client.submit_many([{"prompt": "a"}, {"prompt": "b"}])
    succeed_first(job)
    assert client.cancel_job(job) == 1
    payload = event()
    assert client.job(job)["status"] == payload["data"]["status"] == "completed"
    assert payload["type"] == "batch.completed"


@pytest.mark.slow
def test_events_are_kept_while_the_notifier_is_down_and_delivered_after(
        redis_url, start_worker, tiny_model_dir, tmp_path):
    """With the notifier stopped, requests and jobs that end still create their events (global
    hook and own hooks), and a notifier started afterwards delivers every one, once. Events
    used to be created only while a key the live notifier refreshed (60 s expiry) existed: the
    stopped notifier now leaves no webhook key with an expiry, so none can lapse however long
    it stays down (checked, instead of waiting out the old 60 s)."""
    from worker.client import GenerationClient
    from worker.ops.settings import Settings

    receiver = Receiver()
    env = {**os.environ, "GENQ_BROKER_URL": redis_url, "GENQ_WEBHOOK_SECRET": SECRET,
           "GENQ_WEBHOOK_URL": receiver.url + "/global", "GENQ_WEBHOOK_ALLOW_PRIVATE": "1"}

    def notifier(name: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115
        return subprocess.Popen([sys.executable, "-m", "worker.cli", "notifier", "--name",
                                 f"{name}@test"], env=env, stdout=log, stderr=log)

    r = redis.Redis.from_url(redis_url)
    first = notifier("first")
    deadline = time.monotonic() + 60
    while not r.exists(GLOBAL_KEY):
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    first.terminate()
    assert first.wait(30) is not None
    webhook_keys = list(r.scan_iter("genq:webhook*"))
    assert GLOBAL_KEY.encode() in webhook_keys
    assert {k: r.ttl(k) for k in webhook_keys} == dict.fromkeys(webhook_keys, -1)  # no expiry
    start_worker(GENQ_MODEL=str(tiny_model_dir))
    client = GenerationClient(settings=Settings(broker_url=redis_url, webhook_allow_private=True))
    rid = client.submit(prompt="hello", max_new_tokens=3)
    job = client.submit_many([{"prompt": f"p{i}", "max_new_tokens": 3} for i in range(3)],
                             webhook_url=receiver.url + "/job")
    client.wait(rid, timeout=60)
    client.wait_job(job, timeout=60)  # events are written with the results (finish.lua)
    assert r.llen(EVENTS_KEY) == 2 and receiver.accepted == []  # kept, not delivered yet
    second = notifier("second")
    try:
        expected = {("/global", "generation.completed"), ("/global", "batch.completed"),
                    ("/job", "batch.completed")}
        deadline = time.monotonic() + 90
        while {(p, t) for p, _, t in receiver.accepted} != expected:
            assert time.monotonic() < deadline, (receiver.accepted, dict(receiver.attempts))
            time.sleep(0.2)
        time.sleep(2)
    finally:
        second.terminate()
        second.wait(30)
        receiver.server.shutdown()
    assert len(receiver.accepted) == 3
