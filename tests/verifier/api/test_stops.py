"""verifier.api.stops against slow references: stop strings over random chunkings, the incremental
detokenizer over random byte-level vocabularies (multi-byte characters split across tokens),
llama.cpp's line limits (indentation over random texts and chunkings, time on a given clock), the
combined token stream, and the real Qwen tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from verifier.api.stops import Detokenizer, LineLimits, StopMatcher, TextStream

QWEN_TOKENIZER = Path(__file__).resolve().parents[3] / ".." / "shared" / "models" / "qwen2.5-coder-1.5b" / "tokenizer.json"


# ---------------------------------------------------------------- references


def ref_stop_cut(text: str, stops: list[str]) -> int | None:
    """Start of the stop that completes first (the longest on a tie), by brute force."""
    for end in range(1, len(text) + 1):
        hits = [end - len(s) for s in stops if end >= len(s) and text[end - len(s):end] == s]
        if hits:
            return min(hits)
    return None


def ref_held(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop."""
    best = 0
    for s in stops:
        for k in range(1, len(s)):
            if len(text) >= k and text.endswith(s[:k]):
                best = max(best, k)
    return best


def random_chunks(rng: random.Random, text: str) -> list[str]:
    chunks, i = [], 0
    while i < len(text):
        n = rng.choice([0, 1, 1, 2, 3, 7])
        chunks.append(text[i:i + n])
        i += n
    return chunks


# ---------------------------------------------------------------- StopMatcher


def test_stop_matcher_matches_reference_on_random_chunkings():
    rng = random.Random(7)
    for _ in range(3000):
        text = "".join(rng.choice("ab\n") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("ab\n") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 3))]
        m = StopMatcher(stops)
        out, seen = "", ""
        for chunk in random_chunks(rng, text):
            seen += chunk
            out += m.push(chunk)
            if not m.stopped:  # everything released except a possible stop start
                assert out == seen[: len(seen) - ref_held(seen, stops)], (text, stops)
        out += m.finish()
        cut = ref_stop_cut(text, stops)
        assert m.stopped == (cut is not None), (text, stops)
        assert out == (text if cut is None else text[:cut]), (text, stops)


def test_stop_matcher_examples():
    m = StopMatcher(["abcd", "bc"])
    assert m.push("ab") == ""  # "ab" could grow into "abcd", "b" into "bc"
    assert m.push("cd") == "a"  # "bc" completes before "abcd"
    assert m.stopped and m.push("more") == "" and m.finish() == ""
    m = StopMatcher(["\n\n", "```"])
    assert m.push("x = 1\n") == "x = 1"
    assert m.push("y``") == "\ny"
    assert m.finish() == "``"
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        StopMatcher(["ok", ""])


# ---------------------------------------------------------------- Detokenizer


def byte_vocab(rng: random.Random, texts: list[str]) -> tuple[list[list[int]], callable]:
    """Token ids for each text from a random byte-level vocabulary that splits characters."""
    vocab: dict[bytes, int] = {}
    pieces: list[bytes] = []

    def tid(piece: bytes) -> int:
        if piece not in vocab:
            vocab[piece] = len(pieces)
            pieces.append(piece)
        return vocab[piece]

    encoded = []
    for text in texts:
        data, ids, i = text.encode(), [], 0
        if rng.random() < 0.2:  # an invalid byte now and then
            data += bytes([rng.choice([0x80, 0xC3, 0xE2, 0xF0])])
        while i < len(data):
            n = rng.randint(1, 4)
            ids.append(tid(data[i:i + n]))
            i += n
        encoded.append(ids)
    return encoded, lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", "replace")


ALPHABET = "ab \n=é€😀日"  # 1- to 4-byte UTF-8 characters


def test_detokenizer_deltas_are_prefixes_of_the_final_text():
    rng = random.Random(11)
    texts = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 60))) for _ in range(400)]
    encoded, decode = byte_vocab(rng, texts)
    for ids in encoded:
        final = decode(ids)
        d, out, i = Detokenizer(decode), "", 0
        while i < len(ids):
            n = rng.randint(1, 5)
            out += d.push(ids[i:i + n])
            i += n
            assert final.startswith(out), (ids, out)  # no split character was ever emitted
            stable = decode(ids[:i]).rstrip("\ufffd")
            assert out == stable  # and everything complete was
        assert out + d.flush() == final


# ---------------------------------------------------------------- TextStream


def ref_stream(ids: list[int], decode, stops: list[str], stop_ids: set[int]) -> tuple[list[int], str, str | None]:
    """Kept tokens, final text and finish reason, recomputing the whole text at every token."""
    for k in range(1, len(ids) + 1):
        if ids[k - 1] in stop_ids:
            text = decode(ids[:k - 1])
            cut = ref_stop_cut(text, stops)
            return ids[:k - 1], (text if cut is None else text[:cut]), ("eos" if cut is None else "stop")
        stable = decode(ids[:k]).rstrip("\ufffd")
        cut = ref_stop_cut(stable, stops)
        if cut is not None:
            return ids[:k], stable[:cut], "stop"
    text = decode(ids)
    cut = ref_stop_cut(text, stops)
    return ids, (text if cut is None else text[:cut]), (None if cut is None else "stop")


def test_text_stream_matches_reference():
    rng = random.Random(5)
    texts = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40))) for _ in range(600)]
    encoded, decode = byte_vocab(rng, texts)
    vocab_size = max(max(ids, default=0) for ids in encoded) + 1
    for ids in encoded:
        stops = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(0, 2))]
        stop_ids = {rng.randrange(vocab_size)} if rng.random() < 0.3 else set()
        ts, out, kept, generated, i = TextStream(decode, stops, stop_ids), "", [], 0, 0
        while i < len(ids):
            n = rng.randint(1, 6)
            delta = ts.push(ids[i:i + n])
            out, kept, generated = out + delta.text, kept + delta.token_ids, generated + delta.generated
            i += n
        out += ts.finish()
        want_ids, want_text, want_reason = ref_stream(ids, decode, stops, stop_ids)
        assert (kept, out, ts.finish_reason) == (want_ids, want_text, want_reason), (ids, stops, stop_ids)
        assert ts.kept == kept
        assert generated == len(kept) + (ts.finish_reason == "eos")


def test_text_stream_drops_tokens_past_a_stop_in_the_same_step():
    decode = lambda ids: bytes(ids).decode("utf-8", "replace")  # noqa: E731
    ts = TextStream(decode, ["\n\n"], {0})
    delta = ts.push(list(b"def f():\n\nclass"))
    assert (delta.text, bytes(delta.token_ids), ts.finish_reason) == ("def f():", b"def f():\n\n", "stop")
    assert ts.push(list(b"more")).token_ids == [] and ts.finish() == ""
    ts = TextStream(decode, [], {0})
    delta = ts.push([*b"ok", 0, *b"junk"])
    assert (delta.text, delta.token_ids, delta.generated, ts.finish_reason) == ("ok", list(b"ok"), 3, "eos")


def test_detokenizer_on_the_qwen_tokenizer():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(QWEN_TOKENIZER))
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    rng = random.Random(3)
    words = ["def", " foo", "(x)", ":\n", "    return", " é", "日本語", "😀", " ∑", "\t", "ü", "🚀🚀"]
    for _ in range(50):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
        ids = tok.encode(text).ids
        d, out = Detokenizer(decode), ""
        for t in ids:
            out += d.push([t])
            assert text.startswith(out)
        assert out + d.flush() == text


# ---------------------------------------------------------------- line limits


def ref_indent_cut(text: str, min_indent: int) -> int | None:
    """Where llama.cpp's n_indent cuts `text`: the first character after a newline's spaces and
    tabs (a visible one or the next newline) on a line indented less than min_indent."""
    for p, c in enumerate(text):
        if c == "\n":
            q = p + 1
            while q < len(text) and text[q] in " \t":
                q += 1
            if q < len(text) and q - (p + 1) < min_indent:
                return q
    return None


def test_indent_limit_matches_reference_over_random_chunkings():
    rng = random.Random(11)
    for _ in range(3000):
        text = "".join(rng.choice(" \t\na(") for _ in range(rng.randint(0, 30)))
        n = rng.randint(0, 4)
        limits, out, i = LineLimits(min_indent=n), "", 0
        while i < len(text):
            k = rng.randint(1, 4)
            out += limits.push(text[i:i + k])
            i += k
        cut = ref_indent_cut(text, n) if n > 0 else None
        assert (out, limits.ended) == ((text, False) if cut is None else (text[:cut], True)), (text, n)


def test_time_limit_ends_after_a_newline_past_the_limit():
    now = [0.0]
    limits = LineLimits(time_limit_s=0.5, clock=lambda: now[0])
    pushes = [("a", 0.0), ("\n", 0.3), ("b\nc", 0.6), ("d", 0.7)]
    out = []
    for text, t in pushes:
        now[0] = t + 10.0  # the clock starts at the first push
        out.append(limits.push(text))
    assert out == ["a", "\n", "b\nc", ""] and limits.ended  # the token holding the newline is kept whole
    assert not LineLimits().active and LineLimits(min_indent=1).active


def test_text_stream_with_indent_limit_and_stops_matches_reference():
    """One character per token: the first of the stop (completed inside the kept text) and the indent
    cut ends the text; the token at the cut is kept (generated), its text is not."""
    rng = random.Random(13)
    for _ in range(1500):
        text = "".join(rng.choice(" \na(") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("a(\n") for _ in range(rng.randint(1, 2)))] if rng.random() < 0.5 else []
        n = rng.randint(1, 3)
        ts, out, kept, i = TextStream(lambda ids: "".join(map(chr, ids)), stops, set(), LineLimits(n)), "", [], 0
        while i < len(text):
            k = rng.randint(1, 5)
            delta = ts.push([ord(c) for c in text[i:i + k]])
            out, kept, i = out + delta.text, kept + delta.token_ids, i + k
        out += ts.finish()
        cut = ref_indent_cut(text, n)
        upto = text if cut is None else text[:cut]
        stop = ref_stop_cut(upto, stops)
        if stop is not None:
            end = next(e for e in range(len(upto) + 1) if ref_stop_cut(upto[:e], stops) is not None)
            want = (upto[:stop], text[:end], "stop")
        elif cut is not None:
            want = (upto, text[:cut + 1], "length")
        else:
            want = (text, text, None)
        assert (out, "".join(map(chr, kept)), ts.finish_reason) == want, (text, stops, n)
