"""The tree-builder fuzz target (`specdraft fuzz tree`, and tests/retriever/test_properties.py).

A `TreeCase` is a draft over online indexes *and* a corpus datastore with edge-case query
knobs; `check_case` runs the C++ core (`_core.draft`, `_core.draft_calibrated`) on it and
asserts the tree's contract (parents[i] in [-1, i), scores non-increasing in (0, 1] and at
least min_score, at most max_nodes nodes, tokens from the documents) and, where the slow
references of tests/reference.py are importable (a source checkout), that every index query
and both trees equal theirs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retriever import _core

try:  # a source checkout: compare with the slow references too
    from tests import reference as ref
except ImportError:  # pragma: no cover - an installed package has no tests
    ref = None

BUDGET = 10_000  # online index token budget: nothing is evicted


@dataclass(frozen=True)
class Knobs:
    """One source's query parameters and trust."""

    max_match: int
    max_depth: int
    max_occurrences: int
    max_nodes: int
    exponent: float
    reliability: float
    half_match: float
    counted_once: bool = False  # max with the sources before it, not another witness

    def config(self, source_id: int) -> "_core.SourceConfig":
        p = _core.QueryParams()
        p.max_match, p.max_depth, p.max_occurrences = self.max_match, self.max_depth, self.max_occurrences
        p.max_nodes, p.match_exponent = self.max_nodes, self.exponent
        cfg = _core.SourceConfig()
        cfg.params, cfg.reliability, cfg.half_match, cfg.source_id = p, self.reliability, self.half_match, source_id
        cfg.counted_once = self.counted_once
        return cfg


@dataclass(frozen=True)
class TreeCase:
    online: tuple[tuple[tuple[int, ...], ...], ...]  # per online source: its documents
    online_knobs: tuple[Knobs, ...]
    corpus: tuple[tuple[int, ...], ...]  # the corpus datastore's documents (none: no corpus)
    corpus_knobs: Knobs
    context: tuple[int, ...]
    max_nodes: int
    min_score: float
    calib_seed: int


def random_knobs(rng: random.Random) -> Knobs:
    return Knobs(rng.choice([0, 1, 2, 3, 8, 64]), rng.choice([0, 1, 2, 5, 64]), rng.choice([0, 1, 2, 3, 32]),
                 rng.choice([0, 1, 4, 512]), rng.choice([0.5, 1.0, 2.0]), rng.uniform(0.05, 1.5),
                 rng.uniform(0.1, 8.0), rng.random() < 0.3)


def random_case(rng: random.Random) -> TreeCase:
    vocab = rng.choice([2, 3, 6, 50])
    docs = [tuple(rng.randrange(vocab) for _ in range(rng.randint(1, 40))) for _ in range(rng.randint(1, 6))]
    online = tuple(tuple(rng.sample(docs, rng.randint(1, len(docs)))) for _ in range(rng.randint(0, 3)))
    corpus = tuple(rng.sample(docs, rng.randint(0, len(docs))))
    doc = rng.choice(docs)
    end = rng.randint(0, len(doc))
    context = tuple(rng.randrange(vocab) for _ in range(rng.randint(0, 2))) + doc[max(0, end - rng.randint(0, 30)):end]
    return TreeCase(online, tuple(random_knobs(rng) for _ in online), corpus, random_knobs(rng), context,
                    rng.choice([0, 1, 2, 8, 64, 1000]), rng.choice([0.0, 1e-3, 0.2, 0.9]), rng.randrange(1 << 30))


def _corpus(case: TreeCase, work: Path) -> "_core.CorpusIndex | None":
    """The corpus as datastore files, sorted deep enough that the sampled occurrences are fixed (ties
    past sorted_depth may come in any order: the match, the path and the token after it count)."""
    if not case.corpus:
        return None
    tokens = np.array([t for d in case.corpus for t in (*d, -1)], np.int32)
    packed = np.where(tokens < 0, 0xFFFFFF, tokens).astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3]
    (work / "tokens.u24").write_bytes(packed.tobytes())
    sa = _core.build_suffix_array(tokens, _depth(case))
    (work / "sa.u32").write_bytes(sa.astype("<u4").tobytes())
    return _core.CorpusIndex(str(work / "tokens.u24"), str(work / "sa.u32"), len(tokens), len(sa), _depth(case))


def _depth(case: TreeCase) -> int:
    return max(1, case.corpus_knobs.max_match) + max(1, case.corpus_knobs.max_depth)


def _online(docs: tuple[tuple[int, ...], ...]) -> "_core.OnlineIndex":
    ix = _core.OnlineIndex(BUDGET)
    for d in docs:
        ix.append(np.array(d, np.int32))
        ix.end_document()
    return ix


def _reference_trie(case: TreeCase, i: int):
    """The slow reference's query of source i (online sources, then the corpus)."""
    ctx = list(case.context)
    if i < len(case.online):
        k, model = case.online_knobs[i], ref.OnlineRef(BUDGET)
        for d in case.online[i]:
            model.append(list(d))
            model.end_document()
        return model.query(ctx, k.max_match, k.max_depth, k.max_occurrences, k.max_nodes, k.exponent)
    k = case.corpus_knobs
    tokens = [t for d in case.corpus for t in (*d, -1)]
    return ref.corpus_query(tokens, ctx, _depth(case), k.max_match, k.max_depth, k.max_occurrences, k.max_nodes)


def _as_trie(c):
    return ref.Trie(c.tokens.tolist(), c.parents.tolist(), [ref.f32(m) for m in c.mass], ref.f32(c.root_mass),
                    c.match_length, c.occurrences, c.count.tolist())


def _same_trie(got, want) -> None:
    assert got.tokens.tolist() == want.tokens and got.parents.tolist() == want.parents, "trie nodes differ"
    assert np.allclose(got.mass, np.array(want.mass, np.float64), rtol=1e-5), "trie masses differ"
    assert abs(got.root_mass - want.root_mass) <= 1e-5 * max(1.0, abs(want.root_mass)), "root masses differ"
    assert (got.match_length, got.occurrences) == (want.match_length, want.occurrences), "match stats differ"


def _check_tree(case: TreeCase, tokens: np.ndarray, parents: np.ndarray, scores: np.ndarray) -> None:
    """The contract of every draft tree."""
    n = len(tokens)
    assert n <= max(case.max_nodes, 0) and len(parents) == len(scores) == n, "tree size"
    assert all(-1 <= p < i for i, p in enumerate(parents.tolist())), "parents[i] must be in [-1, i)"
    assert np.all(np.diff(scores) <= 0), "scores must never increase"
    assert np.all(scores <= 1) and np.all(scores >= np.float32(case.min_score)), "scores must be in [min_score, 1]"
    known = {t for docs in (*case.online, case.corpus) for d in docs for t in d}
    assert set(tokens.tolist()) <= known, "a token from no document"


def _same_tree(got, want, what: str) -> None:
    assert got[0].tolist() == want[0] and got[1].tolist() == want[1], f"{what}: tree differs from the reference"
    assert np.allclose(got[2], np.array(want[2], np.float64), rtol=1e-6), f"{what}: scores differ"
    assert got[3].tolist() == want[3], f"{what}: sources differ"


def check_case(case: TreeCase, work: Path) -> bool:
    """Runs the core on `case` (corpus files written under `work`); AssertionError names what broke.
    True when the references were compared too."""
    ctx = np.array(case.context, np.int32)
    online = [_online(docs) for docs in case.online]
    cfgs = [k.config(i + 1) for i, k in enumerate(case.online_knobs)]
    corpus = _corpus(case, work)
    corpora, corpus_cfgs = ([corpus], [case.corpus_knobs.config(3)]) if corpus is not None else ([], [])
    tree = _core.testing.draft(ctx, online, cfgs, corpora, corpus_cfgs, case.max_nodes, case.min_score)
    _check_tree(case, *tree[:3])
    rows = len(online) + len(corpora)
    calib = np.random.default_rng(case.calib_seed).uniform(0.05, 1.0, (rows + 1, _core.CALIB_CELLS)).astype(np.float32)
    row_of = np.array([(case.calib_seed >> i) % (rows + 1) for i in range(rows)], np.int32)
    calibrated = _core.testing.draft_calibrated(ctx, online, cfgs, corpora, corpus_cfgs, calib, row_of, case.max_nodes,
                                        case.min_score)
    _check_tree(case, *calibrated[:3])
    if ref is None:
        return False
    found = [(_core.testing.query(ix, ctx, c.params), c) for ix, c in zip([*online, *corpora], [*cfgs, *corpus_cfgs])]
    for i, (c, _) in enumerate(found):
        _same_trie(c, _reference_trie(case, i))
    want = ref.build_tree([(_as_trie(c), cfg.reliability, cfg.half_match, cfg.source_id, cfg.counted_once)
                           for c, cfg in found],
                          case.max_nodes, case.min_score)
    _same_tree(tree, want, "draft")
    want = ref.build_tree_calibrated([(_as_trie(c), int(r), cfg.source_id, cfg.counted_once)
                                      for (c, cfg), r in zip(found, row_of)],
                                     calib.tolist(), case.max_nodes, case.min_score)
    _same_tree(calibrated, want, "draft_calibrated")
    assert calibrated[4].tolist() == want[4], "draft_calibrated: cells differ"
    return True
