"""LoRA adapters on the real demo model: selected per request, never mixed in a batch."""

from __future__ import annotations

import time

import pytest

from tests.conftest import example_requests, peft_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapter_engine(cache_dir, lora_dir, dora_dir, saves_dir):
    """The demo model with the LoRA, DoRA and ``modules_to_save`` adapters made here."""
    from worker.engine import load_engine

    return load_engine("demo", backend="transformers", dtype="float32", cache_dir=cache_dir,
                       adapters={"a": str(lora_dir), "d": str(dora_dir), "s": str(saves_dir)})


def test_adapter_changes_output_and_batched_equals_alone(adapter_engine):
    base_reqs = example_requests(6, max_new_tokens=16)
    lora_reqs = [{**r, "adapter": "a"} for r in base_reqs]
    mixed = adapter_engine.generate([x for pair in zip(base_reqs, lora_reqs, strict=True) for x in pair])
    base_out, lora_out = mixed[0::2], mixed[1::2]
    assert all(r["adapter"] == "a" for r in lora_out)
    assert all(r["batch"]["size"] == 6 for r in mixed), "adapters must not share a batch"
    assert sum(b["text"] != a["text"] for b, a in zip(base_out, lora_out, strict=True)) >= 4
    for req, got in zip(lora_reqs, lora_out, strict=True):
        assert adapter_engine.generate([req])[0]["text"] == got["text"]
    for req, got in zip(base_reqs, base_out, strict=True):
        assert adapter_engine.generate([req])[0]["text"] == got["text"]


def test_base_rows_match_an_engine_without_adapters(adapter_engine, demo_engine):
    reqs = example_requests(4, max_new_tokens=16)
    assert ([r["text"] for r in adapter_engine.generate(reqs)]
            == [r["text"] for r in demo_engine.generate(reqs)])


def test_each_adapter_gives_peft_models_text(adapter_engine, cache_dir, lora_dir, dora_dir,
                                             saves_dir):
    """Every tensor of each adapter is loaded (transformers alone leaves DoRA magnitudes and
    ``modules_to_save`` copies at their initial values): greedy text == PeftModel's, with
    the adapters taking turns and the base model between them."""
    folders = {"a": lora_dir, "d": dora_dir, "s": saves_dir}
    messages = [{"role": "user", "content": "Describe a lighthouse."}]
    reqs = [{"messages": messages, "max_new_tokens": 24, **({"adapter": a} if a else {})}
            for a in ("a", None, "d", "s", "a")]
    texts = [r["text"] for r in adapter_engine.generate(reqs)]
    expected = {a: peft_text(cache_dir, folder, messages, 24) for a, folder in folders.items()}
    assert texts == [expected["a"], texts[1], expected["d"], expected["s"], expected["a"]]
    assert len({texts[1], *expected.values()}) == 4  # each adapter, and the base, differ


@pytest.mark.parametrize("damage", ["missing", "unexpected"])
def test_an_adapter_whose_file_does_not_match_its_modules_is_refused_at_load(
        cache_dir, lora_dir, dora_dir, tmp_path, damage):
    """A tensor missing from the file (here a DoRA magnitude), or one no module takes: the
    engine does not load (ModelUnavailable: the worker exits EX_MODEL_UNAVAILABLE), naming the
    adapter and a key."""
    from shutil import copytree

    from safetensors.torch import load_file, save_file

    from worker.engine import load_engine
    from worker.engine.loading import ADAPTER_FIX, ModelUnavailable

    broken = copytree(dora_dir, tmp_path / "broken")
    weights = load_file(broken / "adapter_model.safetensors")
    key = "base_model.model.model.layers.3.self_attn.v_proj.lora_magnitude_vector"
    if damage == "missing":
        del weights[key]
        what = "1 of its tensors missing from its file"
    else:
        weights[key.replace("v_proj", "k_proj")] = weights[key].clone()
        what = "1 tensors in its file that fit none of its modules"
    save_file(weights, broken / "adapter_model.safetensors")
    with pytest.raises(ModelUnavailable) as refused:
        load_engine("demo", backend="transformers", dtype="float32", cache_dir=cache_dir,
                    adapters={"good": str(lora_dir), "broken": str(broken)})
    shown = key.removeprefix("base_model.model.")
    if damage == "unexpected":
        shown = shown.replace("v_proj", "k_proj")
    assert refused.value.lines == [
        f"adapter 'broken' ({broken}) does not match the model: {what} (e.g. {shown})",
        ADAPTER_FIX]


@pytest.fixture(scope="module")
def tiny_lora_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter for the tiny model, made as ``lora_dir`` makes the demo model's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tiny-lora")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(path)
    return path


def _tiny(model_dir, **extra: str) -> dict[str, str]:
    return {"GENQ_MODEL": str(model_dir), "GENQ_MAX_BATCH_SIZE": "16", **extra}


def test_adapter_requests_at_volume_run_only_where_the_adapter_is(
        client, start_worker, tiny_model_dir, tiny_lora_dir, redis_url):
    """240 adapter requests (interactive, and an owner's bulk job) among 60 plain ones, two
    workers of which one has the adapter: every request succeeds, each adapter one on that
    worker; then nothing is left set aside and the owner's list is dropped from the weights."""
    import redis

    from worker.queue.app import OWNER_LISTS_KEY, PARKED_KEY, pending_by_queue

    start_worker("plain@test", **_tiny(tiny_model_dir))
    start_worker("lora@test", **_tiny(tiny_model_dir, GENQ_ADAPTERS=f"pirate={tiny_lora_dir}"))
    reqs = [{"prompt": f"p{i}", "max_new_tokens": 2, **({"adapter": "pirate"} if i % 5 else {})}
            for i in range(300)]
    ids = [client.submit(**r) for r in reqs[:150]]
    job = client.as_owner("team-a").submit_many(reqs[150:])
    results = [client.wait(i, timeout=240) for i in ids]
    client.as_owner("team-a").wait_job(job, timeout=240)
    results += list(client.as_owner("team-a").job_results(job))
    assert [r["status"] for r in results] == ["succeeded"] * 300
    for req, res in zip(reqs, results, strict=True):
        assert res.get("adapter") == req.get("adapter")
        if req.get("adapter"):
            assert res["worker"] == "lora@test"
    assert {r["worker"] for r in results if not r.get("adapter")} >= {"plain@test"}
    r = redis.Redis.from_url(redis_url)
    assert pending_by_queue(r) == {"genq.interactive": 0, "genq.bulk": 0}
    assert {int(n) for n in r.hvals(PARKED_KEY)} <= {0}
    deadline = time.monotonic() + 30  # dropped by a fetch after the last ack (idle: <= 10 s)
    while r.hlen(OWNER_LISTS_KEY) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert r.hlen(OWNER_LISTS_KEY) == 0


def test_a_request_for_an_adapter_no_worker_serves_waits_until_its_deadline(
        client, start_worker, tiny_model_dir, redis_url):
    """Its worker stopped after it was queued: the request is not failed by a worker without
    the adapter; it waits, then ends ``expired`` at its deadline. The worker without the
    adapter then drops it, and one cancelled while it waited, from the set-aside list, so
    the queue depth (``/demand``) goes back to 0."""
    import redis

    from worker.queue.app import PARKED_KEY, pending_by_queue

    start_worker("plain@test", **_tiny(tiny_model_dir))
    client.store.heartbeat("gone@test", {"adapters": ["ghost"]}, ttl_s=3)  # stops at once
    queued_at = time.time()
    rid = client.submit(prompt="arr", max_new_tokens=2, adapter="ghost", expires_in_s=8)
    cancelled = client.submit(prompt="arr!", max_new_tokens=2, adapter="ghost", priority="bulk")
    plain = client.submit(prompt="plain", max_new_tokens=2)
    assert client.wait(plain, timeout=60)["status"] == "succeeded"
    r = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 30
    while r.hget(PARKED_KEY, "bulk") != b"1" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.hget(PARKED_KEY, "interactive") == b"1"  # set aside by the worker, not taken
    assert r.hget(PARKED_KEY, "bulk") == b"1"
    assert client.get(rid)["status"] == "queued"
    assert client.cancel(cancelled)
    result = client.wait(rid, timeout=30)
    assert (result["status"], result["finish_reason"]) == ("expired", "expired"), result
    assert time.time() >= queued_at + 8
    deadline = time.monotonic() + 40  # the worker sweeps every 10 s
    while sum(pending_by_queue(r).values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert pending_by_queue(r) == {"genq.interactive": 0, "genq.bulk": 0}
    assert [int(n) for n in r.hmget(PARKED_KEY, "interactive", "bulk")] == [0, 0]
    assert client.get(cancelled)["status"] == "cancelled"
