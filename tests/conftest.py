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
def tiny_model_dir(tmp_path_factory, cache_dir) -> Path:
    """A 2-layer random-weight Llama with the demo tokenizer: fast, real code paths."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from worker.engine.demo import demo_model_dir

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir(cache_dir))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def example_requests(n: int | None = None, max_new_tokens: int = 48) -> list[dict]:
    """Chat requests from examples/prompts.jsonl (OpenAI Batch lines), in file order."""
    out = []
    for line in EXAMPLES.read_text().splitlines():
        if line.strip():
            body = json.loads(line)["body"]
            out.append({"messages": body["messages"], "max_new_tokens": max_new_tokens})
    return out[:n] if n else out
