"""``genq bench``: throughput, padding, queue overhead, control-plane rate, latency, scaling,
and the continuous scheduler against the static one (mixed and uniform output lengths on the
engine; interactive latency under a bulk job through the service).

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
                 n: int, say: Callable[[str], None]) -> list[dict]:
    """Generated tokens/s one request at a time vs the step loop at each batch size, per
    dtype, on the same ``n`` example prompts (the continuous scheduler, as ``generate`` runs)."""
    from worker.engine import load_engine

    requests = example_requests(new_tokens)[:n]
    rows = []
    for dtype in dtypes:
        engine = load_engine("demo", backend="transformers", dtype=dtype, cache_dir=cache_dir)
        engine.generate(requests[:2])  # warm-up
        results, secs = _timed(lambda e=engine: [e.generate([r])[0] for r in requests])
        rows.append({"dtype": dtype, "batch": 1, "tok_s": tokens_per_s(results, secs),
                     "seconds": secs, "requests": len(requests), "pad_fraction": 0.0})
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


# -- 7./8. schedulers: continuous vs static on the engine ---------------------------------------

MIXED_NEW_TOKENS = (16, 64, 256)
# raw-text list openers the demo model keeps continuing ("2. ...", "3. ..."): no early EOS
LIST_PROMPT = "Here are 100 facts about {topic}, one per line.\n\n1."
LIST_TOPICS = ("volcanoes", "the ocean", "honey bees", "the moon", "rivers", "deserts", "trains",
               "castles", "penguins", "bread", "glaciers", "owls", "bridges", "coffee", "comets",
               "forests", "whales", "clocks", "mountains", "rain", "salt", "tigers", "islands",
               "ships", "wolves", "copper", "snow", "lighthouses", "apples", "spiders", "caves",
               "paper")


def mixed_requests(n: int, choices: tuple[int, ...], seed: int) -> list[dict[str, Any]]:
    """The example chat prompts cycled to ``n``, each with ``max_new_tokens`` drawn from
    ``choices`` by a seeded RNG (natural EOS); bulk priority, as a batch job sends them."""
    rng = random.Random(seed)
    base = example_requests(1)
    return [{**base[i % len(base)], "max_new_tokens": rng.choice(choices), "priority": "bulk"}
            for i in range(n)]


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
    requests = [{"prompt": prompts[i % len(prompts)], "max_new_tokens": new_tokens,
                 "priority": "bulk"} for i in range(n)]
    return requests, length, len(prompts)


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


# -- 9. interactive latency under a bulk job (the service) --------------------------------------

def interactive_requests(k: int, new_tokens: int = 8) -> list[dict[str, Any]]:
    """The ``k`` shortest example chat prompts, ``max_new_tokens=new_tokens``, interactive."""
    base = sorted(example_requests(new_tokens),
                  key=lambda r: sum(len(m["content"]) for m in r["messages"]))
    return [{**r, "priority": "interactive"} for r in base[:k]]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _final(client, request_id: str) -> dict | None:
    from worker.lifecycle import FINAL

    result = client.get(request_id)
    return result if result["status"] in FINAL else None


def _one_at_a_time(client, requests: list[dict], timeout_s: float) -> list[tuple[float, dict]]:
    """Each request submitted once the previous one's result is in: (seconds from submit to
    the result being readable, polled every 10 ms; the result)."""
    out = []
    for request in requests:
        t0 = time.perf_counter()
        request_id = client.submit(**request)
        while (result := _final(client, request_id)) is None:
            if time.perf_counter() - t0 > timeout_s:
                raise TimeoutError(f"interactive request {request_id} not done in {timeout_s} s")
            time.sleep(0.01)
        out.append((time.perf_counter() - t0, result))
        time.sleep(0.1)
    return out


def _under_bulk(client, bulk: list[dict], requests: list[dict], interval_s: float,
                timeout_s: float) -> dict[str, Any]:
    """Submit ``bulk`` as one job, then request i of ``requests`` at (i + 1) * ``interval_s``
    after it; poll every 10 ms. Each request's time to result and whether the bulk job was
    still running when it finished; the job's duration and generated tokens/s."""
    t0 = time.perf_counter()
    job = client.submit_many(bulk, priority="bulk")
    pending: dict[str, tuple[int, float]] = {}
    latency: list[tuple[float, dict, bool] | None] = [None] * len(requests)
    bulk_s: float | None = None
    sent, last_job_poll = 0, 0.0
    while sent < len(requests) or pending or bulk_s is None:
        now = time.perf_counter()
        if now - t0 > timeout_s:
            raise TimeoutError(f"loaded run not done in {timeout_s} s")
        if sent < len(requests) and now - t0 >= (sent + 1) * interval_s:
            pending[client.submit(**requests[sent])] = (sent, now)
            sent += 1
        for request_id, (i, submitted) in list(pending.items()):
            if (result := _final(client, request_id)) is not None:
                latency[i] = (time.perf_counter() - submitted, result, bulk_s is None)
                del pending[request_id]
        if bulk_s is None and now - last_job_poll >= 0.1:
            last_job_poll = now
            counts = client.job(job)["counts"]
            if counts["queued"] == 0 and counts["running"] == 0:
                bulk_s = time.perf_counter() - t0
        time.sleep(0.01)
    results = list(client.job_results(job))
    return {"latency": latency, "bulk_s": bulk_s,
            "bulk_tok_s": sum(r.get("usage", {}).get("completion_tokens", 0) for r in results) / bulk_s,
            "bulk_succeeded": sum(r["status"] == "succeeded" for r in results)}


def bench_interactive_mode(cache_dir: Path, workdir: Path, mode: str, requests: list[dict],
                           bulk: list[dict], batch: int, interval_s: float, timeout_s: float,
                           backend: str = "transformers") -> dict:
    """One worker with ``GENQ_SCHEDULER=mode``: interactive time to result on an idle service,
    then the same requests submitted every ``interval_s`` while a bulk job runs."""
    svc = Service({"GENQ_CACHE_DIR": str(cache_dir), "GENQ_BACKEND": backend,
                   "GENQ_DTYPE": "float32", "GENQ_MAX_BATCH_SIZE": str(batch),
                   "GENQ_SCHEDULER": mode}, workdir / f"interactive-{mode}-{backend}")
    try:
        svc.start_worker(f"bench@{mode}")
        client = svc.client()
        _one_at_a_time(client, requests[:1], timeout_s)  # warm-up, both lanes
        _run_job(client, [{**r, "max_new_tokens": 4} for r in bulk[:2]])
        idle = _one_at_a_time(client, requests, timeout_s)
        loaded = _under_bulk(client, bulk, requests, interval_s, timeout_s)
    finally:
        svc.stop()
    idle_s = [s for s, _ in idle]
    loaded_s = [entry[0] for entry in loaded["latency"]]
    figures = {"idle_p50": _percentile(idle_s, 0.5), "idle_p99": _percentile(idle_s, 0.99),
               "loaded_p50": _percentile(loaded_s, 0.5), "loaded_p99": _percentile(loaded_s, 0.99)}
    return {"mode": mode, **figures,
            "p50_ratio": figures["loaded_p50"] / figures["idle_p50"],
            "p99_ratio": figures["loaded_p99"] / figures["idle_p99"],
            "idle_s": idle_s, "loaded_s": loaded_s,
            "idle_server_ms": [r["timings"]["total_ms"] for _, r in idle],
            "loaded_server_ms": [e[1]["timings"]["total_ms"] for e in loaded["latency"]],
            "loaded_queued_ms": [e[1]["timings"]["queued_ms"] for e in loaded["latency"]],
            "under_load": sum(e[2] for e in loaded["latency"]),
            "identical_texts": sum(a[1]["text"] == b[1]["text"]
                                   for a, b in zip(idle, loaded["latency"], strict=True)),
            "bulk_s": loaded["bulk_s"], "bulk_tok_s": loaded["bulk_tok_s"],
            "bulk_succeeded": loaded["bulk_succeeded"]}


def bench_interactive(cache_dir: Path, workdir: Path, k: int = 8, bulk_n: int = 128,
                      bulk_new_tokens: int = 128, interval_s: float = 2.0, batch: int = 16,
                      say: Callable[[str], None] = print) -> dict:
    """Interactive time to result (submit to result readable, 10 ms polls) on an idle service
    vs while a bulk job of ``bulk_n`` chat requests runs, continuous vs static scheduler: the
    same ``k`` short interactive requests (``max_new_tokens=8``) in every run."""
    requests = interactive_requests(k)
    base = example_requests(bulk_new_tokens)
    bulk = [base[i % len(base)] for i in range(bulk_n)]
    timeout_s = 3600.0
    modes = []
    for mode in ("continuous", "static"):
        m = bench_interactive_mode(cache_dir, workdir, mode, requests, bulk, batch, interval_s,
                                   timeout_s)
        modes.append(m)
        say(f"interactive {mode}: idle p50/p99 {m['idle_p50']:.2f}/{m['idle_p99']:.2f} s, "
            f"under load {m['loaded_p50']:.2f}/{m['loaded_p99']:.2f} s "
            f"({m['under_load']}/{k} while bulk ran); bulk job {m['bulk_s']:.1f} s")
    return {"k": k, "interval_s": interval_s, "bulk_requests": bulk_n,
            "bulk_new_tokens": bulk_new_tokens, "batch": batch, "modes": modes}


# -- 10. worker time to ready ------------------------------------------------------------------

def bench_startup(cache_dir: Path, workdir: Path, backend: str = "auto") -> dict:
    """Seconds from starting ``genq worker`` to its first heartbeat (model loaded, self-check
    done, ready to take work) on the demo model: self-check off, strict on a cold check cache,
    strict with the canary remembered. The model folder is shared; the check cache is private."""
    private = workdir / "startup-cache"
    (private / "models").mkdir(parents=True, exist_ok=True)
    from worker.engine.demo import demo_model_dir

    source = demo_model_dir(cache_dir)
    link = private / "models" / source.name
    if not link.exists():
        link.symlink_to(source, target_is_directory=True)
    runs = []
    for label, check in (("self-check off", "off"), ("strict, cold", "strict"),
                         ("strict, remembered", "strict")):
        env = {"GENQ_CACHE_DIR": str(private), "GENQ_BACKEND": backend}
        svc = Service(env, workdir / f"startup-{backend}-{len(runs)}")
        svc.env["GENQ_SELF_CHECK"] = check
        try:
            started = time.monotonic()
            svc.start_worker(f"bench{len(runs)}@startup")
            runs.append({"run": label, "self_check": check,
                         "seconds": time.monotonic() - started})
        finally:
            svc.stop()
    return {"backend": backend, "runs": runs}


# -- report ------------------------------------------------------------------------------------

# -- 10. structured outputs: constrained rows in a batch -------------------------------------

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
    import statistics

    import worker.engine.sampling as sampling
    from worker.engine import load_engine

    engine = load_engine("demo", backend="transformers", dtype="float32", cache_dir=cache_dir,
                         max_batch_size=batch)
    names = list(SCHEMAS)
    fmt = {name: {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
           for name, (schema, _) in SCHEMAS.items()}
    for name, (schema, _) in SCHEMAS.items():  # definitions stay at the root for their $refs
        items = {k: v for k, v in schema.items() if k != "$defs"}
        long = {"type": "array", "minItems": 1, "items": items, "$defs": schema.get("$defs", {})}
        fmt[f"{name}+"] = {"type": "json_schema", "json_schema": {"name": name, "schema": long}}
    prompts = example_requests(new_tokens)[:batch]
    mask_s = [0.0]
    apply_masks = sampling.apply_masks

    def timed_masks(logits, rows):
        start = time.perf_counter()
        apply_masks(logits, rows)
        mask_s[0] += time.perf_counter() - start

    def variant(share: float, schemas: list[str]) -> list[dict]:
        every = round(1 / share) if share else 0
        out, k = [], 0
        for i, r in enumerate(prompts):
            if every and i % every == 0:
                r = {**r, "response_format": fmt[schemas[k % len(schemas)]]}
                k += 1
            out.append(r)
        return out

    runs = []
    engine.generate(variant(1.0, names))  # warm-up (and every grammar compiled once)
    sampling.apply_masks = timed_masks
    try:
        plan = [("unconstrained", 0.0, []), ("50%, 1 schema", 0.5, names[:1]),
                ("100%, 1 schema", 1.0, names[:1]), ("50%, 8 schemas", 0.5, names),
                ("100%, 8 schemas", 1.0, names)]
        for kind, suffix in (("natural", ""), ("full length", "+")):
            for label, share, schemas in plan:
                requests = variant(share, [name + suffix for name in schemas])
                best = None
                for _ in range(repeats):
                    mask_s[0] = 0.0
                    results, secs = _timed(lambda r=requests: engine.generate(r))
                    if best is None or secs < best[1]:
                        best = (results, secs, mask_s[0])
                results, secs, masks = best
                failed = [r["error"] for r in results if r["status"] != "succeeded"]
                if failed:
                    raise RuntimeError(f"structured {kind} {label}: {failed[0]}")
                runs.append({"kind": kind, "run": label, "constrained": share,
                             "schemas": len(schemas), "tok_s": tokens_per_s(results, secs),
                             "seconds": secs, "mask_share": masks / secs,
                             "tokens": sum(r["usage"]["completion_tokens"] for r in results)})
                say(f"structured {kind} {label}: {runs[-1]['tok_s']:.1f} tok/s, masks "
                    f"{100 * runs[-1]['mask_share']:.1f}% of the time")
    finally:
        sampling.apply_masks = apply_masks
    for r in runs:
        base = next(b["tok_s"] for b in runs if b["kind"] == r["kind"] and not b["constrained"])
        r["vs_unconstrained"] = r["tok_s"] / base
    grammars = engine.grammars
    uncached, cached = [], []
    for name in names:
        grammars._compiled.clear()
        _, secs = _timed(lambda n=name: grammars.matcher(fmt[n]))
        uncached.append(secs * 1000)
        _, secs = _timed(lambda n=name: grammars.matcher(fmt[n]))
        cached.append(secs * 1000)
    compile_ms = {"uncached_median": statistics.median(uncached), "uncached_max": max(uncached),
                  "cached_median": statistics.median(cached), "cached_max": max(cached),
                  "per_schema": dict(zip(names, zip(uncached, cached, strict=True), strict=True))}
    say(f"grammar compile: {compile_ms['uncached_median']:.2f} ms uncached, "
        f"{compile_ms['cached_median']:.3f} ms cached (median of {len(names)} schemas)")
    return {"batch": batch, "new_tokens": new_tokens, "runs": runs, "compile_ms": compile_ms}


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
                new_tokens=16 if quick else 64, n=8 if quick else 32, say=say)
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
        if "mixed" in parts:
            results["mixed"] = (bench_mixed(cache_dir, [8], n=24, choices=(8, 16, 32), say=say)
                                if quick else bench_mixed(cache_dir, [16, 32], say=say))
        if "uniform" in parts:
            results["uniform"] = (bench_uniform(cache_dir, [8], n=16, new_tokens=16, say=say)
                                  if quick else bench_uniform(cache_dir, [16, 32], say=say))
        if "interactive" in parts:
            results["interactive"] = (
                bench_interactive(cache_dir, work, k=3, bulk_n=32, bulk_new_tokens=32, say=say)
                if quick else bench_interactive(cache_dir, work, say=say))
        if "structured" in parts:
            results["structured"] = (bench_structured(cache_dir, batch=8, new_tokens=24, repeats=1,
                                                      say=say)
                                     if quick else bench_structured(cache_dir, say=say))
        if "backends" in parts:
            from worker.bench_backends import bench_backends

            results["backends"] = bench_backends(cache_dir, work, quick, say)
        if "startup" in parts:
            results["startup"] = [bench_startup(cache_dir, work, backend)
                                  for backend in ("vllm", "unsloth")]
            for startup in results["startup"]:
                say(f"worker ready ({startup['backend']}): " + ", ".join(
                    f"{r['run']} {r['seconds']:.1f} s" for r in startup["runs"]))
    results["plots"] = plot(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results
