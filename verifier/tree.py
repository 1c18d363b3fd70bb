"""Draft trees as the verifier sees them, and the tensors of one tree-verification forward pass.

A `Draft` is data: node i proposes token_ids[i] after node parents[i] (-1: after the root, the
last context token, which is not in the KV cache yet). Nodes are best-first: parents precede
children and scores (estimated P(path to the node accepted)) never increase, so every prefix
of the node list is itself a tree (`prefix_by_score`).

`build_tree_inputs` lays the root and the nodes out for one forward pass over a KV cache of
`cache_len` entries. Example, root r and draft tokens [a, b, c], parents [-1, 0, -1]:

    input_ids    = [r, a, b, c]
    position_ids = cache_len + [0, 1, 2, 1]          (depth)
    mask rows over the keys [cache..., r, a, b, c]   (0: attend, dtype min: blocked)
        r: cache  0  .  .  .
        a: cache  0  0  .  .
        b: cache  0  0  0  .
        c: cache  0  .  .  0
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Draft:
    """A draft tree; arrays are coerced to the dtypes below and checked on construction."""

    token_ids: np.ndarray  # [n] int64
    parents: np.ndarray  # [n] int64, -1 (child of the root) or an index < the node's own
    scores: np.ndarray  # [n] float32, estimated P(path to the node accepted), best-first
    sources: np.ndarray  # [n] uint8, retriever Source of the node (0: unknown)

    def __post_init__(self) -> None:
        for name, dtype in (("token_ids", np.int64), ("parents", np.int64), ("scores", np.float32),
                            ("sources", np.uint8)):
            object.__setattr__(self, name, np.ascontiguousarray(np.asarray(getattr(self, name)), dtype=dtype))
        n = self.token_ids.shape[0]
        shapes = [a.shape for a in (self.token_ids, self.parents, self.scores, self.sources)]
        if any(s != (n,) for s in shapes):
            raise ValueError(f"draft arrays must all be 1-D of the same length, got shapes {shapes}")
        bad = np.flatnonzero((self.parents < -1) | (self.parents >= np.arange(n)))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"draft parents[i] must be -1 or < i, got parents[{i}] = {int(self.parents[i])}")

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    @staticmethod
    def empty() -> "Draft":
        return Draft(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0, np.uint8))

    @staticmethod
    def chain(token_ids: list[int], score: float = 1.0) -> "Draft":
        """A single path: token_ids[0] after the root, each next one after the previous."""
        n = len(token_ids)
        return Draft(np.asarray(token_ids, np.int64), np.arange(-1, n - 1), np.full(n, score, np.float32),
                     np.zeros(n, np.uint8))

    def select(self, keep: np.ndarray) -> "Draft":
        """The nodes where keep ([n] bool) is set; the kept set must hold every kept node's parent."""
        new_index = np.cumsum(keep) - 1  # [n] int64, position among the kept nodes
        parents = self.parents[keep]
        if np.any(parents >= 0) and not np.all(keep[parents[parents >= 0]]):
            raise ValueError("draft selection must keep the parent of every kept node")
        remapped = np.where(parents >= 0, new_index[np.maximum(parents, 0)], -1)
        return Draft(self.token_ids[keep], remapped, self.scores[keep], self.sources[keep])


def depths(parents: np.ndarray) -> np.ndarray:
    """Depth of each node ([n] int64 in, [n] int64 out): a child of the root has depth 1."""
    out = np.empty(parents.shape[0], np.int64)
    for i, p in enumerate(parents.tolist()):
        out[i] = 1 if p < 0 else out[p] + 1
    return out


def prefix_by_score(draft: Draft, k: int) -> Draft:
    """The k best nodes: the first k of a best-first draft (a tree, since parents precede children).

    Example: scores [0.9, 0.8, 0.3], k = 2 -> the nodes 0 and 1, parents unchanged.
    """
    k = max(0, min(k, len(draft)))
    return Draft(draft.token_ids[:k], draft.parents[:k], draft.scores[:k], draft.sources[:k])


def prune(draft: Draft, vocab_size: int, max_depth: int) -> Draft:
    """Drops nodes with a token outside [0, vocab_size) or deeper than max_depth, and their subtrees."""
    ok = (draft.token_ids >= 0) & (draft.token_ids < vocab_size) & (depths(draft.parents) <= max_depth)
    keep = ok.copy()
    for i, p in enumerate(draft.parents.tolist()):  # parents precede children: one pass
        keep[i] = ok[i] and (p < 0 or keep[p])
    return draft if keep.all() else draft.select(keep)


@dataclass(frozen=True)
class TreeInputs:
    """Model inputs of one verification forward (row 0: the root, row 1 + i: draft node i)."""

    input_ids: torch.Tensor  # [1, 1+n] int64
    position_ids: torch.Tensor  # [1, 1+n] int64, cache_len + depth
    attention_mask: torch.Tensor  # [1, 1, 1+n, cache_len+1+n] model dtype, 0 = attend, dtype min = blocked
    depth: torch.Tensor  # [1+n] int64, root 0
    ancestor: torch.Tensor  # [1+n, 1+n] bool, [i, j]: row j is row i or one of its ancestors
    parent_rows: torch.Tensor  # [n] int64, row of each node's parent (0: the root)
    cache_len: int

    @property
    def num_nodes(self) -> int:
        return int(self.input_ids.shape[1]) - 1


def _tree_structure(parents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(depth [1+n] int64, ancestor [1+n, 1+n] bool) over rows: 0 = root, 1 + i = node i."""
    n = parents.shape[0]
    depth = np.zeros(n + 1, np.int64)
    ancestor = np.zeros((n + 1, n + 1), np.bool_)
    ancestor[0, 0] = True
    for i, p in enumerate(parents.tolist()):
        ancestor[i + 1] = ancestor[p + 1]
        ancestor[i + 1, i + 1] = True
        depth[i + 1] = depth[p + 1] + 1
    return depth, ancestor


def build_tree_inputs(root_token: int, draft: Draft, cache_len: int, dtype: torch.dtype,
                      device: torch.device | str) -> TreeInputs:
    """The inputs verifying `draft` after `root_token`, over a cache of cache_len entries (see module doc)."""
    depth, ancestor = _tree_structure(draft.parents)
    ids = np.concatenate([[root_token], draft.token_ids]).astype(np.int64)  # [1+n]
    n1 = ids.shape[0]
    tree_block = np.where(ancestor, 0.0, torch.finfo(dtype).min)  # [1+n, 1+n] float64
    mask = torch.zeros((1, 1, n1, cache_len + n1), dtype=dtype)
    mask[0, 0, :, cache_len:] = torch.from_numpy(tree_block).to(dtype)
    return TreeInputs(
        input_ids=torch.from_numpy(ids).view(1, n1).to(device),
        position_ids=torch.from_numpy(depth + cache_len).view(1, n1).to(device),
        attention_mask=mask.to(device),
        depth=torch.from_numpy(depth).to(device),
        ancestor=torch.from_numpy(ancestor).to(device),
        parent_rows=torch.from_numpy(draft.parents + 1).to(device),
        cache_len=cache_len)
