"""Checked lines kept once, in order: in memory up to ``SPOOL_BYTES``, then in a temporary
file, so a source of any size is read and checked once with bounded memory, then queued
chunk by chunk."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator

from worker.submission.lines import Line, batched

SPOOL_BYTES = 8 * 1024 * 1024


class Spool:
    """Lines written once with ``add``, then read back with ``chunks``."""

    def __init__(self):
        self.file = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        self.total = 0  # lines added
        self.runnable = 0  # of which hold a request

    def add(self, line: Line) -> None:
        self.total += 1
        self.runnable += line.request is not None
        self.file.write((json.dumps([line.number, line.custom_id, line.request, line.error,
                                     line.item]) + "\n").encode())

    def chunks(self, size: int) -> Iterator[list[Line]]:
        """The lines in the order added, ``size`` at a time."""
        self.file.seek(0)
        yield from batched((Line(number, request=request, error=error, custom_id=custom_id,
                                 item=item)
                            for number, custom_id, request, error, item in map(json.loads, self.file)),
                           size)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
