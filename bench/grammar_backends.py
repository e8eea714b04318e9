"""Compare xgrammar and llguidance on the demo tokenizer: JSON-schema coverage, compile time,
and the per-token cost of a row's mask (what a constrained row adds to each decode step).

    pip install xgrammar llguidance   # genqueue itself depends on llguidance only
    python -m bench.grammar_backends

Each schema's valid example is tokenized and fed token by token; every step computes the
row's bitmask (the library's part; applying a bitmask to logits is the same torch code for
both and is left out).
"""

from __future__ import annotations

import json
import statistics
import time

from bench.workloads import SCHEMAS
from worker.engine.demo import demo_model_dir
from worker.ops.settings import Settings

EXTRA_FEATURES = {  # coverage only: does the library accept it?
    "format_date": {"type": "string", "format": "date"},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                        {"required": ["a"]}]},
    "oneOf": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
    "const": {"const": "x"},
    "minLength": {"type": "string", "minLength": 2, "maxLength": 4},
    "patternProperties": {"type": "object", "patternProperties": {"^a": {"type": "integer"}}},
    "recursive": {"$defs": {"n": {"type": "object", "properties": {"c": {"type": "array",
                                                                         "items": {"$ref": "#/$defs/n"}}}}},
                  "$ref": "#/$defs/n"},
}


def xgrammar_backend(tokenizer, vocab_size):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)

    def compile_(schema):
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                            separators=(",", ":"))

    def run(compiled, ids):
        matcher = xgr.GrammarMatcher(compiled)
        mask = xgr.allocate_token_bitmask(1, vocab_size)
        times = []
        for t in ids:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(mask)
            times.append(time.perf_counter() - start)
            assert matcher.accept_token(t), "valid example refused"
        return times

    return compile_, run


def llguidance_backend(tokenizer, vocab_size):
    import llguidance
    import llguidance.torch as llt

    from worker.engine.grammar import _tokenizer_json

    lltok = llguidance.LLTokenizer(_tokenizer_json(tokenizer), n_vocab=vocab_size)

    def compile_(schema):
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False})
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
        if failed:
            raise ValueError(messages)
        matcher = llguidance.LLMatcher(lltok, grammar)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return grammar

    def run(grammar, ids):
        matcher = llguidance.LLMatcher(lltok, grammar)
        mask = llt.allocate_token_bitmask(1, vocab_size)
        times = []
        for t in ids:
            start = time.perf_counter()
            llt.fill_next_token_bitmask(matcher, mask, 0)
            times.append(time.perf_counter() - start)
            assert matcher.consume_token(t), matcher.get_error()
        return times

    return compile_, run


def main() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir(Settings().cache_dir))
    vocab_size = len(tokenizer)
    for name, factory in (("xgrammar", xgrammar_backend), ("llguidance", llguidance_backend)):
        compile_, run = factory(tokenizer, vocab_size)
        compile_ms, step_us, covered = [], [], []
        for schema, example in SCHEMAS.values():
            start = time.perf_counter()
            compiled = compile_(schema)
            compile_ms.append((time.perf_counter() - start) * 1000)
            ids = tokenizer.encode(json.dumps(example, separators=(",", ":")), add_special_tokens=False)
            step_us += [t * 1e6 for t in run(compiled, ids)]
        for feature, schema in EXTRA_FEATURES.items():
            try:
                compile_(schema)
                covered.append(feature)
            except Exception:  # noqa: BLE001 - coverage probe
                pass
        print(f"{name}: compile per schema median {statistics.median(compile_ms):.1f} ms, "
              f"max {max(compile_ms):.1f} ms; mask per token median {statistics.median(step_us):.0f} us, "
              f"p90 {statistics.quantiles(step_us, n=10)[-1]:.0f} us; extra features accepted "
              f"{len(covered)}/{len(EXTRA_FEATURES)}: {', '.join(covered)}")


if __name__ == "__main__":
    main()
