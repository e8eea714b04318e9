"""How pending rows become sub-batches: by adapter, sorted by prompt length, packed under a
row count and a token budget (rows x (longest prompt + most new tokens)).

Sorting by length is what keeps padding low: arrival order wasted ~57% of prompt tokens on
pads in our measurements, length order 8-44%.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """What the planner needs to know about one valid request."""

    index: int
    prompt_tokens: int
    max_new_tokens: int
    adapter: str | None = None


def batch_cost(rows: list[Row]) -> int:
    """Tokens a left-padded batch holds at its end: rows x (longest prompt + most new)."""
    if not rows:
        return 0
    return len(rows) * (max(r.prompt_tokens for r in rows) + max(r.max_new_tokens for r in rows))


def pad_fraction(prompt_lengths: list[int]) -> float:
    """Pad tokens over all prompt tokens of a left-padded batch."""
    if not prompt_lengths:
        return 0.0
    total = len(prompt_lengths) * max(prompt_lengths)
    return (total - sum(prompt_lengths)) / total


def plan_batches(rows: list[Row], max_batch_size: int, max_batch_tokens: int) -> list[list[Row]]:
    """Group rows by adapter, sort each group by prompt length and pack it greedily.

    A row too large for the token budget on its own still runs, alone.
    """
    groups: dict[str | None, list[Row]] = defaultdict(list)
    for row in rows:
        groups[row.adapter].append(row)
    batches: list[list[Row]] = []
    for group in groups.values():
        group.sort(key=lambda r: r.prompt_tokens)
        current: list[Row] = []
        longest = most_new = 0
        for row in group:
            new_longest = max(longest, row.prompt_tokens)
            new_most = max(most_new, row.max_new_tokens)
            fits = (
                len(current) < max_batch_size
                and (len(current) + 1) * (new_longest + new_most) <= max_batch_tokens
            )
            if current and not fits:
                batches.append(current)
                current, new_longest, new_most = [], row.prompt_tokens, row.max_new_tokens
            current.append(row)
            longest, most_new = new_longest, new_most
        if current:
            batches.append(current)
    return batches
