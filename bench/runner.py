"""``run_all``: run the chosen parts at full or ``--quick`` sizes, write results.json and plots.

Every figure that matters is a ratio of two runs made in the same invocation on the same
machine (these machines are noisy)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import machine, plot

Say = Callable[[str], None]


def _engine(cache_dir: Path, work: Path, quick: bool, say: Say) -> Any:
    from bench.throughput import bench_engine

    return bench_engine(cache_dir, [4, 8] if quick else [4, 8, 16, 32],
                        ["float32"] if quick else ["float32", "bfloat16"],
                        new_tokens=16 if quick else 64, n=8 if quick else 32, say=say)


def _padding(cache_dir: Path, work: Path, quick: bool, say: Say) -> Any:
    from bench.throughput import bench_padding

    return bench_padding(cache_dir, 16, [64, 256])


def _overhead(cache_dir: Path, work: Path, quick: bool, say: Say) -> Any:
    from bench.service_runs import bench_overhead

    res = bench_overhead(cache_dir, 32 if quick else 256, 8 if quick else 32, 32, work)
    for run in res["runs"]:
        say(f"queue overhead, pool {run['pool']}: service/direct = {run['ratio']:.2f}")
    return res


def _control(cache_dir: Path, work: Path, quick: bool, say: Say) -> Any:
    from bench.service_runs import bench_control_plane

    res = bench_control_plane(cache_dir, 200 if quick else 2000, 10 if quick else 50, work)
    say(f"control plane: {res['submit_per_s']:.0f} submitted/s")
    return res


def _scaling(cache_dir: Path, work: Path, quick: bool, say: Say) -> Any:
    from bench.service_runs import bench_scaling

    res = bench_scaling(cache_dir, 16 if quick else 96, 8 if quick else 32, work)
    say(f"scaling: two/one = {res['ratio']:.2f}")
    return res


def _mixed(cache_dir: Path, work: Path, quick: bool, say: Say) -> Any:
    from bench.schedulers import bench_mixed

    return (bench_mixed(cache_dir, [8], n=24, choices=(8, 16, 32), say=say) if quick
            else bench_mixed(cache_dir, [16, 32], say=say))


def _uniform(cache_dir: Path, work: Path, quick: bool, say: Say) -> Any:
    from bench.schedulers import bench_uniform

    return (bench_uniform(cache_dir, [8], n=16, new_tokens=16, say=say) if quick
            else bench_uniform(cache_dir, [16, 32], say=say))


def _interactive(cache_dir: Path, work: Path, quick: bool, say: Say) -> Any:
    from bench.interactive import bench_interactive

    return (bench_interactive(cache_dir, work, k=3, bulk_n=32, bulk_new_tokens=32, say=say)
            if quick else bench_interactive(cache_dir, work, say=say))


def _structured(cache_dir: Path, work: Path, quick: bool, say: Say) -> Any:
    from bench.structured import bench_structured

    return (bench_structured(cache_dir, batch=8, new_tokens=24, repeats=1, say=say) if quick
            else bench_structured(cache_dir, say=say))


def _backends(cache_dir: Path, work: Path, quick: bool, say: Say) -> Any:
    from bench.backends import bench_backends

    return bench_backends(cache_dir, work, quick, say)


def _startup(cache_dir: Path, work: Path, quick: bool, say: Say) -> Any:
    from bench.service_runs import bench_startup

    res = [bench_startup(cache_dir, work, backend) for backend in ("vllm", "unsloth")]
    for startup in res:
        say(f"worker ready ({startup['backend']}): " + ", ".join(
            f"{r['run']} {r['seconds']:.1f} s" for r in startup["runs"]))
    return res


PARTS: dict[str, Callable[[Path, Path, bool, Say], Any]] = {
    "engine": _engine, "padding": _padding, "overhead": _overhead, "control": _control,
    "scaling": _scaling, "mixed": _mixed, "uniform": _uniform, "interactive": _interactive,
    "structured": _structured, "backends": _backends, "startup": _startup}


def run_all(out: Path, cache_dir: Path, parts: list[str], quick: bool, say: Say) -> dict:
    """Run the chosen parts (in ``PARTS`` order); write results.json and plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "quick": quick}
    with tempfile.TemporaryDirectory() as tmp:
        for name, part in PARTS.items():
            if name in parts:
                results[name] = part(cache_dir, Path(tmp), quick, say)
    results["plots"] = plot(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results
