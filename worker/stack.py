"""The pieces of the one-machine stack behind ``genq run`` and ``genq up`` (``worker.up``): a
broker check, an embedded Redis (when no broker answers), worker processes started and stopped,
the GPUs to run them on.

The embedded Redis is a ``redis-server`` from PATH with append-only persistence in a data
directory (reused across runs, so queued requests survive), bound to 127.0.0.1 with a
generated password kept in that directory. Secrets never go on a command line (``ps`` shows
those to every user): Redis reads its password from a 0600 config file in a private run
directory, and the workers get the broker URL in their environment.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
import structlog

log = structlog.get_logger(__name__)


def data_dir() -> Path:
    """Where the embedded Redis keeps its data (``GENQ_DATA_DIR`` or ~/.local/share)."""
    base = os.environ.get("GENQ_DATA_DIR") or Path(
        os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "genqueue"
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broker_problem(url: str, timeout: float = 1.0) -> str | None:
    """None when a Redis answers PING at ``url``; else why not, in a few words."""
    try:
        from worker.ops.redisconn import connect

        connect(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping()
    except redis.AuthenticationError as exc:
        return f"it refused the password ({exc})"
    except redis.RedisError as exc:
        return str(exc) or type(exc).__name__
    except ValueError as exc:  # not a Redis URL
        return str(exc)
    return None


def broker_answers(url: str, timeout: float = 1.0) -> bool:
    """Whether a Redis answers PING at ``url``."""
    return broker_problem(url, timeout) is None


def broker_refusal(url: str, problem: str, embedded_flag: str | None = None) -> str:
    """Two lines: GENQ_BROKER_URL (masked) does not answer, and what to do."""
    from worker.ops.logging import mask_secrets

    fix = "start that Redis, or fix GENQ_BROKER_URL, or unset it"
    if embedded_flag:
        fix += f" (or pass {embedded_flag} to start an embedded Redis instead)"
    else:
        fix += " to use an embedded Redis"
    return f"GENQ_BROKER_URL={mask_secrets(url)} does not answer: {problem}\n{fix}"


def export_line(server: EmbeddedRedis, show_password: bool = False) -> str:
    """The shell line that points another terminal at ``server``: the password is read from
    its 0600 file (``$(cat ...)``), so the line is exact without showing it, unless asked."""
    if show_password:
        return f"export GENQ_BROKER_URL='{server.url}'"
    secret = (server.dir / "password").absolute()
    return (f'export GENQ_BROKER_URL="redis://:$(cat {secret})@127.0.0.1:{server.port}/0"')


class StackError(RuntimeError):
    """The stack cannot start for a reason the user fixes (a port taken, no redis-server):
    ``genq up`` and ``genq run`` say it in one line."""


def port_taken(port: int) -> bool:
    """Whether ``port`` (1-65535) on 127.0.0.1 is in use."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def write_private(path: Path, text: str) -> None:
    """Create ``path`` readable by this user only (0600 from the start) holding ``text``."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(text)


class EmbeddedRedis:
    """A private ``redis-server`` with append-only persistence and a password."""

    def __init__(self, directory: Path, port: int | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        secret = self.dir / "password"
        if not secret.exists():
            write_private(secret, secrets.token_urlsafe(24))
        self.password = secret.read_text().strip()
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.config: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def _write_config(self) -> Path:
        """The settings, password included, as a 0600 file in a new 0700 directory (under
        ``XDG_RUNTIME_DIR`` when set), for ``redis-server <file>``."""
        here = self.dir.absolute()  # Redis changes into `dir` before it opens `logfile`
        settings = {"port": self.port, "bind": "127.0.0.1", "dir": here, "appendonly": "yes",
                    "appendfsync": "everysec", "save": "", "requirepass": self.password,
                    "maxmemory-policy": "noeviction", "protected-mode": "yes",
                    "logfile": here / "redis.log"}
        run_dir = tempfile.mkdtemp(prefix="genq-redis-", dir=os.environ.get("XDG_RUNTIME_DIR"))
        path = Path(run_dir) / "redis.conf"
        quote = {ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n"}  # Redis's "..." escapes
        write_private(path, "".join(f'{key} "{str(value).translate(quote)}"\n'
                                    for key, value in settings.items()))
        return path

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        """Start it and wait until it answers."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise StackError("redis-server is not on PATH (Debian: apt-get install redis-server)")
        self.config = self._write_config()
        self.proc = subprocess.Popen(
            [binary, str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us only: we stop Redis last
        )
        deadline = time.monotonic() + timeout
        while not broker_answers(self.url, 0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise StackError(f"redis-server did not start; see {self.dir / 'redis.log'}")
            time.sleep(0.05)
        log.info("embedded_redis_started", port=self.port, dir=str(self.dir))
        return self

    def stop(self) -> None:
        """Stop it (SIGTERM: Redis flushes its append-only file first) and remove its config."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
        if self.config:
            shutil.rmtree(self.config.parent, ignore_errors=True)
            self.config = None


@contextmanager
def embedded_broker(port: int | None = None) -> Iterator[EmbeddedRedis]:
    """An embedded Redis in the data directory (on ``port``, else a free one), this process's
    broker until the block ends."""
    from worker.ops.settings import get_settings

    if port is not None and port_taken(port):
        raise StackError(f"port {port} on 127.0.0.1 is taken: choose another with "
                         "--redis-port (or leave it out for a free one)")
    server = EmbeddedRedis(data_dir() / "redis", port).start()
    os.environ["GENQ_BROKER_URL"] = server.url
    get_settings.cache_clear()
    try:
        yield server
    finally:
        server.stop()


def worker_args(gpu: str = "none", name: str | None = None) -> list[str]:
    """The ``genq`` arguments that start a worker on ``gpu`` named ``name``."""
    return ["worker", "--gpu", gpu, *(["--name", name] if name else [])]


def spawn_worker(env: dict[str, str], gpu: str = "none", name: str | None = None,
                 log_file: Path | None = None) -> subprocess.Popen:
    """Start ``genq worker`` as a child process with ``env`` (the GENQ_ settings)."""
    cmd = [sys.executable, "-m", "worker.cli", *worker_args(gpu, name)]
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    # its own session: a terminal's Ctrl-C reaches `genq up`/`genq run`, which stop it in order
    return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=out,
                            start_new_session=True)


def stop_process(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM (Celery's warm shutdown: the batch in flight finishes), then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def count_gpus() -> int:
    """GPUs visible to ``nvidia-smi -L`` (CUDA is never initialised here)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


def select_gpus(gpus: str) -> list[str]:
    """``all`` -> every visible GPU (none: the CPU), ``none`` -> CPU, ``0,1`` -> those."""
    if gpus == "none":
        return ["none"]
    if gpus == "all":
        return [str(i) for i in range(count_gpus())] or ["none"]
    chosen = [g.strip() for g in gpus.split(",") if g.strip()]
    if not chosen or not all(g.isdigit() for g in chosen):
        raise ValueError(f"--gpus takes all, none or indices like 0,1; not {gpus!r}")
    return chosen
