"""The step loop over vLLM: our policy admits waiting rows into vLLM's engine, vLLM steps
them all (one forward pass, mixed adapters, chunked prefill), and each row's new tokens and
end come back as ``Sequence`` updates, so the worker's consumer and ``Engine.generate`` drive
it exactly as they drive our own loop.

Priorities map onto vLLM's priority scheduling (interactive 0, bulk 1): when its KV cache
runs short vLLM preempts bulk rows first and recomputes them later, never failing a
request. While interactive rows run, the policy keeps bulk to ``engine.bulk_share`` rows
(the youngest bulk rows go back to waiting), so an interactive request decodes in a small
batch.
A cancelled or expired row is aborted in vLLM before the next step. A request vLLM raises
for in a step (an adapter it cannot load) fails alone with ``invalid_request``; the other rows
restart (``VllmScheduler._step_failed``).
"""

from __future__ import annotations

import time
import uuid

import structlog

from worker.engine.policy import INTERACTIVE, Limits, admit_paged
from worker.engine.scheduler import OOM_ERRORS
from worker.engine.sequence import Sequence
from worker.engine.waiting import StepLoop, requests_done
from worker.errors import InvalidRequest

log = structlog.get_logger(__name__)
PRIORITY = {INTERACTIVE: 0, "bulk": 1}  # vLLM runs lower values first


class VllmScheduler(StepLoop):
    """Rows waiting here, rows running inside vLLM; ``step()`` admits, then steps vLLM once."""

    def __init__(self, engine, limits: Limits, headroom: int):
        super().__init__(engine, limits)
        self.llm = engine.model
        self.headroom = headroom
        self.inflight: dict[str, Sequence] = {}  # vLLM request id -> row
        self._prefix = uuid.uuid4().hex[:8]  # request ids unique across loops on one engine

    @property
    def running(self) -> list[Sequence]:
        return list(self.inflight.values())

    def step(self) -> list[Sequence]:
        """Admit what the policy lets in, step vLLM once; the requests that finished."""
        finished = self._admit()
        if not self.inflight:
            return requests_done(finished)
        rows = len(self.inflight)
        try:
            outputs = self.llm.step()
        except Exception as exc:
            failed = self._step_failed(exc)
            if failed is None:
                raise
            return requests_done(finished + failed)
        self.steps += 1
        self.last_step_rows = rows
        self.row_steps += rows
        now = time.time()
        for out in outputs:
            seq = self.inflight.get(out.request_id)
            if seq is None:  # aborted meanwhile
                continue
            completion = out.outputs[0]
            if completion.token_ids:
                self.useful_row_steps += 1
                self._accept(seq, completion)
            if out.finished:
                del self.inflight[out.request_id]
                seq.finish_reason = _finish_reason(completion)
                self._grammar_end(seq)
                if seq.finish_reason == "error":
                    seq.error = {"code": "internal",
                                 "message": f"vLLM ended the request: {completion.finish_reason}"}
                seq.finished_at = now
                finished.append(seq)
        return requests_done(finished)

    def _admit(self) -> list[Sequence]:
        """Add the rows the policy admits to vLLM; rows vLLM refuses fail alone."""
        from vllm.inputs import tokens_input  # our token ids, as vLLM's renderer would pass them

        decision = admit_paged(self._waiting_view(), self._view(self.inflight.values()),
                               self.limits.max_rows, self.headroom,
                               max_bulk_prefill=self.limits.max_bulk_prefill_tokens,
                               bulk_share=self.engine.bulk_share,
                               mix_adapters=self.engine.mixes_adapters)
        if decision.evict:
            self._evict(set(decision.evict))
        failed: list[Sequence] = []
        now = time.time()
        for seq in self._admitting(decision.admit):
            request_id = f"{self._prefix}-{seq.handle}"
            why = None
            if seq.adapter in self.engine.refused:  # it failed to load in a step: load it here
                why = self.engine.adapter_refused(seq.adapter)
            if why is None:
                try:
                    self.llm.add_request(
                        request_id, tokens_input(seq.prompt_ids),
                        self.engine.sampling_params(seq),
                        lora_request=self.engine.lora_request(seq.adapter),
                        priority=PRIORITY[seq.priority], arrival_time=seq.submitted_at)
                except Exception as exc:  # noqa: BLE001 - vLLM validates with plain ValueErrors
                    why = f"vLLM refused it: {exc}"
            if why is not None:
                failed.append(_refused(seq, why, now))
                continue
            seq.admitted_at = now
            seq.batch = {"size": len(self.inflight) + 1, "pad_fraction": 0.0}
            self.inflight[request_id] = seq
        return failed

    def _step_failed(self, exc: Exception) -> list[Sequence] | None:
        """vLLM raised in a step: the rows of the request it raised for, failed alone; None
        when no request is to blame (out of memory, vLLM itself: the caller re-raises).

        The others leave vLLM and restart from their prompt (same greedy text, same seeded
        samples): the failed step had scheduled them, and registered prefix blocks it never
        computed, so the prefix cache is reset too. A ValueError (how vLLM refuses a request)
        with several requests running and no adapter to blame makes them all *suspects*: each
        then runs alone (``StepLoop._waiting_view``), so the next failure names its request."""
        rows = dict(self.inflight)
        blamed = self._blame(list(rows.values()), exc)
        if blamed is None:
            return None
        self.llm.abort_request(list(rows))
        self.inflight.clear()
        if not self.llm.reset_prefix_cache():  # blocks still held: nothing to vouch for
            return None
        now = time.time()
        failed = [s for s in self.waiting.values() if s.id in blamed]  # their other samples
        for seq in failed:
            del self.waiting[seq.handle]
        restarted = [s for s in rows.values() if s.id not in blamed]
        failed += [s for s in rows.values() if s.id in blamed]
        for seq in restarted:
            seq.restart()
            seq.suspect = seq.suspect or not blamed
            self.waiting[seq.handle] = seq
        self.evictions += len(restarted)
        log.warning("vllm_step_failed", error=f"{type(exc).__name__}: {exc}"[:300],
                    failed=sorted(blamed), restarted=sorted({s.id for s in restarted}))
        return [_refused(seq, blamed[seq.id], now) for seq in failed]

    def _blame(self, rows: list[Sequence], exc: Exception) -> dict[str, str] | None:
        """Request id -> why vLLM refused it: the requests whose adapter does not load, or the
        one request running when vLLM raised a ValueError; {} for a ValueError among several
        requests; None when the failure is not a request's."""
        if isinstance(exc, OOM_ERRORS):
            return None
        refused = {adapter: why for adapter in sorted({s.adapter for s in rows if s.adapter})
                   if (why := self.engine.adapter_refused(adapter)) is not None}
        if refused:
            return {s.id: refused[s.adapter] for s in rows if s.adapter in refused}
        if not isinstance(exc, ValueError):
            return None
        if len({s.id for s in rows}) == 1:
            return {s.id: f"vLLM refused it: {exc}" for s in rows}
        return {}

    def _evict(self, handles: set[str]) -> None:
        """Take these rows out of vLLM and back to waiting; they restart from their prompt
        (same greedy text, same seeded samples), their prompt likely still in vLLM's cache."""
        rows = {rid: s for rid, s in self.inflight.items() if s.handle in handles}
        self.llm.abort_request(list(rows))
        for rid, seq in rows.items():
            del self.inflight[rid]
            seq.restart()
            self.waiting[seq.handle] = seq
        self.evictions += len(rows)
        log.info("rows_evicted", reason="interactive_first", request_ids=[s.id for s in rows.values()])

    def _accept(self, seq: Sequence, completion) -> None:
        """Append a row's new tokens (and their log-probabilities)."""
        new = list(completion.token_ids)
        if seq.logprobs is not None and completion.logprobs:
            k = seq.request.top_logprobs or 0
            for token, entry in zip(new, completion.logprobs, strict=False):
                if token in self.engine.eos_ids or token not in entry:
                    continue
                top = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None
                              and lp.rank <= k and lp.logprob != float("-inf")),
                             key=lambda item: item[1].rank)
                seq.logprobs.append((token, entry[token].logprob,
                                     [(t, lp.logprob) for t, lp in top]))
        seq.tokens.extend(new)

    def _grammar_end(self, seq: Sequence) -> None:
        """End a constrained row where the step loop ends it: as soon as its grammar is
        complete. vLLM goes on to generate the EOS the grammar then forces (or runs out of
        ``max_tokens`` before it), a token the step loop never samples: it is not counted and
        the row ends ``stop``, so ``usage`` and ``finish_reason`` agree between backends."""
        if seq.closer is None or seq.finish_reason not in ("stop", "length"):
            return
        body = seq.tokens[:-1] if seq.tokens and seq.tokens[-1] in self.engine.eos_ids else seq.tokens
        matcher = seq.closer.template.deep_copy()  # the row's own grammar: no cache lookup
        if matcher.consume_tokens(body) and matcher.is_stopped():
            del seq.tokens[len(body):]
            seq.finish_reason = "stop"

    def _stop_running(self, ids: set[str]) -> list[Sequence]:
        aborted = {rid: s for rid, s in self.inflight.items() if s.id in ids and not s.done}
        if aborted:
            self.llm.abort_request(list(aborted))
            for rid in aborted:
                del self.inflight[rid]
        return list(aborted.values())


def _refused(seq: Sequence, message: str, now: float) -> Sequence:
    """End a row that vLLM refused: failed, ``invalid_request``."""
    seq.error = InvalidRequest(message[:500]).as_error()
    seq.finish_reason = "error"
    seq.finished_at = now
    return seq


def _finish_reason(completion) -> str:
    """Ours from vLLM's: ``stop`` (EOS or grammar complete), ``stop_sequence``, ``length``."""
    if completion.finish_reason == "length":
        return "length"
    if completion.finish_reason == "stop":
        return "stop_sequence" if isinstance(completion.stop_reason, str) else "stop"
    return "error"
