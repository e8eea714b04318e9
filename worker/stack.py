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


def port_taken(port: int) -> bool:
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
def embedded_broker(port: int | None = None) -> Iterator[EmbeddedRedis]:
    """An embedded Redis in the data directory (on ``port``, else a free one), this process's
    broker until the block ends."""
    from worker.ops.settings import get_settings

    if port is not None and port_taken(port):
        raise RuntimeError(f"port {port} on 127.0.0.1 is taken: choose another with "
                           "--redis-port (or leave it out for a free one)")
    server = EmbeddedRedis(data_dir() / "redis", port).start()
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


def run_stack(gpus: str, host: str, port: int, console, per_device: int = 1,
              embedded: bool = False, redis_port: int | None = None,
              show_password: bool = False, summary_s: float = 30.0) -> int:
    """``genq up``: broker, ``per_device`` workers per GPU (or on the CPU), each restarted if it
    dies (unless its model cannot load: that is said in two lines and not retried) and serving
    its metrics on its own port (``GENQ_METRICS_PORT`` + its index), gateway; what the workers
    wait for and a summary of the queue while it changes are printed. Ctrl-C stops the workers
    gracefully, then the gateway, then the embedded Redis. A ``GENQ_BROKER_URL`` that does not
    answer is refused (exit 2) unless ``embedded`` asks for an embedded Redis."""
    import threading

    import uvicorn

    from worker.errors import EX_MODEL_UNAVAILABLE
    from worker.ops.logging import mask_secrets
    from worker.ops.redisconn import connect
    from worker.ops.settings import get_settings

    slots = [(dev, k) for dev in select_gpus(gpus) for k in range(per_device)]
    metrics_base = get_settings().metrics_port
    configured = os.environ.get("GENQ_BROKER_URL")
    broker = ExitStack()
    problem = broker_problem(configured) if configured and not embedded else None
    if configured and not embedded and problem is None:
        console.print(f"broker: {mask_secrets(configured)} (GENQ_BROKER_URL)", highlight=False)
    elif configured and not embedded:
        console.print(f"[red]error[/red]: {broker_refusal(configured, problem, '--embedded-redis')}",
                      highlight=False)
        return 2
    else:
        server = broker.enter_context(embedded_broker(redis_port))
        console.print(f"broker: embedded Redis on 127.0.0.1:{server.port}, data in {server.dir}; "
                      "in another terminal:", highlight=False)
        console.print(f"  {export_line(server, show_password)}", highlight=False, soft_wrap=True)
    env = {"GENQ_BROKER_URL": os.environ["GENQ_BROKER_URL"]}
    logs = data_dir() / "logs"
    logs.mkdir(exist_ok=True)
    workers: dict[int, subprocess.Popen] = {}
    given_up: set[int] = set()
    stopping = threading.Event()
    outcome = {"code": 0}
    names: dict[int, str] = {}

    def start(i: int) -> None:
        dev, k = slots[i]
        prefix = "cpu" if dev == "none" else f"gpu{dev}"
        name = names[i] = f"{prefix}{f'-{k + 1}' if k else ''}@{socket.gethostname()}"
        own, metrics = env, ""
        if metrics_base:
            own = {**env, "GENQ_METRICS_PORT": str(metrics_base + i)}
            metrics = f", metrics on port {metrics_base + i}"
        workers[i] = spawn_worker(own, gpu=dev, name=name, log_file=logs / f"{name}.log")
        console.print(f"worker {name}: pid {workers[i].pid}{metrics}, log {logs / (name + '.log')}",
                      highlight=False)

    r = connect(env["GENQ_BROKER_URL"], socket_connect_timeout=2, socket_timeout=2)
    startup = Startup(r)
    summary = Summary(r, summary_s)

    def supervise() -> None:
        while not stopping.wait(1.0):
            for line in startup.poll(every_s=1.0) + summary.poll():
                console.print(line, highlight=False)
            for i, proc in list(workers.items()):
                if i in given_up or proc.poll() is None or stopping.is_set():
                    continue
                if proc.returncode == EX_MODEL_UNAVAILABLE:  # restarting would not help
                    given_up.add(i)
                    for line in startup.poll(every_s=0):
                        console.print(line, highlight=False)
                    if names[i] not in startup.failures:
                        console.print(f"[red]worker {names[i]} cannot load its model[/red]; see "
                                      f"{logs / (names[i] + '.log')}", highlight=False)
                    if len(given_up) == len(slots):
                        console.print("[red]no worker can run: stopping[/red]")
                        outcome["code"] = 2
                        os.kill(os.getpid(), signal.SIGINT)  # uvicorn stops, then the rest
                    continue
                console.print(f"[yellow]worker on {slots[i][0]} exited ({proc.returncode}); "
                              "restarting", highlight=False)
                start(i)

    for i in range(len(slots)):
        start(i)
    threading.Thread(target=supervise, name="genq-supervisor", daemon=True).start()
    console.print(f"gateway: http://{host}:{port} (Ctrl-C or SIGTERM stops everything)",
                  highlight=False)
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
    return outcome["code"]


class Summary:
    """``genq up``'s periodic line while the queue changes: queued and running requests by
    priority, and what each ready worker generates (from the queues and the heartbeats)."""

    def __init__(self, r, every_s: float = 30.0):
        self.redis, self.every_s = r, every_s
        self.last = time.monotonic()
        self.shown: str | None = None

    def line(self) -> str:
        import json

        from worker.queue.app import pending_by_queue
        from worker.queue.rediskeys import WORKERS_KEY

        queued = sum(pending_by_queue(self.redis).values())
        running = held = 0
        rates = []
        now = time.time()
        for raw in self.redis.hvals(WORKERS_KEY):
            info = json.loads(raw)
            if now - float(info.get("at", 0)) >= float(info.get("ttl", 15)):
                continue
            running += sum((info.get("running") or {}).values())
            held += sum((info.get("waiting") or {}).values())
            if isinstance(info.get("tokens_per_s"), int | float):
                rates.append(f"{info['name']} {info['tokens_per_s']:.0f} tok/s")
        text = f"queue: {queued + held} waiting, {running} running"
        return text + (f"; {', '.join(rates)}" if rates else "")

    def poll(self) -> list[str]:
        if self.every_s <= 0 or time.monotonic() - self.last < self.every_s:
            return []
        self.last = time.monotonic()
        try:
            text = self.line()
        except (redis.RedisError, ValueError, TypeError):
            return []
        if text == self.shown:
            return []
        self.shown = text
        return [time.strftime("%H:%M:%S ") + text]

DEMO_CONVERSION_S = 20  # the demo model's one-time conversion on this kind of machine


class Startup:
    """What a starting fleet waits for, read from Redis: workers loading their model (the
    note ``genq:loading:<name>`` a loading worker keeps), workers ready (a fresh heartbeat), a
    worker that could not load its model (two lines). ``poll()`` returns the lines to print,
    each once; ``waiting()`` what is waited for now (None once a worker is ready)."""

    def __init__(self, r, expect_worker: bool = True):
        self.redis = r
        self.expect_worker = expect_worker  # we started one: "loading" rather than "no worker"
        self.started = time.monotonic()
        self.since: dict[str, float] = {}  # worker -> when it started loading (wall clock)
        self.said: set[tuple[str, str]] = set()
        self.ready: set[str] = set()
        self.loading: dict[str, dict] = {}
        self.failures: dict[str, list[str]] = {}
        self._polled = 0.0

    def _read(self) -> tuple[dict[str, dict], dict[str, dict]]:
        import json

        from worker.queue.rediskeys import WORKERS_KEY

        notes: dict[str, dict] = {}
        keys = list(self.redis.scan_iter("genq:loading:*", count=100))
        for raw in self.redis.mget(keys) if keys else []:
            try:
                note = json.loads(raw)
                notes[note["name"]] = note
            except (TypeError, ValueError, KeyError):
                continue
        alive: dict[str, dict] = {}
        now = time.time()
        for raw in self.redis.hvals(WORKERS_KEY):
            try:
                info = json.loads(raw)
                if now - float(info["at"]) < float(info.get("ttl", 15)):
                    alive[info["name"]] = info
            except (TypeError, ValueError, KeyError):
                continue
        return notes, alive

    def poll(self, every_s: float = 1.0) -> list[str]:
        if time.monotonic() - self._polled < every_s:
            return []
        self._polled = time.monotonic()
        try:
            notes, alive = self._read()
        except redis.RedisError:
            return []
        out = []
        for name, note in sorted(notes.items()):
            self.since.setdefault(name, float(note.get("since") or time.time()))
            if note.get("stage") == "failed" and name not in self.failures:
                self.failures[name] = list(note.get("error") or ["the model did not load"])
                out.append(f"worker {name} cannot load model {note.get('model')}:\n  "
                           + "\n  ".join(self.failures[name]))
            elif note.get("stage") == "loading" and (name, "loading") not in self.said:
                self.said.add((name, "loading"))
                out.append(f"worker {name}: {loading_text(note)}...")
        self.loading = {n: note for n, note in notes.items() if note.get("stage") == "loading"
                        and n not in alive}
        for name, info in sorted(alive.items()):
            if name in self.ready:
                continue
            self.ready.add(name)
            took = time.time() - self.since.get(name, time.time())
            when = f" in {took:.0f} s" if name in self.since else ""
            out.append(f"worker {name} ready{when}: {info.get('model')} on "
                       f"{info.get('backend')} ({info.get('device') or 'cpu'})")
        return out

    def waiting(self) -> str | None:
        """What the job waits for while no worker is ready; None once one is."""
        if self.ready:
            return None
        waited = time.monotonic() - self.started
        if self.loading:
            note = next(iter(self.loading.values()))
            return f"{loading_text(note)}: {waited:.0f} s"
        if self.expect_worker:
            return f"starting a worker: {waited:.0f} s"
        return f"waiting for a worker (none is alive; start one: genq worker): {waited:.0f} s"


def loading_text(note: dict) -> str:
    """``loading model SmolLM2-135M-Instruct (first run converts it, ~20 s)``."""
    text = f"loading model {note.get('display') or note.get('model')}"
    if note.get("converts"):
        text += f" (first run converts it, ~{DEMO_CONVERSION_S} s)"
    return text
