"""A running batch: rows that decode together, one step at a time, joining and leaving
between steps (the idea of TGI's original ``CausalLMBatch.filter`` / ``concatenate``).

The batch owns its tensors: the model's KV cache, the attention mask (``[rows, length]``,
zero over each row's left padding), each row's next input token and its position id. Rows
joining are prefilled as their own left-padded batch, then both caches are left-padded with
zeros to one length and stacked; rows leaving are dropped from the cache at once and leading
columns that are padding for every remaining row are cut. Every forward pass gets the mask
and per-row position ids, so a row computes exactly what it would alone (float32: equal
greedy text; tested on the real model).

The model is called directly (``model(input_ids, attention_mask, position_ids,
past_key_values)``), so on a GPU Unsloth's own decode path (``LlamaModel_fast_forward_inference``,
taken for one new token with a cache) still runs. That path keeps its KV in buffers on each
attention module and reads only the *length* of the cache it is given, so whenever the rows
change, or another batch used the model in between, those buffers are dropped and it copies
the cache it is given again (``FastDecodeBuffers``).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch
import torch.nn.functional as F

from worker.engine.batching import pad_fraction
from worker.engine.sampling import choose_tokens
from worker.engine.sequence import Sequence

# the attributes Unsloth's fast decode path keeps on each attention module
UNSLOTH_DECODE_BUFFERS = ("paged_attention", "paged_attention_K", "paged_attention_V", "temp_QA",
                          "temp_KV", "RH_Q", "attention", "temp_O")


class FastDecodeBuffers:
    """Which running batch Unsloth's per-module decode buffers belong to (one per model)."""

    def __init__(self, model, enabled: bool):
        self.enabled = enabled
        self.modules = [m for m in model.modules() if hasattr(m, "o_proj")] if enabled else []
        self.owner: tuple[int, int] | None = None

    def claim(self, owner: tuple[int, int]) -> None:
        """Before a decode step of ``owner`` (batch id, version): drop buffers of anyone else."""
        if self.enabled and self.owner != owner:
            self.drop()
            self.owner = owner

    def drop(self) -> None:
        """Forget the buffers (a prefill also wipes them inside Unsloth)."""
        self.owner = None
        for module in self.modules:
            for name in UNSLOTH_DECODE_BUFFERS:
                if hasattr(module, name):
                    delattr(module, name)


def kv_pairs(past) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, from a transformers ``Cache`` or a list of pairs."""
    if hasattr(past, "layers"):
        return [(layer.keys, layer.values) for layer in past.layers]
    return [(kv[0], kv[1]) for kv in past]


def with_kv_pairs(past, pairs: list[tuple[torch.Tensor, torch.Tensor]]):
    """``past`` holding ``pairs`` instead (same container type; a ``Cache`` is updated)."""
    if hasattr(past, "layers"):
        for layer, (k, v) in zip(past.layers, pairs, strict=True):
            layer.keys, layer.values = k, v
        return past
    return list(pairs)


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros on the left of dimension ``dim`` (-1 or -2) up to ``width``."""
    extra = width - t.shape[dim]
    if extra <= 0:
        return t
    return F.pad(t, (extra, 0) if dim == -1 else (0, 0, extra, 0))


def prefill_groups(joiners: list[Sequence], max_pad: float = 1 / 3) -> list[list[Sequence]]:
    """Joiners sorted by prompt length, cut into groups whose left padding stays under
    ``max_pad`` of the group's prompt slots (a group of one has none)."""
    groups: list[list[Sequence]] = []
    for seq in sorted(joiners, key=lambda s: s.prompt_tokens):
        group = groups[-1] if groups else None
        if group is not None:
            real = sum(s.prompt_tokens for s in group) + seq.prompt_tokens
            slots = (len(group) + 1) * seq.prompt_tokens  # the newcomer is the longest
            if 1 - real / slots <= max_pad:
                group.append(seq)
                continue
        groups.append([seq])
    return groups


class RunningBatch:
    """One batch of rows stepping together (a lane of the scheduler)."""

    _serials = itertools.count(1)

    def __init__(self, engine, adapter: str | None = None, *, keep_finished: bool = False):
        self.id = next(self._serials)  # for logs: which rows shared a batch
        self.engine = engine
        self.adapter = adapter
        self.keep_finished = keep_finished  # static mode: finished rows compute until all end
        self.rows: list[Sequence] = []
        self.past: Any = None
        self.mask: torch.Tensor | None = None
        self.next_ids: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.version = 0  # bumped whenever the rows change
        self.cap: int | None = None  # rows it may hold after an out-of-memory error
        self.last_step = float("-inf")  # wall clock time of its last decode step

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def live(self) -> list[Sequence]:
        return [r for r in self.rows if not r.done]

    @property
    def length(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    # -- joining ----------------------------------------------------------------------

    @torch.inference_mode()
    def admit(self, joiners: list[Sequence], size: int | None = None) -> list[Sequence]:
        """Prefill ``joiners`` as one left-padded batch and merge them in; the rows that
        finished on their first token (already out of the batch, unless static). ``size``:
        the rows the batch will hold once every group of this join is in.

        On an exception (out-of-memory inside the prefill) the batch is unchanged."""
        engine = self.engine
        size = size or len(self.rows) + len(joiners)
        started = time.time()
        device = engine.device
        # samples of one request share their prompt: it is prefilled once, then copied
        firsts: dict[int, Sequence] = {}  # request -> its first joiner
        for seq in joiners:
            firsts.setdefault(id(seq.primary or seq), seq)
        rank = {key: i for i, key in enumerate(firsts)}
        copies = [rank[id(s.primary or s)] for s in joiners]
        prompts = [s.prompt_ids for s in firsts.values()]
        enc = engine.tokenizer.pad({"input_ids": prompts}, padding=True,
                                   padding_side=engine.padding_side, return_tensors="pt")
        input_ids = enc["input_ids"].to(device)
        mask = enc["attention_mask"].to(device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as transformers' generate
        engine.select_adapter(self.adapter)
        engine.fast_buffers.drop()  # a prefill wipes Unsloth's decode buffers anyway
        out = engine.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                           use_cache=True, logits_to_keep=1, return_dict=True)
        logits = out.logits[:, -1, :]
        past = out.past_key_values
        del out
        if len(prompts) < len(joiners):
            index = torch.tensor(copies, device=device)
            logits, mask = logits[index], mask[index]
            past = with_kv_pairs(past, [(k[index], v[index]) for k, v in kv_pairs(past)])
        tokens, logprobs = choose_tokens(logits, joiners)
        batch = {"size": size,
                 "pad_fraction": round(pad_fraction([s.prompt_tokens for s in joiners]), 4)}
        for seq in joiners:
            seq.admitted_at = started
            seq.batch = batch
            seq.batch_id = self.id
        self._merge(past, mask, joiners, [s.prompt_tokens for s in joiners])
        return self._accept(tokens, logprobs, joiners)

    def _merge(self, past, mask: torch.Tensor, joiners: list[Sequence], positions: list[int]) -> None:
        device = mask.device
        if not self.rows:
            self.past, self.mask = past, mask
            self.next_ids = torch.zeros(0, dtype=torch.long, device=device)
            self.positions = torch.zeros(0, dtype=torch.long, device=device)
        else:
            width = max(self.length, int(mask.shape[1]))
            pairs = [(torch.cat([_left_pad(k1, width, -2), _left_pad(k2, width, -2)]),
                      torch.cat([_left_pad(v1, width, -2), _left_pad(v2, width, -2)]))
                     for (k1, v1), (k2, v2) in zip(kv_pairs(self.past), kv_pairs(past), strict=True)]
            self.past = with_kv_pairs(self.past, pairs)
            self.mask = torch.cat([_left_pad(self.mask, width, -1), _left_pad(mask, width, -1)])
        self.rows.extend(joiners)
        self.next_ids = torch.cat([self.next_ids, torch.zeros(len(joiners), dtype=torch.long,
                                                              device=device)])
        self.positions = torch.cat([self.positions, torch.tensor(positions, device=device)])
        self.version += 1

    # -- stepping ---------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """One decode step for every row; returns the rows that finished in it.

        On an exception (out-of-memory inside the forward pass) the batch is left as it was
        before the step, so the caller can evict rows and step again.
        """
        engine = self.engine
        length = self.length
        ones = torch.ones(len(self.rows), 1, dtype=self.mask.dtype, device=self.mask.device)
        mask = torch.cat([self.mask, ones], dim=1)
        engine.select_adapter(self.adapter)
        engine.fast_buffers.claim((id(self), self.version))
        try:
            out = engine.model(input_ids=self.next_ids[:, None], attention_mask=mask,
                               position_ids=self.positions[:, None], past_key_values=self.past,
                               use_cache=True, return_dict=True)
        except BaseException:
            self._crop(length)  # layers before the failing one already grew by one column
            engine.fast_buffers.drop()
            raise
        logits = out.logits[:, -1, :]
        self.past = out.past_key_values
        del out
        self.mask = mask
        self.positions += 1
        self.last_step = time.time()
        live = self.live
        if len(live) == len(self.rows):
            tokens, logprobs = choose_tokens(logits, self.rows)
        else:  # static mode: finished rows get pads, like transformers' generate
            index = [i for i, r in enumerate(self.rows) if not r.done]
            tokens = [engine.pad.token_id] * len(self.rows)
            logprobs = [None] * len(self.rows)
            chosen, their_logprobs = choose_tokens(logits[index], live)
            for i, token, logprob in zip(index, chosen, their_logprobs, strict=True):
                tokens[i], logprobs[i] = token, logprob
        return self._accept(tokens, logprobs, self.rows)

    def _accept(self, tokens: list[int], logprobs: list, rows: list[Sequence]) -> list[Sequence]:
        """Record each row's new token; drop the rows that finished."""
        engine = self.engine
        start = len(self.rows) - len(rows)
        self.next_ids[start:] = torch.tensor(tokens, device=self.next_ids.device)
        finished = [row for row, token, logprob in zip(rows, tokens, logprobs, strict=True)
                    if not row.done and row.accept(token, engine.eos_ids, engine.tokenizer, logprob)]
        now = time.time()
        for row in finished:
            row.finished_at = now
        self._settle()
        return finished

    def _crop(self, length: int) -> None:
        pairs = kv_pairs(self.past)
        if any(k.shape[-2] > length for k, _ in pairs):
            self.past = with_kv_pairs(self.past, [(k[..., :length, :], v[..., :length, :])
                                                  for k, v in pairs])

    # -- leaving ----------------------------------------------------------------------

    @torch.inference_mode()
    def remove(self, rows: list[Sequence]) -> None:
        """Take ``rows`` out of the batch now (cancelled, expired, evicted)."""
        gone = {id(r) for r in rows}
        self._keep([i for i, r in enumerate(self.rows) if id(r) not in gone])

    def _settle(self) -> None:
        """Drop finished rows (static mode: only once every row has finished)."""
        if self.keep_finished:
            if self.rows and all(r.done for r in self.rows):
                self._keep([])
        elif any(r.done for r in self.rows):
            self._keep([i for i, r in enumerate(self.rows) if not r.done])

    def _keep(self, index: list[int]) -> None:
        if len(index) == len(self.rows):
            return
        self.version += 1
        if not index:
            self.rows, self.past, self.mask, self.next_ids, self.positions = [], None, None, None, None
            self.cap = None
            return
        keep = torch.tensor(index, device=self.mask.device)
        mask = self.mask[keep]
        first = int(mask.any(dim=0).nonzero()[0])  # columns that are padding for every row go
        self.mask = mask[:, first:]
        self.past = with_kv_pairs(self.past, [(k[keep, :, first:], v[keep, :, first:])
                                              for k, v in kv_pairs(self.past)])
        self.next_ids = self.next_ids[keep]
        self.positions = self.positions[keep]
        self.rows = [self.rows[i] for i in index]
