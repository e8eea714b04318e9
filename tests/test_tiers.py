"""The test tiers stay honest: markers follow the fixtures, a test not marked ``process`` cannot
start one, and ``make check`` runs only the fast tier (``make test``, what CI runs, all)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.conftest import (
    ROOT,
    UnmarkedProcess,
    _refuse_processes,
    pytest_collection_modifyitems,
    share_cores,
)
from tests.workerfork import forkable
from worker.stack import worker_args


class FakeItem:
    nodeid = "tests/test_fake.py::test_fake"

    def __init__(self, *fixtures: str):
        self.fixturenames = list(fixtures)
        self.marks: list[pytest.Mark] = []

    def get_closest_marker(self, name: str):
        return next((m for m in self.marks if m.name == name), None)

    def add_marker(self, marker) -> None:
        self.marks.append(marker.mark)


def test_fixtures_imply_their_markers():
    items = [FakeItem("tmp_path"), FakeItem("redis_url", "tmp_path"), FakeItem("gateway"),
             FakeItem("demo_engine"), FakeItem("client", "start_worker", "demo_engine")]
    pytest_collection_modifyitems(None, items)
    assert [sorted(m.name for m in item.marks) for item in items] == [
        [], ["process"], ["process"], ["model"], ["model", "process"]]


@pytest.mark.parametrize("spawn", [
    lambda: subprocess.run(["true"]),
    lambda: subprocess.Popen(["true"]).wait(),
    lambda: os.system("true"),
    lambda: os.fork() == 0 and os._exit(0),  # a child (if the guard let it) leaves at once
], ids=["run", "popen", "system", "fork"])
def test_an_unmarked_test_that_starts_a_process_fails(spawn):
    with pytest.raises(pytest.fail.Exception, match="not marked 'process'"):
        with _refuse_processes(FakeItem()):
            with pytest.raises(UnmarkedProcess):  # past ``except Exception`` too
                try:
                    spawn()
                except Exception:
                    pytest.fail("swallowed")


@pytest.mark.process
def test_make_check_runs_lint_and_the_fast_tier_and_ci_runs_make_test():
    dry = subprocess.run(["make", "-n", "check", "test", "VENV=.venv"], cwd=ROOT,
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "MAKEFLAGS": ""}).stdout
    assert ".venv/bin/ruff check worker tests" in dry
    assert '.venv/bin/python -m pytest -q -m "not process and not model"' in dry
    assert ".venv/bin/python -m pytest -n 2 --dist loadfile\n" in dry  # make test: everything
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "`make check`" in readme and "`make test`" in readme


@pytest.mark.parametrize(("worker", "count", "cpus", "threads", "bind"), [
    ("gw0", "2", {0, 1}, "1", "0"), ("gw1", "2", {0, 1}, "1", "1"),
    ("gw1", "2", {0, 1, 2, 3}, "2", "2,3"), ("gw2", "3", {0, 1}, "1", "0"),
])
def test_each_test_process_gets_its_own_share_of_the_cores(monkeypatch, worker, count, cpus,
                                                           threads, bind):
    for name in ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", count)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cpus)
    share_cores()
    assert os.environ["OMP_NUM_THREADS"] == threads
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == bind


def test_one_test_process_leaves_the_threads_alone(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    share_cores()
    assert "OMP_NUM_THREADS" not in os.environ


def test_workers_fork_only_where_nothing_read_at_import_differs():
    server = {"PATH": "/usr/bin", "OMP_NUM_THREADS": "1", "GENQ_MODEL": "demo"}
    plain = {**server, "GENQ_BACKEND": "transformers", "GENQ_MAX_BATCH_SIZE": "4"}
    assert forkable(plain, server)
    assert forkable({k: v for k, v in plain.items() if k != "GENQ_MODEL"}, server)
    assert not forkable({**plain, "GENQ_BACKEND": "vllm"}, server)  # starts its own processes
    assert not forkable({**plain, "GENQ_BACKEND": "auto"}, server)  # Unsloth: before transformers
    assert not forkable({k: v for k, v in plain.items() if k != "GENQ_BACKEND"}, server)
    assert not forkable({**plain, "PYTHONPATH": "tests/faults"}, server)  # read at start-up
    assert not forkable({**plain, "OMP_NUM_THREADS": "2"}, server)  # read when torch loads
    assert not forkable({k: v for k, v in plain.items() if k != "PATH"}, server)


def test_a_forked_command_runs_as_a_fresh_process_would(fork_server, redis_url, tmp_path):
    """Its own environment, arguments, log, session and exit status, as ``Popen`` reports."""
    env = {**os.environ, "GENQ_MAX_BATCH_SIZE": "7", "GENQ_BACKEND": "transformers"}
    config = fork_server.spawn(["config"], env, tmp_path / "config.log")
    assert config.wait(60) == 0
    assert "7" in next(line for line in (tmp_path / "config.log").read_text().splitlines()
                       if "max_batch_size" in line)
    bad = fork_server.spawn(["no-such-command"], env, tmp_path / "bad.log")
    assert bad.wait(60) == 2 and "No such command" in (tmp_path / "bad.log").read_text()
    waiting = fork_server.spawn(worker_args("none", "waiting@fork"),
                                {**env, "GENQ_BROKER_URL": redis_url}, tmp_path / "w.log")
    with pytest.raises(subprocess.TimeoutExpired):
        waiting.wait(0.5)
    assert os.getsid(waiting.pid) == waiting.pid  # a session of its own (start_new_session)
    waiting.kill()
    assert waiting.wait(10) == -9 and waiting.poll() == -9
    interrupted = fork_server.spawn(["status", "--watch", "--json", "--interval", "0.2"],
                                    {**env, "GENQ_BROKER_URL": redis_url}, tmp_path / "s.log")
    deadline, log = time.monotonic() + 60, tmp_path / "s.log"
    while not log.exists() or log.read_text().count("\n") < 2:  # running: a line per redraw
        assert interrupted.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    interrupted.send_signal(signal.SIGINT)  # Ctrl-C: KeyboardInterrupt, as in a fresh Python
    assert interrupted.wait(30) == 0
