"""Test workers forked from an interpreter that has already imported the model libraries.

About 60% of a ``genq worker`` start on this CPU is importing torch, transformers and Celery
(~5 s, ~5 CPU-s, each of the ~60 workers the tests start). A fork server (run as
``python tests/workerfork.py SOCKET STATUS_DIR``) imports them once; for each worker it forks
a child that runs ``genq worker`` exactly as the command line does (its own session, its log
file, its environment, ``worker.cli.main`` with the worker's arguments). Only third-party
libraries are imported ahead; genqueue's own modules, its settings and logging load in the
child, as in a fresh process.

A start forks only when nothing the libraries read at import differs: the worker's
environment equals the server's but for ``GENQ_`` settings (read at run time) and the backend
is plain transformers (Unsloth must be imported before transformers; vLLM starts its own
processes). Everything else starts with ``worker.stack.spawn_worker``, as before.

The server reaps its children and writes each exit status to ``STATUS_DIR/<pid>``; a
``ForkedWorker`` handle answers what the tests ask of a ``subprocess.Popen``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PRELOAD = ("torch", "transformers", "transformers.modeling_utils", "transformers.generation",
           "transformers.models.auto.modeling_auto", "transformers.models.llama.modeling_llama",
           "transformers.models.auto.tokenization_auto", "safetensors.torch", "tokenizers",
           "celery", "celery.worker", "celery.apps.worker", "kombu.transport.redis", "redis",
           "pydantic", "pydantic_settings", "structlog", "typer", "rich.console",
           "prometheus_client", "jinja2")


def forkable(env: dict[str, str], server_env: dict[str, str]) -> bool:
    """Whether a worker with the full environment ``env`` may be forked from a server that runs
    with ``server_env``: plain transformers, and no difference but ``GENQ_`` settings."""
    if env.get("GENQ_BACKEND", "auto") != "transformers":
        return False
    return all(env.get(k) == server_env.get(k) for k in set(env) | set(server_env)
               if not k.startswith("GENQ_"))


class ForkedWorker:
    """A forked worker, with the part of ``subprocess.Popen`` the tests use."""

    def __init__(self, pid: int, status_dir: Path, args: list[str]):
        self.pid, self.args, self.returncode = pid, args, None
        self._status = status_dir / str(pid)

    def poll(self) -> int | None:
        if self.returncode is None and self._status.exists():
            self.returncode = int(self._status.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The test process's side: starts the server at the first worker it can fork, and starts
    each worker, forked or (where ``forkable`` says no) as ``worker.stack.spawn_worker`` does."""

    def __init__(self, folder: Path):
        self.folder, self.socket, self.status = folder, folder / "fork.sock", folder / "status"
        self.env = dict(os.environ)  # the server's, read by the libraries it imports
        self.proc: subprocess.Popen | None = None

    def start_worker(self, env: dict[str, str], name: str, log_file: Path):
        """``genq worker --gpu none --name <name>`` with ``os.environ`` and ``env``, its output
        appended to ``log_file``: a ``ForkedWorker`` or a ``subprocess.Popen``."""
        from worker.stack import spawn_worker, worker_args

        full_env = {**os.environ, **env}
        if not forkable(full_env, self.env):
            return spawn_worker(env, name=name, log_file=log_file)
        return self.spawn(worker_args("none", name), full_env, log_file)

    def spawn(self, args: list[str], env: dict[str, str], log_file: Path) -> ForkedWorker:
        """Fork ``genq <args>`` with exactly ``env``, its output appended to ``log_file``."""
        if self.proc is None:
            self.status.mkdir(parents=True, exist_ok=True)
            with open(self.folder / "forkserver.log", "ab") as log:  # the server's own output
                self.proc = subprocess.Popen([sys.executable, __file__, str(self.socket),
                                              str(self.status)], env=self.env, stdout=log,
                                             stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not self.socket.exists():
            assert self.proc.poll() is None, "the worker fork server exited"
            assert time.monotonic() < deadline, "the worker fork server did not start"
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(self.socket))
            request = {"args": args, "env": env, "log": str(log_file), "cwd": os.getcwd()}
            conn.sendall(json.dumps(request).encode() + b"\n")
            reply = json.loads(conn.makefile().readline())
        return ForkedWorker(reply["pid"], self.status, args)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def _child(request: dict) -> None:
    """In the forked child: become ``genq <args>`` as a fresh process would; never return."""
    code = 1
    try:
        os.setsid()
        out = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        os.close(null)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python starts up
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.path[0] = request["cwd"]  # as `python -m` puts it
        import random

        random.seed()  # a fresh process draws fresh numbers; a fork would repeat its parent's
        sys.argv = ["genq", *request["args"]]
        from worker.cli import main

        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported in the worker's log, as Python would
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(path: str, status_dir: str) -> None:
    """Import the libraries, then fork a worker per request until the test process is gone."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    import gc

    gc.freeze()  # the children's collections skip what was imported here (no copy-on-write)
    parent = os.getppid()
    server = socket.socket(socket.AF_UNIX)
    server.bind(path + ".tmp")
    server.listen(16)
    os.rename(path + ".tmp", path)  # the socket appears once the imports are done
    while os.getppid() == parent:
        ready, _, _ = select.select([server], [], [], 0.05)
        while True:  # reap: a child's exit status, as Popen.returncode reads it
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            Path(status_dir, f"{pid}.tmp").write_text(str(os.waitstatus_to_exitcode(status)))
            os.rename(Path(status_dir, f"{pid}.tmp"), Path(status_dir, str(pid)))
        if ready:
            conn, _ = server.accept()
            with conn:
                request = json.loads(conn.makefile().readline())
                pid = os.fork()
                if pid == 0:
                    server.close()
                    conn.close()
                    _child(request)
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
