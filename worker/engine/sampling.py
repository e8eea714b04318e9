"""Choosing each row's next token with the row's own settings, inside one batch.

Greedy rows take the argmax of their logits row, untouched by anything else in the batch.
A constrained row's grammar first sets the tokens it forbids to ``-inf`` in that row only.
A row with a repetition penalty, temperature, top-k, top-p or log-probabilities has a
``RowSampler`` that applies them (in transformers' order: penalty, temperature, top-k, top-p)
to its own logits row and samples with its own generator, so a seeded request is
reproducible whatever its batch-mates; sample ``i`` of a request with ``n`` samples uses
``seed + i``.

Log-probabilities come from the distribution the row's token was drawn from: the logits after
the grammar mask and the repetition penalty, then (sampling rows) divided by the temperature
and cut by top-k/top-p and renormalised. A greedy row's are the log-softmax of its logits
after the mask and penalty. Tokens the row could not draw (masked or cut) are never listed.
"""

from __future__ import annotations

import torch

from worker.engine.grammar import apply_masks
from worker.schema import GenerationRequest


class RowSampler:
    """One row's sampling settings and random generator."""

    def __init__(self, request: GenerationRequest, sample: int = 0):
        self.temperature = request.temperature if request.samples else 0.0
        self.top_p = request.top_p or 1.0
        self.top_k = request.top_k or 0
        self.penalty = request.repetition_penalty or 1.0
        self.seed = None if request.seed is None else (request.seed + sample) % 2**63
        self.top_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        self._generator: torch.Generator | None = None

    @classmethod
    def for_request(cls, request: GenerationRequest, sample: int = 0) -> RowSampler | None:
        """A sampler for sample number ``sample`` of ``request``, or None for a plain greedy
        row (argmax, nothing else)."""
        if not request.samples and not request.repetition_penalty and not request.logprobs:
            return None
        return cls(request, sample)

    def reset(self) -> None:
        """Start the random stream again (the row restarts from its prompt)."""
        self._generator = None

    def _generator_on(self, device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            if self.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self.seed)
        return self._generator

    def pick(self, logits: torch.Tensor, history: list[int]) -> tuple[int, Logprob | None]:
        """The next token from this row's logits (1-D) and the ids it has seen so far, with
        its log-probability and the top candidates' if the request asked for them."""
        scores = logits.float()
        if self.penalty != 1.0 and history:
            seen_ids = torch.tensor(sorted(set(history)), device=scores.device)
            seen = scores[seen_ids]
            scores = scores.clone()
            scores[seen_ids] = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
            scores = _finite(scores)  # a tiny penalty can overflow a logit
        if self.temperature == 0:
            token = int(scores.argmax())
            if self.top_logprobs is None:
                return token, None
            logp = scores.log_softmax(dim=-1)
            top = logp.topk(self.top_logprobs) if self.top_logprobs else None
            return token, _entry(float(logp[token]), top)
        scores = _finite(scores / self.temperature)
        sorted_scores, order = torch.sort(scores, descending=True)
        if self.top_k > 0:
            sorted_scores[self.top_k:] = float("-inf")
        probs = sorted_scores.softmax(dim=-1)
        if self.top_p < 1.0:
            probs = probs.masked_fill((probs.cumsum(dim=-1) - probs) > self.top_p, 0.0)
        picked = int(torch.multinomial(probs, 1, generator=self._generator_on(scores.device)))
        token = int(order[picked])
        if self.top_logprobs is None:
            return token, None
        logp = (probs / probs.sum()).log()
        k = self.top_logprobs
        top = (logp[:k], order[:k]) if k else None
        return token, _entry(float(logp[picked]), top)


def _finite(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` with +inf as the largest float (softmax of +inf is NaN), NaN as -inf."""
    return scores.nan_to_num(nan=float("-inf"), posinf=torch.finfo(scores.dtype).max)


# a token's log-probability and the best candidates (token id, log-probability)
Logprob = tuple[float, list[tuple[int, float]]]


def _entry(logprob: float, top) -> Logprob:
    if top is None:
        return logprob, []
    values, ids = top
    return logprob, [(int(i), float(v)) for v, i in zip(values.tolist(), ids.tolist(), strict=True)
                     if v != float("-inf")]


def choose_tokens(logits: torch.Tensor, rows) -> tuple[list[int], list[Logprob | None]]:
    """Each row's next token from ``logits`` [rows, vocab] (``rows`` are ``Sequence`` objects
    in batch order): constrained rows' logits are masked first (in place, those rows only),
    then argmax for greedy rows and the row's sampler for the others. Also each row's
    log-probabilities (None where not asked for)."""
    constrained = [(i, row.grammar) for i, row in enumerate(rows) if row.grammar is not None]
    if constrained:
        apply_masks(logits, constrained)
    tokens = logits.argmax(dim=-1).tolist()
    logprobs: list[Logprob | None] = [None] * len(rows)
    for i, row in enumerate(rows):
        if row.sampler is not None:
            tokens[i], logprobs[i] = row.sampler.pick(logits[i], row.prompt_ids + row.tokens)
    return tokens, logprobs
