"""LoRA adapters on the real demo model: selected per request, never mixed in a batch."""

from __future__ import annotations

import pytest

from tests.conftest import example_requests

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapter_engine(cache_dir, lora_dir):
    """The demo model with one LoRA adapter made here (random, non-zero weights)."""
    from worker.engine import load_engine

    return load_engine("demo", backend="transformers", dtype="float32", cache_dir=cache_dir,
                       adapters={"a": str(lora_dir)})


def test_adapter_changes_output_and_batched_equals_alone(adapter_engine):
    base_reqs = example_requests(6, max_new_tokens=16)
    lora_reqs = [{**r, "adapter": "a"} for r in base_reqs]
    mixed = adapter_engine.generate([x for pair in zip(base_reqs, lora_reqs, strict=True) for x in pair])
    base_out, lora_out = mixed[0::2], mixed[1::2]
    assert all(r["adapter"] == "a" for r in lora_out)
    assert all(r["batch"]["size"] == 6 for r in mixed), "adapters must not share a batch"
    assert sum(b["text"] != a["text"] for b, a in zip(base_out, lora_out, strict=True)) >= 4
    for req, got in zip(lora_reqs, lora_out, strict=True):
        assert adapter_engine.generate([req])[0]["text"] == got["text"]
    for req, got in zip(base_reqs, base_out, strict=True):
        assert adapter_engine.generate([req])[0]["text"] == got["text"]


def test_base_rows_match_an_engine_without_adapters(adapter_engine, demo_engine):
    reqs = example_requests(4, max_new_tokens=16)
    assert ([r["text"] for r in adapter_engine.generate(reqs)]
            == [r["text"] for r in demo_engine.generate(reqs)])
