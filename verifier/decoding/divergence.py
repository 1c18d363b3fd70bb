"""Where a speculative greedy output parts from the same backend's plain greedy output, and why.

A backend whose batched forward is not bit-identical to its one-token forward (llama.cpp's
quantized kernels on Qwen2.5-Coder) can flip an argmax where the plain run's two best logits
are nearly tied. `first_divergence(backend, prompt_ids, plain, other)` replays the plain run one
token at a time up to the first differing position and returns the plain run's two best logits
there: a margin under `NEAR_TIE_LOGITS` is a numerical near-tie, a larger one a bug.

Example: plain [5, 9, 4], other [5, 9, 7] -> position 2, plain_token 4, other_token 7, and the
logits after prompt + [5, 9] (their top two, and the other token's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from retriever.drafting.types import DraftTree

if TYPE_CHECKING:
    from verifier.decoding.backend import Backend

# A plain-run top-2 margin under this is a flip of a near-tie: llama.cpp's batched logits for
# Qwen2.5-Coder Q4_K_M drift from its one-token logits by up to ~0.8 (measured).
NEAR_TIE_LOGITS = 1.0


@dataclass(frozen=True)
class Divergence:
    position: int  # index of the first differing output token
    plain_token: int
    other_token: int
    best: tuple[float, float]  # the plain run's two best logits at that position
    other_logit: float  # the plain run's logit of the other run's token there

    @property
    def margin(self) -> float:
        """Best minus second-best logit of the plain run (>= 0)."""
        return self.best[0] - self.best[1]

    @property
    def near_tie(self) -> bool:
        """Whether the plain run's two best logits there are within `NEAR_TIE_LOGITS`."""
        return self.margin < NEAR_TIE_LOGITS


def first_divergence(backend: "Backend", prompt_ids: Sequence[int], plain: Sequence[int], other: Sequence[int]
                     ) -> Divergence | None:
    """The first position where `other` differs from `plain` (both outputs of prompt_ids), with
    the plain run's logits there; None when one output is a prefix of the other. Raises
    ValueError for an empty prompt."""
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one token, got none")
    position = next((i for i, (a, b) in enumerate(zip(plain, other)) if a != b), None)
    if position is None:
        return None
    prompt = [int(t) for t in prompt_ids]
    cache, cache_len = backend.start(prompt[:-1]), len(prompt) - 1
    for token in [prompt[-1], *plain[:position]]:
        logits, _ = backend.verify(cache, cache_len, int(token), DraftTree.empty())  # [1, V]
        backend.commit(cache, cache_len, [])
        cache_len += 1
    row = logits[0].float()
    best = torch.topk(row, 2).values.tolist()
    return Divergence(position, int(plain[position]), int(other[position]), (best[0], best[1]),
                      float(row[int(other[position])]))
