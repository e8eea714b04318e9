"""Shared fixtures: the real demo model (loaded once per session, per backend), a tiny
random-weight model for plumbing tests, and a private redis-server per test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Unsloth must be imported before transformers to patch it; import it first when present.
try:
    import unsloth  # noqa: F401
except Exception:  # pragma: no cover - absent or broken install: the unsloth tests will fail
    pass

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "prompts.jsonl"


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
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from worker.engine.demo import demo_model_dir

    path = tmp_path_factory.mktemp("lora-a")
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir(cache_dir), dtype=torch.float32)
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)
    assert any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, cache_dir) -> Path:
    """A 2-layer random-weight Llama with the demo tokenizer: fast, real code paths."""
    from transformers import AutoTokenizer

    from worker.engine.demo import demo_model_dir

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir(cache_dir))
    tiny_llama(tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_llama(tokenizer):
    """A 2-layer random-weight Llama (seed 0) for ``tokenizer``'s vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def example_requests(n: int | None = None, max_new_tokens: int = 48) -> list[dict]:
    """Chat requests from examples/prompts.jsonl (OpenAI Batch lines), in file order."""
    out = []
    for line in EXAMPLES.read_text().splitlines():
        if line.strip():
            body = json.loads(line)["body"]
            out.append({"messages": body["messages"], "max_new_tokens": max_new_tokens})
    return out[:n] if n else out


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


@pytest.fixture
def start_worker(redis_url, cache_dir, tmp_path):
    """Start real ``genq worker`` processes; all are killed after the test."""
    import subprocess
    import time

    import redis

    from worker.stack import spawn_worker

    procs: list[subprocess.Popen] = []

    def start(name: str = "w1@test", wait_ready: bool = True, **env: str) -> subprocess.Popen:
        full_env = {"GENQ_BROKER_URL": redis_url, "GENQ_CACHE_DIR": str(cache_dir),
                    "GENQ_BACKEND": "transformers", "GENQ_DTYPE": "float32",
                    "GENQ_VISIBILITY_TIMEOUT_S": "6", "GENQ_BATCH_WAIT_MS": "50", **env}
        proc = spawn_worker(full_env, name=name, log_file=tmp_path / f"{name}.log")
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
