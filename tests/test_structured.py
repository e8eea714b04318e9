"""Structured outputs (``response_format``), log-probabilities and ``n`` samples: checked at
enqueue, enforced per row inside mixed batches of the real demo model, and answered in
genqueue's and OpenAI's shapes."""

from __future__ import annotations

import json
import math
import re
import time

import jsonschema
import pytest
import torch

from worker.errors import InvalidRequest
from worker.schema import validate_request

SCHEMAS = {
    "person": {"type": "object", "additionalProperties": False, "required": ["name", "age"],
               "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 24},
                              "age": {"type": "integer", "minimum": 0, "maximum": 120}}},
    "order": {"type": "object", "required": ["customer", "items"], "properties": {
        "customer": {"type": "object", "required": ["id", "vip"],
                     "properties": {"id": {"type": "integer", "minimum": 1},
                                    "vip": {"type": "boolean"}}},
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "required": ["sku", "qty"],
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                           "qty": {"type": "integer", "minimum": 1, "maximum": 9}}}}}},
    "sentiment": {"type": "object", "required": ["label", "confidence"], "properties": {
        "label": {"enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01}}},
    "tags": {"type": "array", "minItems": 2, "maxItems": 4,
             "items": {"type": "string", "enum": ["red", "green", "blue", "cat", "dog"]}},
    "optional": {"type": "object", "required": ["title"], "properties": {
        "title": {"type": "string", "maxLength": 30},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "rating": {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.5}}},
    "measure": {"type": "object", "required": ["value", "unit"], "properties": {
        "value": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000, "multipleOf": 0.1},
        "unit": {"type": "string", "enum": ["cm", "kg", "s"]}}},
}
REGEXES = {"date": r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", "phone": r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"}
PROMPTS = ["Describe a customer record.", "Tell me about your favourite film.",
           "What did you measure today?", "Reply with data about a cat.", "Summarise: great service!"]


OBJECT_PROMPTS = [("Return a JSON object with the keys name and colour for a cat.", 0.0, None),
                  ("Return a JSON object with the keys name and colour for a cat.", 0.6, 0),
                  ("Return a JSON object with one key, city, naming the capital of France.", 0.6, 1),
                  ("Return a JSON object with the keys title and year for a famous film.", 0.0, None),
                  ("Return a JSON object with the keys title and year for a famous film.", 0.6, 3),
                  ("Return a JSON object with keys x and y for a point.", 0.6, 5)]


def json_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name],
                                                   "strict": True}}


def chat(text: str, **fields) -> dict:
    return {"messages": [{"role": "user", "content": text}], **fields}


# -- refused at enqueue, by name (no model) -------------------------------------------------


@pytest.mark.parametrize("fmt, message", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}},
     "Invalid type: strng"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}, "uniqueItems"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/gone"}}},
     "/$defs/gone"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "minimum": 5, "maximum": 1}}}, "nsatisfiable"),
    ({"type": "regex", "pattern": "[a-z"}, "unclosed character class"),
    ({"type": "json_schema"}, "'json_schema' is required"),
    ({"type": "regex"}, "'pattern' is required"),
    ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "name"),
    ({"type": "xml"}, "response_format.type"),
])
def test_unenforceable_formats_are_refused_naming_the_problem(fmt, message):
    with pytest.raises(InvalidRequest, match=re.escape(message)) as err:
        validate_request(chat("x", response_format=fmt))
    assert err.value.code == "invalid_request" and "response_format" in err.value.message


@pytest.mark.parametrize("fields, message", [
    ({"top_logprobs": 3}, "top_logprobs needs logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"n": 0}, "n:"), ({"n": 17}, "n:"), ({"n": True}, "not a boolean"),
    ({"logprobs": 1}, "logprobs"),
])
def test_bad_logprobs_and_n_are_refused(fields, message):
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        validate_request(chat("x", **fields))


def test_a_schema_is_checked_once_however_many_requests_use_it():
    from worker.structured import _problem

    _problem.cache_clear()
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS["order"]}}
    for _ in range(500):
        validate_request(chat("x", response_format=fmt))
    info = _problem.cache_info()
    assert info.misses == 1 and info.hits == 499


# -- the engine, on the real demo model -----------------------------------------------------


def constrained_requests() -> list[dict]:
    """62 constrained requests over 6 schemas, 2 regexes and json_object, greedy and
    sampled (seeded). A free-form JSON object is as long as the model makes it: the prompts
    ask for objects a 135M model closes."""
    out = []
    for s, name in enumerate(SCHEMAS):
        for k in range(8):
            sampled = k % 2 == 1
            out.append(chat(f"{PROMPTS[k % len(PROMPTS)]} Answer in JSON.", id=f"{name}-{k}",
                            max_new_tokens=160, response_format=json_format(name),
                            temperature=0.8 if sampled else 0.0, seed=100 * s + k if sampled else None))
    for name, pattern in REGEXES.items():
        for k in range(4):
            out.append(chat(f"Give a {name}.", id=f"{name}-{k}", max_new_tokens=24,
                            response_format={"type": "regex", "pattern": pattern},
                            temperature=0.7 * (k % 2), seed=k))
    for k, (prompt, temperature, seed) in enumerate(OBJECT_PROMPTS):
        out.append(chat(prompt, id=f"object-{k}", max_new_tokens=160, temperature=temperature,
                        seed=seed, response_format={"type": "json_object"}))
    return out


def check_output(request: dict, result: dict) -> None:
    fmt = request["response_format"]
    text = result["text"]
    assert result["status"] == "succeeded" and result["finish_reason"] == "stop", (request["id"], result)
    if fmt["type"] == "regex":
        assert re.fullmatch(fmt["pattern"], text), (request["id"], text)
        return
    value = json.loads(text)
    if fmt["type"] == "json_object":
        assert isinstance(value, dict), text
    else:
        jsonschema.validate(value, fmt["json_schema"]["schema"])


@pytest.mark.slow
def test_constrained_and_free_rows_share_batches_and_stay_exact(demo_engine):
    constrained = constrained_requests()
    free = [chat(p, id=f"free-{i}", max_new_tokens=24 + 8 * i) for i, p in enumerate(PROMPTS)]
    free += [{"id": "free-prompt", "prompt": "The capital of France is", "max_new_tokens": 12}]
    mixed = [r for pair in zip(constrained, [*free] * 20, strict=False) for r in pair]
    mixed += constrained[len(free) * 20:]
    assert len(constrained) >= 60 and len({r["response_format"]["type"] for r in constrained}) == 3
    results = {r["id"]: r for r in demo_engine.generate(mixed)}
    for request in constrained:
        check_output(request, results[request["id"]])
    sizes = [results[r["id"]]["batch"]["size"] for r in mixed]
    assert max(sizes) > 1  # they really shared batches
    for request in free:  # a free batch-mate is exactly what it is alone
        assert demo_engine.generate([request])[0]["text"] == results[request["id"]]["text"], request["id"]
    for request in [r for r in constrained if r.get("temperature") in (None, 0.0)][::5]:
        alone = demo_engine.generate([request])[0]
        assert alone["text"] == results[request["id"]]["text"], request["id"]
    for request in [r for r in constrained if r.get("temperature")][::7]:  # seeded: same alone
        alone = demo_engine.generate([request])[0]
        assert alone["text"] == results[request["id"]]["text"], request["id"]


@pytest.mark.slow
def test_a_row_stops_when_its_grammar_is_complete(demo_engine):
    request = chat("Give me a date.", max_new_tokens=50,
                   response_format={"type": "regex", "pattern": "[0-9]{4}-[0-9]{2}-[0-9]{2}"})
    result = demo_engine.generate([request])[0]
    assert re.fullmatch("[0-9]{4}-[0-9]{2}-[0-9]{2}", result["text"])
    assert result["finish_reason"] == "stop" and result["usage"]["completion_tokens"] < 50


@pytest.mark.slow
def test_logprobs_are_the_distribution_each_row_drew_from(demo_engine):
    model, tokenizer = demo_engine.model, demo_engine.tokenizer
    greedy = chat("Name a colour.", id="g", max_new_tokens=6, logprobs=True, top_logprobs=5)
    sampled = chat("Name a colour.", id="s", max_new_tokens=6, logprobs=True, top_logprobs=4,
                   temperature=0.7, top_k=3, seed=1)
    digits = chat("Pick a number.", id="d", max_new_tokens=8, logprobs=True, top_logprobs=20,
                  response_format={"type": "regex", "pattern": "[0-9]{3}"})
    plain = chat("Name a colour.", id="p", max_new_tokens=6)
    out = {r["id"]: r for r in demo_engine.generate([greedy, sampled, digits, plain])}
    assert out["p"]["logprobs"] is None

    g = out["g"]["logprobs"]
    assert len(g) == out["g"]["usage"]["completion_tokens"] - (out["g"]["finish_reason"] == "stop")
    assert "".join(e["token"] for e in g) == out["g"]["text"]
    # the first token's log-probabilities, computed here from one forward pass of the prompt
    ids = demo_engine.sequence(greedy).prompt_ids
    with torch.inference_mode():
        logp = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
    best = logp.topk(5)
    assert [t["token"] for t in g[0]["top_logprobs"]] == [tokenizer.decode([i]) for i in best.indices]
    for got, want in zip(g[0]["top_logprobs"], best.values.tolist(), strict=True):
        assert math.isclose(got["logprob"], want, abs_tol=1e-4)
    for entry in g:  # greedy: the token is the most likely one; the shape is OpenAI's
        assert entry["logprob"] == entry["top_logprobs"][0]["logprob"]
        assert entry["bytes"] == list(entry["token"].encode())
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}

    for entry in out["s"]["logprobs"]:  # top_k 3 at temperature 0.7: 3 candidates, summing to 1
        probs = [math.exp(t["logprob"]) for t in entry["top_logprobs"]]
        assert len(probs) == 3 and math.isclose(sum(probs), 1.0, abs_tol=1e-4)
        assert entry["token"] in [t["token"] for t in entry["top_logprobs"]]

    assert re.fullmatch("[0-9]{3}", out["d"]["text"])
    for entry in out["d"]["logprobs"]:  # masked tokens are never candidates
        assert entry["top_logprobs"] and all(t["token"].isdigit() for t in entry["top_logprobs"])
        assert math.fsum(math.exp(t["logprob"]) for t in entry["top_logprobs"]) <= 1 + 1e-4


@pytest.mark.slow
def test_n_samples_share_one_prefill_and_each_is_reproducible(demo_engine):
    prompt_rows = []

    def count_prefill_rows(_module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            prompt_rows.append(ids.shape[0])

    hook = demo_engine.model.register_forward_pre_hook(count_prefill_rows, with_kwargs=True)
    try:
        request = chat("Write a word.", id="n", n=4, temperature=1.0, seed=42, max_new_tokens=8,
                       logprobs=True)
        result = demo_engine.generate([request])[0]
    finally:
        hook.remove()
    assert prompt_rows == [1]  # four samples, one prompt row prefilled
    choices = result["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3] and result["text"] == choices[0]["text"]
    assert len({c["text"] for c in choices}) > 1
    assert result["usage"]["completion_tokens"] == sum(len(c["logprobs"]) + (c["finish_reason"] == "stop")
                                                       for c in choices)
    # sample i is the request with seed 42 + i alone, whatever its batch-mates
    mates = [chat(p, id=f"m{i}", max_new_tokens=5 + i) for i, p in enumerate(PROMPTS)]
    batched = {r["id"]: r for r in demo_engine.generate([*mates, request])}["n"]
    assert [c["text"] for c in batched["choices"]] == [c["text"] for c in choices]
    for i, choice in enumerate(choices):
        alone = demo_engine.generate([{**request, "n": 1, "seed": 42 + i}])[0]
        assert alone["text"] == choice["text"]


# -- compiled grammars and token bytes -----------------------------------------------------


def test_compiled_grammars_are_cached_and_bounded(tiny_model_dir):
    from transformers import AutoTokenizer

    from worker.engine.grammar import Grammars

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    grammars = Grammars(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}), cache_size=2)
    formats = [json_format("person"), json_format("tags"), {"type": "regex", "pattern": "a+"}]
    first = grammars.matcher(formats[0])
    again = grammars.matcher(formats[0])
    assert (grammars.misses, grammars.hits) == (1, 1) and first is not again
    assert first.consume_token(tokenizer.encode("{")[0]) and not again.is_error()  # own state
    for fmt in formats[1:]:
        grammars.matcher(fmt)
    assert len(grammars._compiled) == 2 and grammars.misses == 3
    grammars.matcher(formats[0])  # pushed out: compiled again
    assert grammars.misses == 4
    for token in range(0, len(tokenizer), 97):  # llguidance reads each token as it decodes
        text = tokenizer.decode([token])
        if "\ufffd" not in text:
            assert grammars.token_bytes(token) == text.encode(), token


# -- through the queue: client, native route, OpenAI routes, Batch lines, CLI ---------------


@pytest.mark.slow
def test_every_surface_carries_formats_logprobs_and_samples(gateway, start_worker, client, tmp_path,
                                                            redis_url):
    import openai

    from tests.test_cli import genq
    from tests.test_openai_batches import Surface

    start_worker(GENQ_SELF_CHECK="off")  # the demo model
    http = gateway(files_url=str(tmp_path / "files"))
    person = json_format("person")

    rid = client.submit(messages=[{"role": "user", "content": "Describe a person."}], n=3,
                        temperature=0.9, seed=5, max_new_tokens=60, response_format=person,
                        logprobs=True, top_logprobs=2)
    got = client.wait(rid, timeout=120)
    assert got["status"] == "succeeded" and len(got["choices"]) == 3
    assert got["text"] == got["choices"][0]["text"]
    for choice in got["choices"]:
        jsonschema.validate(json.loads(choice["text"]), SCHEMAS["person"])
        assert all(len(e["top_logprobs"]) <= 2 for e in choice["logprobs"]) and choice["logprobs"]

    native = http.post("/v1/generations", json=chat("Give a date.", max_new_tokens=20, response_format={
        "type": "regex", "pattern": REGEXES["date"]}))
    assert native.status_code == 202
    done = http.get(f"/v1/generations/{native.json()['id']}").json()
    for _ in range(600):
        if done["status"] == "succeeded":
            break
        time.sleep(0.1)
        done = http.get(f"/v1/generations/{native.json()['id']}").json()
    assert re.fullmatch(REGEXES["date"], done["text"])
    refused = http.post("/v1/generations", json=chat("x", response_format={"type": "regex", "pattern": "(a"}))
    detail = refused.json()["detail"]
    assert refused.status_code == 422 and refused.json()["code"] == "invalid_request"
    assert detail[0]["loc"][:2] == ["body", "response_format"]
    assert "unclosed group" in detail[0]["msg"]

    api = openai.OpenAI(base_url=f"{str(http.base_url).rstrip('/')}/v1", api_key="x", max_retries=0,
                        timeout=120)
    completion = api.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Describe a person."}], max_tokens=60,
        response_format=person, n=2, seed=3, logprobs=True, top_logprobs=3)
    assert [c.index for c in completion.choices] == [0, 1]
    for choice in completion.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS["person"])
        tokens = choice.logprobs.content
        assert "".join(t.token for t in tokens) == choice.message.content
        for t in tokens:  # where the grammar allows fewer than 3 tokens, fewer are listed
            assert 1 <= len(t.top_logprobs) <= 3 and bytes(t.bytes).decode() == t.token
            ranked = [c.logprob for c in t.top_logprobs]
            assert ranked == sorted(ranked, reverse=True) and t.logprob <= ranked[0] + 1e-6
    chunks = list(api.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Describe a person."}], max_tokens=60,
        response_format=person, n=2, temperature=0, logprobs=True, top_logprobs=1, stream=True,
        stream_options={"include_usage": True}))
    streamed = {0: "", 1: ""}
    for part in chunks:
        for c in part.choices:
            streamed[c.index] += c.delta.content or ""
            if c.delta.content:
                assert "".join(t.token for t in c.logprobs.content) == c.delta.content
    greedy = client.wait(client.submit(messages=[{"role": "user", "content": "Describe a person."}],
                                       max_new_tokens=60, response_format=person), timeout=120)
    assert streamed == {0: greedy["text"], 1: greedy["text"]}
    assert [c.finish_reason for p in chunks for c in p.choices if c.finish_reason] == ["stop", "stop"]
    assert chunks[-1].usage.completion_tokens == 2 * greedy["usage"]["completion_tokens"]
    legacy = api.completions.create(model="demo", prompt="The sky is", max_tokens=5, temperature=0,
                                    logprobs=2)
    lp = legacy.choices[0].logprobs
    assert "".join(lp.tokens) == legacy.choices[0].text and all(len(t) == 2 for t in lp.top_logprobs)
    digits = api.completions.create(model="demo", prompt="Area code:", max_tokens=8, temperature=0,
                                    extra_body={"response_format": {"type": "regex", "pattern": "[0-9]{3}"}})
    assert re.fullmatch("[0-9]{3}", digits.choices[0].text)  # the legacy route takes formats too
    with pytest.raises(openai.BadRequestError, match="uniqueItems"):
        api.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}],
                                    response_format={"type": "json_schema", "json_schema": {
                                        "name": "u", "schema": {"type": "array", "uniqueItems": True}}})

    s = Surface(http, tmp_path / "files")
    lines = [{"custom_id": f"c{k}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "demo", "max_tokens": 120, "seed": k, "n": 2, "logprobs": True,
                       "messages": [{"role": "user", "content": f"{PROMPTS[k]} Answer in JSON."}],
                       "response_format": json_format(name)}}
             for k, name in enumerate(["person", "sentiment", "tags"])]
    batch = s.oai.batches.create(input_file_id=s.upload(lines), endpoint="/v1/chat/completions",
                                 completion_window="24h")
    batch = s.wait(batch.id, timeout=300)
    assert batch.status == "completed", batch
    for line, name in zip(s.lines(batch.output_file_id), ["person", "sentiment", "tags"], strict=True):
        body = line["response"]["body"]
        assert len(body["choices"]) == 2
        for choice in body["choices"]:
            jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMAS[name])
            assert choice["logprobs"]["content"][0]["token"]

    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(SCHEMAS["person"]))
    out = genq("submit", "Describe a person.", "--json-schema", str(schema_file), "--wait",
               env={"GENQ_BROKER_URL": redis_url})
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(out.stdout), SCHEMAS["person"])
    out = genq("submit", "x", "--regex", "(a", env={"GENQ_BROKER_URL": redis_url})
    assert out.returncode == 2 and "response_format" in out.stderr + out.stdout


@pytest.mark.slow
def test_grammar_compiles_and_cache_hits_are_metrics(demo_engine):
    from worker.ops.metrics import WorkerMetrics

    metrics = WorkerMetrics("w")
    loop = demo_engine.scheduler()
    fmt = {"type": "regex", "pattern": "(yes|no) [0-9]{6}"}  # a format no other test uses
    before = (demo_engine.grammars.misses, demo_engine.grammars.hits)
    for i in range(3):
        loop.add(demo_engine.sequence(chat(f"Question {i}?", max_new_tokens=12, response_format=fmt)))
    while not loop.idle:
        loop.step()
    metrics.observe_step(loop)
    assert (demo_engine.grammars.misses - before[0], demo_engine.grammars.hits - before[1]) == (1, 2)

    def value(name: str) -> float:
        return metrics.registry.get_sample_value(name, {"worker": "w"})

    assert value("genq_grammar_compiles_total") == demo_engine.grammars.misses
    assert value("genq_grammar_cache_hits_total") == demo_engine.grammars.hits
