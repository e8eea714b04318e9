"""The Redis Lua scripts: one ``lua/<name>.lua`` file each beside this module (package data),
its header comment saying what it does and its KEYS and ARGV.

A script whose first line is ``--! lifecycle`` is preceded by ``lua/lifecycle.lua``
(``is_final``, ``notify_job``) and, before that, ``FINAL`` generated from
``worker.lifecycle``: the final statuses are written once, in Python.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from redis.commands.core import Script

from worker.lifecycle import FINAL

LIFECYCLE = "--! lifecycle"


def _read(name: str) -> str:
    return files(__package__).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


@cache
def source(name: str) -> str:
    """The Lua source of script ``name`` as Redis runs it."""
    text = _read(name)
    if text.startswith(LIFECYCLE):
        final = ", ".join(f"'{status}'" for status in FINAL)
        text = f"local FINAL = {{{final}}}\n{_read('lifecycle')}{text}"
    return text


def register(client, name: str) -> Script:
    """Script ``name`` registered on ``client`` (call once per client, keep the result)."""
    return client.register_script(source(name))
