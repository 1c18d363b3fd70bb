"""Rewrites: following an output's copy of a source text, learning its substitutions, rewriting
the text with them; checked against plain slow references on random edits, and in the drafter."""

import doctest

import numpy as np
import pytest

import retriever.drafting.rewrites as rewrites_module
from retriever.drafting.drafter import Drafter
from retriever.drafting.rewrites import (ANCHOR, CONTEXT, MAX_GAP, MAX_SUBS, RESYNC, SPAN, Rewrites, gram_key,
                                         gram_keys, rewrite)
from retriever.drafting.types import DrafterConfig, Source

EMPTY = np.empty(0, np.int32)


def ids(*tokens):
    return np.array(tokens, np.int32)


def test_module_examples():
    assert doctest.testmod(rewrites_module).failed == 0
    a, b, c, d, acc, e, f, g, h, tot = range(1, 11)
    r = Rewrites(ids(a, b, c, d, acc, e, f, g, acc, h))
    assert r.extend(ids(a, b, c, d, tot, e)) is None and r.divergence == (4, 2)
    assert r.extend(ids(f)).tolist() == [a, b, c, d, tot, e, f, g, tot, h]
    assert r.subs == {(acc,): (tot,)} and r.pos == 7  # next: g
    assert r.extend(ids(g, tot, h)) is None and r.subs == {(acc,): (tot,)}
    assert rewrite(ids(1, 2, 3, 1, 2), {(1, 2): (9,)})[0].tolist() == [9, 3, 9]


def test_one_gram_key_is_the_keys_of_its_position():
    tokens = np.random.default_rng(0).integers(0, 2**31 - 1, 64).astype(np.int32)
    for n in (1, 3, 5):
        assert [int(k) for k in gram_keys(tokens, n)] == [gram_key(tokens[i:i + n].tolist())
                                                          for i in range(len(tokens) - n + 1)]
    assert len(gram_keys(tokens[:2], 3)) == 0


def _rewrite_reference(tokens: list[int], subs: dict) -> tuple[list[int], list[int]]:
    out, replaced, i = [], [], 0
    olds = sorted(subs, key=len, reverse=True)
    while i < len(tokens):
        old = next((o for o in olds if tuple(tokens[i:i + len(o)]) == o), None)
        if old is None:
            out.append(tokens[i])
            i += 1
        else:
            out += list(subs[old])
            replaced.append(i)
            i += len(old)
    return out, replaced


def _at(source: list[int], needle: list[int], lo: int, hi: int) -> int:
    return next((q for q in range(lo, min(hi, len(source) - len(needle) + 1))
                 if source[q:q + len(needle)] == needle), -1)


class _RewritesReference:
    """The module's rules, one token at a time over the whole output, with list searches."""

    def __init__(self, source: list[int]) -> None:
        self.source, self.out, self.pos, self.last, self.div, self.subs = source, [], -1, 0, None, {}

    def extend(self, tokens: list[int]):
        doc = None
        for t in tokens:
            self.out.append(t)
            got = self._step(t) if self.source else None
            doc = got if got is not None else doc
        return doc

    def _step(self, t: int):
        src, out = self.source, self.out
        if self.div is None and self.pos >= 0:
            if self.pos < len(src) and src[self.pos] == t:
                self.pos = self.last = self.pos + 1
                return None
            self.div = (self.pos, len(out) - 1)
        if self.div is not None:
            s0, o0 = self.div
            if len(out) - o0 >= RESYNC:
                q = _at(src, out[-RESYNC:], s0, min(s0 + MAX_GAP + 1, len(src)))
                if q >= 0:
                    self.div, self.pos = None, q + RESYNC
                    self.last = self.pos
                    return self._learn(tuple(src[s0:q]), tuple(out[o0:len(out) - RESYNC]), s0, q)
            if len(out) - o0 >= MAX_GAP + RESYNC:
                self.div, self.pos = None, -1
            return None
        if len(out) >= ANCHOR:
            q = _at(src, out[-ANCHOR:], self.last, len(src))
            q = q if q >= 0 else _at(src, out[-ANCHOR:], 0, len(src))
            if q >= 0:
                self.pos = self.last = q + ANCHOR
        return None

    def _learn(self, old, new, at, resync):
        if not old or old == new or self.subs.get(old) == new or (old not in self.subs and len(self.subs) >= MAX_SUBS):
            return None
        self.subs[old] = new
        start = max(0, at - CONTEXT)
        doc, replaced = _rewrite_reference(self.source[start:start + SPAN], self.subs)
        return doc[:SPAN] if any(start + r >= resync for r in replaced) else None


def _edited_copy(rng, source: list[int], vocab: int) -> list[int]:
    """An output that copies stretches of the source with renames, insertions, deletions, detours."""
    renames = {int(rng.integers(0, vocab)): list(rng.integers(0, vocab + 50, int(rng.integers(0, 3))))
               for _ in range(int(rng.integers(0, 3)))}
    out, i = list(rng.integers(0, vocab, int(rng.integers(0, 6)))), int(rng.integers(0, max(1, len(source))))
    while i < len(source) and len(out) < 200:
        t = source[i]
        roll = rng.random()
        if t in renames and roll < 0.9:
            out += [int(x) for x in renames[t]]
        elif roll < 0.03:
            out += [int(x) for x in rng.integers(0, vocab + 50, int(rng.integers(1, 25)))]  # a detour
        elif roll < 0.05:
            i += int(rng.integers(1, 20))  # a deletion
            continue
        else:
            out.append(int(t))
        i += 1
    return out


@pytest.mark.parametrize("seed", range(40))
def test_rewrites_match_the_reference_on_random_edits(seed):
    rng = np.random.default_rng(seed)
    for _ in range(10):
        vocab = int(rng.choice([4, 30, 70_000]))  # large ids: multi-byte tokens, misaligned byte hits
        source = [int(x) for x in rng.integers(0, vocab, int(rng.integers(0, 120)))]
        output = _edited_copy(rng, source, vocab)
        fast, slow = Rewrites(ids(*source)), _RewritesReference(source)
        at = 0
        while at < len(output):  # fed in chunks, as draft calls bring them
            chunk = output[at:at + int(rng.integers(1, 9))]
            at += len(chunk)
            got, want = fast.extend(ids(*chunk)), slow.extend(chunk)
            assert (got.tolist() if got is not None else None) == want
            assert (fast.pos, fast.last, fast.subs) == (slow.pos, slow.last, slow.subs)


@pytest.mark.parametrize("seed", range(20))
def test_rewrite_matches_the_reference_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    for _ in range(30):
        vocab = int(rng.choice([3, 70_000]))
        tokens = rng.integers(0, vocab, int(rng.integers(0, 60))).astype(np.int32)
        subs = {tuple(int(x) for x in rng.integers(0, vocab, int(rng.integers(1, 4)))):
                tuple(int(x) for x in rng.integers(0, vocab, int(rng.integers(0, 4)))) for _ in range(3)}
        got, replaced = rewrite(tokens, subs)
        assert (got.tolist(), replaced) == _rewrite_reference(tokens.tolist(), subs)
    # 65536 is bytes 00 00 01 00 and 256 is 00 01 00 00: a byte hit 1 byte off is no occurrence
    assert rewrite(ids(65536, 65536), {(256,): (7,)})[0].tolist() == [65536, 65536]


@pytest.mark.parametrize("in_prompt", [True, False])
def test_the_drafter_proposes_a_rename_at_its_next_occurrences(in_prompt):
    """After the output renamed `acc` (70) to `tot` (90) once, the draft at the next occurrence
    proposes `tot`; without the predicted-output source it proposes `acc` (the prompt's text).
    The copied text is in the prompt, or only in the client's prediction."""
    acc, tot = 70, 90
    code = [10, 11, 12, 13, acc, 14, 15, 16, 17, acc, 18, 19, 20, 21, acc, 22, 23]
    prompt, prediction = (ids(1, 2, *code, 3), None) if in_prompt else (ids(1, 2, 3), ids(*code))
    output = [10, 11, 12, 13, tot, 14, 15, 16, 17]  # next in the copy: the second occurrence
    proposed = {}
    for sources in (DrafterConfig().sources, frozenset({Source.CONTEXT})):
        d = Drafter(DrafterConfig(sources=sources))
        d.draft("t", "s", prompt, EMPTY, 8, prediction=prediction)
        tree = d.draft("t", "s", None, ids(*output), 16).tree
        proposed[len(sources)] = tree.token_ids[tree.parents == -1].tolist()
        if Source.PREDICTION in sources:
            assert tree.token_ids[0] == tot and tree.sources[0] == Source.PREDICTION  # the best node
            assert _has_path(tree, [tot, 18, 19, 20, 21, tot, 22])  # the third occurrence too
    assert tot not in proposed[1] and (acc in proposed[1]) == in_prompt


def _has_path(tree, tokens: list[int]) -> bool:
    """Whether a root-to-node path of the tree spells `tokens`."""
    paths = {-1: ()}
    for i, (t, p) in enumerate(zip(tree.token_ids.tolist(), tree.parents.tolist())):
        paths[i] = paths[p] + (t,)
    return tuple(tokens) in paths.values()


def test_the_rewrites_count_in_the_session_memory():
    d = Drafter(DrafterConfig())
    d.draft("t", "s", ids(*range(10, 50)), EMPTY, 8)
    d.draft("t", "s", None, ids(10, 11, 12, 13, 99, 15, 16, 17), 8)  # 14 -> 99, but 14 never comes again
    session = d._sessions[("t", "s")]
    assert session.prediction is None and session.rewrites[0].subs == {(14,): (99,)}
    d.draft("t", "s", ids(*range(10, 50), 14, 1), EMPTY, 8)  # restarted: 14 comes again after the rename
    d.draft("t", "s", None, ids(10, 11, 12, 13, 99, 15, 16, 17), 8)
    session = d._sessions[("t", "s")]
    assert session.prediction is not None and session.prediction.num_documents == 1
    assert d.stats().session_bytes == (session.core.memory_bytes + session.rewrites_bytes
                                       + session.prediction.memory_bytes)
