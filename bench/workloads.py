"""What the benchmarks (and the tests) send: the shipped example prompts as requests, the mixed,
uniform and interactive request sets, and the JSON schemas of the structured-output runs."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "prompts.jsonl"
MIXED_NEW_TOKENS = (16, 64, 256)
# raw-text list openers the demo model keeps continuing ("2. ...", "3. ..."): no early EOS
LIST_PROMPT = "Here are 100 facts about {topic}, one per line.\n\n1."
LIST_TOPICS = ("volcanoes", "the ocean", "honey bees", "the moon", "rivers", "deserts", "trains",
               "castles", "penguins", "bread", "glaciers", "owls", "bridges", "coffee", "comets",
               "forests", "whales", "clocks", "mountains", "rain", "salt", "tigers", "islands",
               "ships", "wolves", "copper", "snow", "lighthouses", "apples", "spiders", "caves",
               "paper")


def example_requests(n: int | None = None, max_new_tokens: int = 48) -> list[dict[str, Any]]:
    """The first ``n`` (default all 64) chat prompts of examples/prompts.jsonl (OpenAI Batch
    lines) as requests, in file order."""
    out = []
    for line in EXAMPLES.read_text().splitlines():
        if line.strip():
            body = json.loads(line)["body"]
            out.append({"messages": body["messages"], "max_new_tokens": max_new_tokens})
    return out[:n] if n else out


def cycled(requests: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """``requests`` repeated in order up to ``n`` of them."""
    return [requests[i % len(requests)] for i in range(n)]


def mixed_requests(n: int, choices: tuple[int, ...], seed: int) -> list[dict[str, Any]]:
    """The example chat prompts cycled to ``n``, each with ``max_new_tokens`` drawn from
    ``choices`` by a seeded RNG (natural EOS); bulk priority, as a batch job sends them."""
    rng = random.Random(seed)
    return [{**r, "max_new_tokens": rng.choice(choices), "priority": "bulk"}
            for r in cycled(example_requests(max_new_tokens=1), n)]


def uniform_requests(engine, n: int, new_tokens: int) -> tuple[list[dict[str, Any]], int, int]:
    """``n`` raw-text requests of one prompt length (the largest group of list openers with
    equal token counts, cycled), ``max_new_tokens=new_tokens``; (requests, prompt tokens,
    distinct prompts)."""
    by_length: dict[int, list[str]] = {}
    for topic in LIST_TOPICS:
        prompt = LIST_PROMPT.format(topic=topic)
        length = engine.sequence({"prompt": prompt, "max_new_tokens": new_tokens}).prompt_tokens
        by_length.setdefault(length, []).append(prompt)
    length, prompts = max(by_length.items(), key=lambda kv: (len(kv[1]), -kv[0]))
    requests = [{"prompt": p, "max_new_tokens": new_tokens, "priority": "bulk"}
                for p in cycled(prompts, n)]
    return requests, length, len(prompts)


def interactive_requests(k: int, new_tokens: int = 8) -> list[dict[str, Any]]:
    """The ``k`` shortest example chat prompts, ``max_new_tokens=new_tokens``, interactive."""
    base = sorted(example_requests(max_new_tokens=new_tokens),
                  key=lambda r: sum(len(m["content"]) for m in r["messages"]))
    return [{**r, "priority": "interactive"} for r in base[:k]]


SCHEMAS = {  # name -> (schema, a valid instance): 8 schemas, each JSON Schema feature once
    "flat": ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False},
             {"name": "Ada", "age": 36}),
    "nested": ({"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer"},
                                                  "tags": {"type": "array", "items": {"type": "string"}}},
                 "required": ["id", "tags"]}}, "required": ["user"]},
        {"user": {"id": 7, "tags": ["a", "bc"]}}),
    "enum": ({"type": "object", "properties": {"label": {"enum": ["positive", "negative", "neutral"]}},
              "required": ["label"]}, {"label": "neutral"}),
    "bounds": ({"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1},
                                                 "n": {"type": "integer", "minimum": 1, "maximum": 5}},
                "required": ["score", "n"]}, {"score": 0.5, "n": 3}),
    "optional": ({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "boolean"}},
                  "required": ["a"]}, {"a": "x", "b": True}),
    "pattern": ({"type": "object", "properties": {"date": {"type": "string",
                                                           "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
                 "required": ["date"]}, {"date": "2026-11-29"}),
    "anyof_ref": ({"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "number"}},
                                    "required": ["x"]}},
                   "anyOf": [{"$ref": "#/$defs/pt"}, {"type": "null"}]}, {"x": 1.5}),
    "array_bounds": ({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
                     [1, 2]),
}
