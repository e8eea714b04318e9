"""The engine alone: generated tokens/s batched vs one request at a time, and the padding
waste of arrival-order batches vs genqueue's plan."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from bench.harness import timed, tokens_per_s
from bench.workloads import example_requests


def bench_engine(cache_dir: Path, sizes: list[int], dtypes: list[str], new_tokens: int,
                 n: int, say: Callable[[str], None]) -> list[dict]:
    """Generated tokens/s one request at a time vs the step loop at each batch size, per
    dtype, on the same ``n`` example prompts (the continuous scheduler, as ``generate`` runs)."""
    from worker.engine import load_engine

    requests = example_requests(n, max_new_tokens=new_tokens)
    rows = []
    for dtype in dtypes:
        engine = load_engine("demo", backend="transformers", dtype=dtype, cache_dir=cache_dir)
        engine.generate(requests[:2])  # warm-up
        results, secs = timed(lambda e=engine: [e.generate([r])[0] for r in requests])
        rows.append({"dtype": dtype, "batch": 1, "tok_s": tokens_per_s(results, secs),
                     "seconds": secs, "requests": len(requests), "pad_fraction": 0.0})
        say(f"engine {dtype} one-at-a-time: {rows[-1]['tok_s']:.1f} tok/s")
        for size in sizes:
            engine.max_batch_size = size
            results, secs = timed(lambda e=engine: e.generate(requests))
            pads = [r["batch"]["pad_fraction"] for r in results]
            rows.append({"dtype": dtype, "batch": size, "tok_s": tokens_per_s(results, secs),
                         "seconds": secs, "requests": len(requests),
                         "pad_fraction": sum(pads) / len(pads)})
            say(f"engine {dtype} batch {size}: {rows[-1]['tok_s']:.1f} tok/s")
    base = next(r["tok_s"] for r in rows if r["dtype"] == "float32" and r["batch"] == 1)
    for r in rows:
        r["vs_fp32_alone"] = r["tok_s"] / base
    return rows


def bench_padding(cache_dir: Path, batch: int, pending: list[int]) -> list[dict]:
    """Pad tokens / prompt slots: arrival-order batches vs genqueue's plan, same stream."""
    from transformers import AutoTokenizer

    from worker.engine.batching import Row, plan_batches
    from worker.engine.demo import demo_model_dir
    from worker.engine.prompts import encode
    from worker.schema import validate_request

    tok = AutoTokenizer.from_pretrained(demo_model_dir(cache_dir))
    requests = example_requests(max_new_tokens=64)
    lengths = [len(ids) for ids in encode(tok, [validate_request(r) for r in requests])]

    def waste(batches: list[list[int]]) -> float:
        slots = sum(len(b) * max(b) for b in batches)
        return 1 - sum(sum(b) for b in batches) / slots

    rows = []
    rng = random.Random(0)
    for n in pending:
        stream = [lengths[i % len(lengths)] for i in range(n)]
        rng.shuffle(stream)
        arrival = [stream[i:i + batch] for i in range(0, n, batch)]
        planned = plan_batches([Row(i, t, 64) for i, t in enumerate(stream)], batch, 10**9)
        rows.append({"pending": n, "batch": batch, "arrival_pad": waste(arrival),
                     "genqueue_pad": waste([[r.prompt_tokens for r in b] for b in planned])})
    return rows
