"""`genq up` as a user runs it: nothing configured, the embedded stack, Ctrl-C, and a second
run on the same data directory that finishes what the first left queued; no password on any
command line, and the gateway on 127.0.0.1 unless asked otherwise."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import ROOT, ctrl_c_default, wait_answering
from worker.stack import free_port, write_private

pytestmark = pytest.mark.slow


@pytest.fixture
def start_up():
    """Start ``genq up --gpus none --port PORT [ARGS]``; what a failed test left running is
    stopped."""
    procs: list[subprocess.Popen] = []

    def start(port: int, env: dict, *args: str) -> subprocess.Popen:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "up", "--gpus", "none", "--port", str(port), *args],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=ctrl_c_default))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            ctrl_c(proc)


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


def test_genq_up_twice_on_one_data_directory(tmp_path, cache_dir, start_up):
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
    job = http.post("/v1/jobs", json=lines).json()["id"]
    while http.get(f"/v1/jobs/{job}").json()["counts"]["running"] == 0:
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
    while (counts := http.get(f"/v1/jobs/{job}").json()["counts"])["succeeded"] < 8:
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


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren, ...)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            stat_line = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue  # gone meanwhile
        if stat_line:
            parents[int(entry.name)] = int(stat_line.rsplit(")", 1)[1].split()[1])
    found, todo = [], [pid]
    while todo:
        parent_pid = todo.pop()
        children = [p for p, parent in parents.items() if parent == parent_pid]
        found += children
        todo += children
    return found


def listening_addresses(port: int) -> set[str]:
    """The addresses with a TCP socket listening on ``port`` (IPv4 and IPv6)."""
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, local_port = local.split(":")
            if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # each 32-bit word in the host's byte order
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(str(ipaddress.ip_address(words)))
    return found


def test_genq_up_keeps_the_password_off_command_lines_and_the_gateway_local(tmp_path, cache_dir,
                                                                          start_up):
    """The embedded Redis reads its password from a 0600 config file, the workers get it in
    their environment; no process `genq up` starts has it in its command line. The gateway
    listens on 127.0.0.1 only by default."""
    password = "up-secret-7c2a9f"
    (tmp_path / "data" / "redis").mkdir(parents=True)
    write_private(tmp_path / "data" / "redis" / "password", password)
    env = {k: v for k, v in os.environ.items() if k != "GENQ_BROKER_URL"}
    env.update(GENQ_DATA_DIR=str(tmp_path / "data"), GENQ_CACHE_DIR=str(cache_dir),
               GENQ_BACKEND="transformers")
    port = free_port()
    proc = start_up(port, env)
    shown = ""
    while "gateway: http://" not in shown:
        line = proc.stdout.readline()
        assert line, shown
        shown += line
    redis_port = int(re.search(r"embedded Redis on 127\.0\.0\.1:(\d+)", shown).group(1))
    workers = [int(pid) for pid in re.findall(r"worker \S+: pid (\d+)", shown)]
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    wait_answering(http)
    started = descendants(proc.pid)
    assert set(workers) <= set(started) and len(started) > len(workers)  # + redis-server
    for pid in [proc.pid, *started]:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline, cmdline
    for pid in workers:  # the broker URL, password included, comes in the environment (a
        # process title set with setproctitle, as Celery does when it is installed, may clear
        # the environ block the kernel shows: then it is not readable there either)
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        # (overwritten by the title: no variable left in it)
        assert f":{password}@".encode() in environ or b"GENQ_BROKER_URL=" not in environ, \
            environ[:200]
    config = Path(redis.Redis(port=redis_port, password=password).info("server")["config_file"])
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
    assert f'requirepass "{password}"' in config.read_text().splitlines()
    assert listening_addresses(port) == {"127.0.0.1"}
    out = ctrl_c(proc)
    assert proc.returncode == 0 and "stopped" in out, out[-3000:]
    assert not config.exists()


def test_genq_up_gives_each_worker_its_own_metrics_port(tmp_path, cache_dir, tiny_model_dir,
                                                       start_up):
    """Two workers (``--workers 2`` on the CPU, as ``--gpus 0,1`` starts two) with
    GENQ_METRICS_PORT set: each serves /metrics on its own port (that port + its index) and
    neither dies on a taken port and is restarted."""
    while True:  # a free port whose next one is free too
        base = free_port()
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("", base + 1))
            break
    env = {k: v for k, v in os.environ.items() if k != "GENQ_BROKER_URL"}
    env.update(GENQ_DATA_DIR=str(tmp_path / "data"), GENQ_CACHE_DIR=str(cache_dir),
               GENQ_BACKEND="transformers", GENQ_MODEL=str(tiny_model_dir),
               GENQ_METRICS_PORT=str(base))
    proc = start_up(free_port(), env, "--workers", "2")
    host = socket.gethostname()
    names = {base: f"cpu@{host}", base + 1: f"cpu-2@{host}"}
    deadline = time.monotonic() + 240
    while names:
        assert proc.poll() is None and time.monotonic() < deadline, names
        for metrics_port, name in list(names.items()):
            with contextlib.suppress(httpx.TransportError):
                text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
                assert f'genq_worker_up{{worker="{name}"}} 1.0' in text
                del names[metrics_port]
        time.sleep(0.5)
    time.sleep(5)  # the supervisor looks every 2 s: a worker that died would be restarted now
    out = ctrl_c(proc)
    assert proc.returncode == 0 and "restarting" not in out, out[-3000:]
    started = re.findall(r"worker (\S+): pid \d+, metrics on port (\d+)", out)
    assert sorted(started) == [(f"cpu-2@{host}", str(base + 1)), (f"cpu@{host}", str(base))], out
