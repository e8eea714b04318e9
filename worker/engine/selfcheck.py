"""Load-time self-check: before a worker takes any request, prove the batching invariants on
the exact model and tokenizer it loaded.

Checks: a pad token set and not an EOS id; left padding at call time; and a canary: prompts of
very different lengths generated greedily alone and in one left-padded batch must agree
(exactly in float32, on the first 16 tokens in half precision, which is not batch-invariant).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.engine.padding import check_pad_token

CANARY = [
    {"messages": [{"role": "user", "content": "Hi"}]},
    {"messages": [{"role": "system", "content": "You are a concise assistant."},
                  {"role": "user", "content": "Name three colours of the rainbow."}]},
    {"prompt": "The capital of France is"},
    {"messages": [{"role": "user", "content": (
        "Read this and answer in one sentence. A lighthouse keeper lived alone on a rocky "
        "island for thirty years. Every night he climbed the spiral stairs, trimmed the wick "
        "and polished the great lens, and every morning he wrote the weather in a small "
        "leather book. When the lamp was finally automated, he kept writing anyway. "
        "What did the keeper keep doing after the lamp was automated?")}]},
]
HALF_PRECISION_PREFIX = 16


class SelfCheckFailed(RuntimeError):
    """The loaded model/tokenizer would produce wrong batched output."""


@dataclass
class SelfCheckReport:
    """What the check found; ``ok`` only if there are no problems."""

    dtype: str
    pad_token: str | None
    rows: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"ok": self.ok, "dtype": self.dtype, "pad_token": self.pad_token,
                "canary_rows": self.rows, "problems": self.problems}


def self_check(engine, adapter: str | None = None, max_new_tokens: int = 24) -> SelfCheckReport:
    """Run the invariants and the canary on ``engine`` (and ``adapter``); never raises."""
    tok = engine.tokenizer
    report = SelfCheckReport(engine.dtype, tok.pad_token, len(CANARY))
    try:
        check_pad_token(tok, engine.model.config)
    except ValueError as exc:
        report.problems.append(str(exc))
    if engine.padding_side != "left":
        report.problems.append(f"padding side is {engine.padding_side!r} at call time, not 'left'")
    requests = [{**r, "max_new_tokens": max_new_tokens, **({"adapter": adapter} if adapter else {})}
                for r in CANARY]
    alone = [engine.generate([r])[0] for r in requests]
    together = engine.generate(requests)
    exact = engine.dtype == "float32"
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        if a["status"] != "succeeded" or b["status"] != "succeeded":
            report.problems.append(f"canary row {i} failed: {a.get('error') or b.get('error')}")
            continue
        left, right = a["text"], b["text"]
        if not exact:
            left = tok.encode(left, add_special_tokens=False)[:HALF_PRECISION_PREFIX]
            right = tok.encode(right, add_special_tokens=False)[:HALF_PRECISION_PREFIX]
        if left != right:
            report.problems.append(
                f"canary row {i}: batched output differs from the same prompt alone "
                f"({a['text'][:40]!r} vs {b['text'][:40]!r})")
    return report


def enforce(engine, mode: str, log) -> dict:
    """Run the check on the base model and each adapter; raise ``SelfCheckFailed`` in strict
    mode, log a warning in ``warn`` mode; return the report for ``/readyz``."""
    if mode == "off":
        return {"ok": None, "skipped": True}
    reports = {name or "base": self_check(engine, name) for name in [None, *engine.adapters]}
    problems = [f"{name}: {p}" for name, r in reports.items() for p in r.problems]
    summary = {"ok": not problems, "problems": problems,
               "checked": sorted(reports), "dtype": engine.dtype, "pad_token": engine.pad.token}
    if not problems:
        log.info("self_check_passed", **summary)
    elif mode == "warn":
        log.warning("self_check_failed", **summary)
    else:
        log.error("self_check_failed", **summary)
        raise SelfCheckFailed("self-check failed: " + "; ".join(problems))
    return summary
