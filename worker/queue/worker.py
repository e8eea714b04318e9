"""``genq worker``: a real Celery worker whose bootstep runs the step loop.

The Celery worker keeps what operators expect (``celery inspect ping``, heartbeats, remote
control, events; solo pool, consuming only ``genq.control``); the ``GenerationStep`` loads the
engine and runs the ``Consumer`` step loop in a thread, stopping it gracefully on warm
shutdown (running rows finish, waiting requests go back to their queues).

Remote control speaks for the step loop (``install_control``): ``inspect active`` lists the
requests running here and ``inspect reserved`` those held waiting; ``revoke`` also writes the
request's cancel flag in Redis (``genq:cancel:<id>``, kept for the result TTL), so it is
honoured wherever the request is: queued, held, running, or fetched later by a worker started
after the revoke.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager

import structlog
from celery import bootsteps
from celery.apps import worker as celery_worker

from worker.errors import EX_MODEL_UNAVAILABLE
from worker.ops.logging import configure_logging, say
from worker.ops.settings import get_settings

log = structlog.get_logger(__name__)
LOADING_KEY = "genq:loading:{}"  # a loading worker's progress (JSON), for `genq run` and `genq up`
LOADING_TTL_S = 20  # renewed every few seconds while it loads: a killed worker's entry expires


class LoadingNote:
    """What a loading worker tells the CLI through Redis (``genq:loading:<name>``): the model,
    since when, whether the demo model is converted first; on failure, the reason in two lines.
    Best effort: a broker that does not answer leaves the note unwritten, never the load."""

    def __init__(self, settings, name: str):
        self.settings, self.name = settings, name
        self.info = {"name": name, "model": settings.model, "pid": os.getpid(),
                     "since": time.time(), "stage": "loading", **_first_run(settings)}
        self._stop = threading.Event()
        self._redis = None

    def _write(self, ttl_s: int = LOADING_TTL_S) -> None:
        try:
            if self._redis is None:
                from worker.ops.redisconn import connect

                self._redis = connect(self.settings.broker_url.get_secret_value(), self.settings,
                                      socket_connect_timeout=2, socket_timeout=2)
            self._redis.set(LOADING_KEY.format(self.name), json.dumps(self.info), ex=ttl_s)
        except Exception as exc:  # noqa: BLE001 - the load matters, the note does not
            log.debug("loading_note_failed", error=f"{type(exc).__name__}: {exc}")

    def __enter__(self) -> LoadingNote:
        self._write()

        def renew() -> None:
            while not self._stop.wait(5.0):
                self._write()

        threading.Thread(target=renew, name="genq-loading-note", daemon=True).start()
        return self

    def failed(self, lines: list[str]) -> None:
        self._stop.set()
        self.info.update(stage="failed", error=lines)
        self._write(ttl_s=300)

    def __exit__(self, exc_type, *_) -> None:
        self._stop.set()
        if exc_type is None:
            try:
                if self._redis is not None:
                    self._redis.delete(LOADING_KEY.format(self.name))
            except Exception:  # noqa: BLE001, S110 - it expires by itself
                pass


def _first_run(settings) -> dict:
    """``{"converts": True}`` when the demo model is converted before it loads (first run)."""
    if settings.model != "demo":
        return {}
    from worker.engine.demo import CONVERSION, DEMO_ID

    folder = settings.cache_dir / "models" / f"{DEMO_ID}.{CONVERSION}"
    return {"display": DEMO_ID, "converts": not (folder / "config.json").is_file()}


def pin_device(gpu: str | None) -> str:
    """Set ``CUDA_VISIBLE_DEVICES`` before torch loads; return the worker's name prefix."""
    if gpu is None or gpu == "none":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return "cpu"
    if not gpu.isdigit():
        raise ValueError(f"--gpu takes a GPU index or 'none', not {gpu!r}")
    from worker.stack import count_gpus

    visible = count_gpus()
    if int(gpu) >= visible:
        raise ValueError(f"--gpu {gpu}: this machine has {visible or 'no'} NVIDIA GPU(s) "
                         f"(nvidia-smi -L); use --gpu none for the CPU")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    return f"gpu{gpu}"


@contextmanager
def _interruptible():
    """While the model loads (seconds to minutes, nothing held yet), Ctrl-C or SIGTERM stops
    the worker at once: Celery's own handlers only set a flag that its loop reads later."""
    def stop_now(signum, _frame):
        log.info("worker_stopped_while_loading", signal=signal.Signals(signum).name)
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop_now) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class GenerationStep(bootsteps.StartStopStep):
    """Worker bootstep: load the engine, then run the batching consumer in a thread."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self.consumer = None
        self.thread: threading.Thread | None = None
        self.intake: threading.Event | None = None  # set to stop the intake thread

    def start(self, worker) -> None:
        settings = get_settings()
        from worker.queue.intake import start_intake

        self.intake = start_intake(settings, worker.hostname)  # foreign requests, from now on
        log.info("engine_loading", worker=worker.hostname, model=settings.model,
                 backend=settings.backend)
        with _interruptible(), LoadingNote(settings, worker.hostname) as note:
            from worker.engine.loading import ModelUnavailable  # torch: seconds, interruptible

            try:
                self._load(worker, settings)
            except ModelUnavailable as exc:  # two lines that say what to do, no traceback
                log.error("model_unavailable", worker=worker.hostname, model=settings.model,
                          error=exc.lines[0], fix=exc.lines[1])
                note.failed(exc.lines)
                raise SystemExit(EX_MODEL_UNAVAILABLE) from None
        worker.genq_consumer = self.consumer  # for remote control (install_control)
        self.thread = threading.Thread(target=self._run, args=(worker,), name="genq-steps")
        self.thread.start()

    def _load(self, worker, settings) -> None:
        """Load the engine, run the self-check, build the consumer (not started yet)."""
        from worker.engine import load_engine
        from worker.engine.selfcheck import enforce
        from worker.ops.metrics import WorkerMetrics
        from worker.queue.consumer import Consumer
        from worker.queue.webhooks import announce_global_hook
        from worker.tokencount import publish as publish_tokenizer

        engine = load_engine(
            settings.model, backend=settings.backend, dtype=settings.dtype,
            adapters=settings.adapters, worker_name=worker.hostname,
            **settings.model_dump(include={"max_batch_size", "max_batch_tokens",
                                           "max_prompt_tokens", "max_seq_length",
                                           "max_new_tokens_limit",
                                           "cache_dir", "load_in_4bit", "scheduler",
                                           "max_prefill_tokens", "max_bulk_prefill_tokens",
                                           "max_bulk_pause_ms",
                                           "max_wait_ms_for_bucket"}),
        )
        check = enforce(engine, settings.self_check, log, cache_dir=settings.cache_dir)
        metrics = WorkerMetrics.start(settings.metrics_port, worker.hostname)
        self.consumer = Consumer(engine, settings, worker.hostname, metrics=metrics,
                                 self_check=check)
        publish_tokenizer(self.consumer.store.redis, engine, settings.result_ttl_s)
        announce_global_hook(self.consumer.store.redis, settings)
        log.info("worker_ready", worker=worker.hostname, backend=engine.backend,
                 model=engine.model_name, dtype=engine.dtype, pad_token=engine.pad.token,
                 self_check=check)

    def _run(self, worker) -> None:
        try:
            self.consumer.run()
        except BaseException:
            log.exception("step_loop_crashed", worker=worker.hostname)
            os._exit(1)  # unacked requests are redelivered to the next worker

    def stop(self, worker) -> None:
        if self.intake is not None:
            self.intake.set()
        if self.consumer is not None:
            self.consumer.stop()
        if self.thread is not None:
            self.thread.join()


def _genq_consumer(state):
    """The ``Consumer`` of the worker a remote-control command reached (None while loading)."""
    return getattr(getattr(state.consumer, "controller", None), "genq_consumer", None)


def install_control() -> None:
    """Make Celery's remote control commands ``active``, ``reserved`` and ``revoke`` speak for
    the step loop (Celery's own see only requests its pool runs, and genqueue's pool runs
    none). Process-wide: call once, in a ``genq worker`` process."""
    from celery.utils.functional import maybe_list
    from celery.worker.control import Panel

    if getattr(Panel.data.get("revoke"), "genq", False):
        return
    celery_revoke = Panel.data["revoke"]

    def revoke(state, task_id, terminate=False, signal=None, **kwargs):
        ids = [str(i) for i in maybe_list(task_id) or []]
        consumer = _genq_consumer(state)
        if consumer is not None and ids:
            try:  # the flag outlives this worker: later workers honour it too
                consumer.store.cancel(ids)
            except Exception as exc:  # noqa: BLE001 - Celery's own revoke still runs
                log.warning("revoke_not_persisted", request_ids=ids, error=repr(exc)[:200])
        return celery_revoke(state, task_id, terminate=terminate, signal=signal, **kwargs)

    def active(state, safe=False, **kwargs):
        consumer = _genq_consumer(state)
        return consumer.link.requests()[0] if consumer is not None else []

    def reserved(state, **kwargs):
        consumer = _genq_consumer(state)
        return consumer.link.requests()[1] if consumer is not None else []

    revoke.genq = True
    for name, fun in (("revoke", revoke), ("active", active), ("dump_active", active),
                      ("reserved", reserved), ("dump_reserved", reserved)):
        fun.__doc__ = Panel.data[name].__doc__
        Panel.data[name] = fun


def run_worker(gpu: str | None = None, name: str | None = None, threads: int | None = None) -> int:
    """Start one worker in the foreground (CUDA pinned first); return its exit code."""
    prefix = pin_device(gpu)
    settings = get_settings()
    configure_logging(settings.log_level)
    celery_worker.safe_say = say  # its shutdown notes: log lines (JSON in a log file)
    if threads:
        import torch

        torch.set_num_threads(threads)
    from worker.queue.app import CONTROL_QUEUE, make_app

    app = make_app(settings)
    app.steps["worker"].add(GenerationStep)
    install_control()
    hostname = name or f"{prefix}@{socket.gethostname()}"
    worker = app.Worker(hostname=hostname, pool="solo", concurrency=1, queues=[CONTROL_QUEUE],
                        loglevel=settings.log_level, without_mingle=True, without_gossip=True,
                        quiet=True)  # no banner: the log says what it runs
    worker.start()
    return worker.exitcode or 0
