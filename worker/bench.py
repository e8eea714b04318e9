"""``genq bench``: throughput, padding, queue overhead, control-plane rate, latency, scaling.

Every figure that matters is a ratio of two runs made in the same invocation on the same
machine (these machines are noisy). Writes ``bench/results.json`` and PNG plots.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "prompts.jsonl"
CONTROL_WAIT_MS = 10


def example_requests(max_new_tokens: int) -> list[dict[str, Any]]:
    """The 64 shipped chat prompts (OpenAI Batch lines) as requests."""
    out = []
    for line in EXAMPLES.read_text().splitlines():
        body = json.loads(line)["body"]
        out.append({"messages": body["messages"], "max_new_tokens": max_new_tokens})
    return out


def tokens_per_s(results: list[dict], seconds: float) -> float:
    return sum(r["usage"]["completion_tokens"] for r in results) / seconds


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# -- 1. engine: batched vs one at a time -----------------------------------------------------

def bench_engine(cache_dir: Path, sizes: list[int], dtypes: list[str], new_tokens: int,
                 alone_n: int, say: Callable[[str], None]) -> list[dict]:
    """Generated tokens/s one request at a time vs length-sorted batches, per dtype."""
    from worker.engine import load_engine

    requests = example_requests(new_tokens)
    rows = []
    for dtype in dtypes:
        engine = load_engine("demo", backend="transformers", dtype=dtype, cache_dir=cache_dir)
        engine.generate(requests[:2])  # warm-up
        subset = requests[:alone_n]
        results, secs = _timed(lambda e=engine, s=subset: [e.generate([r])[0] for r in s])
        rows.append({"dtype": dtype, "batch": 1, "tok_s": tokens_per_s(results, secs),
                     "seconds": secs, "requests": len(subset), "pad_fraction": 0.0})
        say(f"engine {dtype} one-at-a-time: {rows[-1]['tok_s']:.1f} tok/s")
        for size in sizes:
            engine.max_batch_size = size
            results, secs = _timed(lambda e=engine: e.generate(requests))
            pads = [r["batch"]["pad_fraction"] for r in results]
            rows.append({"dtype": dtype, "batch": size, "tok_s": tokens_per_s(results, secs),
                         "seconds": secs, "requests": len(requests),
                         "pad_fraction": sum(pads) / len(pads)})
            say(f"engine {dtype} batch {size}: {rows[-1]['tok_s']:.1f} tok/s")
    base = next(r["tok_s"] for r in rows if r["dtype"] == "float32" and r["batch"] == 1)
    for r in rows:
        r["vs_fp32_alone"] = r["tok_s"] / base
    return rows


# -- 2. padding waste --------------------------------------------------------------------------

def bench_padding(cache_dir: Path, batch: int, pending: list[int]) -> list[dict]:
    """Pad tokens / prompt slots: arrival-order batches vs genqueue's plan, same stream."""
    from transformers import AutoTokenizer

    from worker.engine.batching import Row, plan_batches
    from worker.engine.demo import demo_model_dir
    from worker.engine.prompts import encode
    from worker.schema import validate_request

    tok = AutoTokenizer.from_pretrained(demo_model_dir(cache_dir))
    lengths = [len(ids) for ids in encode(tok, [validate_request(r) for r in example_requests(64)])]

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


# -- the service: embedded Redis + worker processes --------------------------------------------

class Service:
    """A private Redis and ``genq worker`` processes for one benchmark."""

    def __init__(self, env: dict[str, str], workdir: Path):
        from worker.stack import EmbeddedRedis

        self.redis = EmbeddedRedis(workdir / "redis").start()
        self.env = {**env, "GENQ_BROKER_URL": self.redis.url, "GENQ_SELF_CHECK": "off"}
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []

    def start_worker(self, name: str, core: int | None = None, threads: int | None = None) -> None:
        import redis

        cmd = [sys.executable, "-m", "worker.cli", "worker", "--name", name]
        if threads:
            cmd += ["--threads", str(threads)]
        if core is not None:
            cmd = ["taskset", "-c", str(core), *cmd]
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115
        self.procs.append(subprocess.Popen(cmd, env={**os.environ, **self.env}, stdout=log,
                                           stderr=log))
        r = redis.Redis.from_url(self.redis.url)
        deadline = time.monotonic() + 180
        while not r.exists(f"genq:worker:{name}"):
            if time.monotonic() > deadline or self.procs[-1].poll() is not None:
                raise RuntimeError(f"worker {name} did not start; see {self.workdir}")
            time.sleep(0.1)

    def client(self):
        from worker.client import GenerationClient
        from worker.ops.settings import Settings

        return GenerationClient(settings=Settings(broker_url=self.redis.url))

    def stop(self) -> None:
        from worker.stack import stop_process

        for p in self.procs:
            stop_process(p, 30)
        self.redis.stop()


def _run_job(client, requests: list[dict]) -> tuple[list[dict], float]:
    t0 = time.perf_counter()
    job = client.submit_many(requests)
    client.wait_job(job, poll_s=0.02)
    secs = time.perf_counter() - t0
    return list(client.job_results(job)), secs


# -- 3. queue overhead -------------------------------------------------------------------------

def bench_overhead(cache_dir: Path, n: int, new_tokens: int, batch: int, workdir: Path) -> dict:
    """The same requests through client -> Redis -> worker -> store -> poll vs the engine."""
    from worker.engine import load_engine

    requests = [example_requests(new_tokens)[i % 64] for i in range(n)]
    engine = load_engine("demo", backend="transformers", dtype="float32", cache_dir=cache_dir,
                         max_batch_size=batch)
    engine.generate(requests[:2])
    direct, direct_s = _timed(lambda: engine.generate(requests))
    runs = {}
    for pool in (2 * batch, n):  # the worker's pool of pending requests it sorts by length
        svc = Service({"GENQ_CACHE_DIR": str(cache_dir), "GENQ_BACKEND": "transformers",
                       "GENQ_DTYPE": "float32", "GENQ_MAX_BATCH_SIZE": str(batch),
                       "GENQ_POOL_SIZE": str(pool)}, workdir / f"pool{pool}")
        try:
            svc.start_worker(f"bench@pool{pool}")
            client = svc.client()
            _run_job(client, requests[:4])  # warm-up
            served, service_s = _run_job(client, requests)
        finally:
            svc.stop()
        pads = [r["batch"]["pad_fraction"] for r in served]
        runs[pool] = {"pool": pool, "service_tok_s": tokens_per_s(served, service_s),
                      "ratio": direct_s / service_s, "mean_pad_fraction": sum(pads) / n,
                      "identical_texts": sum(a["text"] == b["text"]
                                             for a, b in zip(direct, served, strict=True))}
    direct_pads = [r["batch"]["pad_fraction"] for r in direct]
    return {"requests": n, "new_tokens": new_tokens, "batch": batch,
            "direct_tok_s": tokens_per_s(direct, direct_s),
            "direct_mean_pad_fraction": sum(direct_pads) / n, "runs": list(runs.values())}


# -- 4./5. control plane and latency (tiny model) -----------------------------------------------

def tiny_model(cache_dir: Path, out: Path) -> Path:
    """A 2-layer random-weight Llama with the demo tokenizer (no download)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from worker.engine.demo import demo_model_dir

    tok = AutoTokenizer.from_pretrained(demo_model_dir(cache_dir))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def bench_control_plane(cache_dir: Path, n: int, latency_n: int, workdir: Path) -> dict:
    """Submit rate and submit-to-stored rate with max_new_tokens=1; idle added latency."""
    model = tiny_model(cache_dir, workdir / "tiny")
    svc = Service({"GENQ_MODEL": str(model), "GENQ_BACKEND": "transformers",
                   "GENQ_CACHE_DIR": str(cache_dir), "GENQ_MAX_BATCH_SIZE": "64",
                   "GENQ_BATCH_WAIT_MS": str(CONTROL_WAIT_MS)}, workdir)
    try:
        svc.start_worker("bench@control")
        client = svc.client()
        reqs = [{"prompt": f"request number {i}", "max_new_tokens": 1} for i in range(n)]
        t0 = time.perf_counter()
        job = client.submit_many(reqs)
        submit_s = time.perf_counter() - t0
        client.wait_job(job, poll_s=0.01)
        total_s = time.perf_counter() - t0
        added = []
        for i in range(latency_n):
            t = time.perf_counter()
            res = client.wait(client.submit(prompt=f"latency {i}", max_new_tokens=1))
            added.append((time.perf_counter() - t) * 1000 - res["timings"]["generate_ms"])
            time.sleep(0.05)
    finally:
        svc.stop()
    added.sort()
    return {"requests": n, "submit_per_s": n / submit_s, "completed_per_s": n / total_s,
            "latency_requests": latency_n, "added_ms_p50": added[len(added) // 2],
            "added_ms_p99": added[min(len(added) - 1, int(len(added) * 0.99))],
            "batch_wait_ms": CONTROL_WAIT_MS}


# -- 6. scaling --------------------------------------------------------------------------------

def bench_scaling(cache_dir: Path, n: int, new_tokens: int, workdir: Path) -> dict:
    """Two workers vs one on the same queue, each pinned to one core with one torch thread."""
    requests = [example_requests(new_tokens)[i % 64] for i in range(n)]
    env = {"GENQ_CACHE_DIR": str(cache_dir), "GENQ_BACKEND": "transformers",
           "GENQ_DTYPE": "float32", "GENQ_MAX_BATCH_SIZE": "16", "GENQ_POOL_SIZE": "16",
           "OMP_NUM_THREADS": "1"}
    rates = {}
    for workers in (1, 2):
        svc = Service(env, workdir / f"scale{workers}")
        try:
            for core in range(workers):
                svc.start_worker(f"bench{core}@scale", core=core, threads=1)
            client = svc.client()
            _run_job(client, requests[:2])
            results, secs = _run_job(client, requests)
            rates[workers] = tokens_per_s(results, secs)
        finally:
            svc.stop()
    return {"requests": n, "new_tokens": new_tokens, "one_worker_tok_s": rates[1],
            "two_workers_tok_s": rates[2], "ratio": rates[2] / rates[1]}


# -- report ------------------------------------------------------------------------------------

def machine() -> dict:
    import torch
    import transformers

    return {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads()}


def plot(results: dict, out: Path) -> list[str]:
    """PNG plots of the engine and padding results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if results.get("engine"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for dtype in sorted({r["dtype"] for r in results["engine"]}):
            rows = [r for r in results["engine"] if r["dtype"] == dtype]
            ax.plot([r["batch"] for r in rows], [r["tok_s"] for r in rows], marker="o", label=dtype)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (1 = one request at a time)")
        ax.set_ylabel("generated tokens / s")
        ax.set_title("Engine throughput, demo model, CPU")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "engine_throughput.png", dpi=110)
        files.append("engine_throughput.png")
    if results.get("padding"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        rows = results["padding"]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["arrival_pad"] * 100 for r in rows], 0.4, label="arrival order")
        ax.bar([x + 0.2 for x in xs], [r["genqueue_pad"] * 100 for r in rows], 0.4, label="genqueue")
        ax.set_xticks(list(xs), [f"{r['pending']} pending" for r in rows])
        ax.set_ylabel("pad % of prompt tokens")
        ax.set_title(f"Padding waste at batch {rows[0]['batch']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "padding.png", dpi=110)
        files.append("padding.png")
    return files


def run_all(out: Path, cache_dir: Path, parts: list[str], quick: bool,
            say: Callable[[str], None]) -> dict:
    """Run the chosen parts; write results.json and plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "quick": quick}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "engine" in parts:
            results["engine"] = bench_engine(
                cache_dir, [4, 8] if quick else [4, 8, 16, 32],
                ["float32"] if quick else ["float32", "bfloat16"],
                new_tokens=16 if quick else 64, alone_n=4 if quick else 16, say=say)
        if "padding" in parts:
            results["padding"] = bench_padding(cache_dir, 16, [64, 256])
        if "overhead" in parts:
            results["overhead"] = bench_overhead(cache_dir, 32 if quick else 256,
                                                 8 if quick else 32, 32, work)
            for run in results["overhead"]["runs"]:
                say(f"queue overhead, pool {run['pool']}: service/direct = {run['ratio']:.2f}")
        if "control" in parts:
            results["control"] = bench_control_plane(cache_dir, 200 if quick else 2000,
                                                     10 if quick else 50, work)
            say(f"control plane: {results['control']['submit_per_s']:.0f} submitted/s")
        if "scaling" in parts:
            results["scaling"] = bench_scaling(cache_dir, 16 if quick else 96,
                                               8 if quick else 32, work)
            say(f"scaling: two/one = {results['scaling']['ratio']:.2f}")
    results["plots"] = plot(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results
