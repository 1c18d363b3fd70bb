"""The tensors of one tree-verification forward pass, made once per step from the draft.

The draft is the one `DraftTree` of `retriever.drafting.types` (int32 numpy arrays): node i
proposes token_ids[i] after node parents[i] (-1: after the root, the last context token, which
is not in the KV cache yet), best-first. Only here does it become torch tensors, on the device.
`prune` drops the nodes a model cannot verify (tokens outside its vocabulary, too deep).

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

from retriever.drafting.types import DraftTree


def pruned(draft: DraftTree, vocab_size: int, max_depth: int) -> np.ndarray:
    """[n] bool: the nodes kept when those with a token outside [0, vocab_size) or deeper than
    max_depth are dropped with their subtrees."""
    ok = (draft.token_ids >= 0) & (draft.token_ids < vocab_size) & (draft.depths() <= max_depth)
    keep = ok.copy()
    for i, p in enumerate(draft.parents.tolist()):  # parents precede children: one pass
        keep[i] = ok[i] and (p < 0 or keep[p])
    return keep


def prune(draft: DraftTree, vocab_size: int, max_depth: int) -> DraftTree:
    """The draft without the nodes `pruned` drops."""
    keep = pruned(draft, vocab_size, max_depth)
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


def tree_structure(parents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def build_tree_inputs(root_token: int, draft: DraftTree, cache_len: int, dtype: torch.dtype,
                      device: torch.device | str) -> TreeInputs:
    """The inputs verifying `draft` after `root_token`, over a cache of cache_len entries (see module doc)."""
    depth, ancestor = tree_structure(draft.parents)
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
        parent_rows=torch.from_numpy(draft.parents.astype(np.int64) + 1).to(device),
        cache_len=cache_len)
