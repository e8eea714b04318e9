"""Interactive time to result through the service: on an idle worker, then while a bulk job
runs, per scheduler (continuous vs static)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import Service, percentile, run_job
from bench.workloads import cycled, example_requests, interactive_requests


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


def _figures(idle: list[tuple[float, dict]], loaded: dict[str, Any]) -> dict[str, Any]:
    """Percentiles and ratios of an idle run and a loaded one, with their raw timings."""
    idle_s = [s for s, _ in idle]
    loaded_s = [entry[0] for entry in loaded["latency"]]
    figures = {"idle_p50": percentile(idle_s, 0.5), "idle_p99": percentile(idle_s, 0.99),
               "loaded_p50": percentile(loaded_s, 0.5), "loaded_p99": percentile(loaded_s, 0.99)}
    return {**figures,
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
        run_job(client, [{**r, "max_new_tokens": 4} for r in bulk[:2]])
        idle = _one_at_a_time(client, requests, timeout_s)
        loaded = _under_bulk(client, bulk, requests, interval_s, timeout_s)
    finally:
        svc.stop()
    return {"mode": mode, **_figures(idle, loaded)}


def bench_interactive(cache_dir: Path, workdir: Path, k: int = 8, bulk_n: int = 128,
                      bulk_new_tokens: int = 128, interval_s: float = 2.0, batch: int = 16,
                      say: Callable[[str], None] = print) -> dict:
    """Interactive time to result (submit to result readable, 10 ms polls) on an idle service
    vs while a bulk job of ``bulk_n`` chat requests runs, continuous vs static scheduler: the
    same ``k`` short interactive requests (``max_new_tokens=8``) in every run."""
    requests = interactive_requests(k)
    bulk = cycled(example_requests(max_new_tokens=bulk_new_tokens), bulk_n)
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
