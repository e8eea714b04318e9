"""Closing a constrained row the budget cut: valid text within ``max_new_tokens``.

A constrained row that reaches ``max_new_tokens`` holds a valid *prefix* of its format
(``{"tags":["red","a``). ``Closer.fit`` keeps the longest run of its tokens after which the
grammar can still be completed within the budget, and completes it: the closing is built byte
by byte from the llguidance matcher's own state (bytes the grammar forces are taken as they
are; otherwise the first byte it allows in an order that ends open values first: inside a
JSON string the closing quote, elsewhere ``}``, ``]``, then the shortest values ``0``, ``""``,
``[]``, ``{}``), then tokenized. The result always satisfies the grammar: required properties
get short values, an enum the value that order reaches first, ``minLength``/``pattern``
strings the first characters they allow. The same closer gives the shortest document of a
format (``shortest``), so a budget too small for any valid document is refused before the
row runs. A format the order cannot complete within its byte cap (a regex such as
``(ab)+c``, whose first choice repeats) has no closing: its cut rows stay as generated.
"""

from __future__ import annotations

import functools
import re
import string

import llguidance

_ESCAPE = re.compile(rb"\\[\s\S]")


def _order(head: str) -> bytes:
    """``head`` first, then every other printable ASCII byte (space last)."""
    rest = string.digits + string.ascii_lowercase + string.ascii_uppercase + string.punctuation + " "
    return (head + "".join(c for c in rest if c not in head)).encode()


IN_STRING = _order('"' + string.ascii_lowercase)  # end the string first
OUTSIDE = _order('}],:0"[{')  # end values and containers first, then the shortest values


class Closer:
    """The closing of one compiled grammar's prefixes (shared by all its rows)."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, template: llguidance.LLMatcher,
                 json: bool):
        self.tokenizer = tokenizer
        self.template = template  # the compiled grammar: only ever copied here
        self.json = json
        byte_tokens = {b: tokenizer.tokenize_bytes(bytes([b])) for b in range(256)}
        self._byte_token = {b: t[0] for b, t in byte_tokens.items() if len(t) == 1}

    @functools.cached_property
    def shortest(self) -> int | None:
        """Tokens of the shortest document this closer writes (None: it finds none)."""
        closing = self._closing(self.template.deep_copy(), b"", cap=4096)
        return None if closing is None else len(closing)

    def fit(self, tokens: list[int], budget: int) -> tuple[int, list[int]] | None:
        """``(keep, closing)``: the most leading ``tokens`` (``keep``) that ``closing``
        completes to a valid document with ``keep + len(closing) <= budget``; None if no
        prefix can be closed in time. ``tokens`` must be a prefix the grammar accepts (what
        it does not accept is dropped)."""
        matcher = self.template.deep_copy()
        keep = matcher.try_consume_tokens(tokens)
        while keep >= 0:
            room = budget - keep
            if room >= 0:
                closing = self._closing(matcher.deep_copy(), self._prefix(tokens[:keep]),
                                        cap=16 * room + 16)
                if closing is not None and len(closing) <= room:
                    return keep, closing
            keep -= 1
            if keep >= 0:
                matcher.rollback(1)
        return None

    # -- internals --------------------------------------------------------------------

    def _prefix(self, tokens: list[int]) -> bytes:
        """What of the prefix decides the closing: whether it ends inside a JSON string
        (and after its backslash), as two bytes that reproduce that state."""
        if not self.json:
            return b""
        plain = _ESCAPE.sub(b"", self.tokenizer.decode_bytes(tokens))
        inside = plain.count(b'"') % 2 == 1
        return (b'"' if inside else b"") + (b"\\" if inside and plain.endswith(b"\\") else b"")

    def _closing(self, matcher: llguidance.LLMatcher, seed: bytes, cap: int) -> list[int] | None:
        """The tokens that complete ``matcher``'s state (consumed on it), at most ``cap``
        bytes; None if it cannot be completed so."""
        out = bytearray()
        while not matcher.is_accepting():
            forced = matcher.compute_ff_bytes()
            if forced:
                step = [self._byte_token.get(b, -1) for b in forced]
            else:
                order = IN_STRING if self.json and _inside(seed + out) else OUTSIDE
                choice = next((b for b in order if b in self._byte_token
                               and matcher.validate_tokens([self._byte_token[b]]) == 1), None)
                if choice is None:
                    return None
                forced, step = bytes([choice]), [self._byte_token[choice]]
            if -1 in step or not matcher.consume_tokens(step):
                return None
            out += forced
            if len(out) > cap:
                return None
        tokens = self.tokenizer.tokenize_bytes(bytes(out))
        return tokens if self.tokenizer.decode_bytes(tokens) == out else None


def _inside(text: bytes) -> bool:
    """Whether JSON text (or its state seed and what followed) ends inside a string."""
    return _ESCAPE.sub(b"", text).count(b'"') % 2 == 1
