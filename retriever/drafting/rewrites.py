"""The substitutions an output makes in text it copies, and that text rewritten with them (pure).

An edit's answer copies the prompt's code with a few changes, and a rename changes every
occurrence alike: once the output has written `totals` where the prompt says `acc`, the rest of
the copied text will most likely say `totals` too, which no index of the prompt proposes (the
context's chain breaks at every occurrence). `Rewrites` follows the output's copy of a source
text (the prompt, or the client's predicted output), learns each substitution (the source
tokens between two aligned stretches -> the output tokens between them) and, when it learns a
new one, returns the source text from just before it on (at most `SPAN` tokens) rewritten with
every substitution learned: a document for the session's predicted-output index.

Following the copy, one output token at a time:
- aligned at source position p: a token equal to source[p] moves to p + 1; any other starts a
  divergence at (p, this output position);
- diverged: once the last RESYNC output tokens, all written since the divergence, equal the
  source at some q in [p, p + MAX_GAP], the output is aligned at q + RESYNC again and
  source[p:q] -> output[divergence:-RESYNC] is a substitution (learned unless the source side
  is empty: an insertion changes nothing to come); past MAX_GAP + RESYNC tokens it is unaligned;
- unaligned: the last ANCHOR output tokens found in the source (the first hit from the last
  aligned position on, else from its start) align it after them.

Example (ANCHOR 3, RESYNC 2): source `a b c d acc e f g acc h`; the output `a b c` aligns (at
`d`), `d` copies, `tot` diverges, `e f` resyncs and teaches (acc,) -> (tot,): the document is the
whole source rewritten, `a b c d tot e f g tot h`.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import numpy as np

ANCHOR = 3  # output tokens that align an unaligned output with the source
RESYNC = 2  # output tokens after a divergence that align it again
MAX_GAP = 16  # longest source side of a substitution (and longest output side, about)
CONTEXT = 32  # source tokens before a substitution kept in its document (the tail matches across it)
SPAN = 4096  # longest document
MAX_SUBS = 16  # substitutions kept per source (later ones are not learned)


def find(hay: bytes, needle: "Sequence[int] | np.ndarray", lo: int, hi: int) -> int:
    """The first position q in [lo, hi) where the int32 tokens of `hay` hold `needle` (-1: none);
    aligned hits only (a byte search: a hit inside a token's bytes is no hit)."""
    pattern = np.asarray(needle, np.int32).tobytes()
    at = hay.find(pattern, 4 * lo, 4 * hi + len(pattern) - 4)
    while at >= 0 and at % 4:
        at = hay.find(pattern, at + 1, 4 * hi + len(pattern) - 4)
    return at // 4 if at >= 0 else -1


_MUL = 0x9E3779B97F4A7C15  # the n-gram hash's multiplier (mod 2^64)


def gram_keys(tokens: np.ndarray, n: int) -> np.ndarray:
    """[len - n + 1] uint64 hash of each n-gram of tokens ([len] int32): k = k * _MUL + t mod 2^64
    over its tokens from k = 0 (`gram_key` of one)."""
    keys = np.zeros(max(len(tokens) - n + 1, 0), np.uint64)
    for j in range(n):
        keys = keys * np.uint64(_MUL) + tokens[j:len(tokens) - n + 1 + j].astype(np.uint64)
    return keys


def gram_key(tokens: list[int]) -> int:
    """The `gram_keys` hash of one n-gram (non-negative tokens)."""
    key = 0
    for t in tokens:
        key = (key * _MUL + t) & 0xFFFFFFFFFFFFFFFF
    return key


def rewrite(tokens: np.ndarray, subs: dict[tuple[int, ...], tuple[int, ...]]) -> tuple[np.ndarray, list[int]]:
    """tokens [n] int32 with every occurrence of each substitution's source side replaced by its
    output side, left to right (at one position the longest source side first; replaced spans do
    not overlap) -> (the rewritten tokens, int32; the positions in `tokens` that were replaced).

    Example: tokens [1, 2, 3, 1, 2], subs {(1, 2): (9,)} -> ([9, 3, 9], [0, 3]).
    """
    hay = np.ascontiguousarray(tokens, np.int32).tobytes()
    hits = []  # (position, -len(old), new)
    for old, new in subs.items():
        at = find(hay, old, 0, len(tokens))
        while at >= 0:
            hits.append((at, -len(old), new))
            at = find(hay, old, at + 1, len(tokens))
    hits.sort()
    pieces, replaced, i = [], [], 0
    for at, neg_len, new in hits:
        if at >= i:
            pieces += [tokens[i:at], np.asarray(new, np.int32)]
            replaced.append(at)
            i = at - neg_len
    pieces.append(tokens[i:])
    return np.concatenate(pieces).astype(np.int32, copy=False), replaced


class Rewrites:
    """Follows one output's copy of `source` ([n] int32); see the module docstring."""

    def __init__(self, source: np.ndarray) -> None:
        self.source = np.ascontiguousarray(source, np.int32)
        keys = gram_keys(self.source, ANCHOR)  # [n - ANCHOR + 1] uint64
        order = np.argsort(keys, kind="stable")
        self._keys, self._at = keys[order], order.astype(np.int32)  # ANCHOR-grams sorted by hash, then position
        self.recent: deque[int] = deque(maxlen=MAX_GAP + RESYNC + ANCHOR)  # the output's last tokens
        self.pos = -1  # the source position the next output token copies (-1: unaligned)
        self.last = 0  # the last aligned source position (where an anchor search starts)
        self.divergence: tuple[int, int] | None = None  # (source position, output tokens since) of a divergence
        self.subs: dict[tuple[int, ...], tuple[int, ...]] = {}

    @property
    def memory_bytes(self) -> int:
        return self.source.nbytes + self._keys.nbytes + self._at.nbytes  # tokens, anchor index

    def extend(self, tokens: np.ndarray) -> np.ndarray | None:
        """Follows `tokens` ([k] int32, the output's next ones); returns the rewritten source text
        ([m] int32, m <= SPAN) if they taught a new substitution that changes text after it, else None."""
        doc = None
        for t in np.asarray(tokens).tolist():
            self.recent.append(int(t))
            learned = self._step(int(t)) if len(self.source) else None
            doc = learned if learned is not None else doc
        return doc

    def _step(self, token: int) -> np.ndarray | None:
        if self.divergence is None and self.pos >= 0:
            if self.pos < len(self.source) and int(self.source[self.pos]) == token:
                self.pos += 1
                self.last = self.pos
                return None
            self.divergence = (self.pos, 0)
        if self.divergence is not None:
            return self._diverged()
        if len(self.recent) >= ANCHOR:
            q = self._anchor(list(self.recent)[-ANCHOR:])
            if q >= 0:
                self.pos = self.last = q + ANCHOR
        return None

    def _anchor(self, tail: list[int]) -> int:
        """The first source position holding `tail` (ANCHOR tokens) at or after `last`, else the
        first one at all (-1: none); by the sorted n-gram hashes, hits checked token by token."""
        key = np.uint64(gram_key(tail))
        lo, hi = np.searchsorted(self._keys, key, "left"), np.searchsorted(self._keys, key, "right")
        hits = [int(q) for q in self._at[lo:hi] if self.source[q:q + ANCHOR].tolist() == tail]  # ascending
        return next((q for q in hits if q >= self.last), hits[0] if hits else -1)

    def _diverged(self) -> np.ndarray | None:
        s0, since = self.divergence[0], self.divergence[1] + 1  # output tokens since it, this one included
        self.divergence = (s0, since)
        if since >= RESYNC:
            out = list(self.recent)[-since:]
            window = self.source[s0:s0 + MAX_GAP + RESYNC].tobytes()  # resyncs at s0 .. s0 + MAX_GAP
            q = find(window, out[-RESYNC:], 0, MAX_GAP + 1)
            q = s0 + q if q >= 0 else -1
            if q >= 0:
                self.divergence, self.pos = None, q + RESYNC
                self.last = self.pos
                return self._learn(tuple(self.source[s0:q].tolist()), tuple(out[:-RESYNC]), s0, q)
        if since >= MAX_GAP + RESYNC:
            self.divergence, self.pos = None, -1
        return None

    def _learn(self, old: tuple[int, ...], new: tuple[int, ...], at: int, resync: int) -> np.ndarray | None:
        """The document for a substitution old -> new seen at source[at:resync] (None: nothing new,
        or nothing after it to rewrite)."""
        if not old or old == new or self.subs.get(old) == new or (old not in self.subs and len(self.subs) >= MAX_SUBS):
            return None
        self.subs[old] = new
        start = max(0, at - CONTEXT)
        doc, replaced = rewrite(self.source[start:start + SPAN], self.subs)
        return doc[:SPAN] if any(start + r >= resync for r in replaced) else None
