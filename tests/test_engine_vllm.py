"""The vLLM backend on the real demo model (vLLM's CPU build here), loaded once for the module:
its greedy texts equal our step loop's, a request batched equals itself alone, every request
option works or fails alone with our error codes, LoRA adapters batch together."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from tests.conftest import example_requests

pytestmark = [pytest.mark.slow, pytest.mark.process]  # vLLM starts helper processes

# prompts unlike the examples: raw text, system prompts, long and one-word turns, code, lists
OTHER_PROMPTS = [
    {"prompt": "The three primary colours are"},
    {"prompt": "def fibonacci(n):\n    "},
    {"prompt": "Q: What is 12 times 12?\nA:"},
    {"prompt": "Once upon a time, in a village by the sea,"},
    {"prompt": "Translate to French: good morning ->"},
    {"prompt": "1, 1, 2, 3, 5, 8,"},
    {"prompt": "Dear hiring manager,"},
    {"prompt": "The recipe calls for"},
    {"messages": [{"role": "user", "content": "Hi"}]},
    {"messages": [{"role": "user", "content": "Why?"}]},
    {"messages": [{"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": "What colour is the sky?"}]},
    {"messages": [{"role": "system", "content": "You are a pirate."},
                  {"role": "user", "content": "Describe your ship."}]},
    {"messages": [{"role": "user", "content": "List four planets, one per line."}]},
    {"messages": [{"role": "user", "content": "Write a haiku about rain."}]},
    {"messages": [{"role": "user", "content": "What is the boiling point of water in Kelvin?"}]},
    {"messages": [{"role": "user", "content": "Give me a JSON object with a name and an age."}]},
    {"messages": [{"role": "user", "content": "Explain recursion to a child. " * 12}]},
    {"messages": [{"role": "user", "content": "Summarise: " + "The market opened higher. " * 30}]},
    {"messages": [{"role": "user", "content": "Name a fruit."},
                  {"role": "assistant", "content": "Apple."},
                  {"role": "user", "content": "Another one."}]},
    {"messages": [{"role": "user", "content": "Say 'yes' or 'no': is 7 prime?"}]},
    {"messages": [{"role": "user", "content": "Write a Python function that reverses a string."}]},
    {"messages": [{"role": "user", "content": "¿Cómo estás?"}]},
    {"messages": [{"role": "user", "content": "What does HTTP stand for?"}]},
    {"messages": [{"role": "user", "content": "Count from one to ten in words."}]},
]
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
    "required": ["name", "age"]}


@pytest.fixture(scope="module")
def vllm_loaded(cache_dir, lora_dir):
    """The demo model on vLLM, float32, with one LoRA adapter (``a``), and what its load logged."""
    from structlog.testing import capture_logs

    from worker.engine import load_engine

    with capture_logs() as logs:
        engine = load_engine("demo", backend="vllm", dtype="float32", cache_dir=cache_dir,
                             adapters={"a": str(lora_dir)})
    return engine, logs


@pytest.fixture(scope="module")
def vllm_engine(vllm_loaded):
    return vllm_loaded[0]


def texts(results: list[dict]) -> list[str]:
    assert [r["status"] for r in results] == ["succeeded"] * len(results), results
    return [r["text"] for r in results]


def test_greedy_texts_equal_the_step_loop(vllm_engine, demo_engine):
    """64 example prompts and 24 others, greedy float32: the same text on both backends."""
    requests = [*example_requests(max_new_tokens=48),
                *({**r, "max_new_tokens": 48} for r in OTHER_PROMPTS)]
    assert len(requests) == 88
    ours, theirs = demo_engine.generate(requests), vllm_engine.generate(requests)
    assert texts(theirs) == texts(ours)
    assert [r["usage"] for r in theirs] == [r["usage"] for r in ours]
    assert {r["finish_reason"] for r in theirs} == {"stop", "length"}


def test_batched_equals_alone(vllm_engine):
    requests = [*example_requests(6, max_new_tokens=32),
                *({**r, "max_new_tokens": 32} for r in OTHER_PROMPTS[::4])]
    together = texts(vllm_engine.generate(requests))
    assert together == [texts(vllm_engine.generate([r]))[0] for r in requests]


def test_sampling_is_reproducible_by_seed_and_n_samples_are_seeded_in_turn(vllm_engine):
    sampled = {"prompt": "Once upon a time", "max_new_tokens": 16, "temperature": 0.9,
               "top_p": 0.95, "top_k": 50, "seed": 11}
    crowd = example_requests(5, max_new_tokens=24)
    first = vllm_engine.generate([sampled])[0]
    again = vllm_engine.generate([*crowd, sampled, {**sampled, "seed": 12}])
    assert again[5]["text"] == first["text"] and again[6]["text"] != first["text"]
    many = vllm_engine.generate([{**sampled, "n": 3}])[0]
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    assert many["choices"][0]["text"] == first["text"]  # sample 0 is seed 11
    assert many["choices"][1]["text"] == again[6]["text"]  # sample 1 is seed 12
    assert 3 <= many["usage"]["completion_tokens"] <= 3 * 16  # the three samples' tokens


def test_stop_strings_cut_the_text(vllm_engine, demo_engine):
    request = {"prompt": "1, 2, 3, 4,", "max_new_tokens": 24, "stop": [" 7", "nine"]}
    ours, theirs = demo_engine.generate([request])[0], vllm_engine.generate([request])[0]
    assert theirs["finish_reason"] == "stop_sequence" and " 7" not in theirs["text"]
    assert theirs["text"] == ours["text"] and theirs["usage"] == ours["usage"]


def test_logprobs_match_the_step_loop(vllm_engine, demo_engine):
    request = {"messages": [{"role": "user", "content": "Name a colour."}], "max_new_tokens": 8,
               "logprobs": True, "top_logprobs": 3}
    ours, theirs = demo_engine.generate([request])[0], vllm_engine.generate([request])[0]
    assert theirs["text"] == ours["text"] and len(theirs["logprobs"]) == len(ours["logprobs"])
    for a, b in zip(ours["logprobs"], theirs["logprobs"], strict=True):
        assert a["token"] == b["token"] and a["bytes"] == b["bytes"]
        assert b["logprob"] == pytest.approx(a["logprob"], abs=2e-3)
        assert [t["token"] for t in b["top_logprobs"]] == [t["token"] for t in a["top_logprobs"]]


def test_structured_outputs_always_parse_and_validate(vllm_engine):
    formats = [
        {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}},
        {"type": "json_object"},
        {"type": "regex", "pattern": "[A-Z][a-z]{2,8} [0-9]{1,3}"},
    ]
    prompts = [r["messages"] for r in example_requests(12)]
    requests = [{"messages": m, "max_new_tokens": 96, "response_format": formats[i % 3]}
                for i, m in enumerate(prompts)]
    free = example_requests(4, max_new_tokens=16)
    results = vllm_engine.generate([*requests, *free])
    for request, result in zip(requests, results, strict=False):
        assert result["status"] == "succeeded", result
        kind = request["response_format"]["type"]
        if kind == "regex":
            assert re.fullmatch(request["response_format"]["pattern"], result["text"]), result["text"]
            continue
        value = json.loads(result["text"])
        assert isinstance(value, dict)
        if kind == "json_schema":
            jsonschema.validate(value, SCHEMA)
            assert set(value) <= set(SCHEMA["properties"])  # strict closes the object
    assert texts(results[len(requests):]) == texts(vllm_engine.generate(free))


def test_a_temperature_below_1e5_is_greedy_as_on_the_step_loop(vllm_engine):
    """vLLM raises a temperature under 0.01 to 0.01 and samples it; ours below 1e-5 is greedy:
    the greedy text, and the greedy (unscaled) log-probabilities."""
    greedy = {"messages": [{"role": "user", "content": "Name a colour."}], "max_new_tokens": 12,
              "logprobs": True, "top_logprobs": 3}
    expected = vllm_engine.generate([greedy])[0]
    for temperature in (1e-7, 9.9e-6):
        result = vllm_engine.generate([{**greedy, "temperature": temperature, "seed": 5}])[0]
        assert result["text"] == expected["text"]
        for a, b in zip(expected["logprobs"], result["logprobs"], strict=True):
            assert a["token"] == b["token"] and b["logprob"] == pytest.approx(a["logprob"], abs=1e-4)
            assert [t["logprob"] for t in b["top_logprobs"]] == pytest.approx(
                [t["logprob"] for t in a["top_logprobs"]], abs=1e-4)


def test_constrained_usage_and_finish_equal_the_step_loop(vllm_engine, demo_engine):
    """The step loop ends a constrained row when its grammar is complete; vLLM generates the
    EOS the grammar then forces (or runs out of budget before it): not counted, ``stop``."""
    formats = [
        {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}},
        {"type": "json_object"},
        {"type": "regex", "pattern": "[A-Z][a-z]{2,8} [0-9]{1,3}"},
    ]
    requests = [{"messages": r["messages"], "max_new_tokens": 96, "response_format": f}
                for f in formats for r in example_requests(2)]
    requests.append({**requests[0], "n": 2})  # each of the two rows counted the same way
    ours, theirs = demo_engine.generate(requests), vllm_engine.generate(requests)

    def ends(results):
        return [(r["text"], r["finish_reason"], r["usage"]) for r in results]

    assert ends(theirs) == ends(ours)
    complete = [(r, o) for r, o in zip(requests[:-1], ours, strict=False)
                if o["finish_reason"] == "stop"]
    assert len(complete) >= 4
    # a budget the document fills exactly: the step loop ends it ``stop``; vLLM had no room
    # left for the EOS it waits for
    exact = [{**r, "max_new_tokens": o["usage"]["completion_tokens"]} for r, o in complete]
    assert ends(vllm_engine.generate(exact)) == ends(demo_engine.generate(exact)) == \
        ends(o for _, o in complete)


def test_a_request_over_the_kv_cache_is_prompt_too_long(vllm_engine, monkeypatch):
    """The demo model's 8,192 context fits in the 2 GiB CPU KV cache many times over: a
    smaller cache stands in for a GPU's (or a long-context model's) limit."""
    monkeypatch.setattr(vllm_engine, "kv_tokens", 64)
    fits, over = vllm_engine.generate([{"prompt": "Hi", "max_new_tokens": 8},
                                       {"prompt": "Hi there", "max_new_tokens": 64}])
    assert fits["status"] == "succeeded"
    assert over["status"] == "failed" and over["error"]["code"] == "prompt_too_long"
    assert "64 tokens of this worker's KV cache" in over["error"]["message"]


def test_the_backend_selected_log_says_why(vllm_loaded):
    selected = [e for e in vllm_loaded[1] if e["event"] == "backend_selected"]
    assert [(e["backend"], e["reason"]) for e in selected] == [("vllm", "GENQ_BACKEND=vllm")]


def test_bulk_joins_a_step_by_at_most_256_prompt_tokens_on_a_cpu(vllm_engine, demo_engine,
                                                                   monkeypatch):
    """vLLM's CPU default: a shorter bulk prefill bounds how long a step holds up an
    interactive request arriving during it; the step loop keeps 512; the setting wins."""
    from worker.engine.engine import engine_settings
    from worker.ops.settings import Settings

    assert (vllm_engine.max_bulk_prefill_tokens, demo_engine.max_bulk_prefill_tokens) == (256, 512)
    assert vllm_engine.limits().max_bulk_prefill_tokens == 256
    monkeypatch.setenv("GENQ_MAX_BULK_PREFILL_TOKENS", "300")
    assert engine_settings(Settings())["max_bulk_prefill_tokens"] == 300
    monkeypatch.delenv("GENQ_MAX_BULK_PREFILL_TOKENS")
    assert "max_bulk_prefill_tokens" not in engine_settings(Settings())


def test_auto_falls_back_when_vllm_cannot_be_imported(tmp_path, tiny_model_dir, cache_dir):
    """A vllm whose import raises (vLLM's CPU build beside a torchvision it cannot use raises
    RuntimeError) is a reason to use the step loop, not a crash."""
    fake = tmp_path / "vllm"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    script = ("import json, sys\n"
              "from worker.ops.logging import configure_logging\n"
              "from worker.engine import load_engine\n"
              "configure_logging(fmt='json')\n"
              "engine = load_engine(sys.argv[1], backend='auto', dtype='float32', cache_dir=sys.argv[2])\n"
              "print(json.dumps({'backend': engine.backend}))\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])}
    proc = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir), str(cache_dir)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1])["backend"] in ("unsloth", "transformers")
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    not_used = [e["reason"] for e in events if e.get("event") == "vllm_not_used"]
    assert not_used == ["vllm cannot be imported: RuntimeError: operator torchvision::nms does "
                        "not exist"], proc.stderr[-3000:]


def test_a_bad_request_fails_alone_with_our_codes(vllm_engine):
    good = example_requests(3, max_new_tokens=12)
    bad = [
        {"prompt": "x " * 9000, "max_new_tokens": 8},  # over the demo model's 8,192 context
        {"prompt": "Hi", "adapter": "missing"},
        {"prompt": "Hi", "max_new_tokens": 0},
        {"prompt": "Hi", "response_format": {"type": "regex", "pattern": "("}},
    ]
    results = vllm_engine.generate([good[0], *bad, good[1], good[2]])
    assert [r["status"] for r in results] == ["succeeded", *["failed"] * 4, "succeeded", "succeeded"]
    assert [r["error"]["code"] for r in results[1:5]] == ["prompt_too_long", *["invalid_request"] * 3]
    assert texts([results[0], *results[5:]]) == texts(vllm_engine.generate(good))


def test_adapters_batch_with_the_base_and_match_peft(vllm_engine, cache_dir, lora_dir):
    from worker.engine import load_engine

    base = example_requests(6, max_new_tokens=16)
    lora = [{**r, "adapter": "a"} for r in base]
    mixed = vllm_engine.generate([x for pair in zip(base, lora, strict=True) for x in pair])
    base_out, lora_out = mixed[0::2], mixed[1::2]
    assert all(r["adapter"] == "a" for r in lora_out)
    assert sum(b["text"] != a["text"] for b, a in zip(base_out, lora_out, strict=True)) >= 4
    assert texts(lora_out) == texts(vllm_engine.generate(lora))  # mixed batch == alone
    peft = load_engine("demo", backend="transformers", dtype="float32", cache_dir=cache_dir,
                       adapters={"a": str(lora_dir)})
    assert texts(lora_out) == texts(peft.generate(lora))


def test_cancel_stops_a_running_request_at_once(vllm_engine):
    request = {"id": "long", "prompt": "Write a very long story.", "max_new_tokens": 400}
    polls = []

    def is_cancelled(ids):
        polls.append(len(ids))
        return [len(polls) >= 3 and i == "long" for i in ids]

    result = vllm_engine.generate([request, {"prompt": "Hi", "max_new_tokens": 4}],
                                  is_cancelled=is_cancelled)[0]
    assert result["status"] == "cancelled" and result["finish_reason"] == "cancelled"
    assert 0 < result["usage"]["completion_tokens"] < 40


def test_self_check_runs_on_vllm(vllm_engine):
    from worker.engine.selfcheck import self_check

    report = self_check(vllm_engine, "a")
    assert report.ok, report.problems
    assert vllm_engine.backend == "vllm" and vllm_engine.dtype == "float32"


@pytest.mark.parametrize(("change", "why"), [
    ({"use_dora": True}, "vLLM does not yet support DoRA."),
    ({"modules_to_save": ["lm_head", "embed_tokens"]},  # Unsloth's continued pretraining
     "Unsupported modules_to_save: ['lm_head', 'embed_tokens']"),
    ({"r": 1024}, "LoRA rank 1024 is greater than max_lora_rank 512."),
])
def test_an_adapter_vllm_cannot_serve_is_refused_before_it_loads(cache_dir, lora_dir, tmp_path,
                                                                 change, why):
    """vLLM's own check of each adapter's PEFT config, before vLLM starts: ``auto`` has its
    reason to use the step loop; GENQ_BACKEND=vllm stops (ModelUnavailable: the worker exits
    EX_MODEL_UNAVAILABLE) naming the adapter and vLLM's reason."""
    from shutil import copytree

    from worker.engine import load_engine
    from worker.engine.loading import ModelUnavailable
    from worker.engine.vllm_engine import STEP_LOOP_FIX, vllm_unusable
    from worker.ops.settings import Settings

    adapter = copytree(lora_dir, tmp_path / "x")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    adapters = {"good": str(lora_dir), "x": str(adapter)}
    reason = vllm_unusable(Settings(model="demo", cache_dir=cache_dir, adapters=adapters))
    assert reason.startswith(f"vLLM cannot serve adapter 'x' ({adapter}): ValueError: ")
    assert reason.endswith(why)
    with pytest.raises(ModelUnavailable) as refused:
        load_engine("demo", backend="vllm", dtype="float32", cache_dir=cache_dir, adapters=adapters)
    assert refused.value.lines == [f"GENQ_BACKEND=vllm, but {reason}", STEP_LOOP_FIX]


def test_an_adapter_vllm_refuses_in_a_step_fails_alone(vllm_engine, dora_dir, monkeypatch):
    """An adapter vLLM refuses only when a step loads it (it passed the check at start; its
    folder changed since): its request fails alone, ``invalid_request`` naming it; the rows of
    that step restart and end as they do alone; its next request is refused at admission."""
    from structlog.testing import capture_logs
    from vllm.lora.request import LoRARequest

    monkeypatch.setitem(vllm_engine.adapters, "d", str(dora_dir))
    monkeypatch.setitem(vllm_engine.loras, "d", LoRARequest("d", 99, str(dora_dir)))
    monkeypatch.setattr(vllm_engine, "refused", {})
    monkeypatch.setattr(vllm_engine, "mixes_adapters", True)  # one step for all, as on a GPU
    plain = example_requests(2, max_new_tokens=16)
    alone = [texts(vllm_engine.generate([r]))[0] for r in plain]
    tuned = {**plain[0], "id": "tuned", "adapter": "d"}
    with capture_logs() as logs:
        first = vllm_engine.generate([plain[0], tuned, plain[1]])
    assert texts([first[0], first[2]]) == alone
    assert first[1]["status"] == "failed" and first[1]["error"] == {
        "code": "invalid_request",
        "message": f"vLLM cannot serve adapter 'd' ({dora_dir}): ValueError: vLLM does not yet "
                   "support DoRA."}
    failures = [e for e in logs if e["event"] == "vllm_step_failed"]
    assert [(e["failed"], len(e["restarted"])) for e in failures] == [(["tuned"], 2)]
    with capture_logs() as logs:
        again = vllm_engine.generate([tuned, plain[1]])
    assert again[0]["error"] == first[1]["error"] and texts(again[1:]) == alone[1:]
    assert not [e for e in logs if e["event"] == "vllm_step_failed"]


def test_a_value_error_in_a_step_is_narrowed_to_its_request(vllm_engine, monkeypatch):
    """vLLM raising a ValueError in a step of several requests (none with an adapter): they
    restart and run one request at a time, so the request it raises for fails alone and the
    others end as they do alone."""
    from structlog.testing import capture_logs

    llm = vllm_engine.model
    step = llm.step

    def step_refusing_a_request():  # stands for a refusal that only shows in a step
        if any(s.max_tokens_param == 13 for s in llm.output_processor.request_states.values()):
            raise ValueError("cannot take this request")
        return step()

    plain = example_requests(2, max_new_tokens=16)
    alone = [texts(vllm_engine.generate([r]))[0] for r in plain]
    monkeypatch.setattr(llm, "step", step_refusing_a_request)
    with capture_logs() as logs:
        results = vllm_engine.generate([plain[0], {"id": "odd", "prompt": "Hi", "max_new_tokens": 13},
                                        plain[1]])
    assert texts([results[0], results[2]]) == alone
    assert results[1]["error"] == {"code": "invalid_request",
                                   "message": "vLLM refused it: cannot take this request"}
    failures = [(e["failed"], len(e["restarted"])) for e in logs if e["event"] == "vllm_step_failed"]
    assert failures == [([], 3), (["odd"], 0)]
