"""Choosing each row's next token with the row's own settings, inside one batch.

Greedy rows take the argmax of their logits row, untouched by anything else in the batch.
A row with a repetition penalty, temperature, top-k or top-p has a ``RowSampler`` that applies
them (in transformers' order: penalty, temperature, top-k, top-p) to its own logits row and
samples with its own generator, so a seeded request is reproducible whatever its batch-mates.
"""

from __future__ import annotations

import torch

from worker.schema import GenerationRequest


class RowSampler:
    """One row's sampling settings and random generator."""

    def __init__(self, request: GenerationRequest):
        self.temperature = request.temperature
        self.top_p = request.top_p or 1.0
        self.top_k = request.top_k or 0
        self.penalty = request.repetition_penalty or 1.0
        self.seed = request.seed
        self._generator: torch.Generator | None = None

    @classmethod
    def for_request(cls, request: GenerationRequest) -> RowSampler | None:
        """A sampler, or None for a plain greedy row (argmax, nothing else)."""
        if not request.samples and not request.repetition_penalty:
            return None
        return cls(request)

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

    def pick(self, logits: torch.Tensor, history: list[int]) -> int:
        """The next token from this row's logits (1-D) and the ids it has seen so far."""
        scores = logits.float()
        if self.penalty != 1.0 and history:
            seen_ids = torch.tensor(sorted(set(history)), device=scores.device)
            seen = scores[seen_ids]
            scores = scores.clone()
            scores[seen_ids] = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        if self.temperature == 0:
            return int(scores.argmax())
        scores = scores / self.temperature
        sorted_scores, order = torch.sort(scores, descending=True)
        if self.top_k > 0:
            sorted_scores[self.top_k:] = float("-inf")
        probs = sorted_scores.softmax(dim=-1)
        if self.top_p < 1.0:
            probs = probs.masked_fill((probs.cumsum(dim=-1) - probs) > self.top_p, 0.0)
        picked = torch.multinomial(probs, 1, generator=self._generator_on(scores.device))
        return int(order[picked])


def choose_tokens(logits: torch.Tensor, rows) -> list[int]:
    """Each row's next token from ``logits`` [rows, vocab]: argmax for greedy rows, the row's
    sampler for the others (``rows`` are ``Sequence`` objects in batch order)."""
    tokens = logits.argmax(dim=-1).tolist()
    for i, row in enumerate(rows):
        if row.sampler is not None:
            tokens[i] = row.sampler.pick(logits[i], row.prompt_ids + row.tokens)
    return tokens
