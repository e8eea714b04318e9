"""One request on its way through the engine: the validated request, its prompt ids, the
tokens generated so far, and when and why it finished.

A ``Sequence`` is what the scheduler admits into a running batch, steps, evicts after an
out-of-memory error (it restarts from its prompt: same greedy text, same seeded samples) and
turns into a result. It never holds tensors of the batch it runs in.

A request with ``n`` samples is ``n`` rows: the first is the request's own sequence, the
others (``siblings()``) share its prompt and point back to it; its result gathers them all.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from worker.engine.sampling import Logprob
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
    suspect: bool = False  # was running on a worker that died: runs alone (waiting.py)
    deaths_alone: int = 0  # workers that died while it ran alone: fewest first among suspects
    not_before: float = 0.0  # monotonic time before which a charged suspect does not start
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
    grammar: Any = field(default=None, repr=False)  # llguidance.LLMatcher of a constrained row
    closer: Any = field(default=None, repr=False)  # engine.closing.Closer of a constrained row
    logprobs: list[Logprob] | None = field(default=None, repr=False)  # when asked for
    sample: int = 0  # which of the request's n samples this row is
    primary: Sequence | None = field(default=None, repr=False)  # sample 0, for the others
    samples: list[Sequence] = field(default_factory=list, repr=False)  # sample 0: all n rows

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

    @property
    def request_done(self) -> bool:
        """Whether every sample of this row's request has finished."""
        return all(s.done for s in (self.primary or self).samples or [self])

    def siblings(self, row_state) -> list[Sequence]:
        """Samples 1..n-1 of this request (sample 0 is this sequence), each with its own
        backend state (``row_state(i)``: sampler, grammar matcher). Made before it runs."""
        rows = [dataclasses.replace(self, tokens=[], logprobs=None if self.logprobs is None else [],
                                    sample=i, primary=self, samples=[], **row_state(i))
                for i in range(1, self.request.sample_count)]
        self.samples = [self, *rows]
        return rows

    # -- generation -------------------------------------------------------------------

    def accept(self, token: int, eos_ids: frozenset[int], tokenizer,
               logprob: Logprob | None = None) -> bool:
        """Append a generated token; True if the row has finished (EOS, stop string, length,
        or its grammar is complete)."""
        self.tokens.append(token)
        if self.logprobs is not None and logprob is not None and token not in eos_ids:
            self.logprobs.append((token, *logprob))
        if self.grammar is not None and token not in eos_ids and not self.grammar.consume_token(token):
            self.error = {"code": "internal", "message": "the grammar refused the chosen token: "
                          + str(self.grammar.get_error())[:200]}
            self.finish_reason = "error"
        elif token in eos_ids or (self.grammar is not None and self.grammar.is_stopped()):
            self.finish_reason = "stop"
        elif self.stops is not None and self.stops.seen(self.tokens, tokenizer):
            self.finish_reason = "stop_sequence"
        elif len(self.tokens) >= self.request.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def close_cut(self) -> None:
        """End a constrained row that ran out of budget as valid text (``Closer.fit``): its
        tokens are cut back to the longest prefix that can be closed within
        ``max_new_tokens`` and the closing is appended (counted as generated tokens; each
        listed with log-probability 0, its only candidate). A no-op for other rows, and
        once done."""
        if self.closer is None or self.finish_reason != "length":
            return
        fit = self.closer.fit(self.tokens, self.request.max_new_tokens)
        self.closer = None
        if fit is None:  # the closer cannot complete this format in time: left as generated
            return
        keep, closing = fit
        cut = len(self.tokens) - keep
        self.tokens[keep:] = closing
        if self.logprobs is not None:
            del self.logprobs[max(len(self.logprobs) - cut, 0):]
            top = bool(self.request.top_logprobs)
            self.logprobs.extend((t, 0.0, [(t, 0.0)] if top else []) for t in closing)

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
        if self.grammar is not None:
            self.grammar.reset()
        if self.logprobs is not None:
            self.logprobs.clear()

    def text(self, tokenizer) -> str:
        """The generated text so far: never the prompt, never a special token. A running
        constrained row shows only what its end keeps (``close_cut`` may cut the rest)."""
        tokens = self.tokens
        if self.closer is not None and not self.done:
            fit = self.closer.fit(tokens, self.request.max_new_tokens)
            tokens = tokens[:fit[0]] if fit else tokens
        return tokenizer.decode(tokens, skip_special_tokens=True,
                                clean_up_tokenization_spaces=False)

    # -- results ----------------------------------------------------------------------

    def result(self, tokenizer, *, worker: str | None, model: str | None,
               token_bytes=None) -> dict[str, Any]:
        """The contract's result for a finished request (this row, or sample 0 of ``n``);
        ``token_bytes(id)`` gives a token's bytes for log-probabilities."""
        rows = self.samples or [self]
        error = next((r.error for r in rows if r.error is not None), None)
        if error is not None:
            return result_record(self.id, "failed", self.body, worker=worker, model=model,
                                 error=error)
        choices = [r.choice(tokenizer, token_bytes) for r in rows]
        end = max(r.finished_at or time.time() for r in rows)
        start = min((r.admitted_at for r in rows if r.admitted_at), default=end)
        return result_record(
            self.id, next((r.status for r in rows if r.status), "succeeded"), self.body,
            worker=worker, model=model,
            text=choices[0]["text"], finish_reason=choices[0]["finish_reason"],
            logprobs=choices[0]["logprobs"] if len(rows) == 1 else None,
            choices=choices if len(rows) > 1 else None,
            usage={"prompt_tokens": len(self.prompt_ids),
                   "completion_tokens": sum(len(r.tokens) for r in rows)},
            timings={"queued_ms": _ms(start - self.submitted_at), "generate_ms": _ms(end - start),
                     "total_ms": _ms(end - self.submitted_at)},
            batch=self.batch)

    def choice(self, tokenizer, token_bytes=None) -> dict[str, Any]:
        """This row's sample: its text (cut at a stop string), why it ended, its log-probs."""
        text, cut = cut_at_stop(self.text(tokenizer), self.request.stop)
        logprobs = None
        if self.logprobs is not None:
            logprobs = [_logprob(token_bytes, token, logprob, top)
                        for token, logprob, top in self.logprobs]
        return {"index": self.sample, "text": text,
                "finish_reason": "stop_sequence" if cut else self.finish_reason,
                "logprobs": logprobs}


def _logprob(token_bytes, token: int, logprob: float, top: list[tuple[int, float]]) -> dict:
    """OpenAI's shape of one generated token's log-probability."""
    def one(token_id: int, value: float) -> dict[str, Any]:
        raw = token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": value, "bytes": list(raw)}
    return {**one(token, logprob), "top_logprobs": [one(t, v) for t, v in top]}


def _ms(seconds: float) -> float:
    return round(max(seconds, 0.0) * 1000, 1)
