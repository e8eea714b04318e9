"""OpenAI's Batch API (``/v1/batches``) driven by the official ``openai`` SDK against a real
gateway (uvicorn), a real Redis and real workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import redis

from tests.conftest import example_requests, wait_answering
from worker.compat.storage import FileStore

CHAT = "/v1/chat/completions"


class Surface:
    """The SDK on one gateway, with the file store the gateway writes to (for uploads and
    downloads while the ``/v1/files`` routes are not there)."""

    def __init__(self, http: httpx.Client, files_root: Path, key: str = "x", owner: str | None = None):
        self.http = http
        self.oai = openai.OpenAI(base_url=f"{str(http.base_url).rstrip('/')}/v1", api_key=key, max_retries=0)
        self.store = FileStore(str(files_root), 512 * 1024 * 1024)
        self.owner = owner
        self.routes = http.get("/v1/files", headers={"Authorization": f"Bearer {key}"}
                               ).status_code not in (404, 405)

    def upload(self, lines: list, purpose: str = "batch") -> str:
        data = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()
        if self.routes and purpose == "batch":
            return self.oai.files.create(file=("input.jsonl", data), purpose="batch").id
        return self.store.create([data], "input.jsonl", purpose, self.owner)["id"]

    def lines(self, file_id: str) -> list[dict]:
        if self.routes:
            text = self.oai.files.content(file_id).text
        else:
            text = b"".join(self.store.read_chunks(file_id)).decode()
        return [json.loads(x) for x in text.splitlines() if x.strip()]

    def wait(self, batch_id: str, until=("completed", "failed", "expired", "cancelled"),
             timeout: float = 120):
        deadline = time.monotonic() + timeout
        while True:
            batch = self.oai.batches.retrieve(batch_id)
            if batch.status in until:
                return batch
            assert time.monotonic() < deadline, batch
            time.sleep(0.1)


def chat_line(custom_id: str, content: str, max_tokens: int = 8, model: str | None = "demo",
              **body) -> dict:
    """An OpenAI Batch line (greedy; ``model`` None: left out, the base model answers)."""
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, **body}
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": body if model is None else {"model": model, **body}}


@pytest.fixture
def surface(gateway, tmp_path):
    """A factory: ``surface(key=..., owner=..., **settings)`` (settings apply to the first
    call, which starts the gateway)."""
    made: dict = {}

    def make(key: str = "x", owner: str | None = None, **settings) -> Surface:
        if "http" not in made:
            made["http"] = gateway(files_url=str(tmp_path / "files"), **settings)
        return Surface(made["http"], tmp_path / "files", key, owner)

    return make


@pytest.mark.slow
def test_batch_output_equals_the_engine_in_input_order(surface, start_worker, demo_engine):
    s = surface()
    start_worker(GENQ_SELF_CHECK="off")  # the demo model (compared with the engine below)
    requests = [{"messages": [{"role": "user", "content": "Name a color."}], "max_new_tokens": 10},
                {"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "What is 2 + 2?"}], "max_new_tokens": 10},
                {"messages": [{"role": "user", "content": "Say hello in French."}],
                 "max_new_tokens": 10},
                example_requests(1, max_new_tokens=10)[0]]
    lines = [{"custom_id": f"q{i}", "method": "POST", "url": CHAT,
              "body": {"model": "demo", "messages": r["messages"], "max_tokens": 10,
                       "temperature": 0}} for i, r in enumerate(requests)]
    created = s.oai.batches.create(input_file_id=s.upload(lines), endpoint=CHAT,
                                   completion_window="24h", metadata={"run": "eq"})
    assert created.object == "batch" and created.id.startswith("batch_")
    assert created.status == "validating" and created.metadata == {"run": "eq"}
    assert created.expires_at == created.created_at + 86400
    done = s.wait(created.id)
    assert done.status == "completed", done
    assert done.request_counts.model_dump() == {"total": 4, "completed": 4, "failed": 0}
    assert done.error_file_id is None and done.completed_at >= done.finalizing_at >= done.created_at
    assert done.usage.output_tokens > 0 and done.model
    out = s.lines(done.output_file_id)
    assert [o["custom_id"] for o in out] == ["q0", "q1", "q2", "q3"]
    expected = demo_engine.generate([{**r, "temperature": 0.0} for r in requests])
    for line, want in zip(out, expected, strict=True):
        assert line["error"] is None and line["id"] == f"batch_req_{line['response']['request_id']}"
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == want["text"]
        assert body["usage"]["completion_tokens"] == want["usage"]["completion_tokens"]
    if s.routes:
        assert s.oai.files.retrieve(done.output_file_id).purpose == "batch_output"


def test_file_level_faults_fail_the_batch_and_queue_nothing(surface, redis_url):
    """Only a fault of the file (not JSON, no or a duplicate ``custom_id``, another ``url`` or
    ``method``) fails a batch; its errors name every such line and no other."""
    s = surface()
    lines = [
        chat_line("ok-1", "fine"),                                            # 1
        "this is not json",                                                   # 2
        {**chat_line("url", "x"), "url": "/v1/embeddings"},                   # 3
        chat_line("ok-1", "duplicate custom_id"),                             # 4
        chat_line("temp", "x", temperature=-1),                               # 5: a bad body
        {"method": "POST", "url": CHAT, "body": {"messages": []}},            # 6: no custom_id
        "",                                                                   # 7: blank, skipped
        {**chat_line("get", "x"), "method": "GET"},                           # 8
        chat_line("ok-2", "fine too"),                                        # 9
        chat_line("model", "x", model="gpt-4o"),                              # 10: a bad body
    ]
    created = s.oai.batches.create(input_file_id=s.upload(lines), endpoint=CHAT,
                                   completion_window="24h")
    assert created.status == "validating"
    batch = s.wait(created.id, timeout=30)
    assert batch.status == "failed" and batch.failed_at and batch.errors.object == "list"
    by_line = {e.line: e for e in batch.errors.data}
    assert sorted(by_line) == [2, 3, 4, 6, 8], batch.errors
    assert by_line[2].code == "invalid_json_line"
    assert by_line[3].code == "invalid_url" and by_line[3].param == "url"
    assert by_line[4].code == "duplicate_custom_id"
    assert by_line[6].param == "custom_id" and by_line[8].param == "method"
    assert s.oai.batches.retrieve(batch.id).status == "failed"
    r = redis.Redis.from_url(redis_url)
    assert not r.keys("genq:job:*") and not r.keys("genq:r:*")  # nothing queued
    assert s.http.get("/demand").json()["total"] == 0

    empty = s.oai.batches.create(input_file_id=s.upload([""]), endpoint=CHAT,
                                 completion_window="24h")
    empty = s.wait(empty.id, timeout=30)
    assert empty.status == "failed" and empty.errors.data[0].code == "empty_file"
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        s.oai.batches.create(input_file_id=s.upload([chat_line("a", "b")]), endpoint=CHAT,
                             completion_window="forever")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        s.oai.batches.create(input_file_id=s.upload([chat_line("a", "b")], purpose="batch_output"),
                             endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        s.oai.batches.create(input_file_id="file-0123456789abcdef", endpoint=CHAT,
                             completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        s.oai.batches.retrieve("batch_nope")
    with pytest.raises(openai.BadRequestError):  # the endpoint genqueue does not serve
        s.oai.batches.create(input_file_id=s.upload([chat_line("a", "b")]),
                             endpoint="/v1/embeddings", completion_window="24h")


def test_short_window_expires_queued_requests(surface):
    """No worker: past ``expires_at`` every open request ends, in the error file as
    ``batch_expired``; a window shorter than 24h is a genqueue extension."""
    s = surface()
    batch = s.oai.batches.create(input_file_id=s.upload([chat_line("a", "x"), chat_line("b", "y")]),
                                 endpoint=CHAT, completion_window="1s")
    # on a loaded machine the create call itself can outlast a 1 s window
    assert batch.status == "validating" and batch.expires_at == batch.created_at + 1
    done = s.wait(batch.id, timeout=30)
    assert done.status == "expired" and done.expired_at and done.output_file_id is None
    assert done.request_counts.model_dump() == {"total": 2, "completed": 0, "failed": 2}
    errs = s.lines(done.error_file_id)
    assert [(e["custom_id"], e["response"], e["error"]["code"]) for e in errs] == [
        ("a", None, "batch_expired"), ("b", None, "batch_expired")]


def test_list_pagination_ownership_and_cancel(surface):
    keys = {"api_keys": "alice:ka,bob:kb", "admin_keys": "root:kr"}
    alice = surface(key="ka", owner="alice", **keys)
    bob, root = surface(key="kb", owner="bob"), surface(key="kr", owner="root")
    file_id = alice.upload([chat_line("a", "x"), chat_line("b", "y")])
    made = [alice.oai.batches.create(input_file_id=file_id, endpoint=CHAT,
                                     completion_window="24h").id for _ in range(5)]
    theirs = bob.oai.batches.create(input_file_id=bob.upload([chat_line("c", "z")]),
                                    endpoint=CHAT, completion_window="24h")
    page = alice.oai.batches.list(limit=2)
    assert [b.id for b in page.data] == made[::-1][:2] and page.has_more
    page2 = alice.oai.batches.list(limit=2, after=page.data[-1].id)
    assert [b.id for b in page2.data] == made[::-1][2:4] and page2.has_more
    page3 = alice.oai.batches.list(limit=2, after=page2.data[-1].id)
    assert [b.id for b in page3.data] == made[:1] and not page3.has_more
    assert [b.id for b in alice.oai.batches.list(limit=2)] == made[::-1]  # auto-pagination
    raw = alice.http.get("/v1/batches", params={"limit": 2},
                         headers={"Authorization": "Bearer ka"}).json()
    assert raw["object"] == "list" and raw["first_id"] == made[-1] and raw["last_id"] == made[-2]
    assert [b.id for b in bob.oai.batches.list()] == [theirs.id]
    assert {b.id for b in root.oai.batches.list()} == {*made, theirs.id}

    with pytest.raises(openai.NotFoundError):
        bob.oai.batches.retrieve(made[0])
    with pytest.raises(openai.NotFoundError):
        bob.oai.batches.cancel(made[0])
    with pytest.raises(openai.NotFoundError):  # another key's input file
        bob.oai.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    assert root.oai.batches.retrieve(made[0]).id == made[0]

    # no worker: every request is queued, so a cancel ends them all at once
    cancelling = alice.oai.batches.cancel(made[0])
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    done = alice.wait(made[0], timeout=10)
    assert done.status == "cancelled" and done.cancelled_at and done.output_file_id is None
    assert [e["error"]["code"] for e in alice.lines(done.error_file_id)] == ["batch_cancelled"] * 2
    if bob.routes:  # the batch's files are its owner's
        with pytest.raises(openai.NotFoundError):
            bob.oai.files.content(done.error_file_id)
    assert alice.oai.batches.cancel(made[0]).status == "cancelled"  # again: unchanged
    with pytest.raises(openai.BadRequestError):
        alice.oai.batches.list(limit=0)


@pytest.mark.slow
def test_worker_failures_go_to_the_error_file_and_finalize_once(surface, start_worker,
                                                                tiny_model_dir, tmp_path):
    s = surface()
    lines = [chat_line("short-1", "hello"),
             chat_line("long", "word " * 200),  # over the worker's GENQ_MAX_PROMPT_TOKENS
             chat_line("short-2", "bye", max_tokens=5)]
    # queued before any worker has published its tokenizer: the prompt's length is the
    # worker's to check, and it fails there
    batch = s.oai.batches.create(input_file_id=s.upload(lines), endpoint=CHAT,
                                 completion_window="24h")
    assert s.wait(batch.id, until=("in_progress",)).request_counts.total == 3
    completions = None
    if serves_completions():
        completions = s.oai.batches.create(input_file_id=s.upload([
            {"custom_id": "p1", "method": "POST", "url": "/v1/completions",
             "body": {"model": "demo", "prompt": "Once upon", "max_tokens": 4, "temperature": 0}}]),
            endpoint="/v1/completions", completion_window="24h")
        assert s.wait(completions.id, until=("in_progress",)).status == "in_progress"
    start_worker(GENQ_MODEL=str(tiny_model_dir), GENQ_MAX_PROMPT_TOKENS="64", GENQ_SELF_CHECK="off")
    deadline = time.monotonic() + 60
    job_done = False
    store = FileStore(str(tmp_path / "files"), 1 << 20)
    while not job_done:  # wait for the requests, not the batch, so the reads below race
        assert time.monotonic() < deadline
        listed = {b.id: b for b in s.oai.batches.list()}  # a list never finalizes
        job_done = listed[batch.id].status == "finalizing"
        time.sleep(0.05)
    seen: list = []
    threads = [threading.Thread(target=lambda: seen.append(s.oai.batches.retrieve(batch.id)))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = s.wait(batch.id)
    assert done.status == "completed"
    assert {b.output_file_id for b in seen if b.status == "completed"} <= {done.output_file_id}
    outputs = [f for f in store.list(purpose="batch_output") if f["filename"].startswith(batch.id)]
    assert len(outputs) == 2  # one output and one error file: finalized once
    assert done.request_counts.model_dump() == {"total": 3, "completed": 2, "failed": 1}
    out, errs = s.lines(done.output_file_id), s.lines(done.error_file_id)
    assert [o["custom_id"] for o in out] == ["short-1", "short-2"]
    rid = errs[0]["response"]["request_id"]  # the worker refused it: the endpoint's 400
    assert errs == [{"id": f"batch_req_{rid}", "custom_id": "long", "error": None, "response": {
        "status_code": 400, "request_id": rid, "body": {"error": {
            "message": errs[0]["response"]["body"]["error"]["message"],
            "type": "invalid_request_error", "param": None, "code": "prompt_too_long"}}}}]
    if completions is not None:
        done = s.wait(completions.id)
        assert done.status == "completed" and done.endpoint == "/v1/completions"
        body = s.lines(done.output_file_id)[0]["response"]["body"]
        assert body["object"] == "text_completion" and isinstance(body["choices"][0]["text"], str)


def serves_completions() -> bool:
    """Whether ``from_openai`` translates ``/v1/completions`` lines yet."""
    from worker.compat.translate import from_openai
    from worker.errors import InvalidRequest

    try:
        from_openai({"custom_id": "p", "method": "POST", "url": "/v1/completions",
                     "body": {"prompt": "x", "max_tokens": 1}})
    except InvalidRequest:
        return False
    return True


@pytest.mark.slow
def test_cancel_and_expiry_mid_run_keep_partial_results(surface, start_worker, tiny_model_dir,
                                                        redis_url):
    s = surface()
    start_worker(GENQ_MODEL=str(tiny_model_dir), GENQ_MAX_BATCH_SIZE="1", GENQ_POOL_SIZE="1",
                 GENQ_SELF_CHECK="off")
    r = redis.Redis.from_url(redis_url, decode_responses=True)

    def run(ids: str):
        lines = [chat_line(f"{ids}-quick", "hi", max_tokens=2, model=None)]
        lines += [chat_line(f"{ids}-slow{i}", f"go {i}", max_tokens=1900, model=None)
                  for i in range(3)]
        batch = s.oai.batches.create(input_file_id=s.upload(lines), endpoint=CHAT,
                                     completion_window="24h")
        deadline = time.monotonic() + 60
        while s.oai.batches.retrieve(batch.id).request_counts.completed < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        return batch

    batch = run("c")
    cancelling = s.oai.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    done = s.wait(batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    assert done.request_counts.total == 4 and done.request_counts.failed >= 1
    out, errs = s.lines(done.output_file_id), s.lines(done.error_file_id)
    assert "c-quick" in [o["custom_id"] for o in out]
    assert len(out) + len(errs) == 4 and {e["error"]["code"] for e in errs} == {"batch_cancelled"}

    batch = run("e")
    key = f"genq:batch:{batch.id}"  # the 24h window, passed
    r.set(key, json.dumps({**json.loads(r.get(key)), "expires_at": int(time.time()) - 1}),
          keepttl=True)
    done = s.wait(batch.id)
    assert done.status == "expired" and done.expired_at
    out, errs = s.lines(done.output_file_id), s.lines(done.error_file_id)
    assert "e-quick" in [o["custom_id"] for o in out]
    assert len(out) + len(errs) == 4 and {e["error"]["code"] for e in errs} == {"batch_expired"}
    assert done.request_counts.failed == len(errs) >= 1


@pytest.mark.slow
def test_a_bad_body_answers_alone_and_each_line_is_read_and_tokenized_once(
        surface, start_worker, tiny_model_dir, monkeypatch):
    """The create call answers ``validating`` at once; a body genqueue cannot run is that
    line's own HTTP answer in the error file (OpenAI's shape: 400, or 404 for an unknown
    model), counted as failed, and the other lines run. The input file is opened once and
    each runnable line's prompt tokenized once."""
    from worker.compat.storage import FileStore as Store
    from worker.tokencount import PromptCounter

    s = surface()
    start_worker(GENQ_MODEL=str(tiny_model_dir), GENQ_MAX_PROMPT_TOKENS="64", GENQ_SELF_CHECK="off",
                 GENQ_MAX_NEW_TOKENS_LIMIT="16")
    opened, counted = [], []
    real_open, real_count = Store.open, PromptCounter.count_many
    monkeypatch.setattr(Store, "open", lambda self, *a, **k: opened.append(a) or real_open(self, *a, **k))
    monkeypatch.setattr(PromptCounter, "count_many",  # one per prompt counted, however batched
                        lambda self, rs: counted.extend(rs) or real_count(self, rs))
    bad_messages = chat_line("messages", "x", model=None)
    bad_messages["body"]["messages"] = "not a list"
    lines = [chat_line("a", "hello", model=None), bad_messages,
             chat_line("temp", "x", model=None, temperature=-1),
             chat_line("b", "bye", max_tokens=None, model=None),  # OpenAI's: what fits
             chat_line("model", "x", model="gpt-4o"), chat_line("long", "word " * 200, model=None),
             chat_line("c", "again", model=None)]
    file_id = s.upload(lines)
    started = time.monotonic()
    created = s.oai.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    answered_s = time.monotonic() - started
    assert created.status == "validating" and created.request_counts.total == 0, created
    done = s.wait(created.id)
    assert done.status == "completed" and done.errors is None, done
    assert done.request_counts.model_dump() == {"total": 7, "completed": 3, "failed": 4}, \
        s.lines(done.error_file_id)
    assert len(opened) == 1 and len(counted) == 4  # a, b, long, c: each once
    assert [o["custom_id"] for o in s.lines(done.output_file_id)] == ["a", "b", "c"]
    errs = s.lines(done.error_file_id)
    assert [(e["custom_id"], e["error"], e["response"]["status_code"]) for e in errs] == [
        ("messages", None, 400), ("temp", None, 400), ("model", None, 404), ("long", None, 400)]
    for e in errs:
        assert e["id"] == f"batch_req_{e['response']['request_id']}"
        assert set(e["response"]["body"]["error"]) == {"message", "type", "param", "code"}
    body = {e["custom_id"]: e["response"]["body"]["error"] for e in errs}
    assert body["messages"]["param"] == "body.messages" and body["messages"]["type"] == \
        "invalid_request_error" and body["messages"]["code"] == "invalid_request"
    assert body["temp"]["param"] == "body.temperature"
    assert body["model"]["code"] == "model_not_found" and body["model"]["type"] == "not_found_error"
    assert body["long"]["code"] == "prompt_too_long" and "64" in body["long"]["message"]
    print(f"create answered in {answered_s * 1000:.0f} ms")


class TimeoutOnce(httpx.BaseTransport):
    """Sends each request, but answers the first ``POST /v1/batches`` with a read timeout
    after the gateway handled it: the SDK then retries a call that did happen."""

    def __init__(self):
        self.inner, self.tripped = httpx.HTTPTransport(), False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method == "POST" and request.url.path == "/v1/batches" and not self.tripped:
            self.tripped = True
            response.read()
            raise httpx.ReadTimeout("the answer was lost", request=request)
        return response


def test_an_sdk_retry_with_the_same_idempotency_key_makes_one_batch(surface):
    s = surface()
    file_id = s.upload([chat_line("a", "x")])
    transport = TimeoutOnce()
    retrying = openai.OpenAI(base_url=s.oai.base_url, api_key="x", max_retries=2,
                             http_client=httpx.Client(transport=transport))
    key = {"Idempotency-Key": "nightly-2026-01-01"}
    batch = retrying.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h",
                                    extra_headers=key)
    assert transport.tripped and [b.id for b in s.oai.batches.list()] == [batch.id]
    again = s.oai.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h",
                                 extra_headers=key)
    assert again.id == batch.id and len(s.oai.batches.list().data) == 1
    with pytest.raises(openai.ConflictError, match="Idempotency-Key"):
        s.oai.batches.create(input_file_id=s.upload([chat_line("b", "y")]), endpoint=CHAT,
                             completion_window="24h", extra_headers=key)
    # the key of metadata, for a caller who cannot set headers; no key: a new batch each time
    meta = {"idempotency_key": "m1"}
    first = s.oai.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h",
                                 metadata=meta)
    assert s.oai.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h",
                                metadata=meta).id == first.id
    fresh = s.oai.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    assert len({batch.id, first.id, fresh.id}) == 3
    for b in (batch, first, fresh):
        assert s.wait(b.id, until=("in_progress",)).request_counts.total == 1


def test_finalization_lease_outlives_a_slow_upload(surface, monkeypatch):
    """The finalizer's lease is renewed by its holder while the error file uploads (here for
    longer than the lease's TTL): reads meanwhile answer ``finalizing`` and the files are
    written once."""
    from worker.compat import batch_finalizing as module

    monkeypatch.setattr(module, "LOCK_S", 1)
    uploads = []
    real_create = FileStore.create

    def slow_create(self, chunks, filename, purpose, owner=None):
        if purpose == "batch_output":
            uploads.append(filename)
            time.sleep(2.5)  # 2.5 TTLs
        return real_create(self, chunks, filename, purpose, owner)

    monkeypatch.setattr(FileStore, "create", slow_create)
    s = surface()
    batch = s.oai.batches.create(input_file_id=s.upload([chat_line("a", "x"), chat_line("b", "y")]),
                                 endpoint=CHAT, completion_window="24h")
    s.wait(batch.id, until=("in_progress",))
    assert s.oai.batches.cancel(batch.id).status == "cancelling"  # no worker: all end now
    first = threading.Thread(target=s.oai.batches.retrieve, args=(batch.id,))
    first.start()
    while not uploads:
        time.sleep(0.01)
    seen = []
    while first.is_alive():
        seen.append(s.oai.batches.retrieve(batch.id).status)
        time.sleep(0.2)
    first.join()
    assert len(seen) >= 5 and set(seen) <= {"finalizing", "cancelled"}, seen
    done = s.wait(batch.id)
    assert done.status == "cancelled" and uploads == [f"{batch.id}_error.jsonl"]


def test_a_lease_is_renewed_and_freed_by_its_holder_only(redis_url):
    from worker.compat.lease import Lease

    r = redis.Redis.from_url(redis_url)
    mine = Lease(r, "genq:test:lease", 0.6)
    assert mine.acquire() and not Lease(r, "genq:test:lease", 0.6).acquire()
    time.sleep(1.0)  # past the TTL: renewed
    assert mine.held()
    r.set("genq:test:lease", "someone-else", px=600)  # lost (say, a long pause), then taken
    time.sleep(0.5)
    assert not mine.held() and r.get("genq:test:lease") == b"someone-else"
    mine.release()  # frees nothing of theirs
    assert r.get("genq:test:lease") == b"someone-else"


@pytest.mark.slow
def test_a_gateway_killed_mid_submission_leaves_a_batch_another_finishes(
        surface, start_worker, tiny_model_dir, redis_url, tmp_path):
    """SIGKILL the gateway while it queues a batch: the batch stays ``validating`` until its
    submission lease lapses, then the next read (another gateway) resumes it. Every line is
    queued under one id and answered exactly once, and no request runs twice."""
    from worker.compat.batch_queueing import CHUNK, SEND, progress_key, request_id
    from worker.queue.app import BULK_QUEUE, pending_by_queue
    from worker.stack import free_port

    n = 3 * CHUNK
    port = free_port()
    env = {**os.environ, "GENQ_BROKER_URL": redis_url, "GENQ_FILES_URL": str(tmp_path / "files")}
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "api", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        wait_answering(http, proc)
        first = Surface(http, tmp_path / "files")
        lines = [chat_line(f"r{i}", f"count {i}", max_tokens=1, model=None) for i in range(n)]
        batch = first.oai.batches.create(input_file_id=first.upload(lines), endpoint=CHAT,
                                         completion_window="24h")
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        deadline = time.monotonic() + 60
        while not int(r.hget(progress_key(batch.id), "queued") or 0):
            assert time.monotonic() < deadline
        os.kill(proc.pid, signal.SIGSTOP)  # freeze it where it is, look, then kill it
        queued = int(r.hget(progress_key(batch.id), "queued"))
        record = json.loads(r.get(f"genq:batch:{batch.id}"))
        assert record["status"] == "validating" and queued < 3, (record["status"], queued)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_at = time.monotonic()

    s = surface()  # another gateway on the same Redis and files
    resumed = s.wait(batch.id, until=("in_progress",), timeout=60)
    assert resumed.request_counts.total == n
    ids = r.lrange(f"genq:job:{record['job_id']}:ids", 0, -1)
    assert ids == [request_id(batch.id, number) for number in range(1, n + 1)]
    waiting = pending_by_queue(redis.Redis.from_url(redis_url))[BULK_QUEUE]
    assert n <= waiting <= n + SEND  # at most one part published twice, under the same ids
    print(f"killed after {queued} of 3 chunks, resumed {time.monotonic() - killed_at:.1f}s "
          f"later; {waiting - n} messages published twice")

    start_worker(GENQ_MODEL=str(tiny_model_dir), GENQ_SELF_CHECK="off", GENQ_MAX_BATCH_SIZE="64")
    done = s.wait(batch.id, timeout=600)
    assert done.status == "completed" and done.request_counts.completed == n, done
    assert [o["custom_id"] for o in s.lines(done.output_file_id)] == [f"r{i}" for i in range(n)]
    attempts = r.mget([f"genq:attempts:{rid}" for rid in ids])
    assert all(a == "1" for a in attempts), [a for a in attempts if a != "1"][:5]
    print(f"{n} lines answered {time.monotonic() - killed_at:.1f}s after the kill")


def test_a_batch_cancelled_while_validating_runs_nothing(surface, redis_url):
    """A cancel that comes while the file is still being read and queued: the submitter
    queues nothing more to run and cancels what it queued; no request is left open."""
    s = surface()
    n = 1200
    file_id = s.upload([chat_line(f"r{i}", f"count {i}", model=None) for i in range(n)])
    batch = s.oai.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    cancelling = s.oai.batches.cancel(batch.id)
    assert (batch.status, cancelling.status) == ("validating", "cancelling")
    done = s.wait(batch.id, timeout=60)
    assert done.status == "cancelled" and done.cancelled_at and done.output_file_id is None
    counts = done.request_counts
    assert counts.completed == 0 and counts.failed == counts.total in (0, n), counts
    print(f"cancelled with {counts.total} of {n} lines queued")
    if counts.total:  # it had begun queueing: every line ended cancelled
        assert [e["error"]["code"] for e in s.lines(done.error_file_id)] == ["batch_cancelled"] * n
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    records = [json.loads(r.get(k)) for k in r.scan_iter("genq:r:*")]
    assert len(records) == counts.total and all(x["status"] == "cancelled" for x in records)


def test_a_batch_that_ends_while_validating_sends_one_webhook_event(surface, redis_url):
    """A file-level fault fails the batch before it has a job: with ``GENQ_WEBHOOK_URL`` set,
    the transaction that fails it pushes one ``batch.failed`` event naming the batch, as the
    finalizer's would; pushing it again (a replay) adds none."""
    from worker.queue.results import ResultStore
    from worker.queue.webhooks import EVENTS_KEY, GLOBAL_KEY, batch_ended, build_event

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.set(GLOBAL_KEY, 1)
    s = surface()
    file_id = s.upload([chat_line("a", "x"), chat_line("a", "duplicate custom_id")])
    batch = s.wait(s.oai.batches.create(input_file_id=file_id, endpoint=CHAT,
                                        completion_window="24h").id, timeout=30)
    assert batch.status == "failed"
    [raw] = r.lrange(EVENTS_KEY, 0, -1)
    _, payload, own = build_event(raw, ResultStore(redis_url, 60))
    assert payload["type"] == "batch.failed" and own is None
    assert payload["data"]["id"] == batch.id and payload["data"]["status"] == "failed"
    assert payload["data"]["counts"]["total"] == 0
    job_id = json.loads(r.get(f"genq:batch:{batch.id}"))["job_id"]
    pipe = r.pipeline(transaction=True)
    batch_ended(pipe, batch.id, job_id, 60)
    assert pipe.execute() == [0] and r.llen(EVENTS_KEY) == 1


def test_a_batch_given_up_sends_one_event_and_counts_its_starts_once_per_start(client, tmp_path):
    """Past ``MAX_STARTS`` starts a batch fails and cancels what it queued: one
    ``batch.failed`` event with its job's counts (the job, never submitted, sends none of its
    own). A start counted again after a lost reply (the same token) counts once."""
    from worker.compat.batch_queueing import MAX_STARTS, progress_key
    from worker.compat.batches import Batches
    from worker.compat.storage import FileStore
    from worker.queue.webhooks import EVENTS_KEY, GLOBAL_KEY, build_event

    r = client.store.redis
    r.set(GLOBAL_KEY, 1)
    batches = Batches(client, client.settings, FileStore(str(tmp_path), 1 << 20))
    submitter = batches.submitter
    record = {"id": "batch_x", "status": "validating", "job_id": "job-x", "errors": None,
              "created_ns": time.time_ns(), "owner": None}
    batches.save_new(record)
    pipe = r.pipeline(transaction=True)
    client.store.create_job("job-x", 2, pipe)
    client.store.add_job_ids("job-x", ["q1", "q2"], pipe)
    client.store.record_queued([("q1", {"prompt": "a"}), ("q2", {"prompt": "b"})],
                               job_id="job-x", pipe=pipe)
    pipe.hset(progress_key("batch_x"), "job", 1)
    pipe.execute()

    for n in range(MAX_STARTS):  # each start counted, replayed twice
        assert submitter._count_start("batch_x", f"start-{n}") == n + 1
        assert submitter._count_start("batch_x", f"start-{n}") == n + 1
    assert submitter._count_start("batch_x", "one-too-many") > MAX_STARTS
    submitter._give_up(record)
    submitter._give_up(record)  # a second gateway giving up too
    assert batches.load_any("batch_x")["status"] == "failed"
    assert client.job("job-x")["counts"]["cancelled"] == 2
    [raw] = r.lrange(EVENTS_KEY, 0, -1)
    _, payload, _ = build_event(raw, client.store)
    assert payload["type"] == "batch.failed" and payload["data"]["id"] == "batch_x"
    assert payload["data"]["counts"]["cancelled"] == 2


def test_a_validating_batch_nobody_reads_is_resumed_by_the_gateways_sweep(
        surface, client, redis_url, tmp_path, monkeypatch):
    """A batch saved ``validating`` whose submitter never ran (its gateway killed at once) and
    that nobody reads: the running gateway's sweep queues it within ``LEASE_S``."""
    from worker.compat.batch_queueing import LEASE_S, Submitter
    from worker.compat.batch_records import VALIDATING_KEY
    from worker.compat.batches import Batches, CreateBatch

    s = surface()  # its sweep runs every LEASE_S
    file_id = s.upload([chat_line(f"r{i}", f"count {i}", model=None) for i in range(3)])
    monkeypatch.setattr(Submitter, "start", lambda self, record: False)  # the killed gateway
    dead = Batches(client, client.settings, s.store)
    batch_id = dead.create(client, CreateBatch(input_file_id=file_id, endpoint=CHAT,
                                               completion_window="24h"))["id"]
    monkeypatch.undo()
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    deadline = time.monotonic() + 3 * LEASE_S
    while json.loads(r.get(f"genq:batch:{batch_id}"))["status"] == "validating":
        assert time.monotonic() < deadline, "the sweep did not resume the batch"
        time.sleep(0.2)
    record = json.loads(r.get(f"genq:batch:{batch_id}"))
    assert record["status"] == "in_progress" and record["request_counts"]["total"] == 3
    assert len(r.lrange(f"genq:job:{record['job_id']}:ids", 0, -1)) == 3
    dead.sweep()  # a sweep after it left validating unlists it
    assert not r.zscore(VALIDATING_KEY, batch_id)
