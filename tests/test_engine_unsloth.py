"""The same proof through the Unsloth backend (its CPU backend on machines without a GPU)."""

from __future__ import annotations

import pytest

from tests.conftest import example_requests
from tests.test_engine_demo import assert_batched_equals_alone

pytestmark = pytest.mark.slow


def test_unsloth_backend_really_runs(unsloth_engine):
    assert unsloth_engine.backend == "unsloth"
    assert unsloth_engine.dtype == "float32"
    assert unsloth_engine.tokenizer.pad_token_id not in unsloth_engine.eos_ids


def test_unsloth_batched_equals_alone(unsloth_engine, demo_engine):
    requests = example_requests(16, max_new_tokens=24)[::-1]
    results = assert_batched_equals_alone(unsloth_engine, requests)
    # both backends load the same weights: the greedy text agrees too
    plain = demo_engine.generate(requests)
    assert [r["text"] for r in results] == [r["text"] for r in plain]


def test_padding_side_is_forced_left_even_if_flipped(unsloth_engine):
    req = example_requests(3, max_new_tokens=8)
    expected = [r["text"] for r in unsloth_engine.generate(req)]
    unsloth_engine.tokenizer.padding_side = "right"  # what for_training / get_peft_model do
    assert [r["text"] for r in unsloth_engine.generate(req)] == expected
