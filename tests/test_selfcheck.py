"""The load-time self-check catches a broken tokenizer or padding before any request."""

from __future__ import annotations

import pytest

from worker.engine.selfcheck import SelfCheckFailed, enforce, self_check

pytestmark = pytest.mark.slow


class Log:
    def __init__(self):
        self.events = []

    def info(self, event, **kw):
        self.events.append(("info", event, kw))

    warning = error = info


def test_healthy_model_passes(demo_engine):
    report = self_check(demo_engine)
    assert report.ok, report.problems
    assert report.rows >= 4 and report.pad_token == "<|endoftext|>"


def test_pad_equal_to_eos_is_named(demo_engine):
    tok = demo_engine.tokenizer
    good = tok.pad_token
    tok.pad_token = tok.eos_token  # the rule "disabled": what a naive loader leaves
    try:
        with pytest.raises(SelfCheckFailed, match=r"pad token <\|im_end\|> equals EOS"):
            enforce(demo_engine, "strict", Log())
        log = Log()
        summary = enforce(demo_engine, "warn", log)  # warn mode: reported, not raised
        assert summary["ok"] is False and log.events[0][1] == "self_check_failed"
    finally:
        tok.pad_token = good


def test_forced_right_padding_fails_the_canary(demo_engine):
    demo_engine.padding_side = "right"
    try:
        report = self_check(demo_engine)
    finally:
        demo_engine.padding_side = "left"
    assert any("padding side is 'right'" in p for p in report.problems)
    assert any("batched output differs" in p for p in report.problems), report.problems


def test_a_passed_canary_is_remembered_for_exactly_this_setup(demo_engine, tmp_path):
    import time

    first = enforce(demo_engine, "strict", Log(), cache_dir=tmp_path)
    assert first["ok"] and "cached" not in first
    t0 = time.perf_counter()
    again = enforce(demo_engine, "strict", Log(), cache_dir=tmp_path)
    assert again["ok"] and again["cached"] is True and time.perf_counter() - t0 < 2
    demo_engine.padding_side = "right"  # the rules are checked on every start, cached or not
    try:
        with pytest.raises(SelfCheckFailed, match="padding side"):
            enforce(demo_engine, "strict", Log(), cache_dir=tmp_path)
    finally:
        demo_engine.padding_side = "left"
    demo_engine.scheduler_mode = "static"  # anything the canary depends on: run it again
    try:
        other = enforce(demo_engine, "strict", Log(), cache_dir=tmp_path)
    finally:
        demo_engine.scheduler_mode = "continuous"
    assert other["ok"] and "cached" not in other
