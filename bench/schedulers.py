"""The continuous scheduler against the static one on the engine: mixed output lengths (where
static wastes rows) and uniform ones (where it wastes nothing)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.workloads import MIXED_NEW_TOKENS, mixed_requests, uniform_requests


def run_scheduler(engine, requests: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """Run ``requests`` to the end on a new ``mode`` scheduler, as ``Engine.generate`` does
    (tokenizing is not timed): seconds, generated tokens (EOS included), tokens/s, decode steps,
    rows computed per step summed (``row_steps``) and those that produced a token
    (``useful_row_steps``), finish reasons; ``results`` holds each result in input order."""
    loop = engine.scheduler(mode)
    seqs = [engine.sequence(r, str(i)) for i, r in enumerate(requests)]
    t0 = time.perf_counter()
    for seq in seqs:
        loop.add(seq)
    finished = 0
    while not loop.idle:
        finished += len(loop.step())
    secs = time.perf_counter() - t0
    if finished != len(seqs):
        raise RuntimeError(f"{mode}: {finished} of {len(seqs)} sequences finished")
    tokens = sum(len(s.tokens) for s in seqs)
    reasons: dict[str, int] = {}
    for seq in seqs:
        reasons[seq.finish_reason] = reasons.get(seq.finish_reason, 0) + 1
    return {"mode": "static" if loop.limits.static else "continuous", "seconds": secs,
            "tokens": tokens, "tok_s": tokens / secs, "steps": loop.steps,
            "row_steps": loop.row_steps, "useful_row_steps": loop.useful_row_steps,
            "useful": loop.useful_row_steps / max(loop.row_steps, 1), "evictions": loop.evictions,
            "finish_reasons": reasons, "results": [engine.result(s) for s in seqs]}


def compare_schedulers(engine, requests: list[dict[str, Any]], sizes: list[int], label: str,
                       say: Callable[[str], None]) -> list[dict]:
    """Per batch size: the same requests on the static and the continuous scheduler in this
    process (which goes first alternates between sizes); continuous/static tokens/s, both
    useful-row ratios, and how many texts are identical between the two (float32 greedy: all)."""
    rows = []
    for k, size in enumerate(sizes):
        engine.max_batch_size = size
        order = ("static", "continuous") if k % 2 == 0 else ("continuous", "static")
        runs = {mode: run_scheduler(engine, requests, mode) for mode in order}
        static, cont = runs["static"], runs["continuous"]
        if cont["mode"] != "continuous":
            say(f"{label}: the engine fell back to static (model cache is not plain)")
        pairs = zip(static.pop("results"), cont.pop("results"), strict=True)
        mismatched = [i for i, (a, b) in enumerate(pairs) if a["text"] != b["text"]]
        rows.append({"batch": size, "first": order[0], "static": static, "continuous": cont,
                     "ratio": cont["tok_s"] / static["tok_s"],
                     "identical_texts": len(requests) - len(mismatched),
                     "mismatched": mismatched[:20]})
        say(f"{label} batch {size}: continuous {cont['tok_s']:.1f} vs static "
            f"{static['tok_s']:.1f} tok/s = {rows[-1]['ratio']:.2f}x; useful rows "
            f"{cont['useful']:.0%} vs {static['useful']:.0%}; "
            f"{rows[-1]['identical_texts']}/{len(requests)} identical")
    return rows


def _engine_for_schedulers(cache_dir: Path, requests: list[dict[str, Any]] | None = None):
    from worker.engine import load_engine

    engine = load_engine("demo", backend="transformers", dtype="float32", cache_dir=cache_dir,
                         max_batch_tokens=10**9)  # rows are bounded by the batch size only
    if requests:
        engine.generate([{**r, "max_new_tokens": 4} for r in requests[:2]])  # warm-up
    return engine


def bench_mixed(cache_dir: Path, sizes: list[int], n: int = 192,
                choices: tuple[int, ...] = MIXED_NEW_TOKENS, seed: int = 0,
                say: Callable[[str], None] = print) -> dict:
    """Continuous vs static scheduler on mixed output lengths: the 64 example chat prompts
    cycled to ``n``, ``max_new_tokens`` drawn from ``choices`` (seeded), natural EOS, float32
    greedy. Static keeps finished rows computing until the batch's longest row ends."""
    requests = mixed_requests(n, choices, seed)
    engine = _engine_for_schedulers(cache_dir, requests)
    drawn = {str(c): sum(r["max_new_tokens"] == c for r in requests) for c in choices}
    return {"requests": n, "new_tokens_drawn": drawn, "seed": seed, "priority": "bulk",
            "rows": compare_schedulers(engine, requests, sizes, "mixed", say)}


def bench_uniform(cache_dir: Path, sizes: list[int], n: int = 64, new_tokens: int = 64,
                  say: Callable[[str], None] = print) -> dict:
    """Continuous vs static scheduler where static wastes nothing: every prompt the same token
    length, every row running to ``max_new_tokens`` (raw list openers the model continues; the
    finish reasons of each run show whether any row stopped early). Continuous should not lose
    here (>= 0.9x): this is the price of its bookkeeping."""
    engine = _engine_for_schedulers(cache_dir)
    requests, prompt_tokens, distinct = uniform_requests(engine, n, new_tokens)
    engine.generate([{**r, "max_new_tokens": 4} for r in requests[:2]])  # warm-up
    rows = compare_schedulers(engine, requests, sizes, "uniform", say)
    return {"requests": n, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
            "distinct_prompts": distinct, "priority": "bulk", "rows": rows}
