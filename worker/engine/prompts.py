"""Turning a request into prompt token ids, exactly as every batch sees them.

User text never yields control tokens: chat message contents holding special-token text,
and a raw ``prompt`` unless the request sets ``raw_special_tokens``, are tokenized with
special tokens split (``worker.tokencount.prompt_parts``, which the enqueue-time counter
shares, decides which text that is).
"""

from __future__ import annotations

from worker.schema import GenerationRequest
from worker.tokencount import prompt_parts, special_pattern


def _parts(tokenizer, request: GenerationRequest, pattern) -> list[tuple[str, bool, bool]]:
    """``(text, add_special_tokens, split_special_tokens)`` parts of the prompt, in order.

    Chat ``messages`` go through the chat template with ``add_generation_prompt=True``; the
    template already holds any BOS, so no special tokens are added on top of it.
    """
    def render(turns: list[dict]) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)

    messages = None if request.messages is None else [m.model_dump() for m in request.messages]
    return prompt_parts(messages, request.prompt, bool(request.raw_special_tokens), render, pattern)


def encode(tokenizer, requests: list[GenerationRequest], pattern=None) -> list[list[int]]:
    """Prompt token ids of each request (no padding), one batched tokenizer call per kind of
    part (special tokens added or not, split or not). ``pattern``: the tokenizer's
    ``special_pattern``, made here if not given (an engine makes it once)."""
    if pattern is None:
        pattern = special_pattern(tokenizer.added_tokens_decoder)
    split = [_parts(tokenizer, r, pattern) for r in requests]
    ids: list[list[list[int]]] = [[[] for _ in p] for p in split]
    for add, plain in {(a, s) for p in split for _, a, s in p}:
        refs = [(i, j) for i, p in enumerate(split) for j, (_, a, s) in enumerate(p)
                if (a, s) == (add, plain)]
        enc = tokenizer([split[i][j][0] for i, j in refs], add_special_tokens=add,
                        split_special_tokens=plain)
        for (i, j), row in zip(refs, enc["input_ids"], strict=True):
            ids[i][j] = list(row)
    return [[t for row in rows for t in row] for rows in ids]
