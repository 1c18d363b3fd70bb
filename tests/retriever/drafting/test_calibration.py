"""Calibrated scoring and acceptance feedback: the core against tests/reference.py, the
Calibration and PriorOutputs layers, and the drafter learning from new_tokens."""

import doctest
import random

import numpy as np
import pytest

import retriever.drafting.calibration as calibration_module
import retriever.drafting.reference_set as reference_module
import tests.reference as ref
from retriever import _core
from retriever.drafting.calibration import CALIB_CELLS, Calibration, CalibrationParams, prior_row
from retriever.drafting.drafter import Drafter
from retriever.drafting.reference_set import PriorOutputs
from retriever.drafting.types import ALL_SOURCES, DrafterConfig, ReferenceParams, Source
from tests.retriever.drafting.test_core import context_from, random_sources

EMPTY = np.empty(0, np.int32)


def ids(*tokens):
    return np.array(tokens, np.int32)


def as_trie(c):
    return ref.Trie(c.tokens.tolist(), c.parents.tolist(), [ref.f32(m) for m in c.mass], ref.f32(c.root_mass),
                    c.match_length, c.occurrences, c.count.tolist())


def test_module_examples():
    for module in (calibration_module, reference_module):
        assert doctest.testmod(module, globs={"np": np, **vars(module)}).failed == 0


def test_cells_match_reference_and_edges():
    for e in list(range(0, 70)) + [200]:
        for share in (0.0, 0.1, 0.25, 0.5, 0.74, 0.8, 0.9989, 0.999, 1.0):
            for support in range(1, 12):
                assert _core.testing.calib_cell(e, share, support) == ref.calib_cell(e, np.float32(share), support)
    for cell in range(CALIB_CELLS):
        e, share, support = _core.calib_cell_edges(cell)
        assert _core.testing.calib_cell(e, share if share < 1 else 1.0, support) == cell


@pytest.mark.parametrize("seed", range(40))
def test_calibrated_build_tree_matches_reference(seed):
    rng = random.Random(seed)
    docs, sources = random_sources(rng)
    ctx = np.array(context_from(rng, docs, 6), np.int32)
    found = [(_core.testing.query(ix, ctx, cfg.params), cfg) for ix, cfg in sources]
    for c, _ in found:  # occurrences through each node: never more than through its parent
        counts, parents = c.count.tolist(), c.parents.tolist()
        assert all(counts[i] <= (c.occurrences if p < 0 else counts[p]) for i, p in enumerate(parents))
    calib = np.random.default_rng(seed).uniform(0.05, 1.0, (len(found) + 1, CALIB_CELLS)).astype(np.float32)
    rows = np.array([rng.randrange(len(calib)) for _ in found], np.int32)
    max_nodes, min_score = rng.choice([0, 1, 8, 64, 1000]), rng.choice([0.0, 1e-3, 0.2])
    want = ref.build_tree_calibrated([(as_trie(c), int(r), cfg.source_id, cfg.counted_once)
                                      for (c, cfg), r in zip(found, rows)],
                                     calib.tolist(), max_nodes, min_score)
    for got in (_core.testing.build_tree_calibrated(found, calib, rows, max_nodes, min_score),
                _core.testing.draft_calibrated(ctx, [ix for ix, _ in sources], [cfg for _, cfg in sources], [], [], calib,
                                       rows, max_nodes, min_score)):
        tokens, parents, scores, source_ids, cells = got
        assert tokens.tolist() == want[0] and parents.tolist() == want[1]
        np.testing.assert_allclose(scores, np.array(want[2], np.float64), rtol=1e-6)
        assert source_ids.tolist() == want[3] and cells.tolist() == want[4]
        assert np.all(np.diff(scores) <= 0) and np.all(scores <= 1)


def _config(rng: random.Random, source_id: int) -> "_core.SourceConfig":
    cfg = _core.SourceConfig()
    cfg.reliability, cfg.half_match, cfg.source_id = rng.uniform(0.1, 1.5), rng.uniform(0.5, 8), source_id
    return cfg


def _next_tokens(rng: random.Random, tree, vocab: int) -> np.ndarray:
    """What a verifier might report: a path of the draft (maybe cut short) and a bonus token, or noise."""
    tokens, parents = tree[0].tolist(), tree[1].tolist()
    if not tokens or rng.random() < 0.3:
        return np.array([rng.randrange(vocab) for _ in range(rng.randint(0, 3))], np.int32)
    node, path = rng.randrange(len(tokens)), []
    while node >= 0:
        path.append(tokens[node])
        node = parents[node]
    return np.array(path[::-1][:rng.randint(0, len(path))] + [rng.randrange(vocab)], np.int32)


@pytest.mark.parametrize("seed", range(24))
def test_session_steps_match_observe_then_stateless_draft(tmp_path, seed):
    """`session_draft` == calib_observe on the last draft + context extension + `draft_calibrated`
    (or `draft`, heuristic) over the last TAIL_TOKENS tokens, step after step."""
    from tests.retriever.drafting.test_core import random_docs, write_corpus

    rng = random.Random(seed)
    vocab = rng.choice([3, 6, 40])
    docs = random_docs(rng, vocab, 8, 60)
    corpus = write_corpus(tmp_path, [t for d in docs[:4] for t in d + [ref.SEP]], 128)
    tenant = _core.OnlineIndex(10_000) if rng.random() < 0.7 else None
    for doc in docs[4:] if tenant is not None else ():
        tenant.append(ids(*doc))
        tenant.end_document()
    cfgs = [_config(rng, s) for s in (1, 2, 4, 3)]  # context, tenant, reference, corpus
    calibrate, use_context = rng.random() < 0.75, rng.random() < 0.85
    min_score = rng.choice([0.0, 1e-3])
    plan = _core.DraftPlan(*cfgs[:3], use_context, [corpus], [cfgs[3]], min_score, calibrate, 3.0, 0.9,
                           _core.SourceConfig())
    prior = np.random.default_rng(seed).uniform(0.05, 0.95, 4 * CALIB_CELLS).astype(np.float32)
    got_cal = [np.zeros(prior.size), np.zeros(prior.size), prior.copy()]
    want_cal = [a.copy() for a in got_cal]
    prompt = context_from(rng, docs, vocab)
    session, context = _core.Session(ids(*prompt), 100_000), list(prompt)
    mirror = _core.OnlineIndex(100_000)
    mirror.append(ids(*prompt))
    last, new = None, EMPTY
    for _ in range(8):
        max_nodes = rng.choice([0, 1, 8, 64])  # 0: a report only, no draft
        got = _core.session_draft(session, new, tenant, None, plan, *got_cal, prior, max_nodes)
        assert (len(_core.last_draft_ns()) == 0) == (max_nodes == 0)  # a report only queries no index
        if calibrate and last is not None and len(new):
            _core.calib_observe(last[0], last[1], last[4], new, *want_cal, prior, 3.0, 0.9)
        mirror.append(new)
        context += new.tolist()
        online = [(ix, cfg, row) for ix, cfg, row in ((mirror, cfgs[0], 0), (tenant, cfgs[1], 1))
                  if ix is not None and (row or use_context)]
        args = (ids(*context[-_core.TAIL_TOKENS:]), [o[0] for o in online], [o[1] for o in online], [corpus], [cfgs[3]])
        if calibrate:
            last = _core.testing.draft_calibrated(*args, want_cal[2].reshape(4, CALIB_CELLS),
                                          ids(*[o[2] for o in online], 3), max_nodes, min_score)
        else:
            last = (*_core.testing.draft(*args, max_nodes, min_score), None)
        for g, w in zip(got, last):
            np.testing.assert_array_equal(g, w)
        for g, w in zip(got_cal, want_cal):
            np.testing.assert_array_equal(g, w)
        assert session.length == len(context) and session.tokens(len(prompt)).tolist() == context[len(prompt):]
        new = _next_tokens(rng, got, vocab)
    assert session.prompt_length == len(prompt) and session.memory_bytes > 0


def test_session_draft_checks_its_calibration_table(tmp_path):
    cfg = _core.SourceConfig()
    plan = _core.DraftPlan(cfg, cfg, cfg, True, [], [], 0.0, True, 3.0, 0.9, cfg)
    session, small = _core.Session(ids(1, 2, 1), 100), np.zeros(2 * CALIB_CELLS, np.float32)
    with pytest.raises(ValueError, match=f"calibration table must have {3 * CALIB_CELLS} cells, got {2 * CALIB_CELLS}"):
        _core.session_draft(session, EMPTY, None, None, plan, np.zeros(small.size), np.zeros(small.size), small,
                            small, 8)
    with pytest.raises(ValueError, match="one length"):
        _core.session_draft(session, EMPTY, None, None, plan, np.zeros(3), np.zeros(small.size), small, small, 8)
    with pytest.raises(ValueError, match="one SourceConfig"):
        _core.DraftPlan(cfg, cfg, cfg, True, [], [cfg], 0.0, True, 3.0, 0.9, cfg)


def test_calibrated_inputs_are_checked():
    ix = _core.OnlineIndex(100)
    ix.append(ids(1, 2, 1, 3))
    cfg = _core.SourceConfig()
    calib = np.ones((1, CALIB_CELLS), np.float32)
    with pytest.raises(ValueError, match="rows must index calib's rows, got 1"):
        _core.testing.draft_calibrated(ids(1), [ix], [cfg], [], [], calib, ids(1), 8, 0.0)
    with pytest.raises(ValueError, match="one entry per source"):
        _core.testing.draft_calibrated(ids(1), [ix], [cfg], [], [], calib, ids(0, 0), 8, 0.0)
    with pytest.raises(ValueError, match="columns"):
        _core.testing.draft_calibrated(ids(1), [ix], [cfg], [], [], np.ones((1, 3), np.float32), ids(0), 8, 0.0)


@pytest.mark.parametrize("seed", range(30))
def test_tested_outcomes_and_observe_match_reference(seed):
    rng = random.Random(seed)
    n = rng.randint(0, 30)
    parents = [rng.randint(-1, i - 1) for i in range(n)]
    tokens = [rng.randint(0, 3) for _ in range(n)]
    new = [rng.randint(0, 3) for _ in range(rng.randint(1, 6))]
    got = _core.tested_outcomes(ids(*tokens), ids(*parents), ids(*new))
    assert got.dtype == np.int8 and got.tolist() == ref.tested_outcomes(tokens, parents, new)
    cells = [rng.randint(-1, 2 * CALIB_CELLS - 1) for _ in range(n)]
    prior = np.random.default_rng(seed).uniform(0, 1, 2 * CALIB_CELLS).astype(np.float32)
    hits, trials, table = np.zeros(prior.size), np.zeros(prior.size), prior.copy()
    want = [hits.copy(), trials.copy(), table.copy()]
    for _ in range(2):
        _core.calib_observe(ids(*tokens), ids(*parents), ids(*cells), ids(*new), hits, trials, table, prior, 3.0, 0.9)
        ref.calib_observe(tokens, parents, cells, new, *want, prior, 3.0, 0.9)
    np.testing.assert_allclose(hits, want[0]) and np.testing.assert_allclose(trials, want[1])
    np.testing.assert_allclose(table, want[2], rtol=1e-6)


def test_tested_outcomes_rejects_bad_parents():
    with pytest.raises(ValueError, match="parents"):
        _core.tested_outcomes(ids(1, 2), ids(-1, 1), ids(1))


def test_prior_row_is_the_heuristic_score():
    row = prior_row(1.0, 2.0)
    assert row.dtype == np.float32 and row.shape == (CALIB_CELLS,)
    assert row[_core.testing.calib_cell(2, 1.0, 1)] == pytest.approx(0.5)  # share 1, conf 2 / (2 + 2)
    assert row[_core.testing.calib_cell(6, 0.3, 3)] == pytest.approx(0.375 * 5 / 7)  # e bucket 5-6, share bin .25-.5


def test_calibration_learns_and_forgets():
    cal = Calibration(np.full((1, CALIB_CELLS), 0.5, np.float32), CalibrationParams(prior_strength=2.0, decay=0.5))
    tree = (ids(5), ids(-1), ids(3))
    for _ in range(20):
        cal.observe(*tree, ids(6, 1))  # node 5 rejected: cell 3 tested, never accepted
    assert cal.table()[0, 3] == pytest.approx(0.25) and cal.table()[0, 4] == 0.5  # (0 + 2 * .5) / (2 + 2)
    cal.observe(*tree, ids(5, 1))  # decay 0.5: one acceptance moves it a lot
    assert cal.table()[0, 3] == pytest.approx(0.5) and cal.trials == pytest.approx(2.0, abs=1e-3)


def test_drafter_learns_from_new_tokens():
    d = Drafter(DrafterConfig())
    d.draft("t", "s", ids(1, 2, 3, 1, 2), EMPTY, 8)
    before = d._tenants["t"].calibration.table().copy()
    d.draft("t", "s", None, ids(3, 1, 2), 8)  # the drafted "3 1 2 ..." path was accepted
    after = d._tenants["t"].calibration.table()
    assert (after > before).any() and not (after < before).any()
    heuristic = Drafter(DrafterConfig(calibrate=False)).draft("t", "s", ids(1, 2, 3, 1, 2), EMPTY, 8).tree
    assert heuristic.token_ids[:2].tolist() == [3, 1]


@pytest.mark.parametrize("verified, observed", [(None, 2), (5, 2), (1, 1), (0, 0)])
def test_only_the_verified_prefix_is_observed(verified, observed):
    """After "1 2" came "3" and "4": the draft's two root children are both rejected by "9"; the
    verifier says how many best-first nodes it tested (None: all), and only those count."""
    d = Drafter(DrafterConfig())
    tree = d.draft("t", "s", ids(1, 2, 3, 1, 2, 4, 1, 2), EMPTY, 8).tree
    assert sorted(tree.token_ids[tree.parents == -1].tolist()) == [3, 4] and tree.parents[1] == -1
    assert d._tenants["t"].calibration.trials == 0.0  # nothing reported yet
    d.draft("t", "s", None, ids(9), 8, verified_nodes=verified)
    assert d._tenants["t"].calibration.trials == pytest.approx(observed, abs=0.02)  # a trial per tested node (decayed)


def test_source_switches_and_reference_set():
    d = Drafter(DrafterConfig(sources=ALL_SOURCES, reference=ReferenceParams(k=1)))
    d.draft("a", "s1", ids(100, 101), ids(7, 8, 9, 10, 11, 12), 8)
    d.end_session("a", "s1")
    d.draft("a", "s0", ids(100, 101), ids(40, 41, 42, 43), 8)
    d.end_session("a", "s0")
    tree = d.draft("a", "s2", ids(50, 7, 8), EMPTY, 8).tree
    assert tree.token_ids.tolist()[:4] == [9, 10, 11, 12]
    assert set(tree.sources.tolist()) <= {Source.TENANT, Source.REFERENCE}
    assert d._sessions[("a", "s2")].reference.num_tokens == 6  # the most similar output only
    only_ctx = Drafter(DrafterConfig(sources=frozenset({Source.CONTEXT})))
    only_ctx.draft("a", "s1", ids(100, 101), ids(7, 8, 9), 8)
    only_ctx.end_session("a", "s1")
    assert len(only_ctx.draft("a", "s2", ids(50, 7, 8), EMPTY, 8).tree) == 0


def test_prior_outputs_rank_by_similarity_and_cap():
    prior = PriorOutputs(ReferenceParams(k=2, max_docs=3))
    for doc in ([1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 9], [20, 21]):
        prior.add(ids(*doc))
    prior.add(EMPTY)
    assert len(prior) == 3  # the oldest dropped, the empty one ignored
    assert prior.top(ids(5, 6, 7), 2).tolist()[0] == 0
    assert prior.top(ids(1, 2, 3), 5).tolist()[0] == 1
    assert PriorOutputs(ReferenceParams()).select(ids(1)) is None
