"""One submission pipeline: every way in reads its source once and checks and counts each
line once, keeping its own rule for bad lines."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import redis

from worker.errors import InvalidRequest
from worker.submission.checker import Checker
from worker.tokencount import PromptCounter, publish


@pytest.fixture
def counted(monkeypatch, redis_url, tiny_model_dir):
    """A published tokenizer (as a worker publishes it) and a tally of the checks and token
    counts made in this process."""
    from transformers import AutoTokenizer

    engine = SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir),
                             model_name="tiny", context_length=2048, max_prompt_tokens=None)
    publish(redis.Redis.from_url(redis_url), engine, 600)
    tally: Counter = Counter()
    check, count = Checker.check_many, PromptCounter.count_many

    def checking(self, bodies):
        tally["check"] += len(bodies)
        return check(self, bodies)

    def counting(self, requests):
        tally["count"] += len(requests)
        return count(self, requests)

    monkeypatch.setattr(Checker, "check_many", checking)
    monkeypatch.setattr(PromptCounter, "count_many", counting)
    return tally


def _requests(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"line {i}"}], "max_new_tokens": 4,
             "idempotency_key": f"k{i}", "metadata": {"i": i}} for i in range(n)]


def test_submit_stream_reads_its_source_once_and_checks_each_line_once(client, counted):
    calls = []

    def source():
        calls.append(1)
        return iter(_requests(2500))

    job = client.submit_stream(source, chunk=1000)
    assert len(calls) == 1
    assert counted == {"check": 2500, "count": 2500}
    assert client.job(job)["counts"]["total"] == 2500
    # queued through the spool chunk by chunk, in source order
    assert [r["metadata"]["i"] for r in client.job_results(job)] == list(range(2500))


def test_submit_many_checks_once_and_a_bad_request_queues_nothing(client, counted, redis_url):
    bad = _requests(5)
    bad[3]["max_new_tokens"] = 0
    with pytest.raises(InvalidRequest, match="request 3: max_new_tokens"):
        client.submit_many(bad)
    assert not redis.Redis.from_url(redis_url).keys("genq:job:*")
    counted.clear()
    job = client.submit_many(_requests(5))
    assert counted == {"check": 5, "count": 5}
    assert client.job(job)["counts"]["queued"] == 5


@pytest.mark.parametrize("kind", ["application/jsonl", "application/json"])
def test_a_job_upload_is_checked_once_per_line(gateway, counted, kind):
    http = gateway()
    reqs = _requests(300)
    body = json.dumps(reqs) if kind == "application/json" else \
        "".join(json.dumps(r) + "\n" for r in reqs)
    r = http.post("/v1/jobs", content=body, headers={"content-type": kind})
    assert r.status_code == 202, r.text
    assert r.json()["counts"]["total"] == 300
    assert counted == {"check": 300, "count": 300}
    bad = "".join(json.dumps(x) + "\n" for x in [reqs[0], {"prompt": 5}, reqs[2]]) + "{oops\n"
    r = http.post("/v1/jobs", content=bad, headers={"content-type": "application/jsonl"})
    assert r.status_code in (400, 422), r.text
    text = json.dumps(r.json())
    assert "line 2: prompt" in text and "line 4: not JSON" in text


def test_an_openai_route_fits_the_context_with_one_count(client, counted):
    """A chat body without ``max_tokens`` is counted once, for both the room left and the
    length check."""
    from worker.submission.checker import OpenAIRoute

    check = Checker(client, OpenAIRoute(priority="bulk", window_s=60))
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}}
    request = check.check(line)
    assert counted == {"check": 1, "count": 1}
    counted.clear()
    assert request["priority"] == "bulk" and request["expires_in_s"] == 60
    assert request["temperature"] == 1.0 and 1 <= request["max_new_tokens"] <= 2048
    assert request["max_new_tokens"] == min(check.cap, 2048 - check.counter.count(request))


def test_the_offline_check_takes_openai_batch_lines_and_plain_requests():
    """``genq run`` and ``genq generate`` check lines before any broker exists: OpenAI Batch
    lines are translated, plain requests taken as they are, a bad one named."""
    from worker.ops.settings import Settings
    from worker.submission.checker import check_lines
    from worker.submission.lines import read_lines

    rows = [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "demo", "max_tokens": 5,
                      "messages": [{"role": "user", "content": "hi"}]}},
            {"prompt": "plain", "max_new_tokens": 3},
            {"prompt": "too many", "max_new_tokens": 10_000}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + "\n{broken\n"
    lines = list(check_lines(read_lines(text.splitlines(keepends=True)),
                             Checker(settings=Settings(max_new_tokens_limit=512)).schema))
    assert [ln.number for ln in lines] == [1, 2, 3, 5]
    assert lines[0].request["messages"] == [{"role": "user", "content": "hi"}]
    assert lines[0].request["max_new_tokens"] == 5 and lines[0].request["custom_id"] == "a"
    assert lines[1].request["prompt"] == "plain"
    assert lines[2].request is None and lines[2].error.startswith("max_new_tokens: 10000")
    assert lines[3].error.startswith("not JSON")


def test_an_idempotency_claim_replayed_after_a_lost_reply_is_still_its_own(client):
    """redis-py replays a pipeline whose reply was lost: the SET NX then finds the key its
    first try set. That request still owns it (it is queued, not linked to itself as a twin);
    another request with the key and body resolves to it, with another body conflicts."""
    from worker.errors import IdempotencyConflict
    from worker.submission import idempotency

    r, req = client.store.redis, {"prompt": "p", "idempotency_key": "once"}
    assert idempotency.claim(r, "team", [("rid-1", req)], 60) == [None]
    assert idempotency.claim(r, "team", [("rid-1", req)], 60) == [None]  # the replay
    assert idempotency.claim(r, "team", [("rid-2", req)], 60) == ["rid-1"]
    assert idempotency.claim(r, "other-team", [("rid-3", req)], 60) == [None]  # keys per owner
    with pytest.raises(IdempotencyConflict):
        idempotency.claim(r, "team", [("rid-4", {**req, "prompt": "q"})], 60)
