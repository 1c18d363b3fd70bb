"""`GenerationTrust` against a slow reference (explicit loops over the tested nodes) on random
trees and outcomes, and its worked example."""

import numpy as np
import pytest

from verifier.decoding.cost import GenerationTrust, consistent


def reference_factor(steps, prior: float, decay: float) -> float:
    """steps: (probs, parents, accepted nodes) per step, in order."""
    expected = accepted = 0.0
    for probs, parents, nodes in steps:
        expected, accepted = expected * decay, accepted * decay
        for i in range(len(probs)):
            parent = int(parents[i])
            if parent == -1 or parent in nodes:  # tested: the root's child, or an accepted node's
                p_parent = 1.0 if parent == -1 else float(probs[parent])
                expected += min(1.0, max(0.0, float(probs[i]) / max(p_parent, 1e-9)))
        accepted += len(nodes)
    return min(1.0, (accepted + prior) / (expected + prior))


def random_step(rng: np.random.Generator):
    n = int(rng.integers(0, 12))
    parents = np.array([int(rng.integers(-1, i)) for i in range(n)], np.int32)
    probs = np.sort(rng.random(n))[::-1].astype(np.float64)
    path, node = [], -1
    while rng.random() < 0.7:  # walk down accepted children
        children = [i for i in range(n) if parents[i] == node]
        if not children:
            break
        node = int(rng.choice(children))
        path.append(node)
    return probs, parents, path


@pytest.mark.parametrize("seed", range(20))
def test_factor_matches_the_reference_on_random_steps(seed):
    rng = np.random.default_rng(seed)
    trust, steps = GenerationTrust(prior=1.5, decay=0.8), []
    for _ in range(int(rng.integers(1, 15))):
        steps.append(random_step(rng))
        trust.update(*steps[-1])
        assert trust.factor == pytest.approx(reference_factor(steps, 1.5, 0.8))
    depths = rng.integers(1, 9, 6).astype(np.int32)
    probs = rng.random(6)
    np.testing.assert_allclose(trust(probs, depths), probs * trust.factor ** depths)


def test_the_worked_example_and_a_rejected_chain_is_one_piece_of_evidence():
    trust = GenerationTrust()  # prior 2, decay 0.95
    probs = np.array([0.9, 0.85, 0.8] + [0.7] * 12)  # a 15-node chain, its first node rejected
    trust.update(probs, np.arange(-1, 14, dtype=np.int32), [])
    assert trust.factor == pytest.approx(2 / 2.9)
    np.testing.assert_allclose(trust(probs[:3], np.array([1, 2, 3], np.int32)),
                               [0.9 * 0.6897, 0.85 * 0.6897 ** 2, 0.8 * 0.6897 ** 3], rtol=1e-3)
    for _ in range(16):
        trust.update(np.zeros(0), np.zeros(0, np.int32), [])
    assert trust.factor == pytest.approx(2 / (2 + 0.9 * 0.95 ** 16)) == pytest.approx(0.83, abs=0.005)
    trust.reset()
    assert trust.factor == 1.0


def test_accepted_drafts_never_raise_the_factor_past_one():
    trust = GenerationTrust()
    trust.update(np.array([0.3, 0.2]), np.array([-1, 0], np.int32), [0, 1])  # better than calibrated
    assert trust.factor == 1.0


def reference_consistent(probs, parents):
    """Node by node, from a node's own raw siblings (recomputed each time) and its scaled parent."""
    out = []
    for i in range(len(probs)):
        siblings = [k for k in range(len(probs)) if parents[k] == parents[i]]
        total = sum(probs[k] for k in siblings)
        cap = 1.0 if parents[i] == -1 else out[parents[i]]
        out.append(probs[i] * min(1.0, cap / total) if total > 0 else 0.0)
    return out


@pytest.mark.parametrize("seed", range(20))
def test_consistent_matches_the_reference_and_siblings_never_outweigh_their_parent(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 30))
    parents = np.array([int(rng.integers(-1, i)) for i in range(n)], np.int32)
    probs = rng.random(n)
    got = consistent(probs, parents)
    np.testing.assert_allclose(got, reference_consistent(probs, parents))
    for j in range(-1, n):
        children = got[parents == j]
        assert children.sum() <= (1.0 if j < 0 else got[j]) + 1e-12


def test_consistent_worked_example_and_a_consistent_tree_is_unchanged():
    np.testing.assert_allclose(consistent(np.array([0.8, 0.8, 0.9]), np.array([-1, -1, 0], np.int32)),
                               [0.5, 0.5, 0.5])
    probs = np.array([0.6, 0.3, 0.5, 0.1])
    np.testing.assert_allclose(consistent(probs, np.array([-1, -1, 0, 0], np.int32)), probs)
