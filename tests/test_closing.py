"""A constrained row the budget cuts still ends valid: the closer (``worker.engine.closing``)
on the demo tokenizer, then cut rows of the real demo model on the step loop and on vLLM."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from worker.errors import InvalidRequest
from worker.structured import constraint

SCHEMAS = {
    "tags": {"type": "object", "required": ["tags"], "properties": {
        "tags": {"type": "array", "minItems": 1, "items": {"type": "string"}}}},
    "article": {"type": "object", "required": ["title", "body"], "properties": {
        "title": {"type": "string"}, "body": {"type": "string"}}},
    "nested": {"type": "object", "required": ["user", "score"], "properties": {
        "user": {"type": "object", "required": ["name", "address"], "properties": {
            "name": {"type": "string"},
            "address": {"type": "object", "required": ["city", "zip"], "properties": {
                "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}},
        "score": {"type": "number"}}},
    "review": {"type": "object", "required": ["summary", "label", "rating"], "properties": {
        "summary": {"type": "string", "minLength": 3}, "label": {"enum": ["good", "bad", "mixed"]},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "notes": {"type": "array", "items": {"type": "string"}}}},
    "readings": {"type": "object", "required": ["unit", "values"], "properties": {
        "unit": {"enum": ["cm", "kg"]}, "values": {"type": "array", "minItems": 2,
                                                 "items": {"type": "number"}}}},
    # strings whose first allowed character repeats forever: the closer searches
    "contact": {"type": "object", "required": ["email", "site"], "properties": {
        "email": {"type": "string", "format": "email"}, "site": {"type": "string", "format": "uri"}}},
    "event": {"type": "object", "required": ["at", "by"], "properties": {
        "at": {"type": "string", "format": "date-time"},
        "by": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"}}},
    "colors": {"type": "object", "required": ["colors"], "properties": {
        "colors": {"type": "array", "minItems": 2, "items": {"enum": ["red", "green", "blue"]}}}},
}
SHORTEST = {
    "tags": '{"tags":[""]}',
    "article": '{"title":"","body":""}',
    "nested": '{"user":{"name":"","address":{"city":"","zip":"00000"}},"score":0}',
    "review": '{"summary":"aaa","label":"bad","rating":1}',
    "readings": '{"unit":"cm","values":[0,0]}',
    "contact": '{"email":"a@a","site":"a:"}',
    "event": '{"at":"0000-01-01t00:00:00z","by":"a@a.com"}',
    "colors": '{"colors":["blue","blue"]}',
    "object": "{}",
}
# valid documents whose every cut is closed below: escapes, multi-byte characters, numbers
DOCUMENTS = [
    ("tags", '{"tags":["a \\"quoted\\" word","back\\\\slash","new\\nline","café ☕ naïve",'
             '"\\u001f"]}'),
    ("article", '{"title":"The History of the Internet","body":"It began in 1969, with ARPANET."}'),
    ("nested", '{"user":{"name":"Ada Lovelace","address":{"city":"London","zip":"12345"}},'
               '"score":-12.5e-3}'),
    ("review", '{"summary":"Fine, mostly.","label":"mixed","rating":4,"notes":["slow","warm"]}'),
    ("readings", '{"unit":"kg","values":[1.25,-0.5,3e2,17]}'),
    ("object", '{"a":[1,{"b":null}],"c":"d e","f":true,"g":{}}'),
    ("contact", '{"email":"ada.lovelace@example.org","site":"https://example.org/a?b=c#d"}'),
    ("event", '{"at":"2024-01-02T03:04:05.678+01:00","by":"ada@example.com"}'),
    ("colors", '{"colors":["red","green","blue","red"]}'),
]
# formats the grammar enforces that jsonschema leaves unchecked without extra packages
FORMATS = jsonschema.FormatChecker()
FORMATS.checks("uri")(lambda value: re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", value) is not None)
FORMATS.checks("date-time")(lambda value: re.fullmatch(
    r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)", value) is not None)


def json_format(name: str, strict: bool = True) -> dict:
    if name == "object":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name],
                                                   "strict": strict}}


def check_json(fmt: dict, text: str) -> None:
    """``text`` parses and is valid for the schema the grammar enforces, formats too."""
    jsonschema.validate(json.loads(text), constraint(fmt)[1], format_checker=FORMATS)


@pytest.fixture(scope="module")
def grammars(cache_dir):
    from transformers import AutoTokenizer

    from worker.engine.demo import demo_model_dir
    from worker.engine.grammar import Grammars

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir(cache_dir))
    return Grammars(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))


def closer_of(grammars, fmt: dict, budget: int = 10_000):
    grammars.compiled(fmt)
    return grammars.closer(fmt, budget)


# -- the closer, on the demo tokenizer (no model) -------------------------------------------


@pytest.mark.parametrize("name", list(SHORTEST))
def test_the_shortest_document_is_valid_and_smaller_budgets_are_refused(grammars, name):
    fmt = json_format(name)
    closer = closer_of(grammars, fmt)
    keep, closing = closer.fit([], 10_000)
    text = grammars.tokenizer.decode_bytes(closing).decode()
    assert keep == 0 and text == SHORTEST[name] and len(closing) == closer.shortest
    check_json(fmt, text)
    assert grammars.closer(fmt, closer.shortest) is closer
    with pytest.raises(InvalidRequest, match=re.escape(
            f"max_new_tokens: {closer.shortest - 1} tokens cannot hold a document valid for "
            f"response_format (the shortest takes {closer.shortest})")):
        grammars.closer(fmt, closer.shortest - 1)


@pytest.mark.parametrize("name, document", DOCUMENTS, ids=[d[0] for d in DOCUMENTS])
@pytest.mark.parametrize("strict", [True, False])
def test_every_cut_closes_valid_within_its_budget_keeping_all_it_can(grammars, name, document,
                                                                    strict):
    fmt = json_format(name, strict)
    closer = closer_of(grammars, fmt)
    tokens = grammars.tokenizer.tokenize_str(document)
    decode = grammars.tokenizer.decode_bytes
    for cut in range(len(tokens) + 1):
        # all of the cut is kept but an unfinished character (its other bytes are tokens too)
        best, own = closer.fit(tokens[:cut], 10_000)
        assert cut - 2 <= best <= cut
        for budget in range(max(cut, closer.shortest), max(cut, best + len(own)) + 1):
            keep, closing = closer.fit(tokens[:cut], budget)
            assert keep <= cut and keep + len(closing) <= budget, (cut, budget)
            if budget >= best + len(own):  # it closes in time: nothing more is dropped
                assert (keep, closing) == (best, own)
            text = decode(tokens[:keep] + closing).decode()
            check_json(fmt, text)
            assert text.startswith(decode(tokens[:keep]).decode())


def test_regex_formats_close_too(grammars):
    fmt = {"type": "regex", "pattern": r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"}
    closer = closer_of(grammars, fmt)
    tokens = grammars.tokenizer.tokenize_str("(555) 12")
    keep, closing = closer.fit(tokens, len(tokens) + 8)
    assert grammars.tokenizer.decode_bytes(tokens[:keep] + closing) == b"(555) 120-0000"


@pytest.mark.parametrize("pattern, text", [
    (r"[a-z]+@[a-z]+\.com", "someone@example.com"),  # the first allowed letter repeats forever
    (r"(ab)+c", "abababababc"),
    (r"https?://[a-z]+(\.[a-z]+)+/?", "https://www.example.org/"),
    (r"[0-9]{2}(-[0-9]{2})*:[A-Z]", "12-34-56:Q"),
])
def test_regexes_whose_first_choice_loops_close_at_every_cut(grammars, pattern, text):
    closer = closer_of(grammars, {"type": "regex", "pattern": pattern})
    tokens = grammars.tokenizer.tokenize_str(text)
    for cut in range(len(tokens) + 1):
        for budget in range(max(cut, closer.shortest), cut + 4):
            keep, closing = closer.fit(tokens[:cut], budget)
            out = grammars.tokenizer.decode_bytes(tokens[:keep] + closing).decode()
            assert keep + len(closing) <= budget and re.fullmatch(pattern, out), (cut, budget, out)


def test_a_format_with_no_document_in_reach_is_refused(grammars):
    fmt = {"type": "json_schema", "json_schema": {"name": "long", "schema": {
        "type": "object", "required": ["s"], "properties": {"s": {"type": "string",
                                                                   "minLength": 5000}}}}}
    grammars.compiled(fmt)
    with pytest.raises(InvalidRequest, match="^response_format: no valid document of at most "
                                             "4096 bytes"):
        grammars.closer(fmt, 100_000)


def test_a_cut_row_closes_once_and_a_running_one_shows_only_what_stays(grammars):
    from worker.engine.sequence import Sequence
    from worker.schema import validate_request

    fmt = json_format("article")
    request = validate_request({"prompt": "x", "max_new_tokens": 14, "response_format": fmt,
                                "logprobs": True, "top_logprobs": 1})
    tokens = grammars.tokenizer.tokenize_str('{"title":"History","body":"It began in 1969, with')
    tokens = tokens[:request.max_new_tokens]
    seq = Sequence(id="r", request=request, prompt_ids=[1], closer=grammars.closer(fmt, 14),
                   logprobs=[(t, -0.5, [(t, -0.5)]) for t in tokens])

    class Decoder:  # the tokenizer's decode, as Sequence.text calls it
        def decode(self, ids, **_):
            return grammars.tokenizer.decode_bytes(ids).decode()

    seq.tokens = tokens[:10]
    shown = [seq.text(Decoder())]
    seq.tokens = list(tokens)
    shown.append(seq.text(Decoder()))
    seq.finish_reason = "length"
    seq.close_cut()
    final = seq.text(Decoder())
    assert final == '{"title":"History","body":"It began in 19"}' and len(seq.tokens) <= 14
    assert shown[0] == Decoder().decode(tokens[:10])  # far from the end: all of it is shown
    assert shown[1] != Decoder().decode(tokens) and all(final.startswith(s) for s in shown)
    check_json(fmt, final)
    kept = sum(e[1] == -0.5 for e in seq.logprobs)
    assert 0 < kept < len(seq.tokens) and seq.tokens[:kept] == tokens[:kept]
    assert [e[0] for e in seq.logprobs] == seq.tokens  # the closing: logprob 0, one candidate
    assert all(e[1:] == (0.0, [(e[0], 0.0)]) for e in seq.logprobs[kept:])
    seq.close_cut()  # once
    assert seq.text(Decoder()) == final


# -- cut rows of the real demo model ------------------------------------------------------

PROMPTS = ["Write a long article about the history of the internet.",
           "Describe every city you know in detail.", "List many tags for a blog post about URLs.",
           "Tell me everything about the moon.", "Review a very long film in detail."]
BUDGETS = (8, 10, 12, 16, 20, 24, 28, 32, 48, 64)


def cut_requests(count: int, engine) -> list[dict]:
    """``count`` constrained requests (json_schema strict and not, json_object) over schemas
    with unbounded strings, arrays, nested required objects, numbers and enums, budgets
    8 to 64 (at least the format's shortest document), most sampled to run long."""
    out = []
    names = [*SCHEMAS, "object"]
    for k in range(count):
        name = names[k % len(names)]
        fmt = json_format(name, strict=k % 2 == 0)
        shortest = closer_of(engine.grammars, fmt).shortest
        out.append({"id": f"{name}-{k}", "max_new_tokens": max(BUDGETS[k % len(BUDGETS)], shortest),
                    "messages": [{"role": "user",
                                  "content": f"{PROMPTS[k % len(PROMPTS)]} Answer in JSON."}],
                    "response_format": fmt, "temperature": 0.0 if k % 5 == 0 else 1.0, "seed": k})
    return out


def check_cut_rows(requests: list[dict], results: list[dict]) -> None:
    for request, result in zip(requests, results, strict=True):
        assert result["status"] == "succeeded", result
        check_json(request["response_format"], result["text"])
        assert result["finish_reason"] in ("stop", "length"), result
        assert result["usage"]["completion_tokens"] <= request["max_new_tokens"], result
    assert sum(r["finish_reason"] == "length" for r in results) >= len(results) // 2


def test_sixty_cut_rows_end_valid_on_the_step_loop(demo_engine):
    requests = cut_requests(60, demo_engine)
    results = demo_engine.generate(requests)
    check_cut_rows(requests, results)
    too_small = {**requests[0], "max_new_tokens": 4}  # below {"tags":[""]}: refused by name
    refused, beside = demo_engine.generate([too_small, requests[1]])
    assert refused["status"] == "failed" and refused["error"]["code"] == "invalid_request"
    assert "max_new_tokens: 4 tokens cannot hold" in refused["error"]["message"]
    assert beside["status"] == "succeeded"  # it fails alone


@pytest.fixture(scope="module")
def vllm_engine(cache_dir):
    from worker.engine import load_engine

    return load_engine("demo", backend="vllm", dtype="float32", cache_dir=cache_dir)


@pytest.mark.process  # loading vLLM starts a process
def test_cut_rows_end_valid_on_vllm_as_on_the_step_loop(vllm_engine, demo_engine):
    requests = cut_requests(12, vllm_engine)
    results = vllm_engine.generate(requests)
    check_cut_rows(requests, results)
    greedy = [r for r in requests if r["temperature"] == 0.0]
    assert [r["text"] for r in demo_engine.generate(greedy)] == [
        res["text"] for req, res in zip(requests, results, strict=True) if req in greedy]
