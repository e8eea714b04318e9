"""Where pending requests become a batch: the worker's pool of received requests and the
rule that picks the next batch from it.

The rule: interactive before bulk; the oldest request of that class is always in the next
batch; its batch-mates are the requests of the same adapter closest to it in prompt length,
planned by the engine's own length-sorted packer under the row and token caps. A request that
has waited longer than ``max_wait_s`` (``GENQ_MAX_WAIT_MS_FOR_BUCKET``) is served next whatever
its priority, adapter or length, so nothing starves under a stream of other requests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from worker.engine.batching import Row, plan_batches
from worker.queue.messages import Envelope


@dataclass
class Pending:
    """A received, validated request waiting for a batch."""

    envelope: Envelope
    prompt_tokens: int
    arrived: float = field(default_factory=time.monotonic)


class Pool:
    """Requests received but not yet run (all are unacked messages we hold)."""

    def __init__(self) -> None:
        self.items: list[Pending] = []

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: Pending) -> None:
        self.items.append(item)

    def oldest_arrival(self) -> float | None:
        return min((p.arrived for p in self.items), default=None)

    def drain(self) -> list[Pending]:
        """Remove and return everything (shutdown, lost connection)."""
        items, self.items = self.items, []
        return items

    def take_batch(self, max_size: int, max_tokens: int, max_wait_s: float | None = None,
                   now: float | None = None) -> list[Pending]:
        """Remove and return the next batch by the rule above."""
        if not self.items:
            return []
        now = time.monotonic() if now is None else now
        overall = min(self.items, key=lambda p: p.arrived)
        if max_wait_s is not None and now - overall.arrived > max_wait_s:
            candidates, oldest = self.items, overall  # overdue: served first, any priority
        else:
            interactive = [p for p in self.items if p.envelope.priority == "interactive"]
            candidates = interactive or self.items
            oldest = min(candidates, key=lambda p: p.arrived)
        group = [p for p in candidates if p.envelope.adapter == oldest.envelope.adapter]
        rows = [Row(i, p.prompt_tokens, p.envelope.max_new_tokens, p.envelope.adapter)
                for i, p in enumerate(group)]
        target = group.index(oldest)
        for planned in plan_batches(rows, max_size, max_tokens):
            if any(r.index == target for r in planned):
                chosen = [group[r.index] for r in planned]
                break
        taken = {id(p) for p in chosen}
        self.items = [p for p in self.items if id(p) not in taken]
        return chosen
