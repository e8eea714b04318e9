"""The service through Redis: queue overhead against the engine alone, control-plane rate and
added latency, two workers against one, and a worker's time to ready."""

from __future__ import annotations

import time
from pathlib import Path

from bench.harness import Service, percentile, run_job, timed, tokens_per_s
from bench.tiny_model import save_tiny_model
from bench.workloads import cycled, example_requests

CONTROL_WAIT_MS = 10


def bench_overhead(cache_dir: Path, n: int, new_tokens: int, batch: int, workdir: Path) -> dict:
    """The same requests through client -> Redis -> worker -> store -> poll vs the engine."""
    from worker.engine import load_engine

    requests = cycled(example_requests(max_new_tokens=new_tokens), n)
    engine = load_engine("demo", backend="transformers", dtype="float32", cache_dir=cache_dir,
                         max_batch_size=batch)
    engine.generate(requests[:2])
    direct, direct_s = timed(lambda: engine.generate(requests))
    runs = []
    for pool in dict.fromkeys((2 * batch, n)):  # the pool of pending rows a worker sorts by length
        svc = Service({"GENQ_CACHE_DIR": str(cache_dir), "GENQ_BACKEND": "transformers",
                       "GENQ_DTYPE": "float32", "GENQ_MAX_BATCH_SIZE": str(batch),
                       "GENQ_POOL_SIZE": str(pool)}, workdir / f"pool{pool}")
        try:
            svc.start_worker(f"bench@pool{pool}")
            client = svc.client()
            run_job(client, requests[:4])  # warm-up
            served, service_s = run_job(client, requests)
        finally:
            svc.stop()
        pads = [r["batch"]["pad_fraction"] for r in served]
        runs.append({"pool": pool, "service_tok_s": tokens_per_s(served, service_s),
                     "ratio": direct_s / service_s, "mean_pad_fraction": sum(pads) / n,
                     "identical_texts": sum(a["text"] == b["text"]
                                            for a, b in zip(direct, served, strict=True))})
    direct_pads = [r["batch"]["pad_fraction"] for r in direct]
    return {"requests": n, "new_tokens": new_tokens, "batch": batch,
            "direct_tok_s": tokens_per_s(direct, direct_s),
            "direct_mean_pad_fraction": sum(direct_pads) / n, "runs": runs}


def bench_control_plane(cache_dir: Path, n: int, latency_n: int, workdir: Path) -> dict:
    """Submit rate and submit-to-stored rate with max_new_tokens=1; idle added latency (the
    tiny random model, so the queue is what is measured)."""
    model = save_tiny_model(cache_dir, workdir / "tiny")
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
    return {"requests": n, "submit_per_s": n / submit_s, "completed_per_s": n / total_s,
            "latency_requests": latency_n, "added_ms_p50": percentile(added, 0.5),
            "added_ms_p99": percentile(added, 0.99), "batch_wait_ms": CONTROL_WAIT_MS}


def bench_scaling(cache_dir: Path, n: int, new_tokens: int, workdir: Path) -> dict:
    """Two workers vs one on the same queue, each pinned to one core with one torch thread."""
    requests = cycled(example_requests(max_new_tokens=new_tokens), n)
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
            run_job(client, requests[:2])
            results, secs = run_job(client, requests)
            rates[workers] = tokens_per_s(results, secs)
        finally:
            svc.stop()
    return {"requests": n, "new_tokens": new_tokens, "one_worker_tok_s": rates[1],
            "two_workers_tok_s": rates[2], "ratio": rates[2] / rates[1]}


def bench_startup(cache_dir: Path, workdir: Path, backend: str = "auto") -> dict:
    """Seconds from starting ``genq worker`` to its first heartbeat (model loaded, self-check
    done, ready to take work) on the demo model: self-check off, strict on a cold check cache,
    strict with the canary remembered. The model folder is shared; the check cache is private."""
    from worker.engine.demo import demo_model_dir

    private = workdir / "startup-cache"
    (private / "models").mkdir(parents=True, exist_ok=True)
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
