"""The model sees only what was asked: a checkpoint's generation_config.json (penalties,
sampling, suppressed tokens, minimum lengths) changes nothing the engine or ``model.generate``
on the engine's model computes; each request's own settings apply exactly.

The tiny random-weight model greedily repeats its last prompt token, so a repetition penalty
or ``no_repeat_ngram_size`` would change its text, and its saved config suppresses the first
greedy token of one prompt and lists the first greedy token of another as an extra EOS (kept:
token ids are not sampling settings) that ``min_new_tokens`` would hold back.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from structlog.testing import capture_logs

from tests.conftest import tiny_llama

PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,", "Hello there, my old"]
NEW_TOKENS = 10
CHECKPOINT = {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "min_new_tokens": 8,
              "min_length": 12, "do_sample": True, "temperature": 0.7, "top_k": 5}


def greedy(model, ids: list[int], new_tokens: int, eos: set[int], penalty: float = 1.0) -> list[int]:
    """Plain forward passes over the whole sequence, argmax of the last logits; ``penalty`` as
    transformers' RepetitionPenaltyLogitsProcessor applies it over prompt and output."""
    out: list[int] = []
    with torch.inference_mode():
        while len(out) < new_tokens:
            seen = torch.tensor([ids + out])
            scores = model(input_ids=seen).logits[:, -1, :].float()
            if penalty != 1.0:
                picked = torch.gather(scores, 1, seen)
                picked = torch.where(picked < 0, picked * penalty, picked / penalty)
                scores = scores.scatter(1, seen, picked)
            out.append(int(scores.argmax()))
            if out[-1] in eos:
                break
    return out


@pytest.fixture(scope="module")
def opinionated_dir(tmp_path_factory, cache_dir):
    """A 2-layer random-weight Llama whose generation_config.json asks for penalties,
    sampling, suppressed tokens and a minimum length."""
    from transformers import AutoTokenizer, GenerationConfig

    from worker.engine.demo import demo_model_dir

    out = tmp_path_factory.mktemp("opinionated-llama")
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir(cache_dir))
    model = tiny_llama(tokenizer).eval()
    first = [greedy(model, tokenizer(p)["input_ids"], 1, set())[0] for p in PROMPTS]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.eos_token_id,
        eos_token_id=[tokenizer.eos_token_id, first[3]], suppress_tokens=[first[1]], **CHECKPOINT)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def loaded(opinionated_dir, cache_dir):
    """(engine, what it logged while loading)."""
    import logging

    import structlog

    from worker.engine import load_engine

    saved = structlog.get_config()  # an earlier test may have set the CLI's WARNING level
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with capture_logs() as logs:
            engine = load_engine(str(opinionated_dir), backend="transformers", dtype="float32",
                                 cache_dir=cache_dir)
    finally:
        structlog.configure(**saved)
    return engine, logs


@pytest.fixture(scope="module")
def engine(loaded):
    return loaded[0]


def reference(engine, prompt: str, penalty: float = 1.0) -> tuple[list[int], str]:
    """(tokens, text) of the hand-written greedy loop on the engine's weights."""
    ids = engine.sequence({"prompt": prompt}).prompt_ids
    tokens = greedy(engine.model, ids, NEW_TOKENS, set(engine.eos_ids), penalty)
    return tokens, engine.tokenizer.decode(tokens, skip_special_tokens=True,
                                           clean_up_tokenization_spaces=False)


def test_the_checkpoint_settings_would_change_the_output(engine, opinionated_dir):
    """Preconditions: every prompt's greedy text repeats a bigram or hits a suppressed or
    early EOS token, so applying the checkpoint's config could not go unnoticed."""
    from transformers import GenerationConfig

    saved = GenerationConfig.from_pretrained(opinionated_dir)
    refs = [reference(engine, p)[0] for p in PROMPTS]
    assert refs[1][0] in saved.suppress_tokens
    assert refs[3] == [refs[3][0]] and refs[3][0] in saved.eos_token_id
    assert len(refs[3]) < saved.min_new_tokens
    assert all(len(set(pairwise(r))) < len(r) - 1 for r in (refs[0], refs[2]))  # repeats


def test_greedy_rows_are_plain_argmax_alone_and_batched(engine):
    requests = [{"prompt": p, "max_new_tokens": NEW_TOKENS} for p in PROMPTS]
    together = engine.generate(requests)
    for request, batched in zip(requests, together, strict=True):
        tokens, text = reference(engine, request["prompt"])
        alone = engine.generate([request])[0]
        for result in (alone, batched):
            assert result["status"] == "succeeded"
            assert result["text"] == text
            assert result["usage"]["completion_tokens"] == len(tokens)
    assert together[3]["finish_reason"] == "stop"  # the kept extra EOS, at once


def test_model_generate_on_the_engine_model_is_greedy(engine):
    """Nothing on the loaded model keeps the checkpoint's defaults (``generate`` merges a
    given config with ``model.generation_config``, so that must be neutral)."""
    for prompt in PROMPTS:
        tokens, _ = reference(engine, prompt)
        ids = torch.tensor([engine.sequence({"prompt": prompt}).prompt_ids])
        with torch.inference_mode():
            out = engine.model.generate(ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=NEW_TOKENS)
        assert out[0, ids.shape[1]:].tolist()[:len(tokens)] == tokens


def test_the_load_logs_what_was_dropped(loaded, opinionated_dir):
    from transformers import GenerationConfig

    engine, logs = loaded
    suppressed = GenerationConfig.from_pretrained(opinionated_dir).suppress_tokens
    events = [e for e in logs if e["event"] == "generation_config_neutralised"]
    assert len(events) == 1
    assert events[0]["dropped"] == {**CHECKPOINT, "suppress_tokens": suppressed}
    kept = engine.model.generation_config.to_diff_dict()
    assert set(kept) - {"transformers_version"} == {"bos_token_id", "eos_token_id", "pad_token_id"}


def test_an_explicit_repetition_penalty_is_applied_exactly(engine):
    requests = [{"prompt": p, "max_new_tokens": NEW_TOKENS, "repetition_penalty": 1.3}
                for p in PROMPTS]
    together = engine.generate(requests)
    changed = 0
    for request, batched in zip(requests, together, strict=True):
        tokens, text = reference(engine, request["prompt"], penalty=1.3)
        plain_tokens, _ = reference(engine, request["prompt"])
        changed += tokens != plain_tokens
        for result in (engine.generate([request])[0], batched):
            assert result["text"] == text
            assert result["usage"]["completion_tokens"] == len(tokens)
    assert changed >= 2


@pytest.mark.parametrize("settings", [
    {"temperature": 5e-324},  # below GREEDY_BELOW: greedy, its limit
    {"temperature": 1e-6, "logprobs": True, "top_logprobs": 3},
    {"temperature": 1.0, "repetition_penalty": 1e-300, "logprobs": True},  # overflows a logit
    {"temperature": 1e-5, "repetition_penalty": 1e-30, "top_p": 1e-9, "seed": 3},
])
def test_extreme_sampling_settings_pick_a_token_and_finite_logprobs(settings):
    """Settings the schema accepts at their limits never make the distribution NaN (which
    made ``torch.multinomial`` raise inside the step loop and took the worker down)."""
    import math

    from worker.engine.sampling import RowSampler
    from worker.schema import GREEDY_BELOW, GenerationRequest

    request = GenerationRequest(prompt="x", **settings)
    logits = torch.linspace(-20.0, 30.0, 500)
    logits[7] = 40.0  # the argmax
    sampler = RowSampler(request)
    token, logprob = sampler.pick(logits.clone(), history=[7, 11, 499])
    assert 0 <= token < 500
    if request.temperature < GREEDY_BELOW:
        assert not request.samples and token == 7
    if logprob is not None:
        assert math.isfinite(logprob[0]) and all(math.isfinite(v) for _, v in logprob[1])


def test_a_vanishing_temperature_decodes_greedily_beside_its_batch_mates(engine):
    """In a real step-loop batch: temperature 5e-324 is greedy; a tiny penalty samples and
    ends; the greedy batch-mate is untouched."""
    plain = {"prompt": PROMPTS[0], "max_new_tokens": NEW_TOKENS}
    results = engine.generate([{**plain, "temperature": 5e-324}, plain,
                               {**plain, "temperature": 1.0, "repetition_penalty": 1e-300,
                                "seed": 1}])
    assert [r["status"] for r in results] == ["succeeded"] * 3
    assert results[0]["text"] == results[1]["text"] == reference(engine, PROMPTS[0])[1]
