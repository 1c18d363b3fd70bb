"""The drafter's value types: sources, scoring weights, configuration, and the one draft type
(`DraftTree`) that crosses every boundary: core -> service -> wire -> client -> verifier (pure:
numpy and the core's config structs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple

import numpy as np

from retriever import _core
from retriever.errors import InvalidArgument


class Source(IntEnum):
    """Where a draft node came from; the same numbers as `specdraft.v1.Source`."""

    CONTEXT = 1
    TENANT = 2
    CORPUS = 3
    REFERENCE = 4  # the session's reference set: the tenant's prior outputs and FAISS passages most like it
    # the session's predicted output: its client's (OpenAI Predicted Outputs), and the text the output
    # copies rewritten with the substitutions it made (`retriever.drafting.rewrites`)
    PREDICTION = 5


ALL_SOURCES = frozenset(Source)
# REFERENCE is off by default: it did not raise the replayed MAT (`specdraft bench ablation`).
# PREDICTION is on by default: it costs nothing to a session without a prediction.
DEFAULT_SOURCES = frozenset({Source.CONTEXT, Source.TENANT, Source.CORPUS, Source.PREDICTION})


@dataclass(frozen=True)
class SourceWeights:
    """How one kind of source is queried and trusted.

    Heuristic scoring: a source's confidence for a match of length m is
    `reliability * m / (m + half_match)`; a node's score is the sum over sources of
    confidence * (share of the source's occurrences that continue through the node),
    capped at 1. Calibrated scoring uses the same formula as the prior of its table.
    """

    reliability: float
    half_match: float
    max_occurrences: int = 32
    max_depth: int = 64
    max_match: int = 64
    match_exponent: float = 1.0
    max_candidates: int = 512  # nodes of the source's trie, longest matches first
    # not an independent witness of the sources merged before it: where both propose a node, the
    # larger score counts, not their noisy-OR / sum (`_core.SourceConfig.counted_once`)
    counted_once: bool = False

    def config(self, source: Source) -> _core.SourceConfig:
        params = _core.QueryParams()
        params.max_match = self.max_match
        params.max_depth = self.max_depth
        params.max_occurrences = self.max_occurrences
        params.match_exponent = self.match_exponent
        params.max_nodes = self.max_candidates
        cfg = _core.SourceConfig()
        cfg.params = params
        cfg.reliability = self.reliability
        cfg.half_match = self.half_match
        cfg.source_id = int(source)
        cfg.counted_once = self.counted_once
        return cfg


@dataclass(frozen=True)
class CalibrationParams:
    """Prior weight (pseudo-observations per cell) and per-report decay of the evidence
    (`retriever.drafting.calibration`)."""

    prior_strength: float = 4.0
    decay: float = 0.99  # per observation of a cell: a window of ~100 observations


@dataclass(frozen=True)
class DraftingParams:
    """The scoring model of all sources (heuristic weights = calibration priors)."""

    context: SourceWeights = SourceWeights(reliability=1.0, half_match=2.0)
    tenant: SourceWeights = SourceWeights(reliability=1.0, half_match=0.5)
    # corpus continuations of 16 tokens: within 256 trie nodes more occurrences fit than with 64, and MAT
    # on the dev traces rises on all four workloads with both datastores (code 3.85 -> 3.88, chat 2.16 -> 2.23)
    corpus: SourceWeights = SourceWeights(reliability=0.5, half_match=8.0, max_occurrences=16, max_candidates=256,
                                          max_depth=16)
    reference: SourceWeights = SourceWeights(reliability=1.0, half_match=0.5)
    # the prediction is matched like the context (it is, in effect, more of it); edit clients send
    # the file both in the messages and as the prediction, so where the two propose the same
    # continuation it is one piece of evidence, not two
    prediction: SourceWeights = SourceWeights(reliability=1.0, half_match=2.0, counted_once=True)
    min_score: float = 1e-3


@dataclass(frozen=True)
class ReferenceParams:
    """The per-session reference set: the `k` prior outputs of the tenant most similar
    (lexical embedding) to the last `window` context tokens, plus the top `store_k` passages
    of each FAISS store for them, re-selected every `refresh_tokens` tokens; the tenant keeps
    the embeddings of its last `max_docs` outputs."""

    k: int = 8
    store_k: int = 4
    window: int = 256
    refresh_tokens: int = 64
    max_docs: int = 4096


@dataclass(frozen=True)
class DrafterConfig:
    """Capacity limits and the drafting model of one drafter (one per process).

    `sources`: the sources drafted from (ablations turn some off); `calibrate`: score nodes
    with the per-tenant calibration learned from acceptance feedback (False: heuristic).
    """

    max_sessions: int = 100_000  # beyond it the least recently used session ends
    session_idle_s: float = 900.0  # idle sessions end after this long
    tenant_token_budget: int = 2_000_000  # prior-output tokens kept per tenant
    max_context_tokens: int = 131_072  # per session
    session_memory_bytes: int = 1 << 30  # all open sessions together (the service sets a share of RAM)
    tenant_max_sessions: int = 10_000  # open sessions per tenant
    tenant_max_tokens: int = 16_777_216  # context tokens of one tenant's open sessions together
    max_tenants: int = 100_000  # tenants held; beyond it the least recently used one without sessions goes
    evict_idle_s: float = 30.0  # a session idle at least this long may be evicted to make room
    params: DraftingParams = field(default_factory=DraftingParams)
    sources: frozenset = DEFAULT_SOURCES
    calibrate: bool = True
    calibration: CalibrationParams = field(default_factory=CalibrationParams)
    reference: ReferenceParams = field(default_factory=ReferenceParams)


@dataclass(slots=True)
class DraftTree:
    """A draft: node i proposes token_ids[i] after parents[i] (-1: after the context, the root).

    Nodes are best-first: parents[i] < i and scores never increase, so every prefix of the
    nodes is itself a tree (`prefix`). Not frozen: a frozen dataclass takes ~2 us more to
    build, and one is built per draft; treat it as read-only. Trees from the wire are checked
    once (`checked`) before anything relies on the contract.

    Example: tokens [5, 7, 9], parents [-1, 0, -1] is the tree root -> 5 -> 7 and root -> 9;
    `prefix(2)` keeps root -> 5 -> 7, `depths()` is [1, 2, 1].
    """

    token_ids: np.ndarray  # [num_nodes] int32
    parents: np.ndarray  # [num_nodes] int32, -1 or an index < the node's own
    scores: np.ndarray  # [num_nodes] float32, estimated P(path to node accepted), non-increasing
    sources: np.ndarray  # [num_nodes] uint8, Source of the largest score share (0: unknown)

    @staticmethod
    def empty() -> "DraftTree":
        return DraftTree(np.empty(0, np.int32), np.empty(0, np.int32), np.empty(0, np.float32), np.empty(0, np.uint8))

    @staticmethod
    def chain(token_ids: "list[int] | np.ndarray", score: float = 1.0) -> "DraftTree":
        """A single path: token_ids[0] after the root, each next one after the previous."""
        n = len(token_ids)
        return DraftTree(np.asarray(token_ids, np.int32), np.arange(-1, n - 1, dtype=np.int32),
                         np.full(n, score, np.float32), np.zeros(n, np.uint8))

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def checked(self) -> "DraftTree":
        """This tree with its arrays in the dtypes above, or InvalidArgument naming the first
        broken rule (shapes, parents[i] in [-1, i), scores non-increasing)."""
        n = len(self.token_ids)
        tree = DraftTree(np.ascontiguousarray(self.token_ids, np.int32), np.ascontiguousarray(self.parents, np.int32),
                         np.ascontiguousarray(self.scores, np.float32), np.ascontiguousarray(self.sources, np.uint8))
        shapes = [a.shape for a in (tree.token_ids, tree.parents, tree.scores, tree.sources)]
        if any(s != (n,) for s in shapes):
            raise InvalidArgument(f"draft arrays must all be 1-D of the same length, got shapes {shapes}")
        bad = np.flatnonzero((tree.parents < -1) | (tree.parents >= np.arange(n)))
        if bad.size:
            i = int(bad[0])
            raise InvalidArgument(f"draft parents[{i}] must be -1 or < {i}, got {int(tree.parents[i])}")
        rising = np.flatnonzero(np.diff(tree.scores) > 0)
        if rising.size:
            i = int(rising[0]) + 1
            raise InvalidArgument(f"draft scores must never increase (best-first), got scores[{i}] = "
                                  f"{float(tree.scores[i])} after {float(tree.scores[i - 1])}")
        return tree

    def prefix(self, k: int) -> "DraftTree":
        """The k best nodes: the first k (a tree, since parents precede children)."""
        k = max(0, min(k, len(self)))
        return DraftTree(self.token_ids[:k], self.parents[:k], self.scores[:k], self.sources[:k])

    def select(self, keep: np.ndarray) -> "DraftTree":
        """The nodes where keep ([n] bool) is set, parents renumbered; ValueError unless every
        kept node's parent is kept."""
        new_index = np.cumsum(keep, dtype=np.int32) - 1  # [n] position among the kept nodes
        parents = self.parents[keep]
        if np.any(parents >= 0) and not np.all(keep[parents[parents >= 0]]):
            raise ValueError("draft selection must keep the parent of every kept node")
        remapped = np.where(parents >= 0, new_index[np.maximum(parents, 0)], -1).astype(np.int32)
        return DraftTree(self.token_ids[keep], remapped, self.scores[keep], self.sources[keep])

    def depths(self) -> np.ndarray:
        """[n] int32: the depth of each node (a child of the root has depth 1)."""
        out = np.empty(len(self), np.int32)
        for i, p in enumerate(self.parents.tolist()):
            out[i] = 1 if p < 0 else out[p] + 1
        return out


class EncodedDraft(NamedTuple):
    """A draft as the bytes of a specdraft.v1.DraftResponse (tree and context_tokens), for the service."""

    response: bytes
    nodes: int


@dataclass(slots=True)
class DraftResult:
    """One draft and the session's context length (read-only, like DraftTree)."""

    tree: DraftTree
    context_tokens: int  # session context length after the call


@dataclass(frozen=True)
class DrafterStats:
    sessions: int
    tenants: int
    tenant_tokens: int
    memory_bytes: int  # online indexes (sessions + tenants)
    session_bytes: int = 0  # the sessions' accounted memory (what session_memory_bytes bounds)
    evicted: int = 0  # idle sessions evicted to make room (quotas, memory budget), since the start
