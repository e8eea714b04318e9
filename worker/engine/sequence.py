"""One request on its way through the engine: the validated request, its prompt ids, the
tokens generated so far, and when and why it finished.

A ``Sequence`` is what the scheduler admits into a running batch, steps, evicts after an
out-of-memory error (it restarts from its prompt: same greedy text, same seeded samples) and
turns into a result. It never holds tensors of the batch it runs in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from worker.engine.stopping import StopStrings, cut_at_stop
from worker.schema import GenerationRequest, result_record


@dataclass(eq=False)
class Sequence:
    """A valid request and its generation state (row state of a running batch)."""

    id: str
    request: GenerationRequest
    prompt_ids: list[int]
    body: dict[str, Any] = field(default_factory=dict)  # as received: custom_id, metadata echo
    submitted_at: float = field(default_factory=time.time)
    expires_at: float | None = None  # wall clock deadline (``expires_in_s``)
    suspect: bool = False  # was running on a worker that died: never shares a lane with another
    owner: str | None = None  # who submitted it, and its job: bulk admission takes turns
    job: str | None = None
    weight: int = 1  # the owner's share of bulk admission
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    status: str | None = None  # set when it ends other than by generating: cancelled, expired
    error: dict[str, str] | None = None
    admitted_at: float | None = None  # wall clock when its prefill ran
    finished_at: float | None = None
    batch: dict[str, float] | None = None  # rows and padding when it was admitted
    batch_id: int | None = None  # the running batch it was admitted into (logs)
    evictions: int = 0
    handle: str = ""  # unique within its scheduler (ids may repeat in one generate call)
    sampler: Any = field(default=None, repr=False)  # engine.sampling.RowSampler or None
    stops: StopStrings | None = field(default=None, repr=False)

    # -- what the scheduling policy needs ---------------------------------------------

    @property
    def priority(self) -> str:
        return "bulk" if self.request.priority == "bulk" else "interactive"

    @property
    def adapter(self) -> str | None:
        return self.request.adapter

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def max_new_tokens(self) -> int:
        return self.request.max_new_tokens

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    # -- generation -------------------------------------------------------------------

    def accept(self, token: int, eos_ids: frozenset[int], tokenizer) -> bool:
        """Append a generated token; True if the row has finished (EOS, stop string, length)."""
        self.tokens.append(token)
        if token in eos_ids:
            self.finish_reason = "stop"
        elif self.stops is not None and self.stops.seen(self.tokens, tokenizer):
            self.finish_reason = "stop_sequence"
        elif len(self.tokens) >= self.request.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def stop_early(self, status: str) -> None:
        """End the row now (``cancelled`` or ``expired``), keeping what it generated."""
        self.status = status
        self.finish_reason = "cancelled"

    def restart(self) -> None:
        """Forget the generated tokens (evicted after out-of-memory: it runs again later)."""
        self.tokens.clear()
        self.finish_reason = None
        self.admitted_at = None
        self.batch = None
        self.evictions += 1
        if self.sampler is not None:
            self.sampler.reset()

    def text(self, tokenizer) -> str:
        """The generated text so far: never the prompt, never a special token."""
        return tokenizer.decode(self.tokens, skip_special_tokens=True,
                                clean_up_tokenization_spaces=False)

    # -- results ----------------------------------------------------------------------

    def result(self, tokenizer, *, worker: str | None, model: str | None) -> dict[str, Any]:
        """The contract's result for a finished row."""
        if self.error is not None:
            return result_record(self.id, "failed", self.body, worker=worker, model=model,
                                 error=self.error)
        text, cut = cut_at_stop(self.text(tokenizer), self.request.stop)
        end = self.finished_at or time.time()
        start = self.admitted_at or end
        return result_record(
            self.id, self.status or "succeeded", self.body, worker=worker, model=model, text=text,
            finish_reason="stop_sequence" if cut else self.finish_reason,
            usage={"prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.tokens)},
            timings={"queued_ms": _ms(start - self.submitted_at), "generate_ms": _ms(end - start),
                     "total_ms": _ms(end - self.submitted_at)},
            batch=self.batch)


def _ms(seconds: float) -> float:
    return round(max(seconds, 0.0) * 1000, 1)
