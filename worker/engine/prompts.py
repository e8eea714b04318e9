"""Turning a request into prompt token ids, exactly as every batch sees them."""

from __future__ import annotations

from worker.schema import GenerationRequest


def render(tokenizer, request: GenerationRequest) -> tuple[str, bool]:
    """(prompt text, whether the tokenizer should add its special tokens).

    Chat ``messages`` go through the chat template with ``add_generation_prompt=True``; the
    template already holds any BOS, so no special tokens are added on top of it.
    """
    if request.messages is not None:
        turns = [m.model_dump() for m in request.messages]
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return text, False
    return request.prompt, True


def encode(tokenizer, requests: list[GenerationRequest]) -> list[list[int]]:
    """Prompt token ids of each request (no padding), tokenized in two batched calls."""
    rendered = [render(tokenizer, r) for r in requests]
    ids: list[list[int] | None] = [None] * len(requests)
    for add_special in (False, True):
        idx = [i for i, (_, add) in enumerate(rendered) if add is add_special]
        if idx:
            enc = tokenizer([rendered[i][0] for i in idx], add_special_tokens=add_special)
            for i, row in zip(idx, enc["input_ids"], strict=True):
                ids[i] = list(row)
    return ids  # type: ignore[return-value]
