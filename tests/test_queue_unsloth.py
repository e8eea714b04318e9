"""The service on the Unsloth backend (its CPU backend here): a real ``genq worker`` with
GENQ_BACKEND=unsloth and a small GENQ_MAX_SEQ_LENGTH serves the transformers engine's texts,
and a request longer than that context is refused at submit and failed by the worker, never
cut."""

from __future__ import annotations

import pytest

from tests.conftest import example_requests
from worker.errors import PromptTooLong

pytestmark = pytest.mark.slow

MAX_SEQ = 256


def test_unsloth_worker_serves_the_engine_texts_within_its_context(client, start_worker,
                                                                    demo_engine):
    from worker.queue.app import TASK_NAME

    start_worker(GENQ_BACKEND="unsloth", GENQ_MAX_SEQ_LENGTH=str(MAX_SEQ))
    counter = client.counter.get()
    assert counter is not None and counter.context_length == MAX_SEQ
    log = (start_worker.log_dir / "w1@test.log").read_text()
    assert '"backend": "unsloth"' in log and "worker_ready" in log

    padding = " ".join(["please"] * 150)
    long_request = {"messages": [{"role": "user", "content": f"Say something. {padding}"}],
                    "max_new_tokens": 1}
    prompt_tokens = counter.count(long_request)
    assert MAX_SEQ // 2 < prompt_tokens < MAX_SEQ - 8
    fits = {**long_request, "max_new_tokens": MAX_SEQ - prompt_tokens}
    over = {**long_request, "max_new_tokens": MAX_SEQ - prompt_tokens + 1}
    with pytest.raises(PromptTooLong, match=f"context {MAX_SEQ}"):
        client.submit(**over)
    # a foreign producer skips the client's count: the worker refuses it
    client.app.send_task(TASK_NAME, args=[over], task_id="too-long", queue="genq.interactive")

    requests = [*example_requests(4, max_new_tokens=16), fits]
    ids = [client.submit(**r) for r in requests]
    results = [client.wait(rid, timeout=300) for rid in ids]
    assert [r["status"] for r in results] == ["succeeded"] * len(requests)
    assert [r["text"] for r in results] == [e["text"] for e in demo_engine.generate(requests)]
    assert results[-1]["usage"]["prompt_tokens"] == prompt_tokens
    refused = client.wait("too-long", timeout=120)
    assert refused["status"] == "failed" and refused["error"]["code"] == "prompt_too_long"
