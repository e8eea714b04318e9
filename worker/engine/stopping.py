"""Per-row stopping inside one batch: EOS, each row's own ``max_new_tokens``, its ``stop``
strings, and cancellation. Records, for every row, when and why it finished, so usage counts
and ``finish_reason`` are exact even though the batch runs until its last row is done.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import StoppingCriteria

CancelCheck = Callable[[list[str]], list[bool]]


class RowStopper(StoppingCriteria):
    """Stopping criterion returning one flag per row; finished rows get pads afterwards."""

    def __init__(
        self,
        *,
        prompt_len: int,
        max_new_tokens: list[int],
        eos_ids: set[int],
        stops: list[list[str] | None],
        tokenizer,
        request_ids: list[str],
        is_cancelled: CancelCheck | None = None,
        cancel_every: int = 4,
    ):
        self.prompt_len = prompt_len
        self.max_new = torch.tensor(max_new_tokens, dtype=torch.long)
        self.eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
        self.stops = stops
        self.stop_rows = [i for i, s in enumerate(stops) if s]
        self.stop_window = {i: max(len(s) for s in stops[i]) + 8 for i in self.stop_rows}
        self.tokenizer = tokenizer
        self.request_ids = request_ids
        self.is_cancelled = is_cancelled
        self.cancel_every = cancel_every
        n = len(max_new_tokens)
        self.done = torch.zeros(n, dtype=torch.bool)
        self.lengths = torch.zeros(n, dtype=torch.long)
        self.reasons: list[str | None] = [None] * n

    def _finish(self, mask: torch.Tensor, reason: str, step: int) -> None:
        mask = mask & ~self.done
        for i in mask.nonzero().flatten().tolist():
            self.reasons[i] = reason
        self.lengths[mask] = step
        self.done |= mask

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        step = input_ids.shape[1] - self.prompt_len
        last = input_ids[:, -1].cpu()
        self._finish(torch.isin(last, self.eos), "stop", step)
        for i in self.stop_rows:
            if self.done[i]:
                continue
            tail = input_ids[i, max(self.prompt_len, input_ids.shape[1] - self.stop_window[i]):]
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            if any(s in text for s in self.stops[i]):
                self._finish(_one_hot(len(self.reasons), i), "stop_sequence", step)
        self._finish(step >= self.max_new, "length", step)
        if self.is_cancelled is not None and step % self.cancel_every == 0 and not self.done.all():
            open_rows = (~self.done).nonzero().flatten().tolist()
            flags = self.is_cancelled([self.request_ids[i] for i in open_rows])
            cancelled = [row for row, flag in zip(open_rows, flags, strict=True) if flag]
            if cancelled:
                mask = torch.zeros_like(self.done)
                mask[cancelled] = True
                self._finish(mask, "cancelled", step)
        return self.done.clone().to(input_ids.device)


def _one_hot(n: int, i: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[i] = True
    return mask


def cut_at_stop(text: str, stops: list[str] | None) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string; True if one was found."""
    if not stops:
        return text, False
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    if not cuts:
        return text, False
    return text[: min(cuts)], True
