"""``genq run``: a JSONL file as one bulk job on the queue (its own embedded stack when no
broker is configured), a progress bar, results in input order, ``--resume``."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import Progress

from worker.cli.common import app, console, errors, get_client
from worker.cli.progress import MovingRate, progress_columns


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
    from worker.submission.checker import Checker, check_lines
    from worker.submission.lines import read_lines

    with errors():  # the limits need no broker: a line over one never starts a stack
        lines = list(check_lines(read_lines(input_path.open("rb")), Checker().schema))
    errors_path = output.with_name(output.name + ".errors")
    done = _finished_before(output) if resume else {}
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
            client = get_client()
            _admit(client, todo)
            _report_bad(lines, errors_path)
            todo = [ln for ln in todo if ln.request]
            try:
                results.update(_run_job(client, todo, timeout, stack) if todo else {})
            except _WorkerFailed as exc:
                if str(exc):  # else the worker's own failure was printed as it came
                    console.print(f"[red]error[/red]: {exc}", highlight=False)
                stack["interrupted"] = True
                raise typer.Exit(2) from None
            except _Interrupted as stop:
                interrupted = stack["interrupted"] = True
                results.update(stop.results)
    _write_results(output, lines, results)
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


def _finished_before(output: Path) -> dict[int, dict]:
    """The lines an earlier run finished into ``output`` (succeeded or failed), by number."""
    done: dict[int, dict] = {}
    if output.exists():
        for raw in output.read_text(encoding="utf-8").splitlines():
            rec = json.loads(raw)
            if rec.get("status") in ("succeeded", "failed"):
                done[rec["line"]] = rec
    return done


def _write_results(output: Path, lines, results: dict[int, dict]) -> None:
    """Every line that has a result, in input order."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as f:
        for ln in lines:
            if ln.number in results:
                f.write(json.dumps(results[ln.number], ensure_ascii=False) + "\n")


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

class _WorkerFailed(Exception):
    """The embedded worker exited before it was ready; ``str()`` says why and what to do
    (empty when the worker's own note, already printed, did)."""


def _admit(client, todo) -> None:
    """What the fleet allows of each checked line, and its prompt's tokens as the queue
    counts them (once the broker answers); a line refused gets its error instead."""
    from worker.errors import InvalidRequest
    from worker.submission.checker import Checker

    with errors():
        admit = Checker(client).admit
        for ln in todo:
            try:
                ln.request = admit(ln.request)
            except InvalidRequest as exc:
                ln.request, ln.error = None, exc.message


def _run_job(client, todo, timeout, stack=None) -> dict[int, dict]:
    from worker.startup import Startup
    from worker.submission.jobs import enqueue_job

    stack = stack or {}
    with errors():  # checked already: queued as they are
        job_id = enqueue_job(client, [[ln.request for ln in todo]], len(todo), "bulk")
    console.print(f"job {job_id}: {len(todo)} requests", highlight=False)
    startup = Startup(client.store.redis, expect_worker=stack.get("proc") is not None)
    rate = MovingRate()
    try:
        with Progress(*progress_columns(), console=console) as progress:
            task = progress.add_task("generating", total=len(todo), failed=0, rate="-", eta="-")

            def update(info):
                for line in startup.poll():
                    progress.console.print(line, highlight=False)
                _check_worker(stack, startup, progress.console.print)
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


def _check_worker(stack: dict, startup, say) -> None:
    """Raise ``_WorkerFailed`` when the worker ``genq run`` started has exited; the reason it
    noted (said once, through ``say``, as every startup line) or where its log is."""
    proc = stack.get("proc")
    if proc is None or proc.poll() is None:
        return
    for line in startup.poll(every_s=0):
        say(line, highlight=False)
    if startup.failures:
        raise _WorkerFailed
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

