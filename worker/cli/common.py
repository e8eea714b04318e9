"""What every ``genq`` command shares: the Typer app, the stderr console, ``--json``, the
client, printing a record, and expected errors as one line."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
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


def get_client():
    """A client of the queue (importing it loads no model library)."""
    from worker.client import GenerationClient

    return GenerationClient()


def show(data: dict, as_json: bool) -> None:
    """Print ``data`` as one JSON line or as a two-column table."""
    if as_json:
        typer.echo(json.dumps(data, ensure_ascii=False))
        return
    table = Table(show_header=False)
    for key, value in data.items():
        table.add_row(key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    Console().print(table)


@contextmanager
def errors():
    """Turn genqueue's expected errors into one red line and exit code 2."""
    from worker.errors import GenqError, NotFound

    try:
        yield
    except NotFound as exc:
        console.print(f"[red]not found[/red]: {exc.message}")
        raise typer.Exit(2) from None
    except GenqError as exc:
        console.print(f"[red]{exc.code}[/red]: {exc.message}")
        raise typer.Exit(2) from None

