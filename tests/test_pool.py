"""The batcher's choice among pending requests (no Redis needed: plain objects)."""

from __future__ import annotations

import itertools

from worker.queue.batcher import Pending, Pool
from worker.queue.messages import Envelope

counter = itertools.count()


def pending(tokens: int, priority: str = "bulk", adapter: str | None = None) -> Pending:
    request = {"prompt": "x", "priority": priority, "max_new_tokens": 16}
    if adapter:
        request["adapter"] = adapter
    env = Envelope(id=f"r{next(counter)}", request=request, job_id=None, submitted_at=0.0,
                   expires_at=None)
    return Pending(env, tokens, arrived=float(next(counter)))


def test_interactive_first_then_oldest_bulk():
    pool = Pool()
    for t in (10, 20, 30):
        pool.add(pending(t))
    late = pending(500, priority="interactive")
    pool.add(late)
    assert [p.envelope.id for p in pool.take_batch(8, 10**6)] == [late.envelope.id]
    assert len(pool.take_batch(8, 10**6)) == 3 and len(pool) == 0


def test_similar_lengths_share_a_batch_and_the_oldest_is_always_in_it():
    pool = Pool()
    items = [pending(t) for t in (400, 12, 410, 15, 405, 11, 14, 402)]
    for p in items:
        pool.add(p)
    first = pool.take_batch(4, 10**6)
    assert items[0] in first  # the oldest, a long prompt, is not starved by short ones
    assert sorted(p.prompt_tokens for p in first) == [400, 402, 405, 410]
    assert sorted(p.prompt_tokens for p in pool.take_batch(4, 10**6)) == [11, 12, 14, 15]


def test_adapters_never_mix():
    pool = Pool()
    for i in range(6):
        pool.add(pending(10 + i, adapter="a" if i % 2 else None))
    batch = pool.take_batch(8, 10**6)
    assert len(batch) == 3 and len({p.envelope.adapter for p in batch}) == 1


def test_a_lone_long_bulk_prompt_is_served_within_the_bound():
    """A stream of short interactive requests never starves one long bulk request."""
    pool = Pool()
    lone = pending(900, priority="bulk")
    pool.add(lone)
    clock = lone.arrived
    served_at = None
    for _step in range(200):  # each step: 8 short interactive arrivals, one batch served
        for _ in range(8):
            clock += 0.01
            p = pending(12, priority="interactive")
            p.arrived = clock
            pool.add(p)
        batch = pool.take_batch(8, 10**6, max_wait_s=0.5, now=clock)
        if lone in batch:
            served_at = clock
            break
        assert all(p.prompt_tokens == 12 for p in batch)
    assert served_at is not None and served_at - lone.arrived <= 0.5 + 0.08
    without_bound = Pool()
    without_bound.add(pending(900, priority="bulk"))
    for _ in range(8):
        without_bound.add(pending(12, priority="interactive"))
    assert all(p.prompt_tokens == 12 for p in without_bound.take_batch(8, 10**6))
