"""verifier.decoding.tree against slow pure-Python references on random trees: the 4-D tree mask,
position ids, depths, ancestors, DraftTree.prefix, prune; verifier.decoding.cache.commit
on synthetic caches; CostModel interpolation and the prefix choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retriever.drafting.types import DraftTree
from tests.trees import tree
from verifier.decoding.cache import commit, kv_tensors, truncate
from verifier.decoding.cost import CostModel, ScoreCalibration
from verifier.decoding.tree import build_tree_inputs, prune


def random_draft(rng: np.random.Generator, n: int, vocab: int = 50) -> DraftTree:
    parents = np.array([rng.integers(-1, i) if i else -1 for i in range(n)], np.int64)  # [n] in [-1, i)
    scores = np.sort(rng.random(n).astype(np.float32))[::-1]
    return tree(rng.integers(0, vocab, n), parents, scores, rng.integers(0, 4, n).astype(np.uint8))


def ref_path(parents: list[int], i: int) -> list[int]:
    """Node indices from the root's child down to node i."""
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


def ref_mask(parents: list[int], cache_len: int) -> list[list[bool]]:
    """allowed[row][key] over rows root + nodes and keys cache + root + nodes."""
    n = len(parents)
    rows = []
    for r in range(n + 1):
        sees = {0} | ({1 + j for j in ref_path(parents, r - 1)} if r else set())
        rows.append([k < cache_len or (k - cache_len) in sees for k in range(cache_len + 1 + n)])
    return rows


@pytest.mark.parametrize("seed", range(20))
def test_tree_inputs_match_slow_reference(seed):
    rng = np.random.default_rng(seed)
    draft = random_draft(rng, int(rng.integers(0, 30)))
    cache_len = int(rng.integers(0, 12))
    parents = draft.parents.tolist()
    for dtype in (torch.float32, torch.bfloat16):
        t = build_tree_inputs(7, draft, cache_len, dtype, "cpu")
        n = len(draft)
        assert t.input_ids.tolist() == [[7] + draft.token_ids.tolist()]
        want_depth = [0] + [len(ref_path(parents, i)) for i in range(n)]
        assert t.depth.tolist() == want_depth
        assert t.position_ids.tolist() == [[cache_len + d for d in want_depth]]
        assert t.attention_mask.shape == (1, 1, n + 1, cache_len + n + 1) and t.attention_mask.dtype == dtype
        allowed = ref_mask(parents, cache_len)
        want = torch.tensor([[0.0 if a else torch.finfo(dtype).min for a in row] for row in allowed], dtype=dtype)
        assert torch.equal(t.attention_mask[0, 0], want)
        assert t.ancestor.tolist() == [row[cache_len:] for row in allowed]
        assert t.parent_rows.tolist() == [p + 1 for p in parents]
        assert draft.depths().tolist() == want_depth[1:]


def test_worked_example_of_the_module_doc():
    t = build_tree_inputs(3, tree([10, 11, 12], [-1, 0, -1], [0.9, 0.5, 0.4], [1, 1, 2]), 2, torch.float32, "cpu")
    assert t.position_ids.tolist() == [[2, 3, 4, 3]]
    assert (t.attention_mask[0, 0] == 0).int().tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                                                             [1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 1]]


@pytest.mark.parametrize("seed", range(10))
def test_prefix_keeps_the_best_nodes_as_a_tree(seed):
    rng = np.random.default_rng(seed)
    draft = random_draft(rng, 25)
    for k in (0, 1, 7, 25, 40):
        p = draft.prefix(k)
        m = min(k, 25)
        assert len(p) == m
        assert sorted(p.scores.tolist(), reverse=True) == sorted(draft.scores.tolist(), reverse=True)[:m]
        assert np.all(p.parents < np.arange(m))  # a valid tree
        assert p.token_ids.tolist() == draft.token_ids[:m].tolist()


@pytest.mark.parametrize("seed", range(10))
def test_prune_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    draft = random_draft(rng, 30, vocab=60)
    draft = tree(np.where(rng.random(30) < 0.1, -3, draft.token_ids), draft.parents, draft.scores, draft.sources)
    vocab, max_depth = 50, int(rng.integers(1, 5))
    parents = draft.parents.tolist()
    keep = [all(0 <= draft.token_ids[j] < vocab for j in ref_path(parents, i))
            and len(ref_path(parents, i)) <= max_depth for i in range(30)]
    got = prune(draft, vocab, max_depth)
    kept = [i for i in range(30) if keep[i]]
    assert got.token_ids.tolist() == draft.token_ids[kept].tolist()
    assert got.scores.tolist() == draft.scores[kept].tolist()
    # each kept node's path spells the same tokens as before
    for new_i, old_i in enumerate(kept):
        new_path = [int(got.token_ids[j]) for j in ref_path(got.parents.tolist(), new_i)]
        assert new_path == [int(draft.token_ids[j]) for j in ref_path(parents, old_i)]


def _cache(layers: int, length: int):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i in range(layers):
        kv = torch.arange(length, dtype=torch.float64).view(1, 1, length, 1).expand(2, 3, length, 4) + 1000 * i
        cache.update(kv.clone(), -kv.clone(), i)
    return cache


@pytest.mark.parametrize("accepted", [[], [0], [0, 1, 2], [1], [0, 2], [3, 5, 6]])
def test_commit_keeps_prefix_root_and_accepted_nodes(accepted):
    cache_len, n = 5, 8
    cache = _cache(2, cache_len + 1 + n)
    commit(cache, cache_len, accepted)
    want = list(range(cache_len + 1)) + [cache_len + 1 + a for a in accepted]
    for i, (k, v) in enumerate(kv_tensors(cache)):
        assert k.shape == (2, 3, len(want), 4)
        assert k[0, 0, :, 0].tolist() == [w + 1000 * i for w in want]
        assert torch.equal(v, -k)
    truncate(cache, 3)
    assert cache.get_seq_length() == 3


def test_cost_model_interpolates_and_picks_the_best_prefix():
    cm = CostModel((1, 2, 4), (10.0, 10.0, 14.0))
    assert cm.at(3) == pytest.approx(12.0) and cm.at(8) == pytest.approx(22.0)  # slope 2 past the end
    assert cm.best_prefix(np.array([0.9, 0.5, 0.1], np.float32)) == 2  # worked example of the docstring
    assert cm.best_prefix(np.array([], np.float32)) == 0
    assert CostModel.flat().best_prefix(np.full(50, 0.01, np.float32)) == 50
    steep = CostModel((1, 2), (10.0, 100.0))
    assert steep.best_prefix(np.array([0.99, 0.9], np.float32)) == 0


def test_score_calibration_follows_observed_acceptance_then_decays_back():
    cal = ScoreCalibration(bins=10, prior=8.0, decay=1.0)
    scores = np.array([0.85] * 40, np.float32)
    assert cal(scores)[0] == pytest.approx(0.85)  # the identity before any evidence
    cal.update(scores, [0, 1, 2, 3])
    assert cal(scores)[0] == pytest.approx((4 + 8 * 0.85) / (40 + 8))  # worked example of the docstring
    assert cal(np.array([0.15, 1.0], np.float32)).tolist() == pytest.approx([0.15, 0.95])  # other bins untouched
    decaying = ScoreCalibration(prior=2.0, decay=0.9)
    decaying.update(scores, [])
    low = decaying(scores)[0]
    for _ in range(100):
        decaying.update(np.empty(0, np.float32), [])
    assert low < 0.3 and decaying(scores)[0] > 0.8
