"""Sub-batch planning: every row once, limits kept, adapters apart, little padding."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from worker.engine.batching import Row, batch_cost, pad_fraction, plan_batches

rows_strategy = st.lists(
    st.builds(Row, index=st.integers(0, 10**6), prompt_tokens=st.integers(1, 2000),
              max_new_tokens=st.integers(1, 512), adapter=st.sampled_from([None, "a", "b"])),
    max_size=80,
    unique_by=lambda r: r.index,
)


@given(rows_strategy, st.integers(1, 40), st.integers(1, 50_000))
def test_plan_keeps_every_limit(rows, max_size, max_tokens):
    batches = plan_batches(list(rows), max_size, max_tokens)
    planned = [r.index for b in batches for r in b]
    assert sorted(planned) == sorted(r.index for r in rows)
    for batch in batches:
        assert 1 <= len(batch) <= max_size
        assert len({r.adapter for r in batch}) == 1
        assert len(batch) == 1 or batch_cost(batch) <= max_tokens
        assert [r.prompt_tokens for r in batch] == sorted(r.prompt_tokens for r in batch)


def test_length_sorting_cuts_padding_against_arrival_order():
    rng = random.Random(7)
    rows = [Row(i, rng.randint(30, 230), 64) for i in range(64)]

    def pads(batches):  # pad tokens over all prompt slots, across the batches
        slots = sum(len(b) * max(r.prompt_tokens for r in b) for b in batches)
        return 1 - sum(r.prompt_tokens for b in batches for r in b) / slots

    arrival = [rows[i:i + 16] for i in range(0, 64, 16)]
    planned = plan_batches(rows, 16, 10**9)
    assert len(planned) == 4
    assert pads(planned) < pads(arrival) / 2


def test_pad_fraction():
    assert pad_fraction([4, 4]) == 0
    assert pad_fraction([1, 3]) == 2 / 6
