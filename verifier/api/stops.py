"""Streaming text out of generated tokens: incremental detokenizing and stop strings.

Pure (no torch, no grpc). Three parts:

- `Detokenizer`: token ids in, text deltas out; a delta never ends inside a multi-byte
  character (a trailing U+FFFD of an incomplete byte sequence is held back until the
  next token completes it, or until `flush`). Needs a `decode(ids) -> str` whose output
  for a prefix of ids is a prefix of the output for the whole (true of byte-level BPE
  decoding without clean-up of spaces).
- `StopMatcher`: text deltas in, releasable text out; finds stop strings with an
  Aho-Corasick automaton (`pyahocorasick`) over each new chunk plus the previous
  `max_len - 1` characters, and holds back the longest suffix that could still grow into
  a stop, so no released text is ever part of a stop.
- `LineLimits`: llama.cpp's line limits (`n_indent`, `t_max_predict_ms` of its /infill and
  /completion): a generated line indented less than `min_indent` ends the text before its first
  other character; a token holding a newline once `time_limit_s` have passed ends it after it.
- `TextStream`: all three, token by token, plus stop token ids (EOS).

The stop rule (same for any chunking of the text): the text ends at the start of the
occurrence of a stop string that completes first (smallest end; the longest one on a tie).
The kept tokens are those up to the token that completed it (or the stop token, excluded).

Example:
    >>> ts = TextStream(lambda ids: bytes(ids).decode("utf-8", "replace"), ["\\n\\n"], {0})
    >>> [ts.push(list(b"ab\\n")).text, ts.push(list(b"\\ncd")).text]
    ['ab', '']
    >>> ts.stopped, ts.finish_reason
    (True, 'stop')
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import AbstractSet, Callable, Sequence

import ahocorasick

_WINDOW_TOKENS = 8  # tokens kept in the decode window once its text is complete
_REPLACEMENT = "\ufffd"


class Detokenizer:
    """Token ids -> text deltas over a short sliding decode window."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._start = 0  # first id of the decode window
        self._emitted = 0  # characters of the window's text already returned

    def push(self, ids: Sequence[int]) -> str:
        """Appends ids; returns the new complete text (possibly "")."""
        self._ids.extend(int(i) for i in ids)
        text = self._decode(self._ids[self._start:])
        stable = len(text.rstrip(_REPLACEMENT))
        delta = text[self._emitted:stable] if stable > self._emitted else ""
        self._emitted = max(self._emitted, stable)
        if stable == len(text) and len(self._ids) - self._start > 2 * _WINDOW_TOKENS:
            self._start = len(self._ids) - _WINDOW_TOKENS
            self._emitted = len(self._decode(self._ids[self._start:]))
        return delta

    def flush(self) -> str:
        """The held-back rest (replacement characters of an incomplete sequence)."""
        text = self._decode(self._ids[self._start:])
        delta = text[self._emitted:]
        self._emitted = len(text)
        return delta


class StopMatcher:
    """Text chunks -> releasable text; `stopped` once a stop string completed."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError(f"stop strings must be non-empty, got {list(stops)!r}")
        self._max_len = max((len(s) for s in stops), default=0)
        self._prefixes = {s[:k] for s in stops for k in range(1, len(s))}
        self._automaton = ahocorasick.Automaton() if stops else None
        for s in stops:
            self._automaton.add_word(s, len(s))
        if self._automaton is not None:
            self._automaton.make_automaton()
        self._tail = ""  # last max_len - 1 characters seen
        self._pending = ""  # seen, not released: could be the start of a stop
        self.stopped = False

    def push(self, chunk: str) -> str:
        """Returns the text now safe to release; after a stop, nothing more."""
        if self.stopped or not chunk:
            return ""
        start = self._first_stop(chunk)  # index into pending + chunk, or None
        text = self._pending + chunk
        if start is not None:
            self.stopped, self._pending = True, ""
            return text[:start]
        self._tail = (self._tail + chunk)[-(self._max_len - 1):] if self._max_len > 1 else ""
        hold = self._held_suffix(text)
        self._pending = text[len(text) - hold:]
        return text[: len(text) - hold]

    def finish(self) -> str:
        """Releases what was held back (the text ended without completing a stop)."""
        text, self._pending = ("" if self.stopped else self._pending), ""
        return text

    def _first_stop(self, chunk: str) -> int | None:
        if self._automaton is None:
            return None
        window = self._tail + chunk
        best: tuple[int, int] | None = None  # (end, -length); matches ending in the tail can't
        for end, length in self._automaton.iter(window):  # exist: they would have stopped
            if best is None or (end, -length) < best:
                best = (end, -length)
        if best is None:
            return None
        start_in_window = best[0] + best[1] + 1
        return start_in_window - len(self._tail) + len(self._pending)

    def _held_suffix(self, text: str) -> int:
        for k in range(min(self._max_len - 1, len(text)), 0, -1):
            if text[-k:] in self._prefixes:
                return k
        return 0


class LineLimits:
    """llama.cpp's line limits on a generation's text, token by token (`push` per token's text).

    min_indent > 0: after a generated newline, a line whose indentation (spaces and tabs, one
    each) is shorter ends the text before its first other character: its first visible
    character, or the newline of a blank line (llama.cpp cuts there too; the first line, before
    any generated newline, is never cut). time_limit_s > 0: a token whose text holds a newline,
    pushed more than time_limit_s after the first push (llama.cpp: after the prompt), ends the
    text after that token. Either ends the generation as a limit ("length").

    Example: min_indent 4, texts "    a = 1\n", "  ", "b" -> "    a = 1\n", "  ", "" (ended).
    """

    def __init__(self, min_indent: int = 0, time_limit_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.min_indent, self.time_limit_s, self._clock = min_indent, time_limit_s, clock
        self._indent: int | None = None  # columns of the line being indented; None: not at a line start
        self._t0: float | None = None  # clock at the first push
        self.ended = False

    @property
    def active(self) -> bool:
        return self.min_indent > 0 or self.time_limit_s > 0

    def push(self, text: str) -> str:
        """The part of one token's text to keep; `ended` once a limit cut it (then "" for the rest)."""
        if self.ended:
            return ""
        if self._t0 is None:
            self._t0 = self._clock()
        if self.min_indent > 0:
            for i, c in enumerate(text):
                if self._indent is not None and c in " \t":
                    self._indent += 1
                    continue
                if self._indent is not None and self._indent < self.min_indent:
                    self.ended = True
                    return text[:i]
                self._indent = 0 if c == "\n" else None
        if self.time_limit_s > 0 and "\n" in text and self._clock() - self._t0 > self.time_limit_s:
            self.ended = True
        return text


@dataclass(frozen=True)
class Delta:
    text: str  # releasable text (may be "")
    token_ids: list[int]  # tokens kept from this push (stop-truncated, stop token excluded)
    generated: int  # tokens of this push up to the stop, a stop token included


class TextStream:
    """Tokens of one generation -> text deltas, stopping on stop strings and stop tokens."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str],
                 stop_token_ids: AbstractSet[int] = frozenset(), limits: LineLimits | None = None) -> None:
        self._detok = Detokenizer(decode)
        self._matcher = StopMatcher(stops)
        self._stop_ids = frozenset(stop_token_ids)
        self._limits = limits if limits is not None and limits.active else None
        self.finish_reason: str | None = None  # "eos", "stop" or "length" (a line limit) once stopped
        self.kept: list[int] = []  # every kept token so far

    @property
    def stopped(self) -> bool:
        return self.finish_reason is not None

    def push(self, tokens: Sequence[int]) -> Delta:
        """Feeds one step's tokens; tokens after a stop are dropped."""
        parts: list[str] = []
        kept: list[int] = []
        generated = 0
        for t in tokens:
            if self.stopped:
                break
            generated += 1
            if int(t) in self._stop_ids:
                parts.append(self._end_text())
                self.finish_reason = self.finish_reason or "eos"
                break
            kept.append(int(t))
            parts.append(self._push_text(self._detok.push([t])))
        self.kept.extend(kept)
        return Delta("".join(parts), kept, generated)

    def finish(self) -> str:
        """The rest of the text at the end of the generation (call once)."""
        return "" if self.stopped else self._end_text()

    def _push_text(self, text: str) -> str:
        """One token's text through the line limits and the stop matcher; sets finish_reason."""
        limited = self._limits is not None
        if limited:
            text = self._limits.push(text)
        out = self._matcher.push(text)
        if self._matcher.stopped:
            self.finish_reason = "stop"
        elif limited and self._limits.ended:
            self.finish_reason = "length"
            out += self._matcher.finish()
        return out

    def _end_text(self) -> str:
        text = self._push_text(self._detok.flush())
        return text if self.stopped else text + self._matcher.finish()
