"""The service on the vLLM backend (vLLM's CPU build here): real ``genq worker`` processes with
GENQ_BACKEND=vllm, a private redis-server and the client. The queue still decides who runs:
interactive before bulk, cancel within a step, a bad request fails alone, a SIGKILLed
worker's requests finish elsewhere exactly once."""

from __future__ import annotations

import json
import time

import jsonschema
import pytest

from tests.conftest import example_requests, peft_text
from tests.test_engine_vllm import OTHER_PROMPTS, SCHEMA

pytestmark = pytest.mark.slow

VLLM = {"GENQ_BACKEND": "vllm"}


def _events(log_file) -> list[dict]:
    """A worker's JSON log lines."""
    return [json.loads(line) for line in log_file.read_text().splitlines() if line.startswith("{")]


def test_the_queue_end_to_end_on_vllm(client, start_worker, demo_engine, lora_dir):
    from worker.queue.app import TASK_NAME

    start_worker(**VLLM, GENQ_ADAPTERS=f"a={lora_dir}")
    heartbeat = next(w for w in client.store.workers() if w["name"] == "w1@test")
    assert heartbeat["backend"] == "vllm" and heartbeat["adapters"] == ["a"]
    assert heartbeat["self_check"]["ok"] is True
    log = (start_worker.log_dir / "w1@test.log").read_text()
    assert "it/s]" not in log  # no progress bars in the JSON log

    # the 64 example prompts and 24 others, through the queue, against the step loop's texts
    plain = [*example_requests(max_new_tokens=48),
             *({**r, "max_new_tokens": 48} for r in OTHER_PROMPTS)]
    job = client.submit_many(plain)
    interactive = [client.submit(**r) for r in example_requests(4, max_new_tokens=16)]
    adapter = client.submit(**{**plain[0], "adapter": "a"})
    constrained = client.submit(messages=plain[1]["messages"], max_new_tokens=96,
                                response_format={"type": "json_schema", "json_schema": {
                                    "name": "person", "schema": SCHEMA, "strict": True}})
    # a foreign producer skips the client's checks: the worker fails it alone
    client.app.send_task(TASK_NAME, args=[{"prompt": "x " * 9000, "max_new_tokens": 8}],
                         task_id="too-long", queue="genq.bulk")

    info = client.wait_job(job, timeout=600)
    assert info["counts"]["succeeded"] == 88
    results, expected = list(client.job_results(job)), demo_engine.generate(plain)
    assert [r["text"] for r in results] == [e["text"] for e in expected]
    assert all(r["worker"] == "w1@test" and r["model"] == "SmolLM2-135M-Instruct" for r in results)
    assert [r["usage"] for r in results] == [e["usage"] for e in expected]
    for rid, request in zip(interactive, example_requests(4, max_new_tokens=16), strict=True):
        assert client.wait(rid, timeout=120)["text"] == demo_engine.generate([request])[0]["text"]
    lora = client.wait(adapter, timeout=120)
    assert lora["status"] == "succeeded" and lora["adapter"] == "a" and lora["text"] != results[0]["text"]
    shaped = client.wait(constrained, timeout=120)
    jsonschema.validate(json.loads(shaped["text"]), SCHEMA)
    refused = client.wait("too-long", timeout=120)
    assert refused["status"] == "failed" and refused["error"]["code"] == "prompt_too_long"


def test_cancel_and_progress_of_a_running_request_on_vllm(client, start_worker):
    start_worker(**VLLM)
    running = client.submit(prompt="Once upon a time, in a land far away,", max_new_tokens=1500)
    deadline = time.monotonic() + 120
    while not (client.get(running).get("text") or ""):  # a snapshot of the text so far
        assert time.monotonic() < deadline
        time.sleep(0.05)
    partial = client.get(running)
    assert partial["status"] == "running" and partial["usage"]["completion_tokens"] > 0
    asked = time.monotonic()
    assert client.cancel(running) is True
    result = client.wait(running, timeout=60)
    took = time.monotonic() - asked
    assert result["status"] == "cancelled" and result["finish_reason"] == "cancelled"
    assert 0 < result["usage"]["completion_tokens"] < 1500
    assert result["text"].startswith(partial["text"])
    print(f"cancelled {took:.2f} s after asking, at {result['usage']['completion_tokens']} tokens")


def test_interactive_joins_at_once_under_a_bulk_job_on_vllm(client, start_worker):
    start_worker(**VLLM, GENQ_MAX_BATCH_SIZE="8")
    bulk = client.submit_many([{"prompt": f"Tell a long story number {i}.", "max_new_tokens": 128,
                                "temperature": 0.8, "seed": i} for i in range(48)])
    deadline = time.monotonic() + 120
    while client.job(bulk)["counts"]["running"] < 8:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    rid = client.submit(prompt="Hi", max_new_tokens=8)
    result = client.wait(rid, timeout=120)
    counts = client.job(bulk)["counts"]
    # it joined the running rows at once (headroom of its own), not after the 40 queued
    assert result["status"] == "succeeded" and counts["succeeded"] <= 16, counts
    assert result["batch"]["size"] > 1
    assert client.wait_job(bulk, timeout=900)["counts"]["succeeded"] == 48


def test_sigkill_of_a_vllm_worker_mid_job_loses_nothing(client, start_worker, demo_engine):
    requests = example_requests(32, max_new_tokens=48)
    first = start_worker("victim@test", **VLLM, GENQ_MAX_BATCH_SIZE="8")
    job = client.submit_many(requests)
    deadline = time.monotonic() + 120
    while client.job(job)["counts"]["succeeded"] < 4:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first.kill()
    first.wait()
    start_worker("rescuer@test", **VLLM, GENQ_MAX_BATCH_SIZE="8")
    info = client.wait_job(job, timeout=600)
    assert info["counts"] == {"total": 32, "queued": 0, "running": 0, "succeeded": 32,
                              "failed": 0, "cancelled": 0, "expired": 0}
    results = list(client.job_results(job))
    assert len({r["id"] for r in results}) == 32
    assert [r["text"] for r in results] == [e["text"] for e in demo_engine.generate(requests)]
    assert {r["worker"] for r in results} == {"victim@test", "rescuer@test"}


def test_openai_streams_from_a_vllm_worker(gateway, start_worker, demo_engine):
    """SSE from the running rows' snapshots: the OpenAI SDK's stream grows in several chunks
    and adds up to the step loop's text."""
    import openai

    start_worker(**VLLM)
    http = gateway()
    api = openai.OpenAI(base_url=f"{str(http.base_url).rstrip('/')}/v1", api_key="x",
                        max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    expected = demo_engine.generate([{"messages": messages, "max_new_tokens": 160}])[0]
    chunks = list(api.chat.completions.create(model="demo", messages=messages, max_tokens=160,
                                              temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 3  # it streamed as it grew
    assert "".join(deltas) == expected["text"]
    assert chunks[-1].usage.completion_tokens == expected["usage"]["completion_tokens"]


def test_a_vllm_worker_refuses_at_start_an_adapter_vllm_cannot_serve(start_worker, dora_dir):
    """GENQ_BACKEND=vllm with a DoRA adapter: the worker exits at start, before vLLM loads,
    with the code ``genq up`` does not restart, its log naming the adapter and vLLM's reason."""
    from worker.errors import EX_MODEL_UNAVAILABLE

    proc = start_worker(**VLLM, GENQ_ADAPTERS=f"d={dora_dir}", wait_ready=False)
    assert proc.wait(timeout=300) == EX_MODEL_UNAVAILABLE
    events = _events(start_worker.log_dir / "w1@test.log")
    assert [e["error"] for e in events if e.get("event") == "model_unavailable"] == [
        f"GENQ_BACKEND=vllm, but vLLM cannot serve adapter 'd' ({dora_dir}): ValueError: vLLM "
        "does not yet support DoRA."]


def test_auto_serves_an_adapter_vllm_cannot_serve_on_the_step_loop(client, start_worker, dora_dir,
                                                                   cache_dir):
    """GENQ_BACKEND=auto with a DoRA adapter: vLLM is not used, the log says why, and the step
    loop serves the adapter: PeftModel's text."""
    # not the self-check: its canary, with a DoRA adapter on Unsloth's CPU backend, takes 40 s
    # on a quiet machine and ran past the 120 s start limit on a loaded one
    start_worker(GENQ_BACKEND="auto", GENQ_ADAPTERS=f"d={dora_dir}", GENQ_SELF_CHECK="off")
    heartbeat = next(w for w in client.store.workers() if w["name"] == "w1@test")
    assert heartbeat["backend"] in ("unsloth", "transformers") and heartbeat["adapters"] == ["d"]
    events = _events(start_worker.log_dir / "w1@test.log")
    assert [e["reason"] for e in events if e.get("event") == "vllm_not_used"] == [
        f"vLLM cannot serve adapter 'd' ({dora_dir}): ValueError: vLLM does not yet support DoRA."]
    request = {"messages": [{"role": "user", "content": "Describe a lighthouse."}],
               "max_new_tokens": 24}
    base, tuned = (client.wait(client.submit(**r), timeout=120)
                   for r in (request, {**request, "adapter": "d"}))
    assert base["status"] == tuned["status"] == "succeeded" and tuned["adapter"] == "d"
    assert tuned["text"] != base["text"]
    assert tuned["text"] == peft_text(cache_dir, dora_dir, request["messages"], 24)
