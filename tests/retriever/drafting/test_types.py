"""The one draft type, `DraftTree`: its contract check and its operations."""

import numpy as np
import pytest

from retriever.drafting.types import DraftTree
from retriever.errors import InvalidArgument
from tests.trees import tree


def test_checked_names_the_first_broken_rule():
    with pytest.raises(InvalidArgument, match=r"draft parents\[1\] must be -1 or < 1, got 1"):
        tree([1, 2], [-1, 1], [1, 1], [0, 0])
    with pytest.raises(InvalidArgument, match=r"draft parents\[0\] must be -1 or < 0, got -2"):
        tree([1], [-2], [1], [0])
    with pytest.raises(InvalidArgument, match="same length"):
        tree([1, 2], [-1], [1, 1], [0, 0])
    with pytest.raises(InvalidArgument, match=r"scores must never increase .* scores\[1\] = 0.5 after 0.25"):
        tree([1, 2], [-1, 0], [0.25, 0.5], [0, 0])
    d = tree(np.array([5, 6], np.int64), np.array([-1, 0], np.int64), np.array([0.5, 0.25]), [1, 3])
    assert (d.token_ids.dtype, d.parents.dtype, d.scores.dtype, d.sources.dtype) == (np.int32, np.int32, np.float32,
                                                                                      np.uint8)


def test_worked_example_and_operations():
    d = tree([5, 7, 9], [-1, 0, -1], [0.9, 0.8, 0.3], [1, 1, 2])
    assert d.depths().tolist() == [1, 2, 1]
    assert d.prefix(2).token_ids.tolist() == [5, 7] and len(d.prefix(9)) == 3 and len(d.prefix(-1)) == 0
    kept = d.select(np.array([True, False, True]))
    assert (kept.token_ids.tolist(), kept.parents.tolist()) == ([5, 9], [-1, -1])
    with pytest.raises(ValueError, match="parent of every kept node"):
        d.select(np.array([False, True, True]))
    assert len(DraftTree.empty()) == 0 and DraftTree.chain([4, 5, 6]).parents.tolist() == [-1, 0, 1]


@pytest.mark.parametrize("seed", range(5))
def test_depths_match_a_slow_reference(seed):
    rng = np.random.default_rng(seed)
    n = 40
    parents = [int(rng.integers(-1, i)) if i else -1 for i in range(n)]
    d = tree(rng.integers(0, 9, n), parents, np.linspace(1, 0, n), np.zeros(n))

    def depth(i: int) -> int:
        return 1 if parents[i] < 0 else 1 + depth(parents[i])
    assert d.depths().tolist() == [depth(i) for i in range(n)]
