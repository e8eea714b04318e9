"""``genq bench --parts backends``: the vLLM backend beside our step loop, on the same requests
in the same invocation (ratios only mean something within one run on these noisy machines).

- engine: tokens/s of ``Engine`` on each backend, the 64 example prompts (64 and 256 new
  tokens, batch 32 and 64), and how many texts are identical;
- queue: a vLLM-backed worker through Redis (submit to last result polled) vs vLLM's own
  offline ``LLM.generate`` on the same token ids with the same engine arguments;
- interactive: time to result of short interactive requests, idle vs under a bulk job, on
  the vLLM backend;
- prefix: 64 bulk requests sharing a ~1,000-token system prompt, prefix caching on vs off;
- mixed: the mixed workload of ``--parts mixed`` on both backends.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import Service, run_job, tokens_per_s
from bench.interactive import bench_interactive_mode
from bench.schedulers import run_scheduler
from bench.workloads import (
    MIXED_NEW_TOKENS,
    cycled,
    example_requests,
    interactive_requests,
    mixed_requests,
)

SYSTEM_PROMPT = " ".join(
    f"Rule {i}: answer politely, cite the handbook section {i}, and never reveal internal codes."
    for i in range(1, 56))


def _engine(cache_dir: Path, backend: str, batch: int, **settings: Any):
    from worker.engine import load_engine

    engine = load_engine("demo", backend=backend, dtype="float32", cache_dir=cache_dir,
                         max_batch_size=batch, max_batch_tokens=10**9, **settings)
    engine.generate([{"prompt": "Hi", "max_new_tokens": 2}])  # warm-up
    return engine


def _bulk(requests: list[dict]) -> list[dict]:
    return [{**r, "priority": "bulk"} for r in requests]


def _side_by_side(engines: dict[str, Any], requests: list[dict], size: int) -> dict[str, Any]:
    """Both backends on ``requests`` at batch ``size``; tokens/s, ratio, identical texts."""
    runs = {}
    for name, engine in engines.items():
        engine.max_batch_size = size
        runs[name] = run_scheduler(engine, requests, "continuous")
    texts = [[r["text"] for r in run.pop("results")] for run in runs.values()]
    return {"batch": size, "tokens": runs["vllm"]["tokens"],
            "step_loop_tok_s": runs["step_loop"]["tok_s"], "vllm_tok_s": runs["vllm"]["tok_s"],
            "ratio": runs["vllm"]["tok_s"] / runs["step_loop"]["tok_s"],
            "identical_texts": sum(a == b for a, b in zip(*texts, strict=True)),
            "requests": len(requests)}


def bench_engines(cache_dir: Path, sizes: list[int], new_tokens: list[int], mixed_n: int,
                  say: Callable[[str], None]) -> dict[str, Any]:
    """Engine tokens/s on each backend (example prompts; then the mixed workload)."""
    engines = {"step_loop": _engine(cache_dir, "transformers", max(sizes)),
               "vllm": _engine(cache_dir, "vllm", max(sizes))}
    rows = []
    for n in new_tokens:
        for size in sizes:
            requests = _bulk(example_requests(max_new_tokens=n))
            rows.append({"new_tokens": n, **_side_by_side(engines, requests, size)})
            say(f"backends engine, {n} new tokens, batch {size}: vLLM {rows[-1]['vllm_tok_s']:.1f}"
                f" vs step loop {rows[-1]['step_loop_tok_s']:.1f} tok/s = {rows[-1]['ratio']:.2f}x, "
                f"{rows[-1]['identical_texts']}/64 identical")
    mixed = mixed_requests(mixed_n, MIXED_NEW_TOKENS, 0)
    mixed_row = _side_by_side(engines, mixed, max(sizes))
    say(f"backends mixed ({mixed_n} requests, batch {max(sizes)}): vLLM {mixed_row['ratio']:.2f}x "
        f"the step loop, {mixed_row['identical_texts']}/{mixed_n} identical")
    del engines
    gc.collect()
    return {"engine": rows, "mixed": mixed_row}


def bench_prefix(cache_dir: Path, n: int, say: Callable[[str], None]) -> dict[str, Any]:
    """``n`` bulk requests sharing a long system prompt: prefix caching on vs off (vLLM)."""
    questions = [r["messages"][-1]["content"] for r in example_requests()]
    requests = [{"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                              {"role": "user", "content": questions[i % len(questions)]}],
                 "max_new_tokens": 16, "priority": "bulk"} for i in range(n)]
    runs = {}
    for caching in (True, False):
        engine = _engine(cache_dir, "vllm", 32, vllm_options={"enable_prefix_caching": caching})
        prompt_tokens = engine.sequence(requests[0]).prompt_tokens
        runs[caching] = run_scheduler(engine, requests, "continuous")
        runs[caching]["texts"] = [r["text"] for r in runs[caching].pop("results")]
        del engine
        gc.collect()
    on, off = runs[True], runs[False]
    row = {"requests": n, "prompt_tokens": prompt_tokens, "seconds_on": on["seconds"],
           "seconds_off": off["seconds"], "speedup": off["seconds"] / on["seconds"],
           "identical_texts": sum(a == b for a, b in zip(on["texts"], off["texts"], strict=True))}
    say(f"prefix caching, {n} requests x {prompt_tokens} prompt tokens: {row['speedup']:.2f}x "
        f"faster on ({on['seconds']:.1f} s vs {off['seconds']:.1f} s)")
    return row


def bench_queue_vs_offline(cache_dir: Path, workdir: Path, n: int, new_tokens: int,
                           say: Callable[[str], None]) -> dict[str, Any]:
    """A vLLM worker through Redis vs vLLM's offline ``LLM.generate`` on the same prompts."""
    from worker.engine.demo import demo_model_dir
    from worker.engine.vllm_engine import engine_args
    from worker.ops.settings import Settings

    requests = _bulk(cycled(example_requests(max_new_tokens=new_tokens), n))
    svc = Service({"GENQ_CACHE_DIR": str(cache_dir), "GENQ_BACKEND": "vllm", "GENQ_DTYPE": "float32",
                   "GENQ_MAX_BATCH_SIZE": str(n)}, workdir / "queue-vllm")
    try:
        svc.start_worker("bench@vllm")
        client = svc.client()
        run_job(client, [{**r, "max_new_tokens": 4} for r in requests[:4]])  # warm-up
        served, service_s = run_job(client, requests)
    finally:
        svc.stop()
    args = engine_args(Settings(cache_dir=cache_dir, dtype="float32", max_batch_size=n),
                       str(demo_model_dir(cache_dir)), 8192, cuda=False)  # the worker's arguments
    row: dict[str, Any] = {"requests": n, "new_tokens": new_tokens,
                           "queue_tok_s": tokens_per_s(served, service_s)}
    # vLLM's default layout (engine core in a second process, one torch thread on a 2-core
    # machine), then the worker's (engine core in the process: VLLM_ENABLE_V1_MULTIPROCESSING=0)
    for label, inprocess in (("offline", False), ("offline_inprocess", True)):
        tok_s, identical = _offline(cache_dir, requests, served, args, inprocess)
        row.update({f"{label}_tok_s": tok_s, f"{label}_identical": identical,
                    f"ratio_{label}": row["queue_tok_s"] / tok_s})
    row["ratio"] = row["ratio_offline_inprocess"]
    say(f"queue vs offline vLLM, {n} requests: {row['ratio']:.1%} of the same process layout, "
        f"{row['ratio_offline']:.1%} of vLLM's default one")
    return row


def _offline(cache_dir: Path, requests: list[dict], served: list[dict], args: dict[str, Any],
             inprocess: bool) -> tuple[float, int]:
    """vLLM's ``LLM.generate`` on the requests' token ids (our tokenizer), greedy, in a fresh
    process as a user's script runs it (vLLM's defaults: its engine core in a process of its
    own); (tokens/s, texts identical to ``served``)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from transformers import AutoTokenizer

    from worker.engine.demo import demo_model_dir
    from worker.engine.prompts import encode
    from worker.engine.vllm_engine import CPU_KV_CACHE_GIB
    from worker.schema import validate_request

    path = str(demo_model_dir(cache_dir))
    tokenizer = AutoTokenizer.from_pretrained(path)
    job = {"args": args,
           "prompts": encode(tokenizer, [validate_request(r) for r in requests]),
           "max_tokens": [r["max_new_tokens"] for r in requests]}
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps(job))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE",
                                                                      CPU_KV_CACHE_GIB)}
        if inprocess:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        root = str(Path(__file__).resolve().parent.parent)  # the folder that holds this package
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        child = subprocess.run([sys.executable, "-m", "bench.backends", str(spec), str(out)],
                               capture_output=True, text=True, timeout=3600, env=env)
        if child.returncode != 0:
            errors = [line for line in child.stderr.splitlines() if "Error" in line]
            raise RuntimeError(f"offline vLLM run failed: {errors[:5]}")
        result = json.loads(out.read_text())
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in result["token_ids"]]
    tokens = sum(len(ids) for ids in result["token_ids"])
    return tokens / result["seconds"], sum(a == b["text"] for a, b in zip(texts, served, strict=True))


def offline_main(spec: Path, out: Path) -> None:
    """The child of ``_offline``: ``LLM.generate`` on a job file, timings and ids to ``out``."""
    import json

    from vllm import LLM, SamplingParams

    job = json.loads(spec.read_text())
    llm = LLM(**job["args"])
    prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in job["max_tokens"]]
    llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    out.write_text(json.dumps({"seconds": seconds,
                               "token_ids": [list(o.outputs[0].token_ids) for o in outputs]}))


def bench_interactive_vllm(cache_dir: Path, workdir: Path, k: int, bulk_n: int, bulk_new: int,
                           say: Callable[[str], None]) -> dict[str, Any]:
    """Interactive time to result idle vs under a ``bulk_n`` x ``bulk_new`` job (vLLM)."""
    bulk = cycled(example_requests(max_new_tokens=bulk_new), bulk_n)
    m = bench_interactive_mode(cache_dir, workdir, "continuous", interactive_requests(k), bulk,
                               64, 2.0, 3600.0, backend="vllm")
    say(f"interactive on vLLM: idle p50/p99 {m['idle_p50']:.2f}/{m['idle_p99']:.2f} s, under "
        f"load {m['loaded_p50']:.2f}/{m['loaded_p99']:.2f} s ({m['p99_ratio']:.2f}x p99)")
    return m


def bench_backends(cache_dir: Path, workdir: Path, quick: bool,
                   say: Callable[[str], None] = print) -> dict[str, Any]:
    """Every backend comparison (smaller sizes with ``quick``)."""
    out = bench_engines(cache_dir, [8] if quick else [32, 64], [16] if quick else [64, 256],
                        24 if quick else 192, say)
    out["queue"] = bench_queue_vs_offline(cache_dir, workdir, 16 if quick else 128,
                                          16 if quick else 64, say)
    out["prefix"] = bench_prefix(cache_dir, 8 if quick else 64, say)
    out["interactive"] = (bench_interactive_vllm(cache_dir, workdir, 3, 16, 16, say) if quick
                          else bench_interactive_vllm(cache_dir, workdir, 8, 128, 128, say))
    return out


if __name__ == "__main__":  # vLLM starts processes: the guard its offline API needs
    import sys

    offline_main(Path(sys.argv[1]), Path(sys.argv[2]))
