"""``genq up``: the whole stack on one machine. The broker (``GENQ_BROKER_URL`` if it answers,
else an embedded Redis), workers per GPU (or on the CPU) each restarted if it dies, the gateway
in the foreground; what the workers wait for and a summary of the queue while it changes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from contextlib import ExitStack

import redis

from worker.errors import EX_MODEL_UNAVAILABLE
from worker.ops.logging import mask_secrets
from worker.ops.redisconn import connect
from worker.ops.settings import get_settings
from worker.queue.rediskeys import WORKERS_KEY
from worker.stack import (
    broker_problem,
    broker_refusal,
    data_dir,
    embedded_broker,
    export_line,
    select_gpus,
    spawn_worker,
    stop_process,
)
from worker.startup import Startup


def run_stack(gpus: str, host: str, port: int, console, per_device: int = 1,
              embedded: bool = False, redis_port: int | None = None,
              show_password: bool = False, summary_s: float = 30.0) -> int:
    """``genq up``: broker, ``per_device`` workers per GPU (or on the CPU), each restarted if it
    dies (unless its model cannot load: that is said in two lines and not retried) and serving
    its metrics on its own port (``GENQ_METRICS_PORT`` + its index), gateway; what the workers
    wait for and a summary of the queue while it changes are printed. Ctrl-C stops the workers
    gracefully, then the gateway, then the embedded Redis. A ``GENQ_BROKER_URL`` that does not
    answer is refused (exit 2) unless ``embedded`` asks for an embedded Redis."""
    import uvicorn

    slots = [(dev, k) for dev in select_gpus(gpus) for k in range(per_device)]
    metrics_base = get_settings().metrics_port
    broker = ExitStack()
    if not open_broker(broker, console, embedded, redis_port, show_password):
        return 2
    fleet = Fleet(slots, {"GENQ_BROKER_URL": os.environ["GENQ_BROKER_URL"]}, metrics_base,
                  console, summary_s)
    fleet.start()
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
        fleet.stop()
        broker.close()  # the embedded Redis, if any, stops last
        console.print("stopped")
    return fleet.code


def open_broker(broker: ExitStack, console, embedded: bool, redis_port: int | None,
                show_password: bool) -> bool:
    """Use ``GENQ_BROKER_URL`` if it answers, else (unset, or ``embedded``) start an embedded
    Redis on ``broker``; say which. False (and why, in two lines) when the URL does not answer."""
    configured = os.environ.get("GENQ_BROKER_URL")
    problem = broker_problem(configured) if configured and not embedded else None
    if configured and not embedded and problem is None:
        console.print(f"broker: {mask_secrets(configured)} (GENQ_BROKER_URL)", highlight=False)
    elif configured and not embedded:
        console.print(f"[red]error[/red]: {broker_refusal(configured, problem, '--embedded-redis')}",
                      highlight=False)
        return False
    else:
        server = broker.enter_context(embedded_broker(redis_port))
        console.print(f"broker: embedded Redis on 127.0.0.1:{server.port}, data in {server.dir}; "
                      "in another terminal:", highlight=False)
        console.print(f"  {export_line(server, show_password)}", highlight=False, soft_wrap=True)
    return True


class Fleet:
    """``genq up``'s workers, one per slot (device, index on it): started, watched by a
    thread (one that dies is restarted, unless its model cannot load), stopped together.
    ``code`` is 2 once no worker can run (the gateway is then interrupted)."""

    def __init__(self, slots: list[tuple[str, int]], env: dict[str, str], metrics_base: int,
                 console, summary_s: float):
        self.slots, self.env, self.metrics_base, self.console = slots, env, metrics_base, console
        self.logs = data_dir() / "logs"
        self.logs.mkdir(exist_ok=True)
        self.workers: dict[int, subprocess.Popen] = {}
        self.names: dict[int, str] = {}
        self.given_up: set[int] = set()
        self.stopping = threading.Event()
        self.code = 0
        r = connect(env["GENQ_BROKER_URL"], socket_connect_timeout=2, socket_timeout=2)
        self.startup = Startup(r)
        self.summary = Summary(r, summary_s)

    def start(self) -> None:
        """Start every worker, then the thread that watches them."""
        for i in range(len(self.slots)):
            self.spawn(i)
        threading.Thread(target=self.supervise, name="genq-supervisor", daemon=True).start()

    def spawn(self, i: int) -> None:
        """Start the worker of slot ``i`` (its name, metrics port and log file said)."""
        dev, k = self.slots[i]
        prefix = "cpu" if dev == "none" else f"gpu{dev}"
        name = self.names[i] = f"{prefix}{f'-{k + 1}' if k else ''}@{socket.gethostname()}"
        own, metrics = self.env, ""
        if self.metrics_base:
            own = {**self.env, "GENQ_METRICS_PORT": str(self.metrics_base + i)}
            metrics = f", metrics on port {self.metrics_base + i}"
        self.workers[i] = spawn_worker(own, gpu=dev, name=name, log_file=self.logs / f"{name}.log")
        self.console.print(f"worker {name}: pid {self.workers[i].pid}{metrics}, log "
                           f"{self.logs / (name + '.log')}", highlight=False)

    def supervise(self) -> None:
        """Each second: print what the workers wait for and the summary; handle exited ones."""
        while not self.stopping.wait(1.0):
            for line in self.startup.poll(every_s=1.0) + self.summary.poll():
                self.console.print(line, highlight=False)
            for i, proc in list(self.workers.items()):
                if i in self.given_up or proc.poll() is None or self.stopping.is_set():
                    continue
                self.exited(i, proc)

    def exited(self, i: int, proc: subprocess.Popen) -> None:
        """Restart the worker of slot ``i``, unless its model cannot load (then it is given
        up; with every worker given up, ``genq up`` stops)."""
        console = self.console
        if proc.returncode != EX_MODEL_UNAVAILABLE:
            console.print(f"[yellow]worker on {self.slots[i][0]} exited ({proc.returncode}); "
                          "restarting", highlight=False)
            self.spawn(i)
            return
        self.given_up.add(i)  # restarting would not help
        for line in self.startup.poll(every_s=0):
            console.print(line, highlight=False)
        if self.names[i] not in self.startup.failures:
            console.print(f"[red]worker {self.names[i]} cannot load its model[/red]; see "
                          f"{self.logs / (self.names[i] + '.log')}", highlight=False)
        if len(self.given_up) == len(self.slots):
            console.print("[red]no worker can run: stopping[/red]")
            self.code = 2
            os.kill(os.getpid(), signal.SIGINT)  # uvicorn stops, then the rest

    def stop(self) -> None:
        """Stop watching, then every worker: all warm shutdowns at once, then wait for each."""
        self.stopping.set()
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers.values():
            stop_process(proc)


class Summary:
    """``genq up``'s periodic line while the queue changes: queued and running requests by
    priority, and what each ready worker generates (from the queues and the heartbeats)."""

    def __init__(self, r, every_s: float = 30.0):
        self.redis, self.every_s = r, every_s
        self.last = time.monotonic()
        self.shown: str | None = None

    def line(self) -> str:
        from worker.queue.app import pending_by_queue

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
