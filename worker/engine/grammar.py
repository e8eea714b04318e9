"""Grammar masks for constrained rows (llguidance), and each token's bytes.

A constrained row holds its own ``LLMatcher``: before each of the row's tokens is chosen, the
matcher says which tokens may come next and every other token's logit becomes ``-inf`` in
that row only (rows without a constraint are never touched). The masks of all constrained
rows of a step are computed together on llguidance's thread pool.

Compiled grammars are cached per worker by the hash of their ``response_format`` (least
recently used first out, ``GENQ_GRAMMAR_CACHE_SIZE``); a row gets a copy of the cached matcher,
so a schema used by 10,000 requests is compiled once. Each cached grammar comes with its
``Closer`` (``worker.engine.closing``): what ends a row the budget cut as valid text.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from typing import Any

import llguidance
import torch

from worker.engine.closing import SHORTEST_BYTES, Closer
from worker.errors import InvalidRequest
from worker.structured import constraint, format_key, grammar_for


class Grammars:
    """The compiled grammars and the llguidance view of one engine's tokenizer."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: frozenset[int], cache_size: int = 128):
        self.tokenizer = llguidance.LLTokenizer(_tokenizer_json(tokenizer), n_vocab=vocab_size,
                                                eos_token=sorted(eos_ids))
        self.cache_size = cache_size
        self._compiled: OrderedDict[str, Closer] = OrderedDict()  # each grammar with its closer
        self.hits = 0
        self.misses = 0

    def matcher(self, spec: dict[str, Any]) -> llguidance.LLMatcher:
        """A fresh matcher for a ``response_format`` (compiled once per distinct format);
        ``InvalidRequest`` naming the problem if it cannot be compiled for this tokenizer."""
        return self.compiled(spec).deep_copy()

    def compiled(self, spec: dict[str, Any]) -> llguidance.LLMatcher:
        """The cached compiled grammar of a format (never consume tokens with it: copy it);
        ``InvalidRequest`` if it cannot be compiled for this tokenizer."""
        key = format_key(spec)
        entry = self._compiled.get(key)
        if entry is None:
            self.misses += 1
            entry = self._compiled[key] = self._compile(spec)
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        else:
            self.hits += 1
            self._compiled.move_to_end(key)
        return entry.template

    def closer(self, spec: dict[str, Any], budget: int) -> Closer:
        """The closer of a format (its grammar as ``compiled`` cached it; not counted as a hit);
        ``InvalidRequest`` if ``budget`` tokens cannot hold the shortest valid document, or
        the closer finds none (a row it could not close would end invalid)."""
        entry = self._compiled.get(format_key(spec)) or self._compile(spec)
        if entry.shortest is None:
            raise InvalidRequest(
                f"response_format: no valid document of at most {SHORTEST_BYTES} bytes was "
                "found, so a row cut by max_new_tokens could not end valid")
        if budget < entry.shortest:
            raise InvalidRequest(
                f"max_new_tokens: {budget} tokens cannot hold a document valid for "
                f"response_format (the shortest takes {entry.shortest})")
        return entry

    def _compile(self, spec: dict[str, Any]) -> Closer:
        grammar = grammar_for(spec)
        template = llguidance.LLMatcher(self.tokenizer, grammar)
        if template.is_error():
            raise InvalidRequest(f"response_format: {template.get_error()}")
        return Closer(self.tokenizer, template, grammar, json=constraint(spec)[0] == "json")

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (a special token's text for special tokens)."""
        return self.tokenizer.decode_bytes([token])


def apply_masks(logits: torch.Tensor, rows: list[tuple[int, llguidance.LLMatcher]]) -> None:
    """Set to ``-inf``, in place, the logits each constrained row's grammar forbids
    (``rows``: (row index in ``logits``, matcher)); other rows are left as they are."""
    global _executor
    if _executor is None:
        _executor = llguidance.LLExecutor()
    bitmask = torch.empty(len(rows), (logits.shape[-1] + 31) // 32, dtype=torch.int32)
    # what ``llguidance.torch.fill_next_token_bitmask_par`` does; that module is not imported
    # because it compiles a kernel with ``torch.compile`` at import (2 s of every start-up)
    _executor.unsafe_compute_mask_ptr([(m, j) for j, (_, m) in enumerate(rows)],
                                      bitmask.data_ptr(), bitmask.shape[1] * 4, len(rows))
    # the packed mask goes to the logits' device (1 bit per token), and is unpacked there
    bitmask = bitmask.to(logits.device)
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)
    forbidden = ((bitmask.unsqueeze(-1) >> bits) & 1).flatten(1)[:, :logits.shape[-1]] == 0
    index = torch.tensor([i for i, _ in rows], device=logits.device)
    logits[index] = logits[index].masked_fill(forbidden, float("-inf"))


_executor: llguidance.LLExecutor | None = None  # llguidance's thread pool, made on first use


def _tokenizer_json(tokenizer) -> str:
    """The fast tokenizer as llguidance reads it (``tokenizer.json``). A decoder that chains
    ByteLevel after steps that do nothing to a byte-level vocabulary (as GGUF conversions
    write) is given as plain ByteLevel: llguidance would otherwise read ``Ġ`` as a letter."""
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise InvalidRequest("response_format: this worker's tokenizer is not a fast tokenizer")
    backend = copy.copy(tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    data = json.loads(backend.to_str())
    decoder = data.get("decoder") or {}
    steps = decoder.get("decoders") or [] if decoder.get("type") == "Sequence" else []
    byte_level = [d for d in steps if d.get("type") == "ByteLevel"]
    if byte_level:
        data["decoder"] = byte_level[0]
    return json.dumps(data)
