"""Does an extra batch that cuts padding pay off? The 64 example prompts, batch 16, 64 new
tokens, float32: genqueue's plan (4 full length-sorted batches) against the least-padded plan
with one batch more, run alternately twice in one process; prints pad fractions and tok/s.

    .venv/bin/python -m bench.padding_split     # about 3 minutes on a 2-core CPU
"""

from __future__ import annotations

import time

import worker.engine.engine as engine_module
from bench.workloads import example_requests
from worker.engine import load_engine
from worker.engine.batching import Row, plan_batches
from worker.ops.settings import get_settings


def least_padded(rows: list[Row], max_size: int, _max_tokens: int) -> list[list[Row]]:
    """Length-sorted rows cut into ceil(n / max_size) + 1 batches with the fewest pad tokens."""
    rows = sorted(rows, key=lambda r: r.prompt_tokens)
    n, k = len(rows), -(-len(rows) // max_size) + 1
    best = {(0, 0): (0, 0)}  # (batches, rows) -> (prompt slots, start of the last batch)
    for j in range(1, k + 1):
        for i in range(1, n + 1):
            options = [(best[j - 1, s][0] + (i - s) * rows[i - 1].prompt_tokens, s)
                       for s in range(max(0, i - max_size), i) if (j - 1, s) in best]
            if options:
                best[j, i] = min(options)
    batches, i = [], n
    for j in range(k, 0, -1):
        s = best[j, i][1]
        batches.append(rows[s:i])
        i = s
    return batches[::-1]


def main() -> None:
    engine = load_engine("demo", backend="transformers", dtype="float32",
                         cache_dir=get_settings().cache_dir, max_batch_size=16)
    requests = example_requests(max_new_tokens=64)
    engine.generate(requests[:4])  # warm up
    runs: dict[str, list[float]] = {}
    for name, plan in [("genqueue", plan_batches), ("extra batch", least_padded)] * 2:
        engine_module.plan_batches = plan
        start = time.perf_counter()
        results = engine.generate(requests)
        runs.setdefault(name, []).append(
            sum(r["usage"]["completion_tokens"] for r in results) / (time.perf_counter() - start))
    lengths = [r["usage"]["prompt_tokens"] for r in results]
    rows = [Row(i, t, 64) for i, t in enumerate(lengths)]
    for name, plan in [("genqueue", plan_batches), ("extra batch", least_padded)]:
        batches = plan(rows, 16, 10**9)
        slots = sum(len(b) * max(r.prompt_tokens for r in b) for b in batches)
        print(f"{name:12} batches {len(batches)}  pad {1 - sum(lengths) / slots:6.1%}  "
              f"tok/s {' '.join(f'{x:.1f}' for x in runs[name])}  "
              f"vs genqueue {sum(runs[name]) / sum(runs['genqueue']):.3f}")


if __name__ == "__main__":
    main()
