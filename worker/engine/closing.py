"""Closing a constrained row the budget cut: valid text within ``max_new_tokens``.

A constrained row that reaches ``max_new_tokens`` holds a valid *prefix* of its format
(``{"tags":["red","a``). ``Closer.fit`` keeps the longest run of its tokens after which the
grammar can still be completed within the budget, and completes it. The closing comes from
the llguidance matcher's own state, two ways:

- the fast path, byte by byte: bytes the grammar forces are taken as they are; otherwise the
  first byte it allows in an order that ends open values first (inside a JSON string the
  closing quote, elsewhere ``}``, ``]``, then the shortest values ``0``, ``""``, ``[]``,
  ``{}``). Required properties get short values, an enum the value that order reaches first,
  ``minLength`` strings the first characters they allow;
- where that order does not end within ``GREEDY_BYTES`` (its first choice repeats: an email
  or URI string, ``^[a-z]+@[a-z]+\.com$``, ``(ab)+c``), a search: breadth-first over copies
  of the grammar's matcher on single bytes (``_byte_tokenizer``: its masks take microseconds),
  a level per byte, each level keeping one state per distinct mask (every letter of
  ``[a-z]+`` leads to one), in that same order. It stops at the first state from which the
  fast path ends the document, or the JSON string it looped in, and goes on from there: the
  shortest way out of each loop (``a@a"}`` for an email).

The result always satisfies the grammar. The same closer gives the shortest document of a
format (``shortest``): a format with none within ``SHORTEST_BYTES``, or a budget too small for
it, is refused before the row runs (``worker.engine.grammar``).
"""

from __future__ import annotations

import functools
import string

import llguidance

SHORTEST_BYTES = 4096  # a format whose shortest document is longer is refused
GREEDY_BYTES = 512  # the fast path's closing before the search is tried (a loop runs to it)
SEARCH_WIDTH = 32  # states the search keeps per byte
SEARCH_STATES = 256  # states it tries the fast path from, at most
TAIL_BYTES = 32  # how far it runs the fast path from each


def _order(head: str) -> bytes:
    """``head`` first, then every other printable ASCII byte (space last)."""
    rest = string.digits + string.ascii_lowercase + string.ascii_uppercase + string.punctuation + " "
    return (head + "".join(c for c in rest if c not in head)).encode()


IN_STRING = _order('"' + string.ascii_lowercase)  # end the string first
OUTSIDE = _order('}],:0"[{')  # end values and containers first, then the shortest values


class Closer:
    """The closing of one compiled grammar's prefixes (shared by all its rows)."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, template: llguidance.LLMatcher,
                 grammar: str, json: bool):
        self.tokenizer = tokenizer
        self.template = template  # the compiled grammar: only ever copied here
        self.grammar = grammar
        self.json = json
        byte_tokens = {b: tokenizer.tokenize_bytes(bytes([b])) for b in range(256)}
        self._byte_token = {b: t[0] for b, t in byte_tokens.items() if len(t) == 1}

    @functools.cached_property
    def shortest(self) -> int | None:
        """Tokens of the shortest document this closer writes (None: none within
        ``SHORTEST_BYTES``)."""
        closing = self._closing(self.template.deep_copy(), b"", cap=SHORTEST_BYTES)
        return None if closing is None else len(closing)

    def fit(self, tokens: list[int], budget: int) -> tuple[int, list[int]] | None:
        """``(keep, closing)``: the most leading ``tokens`` (``keep``) that ``closing``
        completes to a valid document with ``keep + len(closing) <= budget``; None if no
        prefix can be closed in time. ``tokens`` must be a prefix the grammar accepts (what
        it does not accept is dropped); a prefix that ends inside a character is never kept
        (the text shown while the row ran would change)."""
        matcher = self.template.deep_copy()
        keep = matcher.try_consume_tokens(tokens)
        while keep >= 0:
            room = budget - keep
            prefix = self.tokenizer.decode_bytes(tokens[:keep])
            if room >= 0 and _whole(prefix):
                closing = self._closing(matcher.deep_copy(), prefix, cap=16 * room + 16)
                if closing is not None and len(closing) <= room:
                    return keep, closing
            keep -= 1
            if keep >= 0:
                matcher.rollback(1)
        return None

    # -- internals --------------------------------------------------------------------

    @functools.cached_property
    def _byte_template(self) -> llguidance.LLMatcher:
        """The grammar over single bytes (what the search copies: its masks take
        microseconds, a model vocabulary's up to a few tenths of a millisecond)."""
        return llguidance.LLMatcher(_byte_tokenizer(), self.grammar)

    def _order(self, string_state: tuple[bool, bool]) -> bytes:
        """The fast path's order where the text so far has ``string_state`` (``_scan``)."""
        return IN_STRING if self.json and string_state[0] else OUTSIDE

    def _closing(self, matcher: llguidance.LLMatcher, prefix: bytes, cap: int) -> list[int] | None:
        """The tokens that complete ``matcher``'s state (reached by ``prefix``), at most
        ``cap`` bytes: the fast path, else the search, else the fast path to the cap (a long
        ``minLength``); None if it cannot be completed so."""
        string_state = _scan(OUTSIDE_STRING, prefix)
        out = self._greedy(matcher.deep_copy(), string_state, min(cap, GREEDY_BYTES))
        if out is None:
            out = self._search(prefix, cap)
        if out is None and cap > GREEDY_BYTES:
            out = self._greedy(matcher, string_state, min(cap, SHORTEST_BYTES))
        if out is None:
            return None
        tokens = self.tokenizer.tokenize_bytes(out)
        return tokens if self.tokenizer.decode_bytes(tokens) == out else None

    def _greedy(self, matcher: llguidance.LLMatcher, string_state: tuple[bool, bool],
                cap: int) -> bytes | None:
        """The fast path's closing of ``matcher``'s state (consumed on it; after text with
        ``string_state``), at most ``cap`` bytes; None if it does not end so."""
        out, done, _ = self._run(matcher, string_state, cap, self._byte_token)
        return out if done else None

    def _run(self, matcher: llguidance.LLMatcher, string_state: tuple[bool, bool], cap: int,
             byte_token: dict[int, int]) -> tuple[bytes, bool, int]:
        """The fast path from ``matcher``'s state (``byte_token``: its token of each byte that
        has one; ``BYTE_TOKEN``: the byte matcher, whose masks are cheap) until it ends, is
        stuck or passes ``cap`` bytes: ``(bytes, whether it ended, how many of them end its
        last closed string)``."""
        out = bytearray()
        closed = 0
        while not matcher.is_accepting():
            forced = matcher.compute_ff_bytes()
            if forced:
                step = [byte_token.get(b, -1) for b in forced]
            else:
                if byte_token is BYTE_TOKEN:
                    allowed = int.from_bytes(matcher.compute_bitmask(), "little")
                    choice = next((b for b in self._order(string_state) if allowed >> b & 1),
                                  None)
                else:
                    choice = next((b for b in self._order(string_state) if b in byte_token
                                   and matcher.validate_tokens([byte_token[b]]) == 1), None)
                if choice is None:
                    return bytes(out), False, closed
                forced, step = bytes([choice]), [byte_token[choice]]
            if -1 in step or not matcher.consume_tokens(step):
                return bytes(out), False, closed
            for byte in forced:
                out.append(byte)
                inside = string_state[0]
                string_state = _scan(string_state, bytes([byte]))
                closed = len(out) if inside and not string_state[0] else closed
            if len(out) > cap:
                return bytes(out), False, closed
        return bytes(out), True, closed

    def _search(self, prefix: bytes, cap: int) -> bytes | None:
        """A closing of the state ``prefix`` leads to, at most ``cap`` bytes, where the fast
        path loops: from each place it is stuck, the shortest way to a state the fast path
        closes or gets out of its string from (``_way_out``); None if there is none in
        reach (``SEARCH_STATES``)."""
        state = self._byte_template.deep_copy()
        if not state.consume_tokens(list(prefix)):
            return None
        string_state = _scan(OUTSIDE_STRING, prefix)
        out = bytearray()
        budget = [SEARCH_STATES]
        while True:
            way = self._way_out(state, string_state, cap - len(out), budget)
            if way is None:
                return None
            step, done = way
            state.consume_tokens(list(step))
            out += step
            string_state = _scan(string_state, step)
            if done:
                return bytes(out)

    def _way_out(self, start: llguidance.LLMatcher, string_state: tuple[bool, bool], cap: int,
                 budget: list[int]) -> tuple[bytes, bool] | None:
        """Breadth-first over the byte matcher's states from ``start``, a level per byte, each
        level keeping one state per distinct mask (``SEARCH_WIDTH`` at most), in the fast
        path's order: the way to the first state the fast path closes within
        ``TAIL_BYTES`` (``(bytes, True)``), or takes out of a JSON string (``(bytes up to
        that string's end, False)``); None once ``budget[0]`` states are tried."""
        level = [(start, b"", string_state)]
        while level:
            seen: set[bytes] = set()
            following = []
            for state, out, inner in level:
                if budget[0] <= 0:
                    return None
                budget[0] -= 1
                tail, done, closed = self._run(state.deep_copy(), inner,
                                               min(TAIL_BYTES, cap - len(out)), BYTE_TOKEN)
                if done or (self.json and closed):
                    return out + (tail if done else tail[:closed]), done
                if len(out) == cap:
                    continue
                mask = state.compute_bitmask()
                for b in SEARCH_ORDER[self._order(inner)]:
                    if len(following) == SEARCH_WIDTH:
                        break
                    if not mask[b >> 3] >> (b & 7) & 1:
                        continue
                    child = state.deep_copy()
                    child.consume_token(b)
                    key = child.compute_bitmask()
                    if key not in seen:
                        seen.add(key)
                        following.append((child, out + bytes([b]), _scan(inner, bytes([b]))))
            level = following
        return None


SEARCH_ORDER = {order: order + bytes(b for b in range(256) if b not in order)
                for order in (IN_STRING, OUTSIDE)}  # the fast path's order, then other bytes
BYTE_TOKEN = {b: b for b in range(256)}  # the byte matcher's token of each byte


@functools.cache
def _byte_tokenizer() -> llguidance.LLTokenizer:
    """A tokenizer whose tokens are the 256 bytes (and an end-of-text token, 256)."""

    class Bytes:
        eos_token_id, bos_token_id, special_token_ids = 256, None, [256]
        tokens = [bytes([b]) for b in range(256)] + [b"<eos>"]

        def __call__(self, text: str | bytes) -> list[int]:
            return list(text.encode() if isinstance(text, str) else text)

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Bytes()), slices=[])


def _whole(text: bytes) -> bool:
    """Whether UTF-8 ``text`` does not end inside a character."""
    for back, byte in enumerate(reversed(text[-4:]), 1):
        if byte & 0xC0 != 0x80:  # the last character's first byte
            return back == (1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4)
    return not text


OUTSIDE_STRING = (False, False)


def _scan(string_state: tuple[bool, bool], text: bytes) -> tuple[bool, bool]:
    """Whether JSON text ends inside a string, and right after a backslash in it: after
    ``text``, from ``string_state``."""
    inside, escaped = string_state
    for byte in text:
        if escaped:
            escaped = False
        elif inside and byte == 0x5C:
            escaped = True
        elif byte == 0x22:
            inside = not inside
    return inside, escaped
