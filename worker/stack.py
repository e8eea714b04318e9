"""The one-machine stack behind ``genq run`` and ``genq up``: an embedded Redis (when no
broker answers) and worker processes, started and stopped in order.

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
from contextlib import ExitStack, contextmanager
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


def broker_answers(url: str, timeout: float = 1.0) -> bool:
    """Whether a Redis answers PING at ``url``."""
    try:
        from worker.ops.redisconn import connect

        return bool(connect(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping())
    except redis.RedisError:
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
            raise RuntimeError("redis-server is not on PATH (Debian: apt-get install redis-server)")
        self.config = self._write_config()
        self.proc = subprocess.Popen(
            [binary, str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us only: we stop Redis last
        )
        deadline = time.monotonic() + timeout
        while not broker_answers(self.url, 0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start; see {self.dir / 'redis.log'}")
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
def embedded_broker() -> Iterator[EmbeddedRedis]:
    """An embedded Redis in the data directory, this process's broker until the block ends."""
    from worker.ops.settings import get_settings

    server = EmbeddedRedis(data_dir() / "redis").start()
    os.environ["GENQ_BROKER_URL"] = server.url
    get_settings.cache_clear()
    try:
        yield server
    finally:
        server.stop()


def spawn_worker(env: dict[str, str], gpu: str = "none", name: str | None = None,
                 log_file: Path | None = None) -> subprocess.Popen:
    """Start ``genq worker`` as a child process with ``env`` (the GENQ_ settings)."""
    cmd = [sys.executable, "-m", "worker.cli", "worker", "--gpu", gpu]
    if name:
        cmd += ["--name", name]
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


def run_stack(gpus: str, host: str, port: int, console, per_device: int = 1) -> int:
    """``genq up``: broker, ``per_device`` workers per GPU (or on the CPU), each restarted if it
    dies and serving its metrics on its own port (``GENQ_METRICS_PORT`` + its index), gateway;
    Ctrl-C stops the workers gracefully, then the gateway, then the embedded Redis."""
    import threading

    import uvicorn

    from worker.ops.logging import mask_secrets
    from worker.ops.settings import get_settings

    slots = [(dev, k) for dev in select_gpus(gpus) for k in range(per_device)]
    metrics_base = get_settings().metrics_port
    configured = os.environ.get("GENQ_BROKER_URL")
    broker = ExitStack()
    if configured and broker_answers(configured):
        console.print(f"broker: {mask_secrets(configured)} (GENQ_BROKER_URL)")
    else:
        server = broker.enter_context(embedded_broker())
        console.print(f"broker: embedded Redis on 127.0.0.1:{server.port}, data in {server.dir}")
    env = {"GENQ_BROKER_URL": os.environ["GENQ_BROKER_URL"]}
    logs = data_dir() / "logs"
    logs.mkdir(exist_ok=True)
    workers: dict[int, subprocess.Popen] = {}
    stopping = threading.Event()

    def start(i: int) -> None:
        dev, k = slots[i]
        prefix = "cpu" if dev == "none" else f"gpu{dev}"
        name = f"{prefix}{f'-{k + 1}' if k else ''}@{socket.gethostname()}"
        own, metrics = env, ""
        if metrics_base:
            own = {**env, "GENQ_METRICS_PORT": str(metrics_base + i)}
            metrics = f", metrics on port {metrics_base + i}"
        workers[i] = spawn_worker(own, gpu=dev, name=name, log_file=logs / f"{name}.log")
        console.print(f"worker {name}: pid {workers[i].pid}{metrics}, log {logs / (name + '.log')}")

    def supervise() -> None:
        while not stopping.wait(2.0):
            for i, proc in list(workers.items()):
                if proc.poll() is not None and not stopping.is_set():
                    console.print(f"[yellow]worker on {slots[i][0]} exited ({proc.returncode}); restarting")
                    start(i)

    for i in range(len(slots)):
        start(i)
    threading.Thread(target=supervise, name="genq-supervisor", daemon=True).start()
    console.print(f"gateway: http://{host}:{port} (Ctrl-C or SIGTERM stops everything)")
    from worker.api import create_app

    def interrupt(*_) -> None:  # uvicorn re-raises the signal it caught once it has stopped:
        raise KeyboardInterrupt  # SIGTERM's default action would orphan the workers

    signal.signal(signal.SIGTERM, interrupt)
    try:
        uvicorn.run(create_app(), host=host, port=port, log_config=None)
    except KeyboardInterrupt:
        pass
    finally:
        stopping.set()
        for proc in workers.values():  # all warm shutdowns at once, then wait for each
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in workers.values():
            stop_process(proc)
        broker.close()  # the embedded Redis, if any, stops last
        console.print("stopped")
    return 0
