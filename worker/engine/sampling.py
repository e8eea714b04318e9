"""Per-row sampling inside one batch, so rows never run with another row's settings.

``generate`` runs greedily; this logits processor applies each row's repetition penalty,
temperature, top-k and top-p, samples the row's token with the row's own generator (seeded
rows are reproducible whatever their batch-mates) and leaves only that token selectable.
Greedy rows pass through untouched.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class RowSampler(LogitsProcessor):
    """A logits processor holding one sampling setting per row of the batch."""

    def __init__(self, temperature, top_p, top_k, repetition_penalty, seeds):
        self.temperature = torch.tensor(temperature, dtype=torch.float32)
        self.top_p = torch.tensor(top_p, dtype=torch.float32)
        self.top_k = torch.tensor(top_k, dtype=torch.long)
        self.penalty = torch.tensor(repetition_penalty, dtype=torch.float32)
        self.seeds = seeds
        self.sampled = self.temperature > 0
        self._generators: list[torch.Generator] | None = None

    @classmethod
    def for_requests(cls, requests) -> RowSampler | None:
        """A sampler for these requests, or None when every row is plain greedy."""
        if all(not r.samples and not r.repetition_penalty for r in requests):
            return None
        return cls(
            temperature=[r.temperature for r in requests],
            top_p=[r.top_p or 1.0 for r in requests],
            top_k=[r.top_k or 0 for r in requests],
            repetition_penalty=[r.repetition_penalty or 1.0 for r in requests],
            seeds=[r.seed for r in requests],
        )

    def _generator_for(self, device) -> list[torch.Generator]:
        if self._generators is None:
            shared = torch.Generator(device=device)
            shared.seed()
            self._generators = [
                torch.Generator(device=device).manual_seed(s) if s is not None else shared
                for s in self.seeds
            ]
        return self._generators

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        device = scores.device
        penalty = self.penalty.to(device)
        if bool((penalty != 1.0).any()):
            seen = torch.gather(scores, 1, input_ids)
            factor = penalty[:, None]
            seen = torch.where(seen < 0, seen * factor, seen / factor)
            scores = scores.scatter(1, input_ids, seen)
        if not bool(self.sampled.any()):
            return scores

        rows = self.sampled.nonzero().squeeze(1).tolist()
        logits = scores[rows].float() / self.temperature[rows, None].to(device)
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        positions = torch.arange(logits.shape[-1], device=device)[None, :]
        top_k = self.top_k[rows, None].to(device)
        sorted_logits = sorted_logits.masked_fill((top_k > 0) & (positions >= top_k), float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        drop = (probs.cumsum(dim=-1) - probs) > self.top_p[rows, None].to(device)
        probs = probs.masked_fill(drop, 0.0)

        generators = self._generator_for(device)
        picked = torch.stack(
            [torch.multinomial(probs[i], 1, generator=generators[row]) for i, row in enumerate(rows)]
        )
        tokens = order.gather(1, picked).squeeze(1)
        forced = torch.full_like(scores[rows], float("-inf"))
        forced.scatter_(1, tokens[:, None], 0.0)
        scores = scores.clone()
        scores[rows] = forced
        return scores
