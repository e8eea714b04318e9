"""`genq up` as a user runs it: nothing configured, the embedded stack, Ctrl-C, and a second
run on the same data directory that finishes what the first left queued."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import ROOT
from worker.stack import free_port

pytestmark = pytest.mark.slow


def start_up(port: int, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "worker.cli", "up", "--gpus", "none",
                             "--port", str(port)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_ready(http: httpx.Client, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "genq up never became ready"
        try:
            if http.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def ctrl_c(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    return out


def test_genq_up_twice_on_one_data_directory(tmp_path, cache_dir):
    env = {k: v for k, v in os.environ.items() if k != "GENQ_BROKER_URL"}
    env.update(GENQ_DATA_DIR=str(tmp_path / "data"), GENQ_CACHE_DIR=str(cache_dir),
               GENQ_BACKEND="transformers", GENQ_MAX_BATCH_SIZE="2", GENQ_POOL_SIZE="2")
    port = free_port()
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

    first = start_up(port, env)
    wait_ready(http, first)
    rid = http.post("/v1/generations", json={"prompt": "Hello", "max_new_tokens": 4}).json()["id"]
    while http.get(f"/v1/generations/{rid}").json()["status"] != "succeeded":
        time.sleep(0.1)
    lines = [{"prompt": f"Once upon a time, story {i},", "max_new_tokens": 48} for i in range(8)]
    job = http.post("/v1/batches", json=lines).json()["id"]
    while http.get(f"/v1/batches/{job}").json()["counts"]["running"] == 0:
        time.sleep(0.05)
    out = ctrl_c(first)
    assert first.returncode == 0, out[-3000:]
    assert "embedded Redis" in out and "gateway: http://" in out and "stopped" in out
    with pytest.raises(httpx.TransportError):
        http.get("/healthz")

    second = start_up(port, env)  # same data directory: same Redis data, same password
    wait_ready(http, second)
    assert http.get(f"/v1/generations/{rid}").json()["status"] == "succeeded"
    deadline = time.monotonic() + 300
    while (counts := http.get(f"/v1/batches/{job}").json()["counts"])["succeeded"] < 8:
        assert time.monotonic() < deadline, counts
        time.sleep(0.2)
    assert counts == {"total": 8, "queued": 0, "running": 0, "succeeded": 8, "failed": 0,
                      "cancelled": 0, "expired": 0}
    second.send_signal(signal.SIGTERM)  # as a process manager stops it: same clean stop
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 0 and "stopped" in out, out[-3000:]
    worker_pid = int(re.search(r"worker \S+: pid (\d+)", out).group(1))
    with pytest.raises(ProcessLookupError):  # not orphaned
        os.kill(worker_pid, 0)
