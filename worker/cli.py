"""``genq``: the command line (typer + rich). Model libraries load only in the commands that
run a model (``worker``, ``generate``)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

app = typer.Typer(help="genqueue: batched LLM generation on a Celery/Redis queue.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
DEBUG = {"on": False}


@app.callback()
def _setup(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")]
           = False) -> None:
    from worker.ops.logging import configure_logging

    DEBUG["on"] = debug
    configure_logging(os.environ.get("GENQ_LOG_LEVEL", "WARNING"))


console = Console(stderr=True, soft_wrap=True)  # a long line stays one line in a log
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _client():
    from worker.client import GenerationClient

    return GenerationClient()


def _show(data: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(data, ensure_ascii=False))
        return
    table = Table(show_header=False)
    for key, value in data.items():
        table.add_row(key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    Console().print(table)


@contextmanager
def _errors():
    from worker.errors import GenqError, NotFound

    try:
        yield
    except NotFound as exc:
        console.print(f"[red]not found[/red]: {exc.message}")
        raise typer.Exit(2) from None
    except GenqError as exc:
        console.print(f"[red]{exc.code}[/red]: {exc.message}")
        raise typer.Exit(2) from None


def explain(exc: BaseException) -> str | None:
    """One or two lines for an expected failure (None: unexpected, show the traceback)."""
    import redis
    from kombu.exceptions import OperationalError
    from pydantic import ValidationError

    if isinstance(exc, ValidationError) and exc.title == "Settings":  # a GENQ_ setting
        return "\n".join(f"GENQ_{'_'.join(map(str, e['loc'])).upper()}: "
                         f"{str(e['msg']).removeprefix('Value error, ')}"
                         for e in exc.errors(include_input=False))
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OperationalError)):
        from worker.ops.settings import Settings

        url = Settings().masked()["broker_url"]
        return (f"cannot reach the broker at {url} (GENQ_BROKER_URL): {exc}\n"
                "start Redis (or `genq up`), or point GENQ_BROKER_URL at one")
    if isinstance(exc, redis.AuthenticationError | redis.ResponseError):
        return f"the broker refused: {exc}"
    if type(exc).__name__ == "ModelUnavailable":  # worker.engine.loading (not imported here)
        return str(exc)
    if isinstance(exc, OSError) and getattr(exc, "filename", None):
        return f"cannot read {exc.filename}: {exc.strerror or exc}"
    return None


def main() -> None:
    """The ``genq`` entry point: expected failures are one or two lines and exit code 2;
    ``genq --debug ...`` shows their traceback."""
    try:
        code = app(standalone_mode=False)
    except (typer.Abort, KeyboardInterrupt):
        console.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence of a command line tool
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # a usage error: click's message
            exc.show()
            sys.exit(exc.exit_code)
        message = explain(exc)
        if message is None or DEBUG["on"]:
            raise
        console.print(f"[red]error[/red]: {message}", highlight=False, soft_wrap=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


@app.command()
def worker(gpu: Annotated[str, typer.Option(help="GPU index to pin, or 'none' for CPU.")] = "none",
           name: Annotated[str | None, typer.Option(help="Worker name (default gpuN@host).")] = None,
           threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None) -> None:
    """Run one worker pinned to a GPU (or the CPU) in the foreground."""
    from worker.queue.worker import pin_device, run_worker

    try:
        pin_device(gpu)
    except ValueError as exc:
        console.print(f"[red]error[/red]: {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    raise typer.Exit(run_worker(gpu, name=name, threads=threads))


@app.command()
def notifier(name: Annotated[str | None, typer.Option(help="Worker name.")] = None) -> None:
    """Deliver webhooks (signed, retried with backoff) from the genq.webhooks queue."""
    from worker.queue.webhooks import run_notifier

    raise typer.Exit(run_notifier(name))


@app.command()
def api(host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000) -> None:
    """Run the HTTP gateway alone."""
    from worker.api import serve

    serve(host, port)


@app.command()
def up(gpus: Annotated[str, typer.Option(help="'all', 'none' (CPU) or a list like 0,1.")] = "all",
       workers: Annotated[int, typer.Option(min=1, help="Workers per GPU (or on the CPU).")] = 1,
       port: Annotated[int, typer.Option(help="Gateway port.")] = 8000,
       host: Annotated[str, typer.Option(
           help="Gateway address: this machine only by default; 0.0.0.0 for every interface."
       )] = "127.0.0.1",
       embedded_redis: Annotated[bool, typer.Option(
           "--embedded-redis", help="Start an embedded Redis even though GENQ_BROKER_URL is "
                                    "set (by default a GENQ_BROKER_URL that does not answer "
                                    "is an error).")] = False,
       redis_port: Annotated[int | None, typer.Option(
           help="Port of the embedded Redis (default: a free one).")] = None,
       show_password: Annotated[bool, typer.Option(
           "--show-password", help="Print the embedded Redis's password in the export line "
                                   "(by default it is read from its file).")] = False,
       summary: Annotated[float, typer.Option(
           help="Seconds between queue summaries while it changes (0: none).")] = 30.0) -> None:
    """Run the whole stack here: Redis (GENQ_BROKER_URL, else embedded), workers, gateway."""
    from worker.stack import run_stack

    raise typer.Exit(run_stack(gpus, host, port, console, workers, embedded=embedded_redis,
                               redis_port=redis_port, show_password=show_password,
                               summary_s=summary))


@app.command()
def submit(text: str,
           system: Annotated[str | None, typer.Option(help="System message.")] = None,
           max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 256,
           temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
           seed: Annotated[int | None, typer.Option(help="Seed of the sampling.")] = None,
           n: Annotated[int, typer.Option("-n", help="Samples to generate (1-16).")] = 1,
           json_schema: Annotated[Path | None, typer.Option(
               help="Constrain the output to the JSON schema in this file.")] = None,
           json_object: Annotated[bool, typer.Option(
               "--json-object", help="Constrain the output to a JSON object.")] = False,
           regex: Annotated[str | None, typer.Option(
               help="Constrain the output to match this regular expression.")] = None,
           logprobs: Annotated[int | None, typer.Option(
               help="Return each token's log-probability with this many candidates (0-20).")] = None,
           wait: Annotated[bool, typer.Option("--wait", help="Wait for the result.")] = False,
           as_json: JsonOpt = False) -> None:
    """Submit one chat request; print its id (or its result with --wait)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}]
    params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
              "n": n if n != 1 else None}
    with _errors():
        params["response_format"] = _response_format(json_schema, json_object, regex)
        if logprobs is not None:
            params.update(logprobs=True, top_logprobs=logprobs)
        client = _client()
        rid = client.submit(messages=messages, **params)
        if not wait:
            _show({"id": rid, "status": "queued"}, as_json)
            return
        result = client.wait(rid)
    if as_json:
        _show(result, True)
    elif result["status"] != "succeeded":
        typer.echo(json.dumps(result))
    else:
        texts = [c["text"] for c in result.get("choices") or [result]]
        typer.echo("\n---\n".join(texts))


def _response_format(json_schema: Path | None, json_object: bool, regex: str | None) -> dict | None:
    """``response_format`` from the submit options (at most one of them)."""
    from worker.errors import InvalidRequest

    if sum([json_schema is not None, json_object, regex is not None]) > 1:
        raise InvalidRequest("give one of --json-schema, --json-object and --regex")
    if json_schema is not None:
        try:
            schema = json.loads(json_schema.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidRequest(f"--json-schema: {json_schema} is not a readable JSON file "
                                 f"({exc})") from None
        name = re.sub(r"[^A-Za-z0-9_-]", "_", json_schema.stem)[:64] or "schema"
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
    if json_object:
        return {"type": "json_object"}
    return {"type": "regex", "pattern": regex} if regex is not None else None


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
        with _errors():
            res = _client().get(request_id)
        _show({"id": res["id"], "status": res["status"]}, as_json)
        return
    from worker.overview import build_overview

    client = _client()
    try:
        if as_json:  # with --watch: one JSON line per interval
            while True:
                typer.echo(json.dumps(build_overview(client), ensure_ascii=False))
                if not watch:
                    return
                time.sleep(interval)
        if not watch:
            Console().print(_overview_view(build_overview(client)))
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

    now = data["at"]
    workers = Table("name", "device", "model", "backend", "adapters", "running", "waiting",
                    "tokens/s", "heartbeat", "self-check",
                    title=f"Workers ({len(data['workers'])})", title_justify="left")
    for w in data["workers"]:
        check = w.get("self_check") or {}
        verdict = ("off" if check.get("skipped") else "passed" if check.get("ok")
                   else "FAILED" if check.get("ok") is False else "-")
        workers.add_row(w["name"], w.get("device") or "-", w.get("model") or "-",
                        w.get("backend") or "-", ", ".join(w["adapters"]) or "-",
                        str(w["running"]), str(w["waiting"]),
                        f"{w['tokens_per_s']:.1f}" if w.get("tokens_per_s") is not None else "-",
                        f"{_ago(w['heartbeat_age_s'])} ago", verdict)
    if not data["workers"]:
        workers.add_row("no worker alive", *[""] * 9)
    q = data["queues"]
    queues = Table("priority", "queued", "held by workers", "running", "oldest wait",
                   title="Queues", title_justify="left")
    for priority in ("interactive", "bulk"):
        p = q[priority]
        queues.add_row(priority, str(p["queued"]), str(p["held"]), str(p["running"]),
                       _ago(p["oldest_wait_s"]))
    owners = Table("owner", "not finished", "bulk queued", title="Owners", title_justify="left")
    for o in q.get("owners") or []:
        owners.add_row(o["owner"], str(o["pending"]), str(o["bulk_queued"]))
    jobs = Table("job", "status", "progress", "counts", "rate", "ETA", title="Jobs",
                 title_justify="left")
    for j in data["jobs"]:
        c = j["counts"]
        done = c["total"] - c["queued"] - c["running"]
        jobs.add_row(j["id"], j["status"], f"{_bar(j['progress'])} {done}/{c['total']}",
                     _job_counts(c), f"{j['rate']:.2f}/s" if j.get("rate") else "-",
                     _ago(j.get("eta_s")))
    batches = Table("batch", "status", "progress", "completed", "failed", "rate", "ETA",
                    title="Batches", title_justify="left")
    for b in data["batches"]:
        c = b.get("request_counts") or {"total": 0, "completed": 0, "failed": 0}
        batches.add_row(b["id"], b["status"],
                        f"{_bar(b['progress'])} {c['completed'] + c['failed']}/{c['total']}",
                        str(c["completed"]), str(c["failed"]),
                        f"{b['rate']:.2f}/s" if b.get("rate") else "-", _ago(b.get("eta_s")))
    failures = Table("when", "code", "message", "request", "job", "worker",
                     title="Recent failures", title_justify="left")
    for f in data["failures"]:
        failures.add_row(f"{_ago(now - f['at'])} ago", f.get("code") or "-",
                         escape((f.get("message") or "")[:120]), f["id"], f.get("job_id") or "-",
                         f.get("worker") or "-")
    parts = [workers, queues]
    if q.get("owners"):
        parts.append(owners)
    parts += [t for t, rows in ((jobs, data["jobs"]), (batches, data["batches"]),
                                (failures, data["failures"])) if rows]
    if not data["jobs"]:
        parts.append("[dim]no job[/dim]")
    return Group(*parts)


@app.command()
def jobs(limit: Annotated[int, typer.Option(min=1, max=100, help="Jobs per page.")] = 20,
         after: Annotated[str | None, typer.Option(
             help="Start after this job id (the last id of the page before).")] = None,
         as_json: JsonOpt = False) -> None:
    """List bulk jobs, newest first (as GET /v1/jobs pages them)."""
    from worker.overview import list_jobs

    page = list_jobs(_client(), after, limit)
    if as_json:
        typer.echo(json.dumps(page, ensure_ascii=False))
        return
    table = Table("job", "status", "progress", "counts", "created", "rate", "ETA")
    for j in page["data"]:
        c = j["counts"]
        done = c["total"] - c["queued"] - c["running"]
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["created"] or 0))
        table.add_row(j["id"], j["status"], f"{_bar(j['progress'], 12)} {done}/{c['total']}",
                      _job_counts(c), created, f"{j['rate']:.2f}/s" if j.get("rate") else "-",
                      _ago(j.get("eta_s")))
    Console().print(table)
    if page["has_more"]:
        console.print(f"more: genq jobs --after {page['last_id']}")


@app.command()
def result(request_id: str, as_json: JsonOpt = False) -> None:
    """Show a request's full result."""
    with _errors():
        _show(_client().get(request_id), as_json)


@app.command()
def cancel(request_id: str, as_json: JsonOpt = False) -> None:
    """Cancel a queued or running request."""
    with _errors():
        _show({"id": request_id, "cancelled": _client().cancel(request_id)}, as_json)


@app.command()
def job(job_id: str, as_json: JsonOpt = False) -> None:
    """Show a bulk job's status and counts."""
    with _errors():
        _show(_client().job(job_id), as_json)


@app.command()
def config(as_json: JsonOpt = False) -> None:
    """Print the effective settings (secrets masked)."""
    from worker.ops.settings import Settings

    _show(Settings().masked(), as_json)


@app.command()
def generate(input_path: Annotated[Path, typer.Argument(help="JSONL of requests.")],
             output: Annotated[Path | None, typer.Option("-o", "--output")] = None) -> None:
    """Run a JSONL file through the engine in this process (no queue)."""
    from worker.batchfile import read_lines
    from worker.engine import load_engine
    from worker.ops.settings import Settings

    settings = Settings()
    lines = list(read_lines(input_path.open(encoding="utf-8", errors="surrogateescape")))
    for bad in (ln for ln in lines if ln.error):
        console.print(f"[red]line {bad.number}[/red]: {escape(bad.error)}", highlight=False)
    from worker.queue.worker import _first_run
    from worker.stack import loading_text

    console.print(f"{loading_text({'model': settings.model, **_first_run(settings)})}...",
                  highlight=False)
    started = time.monotonic()
    engine = load_engine(settings.model, backend=settings.backend, dtype=settings.dtype,
                         adapters=settings.adapters, cache_dir=settings.cache_dir)
    console.print(f"ready in {time.monotonic() - started:.0f} s: {engine.model_name} on "
                  f"{engine.backend} ({engine.dtype})", highlight=False)
    good = [ln for ln in lines if ln.request]
    rate = MovingRate()
    with Progress(*_progress_columns(), console=console) as progress:
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


@app.command()
def run(input_path: Annotated[Path, typer.Argument(help="JSONL: requests or OpenAI Batch lines.")],
        output: Annotated[Path, typer.Option("-o", "--output", help="Results JSONL.")] = Path(
            "results.jsonl"),
        resume: Annotated[bool, typer.Option(
            help="Finish an earlier run into OUTPUT (interrupted or not): keep its finished "
                 "lines, pick up its requests still queued, run the rest.")] = False,
        timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds.")] = None,
        ) -> None:
    """Run a JSONL file as one bulk job with a progress bar; results in input order.
    Ctrl-C writes what has finished so far and says how to resume."""
    from worker.batchfile import read_lines
    from worker.errors import InvalidRequest
    from worker.ops.settings import Settings

    with _errors():  # the limits need no broker: a line over one never starts a stack
        lines = list(read_lines(input_path.open("rb"), Settings().max_new_tokens_limit))
    errors_path = output.with_name(output.name + ".errors")
    done: dict[int, dict] = {}
    if resume and output.exists():
        for raw in output.read_text(encoding="utf-8").splitlines():
            rec = json.loads(raw)
            if rec.get("status") in ("succeeded", "failed"):
                done[rec["line"]] = rec
    todo = [ln for ln in lines if ln.request and ln.number not in done]
    if not todo:
        _report_bad(lines, errors_path)
    run_id = _run_id(input_path, output, resume)
    for ln in todo:  # per-line keys: a line an earlier attempt of this run submitted is not redone
        body = json.dumps(ln.request, sort_keys=True).encode()
        ln.request["idempotency_key"] = (
            f"run:{run_id}:{ln.number}:{hashlib.sha256(body).hexdigest()[:16]}")
    if resume:
        console.print(f"resuming: {len(done)} finished line(s) kept from {output}, "
                      f"{len(todo)} to run (those already queued are picked up, not redone)")
    results: dict[int, dict] = dict(done)
    interrupted = False
    if todo:
        with _stack_for_run() as stack:
            client = _client()
            with _errors():
                for ln in todo:  # limits and prompt length, as the queue checks them
                    try:
                        client.validate(ln.request)
                    except InvalidRequest as exc:
                        ln.request, ln.error = None, exc.message
            _report_bad(lines, errors_path)
            todo = [ln for ln in todo if ln.request]
            try:
                results.update(_run_job(client, todo, timeout, stack) if todo else {})
            except _WorkerFailed as exc:
                console.print(f"[red]error[/red]: {exc}", highlight=False)
                stack["interrupted"] = True
                raise typer.Exit(2) from None
            except _Interrupted as stop:
                interrupted = stack["interrupted"] = True
                results.update(stop.results)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as f:
        for ln in lines:
            if ln.number in results:
                f.write(json.dumps(results[ln.number], ensure_ascii=False) + "\n")
    bad = [ln for ln in lines if ln.error]
    final = [r for r in results.values() if r["status"] in ("succeeded", "failed")]
    failed = sum(r["status"] == "failed" for r in final)
    if interrupted:
        console.print(f"interrupted: {len(final)} of {len(todo) + len(done)} line(s) finished and "
                      f"written to {output} (the rest are marked with their status); finish with:\n"
                      f"  genq run {input_path} -o {output} --resume")
        raise typer.Exit(130)
    console.print(f"{len(final) - failed} succeeded, {failed} failed, {len(bad)} bad lines "
                  f"({len(done)} kept from before) -> {output}")
    raise typer.Exit(1 if failed or bad else 0)


class _Interrupted(Exception):
    """Ctrl-C while a job ran: ``results`` holds every line, finished or not."""

    def __init__(self, results: dict[int, dict]):
        super().__init__("interrupted")
        self.results = results


def _run_id(input_path: Path, output: Path, resume: bool) -> str:
    """This run's id, kept next to OUTPUT (``OUTPUT.run``) so that ``--resume`` finds the
    requests an earlier run of the same input submitted, whether or not it passed --resume."""
    import uuid

    state = output.with_name(output.name + ".run")
    source = str(input_path.resolve())
    if resume and state.exists():
        saved = json.loads(state.read_text())
        if saved.get("input") == source:
            return saved["run"]
    run_id = uuid.uuid4().hex[:16]
    output.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"input": source, "run": run_id}))
    return run_id


def _report_bad(lines, errors_path: Path) -> None:
    """Print every bad line (by its line in the file) and write them to ``errors_path``."""
    bad = [ln for ln in lines if ln.error]
    if not bad:
        errors_path.unlink(missing_ok=True)
        return
    errors_path.parent.mkdir(parents=True, exist_ok=True)
    with errors_path.open("w", encoding="utf-8") as f:
        for ln in bad:
            console.print(f"[red]line {ln.number}[/red]: {escape(ln.error)}", highlight=False)
            f.write(json.dumps({"line": ln.number, "error": ln.error}) + "\n")
    console.print(f"{len(bad)} bad line(s) written to {errors_path}; the other lines run")


class MovingRate:
    """Requests per second over the last ``window_s`` seconds, stretched back (up to
    ``max_age_s``) until it spans at least ``min_items`` finished requests, so a slow run
    does not read 0 between two of them. The first sample is the baseline: a resumed run's
    lines finished before it started do not count as speed."""

    def __init__(self, window_s: float = 10.0, min_items: int = 3, max_age_s: float = 300.0):
        self.window_s, self.min_items, self.max_age_s = window_s, min_items, max_age_s
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, done: int, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        if self.samples and self.samples[-1][1] == done and len(self.samples) > 1 and (
                self.samples[-2][1] == done):
            self.samples[-1] = (now, done)  # nothing new: keep the deque short
        else:
            self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.max_age_s:
            self.samples.popleft()
        first_t, first_done = self.samples[0]
        if now - first_t < 1.0:
            return None  # not enough to say yet
        start_t, start_done = first_t, first_done
        for t, d in reversed(self.samples):
            if now - t >= self.window_s and done - d >= self.min_items:
                start_t, start_done = t, d
                break
        return (done - start_done) / (now - start_t)

    def fields(self, done: int, total: int, now: float | None = None) -> dict[str, str]:
        """``rate`` and ``eta`` for the progress bar."""
        rate = self.add(done, now)
        if rate is None:
            return {"rate": "-", "eta": "-"}
        shown = f"{rate:.1f}/s" if rate >= 1 else f"{rate * 60:.1f}/min"
        left = total - done
        if left <= 0:
            return {"rate": shown, "eta": "0:00:00"}
        if rate <= 0:
            return {"rate": shown, "eta": "-"}
        seconds = int(left / rate)
        return {"rate": shown, "eta": f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"}


def _progress_columns() -> list:
    return [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("failed {task.fields[failed]}"), TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}")]


class _WorkerFailed(Exception):
    """The embedded worker exited before it was ready; ``str()`` says why and what to do."""


def _run_job(client, todo, timeout, stack=None) -> dict[int, dict]:
    from worker.stack import Startup

    stack = stack or {}
    with _errors():
        job_id = client.submit_many([ln.request for ln in todo])
    console.print(f"job {job_id}: {len(todo)} requests", highlight=False)
    startup = Startup(client.store.redis, expect_worker=stack.get("proc") is not None)
    rate = MovingRate()
    try:
        with Progress(*_progress_columns(), console=console) as progress:
            task = progress.add_task("generating", total=len(todo), failed=0, rate="-", eta="-")

            def update(info):
                for line in startup.poll():
                    progress.console.print(line, highlight=False)
                _check_worker(stack, startup)
                c = info["counts"]
                finished = c["succeeded"] + c["failed"] + c["cancelled"] + c["expired"]
                waiting = startup.waiting() if finished < len(todo) else None
                progress.update(task, completed=finished, failed=c["failed"],
                                description=waiting or "generating",
                                **rate.fields(finished, len(todo)))

            client.wait_job(job_id, timeout=timeout, on_progress=update)
            for line in startup.poll(every_s=0):  # a short job can end between two polls
                progress.console.print(line, highlight=False)
    except KeyboardInterrupt:
        partial = {ln.number: {"line": ln.number, **res}
                   for ln, res in zip(todo, client.job_results(job_id), strict=True)}
        raise _Interrupted(partial) from None
    return {ln.number: {"line": ln.number, **res}
            for ln, res in zip(todo, client.job_results(job_id), strict=True)}


def _check_worker(stack: dict, startup) -> None:
    """Raise ``_WorkerFailed`` when the worker ``genq run`` started has exited."""
    proc = stack.get("proc")
    if proc is None or proc.poll() is None:
        return
    startup.poll(every_s=0)
    failure = next(iter(startup.failures.values()), None)
    if failure:
        raise _WorkerFailed("\n".join(failure))
    raise _WorkerFailed(f"the worker exited (code {proc.returncode}); its log says why: "
                        f"{stack.get('log')}")


@contextmanager
def _stack_for_run():
    """Use GENQ_BROKER_URL if it answers; else bring up Redis and a worker for the run. Set
    ``["interrupted"]`` on what it yields to stop the worker without waiting for its rows (they
    stay queued in the embedded Redis for ``--resume``)."""
    from worker.ops.logging import mask_secrets
    from worker.stack import (
        broker_problem,
        broker_refusal,
        data_dir,
        embedded_broker,
        spawn_worker,
        stop_process,
    )

    state = {"interrupted": False}
    configured = os.environ.get("GENQ_BROKER_URL")
    if configured:
        problem = broker_problem(configured)
        if problem is not None:
            console.print(f"[red]error[/red]: {broker_refusal(configured, problem)}",
                          highlight=False)
            raise typer.Exit(2)
        console.print(f"broker: {mask_secrets(configured)} (GENQ_BROKER_URL)", highlight=False)
        yield state
        return
    with embedded_broker() as server:
        log_file = data_dir() / "worker.log"
        console.print(f"embedded Redis on 127.0.0.1:{server.port} (data in {data_dir()}); "
                      f"worker log: {log_file}", highlight=False)
        proc = spawn_worker({"GENQ_BROKER_URL": server.url}, log_file=log_file)
        state.update(proc=proc, log=log_file)
        try:
            yield state
        finally:  # interrupted: the waiting requests are handed back at once, running rows
            stop_process(proc, grace_s=10 if state["interrupted"] else 60)  # come back later


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


if __name__ == "__main__":
    main()
