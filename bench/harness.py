"""The stack a service benchmark starts and stops (a private Redis, ``genq worker`` processes),
running a job through it, and the small measures every part shares."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def tokens_per_s(results: list[dict], seconds: float) -> float:
    """Generated tokens of ``results`` per second of ``seconds``."""
    return sum(r["usage"]["completion_tokens"] for r in results) / seconds


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and the seconds it took."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank below)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


class Service:
    """A private Redis and ``genq worker`` processes for one benchmark."""

    def __init__(self, env: dict[str, str], workdir: Path):
        from worker.stack import EmbeddedRedis

        self.redis = EmbeddedRedis(workdir / "redis").start()
        self.env = {**env, "GENQ_BROKER_URL": self.redis.url, "GENQ_SELF_CHECK": "off"}
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []

    def start_worker(self, name: str, core: int | None = None, threads: int | None = None) -> None:
        """Start ``genq worker`` (pinned to ``core`` if given) and wait for its first heartbeat."""
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
        """A ``GenerationClient`` on this service's Redis."""
        from worker.client import GenerationClient
        from worker.ops.settings import Settings

        return GenerationClient(settings=Settings(broker_url=self.redis.url))

    def stop(self) -> None:
        """Stop the workers, then Redis."""
        from worker.stack import stop_process

        for p in self.procs:
            stop_process(p, 30)
        self.redis.stop()


def run_job(client, requests: list[dict]) -> tuple[list[dict], float]:
    """``requests`` as one job, waited for (20 ms polls): (results in order, seconds)."""
    t0 = time.perf_counter()
    job = client.submit_many(requests)
    client.wait_job(job, poll_s=0.02)
    secs = time.perf_counter() - t0
    return list(client.job_results(job)), secs
