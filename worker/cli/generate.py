"""``genq generate``: a JSONL file through the engine in this process, no queue."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import Progress

from worker.cli.common import app, console
from worker.cli.progress import MovingRate, progress_columns


@app.command()
def generate(input_path: Annotated[Path, typer.Argument(help="JSONL of requests.")],
             output: Annotated[Path | None, typer.Option("-o", "--output")] = None) -> None:
    """Run a JSONL file through the engine in this process (no queue)."""
    from worker.engine import load_engine
    from worker.ops.settings import Settings
    from worker.submission.checker import Checker, check_lines
    from worker.submission.lines import read_lines

    settings = Settings()
    lines = list(check_lines(read_lines(input_path.open("rb")),
                             Checker(settings=settings).schema))
    for bad in (ln for ln in lines if ln.error):
        console.print(f"[red]line {bad.number}[/red]: {escape(bad.error)}", highlight=False)
    from worker.queue.worker import _first_run
    from worker.startup import loading_text

    console.print(f"{loading_text({'model': settings.model, **_first_run(settings)})}...",
                  highlight=False)
    started = time.monotonic()
    engine = load_engine(settings.model, backend=settings.backend, dtype=settings.dtype,
                         adapters=settings.adapters, cache_dir=settings.cache_dir)
    console.print(f"ready in {time.monotonic() - started:.0f} s: {engine.model_name} on "
                  f"{engine.backend} ({engine.dtype})", highlight=False)
    good = [ln for ln in lines if ln.request]
    rate = MovingRate()
    with Progress(*progress_columns(), console=console) as progress:
        task = progress.add_task("generating", total=len(good), failed=0, rate="-", eta="-")

        def update(done: int) -> None:
            progress.update(task, completed=done, **rate.fields(done, len(good)))

        results = engine.generate([ln.request for ln in good], on_finished=update)
    out = output.open("w", encoding="utf-8") if output else sys.stdout
    for ln, res in zip(good, results, strict=True):
        out.write(json.dumps({"line": ln.number, **res}, ensure_ascii=False) + "\n")
    if output:
        out.close()
    failed = sum(r["status"] != "succeeded" for r in results) + sum(1 for ln in lines if ln.error)
    raise typer.Exit(1 if failed else 0)

