"""Acceptance: which draft nodes the target model agrees with, and the tokens one step emits.

Logits come from one tree forward (`verifier.decoding.tree.build_tree_inputs`): row 0 is the root,
row 1 + i draft node i; row r predicts the token after the path ending at row r.

- Greedy (`accept_greedy`): the longest root path whose every node's token is the argmax of
  its parent's row, then the bonus token, the argmax at the path's last row. Ties between
  equally deep paths go to the lowest node index (the best-scored one).
- Lossless sampling (`accept_sampling`): walk from the root; at each visited row take one
  target sample x (temperature, top-k, top-p); if x is a child's token descend to that child,
  else emit x and stop; at a leaf the sample is the bonus. Every emitted token is thus a
  sample of the target distribution given the tokens before it. The sample of the d-th token
  of a step uses `uniforms[d]` (inverse CDF), and the engine hands out the uniforms by output
  position from one seeded `torch.Generator`: the same seed gives the same tokens with or
  without drafting.
- Typical acceptance (`accept_typical`, opt-in, LOSSY): as sampling, but also descends into
  the most probable child whose probability exceeds min(epsilon, delta * exp(-entropy)).

Example (greedy): tokens [5, 7, 9], parents [-1, 0, -1], argmax by row [5, 7, 4, 2]:
node 0 (5 == argmax row 0) and node 1 (7 == argmax row 1) are accepted, node 2 is not;
emitted [5, 7, 4] (4 = the bonus, argmax at node 1's row 2).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from retriever.drafting.types import DraftTree
from verifier.decoding.tree import TreeInputs


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen; temperature 0 = greedy (the other fields are then ignored)."""

    temperature: float = 0.0
    top_p: float = 1.0  # nucleus: keep the most probable tokens until their mass reaches top_p
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None: a fresh random seed per generation
    typical: bool = False  # opt-in LOSSY typical acceptance (temperature > 0 only)
    typical_epsilon: float = 0.09  # hard probability threshold of typical acceptance
    typical_delta: float = 0.3  # entropy-scaled threshold: delta * exp(-entropy)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.typical and self.temperature == 0:
            raise ValueError("typical acceptance must be used with temperature > 0, got temperature 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Acceptance:
    """One step's outcome: nodes index the draft, tokens = their tokens then the bonus."""

    nodes: torch.Tensor  # [k] int64 (CPU), accepted draft nodes, root to leaf
    tokens: torch.Tensor  # [k+1] int64 (CPU), emitted tokens


def accept_greedy(logits: torch.Tensor, tree: TreeInputs) -> Acceptance:
    """Greedy acceptance on the device: logits [1+n, V] float, tree of the same forward.

    One device -> host copy per step (the path, the nodes' tokens and the bonus, packed)."""
    targets = logits.argmax(-1)  # [1+n] int64
    n = tree.num_nodes
    ok = tree.input_ids[0, 1:] == targets[tree.parent_rows]  # [n] bool
    on_path = ~(tree.ancestor[1:, 1:] & ~ok[None, :]).any(-1)  # [n] bool, every node root..i ok
    rank = torch.arange(n, 0, -1, device=logits.device)  # [n] int64, lower index wins ties
    key = torch.where(on_path, tree.depth[1:] * (n + 1) + rank, 0)  # [n] int64, 0: off every path
    best = key.argmax().view(1) + 1 if n else torch.zeros(1, dtype=torch.int64, device=logits.device)  # [1]
    best = torch.where(key.gather(0, best - 1) > 0, best, 0) if n else best  # [1] int64, 0: the root
    path_mask = tree.ancestor.index_select(0, best)[0, 1:]  # [n] bool, the rows on the root..best path
    packed = torch.cat([path_mask.long(), tree.input_ids[0, 1:], targets.gather(0, best)]).cpu()  # [2n+1]
    path = torch.nonzero(packed[:n]).view(-1)  # [k] int64, ascending = root to leaf
    return Acceptance(path, torch.cat([packed[n:2 * n][path], packed[2 * n:]]))


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Target probabilities of one row: logits [V] -> probs [V] float64 (temperature, top-k, top-p)."""
    scores = logits.double() / params.temperature  # [V] float64
    if 0 < params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    probs = torch.softmax(scores, -1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        mass_before = torch.cumsum(sorted_probs, -1) - sorted_probs  # [V] float64
        drop = mass_before >= params.top_p
        drop[0] = False
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        probs = probs / probs.sum()
    return probs


def sample(probs: torch.Tensor, u: float) -> int:
    """Inverse-CDF sample: the first token whose cumulative probability exceeds u * total (u in [0, 1))."""
    cdf = torch.cumsum(probs, -1)  # [V] float64
    index = torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype, device=cdf.device),
                               right=True)
    return int(index.clamp(max=probs.shape[-1] - 1))


def _children(draft: DraftTree) -> list[dict[int, int]]:
    """Per row (0: root, 1 + i: node i), token -> child node (the first, i.e. best, on duplicates)."""
    children: list[dict[int, int]] = [{} for _ in range(len(draft) + 1)]
    for i, (p, t) in enumerate(zip(draft.parents.tolist(), draft.token_ids.tolist())):
        children[p + 1].setdefault(t, i)
    return children


def accept_sampling(logits: torch.Tensor, draft: DraftTree, params: SamplingParams,
                    uniforms: torch.Tensor) -> Acceptance:
    """Lossless: logits [1+n, V], uniforms [>= max depth + 1] float64; one sample per visited row."""
    return _walk(logits, draft, params, uniforms, typical=False)


def accept_typical(logits: torch.Tensor, draft: DraftTree, params: SamplingParams,
                   uniforms: torch.Tensor) -> Acceptance:
    """LOSSY typical acceptance (opt-in); the same arguments as `accept_sampling`."""
    return _walk(logits, draft, params, uniforms, typical=True)


def _walk(logits: torch.Tensor, draft: DraftTree, params: SamplingParams, uniforms: torch.Tensor,
          typical: bool) -> Acceptance:
    children = _children(draft)
    row, nodes, tokens = 0, [], []
    while True:
        probs = warp(logits[row], params)  # [V] float64
        x = sample(probs, float(uniforms[len(tokens)]))
        child = children[row].get(x)
        if child is None and typical and children[row]:
            child = _typical_child(probs, children[row], params)
        if child is None:
            tokens.append(x)
            break
        nodes.append(child)
        tokens.append(int(draft.token_ids[child]))
        row = child + 1
    return Acceptance(torch.tensor(nodes, dtype=torch.int64), torch.tensor(tokens, dtype=torch.int64))


def _typical_child(probs: torch.Tensor, children: dict[int, int], params: SamplingParams) -> int | None:
    """The most probable child whose probability passes the typical threshold, if any."""
    entropy = float(-(probs * torch.log(probs.clamp_min(1e-30))).sum())
    threshold = min(params.typical_epsilon, params.typical_delta * math.exp(-entropy))
    tokens = list(children)
    p = probs[torch.tensor(tokens, device=probs.device)].tolist()
    best = max(range(len(tokens)), key=lambda j: p[j])
    return children[tokens[best]] if p[best] > threshold else None


class UniformStream:
    """Uniforms in [0, 1) by output position, from one seeded torch.Generator (CPU).

    `take(start, count)` returns the uniforms of output positions start .. start+count-1;
    a position's uniform never depends on how the positions were grouped into steps.
    """

    _BLOCK = 256

    def __init__(self, seed: int | None) -> None:
        self.seed = int(seed) if seed is not None else secrets.randbits(62)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._values = torch.empty(0, dtype=torch.float64)  # [generated] float64

    def take(self, start: int, count: int) -> torch.Tensor:  # [count] float64
        while self._values.shape[0] < start + count:
            block = torch.rand(self._BLOCK, generator=self._generator, dtype=torch.float64)
            self._values = torch.cat([self._values, block])
        return self._values[start:start + count]
