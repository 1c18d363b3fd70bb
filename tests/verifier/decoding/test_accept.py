"""verifier.decoding.accept: greedy acceptance against a slow reference on random trees and logits; the
target warping (temperature, top-k, top-p) against a slow reference; sampling acceptance is
lossless: a chi-square test over many seeded trials on a toy model finds the emitted tokens
distributed as the target, and the same test rejects a deliberately biased rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retriever.drafting.types import DraftTree
from tests.trees import tree
from verifier.decoding.accept import (
    SamplingParams,
    UniformStream,
    accept_greedy,
    accept_sampling,
    accept_typical,
    sample,
    warp,
)
from verifier.decoding.tree import build_tree_inputs

V = 5  # toy vocabulary


def random_draft(rng: np.random.Generator, n: int, vocab: int) -> DraftTree:
    parents = np.array([rng.integers(-1, i) if i else -1 for i in range(n)], np.int64)
    return tree(rng.integers(0, vocab, n), parents, np.linspace(1, 0.1, n, dtype=np.float32), np.ones(n, np.uint8))


def path_of(parents: list[int], i: int) -> list[int]:
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


def ref_greedy(logits: torch.Tensor, draft: DraftTree) -> tuple[list[int], list[int]]:
    """Longest root path whose tokens equal the argmax of their parent's row; ties: lowest index."""
    parents, tokens = draft.parents.tolist(), draft.token_ids.tolist()
    argmax = [max(range(logits.shape[1]), key=lambda v: (float(logits[r, v]), -v)) for r in range(len(parents) + 1)]
    best: list[int] = []
    for i in range(len(parents)):
        path = path_of(parents, i)
        if all(tokens[j] == argmax[parents[j] + 1] for j in path) and len(path) > len(best):
            best = path
    last_row = best[-1] + 1 if best else 0
    return best, [tokens[j] for j in best] + [argmax[last_row]]


@pytest.mark.parametrize("seed", range(40))
def test_greedy_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    vocab = int(rng.integers(2, 5))  # small: many matches and duplicate siblings
    draft = random_draft(rng, int(rng.integers(0, 25)), vocab)
    logits = torch.from_numpy(rng.standard_normal((len(draft) + 1, vocab)))
    tree = build_tree_inputs(0, draft, 3, torch.float64, "cpu")
    got = accept_greedy(logits, tree)
    nodes, tokens = ref_greedy(logits, draft)
    assert got.nodes.tolist() == nodes
    assert got.tokens.tolist() == tokens


def test_greedy_worked_example():
    draft = tree([5, 7, 9], [-1, 0, -1], [0.9, 0.8, 0.3], [1, 1, 1])
    logits = torch.full((4, 10), -1.0)
    for row, best in enumerate([5, 7, 4, 2]):
        logits[row, best] = 1.0
    got = accept_greedy(logits, build_tree_inputs(1, draft, 0, torch.float32, "cpu"))
    assert got.nodes.tolist() == [0, 1] and got.tokens.tolist() == [5, 7, 4]


def ref_warp(logits: list[float], p: SamplingParams) -> list[float]:
    s = [x / p.temperature for x in logits]
    if 0 < p.top_k < len(s):
        kth = sorted(s, reverse=True)[p.top_k - 1]
        s = [x if x >= kth else -math.inf for x in s]
    z = max(s)
    e = [math.exp(x - z) for x in s]
    probs = [x / sum(e) for x in e]
    if p.top_p < 1:
        order = sorted(range(len(probs)), key=lambda i: -probs[i])
        kept, mass = set(), 0.0
        for i in order:
            if mass >= p.top_p:
                break
            kept.add(i)
            mass += probs[i]
        probs = [q if i in kept else 0.0 for i, q in enumerate(probs)]
        probs = [q / sum(probs) for q in probs]
    return probs


@pytest.mark.parametrize("seed", range(20))
def test_warp_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(12) * 3
    p = SamplingParams(temperature=float(rng.uniform(0.3, 2)), top_k=int(rng.integers(0, 14)),
                       top_p=float(rng.choice([1.0, rng.uniform(0.2, 1)])))
    got = warp(torch.from_numpy(logits).float(), p)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(ref_warp(logits.tolist(), p), abs=1e-6)


def test_sample_is_the_inverse_cdf_and_skips_zero_probabilities():
    probs = torch.tensor([0.0, 0.25, 0.0, 0.75, 0.0], dtype=torch.float64)
    assert [sample(probs, u) for u in (0.0, 0.2499, 0.25, 0.9999999)] == [1, 1, 3, 3]
    got = {sample(probs, u) for u in torch.rand(2000, dtype=torch.float64).tolist()}
    assert got == {1, 3}


def test_uniform_stream_is_indexed_by_position():
    a, b = UniformStream(7), UniformStream(7)
    whole = a.take(0, 600)
    assert torch.equal(torch.cat([b.take(0, 3), b.take(3, 300), b.take(303, 297)]), whole)
    assert not torch.equal(UniformStream(8).take(0, 600), whole)
    assert ((whole >= 0) & (whole < 1)).all()


# ---------------------------------------------------------------- losslessness


def toy_logits(path: tuple[int, ...]) -> torch.Tensor:
    """A fixed toy 'model': logits [V] float64 of the next token after `path` (draft tokens from the root)."""
    g = torch.Generator().manual_seed(1 + sum((t + 1) * 7 ** i for i, t in enumerate(path)))
    return torch.randn(V, generator=g, dtype=torch.float64) * 1.2


# root children 0, 1, 3; node 0 -> children 2, 0; node 1 -> 4; node 3 (token 2) -> 1
TOY = tree([0, 1, 3, 2, 0, 4, 1], [-1, -1, -1, 0, 0, 1, 3], [0.9, 0.5, 0.4, 0.3, 0.2, 0.2, 0.1], [1] * 7)


def toy_rows(draft: DraftTree) -> torch.Tensor:
    parents, tokens = draft.parents.tolist(), draft.token_ids.tolist()
    rows = [toy_logits(())] + [toy_logits(tuple(tokens[j] for j in path_of(parents, i))) for i in range(len(tokens))]
    return torch.stack(rows)  # [1+n, V]


def biased_accept(logits, draft, params, uniforms):
    """A WRONG rule (for the test of the test): accept a child with probability p(child) as if the
    draft were a distribution q = 1, but on rejection sample from p instead of the residual."""
    tokens, row, i = [], 0, 0
    children = {}
    for j, (par, t) in enumerate(zip(draft.parents.tolist(), draft.token_ids.tolist())):
        children.setdefault(par + 1, []).append((t, j))
    while True:
        probs = warp(logits[row], params)
        for t, j in children.get(row, []):
            if float(uniforms[i]) < float(probs[t]):
                tokens.append(t)
                row, i = j + 1, i + 1
                break
        else:
            tokens.append(sample(probs, float(uniforms[i])))
            return tokens


def chi_square_p(rule, params: SamplingParams, trials: int) -> float:
    """p-value that the first two emitted tokens follow the target (first token; second given a first
    token that is a root child, i.e. emitted after descending)."""
    logits = toy_rows(TOY)
    gen = torch.Generator().manual_seed(1234)
    first = np.zeros(V)
    second = {t: np.zeros(V) for t in (0, 1, 3)}
    for _ in range(trials):
        uniforms = torch.rand(8, generator=gen, dtype=torch.float64)
        out = rule(logits, TOY, params, uniforms)
        out = out.tokens.tolist() if hasattr(out, "tokens") else out
        first[out[0]] += 1
        if out[0] in second and len(out) > 1:
            second[out[0]][out[1]] += 1
    stat, df = _chi2(first, warp(toy_logits(()), params))
    for t, counts in second.items():
        s, d = _chi2(counts, warp(toy_logits((t,)), params))
        stat, df = stat + s, df + d
    return float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(stat / 2)))


def _chi2(counts: np.ndarray, probs: torch.Tensor) -> tuple[float, int]:
    expected = probs.numpy() * counts.sum()
    cells = expected > 0
    assert counts[~cells].sum() == 0, "a token of probability 0 was emitted"
    return float(((counts[cells] - expected[cells]) ** 2 / expected[cells]).sum()), int(cells.sum()) - 1


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3),
                                    SamplingParams(temperature=1.3, top_p=0.8)])
def test_sampling_acceptance_is_lossless(params):
    assert chi_square_p(accept_sampling, params, 6000) > 1e-3


def test_the_statistical_test_catches_a_biased_rule():
    assert chi_square_p(biased_accept, SamplingParams(temperature=1.0), 6000) < 1e-9


def test_sampling_descends_while_the_sample_is_a_child():
    logits = toy_rows(TOY)
    params = SamplingParams(temperature=1.0)
    for seed in range(200):
        u = torch.rand(8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        got = accept_sampling(logits, TOY, params, u)
        tokens, nodes = got.tokens.tolist(), got.nodes.tolist()
        assert len(tokens) == len(nodes) + 1
        row = 0
        for d, t in enumerate(tokens):  # each token is the inverse-CDF sample of its row at uniform u[d]
            assert t == sample(warp(logits[row], params), float(u[d]))
            if d < len(nodes):
                assert TOY.token_ids[nodes[d]] == t and TOY.parents[nodes[d]] + 1 == row
                row = nodes[d] + 1


def test_typical_acceptance_is_opt_in_and_descends_into_a_likely_child():
    with pytest.raises(ValueError, match="typical"):
        SamplingParams(temperature=0, typical=True)
    logits = torch.tensor([[4.0, 3.9, -5, -5, -5], [0, 0, 0, 0, 0]], dtype=torch.float64)  # root: tokens 0, 1 likely
    draft = tree([1], [-1], [0.5], [1])
    u = torch.tensor([0.01, 0.5], dtype=torch.float64)  # the root sample is token 0, not the child
    params = SamplingParams(temperature=1.0, typical=True)
    assert accept_sampling(logits, draft, params, u).tokens.tolist() == [0]
    assert accept_typical(logits, draft, params, u).tokens.tolist() == [1, 2]
