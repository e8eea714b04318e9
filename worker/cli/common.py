"""What every ``genq`` command shares: the Typer app, the stderr console, ``--json``, the
client, printing a record, and expected errors as one line."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

app = typer.Typer(help="genqueue: batched LLM generation on a Celery/Redis queue.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
DEBUG = {"on": False}


@app.callback()
def _setup(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")]
           = False) -> None:
    import logging

    from worker.ops.logging import configure_logging

    DEBUG["on"] = debug
    level = os.environ.get("GENQ_LOG_LEVEL", "WARNING")
    try:
        if not isinstance(logging.getLevelName(level.strip().upper()), int):
            raise ValueError("GENQ_LOG_LEVEL takes DEBUG, INFO, WARNING, ERROR or CRITICAL; "
                             f"not {level!r}")
        configure_logging(level.strip())
    except ValueError as exc:  # a setting out of range: one line, not a traceback
        console.print(f"[red]error[/red]: {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None


console = Console(stderr=True, soft_wrap=True)  # a long line stays one line in a log
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def out_console() -> Console:
    """The stdout console for tables: the terminal's width on a terminal; piped (``| grep``)
    or in a file, as wide as the rows need (``COLUMNS`` still sets it), so no line is cut."""
    out = Console()
    if out.is_terminal or os.environ.get("COLUMNS"):
        return out
    return Console(width=100_000)


def id_column(header: str) -> Column:
    """A column of ids or names: never cut with an ellipsis nor broken at a dash; folded
    only where a terminal is narrower than the id."""
    return Column(header, no_wrap=True, overflow="fold")


def get_client():
    """A client of the queue (importing it loads no model library)."""
    from worker.client import GenerationClient

    return GenerationClient()


def show(data: dict, as_json: bool) -> None:
    """Print ``data`` as one JSON line or as a two-column table."""
    if as_json:
        typer.echo(json.dumps(data, ensure_ascii=False))
        return
    table = Table(Column(no_wrap=True), Column(overflow="fold"), show_header=False)
    for key, value in data.items():
        table.add_row(key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    out_console().print(table)


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

