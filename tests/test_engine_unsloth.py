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


def test_unsloth_gets_the_models_whole_context(unsloth_engine, demo_engine):
    """Unsloth cuts inputs longer than its ``max_seq_length``: it is the model's context."""
    assert unsloth_engine.model.max_seq_length == unsloth_engine.context_length
    assert unsloth_engine.context_length == demo_engine.context_length == 8192


SHORT = 96


@pytest.fixture(scope="module")
def short_unsloth(cache_dir):
    """The demo model through Unsloth with GENQ_MAX_SEQ_LENGTH=SHORT."""
    from worker.engine import load_engine

    return load_engine("demo", backend="unsloth", dtype="float32", cache_dir=cache_dir,
                       max_seq_length=SHORT)


def test_max_seq_length_reaches_unsloth_and_longer_requests_are_refused(short_unsloth, demo_engine):
    from worker.errors import PromptTooLong

    assert short_unsloth.model.max_seq_length == short_unsloth.context_length == SHORT
    request = example_requests(1)[0]
    prompt_tokens = short_unsloth.prepare({**request, "max_new_tokens": 1})
    fits = {**request, "max_new_tokens": SHORT - prompt_tokens}
    over = {**request, "max_new_tokens": SHORT - prompt_tokens + 1}
    assert prompt_tokens > SHORT // 2 and fits["max_new_tokens"] >= 8
    with pytest.raises(PromptTooLong, match=f"context {SHORT}"):
        short_unsloth.sequence(over)
    result, refused = short_unsloth.generate([fits, over])
    assert refused["status"] == "failed" and refused["error"]["code"] == "prompt_too_long"
    assert result["status"] == "succeeded"
    assert result["text"] == demo_engine.generate([fits])[0]["text"]
    long_prompt = {"prompt": "word " * SHORT, "max_new_tokens": 1}
    assert short_unsloth.generate([long_prompt])[0]["error"]["code"] == "prompt_too_long"
