"""Stop strings: found while a row generates, and cut from its final text.

A row's stop check decodes only the tail of what it generated (the longest stop string plus a
few tokens), so the check costs the same at token 10 and token 2,000.
"""

from __future__ import annotations


class StopStrings:
    """One row's ``stop`` strings and how many tail tokens must be decoded to see them."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.window = max(len(s) for s in stops) + 8  # a token is at least one character

    def seen(self, tokens: list[int], tokenizer) -> bool:
        """Whether a stop string appears in the decoded tail of ``tokens``."""
        tail = tokenizer.decode(tokens[-self.window:], skip_special_tokens=True,
                                clean_up_tokenization_spaces=False)
        return any(s in tail for s in self.stops)


def cut_at_stop(text: str, stops: list[str] | None) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string; True if one was found."""
    if not stops:
        return text, False
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    if not cuts:
        return text, False
    return text[: min(cuts)], True
