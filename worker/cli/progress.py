"""The progress bar of ``genq run`` and ``genq generate``: its columns and a moving rate."""

from __future__ import annotations

import time
from collections import deque

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn


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


def progress_columns() -> list:
    """The columns: description, bar, done/total, failed, rate, elapsed, ETA."""
    return [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("failed {task.fields[failed]}"), TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}")]

