"""The long-running services: ``genq worker``, ``genq notifier``, ``genq api`` and the whole
stack, ``genq up``."""

from __future__ import annotations

from typing import Annotated

import typer

from worker.cli.common import app, console


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
        port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000
        ) -> None:
    """Run the HTTP gateway alone."""
    from worker.api import serve

    serve(host, port)


@app.command()
def up(gpus: Annotated[str, typer.Option(help="'all', 'none' (CPU) or a list like 0,1.")] = "all",
       workers: Annotated[int, typer.Option(min=1, help="Workers per GPU (or on the CPU).")] = 1,
       port: Annotated[int, typer.Option(min=1, max=65535, help="Gateway port.")] = 8000,
       host: Annotated[str, typer.Option(
           help="Gateway address: this machine only by default; 0.0.0.0 for every interface."
       )] = "127.0.0.1",
       embedded_redis: Annotated[bool, typer.Option(
           "--embedded-redis", help="Start an embedded Redis even though GENQ_BROKER_URL is "
                                    "set (by default a GENQ_BROKER_URL that does not answer "
                                    "is an error).")] = False,
       redis_port: Annotated[int | None, typer.Option(
           min=1, max=65535, help="Port of the embedded Redis (default: a free one).")] = None,
       show_password: Annotated[bool, typer.Option(
           "--show-password", help="Print the embedded Redis's password in the export line "
                                   "(by default it is read from its file).")] = False,
       summary: Annotated[float, typer.Option(
           help="Seconds between queue summaries while it changes (0: none).")] = 30.0) -> None:
    """Run the whole stack here: Redis (GENQ_BROKER_URL, else embedded), workers, gateway."""
    from worker.up import run_stack

    raise typer.Exit(run_stack(gpus, host, port, console, workers, embedded=embedded_redis,
                               redis_port=redis_port, show_password=show_password,
                               summary_s=summary))

