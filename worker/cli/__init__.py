"""``genq``: the command line (typer + rich). Model libraries load only in the commands that
run a model (``worker``, ``generate``).

Commands by theme: ``services`` (``worker``, ``notifier``, ``api``, ``up``), ``submit``,
``state`` (``status``, ``jobs``, ``result``, ``cancel``, ``job``, ``config``), ``generate``,
``jobs`` (``run``), ``bench``; ``common`` holds what they share. Importing them registers them
on ``app`` in this order, the order ``genq --help`` lists them in."""

from __future__ import annotations

import sys

import typer

from worker.cli.common import DEBUG, app, console

# isort: off
from worker.cli import services, submit, state, generate, jobs, bench  # noqa: F401, E402
# isort: on

__all__ = ["app", "explain", "main"]


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
    from worker.stack import StackError

    if isinstance(exc, StackError):  # a port taken, no redis-server
        return str(exc)
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

