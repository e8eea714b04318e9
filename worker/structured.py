"""Structured output: a request's ``response_format`` as an llguidance grammar.

Shared by every layer: the client and the gateway check a format before anything is queued
(an invalid or unsupported schema is refused by name), the engine compiles the same grammar
for its tokenizer (``worker.engine.grammar``). Formats, in OpenAI's shapes plus one of
genqueue's:

- ``{"type": "text"}``: no constraint;
- ``{"type": "json_object"}``: any JSON object;
- ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``: JSON valid for the
  schema (always enforced, ``strict`` or not; with ``strict: true`` an object schema that
  does not say ``additionalProperties`` is closed, as OpenAI's strict mode requires);
- ``{"type": "regex", "pattern": "..."}``: text matching the pattern (whole output).

JSON is written compactly (no free whitespace between tokens): a small model cannot then
spend its tokens on blank lines. A row that runs out of ``max_new_tokens`` still ends valid
(``worker.engine.closing``).
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import llguidance

JSON_DEFAULTS = {"whitespace_flexible": False}
MAX_FORMAT_BYTES = 65_536


def constraint(response_format: dict[str, Any] | None) -> tuple[str, Any] | None:
    """What a validated ``response_format`` demands: ``("json", schema)`` (strict schemas
    closed, ``json_object`` as any object), ``("regex", pattern)``, or None (unconstrained)."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json", _compact({"type": "object"})
    if kind == "json_schema":
        spec = response_format["json_schema"]
        return "json", _compact(_closed(spec["schema"]) if spec.get("strict") else spec["schema"])
    if kind == "regex":
        return "regex", response_format["pattern"]
    raise ValueError(f"unknown response_format type {kind!r}")


def grammar_for(response_format: dict[str, Any] | None) -> str | None:
    """The llguidance grammar of a validated ``response_format`` (None: unconstrained)."""
    demand = constraint(response_format)
    if demand is None:
        return None
    kind, value = demand
    if kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(value)
    return llguidance.LLMatcher.grammar_from_regex(value)


def _compact(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` carrying llguidance's JSON options (``x-guidance``, those it gives itself
    first), so every grammar built from it writes compact JSON: ours, and vLLM's (its guidance
    backend ignores a request's ``disable_any_whitespace``)."""
    return {**schema, "x-guidance": {**JSON_DEFAULTS, **schema.get("x-guidance", {})}}


def _closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object schema that has
    ``properties`` and does not say otherwise."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in ("enum", "const", "default", "examples") else _closed(v)
           for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _canonical(response_format: dict[str, Any]) -> str:
    return json.dumps(response_format, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def format_key(response_format: dict[str, Any]) -> str:
    """A stable hash of a format (the key of compiled grammars)."""
    return hashlib.sha256(_canonical(response_format).encode()).hexdigest()


def check_format(response_format: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming what is wrong with a format llguidance cannot enforce
    (an invalid schema, an unsupported keyword, a bad pattern). Checked once per distinct
    format (a 100,000-line batch with one schema compiles it once)."""
    text = _canonical(response_format)
    if len(text.encode()) > MAX_FORMAT_BYTES:
        raise ValueError(f"is {len(text.encode())} bytes of JSON, more than {MAX_FORMAT_BYTES}")
    problem = _problem(text)
    if problem:
        raise ValueError(problem)


@functools.lru_cache(maxsize=256)
def _problem(text: str) -> str | None:
    try:
        grammar = grammar_for(json.loads(text))
    except Exception as exc:  # noqa: BLE001 - llguidance raises plain exceptions
        return str(exc)
    if grammar is None:
        return None
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        return "; ".join(messages) or "the grammar cannot be compiled"
    return None
