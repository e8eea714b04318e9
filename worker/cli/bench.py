"""``genq bench``: run the benchmarks and print their figures beside the targets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from worker.cli.common import app, console


@app.command()
def bench(out: Annotated[Path, typer.Option(help="Folder for results.json and PNGs.")] = Path(
              "bench/results"),
          parts: Annotated[str, typer.Option(help="Comma list of parts to run.")] = (
              "engine,padding,overhead,control,scaling,mixed,uniform,interactive,structured,backends,"
              "startup"),
          quick: Annotated[bool, typer.Option(help="Small sizes, for a smoke run.")] = False) -> None:
    """Run the benchmarks; print a table, write JSON and plots."""
    from worker.ops.settings import Settings

    run_all = _bench_runner()
    chosen = [p.strip() for p in parts.split(",") if p.strip()]
    results = run_all(out, Settings().cache_dir, chosen, quick, say=console.print)
    table = Table("measure", "figure", "target")
    for row in results.get("engine", []):
        table.add_row(f"engine {row['dtype']} batch {row['batch']}",
                      f"{row['tok_s']:.1f} tok/s ({row['vs_fp32_alone']:.1f}x fp32 alone)",
                      ">= 7x at best" if row["batch"] > 1 else "")
    for row in results.get("padding", []):
        table.add_row(f"pad fraction, batch {row['batch']}, {row['pending']} pending",
                      f"arrival {row['arrival_pad']:.1%} -> genqueue {row['genqueue_pad']:.1%}",
                      "< 10%")
    if "overhead" in results:
        o = results["overhead"]
        for run in o["runs"]:
            table.add_row(f"service vs engine, {o['requests']} requests, pool {run['pool']}",
                          f"{run['ratio']:.1%} ({run['identical_texts']}/{o['requests']} identical)",
                          ">= 90%")
    if "control" in results:
        c = results["control"]
        table.add_row("submit rate", f"{c['submit_per_s']:.0f}/s", ">= 1000/s")
        table.add_row("submit to stored", f"{c['completed_per_s']:.0f}/s", ">= 500/s")
        table.add_row("added latency p50 / p99",
                      f"{c['added_ms_p50']:.1f} / {c['added_ms_p99']:.1f} ms", "< wait + 30 ms")
    if "scaling" in results:
        s = results["scaling"]
        table.add_row("two workers vs one", f"{s['ratio']:.2f}x", ">= 1.8x")
    for part in ("mixed", "uniform"):
        _scheduler_rows(table, part, results.get(part))
    if "interactive" in results:
        _interactive_rows(table, results["interactive"])
    if "structured" in results:
        st = results["structured"]
        for run in st["runs"]:
            table.add_row(f"batch {st['batch']}, {run['kind']}, {run['run']}",
                          f"{run['tok_s']:.1f} tok/s ({run['vs_unconstrained']:.2f}x), masks "
                          f"{run['mask_share']:.1%} of the time", "")
        ms = st["compile_ms"]
        table.add_row("grammar compile per schema (median)",
                      f"{ms['uncached_median']:.2f} ms; cached {ms['cached_median']:.3f} ms", "")
    if "backends" in results:
        _backend_rows(table, results["backends"])
    for startup in results.get("startup", []):
        for run in startup["runs"]:
            table.add_row(f"worker time to ready ({startup['backend']}), {run['run']}",
                          f"{run['seconds']:.1f} s", "<= 30 s" if run["self_check"] != "off" else "")
    Console().print(table)
    console.print(f"results: {out / 'results.json'}")


def _bench_runner():
    """The harness's ``run_all`` (the ``bench`` package of a source checkout, imported here so
    the runtime never loads it); exit 2 with one line where it cannot be imported."""
    try:
        from bench.runner import run_all
    except ModuleNotFoundError as exc:
        if exc.name not in ("bench", "bench.runner"):
            raise
        console.print("[red]error[/red]: genq bench needs the `bench` package of a genqueue "
                      "source checkout: run it from the checkout (or `pip install -e .` there)")
        raise typer.Exit(2) from None
    return run_all


def _backend_rows(table: Table, res: dict) -> None:
    """Rows of ``--parts backends``: vLLM beside the step loop."""
    for row in res["engine"]:
        table.add_row(f"engine, 64 prompts x {row['new_tokens']} tokens, batch {row['batch']}: "
                      "vLLM vs step loop",
                      f"{row['ratio']:.2f}x ({row['vllm_tok_s']:.1f} vs {row['step_loop_tok_s']:.1f}"
                      f" tok/s), {row['identical_texts']}/64 identical", ">= 2x")
    m = res["mixed"]
    table.add_row(f"mixed, {m['requests']} requests, batch {m['batch']}: vLLM vs step loop",
                  f"{m['ratio']:.2f}x ({m['vllm_tok_s']:.1f} vs {m['step_loop_tok_s']:.1f} tok/s), "
                  f"{m['identical_texts']}/{m['requests']} identical", "")
    q = res["queue"]
    table.add_row(f"vLLM through the queue vs offline LLM.generate, {q['requests']} requests, "
                  "engine core in-process / vLLM's default",
                  f"{q['ratio']:.1%} / {q['ratio_offline']:.1%} ({q['queue_tok_s']:.1f} vs "
                  f"{q['offline_inprocess_tok_s']:.1f} / {q['offline_tok_s']:.1f} tok/s)", ">= 90%")
    p = res["prefix"]
    table.add_row(f"prefix caching on vs off, {p['requests']} x {p['prompt_tokens']} prompt tokens",
                  f"{p['speedup']:.2f}x ({p['seconds_on']:.1f} vs {p['seconds_off']:.1f} s)", "")
    i = res["interactive"]
    table.add_row("interactive under bulk vs idle (vLLM), p99",
                  f"{i['p99_ratio']:.2f}x ({i['loaded_p99']:.2f} vs {i['idle_p99']:.2f} s)", "<= 2x")


def _scheduler_rows(table: Table, part: str, res: dict | None) -> None:
    """Rows of a continuous-vs-static engine run (``mixed`` or ``uniform``)."""
    if not res:
        return
    n = res["requests"]
    what = (f"{part}, {n} requests" if part == "mixed"
            else f"{part}, {n} x {res['prompt_tokens']}+{res['new_tokens']} tokens")
    for row in res["rows"]:
        s, c = row["static"], row["continuous"]
        table.add_row(f"{what}, batch {row['batch']}: continuous vs static",
                      f"{row['ratio']:.2f}x ({c['tok_s']:.1f} vs {s['tok_s']:.1f} tok/s)",
                      ">= 0.9x" if part == "uniform" else "")
        table.add_row(f"{part}, batch {row['batch']}: useful row-steps cont. / static",
                      f"{c['useful']:.0%} / {s['useful']:.0%} ({c['steps']} / {s['steps']} steps)",
                      "")
        table.add_row(f"{part}, batch {row['batch']}: texts identical across schedulers",
                      f"{row['identical_texts']}/{n}", f"{n}/{n}")
        if part == "uniform":
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["finish_reasons"].items()))
            table.add_row(f"{part}, batch {row['batch']}: finish reasons (static run)", reasons,
                          f"length {n}")


def _interactive_rows(table: Table, res: dict) -> None:
    """Rows of the interactive-under-bulk-load run, per scheduler."""
    k = res["k"]
    for m in res["modes"]:
        mode = m["mode"]
        table.add_row(f"interactive ({k}), {mode}: idle p50 / p99",
                      f"{m['idle_p50']:.2f} / {m['idle_p99']:.2f} s", "")
        table.add_row(f"interactive ({k}), {mode}: under bulk load p50 / p99",
                      f"{m['loaded_p50']:.2f} / {m['loaded_p99']:.2f} s "
                      f"({m['under_load']}/{k} while bulk ran)", "")
        table.add_row(f"interactive, {mode}: loaded / idle, p50 / p99",
                      f"{m['p50_ratio']:.2f}x / {m['p99_ratio']:.2f}x",
                      "<= 2x / <= 2x" if mode == "continuous" else "")
        table.add_row(f"bulk job, {res['bulk_requests']} x {res['bulk_new_tokens']} tokens, {mode}",
                      f"{m['bulk_s']:.1f} s ({m['bulk_tok_s']:.1f} tok/s)", "")

