"""Drafting sessions over the C++ core: the pure heart of the retriever (no grpc, no redis).

A session holds its context (prompt + accepted output) in an `OnlineIndex`; each draft
queries that index, the tenant's index of prior outputs and every corpus datastore with
the context tail, and `_core.draft` merges their tries into one `DraftTree`.

Lifecycle: `draft(prompt=...)` (re)starts a session; `draft(new_tokens=...)` extends it;
`end_session` (or idle expiry, or LRU eviction past `max_sessions`) hands the session's
output to its tenant's index, so later sessions of that tenant (never another's) draft
from it. Not thread-safe: the caller serializes calls (the service runs them on its loop).

Example:
    >>> d = Drafter(DrafterConfig())
    >>> tokens = np.array([5, 6, 7, 8, 5, 6], np.int32)
    >>> d.draft("t", "s", tokens, np.empty(0, np.int32), 4).tree.token_ids
    array([7, 8, 5, 6], dtype=int32)
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from retriever import _core
from retriever.errors import NotFound, ResourceExhausted

if TYPE_CHECKING:
    from retriever.datastore import CorpusDatastore

_TAIL_TOKENS = 64  # context tokens passed to the core: the longest match it considers


class Source(IntEnum):
    """Where a draft node came from; the same numbers as `specdraft.v1.Source`."""

    CONTEXT = 1
    TENANT = 2
    CORPUS = 3


@dataclass(frozen=True)
class SourceWeights:
    """How one kind of source is queried and trusted.

    A source's confidence for a match of length m is `reliability * m / (m + half_match)`;
    a node's score is the sum over sources of confidence * (share of the source's
    occurrences that continue through the node), capped at 1.
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
    """The scoring model of all sources (tuned on the dev traces, see README)."""

    context: SourceWeights = SourceWeights(reliability=1.0, half_match=2.0)
    tenant: SourceWeights = SourceWeights(reliability=1.0, half_match=0.5)
    corpus: SourceWeights = SourceWeights(reliability=0.5, half_match=8.0, max_occurrences=16, max_candidates=256)
    min_score: float = 1e-3


@dataclass(frozen=True)
class DrafterConfig:
    """Capacity limits of one drafter (one per process)."""

    max_sessions: int = 100_000
    session_idle_s: float = 900.0
    tenant_token_budget: int = 1_000_000
    max_context_tokens: int = 131_072
    params: DraftingParams = field(default_factory=DraftingParams)


@dataclass(frozen=True)
class DraftTree:
    """A draft: node i proposes token_ids[i] after parents[i] (-1: after the context).

    Nodes are best-first: parents[i] < i and scores never increase.
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


@dataclass(frozen=True)
class DraftResult:
    tree: DraftTree
    context_tokens: int  # session context length after the call


@dataclass(frozen=True)
class DrafterStats:
    sessions: int
    tenants: int
    tenant_tokens: int
    memory_bytes: int  # online indexes (sessions + tenants)


class _Session:
    """One generation: its context index, context tail and output since the prompt."""

    def __init__(self, prompt: np.ndarray, max_context_tokens: int, now_s: float) -> None:
        self.index = _core.OnlineIndex(max_context_tokens)
        self.index.append(prompt)
        self.tail = prompt[-_TAIL_TOKENS:].copy()  # [<= 64] int32
        self.output: list[np.ndarray] = []
        self.length = int(prompt.shape[0])
        self.last_used_s = now_s

    def extend(self, tokens: np.ndarray) -> None:
        self.index.append(tokens)
        self.output.append(tokens.copy())
        self.tail = np.concatenate([self.tail, tokens])[-_TAIL_TOKENS:]
        self.length += int(tokens.shape[0])

    def output_tokens(self) -> np.ndarray:  # [output_len] int32
        return np.concatenate(self.output) if self.output else np.empty(0, np.int32)


class Drafter:
    """Sessions, tenant indexes and corpora; see the module docstring for the lifecycle."""

    def __init__(self, config: DrafterConfig, corpora: Sequence["CorpusDatastore"] = (),
                 on_output: Callable[[str, np.ndarray], None] | None = None) -> None:
        """`on_output(tenant, tokens)` is told of every retired output (e.g. to publish it)."""
        self._config = config
        self._on_output = on_output
        self._sessions: OrderedDict[tuple[str, str], _Session] = OrderedDict()
        self._tenants: dict[str, _core.OnlineIndex] = {}
        p = config.params
        self._context_cfg = p.context.config(Source.CONTEXT)
        self._tenant_cfg = p.tenant.config(Source.TENANT)
        self._corpus_cfg = p.corpus.config(Source.CORPUS)
        self.set_corpora(corpora)

    def set_corpora(self, corpora: Sequence["CorpusDatastore"]) -> None:
        self._corpora = [ds.index for ds in corpora]
        self._corpus_cfgs = [self._corpus_cfg] * len(self._corpora)

    def draft(self, tenant: str, session_id: str, prompt: np.ndarray | None, new_tokens: np.ndarray,
              max_nodes: int) -> DraftResult:
        """Advance the session by `prompt` (restart) and/or `new_tokens`, then draft.

        Raises NotFound for new_tokens alone on an unknown session, ResourceExhausted when
        the context would exceed `max_context_tokens`.
        """
        now_s = time.monotonic()
        key = (tenant, session_id)
        session = self._start(key, prompt, new_tokens, now_s) if prompt is not None else self._sessions.get(key)
        if session is None:
            raise NotFound(f"session must be started with a prompt first, got new_tokens for unknown session {session_id!r}")
        if prompt is None:
            self._check_length(session.length + int(new_tokens.shape[0]))
            self._sessions.move_to_end(key)
        if new_tokens.shape[0]:
            session.extend(new_tokens)
        session.last_used_s = now_s
        online = [session.index]
        configs = [self._context_cfg]
        tenant_index = self._tenants.get(tenant)
        if tenant_index is not None:
            online.append(tenant_index)
            configs.append(self._tenant_cfg)
        arrays = _core.draft(session.tail, online, configs, self._corpora, self._corpus_cfgs,
                             max_nodes, self._config.params.min_score)
        return DraftResult(DraftTree(*arrays), session.length)

    def end_session(self, tenant: str, session_id: str) -> int:
        """Hand the session's output to its tenant's index; returns its token count."""
        session = self._sessions.pop((tenant, session_id), None)
        if session is None:
            raise NotFound(f"session must exist to be ended, got unknown session {session_id!r}")
        return self._retire(tenant, session)

    def add_prior_output(self, tenant: str, tokens: np.ndarray) -> None:
        """Add one finished output (int32 [k]) to the tenant's index, e.g. from the shared log."""
        if tokens.shape[0]:
            index = self._tenants.get(tenant)
            if index is None:
                index = self._tenants[tenant] = _core.OnlineIndex(self._config.tenant_token_budget)
            index.append(tokens)
            index.end_document()

    def expire_idle(self, now_s: float | None = None) -> int:
        """End every session idle longer than `session_idle_s`; returns how many."""
        now_s = time.monotonic() if now_s is None else now_s
        idle = [k for k, s in self._sessions.items() if now_s - s.last_used_s > self._config.session_idle_s]
        for tenant, session_id in idle:
            self.end_session(tenant, session_id)
        return len(idle)

    def stats(self) -> DrafterStats:
        sessions = sum(s.index.memory_bytes for s in self._sessions.values())
        tenants = sum(ix.memory_bytes for ix in self._tenants.values())
        return DrafterStats(len(self._sessions), len(self._tenants),
                            sum(ix.num_tokens for ix in self._tenants.values()), sessions + tenants)

    def _start(self, key: tuple[str, str], prompt: np.ndarray, new_tokens: np.ndarray, now_s: float) -> _Session:
        self._check_length(int(prompt.shape[0]) + int(new_tokens.shape[0]))
        self._sessions.pop(key, None)  # a restart resends the old output inside the prompt
        session = _Session(prompt, self._config.max_context_tokens, now_s)
        self._sessions[key] = session
        while len(self._sessions) > self._config.max_sessions:
            (tenant, _), oldest = self._sessions.popitem(last=False)
            self._retire(tenant, oldest)
        return session

    def _retire(self, tenant: str, session: _Session) -> int:
        output = session.output_tokens()
        self.add_prior_output(tenant, output)
        if self._on_output is not None and output.shape[0]:
            self._on_output(tenant, output)
        return int(output.shape[0])

    def _check_length(self, tokens: int) -> None:
        if tokens > self._config.max_context_tokens:
            raise ResourceExhausted(
                f"session context must be at most {self._config.max_context_tokens} tokens, got {tokens}")
