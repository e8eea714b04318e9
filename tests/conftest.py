"""Shared fixtures: the real demo model (loaded once per session, per backend), a tiny
random-weight model for plumbing tests, and a private redis-server per test session.

Test tiers (markers registered in pyproject.toml): ``process`` (the test starts a process:
redis-server, ``genq worker``, a gateway, the CLI, sentinels...), ``model`` (it loads the real
demo model, vLLM or Unsloth), ``slow`` (minutes). Tests using the fixtures below that imply
one get the marker here; a test that starts a process without the ``process`` marker fails.
``make check`` runs ``-m "not process and not model"``; ``make test`` runs everything."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


def share_cores() -> None:
    """Under pytest-xdist (``make test``: one test process per core), give each test process, and
    the workers it starts, its own share of the cores (at least one core, shared in turn where
    processes outnumber cores): torch at one thread per core of the share (two threads in one
    process gain ~15% on this model for ~60% more CPU), vLLM's threads bound to the share's
    cores (its default binds every vLLM process to the same core). Runs before torch is
    imported; a variable already set wins."""
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if count < 2:
        return
    cpus = sorted(os.sched_getaffinity(0))
    per = max(1, len(cpus) // count)
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    start = (index * per) % len(cpus)
    mine = cpus[start:start + per]
    os.environ.setdefault("OMP_NUM_THREADS", str(per))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, mine)))


share_cores()

import pytest  # noqa: E402

from bench.tiny_model import save_tiny_model, tiny_llama  # noqa: E402, F401 - the tests import them here
from bench.workloads import EXAMPLES, example_requests  # noqa: E402, F401 - the tests import them here

ROOT = Path(__file__).resolve().parent.parent

# A test using one of these fixtures (directly or through another fixture) starts a process.
PROCESS_FIXTURES = {"redis_server", "redis_url", "client", "start_worker", "fork_server",
                    "gateway", "start_up", "browser"}
# ... or loads the real demo model, vLLM or Unsloth.
MODEL_FIXTURES = {"demo_engine", "unsloth_engine", "lora_dir", "dora_dir", "saves_dir", "short_unsloth",
                  "vllm_engine", "adapter_engine"}
# The tests that load Unsloth in this process (test_queue_unsloth's worker imports its own).
UNSLOTH_TESTS = ROOT / "tests" / "test_engine_unsloth.py"


def pytest_configure(config):
    """Unsloth must be imported before transformers to patch it (test collection imports
    transformers), and its import takes 10-15 s: import it first only when this run may
    select the tests that load it in this process (never in pytest-xdist's controller, which
    runs no test)."""
    controller = getattr(config.option, "numprocesses", None) and \
        "PYTEST_XDIST_WORKER" not in os.environ
    if not controller and _may_select(config, UNSLOTH_TESTS, {"model", "slow"}):
        try:
            import unsloth  # noqa: F401
        except Exception:  # pragma: no cover - absent or broken install: its tests will fail
            pass


def _may_select(config, module: Path, markers: set[str]) -> bool:
    """Whether the run's paths and ``-m`` expression may select tests of ``module`` carrying
    ``markers`` (True when unsure)."""
    markexpr = config.option.markexpr
    if markexpr:
        try:
            from _pytest.mark.expression import Expression

            if not Expression.compile(markexpr).evaluate(lambda name, **_: name in markers):
                return False
        except Exception:
            return True
    for arg in config.args:
        path = Path(str(arg).split("::")[0]).resolve()
        if path == module or path in module.parents:
            return True
    return False


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark each test by the fixtures it uses (before ``-m`` deselects)."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & PROCESS_FIXTURES and not item.get_closest_marker("process"):
            item.add_marker(pytest.mark.process)
        if names & MODEL_FIXTURES and not item.get_closest_marker("model"):
            item.add_marker(pytest.mark.model)


class UnmarkedProcess(BaseException):
    """Raised (past ``except Exception``) where a test not marked ``process`` starts one."""


@contextmanager
def _refuse_processes(item):
    """While ``item`` (not marked ``process``) sets up or runs, starting a process fails it."""
    import _posixsubprocess
    import subprocess

    started: list[str] = []
    targets = [(os, name) for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system",
                                       "execv", "execve", "execvp", "execvpe")
               if hasattr(os, name)]
    targets += [(subprocess, "_fork_exec"),  # subprocess binds its own name for it
                (_posixsubprocess, "fork_exec")]  # multiprocessing's spawn and forkserver
    saved = [(module, name, getattr(module, name)) for module, name in targets]

    def refuse(name):
        def spawn(*args, **kwargs):
            started.append(name)
            raise UnmarkedProcess(f"{item.nodeid} starts a process ({name}) but is not marked "
                                  "'process': add @pytest.mark.process (or use a fixture that "
                                  "implies it)")
        return spawn

    for module, name, _ in saved:
        setattr(module, name, refuse(f"{module.__name__}.{name}"))
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
    if started:
        pytest.fail(f"{item.nodeid} started a process ({', '.join(started)}) but is not marked "
                    "'process'", pytrace=False)


def _guarded(item):
    """A hook wrapper's body: a test not marked ``process`` may not start one."""
    if item.get_closest_marker("process"):
        return (yield)
    with _refuse_processes(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _guarded(item))


def ctrl_c_default() -> None:
    """``preexec_fn`` for a child a test sends Ctrl-C (SIGINT): the signal's default action, as
    under a terminal, even where this run inherited it ignored (a shell's background job passes
    SIGINT ignored to everything it starts, and Python then keeps it ignored)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_answering(http, proc=None, path: str = "/healthz", timeout: float = 60) -> None:
    """Poll ``path`` on a gateway until it answers 200 (``proc``, if given, must stay alive)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if http.get(path).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc is None or proc.poll() is None, "the gateway process exited"
        assert time.monotonic() < deadline, f"{path} never answered 200"
        time.sleep(0.1)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The model cache shared by the whole run (the demo model converts once)."""
    path = Path(os.environ.get("GENQ_CACHE_DIR", Path.home() / ".cache" / "genqueue"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def demo_engine(cache_dir):
    """The real demo model, plain transformers backend, float32."""
    from worker.engine import load_engine

    return load_engine("demo", backend="transformers", dtype="float32", cache_dir=cache_dir)


@pytest.fixture(scope="session")
def unsloth_engine(cache_dir):
    """The real demo model through Unsloth (its CPU backend here), float32."""
    from worker.engine import load_engine

    return load_engine("demo", backend="unsloth", dtype="float32", cache_dir=cache_dir)


@pytest.fixture(scope="session")
def lora_dir(cache_dir, tmp_path_factory) -> Path:
    """A LoRA adapter for the demo model made here (q/v projections, rank 8, random non-zero
    weights, seed 0), saved as PEFT saves one (an Unsloth-trained adapter has this shape)."""
    return _demo_adapter(cache_dir, tmp_path_factory.mktemp("lora-a"))


@pytest.fixture(scope="session")
def dora_dir(cache_dir, tmp_path_factory) -> Path:
    """The same adapter as DoRA (``use_dora=True``: a magnitude vector per module too), which
    peft serves and vLLM does not."""
    return _demo_adapter(cache_dir, tmp_path_factory.mktemp("dora"), use_dora=True)


@pytest.fixture(scope="session")
def saves_dir(cache_dir, tmp_path_factory) -> Path:
    """The same adapter with trained copies of ``lm_head`` and ``embed_tokens``
    (``modules_to_save``, as Unsloth's continued pretraining saves them)."""
    return _demo_adapter(cache_dir, tmp_path_factory.mktemp("saves"),
                         modules_to_save=["lm_head", "embed_tokens"])


def _demo_adapter(cache_dir: Path, path: Path, **options) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from worker.engine.demo import demo_model_dir

    base = AutoModelForCausalLM.from_pretrained(demo_model_dir(cache_dir), dtype=torch.float32)
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM", **options)
    peft_model = get_peft_model(base, config)
    assert any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    with torch.no_grad():  # trained: DoRA magnitudes and saved copies move off their initial values
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name or "modules_to_save" in name:
                param.mul_(1 + 0.1 * torch.randn_like(param))
    peft_model.save_pretrained(path)
    return path


def peft_text(cache_dir: Path, adapter: Path, messages: list[dict], max_new_tokens: int) -> str:
    """The greedy text of ``PeftModel.from_pretrained(demo model, adapter)`` for a chat."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.engine.demo import demo_model_dir

    folder = demo_model_dir(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, cache_dir) -> Path:
    """A 2-layer random-weight Llama with the demo tokenizer: fast, real code paths."""
    return save_tiny_model(cache_dir, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A private redis-server (append-only, password) on a free port, for this test run."""
    from worker.stack import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """The private Redis, emptied before each test (it is ours alone)."""
    import redis

    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture
def client(redis_url):
    from worker.client import GenerationClient
    from worker.ops.settings import Settings

    return GenerationClient(settings=Settings(broker_url=redis_url))


@pytest.fixture(scope="session")
def fork_server(tmp_path_factory):
    """Starts test workers, forked from an interpreter with the model libraries imported where
    it can (``tests/workerfork.py``: ~4 s and ~5 CPU-s less per worker start)."""
    from tests.workerfork import ForkServer

    server = ForkServer(tmp_path_factory.mktemp("forkserver"))
    yield server
    server.stop()


@pytest.fixture
def start_worker(redis_url, cache_dir, tmp_path, fork_server):
    """Start real ``genq worker`` processes (forked from ``fork_server`` where nothing the
    libraries read at import differs); all are killed after the test."""
    import subprocess
    import time

    import redis

    procs: list = []

    def start(name: str = "w1@test", wait_ready: bool = True, **env: str) -> subprocess.Popen:
        full_env = {"GENQ_BROKER_URL": redis_url, "GENQ_CACHE_DIR": str(cache_dir),
                    "GENQ_BACKEND": "transformers", "GENQ_DTYPE": "float32",
                    "GENQ_VISIBILITY_TIMEOUT_S": "6", "GENQ_BATCH_WAIT_MS": "50", **env}
        proc = fork_server.start_worker(full_env, name, tmp_path / f"{name}.log")
        procs.append(proc)
        if wait_ready:
            r = redis.Redis.from_url(redis_url)
            deadline = time.monotonic() + 120
            while not r.exists(f"genq:worker:{name}"):
                assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "worker did not become ready"
                time.sleep(0.1)
        return proc

    start.log_dir = tmp_path
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def gateway(redis_url):
    """Start the gateway under uvicorn on a free port; a factory returning an httpx client."""
    import threading
    import time

    import httpx
    import uvicorn

    from worker.ops.settings import Settings
    from worker.stack import free_port

    servers = []

    def start(**overrides) -> httpx.Client:
        from worker.api import create_app

        app = create_app(Settings(broker_url=redis_url, **overrides))
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        servers.append((server, thread))
        return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(5)
