"""Structured outputs on the engine: tokens/s of a batch with 0%, 50% and 100% of its rows
constrained, the share of time spent in the grammar masks, and each schema's compile time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.harness import timed, tokens_per_s
from bench.workloads import SCHEMAS, example_requests

PLAN = [("unconstrained", 0.0, 0), ("50%, 1 schema", 0.5, 1), ("100%, 1 schema", 1.0, 1),
        ("50%, 8 schemas", 0.5, len(SCHEMAS)), ("100%, 8 schemas", 1.0, len(SCHEMAS))]


def response_formats() -> dict[str, dict]:
    """Each schema as a ``response_format`` under its name, and under ``name+`` as the items of
    an array (a row goes on item after item until its budget runs out)."""
    fmt = {name: {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
           for name, (schema, _) in SCHEMAS.items()}
    for name, (schema, _) in SCHEMAS.items():  # definitions stay at the root for their $refs
        items = {k: v for k, v in schema.items() if k != "$defs"}
        long = {"type": "array", "minItems": 1, "items": items, "$defs": schema.get("$defs", {})}
        fmt[f"{name}+"] = {"type": "json_schema", "json_schema": {"name": name, "schema": long}}
    return fmt


def constrained(prompts: list[dict], formats: list[dict], share: float) -> list[dict]:
    """``prompts`` with every ``1 / share``-th row given the next of ``formats`` in turn."""
    every = round(1 / share) if share else 0
    out, k = [], 0
    for i, r in enumerate(prompts):
        if every and i % every == 0:
            r = {**r, "response_format": formats[k % len(formats)]}
            k += 1
        out.append(r)
    return out


@contextmanager
def mask_timer() -> Iterator[list[float]]:
    """Sum the seconds spent applying grammar masks into the yielded one-item list."""
    import worker.engine.sampling as sampling

    spent = [0.0]
    apply_masks = sampling.apply_masks

    def timed_masks(logits, rows):
        start = time.perf_counter()
        apply_masks(logits, rows)
        spent[0] += time.perf_counter() - start

    sampling.apply_masks = timed_masks
    try:
        yield spent
    finally:
        sampling.apply_masks = apply_masks


def _best_run(engine, requests: list[dict], repeats: int, spent: list[float]) -> tuple:
    """The fastest of ``repeats`` runs: (results, seconds, seconds in masks)."""
    best = None
    for _ in range(repeats):
        spent[0] = 0.0
        results, secs = timed(lambda: engine.generate(requests))
        if best is None or secs < best[1]:
            best = (results, secs, spent[0])
    return best


def _runs(engine, prompts: list[dict], fmt: dict[str, dict], repeats: int,
          say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every (natural, full length) x ``PLAN`` run, each failed row an error."""
    names, runs = list(SCHEMAS), []
    with mask_timer() as spent:
        for kind, suffix in (("natural", ""), ("full length", "+")):
            for label, share, schemas in PLAN:
                formats = [fmt[name + suffix] for name in names[:schemas]]
                results, secs, masks = _best_run(engine, constrained(prompts, formats, share),
                                                 repeats, spent)
                failed = [r["error"] for r in results if r["status"] != "succeeded"]
                if failed:
                    raise RuntimeError(f"structured {kind} {label}: {failed[0]}")
                runs.append({"kind": kind, "run": label, "constrained": share,
                             "schemas": schemas, "tok_s": tokens_per_s(results, secs),
                             "seconds": secs, "mask_share": masks / secs,
                             "tokens": sum(r["usage"]["completion_tokens"] for r in results)})
                say(f"structured {kind} {label}: {runs[-1]['tok_s']:.1f} tok/s, masks "
                    f"{100 * runs[-1]['mask_share']:.1f}% of the time")
    for r in runs:
        base = next(b["tok_s"] for b in runs if b["kind"] == r["kind"] and not b["constrained"])
        r["vs_unconstrained"] = r["tok_s"] / base
    return runs


def compile_times(grammars, fmt: dict[str, dict]) -> dict[str, Any]:
    """Milliseconds to compile each schema's grammar, uncached then cached."""
    names = list(SCHEMAS)
    uncached, cached = [], []
    for name in names:
        grammars._compiled.clear()
        _, secs = timed(lambda n=name: grammars.matcher(fmt[n]))
        uncached.append(secs * 1000)
        _, secs = timed(lambda n=name: grammars.matcher(fmt[n]))
        cached.append(secs * 1000)
    return {"uncached_median": statistics.median(uncached), "uncached_max": max(uncached),
            "cached_median": statistics.median(cached), "cached_max": max(cached),
            "per_schema": dict(zip(names, zip(uncached, cached, strict=True), strict=True))}


def bench_structured(cache_dir: Path, batch: int = 32, new_tokens: int = 48, repeats: int = 2,
                     say: Callable[[str], None] = print) -> dict:
    """Generated tokens/s of one batch of ``batch`` example prompts with 0%, 50% and 100% of
    its rows constrained (one schema, then the 8 schemas in turn), with the time spent in the
    grammar masks; and each schema's compile time, uncached and cached.

    Two kinds of runs: ``natural`` (the schema as is: a constrained row ends when its JSON is
    complete, usually well before ``new_tokens``, so the batch thins out) and ``full length``
    (each schema as the items of an array: a constrained row goes on item after item until its
    ``new_tokens`` run out, then is closed valid, so the runs do about the same work and the
    ratio is the cost of constraining; a minimum of items must fit the budget, or the request
    is refused)."""
    from worker.engine import load_engine

    engine = load_engine("demo", backend="transformers", dtype="float32", cache_dir=cache_dir,
                         max_batch_size=batch)
    fmt = response_formats()
    prompts = example_requests(batch, max_new_tokens=new_tokens)
    engine.generate(constrained(prompts, [fmt[n] for n in SCHEMAS], 1.0))  # warm-up, all compiled
    runs = _runs(engine, prompts, fmt, repeats, say)
    compile_ms = compile_times(engine.grammars, fmt)
    say(f"grammar compile: {compile_ms['uncached_median']:.2f} ms uncached, "
        f"{compile_ms['cached_median']:.3f} ms cached (median of {len(SCHEMAS)} schemas)")
    return {"batch": batch, "new_tokens": new_tokens, "runs": runs, "compile_ms": compile_ms}
