"""The drafter's value types: sources, scoring weights, configuration, trees (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple

import numpy as np

from retriever import _core
from retriever.calibration import CalibrationParams


class Source(IntEnum):
    """Where a draft node came from; the same numbers as `specdraft.v1.Source`."""

    CONTEXT = 1
    TENANT = 2
    CORPUS = 3
    REFERENCE = 4  # the session's reference set: the tenant's prior outputs and FAISS passages most like it


ALL_SOURCES = frozenset(Source)
# REFERENCE is off by default: it did not raise the replayed MAT (`specdraft bench ablation`).
DEFAULT_SOURCES = frozenset({Source.CONTEXT, Source.TENANT, Source.CORPUS})


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
        return cfg


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

    max_sessions: int = 100_000
    session_idle_s: float = 900.0
    tenant_token_budget: int = 1_000_000
    max_context_tokens: int = 131_072
    params: DraftingParams = field(default_factory=DraftingParams)
    sources: frozenset = DEFAULT_SOURCES
    calibrate: bool = True
    calibration: CalibrationParams = field(default_factory=CalibrationParams)
    reference: ReferenceParams = field(default_factory=ReferenceParams)


@dataclass(slots=True)
class DraftTree:
    """A draft: node i proposes token_ids[i] after parents[i] (-1: after the context).

    Nodes are best-first: parents[i] < i and scores never increase. Not frozen: a frozen
    dataclass takes ~2 us more to build, and one is built per draft; treat it as read-only.
    """

    token_ids: np.ndarray  # [num_nodes] int32
    parents: np.ndarray  # [num_nodes] int32
    scores: np.ndarray  # [num_nodes] float32, estimated P(path to node accepted)
    sources: np.ndarray  # [num_nodes] uint8, Source of the largest score share

    @staticmethod
    def empty() -> "DraftTree":
        return DraftTree(np.empty(0, np.int32), np.empty(0, np.int32), np.empty(0, np.float32), np.empty(0, np.uint8))

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


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
