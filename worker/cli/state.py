"""Reading state: ``genq status`` (a request, or the overview of the queue), ``jobs``,
``workers``, ``result``, ``cancel``, ``job`` and ``config``."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from worker.cli.common import (
    JsonOpt,
    app,
    console,
    errors,
    get_client,
    id_column,
    out_console,
    show,
)


@app.command()
def status(request_id: Annotated[str | None, typer.Argument(
               help="A request id: show its status. None: the overview of the queue.")] = None,
           as_json: JsonOpt = False,
           watch: Annotated[bool, typer.Option("--watch", help="Redraw the overview until "
                                                               "Ctrl-C.")] = False,
           interval: Annotated[float, typer.Option(min=0.2, help="Seconds between redraws "
                                                                  "with --watch.")] = 2.0) -> None:
    """Show a request's status; with no id, the overview the status page shows: workers,
    queues, jobs, batches, recent failures."""
    if request_id is not None:
        with errors():
            res = get_client().get(request_id)
        show({"id": res["id"], "status": res["status"]}, as_json)
        return
    from worker.overview import build_overview

    client = get_client()
    try:
        if as_json:  # with --watch: one JSON line per interval
            while True:
                typer.echo(json.dumps(build_overview(client), ensure_ascii=False))
                if not watch:
                    return
                time.sleep(interval)
        if not watch:
            out_console().print(_overview_view(build_overview(client)))
            return
        from rich.live import Live

        with Live(_overview_view(build_overview(client)), console=Console(),
                  refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(_overview_view(build_overview(client)))
    except KeyboardInterrupt:
        return


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _bar(fraction: float, width: int = 20) -> str:
    filled = round(max(0.0, min(1.0, fraction or 0.0)) * width)
    return "█" * filled + "░" * (width - filled)


def _job_counts(c: dict) -> str:
    return ", ".join(f"{c[k]} {k}" for k in ("succeeded", "failed", "running", "queued",
                                             "cancelled", "expired") if c.get(k))


def _overview_view(data: dict):
    """The overview as rich tables (``genq status``)."""
    from rich.console import Group

    q = data["queues"]
    parts = [_workers_table(data["workers"]), _queues_table(q)]
    if q.get("owners"):
        parts.append(_owners_table(q["owners"]))
    parts += [table for table, rows in (
        (_jobs_table(data["jobs"]), data["jobs"]), (_batches_table(data["batches"]), data["batches"]),
        (_failures_table(data["failures"], data["at"]), data["failures"])) if rows]
    if not data["jobs"]:
        parts.append("[dim]no job[/dim]")
    return Group(*parts)


def _workers_table(rows: list[dict]) -> Table:
    workers = Table(id_column("name"), "device", id_column("model"), "backend",
                    id_column("adapters"), "running", "waiting", "tokens/s", "heartbeat",
                    "self-check",
                    title=f"Workers ({len(rows)})", title_justify="left")
    for w in rows:
        check = w.get("self_check") or {}
        verdict = ("off" if check.get("skipped") else "passed" if check.get("ok")
                   else "FAILED" if check.get("ok") is False else "-")
        workers.add_row(w["name"], w.get("device") or "-", w.get("model") or "-",
                        w.get("backend") or "-", ", ".join(w["adapters"]) or "-",
                        str(w["running"]), str(w["waiting"]),
                        f"{w['tokens_per_s']:.1f}" if w.get("tokens_per_s") is not None else "-",
                        f"{_ago(w['heartbeat_age_s'])} ago", verdict)
    if not rows:
        workers.add_row("no worker alive", *[""] * 9)
    return workers


def _queues_table(q: dict) -> Table:
    queues = Table("priority", "queued", "held by workers", "running", "oldest wait",
                   title="Queues", title_justify="left")
    for priority in ("interactive", "bulk"):
        p = q[priority]
        queues.add_row(priority, str(p["queued"]), str(p["held"]), str(p["running"]),
                       _ago(p["oldest_wait_s"]))
    return queues


def _owners_table(rows: list[dict]) -> Table:
    owners = Table(id_column("owner"), "not finished", "bulk queued", title="Owners", title_justify="left")
    for o in rows:
        owners.add_row(o["owner"], str(o["pending"]), str(o["bulk_queued"]))
    return owners


def _jobs_table(rows: list[dict]) -> Table:
    jobs = Table(id_column("job"), "status", "progress", "counts", "rate", "ETA", title="Jobs",
                 title_justify="left")
    for j in rows:
        c = j["counts"]
        done = c["total"] - c["queued"] - c["running"]
        jobs.add_row(j["id"], j["status"], f"{_bar(j['progress'])} {done}/{c['total']}",
                     _job_counts(c), f"{j['rate']:.2f}/s" if j.get("rate") else "-",
                     _ago(j.get("eta_s")))
    return jobs


def _batches_table(rows: list[dict]) -> Table:
    batches = Table(id_column("batch"), "status", "progress", "completed", "failed", "rate", "ETA",
                    title="Batches", title_justify="left")
    for b in rows:
        c = b.get("request_counts") or {"total": 0, "completed": 0, "failed": 0}
        batches.add_row(b["id"], b["status"],
                        f"{_bar(b['progress'])} {c['completed'] + c['failed']}/{c['total']}",
                        str(c["completed"]), str(c["failed"]),
                        f"{b['rate']:.2f}/s" if b.get("rate") else "-", _ago(b.get("eta_s")))
    return batches


def _failures_table(rows: list[dict], now: float) -> Table:
    failures = Table("when", "code", "message", id_column("request"), id_column("job"),
                     id_column("worker"),
                     title="Recent failures", title_justify="left")
    for f in rows:
        failures.add_row(f"{_ago(now - f['at'])} ago", f.get("code") or "-",
                         escape((f.get("message") or "")[:120]), f["id"], f.get("job_id") or "-",
                         f.get("worker") or "-")
    return failures


@app.command()
def jobs(limit: Annotated[int, typer.Option(min=1, max=100, help="Jobs per page.")] = 20,
         after: Annotated[str | None, typer.Option(
             help="Start after this job id (the last id of the page before).")] = None,
         as_json: JsonOpt = False) -> None:
    """List bulk jobs, newest first (as GET /v1/jobs pages them)."""
    from worker.overview import list_jobs

    page = list_jobs(get_client(), after, limit)
    if as_json:
        typer.echo(json.dumps(page, ensure_ascii=False))
        return
    table = Table(id_column("job"), "status", "progress", "counts", "created", "rate", "ETA")
    for j in page["data"]:
        c = j["counts"]
        done = c["total"] - c["queued"] - c["running"]
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["created"] or 0))
        table.add_row(j["id"], j["status"], f"{_bar(j['progress'], 12)} {done}/{c['total']}",
                      _job_counts(c), created, f"{j['rate']:.2f}/s" if j.get("rate") else "-",
                      _ago(j.get("eta_s")))
    out_console().print(table)
    if page["has_more"]:
        console.print(f"more: genq jobs --after {page['last_id']}")


@app.command()
def workers(as_json: JsonOpt = False) -> None:
    """List the live workers: name, device, model, backend, adapters, rows, tokens/s, last
    heartbeat and self-check (the first table of ``genq status``)."""
    from worker.overview import build_overview

    rows = build_overview(get_client())["workers"]
    if as_json:
        typer.echo(json.dumps(rows, ensure_ascii=False))
        return
    out_console().print(_workers_table(rows))


@app.command()
def result(request_id: str, as_json: JsonOpt = False) -> None:
    """Show a request's full result."""
    with errors():
        show(get_client().get(request_id), as_json)


@app.command()
def cancel(request_id: str, as_json: JsonOpt = False) -> None:
    """Cancel a queued or running request."""
    with errors():
        show({"id": request_id, "cancelled": get_client().cancel(request_id)}, as_json)


@app.command()
def job(job_id: str, as_json: JsonOpt = False) -> None:
    """Show a bulk job's status and counts."""
    with errors():
        show(get_client().job(job_id), as_json)


@app.command()
def config(as_json: JsonOpt = False) -> None:
    """Print the effective settings (secrets masked)."""
    from worker.ops.settings import Settings

    show(Settings().masked(), as_json)

