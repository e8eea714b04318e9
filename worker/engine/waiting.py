"""What every backend's step loop shares: the waiting rows, their handles, deadlines, the
policy's view of them, and which finished rows complete a request.

``Scheduler`` (our step loop) and ``VllmScheduler`` (vLLM stepped in-process) both derive from
``StepLoop``: the worker's consumer and ``Engine.generate`` drive either through the same
``add`` / ``step`` / ``stop`` / ``expire`` / ``forget`` calls.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable

from worker.engine.policy import Limits, Waiting
from worker.engine.sequence import Sequence


def requests_done(rows: list[Sequence]) -> list[Sequence]:
    """The requests these finished rows complete: a row alone, or sample 0 of a request
    once all its samples are done (until then, nothing for it)."""
    done: list[Sequence] = []
    for row in rows:
        request = row.primary or row
        if row.request_done and request not in done:
            done.append(request)
    return done


class StepLoop:
    """Requests waiting for a backend; subclasses run them (``step``) and end them (``stop``)."""

    def __init__(self, engine, limits: Limits):
        self.engine = engine
        self.limits = limits
        self.waiting: dict[str, Sequence] = {}
        # called with the joiners before their first forward pass; returns the ones to run
        # (the worker writes their running records there and drops duplicates of finished ones)
        self.before_admit: Callable[[list[Sequence]], list[Sequence]] | None = None
        self._handles = itertools.count()
        self.steps = 0
        self.last_step_rows = 0  # rows the latest step computed
        self.row_steps = 0  # rows computed, summed over steps
        self.useful_row_steps = 0  # rows that produced a token, summed over steps
        self.evictions = 0  # rows sent back to waiting (out of memory, interactive first)
        self.ooms = 0

    @property
    def running(self) -> list[Sequence]:
        raise NotImplementedError

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        """Queue a prepared request (``n`` rows if it asks for ``n`` samples); its rows join
        the running ones when the policy says so."""
        for row in [seq, *self.engine.samples_of(seq)]:
            row.handle = str(next(self._handles))
            self.waiting[row.handle] = row

    def forget(self, ids: set[str]) -> None:
        """Drop these requests' waiting rows without a result (already final elsewhere)."""
        for handle in [h for h, s in self.waiting.items() if s.id in ids]:
            del self.waiting[handle]

    def stop(self, ids: Iterable[str], status: str = "cancelled") -> list[Sequence]:
        """End these requests now (waiting or running) with ``status``; the ended requests."""
        wanted = set(ids)
        ended = [s for s in self.waiting.values() if s.id in wanted]
        for seq in ended:
            del self.waiting[seq.handle]
        ended += self._stop_running(wanted)
        now = time.time()
        for seq in ended:
            seq.stop_early(status)
            seq.finished_at = now
        return requests_done(ended)

    def _stop_running(self, ids: set[str]) -> list[Sequence]:
        """Take these requests' running rows out of the backend; the rows taken."""
        raise NotImplementedError

    def expire(self, now: float | None = None) -> list[Sequence]:
        """End every request past its deadline (``expires_in_s``) as ``expired``."""
        now = time.time() if now is None else now
        late = [s.id for s in [*self.waiting.values(), *self.running]
                if s.expires_at is not None and now > s.expires_at and not s.done]
        return self.stop(late, "expired") if late else []

    def _admitting(self, handles: list[str]) -> list[Sequence]:
        """Take these rows out of waiting, past ``before_admit``: the rows to run now."""
        joiners = [self.waiting.pop(h) for h in handles]
        if joiners and self.before_admit is not None:
            joiners = self.before_admit(joiners)
        return joiners

    def _waiting_view(self) -> list[Waiting]:
        """What the policy may admit now: waiting requests by submit time, ties in arrival
        order (an evicted row keeps its place: it is back in the dict at the end, but its
        handle is older).

        A *suspect* (it was running on a worker that died) runs alone, so that a worker death
        while it runs is evidence against it and no other request's: while one runs nothing
        joins it; while one waits nothing new is admitted until the running rows are done,
        then it alone (with its other samples). Suspects with fewer deaths while alone go
        first, so that random kills spread over them rather than hit one request again; one
        already charged sits out until its ``not_before`` (it neither runs nor holds others
        up meanwhile), so that the suspects its dead worker held, which come back with it
        but may reach this worker a fetch later, go before it."""
        now = time.monotonic()
        ordered = [s for s in sorted(self.waiting.values(),
                                     key=lambda s: (s.submitted_at, int(s.handle)))
                   if not (s.suspect and s.not_before > now)]
        suspects = sorted((s for s in ordered if s.suspect), key=lambda s: s.deaths_alone)
        if any(s.suspect for s in self.running):
            return []
        if suspects:
            return [] if self.running else self._view(
                [s for s in suspects if s.id == suspects[0].id])
        return self._view(ordered)

    @staticmethod
    def _view(rows: Iterable[Sequence]) -> list[Waiting]:
        """Rows as the policy sees them."""
        return [Waiting(s.handle, s.priority, s.adapter, s.prompt_tokens, s.max_new_tokens,
                        s.submitted_at, s.owner, s.job, s.weight) for s in rows]
