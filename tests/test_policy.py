"""The scheduling policy alone: plain data in, a decision out (no torch, no Redis).

Unit tests pin each rule; property tests drive a simulated worker (random arrivals of
interactive and bulk requests, two adapters, rows that end early) through thousands
of decisions and check what must always hold."""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, replace

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.engine.policy import (
    BULK,
    INTERACTIVE,
    Lane,
    Limits,
    Running,
    Waiting,
    admit_paged,
    decide,
    fair_order,
    starved_since,
)
from worker.engine.sequence import Sequence
from worker.engine.waiting import StepLoop
from worker.schema import GenerationRequest

ids = itertools.count()


def waiting(priority=BULK, tokens=100, new=50, at=0.0, adapter=None) -> Waiting:
    return Waiting(f"r{next(ids)}", priority, adapter, tokens, new, at)


def lane(priority=BULK, rows=1, reserve=150, adapter=None, last_step=0.0, **kw) -> Lane:
    return Lane(priority, adapter, rows=tuple(Running(f"x{next(ids)}", reserve, float(i))
                                              for i in range(rows)), last_step=last_step, **kw)


def test_interactive_lane_is_served_and_bulk_waits():
    old_bulk = waiting(BULK, at=0.0)
    late_inter = waiting(INTERACTIVE, at=50.0)
    d = decide([old_bulk, late_inter], [lane(BULK, rows=4, last_step=99.9)], Limits(), now=100.0)
    assert d.lane == (INTERACTIVE, None) and d.admit == [late_inter.id] and not d.evict


def test_starved_bulk_gets_a_turn_but_never_ahead_of_a_waiting_interactive():
    inter = waiting(INTERACTIVE, at=5.0)
    bulk = waiting(BULK, at=0.0)
    lanes = [lane(INTERACTIVE, rows=2, last_step=10.0), lane(BULK, rows=3, last_step=8.5)]
    limits = Limits(max_bulk_pause_s=1.0)
    d = decide([inter, bulk], lanes, limits, now=10.0, bulk_starved_since=8.5)
    assert d.lane == (BULK, None) and d.admit == []  # a step only: an interactive one waits
    d = decide([bulk], lanes, limits, now=10.0, bulk_starved_since=8.5)
    assert d.lane == (BULK, None) and d.admit == [bulk.id]  # no interactive waits: it joins
    d = decide([inter, bulk], lanes, limits, now=10.0, bulk_starved_since=9.5)
    assert d.lane == (INTERACTIVE, None) and d.admit == [inter.id]


def test_starvation_clock():
    assert starved_since(None, (INTERACTIVE, None), bulk_pending=True, now=3.0) == 3.0
    assert starved_since(3.0, (INTERACTIVE, None), bulk_pending=True, now=4.0) == 3.0
    assert starved_since(3.0, (BULK, None), bulk_pending=True, now=4.0) is None
    assert starved_since(3.0, (INTERACTIVE, None), bulk_pending=False, now=4.0) is None


def test_the_oldest_bulk_request_goes_first_then_similar_lengths():
    items = [waiting(tokens=t, at=float(i)) for i, t in enumerate([400, 12, 410, 15, 405, 11])]
    d = decide(items, [], Limits(max_rows=3, max_bulk_prefill_tokens=8192), now=10.0)
    assert d.admit[0] == items[0].id
    assert {w.prompt_tokens for w in items if w.id in d.admit} == {400, 405, 410}


def test_bulk_joins_in_small_prefills_interactive_in_large_ones():
    """A forward pass cannot be interrupted: bulk joiners are prefilled at most
    ``max_bulk_prefill_tokens`` at a time (one always joins), interactive ones in one go."""
    limits = Limits(max_rows=16, max_prefill_tokens=8192, max_bulk_prefill_tokens=512)
    bulk = [waiting(BULK, tokens=200, at=float(i)) for i in range(8)]
    d = decide(bulk, [], limits, now=10.0)
    assert d.admit == [w.id for w in bulk[:2]]  # 400 tokens; a third would make 600
    inter = [waiting(INTERACTIVE, tokens=200, at=float(i)) for i in range(8)]
    assert len(decide(inter, [], limits, now=10.0).admit) == 8
    huge = waiting(BULK, tokens=3000, at=0.0)
    assert decide([huge, *bulk], [], limits, now=10.0).admit == [huge.id]


def test_adapters_run_in_separate_lanes():
    a, b = waiting(adapter="a", at=0.0), waiting(adapter="b", at=1.0)
    d = decide([a, b], [], Limits(), now=5.0)
    assert d.lane == (BULK, "a") and d.admit == [a.id]
    d = decide([b], [lane(BULK, adapter="a", last_step=5.0)], Limits(), now=5.0)
    assert d.lane == (BULK, "b") and d.admit == [b.id]  # a new lane first: round robin


def test_interactive_evicts_the_youngest_bulk_rows_for_kv_room():
    bulk = lane(BULK, rows=4, reserve=1000, last_step=1.9)
    inter = waiting(INTERACTIVE, tokens=1500, new=100, at=2.0)
    d = decide([inter], [bulk], Limits(max_kv_tokens=4500), now=2.0)
    youngest_first = [r.id for r in sorted(bulk.rows, key=lambda r: -r.admitted_at)]
    assert d.admit == [inter.id] and d.evict == youngest_first[:2]


def test_a_request_larger_than_the_kv_budget_runs_alone_once_all_else_is_done():
    big = waiting(BULK, tokens=5000, new=100, at=0.0)
    small = waiting(BULK, tokens=10, new=10, at=1.0)
    running = lane(BULK, rows=1, reserve=100, adapter="z", last_step=1.0)
    d = decide([big, small], [running], Limits(max_kv_tokens=1000), now=2.0)
    assert d.admit == []  # the oldest cannot fit yet: nobody overtakes it
    d = decide([big, small], [], Limits(max_kv_tokens=1000), now=3.0)
    assert d.admit == [big.id]


def test_static_runs_one_whole_batch_at_a_time():
    items = [waiting(tokens=t, at=float(i)) for i, t in enumerate([10, 20, 30])]
    limits = Limits(static=True)
    d = decide(items, [], limits, now=5.0)
    assert sorted(d.admit) == sorted(w.id for w in items)
    d = decide([waiting(INTERACTIVE, at=6.0)], [lane(BULK, rows=3)], limits, now=7.0)
    assert d.lane == (BULK, None) and d.admit == []


# -- properties over a simulated worker ----------------------------------------------------

@dataclass
class Sim:
    """A worker as the policy sees it: lanes of rows with a number of tokens still to go."""

    limits: Limits
    now: float = 0.0
    step: int = 0

    def __post_init__(self):
        self.waiting: dict[str, Waiting] = {}
        self.lanes: dict[tuple, dict[str, tuple[Running, int, Waiting]]] = {}
        self.last_step: dict[tuple, float] = {}
        self.admitted_at: dict[str, int] = {}
        self.arrived_at: dict[str, int] = {}
        self.finished: set[str] = set()
        self.lengths: dict[str, int] = {}
        self.evicted = 0
        self.starved_since: float | None = None

    def view(self) -> list[Lane]:
        return [Lane(k[0], k[1], rows=tuple(r for r, _, _ in rows.values()),
                     last_step=self.last_step.get(k, float("-inf")))
                for k, rows in self.lanes.items() if rows]

    def turn(self):
        waiting = sorted(self.waiting.values(), key=lambda w: (w.submitted_at, int(w.id[1:])))
        d = decide(waiting, self.view(), self.limits, self.now, self.starved_since)
        bulk_pending = any(w.priority == BULK for w in self.waiting.values()) or any(
            w.priority == BULK for rows in self.lanes.values() for _, _, w in rows.values())
        self.starved_since = starved_since(self.starved_since, d.lane, bulk_pending, self.now)
        if d.lane is not None:
            for rows in self.lanes.values():
                for rid in d.evict:
                    if rid in rows:
                        _, _, w = rows.pop(rid)
                        self.waiting[rid] = w
                        self.evicted += 1
            rows = self.lanes.setdefault(d.lane, {})
            for rid in d.admit:
                w = self.waiting.pop(rid)
                assert w.key == d.lane or self.limits.static
                rows[rid] = (Running(rid, w.reserve, self.now), self.lengths[rid], w)
                self.admitted_at.setdefault(rid, self.step)
            for rid, (r, left, w) in list(rows.items()):
                if left <= 1:
                    del rows[rid]
                    self.finished.add(rid)
                else:
                    rows[rid] = (r, left - 1, w)
            self.last_step[d.lane] = self.now
        self.now += 0.05
        self.step += 1
        return d


arrival = st.tuples(st.integers(0, 40), st.sampled_from([INTERACTIVE, BULK, BULK]),
                    st.sampled_from([None, None, "a"]), st.integers(1, 400), st.integers(1, 40),
                    st.integers(1, 40))


@settings(max_examples=150, deadline=None)
@given(st.lists(arrival, min_size=1, max_size=60), st.integers(1, 8),
       st.sampled_from([600, 2000, 100_000]))
def test_properties_of_the_continuous_policy(arrivals, max_rows, max_kv):
    sim = Sim(Limits(max_rows=max_rows, max_kv_tokens=max_kv, max_prefill_tokens=800,
                     max_bulk_pause_s=0.5))
    pending = sorted(arrivals, key=lambda a: a[0])
    submitted: list[Waiting] = []
    older_bulk_at_arrival: dict[str, int] = {}
    overtaken: dict[str, int] = {}
    while pending or sim.waiting or any(sim.lanes.values()):
        while pending and pending[0][0] <= sim.step:
            at, prio, adapter, tokens, new, natural = pending.pop(0)
            w = Waiting(f"q{len(submitted)}", prio, adapter, tokens, new, sim.now)
            sim.lengths[w.id] = min(new, natural)
            sim.arrived_at[w.id] = sim.step
            older_bulk_at_arrival[w.id] = sum(1 for x in sim.waiting.values() if x.key == w.key)
            sim.waiting[w.id] = w
            submitted.append(w)
        inter_waiting = [w for w in sim.waiting.values() if w.priority == INTERACTIVE]
        bulk_waiting = [w for w in sim.waiting.values() if w.priority == BULK]
        d = sim.turn()
        admitted = set(d.admit)
        # 1. no interactive request waits behind a bulk request admitted after it
        if any(rid in admitted for rid in (w.id for w in bulk_waiting)):
            assert not inter_waiting, "a bulk request was admitted while an interactive one waited"
        # 2. bulk joiners of a lane always include the oldest waiting request of that lane
        mine = sorted((w for w in bulk_waiting if w.key == d.lane),
                      key=lambda w: (w.submitted_at, int(w.id[1:])))
        if mine and admitted & {w.id for w in mine}:
            assert mine[0].id in admitted
            for w in mine:
                if w.id not in admitted:
                    overtaken[w.id] = overtaken.get(w.id, 0) + 1
        # 3. limits
        for rows in sim.lanes.values():
            assert len(rows) <= max_rows
        reserved = sum(r.reserve for rows in sim.lanes.values() for r, _, _ in rows.values())
        alone = sum(len(rows) for rows in sim.lanes.values()) == 1
        assert reserved <= max_kv or alone
        assert sim.step < 20_000, "the simulation did not drain: something starves"
    # 4. every request ran, and a bulk request was passed over by admissions of its own lane
    #    no more often than there were older requests of that lane waiting when it arrived,
    #    plus the rows evicted back to waiting (each older one can be an anchor once more)
    assert sim.finished == {w.id for w in submitted}
    for w in submitted:
        if w.priority == BULK:
            assert overtaken.get(w.id, 0) <= older_bulk_at_arrival[w.id] + sim.evicted, w


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000))
def test_bulk_is_admitted_within_a_bound_under_a_steady_interactive_stream(seed):
    """Interactive requests keep coming and running (never all waiting at once): a long bulk
    request still gets in, within ``max_bulk_pause_s`` (10 turns here) and a few turns."""
    rng = random.Random(seed)
    sim = Sim(Limits(max_rows=4, max_kv_tokens=10_000, max_bulk_pause_s=0.5))
    lone = waiting(BULK, tokens=900, new=30, at=0.0)
    sim.waiting[lone.id] = lone
    sim.lengths[lone.id] = 30
    for step in range(400):
        if step % 3 == 0:
            w = replace(waiting(INTERACTIVE, tokens=rng.randint(5, 50), new=4, at=sim.now))
            sim.waiting[w.id] = w
            sim.lengths[w.id] = rng.randint(1, 4)
        sim.turn()
        if lone.id in sim.admitted_at:
            break
    assert lone.id in sim.admitted_at and sim.admitted_at[lone.id] <= 10 + 3


def test_static_serves_an_overdue_request_first_whatever_its_priority():
    old_bulk = waiting(BULK, at=100.0)
    inter = waiting(INTERACTIVE, at=125.0)
    limits = Limits(static=True, max_wait_s=30.0)
    assert decide([old_bulk, inter], [], limits, now=129.0).admit == [inter.id]
    assert decide([old_bulk, inter], [], limits, now=131.0).admit[0] == old_bulk.id


def test_bulk_owners_take_weighted_turns_then_their_jobs():
    """A small job behind another owner's large backlog is admitted in turns, not after it."""
    big = [Waiting(f"big{i}", BULK, None, 10, 10, float(i), owner="a", job="j1") for i in range(50)]
    small = [Waiting(f"sm{i}", BULK, None, 10, 10, 100.0 + i, owner="b", job="j2") for i in range(5)]
    second = [Waiting(f"a2-{i}", BULK, None, 10, 10, 200.0 + i, owner="a", job="j3")
              for i in range(5)]
    order = [w.id for w in fair_order(big + small + second)]
    assert order[:4] == ["big0", "sm0", "sm1", "a2-0"]  # a round: one turn per owner
    assert order[4:6] == ["big1", "sm2"]  # owner a's turns alternate between its jobs
    assert order.index("sm4") == 9
    heavy = [Waiting(f"h{i}", BULK, None, 10, 10, float(i), owner="h", weight=3) for i in range(30)]
    light = [Waiting(f"l{i}", BULK, None, 10, 10, 50.0 + i, owner="l") for i in range(30)]
    first = [w.owner for w in fair_order(heavy + light)][:20]
    assert first.count("h") == 15 and first.count("l") == 5
    d = decide(big + small, [], Limits(max_rows=4, max_bulk_prefill_tokens=8192), now=300.0)
    assert sorted(d.admit) == ["big0", "big1", "sm0", "sm1"]  # each owner half the joiners


def test_paged_admission_puts_interactive_first_with_headroom_of_its_own():
    bulk = [waiting(BULK, at=float(i)) for i in range(10)]
    inter = [waiting(INTERACTIVE, at=20.0 + i) for i in range(4)]
    running = [waiting(BULK, at=-1.0) for _ in range(7)]
    assert admit_paged(bulk, running, max_rows=8, headroom=2).admit == [bulk[0].id]
    # interactive requests join at once (headroom of their own); bulk keeps a quarter of the
    # batch while they run: the youngest bulk rows go back to waiting, none is admitted
    decision = admit_paged([*bulk, *inter], running, max_rows=8, headroom=2)
    assert decision.admit == [w.id for w in inter]
    assert decision.evict == [r.id for r in running[2:]]
    full = [*running[:2], *(replace(w, priority=INTERACTIVE) for w in inter)]
    assert admit_paged(bulk, full, max_rows=8, headroom=2).admit == []  # bulk has its share
    idle = admit_paged(bulk, [], max_rows=8, headroom=2, max_bulk_prefill=10**6)
    assert idle.admit == [w.id for w in bulk[:8]] and idle.evict == []


def test_paged_admission_takes_bulk_in_fair_turns():
    a = [replace(waiting(BULK, at=float(i)), owner="a") for i in range(6)]
    b = [replace(waiting(BULK, at=10.0 + i), owner="b") for i in range(2)]
    assert admit_paged([*a, *b], [], max_rows=4, headroom=1).admit == [a[0].id, b[0].id, a[1].id,
                                                                       b[1].id]


def test_paged_admission_without_mixing_runs_one_adapter_at_a_time():
    base = [waiting(at=float(i)) for i in range(3)]
    lora = [waiting(adapter="a", at=1.5)]
    mixed = sorted([*base, *lora], key=lambda w: w.submitted_at)
    assert admit_paged(mixed, [], max_rows=8, headroom=2).admit == [w.id for w in mixed]
    # the adapter's request is next in turn: nothing overtakes it, it joins once base rows end
    assert admit_paged(mixed, [], max_rows=8, headroom=2, mix_adapters=False).admit == [
        base[0].id, base[1].id]
    assert admit_paged([lora[0], base[2]], [base[0]], 8, 2, mix_adapters=False).admit == []
    assert admit_paged([lora[0], base[2]], [], 8, 2, mix_adapters=False).admit == [lora[0].id]
    # an interactive request of another adapter evicts the bulk rows in its way
    urgent = waiting(INTERACTIVE, adapter="a", at=5.0)
    decision = admit_paged([urgent], base, 8, 2, mix_adapters=False)
    assert decision.admit == [urgent.id] and decision.evict == [w.id for w in base]


def test_paged_admission_prefills_bulk_a_few_prompts_a_step():
    bulk = [waiting(BULK, tokens=200, at=float(i)) for i in range(6)]
    assert admit_paged(bulk, [], max_rows=8, headroom=2, max_bulk_prefill=512).admit == [
        bulk[0].id, bulk[1].id]
    huge = waiting(BULK, tokens=3000, at=-1.0)
    assert admit_paged([huge, *bulk], [], 8, 2, max_bulk_prefill=512).admit == [huge.id]


class _Loop(StepLoop):
    """A step loop with no backend: ``rows`` stand for what runs."""

    def __init__(self, waiting_rows: list[Sequence], running_rows: list[Sequence]):
        super().__init__(engine=None, limits=Limits())
        self.waiting = {s.handle: s for s in waiting_rows}
        self.rows = running_rows

    @property
    def running(self) -> list[Sequence]:
        return self.rows


def row(n: int, suspect: bool = False, request_id: str | None = None) -> Sequence:
    request = GenerationRequest(prompt="x", max_new_tokens=4)
    return Sequence(request_id or f"req{n}", request, [1, 2], submitted_at=float(n),
                    suspect=suspect, handle=str(n))


def test_a_suspect_runs_alone_after_the_running_rows_end():
    fresh, suspect, later = row(0), row(1, suspect=True), row(2, suspect=True)
    sample = row(3, suspect=True, request_id=suspect.id)  # its second sample comes with it
    view = lambda loop: [w.id for w in loop._waiting_view()]  # noqa: E731
    assert view(_Loop([fresh, later, suspect, sample], [row(9)])) == []  # drain first
    assert view(_Loop([fresh, later, suspect, sample], [])) == [suspect.handle, sample.handle]
    assert view(_Loop([fresh, later], [suspect])) == []  # nothing joins a running suspect
    assert view(_Loop([fresh], [row(9)])) == [fresh.handle]


def test_suspects_with_fewer_deaths_alone_run_first():
    """A suspect a random kill already hit while it ran alone waits for the others, so the
    next kill is unlikely to hit it alone again."""
    hit, other = row(1, suspect=True), row(2, suspect=True)
    hit.deaths_alone = 1
    view = lambda loop: [w.id for w in loop._waiting_view()]  # noqa: E731
    assert view(_Loop([hit, other], [])) == [other.handle]
    assert view(_Loop([hit], [])) == [hit.handle]


def test_a_charged_suspect_sits_out_until_its_not_before_without_holding_others_up():
    """The suspects its dead worker held come back with it but may arrive a fetch later: until
    ``not_before`` a charged suspect neither runs nor stops fresh rows from being admitted."""
    hit, fresh, late = row(1, suspect=True), row(2), row(3, suspect=True)
    hit.deaths_alone, hit.not_before = 1, time.monotonic() + 60
    view = lambda loop: [w.id for w in loop._waiting_view()]  # noqa: E731
    assert view(_Loop([hit, fresh], [])) == [fresh.handle]
    assert view(_Loop([hit, fresh], [row(9)])) == [fresh.handle]
    assert view(_Loop([hit, fresh, late], [])) == [late.handle]  # an uncharged one arrived
    hit.not_before = time.monotonic() - 1
    assert view(_Loop([hit, fresh], [])) == [hit.handle]
