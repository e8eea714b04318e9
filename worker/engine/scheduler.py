"""The step loop: waiting requests, running lanes, and one policy decision per step.

``Scheduler.step()`` asks ``policy.decide`` which lane to serve, evicts and admits what it
says, and advances that lane by one decode step; it returns the rows that finished, at the
step they finished. ``Engine.generate`` and the worker's consumer both drive it, so there is
one generation path.

Out-of-memory is handled after leaving the ``except`` block, once the failed call's frames and
tensors are released: a prefill that ran out is retried with fewer joiners; a decode step that
ran out evicts the youngest rows back to the waiting list (they restart from their prompt:
same greedy text, same seeded samples) and caps the lane at what fits. A single row that runs
out next to others becomes the *solo* row: nothing is admitted until every other row has
finished, then it runs alone; only if it runs out alone does it fail, with ``out_of_memory``.
"""

from __future__ import annotations

import time

import structlog
import torch

from worker.engine.policy import Lane, LaneKey, Limits, Running, decide, starved_since
from worker.engine.running import RunningBatch, prefill_groups
from worker.engine.sequence import Sequence
from worker.engine.waiting import StepLoop, requests_done
from worker.errors import OutOfMemory

log = structlog.get_logger(__name__)

OOM_ERRORS: tuple[type[BaseException], ...] = (torch.OutOfMemoryError, MemoryError)


class Scheduler(StepLoop):
    """Requests waiting and running on one engine; ``step()`` serves one lane once."""

    def __init__(self, engine, limits: Limits):
        super().__init__(engine, limits)
        self.lanes: dict[LaneKey, RunningBatch] = {}
        self.prefill_cap = limits.max_prefill_tokens  # lowered after a prefill ran out of memory
        self.solo: Sequence | None = None  # ran out of memory next to others: runs alone next
        self.bulk_starved_since: float | None = None  # bulk work waiting for a turn since

    @property
    def running(self) -> list[Sequence]:
        return [row for lane in self.lanes.values() for row in lane.rows]

    def _stop_running(self, ids: set[str]) -> list[Sequence]:
        ended: list[Sequence] = []
        for lane in self.lanes.values():
            rows = [r for r in lane.rows if r.id in ids and not r.done]
            if rows:
                lane.remove(rows)
                ended.extend(rows)
        self._drop_empty_lanes()
        return ended

    # -- the step ---------------------------------------------------------------------

    def step(self) -> list[Sequence]:
        """Serve one lane: evict, admit, one decode step. The rows that finished."""
        now = time.time()  # the policy compares it with submit times
        limits = self.limits
        if self.prefill_cap < limits.max_prefill_tokens:
            limits = Limits(**{**vars(limits), "max_prefill_tokens": self.prefill_cap})
        if self.solo is not None and self.solo.handle in self.waiting and not self.running:
            key, handles = (self.solo.priority, self.solo.adapter), [self.solo.handle]
            evict: list[str] = []
        else:
            waiting = [] if self.solo is not None else self._waiting_view()  # drain first
            decision = decide(waiting, self._lane_view(), limits, now, self.bulk_starved_since)
            bulk_pending = any(s.priority == "bulk" for s in [*self.waiting.values(), *self.running])
            self.bulk_starved_since = starved_since(self.bulk_starved_since, decision.lane,
                                                    bulk_pending, now)
            if decision.lane is None:
                return []
            key, handles, evict = decision.lane, decision.admit, decision.evict
        lane = self.lanes.get(key)
        if lane is None:
            lane = self.lanes[key] = RunningBatch(self.engine, key[1], keep_finished=limits.static)
        if evict:
            self._evict(set(evict), reason="interactive_first")
        finished: list[Sequence] = []
        joiners = self._admitting(handles)
        if joiners:
            finished += self._admit(lane, joiners)
        if lane.rows:
            finished += self._step(lane)
        if self.solo is not None and self.solo.done:
            self.solo = None
        self._drop_empty_lanes()
        return requests_done(finished)

    def _admit(self, lane: RunningBatch, joiners: list[Sequence]) -> list[Sequence]:
        """Prefill the joiners in groups of similar prompt length (padding under a third)."""
        size = len(lane) + len(joiners)
        finished: list[Sequence] = []
        groups = prefill_groups(joiners)
        for n, group in enumerate(groups):
            ran_out = False
            try:
                finished += lane.admit(group, size)
            except OOM_ERRORS:
                ran_out = True
            if ran_out:
                return finished + self._prefill_ran_out(lane, [s for g in groups[n:] for s in g])
        self.prefill_cap = min(self.limits.max_prefill_tokens, self.prefill_cap * 2)
        return finished

    def _prefill_ran_out(self, lane: RunningBatch, joiners: list[Sequence]) -> list[Sequence]:
        # out of the except block: the failed prefill's tensors are gone
        self._released()
        for seq in joiners:
            seq.restart()
            self.waiting[seq.handle] = seq
        prompt = sum(s.prompt_tokens for s in joiners)
        log.warning("oom_prefill", joiners=len(joiners), prompt_tokens=prompt, running=len(lane))
        if len(joiners) > 1:
            self.prefill_cap = max(1, prompt // 2)
            return []
        return self._alone_or_fail(joiners[0])

    def _step(self, lane: RunningBatch) -> list[Sequence]:
        rows, live = len(lane.rows), len(lane.live)
        ran_out = False
        try:
            finished = lane.step()
        except OOM_ERRORS:
            ran_out = True
        if not ran_out:
            self.steps += 1
            self.last_step_rows = rows
            self.row_steps += rows
            self.useful_row_steps += live
            return finished
        self._released()
        log.warning("oom_step", rows=rows, kv_length=lane.length)
        if rows > 1:
            youngest = sorted(lane.rows, key=lambda r: r.admitted_at or 0.0)[-max(1, rows // 4):]
            self._evict({r.handle for r in youngest}, reason="out_of_memory")
            lane.cap = len(lane.rows)
            return []
        seq = lane.rows[0]
        self._evict({seq.handle}, reason="out_of_memory")
        return self._alone_or_fail(seq)

    def _alone_or_fail(self, seq: Sequence) -> list[Sequence]:
        """``seq`` (back in waiting) ran out of memory as the only row of its forward pass:
        if other rows hold memory, it runs alone once they are done; else it fails."""
        if self.running and self.solo is not seq:
            self.solo = seq
            log.warning("oom_solo", request_id=seq.id, waiting_for_rows=len(self.running))
            return []
        self.solo = None
        self.waiting.pop(seq.handle, None)
        seq.error = OutOfMemory("out of memory on a single row").as_error()
        seq.finish_reason = "error"
        seq.finished_at = time.time()
        log.warning("oom_single_row", request_id=seq.id)
        return [seq]

    def _evict(self, handles: set[str], reason: str) -> None:
        for lane in self.lanes.values():
            rows = [r for r in lane.rows if r.handle in handles]
            if rows:
                lane.remove(rows)
                for seq in rows:
                    seq.restart()
                    self.waiting[seq.handle] = seq
                self.evictions += len(rows)
                log.info("rows_evicted", reason=reason, request_ids=[r.id for r in rows])

    def _released(self) -> None:
        self.ooms += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _drop_empty_lanes(self) -> None:
        for key in [k for k, lane in self.lanes.items() if not lane.rows]:
            del self.lanes[key]

    # -- views for the policy ---------------------------------------------------------

    def _lane_view(self) -> list[Lane]:
        return [Lane(key[0], key[1],
                     rows=tuple(Running(r.handle, r.prompt_tokens + r.max_new_tokens,
                                        r.admitted_at or 0.0) for r in lane.rows),
                     cap=lane.cap, last_step=lane.last_step)
                for key, lane in self.lanes.items() if lane.rows]
