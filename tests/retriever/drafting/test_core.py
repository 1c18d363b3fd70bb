"""The C++ drafting core against the slow references in tests/reference.py, on random inputs."""

import random

import numpy as np
import pytest

from retriever import _core
from tests import reference as ref


def params(max_match=64, max_depth=64, max_occurrences=32, max_nodes=512, exponent=1.0):
    p = _core.QueryParams()
    p.max_match, p.max_depth, p.max_occurrences = max_match, max_depth, max_occurrences
    p.max_nodes, p.match_exponent = max_nodes, exponent
    return p


def as_trie(c) -> ref.Trie:
    return ref.Trie(c.tokens.tolist(), c.parents.tolist(), [ref.f32(m) for m in c.mass],
                    ref.f32(c.root_mass), c.match_length, c.occurrences)


def assert_same_trie(got, want: ref.Trie):
    assert got.tokens.tolist() == want.tokens
    assert got.parents.tolist() == want.parents
    np.testing.assert_allclose(got.mass, np.array(want.mass, np.float64), rtol=1e-5)
    assert got.root_mass == pytest.approx(want.root_mass, rel=1e-5)
    assert (got.match_length, got.occurrences) == (want.match_length, want.occurrences)


def random_docs(rng: random.Random, vocab: int, count: int, max_len: int) -> list[list[int]]:
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, max_len))] for _ in range(count)]


def context_from(rng: random.Random, docs: list[list[int]], vocab: int) -> list[int]:
    """A context whose tail usually occurs in the docs, sometimes with a random prefix."""
    doc = rng.choice(docs)
    end = rng.randint(1, len(doc))
    ctx = doc[max(0, end - rng.randint(1, 40)):end]
    return [rng.randrange(vocab) for _ in range(rng.randint(0, 3))] + ctx


@pytest.mark.parametrize("seed", range(40))
def test_suffix_array_sorts_every_suffix(seed):
    rng = random.Random(seed)
    docs = random_docs(rng, rng.choice([2, 3, 151_936]), rng.randint(1, 8), 60)
    tokens = [t for d in docs for t in d + [ref.SEP]]
    depth = rng.choice([1, 2, 5, 256])
    sa = _core.build_suffix_array(np.array(tokens, np.int32), depth).tolist()
    assert sorted(sa) == [i for i, t in enumerate(tokens) if t != ref.SEP]
    keys = [ref.suffix_key(tokens, i, depth) for i in sa]
    assert keys == sorted(keys)


def test_suffix_array_rejects_bad_depth():
    with pytest.raises(ValueError, match="max_depth"):
        _core.build_suffix_array(np.array([1, 2], np.int32), 0)


def query_matches_reference(rng: random.Random, index, model, ctx: list[int]):
    """Queries `index` with random knobs, asserts the trie equals the slow reference `model`'s;
    returns (the trie, the knobs)."""
    knobs = dict(max_match=rng.choice([3, 64]), max_depth=rng.choice([1, 5, 64]),
                 max_occurrences=rng.choice([1, 4, 32]), max_nodes=rng.choice([3, 512]),
                 exponent=rng.choice([1.0, 2.0]))
    got = _core.testing.query(index, np.array(ctx, np.int32), params(**knobs))
    want = model.query(ctx, knobs["max_match"], knobs["max_depth"], knobs["max_occurrences"],
                       knobs["max_nodes"], knobs["exponent"])
    assert_same_trie(got, want)
    return got, knobs


@pytest.mark.parametrize("seed", range(60))
def test_online_query_matches_reference(seed):
    rng = random.Random(seed)
    vocab = rng.choice([2, 4, 50])
    budget = rng.choice([30, 200, 10_000])
    index, model = _core.OnlineIndex(budget), ref.OnlineRef(budget)
    docs = random_docs(rng, vocab, rng.randint(1, 12), 80)
    for i, doc in enumerate(docs):  # appended in random pieces; the last stays open sometimes
        if rng.random() < 0.3:  # room made ahead (a replay): same answers
            index.reserve(rng.choice([-1, 0, 7, len(doc) + 1, 300, 10**12]))
        cut = rng.randint(0, len(doc))
        for piece in (doc[:cut], doc[cut:]):
            index.append(np.array(piece, np.int32))
            model.append(piece)
        if i < len(docs) - 1 or rng.random() < 0.5:
            index.end_document()
            model.end_document()
    assert index.num_tokens == sum(map(len, model._live()))
    assert index.num_documents == len(model.docs)
    for _ in range(5):
        query_matches_reference(rng, index, model, context_from(rng, docs, vocab))


@pytest.mark.parametrize("seed", range(60))
def test_online_extend_matches_reference_and_the_live_path(seed):
    """extend (a replay: many documents at once, level by level) answers as the slow reference and as
    append + end_document per document, also with an open document or evictions on the way."""
    rng = random.Random(seed)
    vocab = rng.choice([2, 4, 50])
    budget = rng.choice([30, 200, 10_000])
    index, live, model = _core.OnlineIndex(budget), _core.OnlineIndex(budget), ref.OnlineRef(budget)
    docs = random_docs(rng, vocab, rng.randint(1, 24), 80)
    i = 0
    while i < len(docs):
        group = docs[i:i + rng.randint(1, 8)]
        i += len(group)
        if rng.random() < 0.2:  # a document left open before the replay: extend goes on one by one
            piece = [rng.randrange(vocab) for _ in range(rng.randint(0, 5))]
            for target in (index, live):
                target.append(np.array(piece, np.int32))
            model.append(piece)
        if rng.random() < 0.2:
            group = group + [[]]  # an empty document, as append([]) + end_document makes
        index.extend(np.array([t for d in group for t in d], np.int32), np.array([len(d) for d in group], np.int64))
        for doc in group:
            live.append(np.array(doc, np.int32))
            live.end_document()
            model.append(doc)
            model.end_document()
    assert index.num_tokens == live.num_tokens == sum(map(len, model._live()))
    assert index.num_documents == live.num_documents == len(model.docs)
    for _ in range(8):
        ctx = context_from(rng, docs, vocab)
        got, knobs = query_matches_reference(rng, index, model, ctx)
        same = _core.testing.query(live, np.array(ctx, np.int32), params(**knobs))
        assert (got.tokens.tolist(), got.parents.tolist(), got.mass.tolist()) == (
            same.tokens.tolist(), same.parents.tolist(), same.mass.tolist())


def test_online_extend_refuses_bad_input_and_leaves_the_index_unchanged():
    index = _core.OnlineIndex(1000)
    index.extend(np.array([1, 2, 3], np.int32), np.array([3], np.int64))
    for tokens, lengths, message in (([4, -3], [2], "token id"), ([4, 5], [1], "sum"), ([4, 5], [3, -1], ">= 0"),
                                     ([4, 1 << 24], [1, 1], "token id")):
        with pytest.raises(ValueError, match=message):
            index.extend(np.array(tokens, np.int32), np.array(lengths, np.int64))
    assert (index.num_tokens, index.num_documents) == (3, 1)
    got = _core.testing.query(index, np.array([1, 2], np.int32), params())
    assert got.tokens.tolist() == [3]


def test_online_extend_fills_a_replayed_index_without_growing_it_again():
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 151_936, 500, dtype=np.int32) for _ in range(8)]
    extended, live = _core.OnlineIndex(4000), _core.OnlineIndex(4000)
    extended.extend(np.concatenate(docs), np.full(8, 500, np.int64))
    live.reserve(4000 + 8)
    for doc in docs:
        live.append(doc)
        live.end_document()
    assert abs(extended.memory_bytes - live.memory_bytes) < 1024  # sized as the reserved live path is


def test_online_index_memory_stays_flat_under_budget():
    index = _core.OnlineIndex(10_000)
    rng = np.random.default_rng(0)
    sizes = []
    for i in range(400):
        index.append(rng.integers(0, 151_936, 500, dtype=np.int32))
        index.end_document()
        if i in (100, 399):
            sizes.append(index.memory_bytes)
    assert index.num_tokens <= 10_000
    assert sizes[1] <= sizes[0]


def test_online_index_reserve_sizes_once_within_twice_the_budget():
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 151_936, 500, dtype=np.int32) for _ in range(8)]
    grown, reserved = _core.OnlineIndex(4000), _core.OnlineIndex(4000)
    reserved.reserve(4000 + 8)
    sized = reserved.memory_bytes
    for doc in docs:
        for index in (grown, reserved):
            index.append(doc)
            index.end_document()
    assert reserved.memory_bytes - sized < 1024  # no table or ring grew while the replay went in (the doc list did)
    assert abs(reserved.memory_bytes - grown.memory_bytes) < 1024  # the size growth would have reached
    huge = _core.OnlineIndex(1000)
    huge.reserve(10**12)  # capped at twice the budget
    assert huge.memory_bytes < 2 * reserved.memory_bytes


def test_online_index_rejects_out_of_range_tokens():
    index = _core.OnlineIndex(100)
    with pytest.raises(ValueError, match="token id"):
        index.append(np.array([1, -3], np.int32))
    with pytest.raises(ValueError, match="token_budget"):
        _core.OnlineIndex(0)


def write_corpus(tmp_path, tokens: list[int], depth: int) -> _core.CorpusIndex:
    arr = np.array(tokens, np.int32)
    packed = np.where(arr < 0, 0xFFFFFF, arr).astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3]
    (tmp_path / "tokens.u24").write_bytes(packed.tobytes())
    sa = _core.build_suffix_array(arr, depth)
    (tmp_path / "sa.u32").write_bytes(sa.astype("<u4").tobytes())
    return _core.CorpusIndex(str(tmp_path / "tokens.u24"), str(tmp_path / "sa.u32"), len(tokens), len(sa), depth)


@pytest.mark.parametrize("seed", range(40))
def test_corpus_query_matches_reference(tmp_path, seed):
    rng = random.Random(seed)
    vocab = rng.choice([2, 3, 40, 151_936])
    docs = random_docs(rng, vocab, rng.randint(1, 10), 70)
    tokens = [t for d in docs for t in d + [ref.SEP]]
    max_match, max_depth = rng.choice([(4, 8), (64, 64)])
    depth = max_match + max_depth  # ties beyond it would make the sample order unspecified
    corpus = write_corpus(tmp_path, tokens, depth)
    for i in range(len(tokens)):
        assert _core.testing.token(corpus, i) == tokens[i]
    for _ in range(5):
        ctx = context_from(rng, docs, vocab)
        occ, nodes = rng.choice([1, 3, 32]), rng.choice([4, 512])
        got = _core.testing.query(corpus, np.array(ctx, np.int32), params(max_match, max_depth, occ, nodes))
        want = ref.corpus_query(tokens, ctx, depth, max_match, max_depth, occ, nodes)
        assert_same_trie(got, want)
        lo, hi = _core.testing.find_range(corpus, np.array(ctx[-2:], np.int32))
        brute = [i for i in range(len(tokens)) if tokens[i:i + len(ctx[-2:])] == ctx[-2:]]
        assert sorted(_core.testing.suffix(corpus, r) for r in range(lo, hi)) == brute


def test_corpus_index_rejects_size_mismatch(tmp_path):
    write_corpus(tmp_path, [1, 2, ref.SEP], 8)
    with pytest.raises(ValueError, match="size must be 6 bytes, got 9"):
        _core.CorpusIndex(str(tmp_path / "tokens.u24"), str(tmp_path / "sa.u32"), 2, 2, 8)
    with pytest.raises(ValueError, match="cannot open"):
        _core.CorpusIndex(str(tmp_path / "missing"), str(tmp_path / "sa.u32"), 3, 2, 8)


def random_sources(rng: random.Random):
    """Candidates from random online indexes, with random source knobs."""
    out = []
    docs = random_docs(rng, rng.choice([2, 3, 6]), 6, 50)
    for source_id in range(1, rng.randint(1, 4) + 1):
        index = _core.OnlineIndex(10_000)
        for doc in rng.sample(docs, rng.randint(1, len(docs))):
            index.append(np.array(doc, np.int32))
            index.end_document()
        cfg = _core.SourceConfig()
        cfg.reliability, cfg.half_match, cfg.source_id = rng.uniform(0.1, 1.5), rng.uniform(0.5, 8), source_id
        cfg.params = params(max_occurrences=rng.choice([2, 32]), exponent=rng.choice([1.0, 2.0]))
        cfg.counted_once = rng.random() < 0.3
        out.append((index, cfg))
    return docs, out


@pytest.mark.parametrize("seed", range(60))
def test_build_tree_and_draft_match_reference(seed):
    rng = random.Random(seed)
    docs, sources = random_sources(rng)
    ctx = np.array(context_from(rng, docs, 6), np.int32)
    found = [(_core.testing.query(ix, ctx, cfg.params), cfg) for ix, cfg in sources]
    max_nodes, min_score = rng.choice([0, 1, 8, 64, 1000]), rng.choice([0.0, 1e-3, 0.2])
    want = ref.build_tree([(as_trie(c), cfg.reliability, cfg.half_match, cfg.source_id, cfg.counted_once)
                           for c, cfg in found],
                          max_nodes, min_score)
    for got in (_core.testing.build_tree(found, max_nodes, min_score),
                _core.testing.draft(ctx, [ix for ix, _ in sources], [cfg for _, cfg in sources], [], [],
                            max_nodes, min_score)):
        tokens, parents, scores, source_ids = got
        assert tokens.tolist() == want[0]
        assert parents.tolist() == want[1]
        np.testing.assert_allclose(scores, np.array(want[2], np.float64), rtol=1e-6)
        assert source_ids.tolist() == want[3]
        assert all(p < i for i, p in enumerate(parents.tolist()))
        assert np.all(np.diff(scores) <= 0) and np.all(scores <= 1)


def test_draft_tree_worked_example():
    """The example of tree_builder.cpp: scores 1, 0.9 (x>y) and 0.4 (x>z), the last cut."""
    a, b = _core.OnlineIndex(100), _core.OnlineIndex(100)
    for doc in ([7, 1, 2], [7, 1, 2], [7, 1, 3], [7, 1, 3]):
        a.append(np.array(doc, np.int32))
        a.end_document()
    b.append(np.array([7, 1, 2], np.int32))
    b.end_document()
    cfg_a, cfg_b = _core.SourceConfig(), _core.SourceConfig()
    cfg_a.reliability, cfg_a.half_match, cfg_a.source_id = 1.6, 1.0, 1  # conf 1.6 * 1/2 = 0.8
    cfg_b.reliability, cfg_b.half_match, cfg_b.source_id = 1.0, 1.0, 2  # conf 0.5
    tokens, parents, scores, sources = _core.testing.draft(np.array([7], np.int32), [a, b], [cfg_a, cfg_b], [], [], 2, 0.0)
    assert tokens.tolist() == [1, 2] and parents.tolist() == [-1, 0]
    np.testing.assert_allclose(scores, [1.0, 0.9], rtol=1e-6)
    assert sources.tolist() == [1, 2]


@pytest.mark.parametrize("seed", range(10))
def test_corpus_find_range_of_short_and_absent_patterns(tmp_path, seed):
    """Searches start in the first token's bucket: single tokens, absent and too large ids."""
    rng = random.Random(seed)
    docs = random_docs(rng, rng.choice([3, 40]), rng.randint(1, 6), 40)
    tokens = [t for d in docs for t in d + [ref.SEP]]
    corpus = write_corpus(tmp_path, tokens, 8)
    for pattern in ([rng.randrange(45)], [rng.randrange(45), rng.randrange(45)], [10**6], [10**6, 1], [2, 10**6]):
        lo, hi = _core.testing.find_range(corpus, np.array(pattern, np.int32))
        brute = [i for i in range(len(tokens)) if tokens[i:i + len(pattern)] == pattern]
        assert sorted(_core.testing.suffix(corpus, r) for r in range(lo, hi)) == brute
