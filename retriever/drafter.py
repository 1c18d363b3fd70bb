"""Drafting sessions over the C++ core: the pure heart of the retriever (no grpc, no redis).

A session holds its context (prompt + accepted output) in an `OnlineIndex`; each draft
queries that index, the tenant's index of prior outputs, the session's reference set (the
tenant's prior outputs and the FAISS stores' passages most similar to it, `reference_set.py`)
and every corpus datastore with the context tail, and the core merges their tries into one `DraftTree`.

Scoring (`DrafterConfig.calibrate`): each call's `new_tokens` tell which nodes of the
session's previous draft were accepted (`_core.tested_outcomes`); the tenant's
`Calibration` learns from them P(node | parent accepted) per source and cell, and the
calibrated builder ranks nodes by their estimated path acceptance probability, so the
node budget goes where the expected accepted tokens are highest (depth or breadth).

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
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from retriever import _core
from retriever.calibration import Calibration, prior_row
from retriever.draft_types import (ALL_SOURCES, DEFAULT_SOURCES, DraftingParams, DrafterConfig, DrafterStats, DraftResult,
                                   DraftTree, ReferenceParams, Source, SourceWeights)
from retriever.errors import NotFound, ResourceExhausted
from retriever.reference_set import PriorOutputs, store_passages

if TYPE_CHECKING:
    from retriever.datastore import CorpusDatastore
    from retriever.faiss_store import FaissStore

__all__ = ["ALL_SOURCES", "DEFAULT_SOURCES", "DraftingParams", "DrafterConfig", "DrafterStats", "DraftResult", "DraftTree", "Drafter",
           "ReferenceParams", "Source", "SourceWeights"]

_TAIL_TOKENS = 64  # context tokens passed to the core: the longest match it considers
# Calibration rows: one per source slot; corpus i is row _CORPUS_ROW + i.
_ROW = {Source.CONTEXT: 0, Source.TENANT: 1, Source.REFERENCE: 2}
_CORPUS_ROW = 3


class _Session:
    """One generation: its context index, context tail, output, reference set and last draft."""

    def __init__(self, prompt: np.ndarray, max_context_tokens: int, now_s: float) -> None:
        self.index = _core.OnlineIndex(max_context_tokens)
        self.index.append(prompt)
        self.tail = prompt[-_TAIL_TOKENS:].copy()  # [<= 64] int32
        self.prompt = prompt
        self.output: list[np.ndarray] = []
        self.length = int(prompt.shape[0])
        self.last_used_s = now_s
        self.reference: _core.OnlineIndex | None = None
        self.reference_at = -1  # context length when the reference set was selected (-1: never)
        self.last: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # tokens, parents, flat cells

    def extend(self, tokens: np.ndarray) -> None:
        self.index.append(tokens)
        self.output.append(tokens.copy())
        self.tail = np.concatenate([self.tail, tokens])[-_TAIL_TOKENS:]
        self.length += int(tokens.shape[0])

    def recent(self, n: int) -> np.ndarray:  # [<= n] int32: the last n context tokens
        parts, have = [], 0
        for part in reversed([self.prompt, *self.output]):
            parts.append(part[-(n - have):])
            have += parts[-1].shape[0]
            if have >= n:
                break
        return np.concatenate(parts[::-1])

    def output_tokens(self) -> np.ndarray:  # [output_len] int32
        return np.concatenate(self.output) if self.output else np.empty(0, np.int32)


class _Tenant:
    """A tenant's prior outputs (index + embeddings for reference sets) and its calibration."""

    def __init__(self, config: DrafterConfig, prior: np.ndarray) -> None:
        self.index: _core.OnlineIndex | None = None
        self.prior_outputs = PriorOutputs(config.reference)
        self.calibration = Calibration(prior, config.calibration)
        self._budget = config.tenant_token_budget

    def add(self, tokens: np.ndarray) -> None:
        if self.index is None:
            self.index = _core.OnlineIndex(self._budget)
        self.index.append(tokens)
        self.index.end_document()
        self.prior_outputs.add(tokens)


class Drafter:
    """Sessions, tenant indexes and corpora; see the module docstring for the lifecycle."""

    def __init__(self, config: DrafterConfig, corpora: Sequence["CorpusDatastore"] = (),
                 on_output: Callable[[str, np.ndarray], None] | None = None,
                 references: Sequence["FaissStore"] = ()) -> None:
        """`on_output(tenant, tokens)` is told of every retired output (e.g. to publish it);
        `references`: FAISS stores feeding the reference sets (see `set_corpora`)."""
        self._config = config
        self._on_output = on_output
        self._sessions: OrderedDict[tuple[str, str], _Session] = OrderedDict()
        self._tenants: dict[str, _Tenant] = {}
        p = config.params
        self._cfg = {Source.CONTEXT: p.context.config(Source.CONTEXT), Source.TENANT: p.tenant.config(Source.TENANT),
                     Source.REFERENCE: p.reference.config(Source.REFERENCE)}
        self._corpus_cfg = p.corpus.config(Source.CORPUS)
        self.set_corpora(corpora, references)

    def set_corpora(self, corpora: Sequence["CorpusDatastore"], references: Sequence["FaissStore"] = ()) -> None:
        """Replaces the corpora and the FAISS stores (searched for reference sets selected from
        now on, only with Source.REFERENCE); the tenants' calibrations restart from the prior."""
        self._corpora = [ds.index for ds in corpora] if Source.CORPUS in self._config.sources else []
        self._corpus_labels = [f"corpus:{ds.name}" for ds in corpora][:len(self._corpora)]
        self._last_inputs: list[str] = []  # labels of the last draft's queried indexes, in call order
        self._references = list(references) if Source.REFERENCE in self._config.sources else []
        self._corpus_cfgs = [self._corpus_cfg] * len(self._corpora)
        p = self._config.params
        rows = [prior_row(w.reliability, w.half_match) for w in (p.context, p.tenant, p.reference)]
        rows += [prior_row(p.corpus.reliability, p.corpus.half_match)] * len(self._corpora)
        self._prior = np.stack(rows)  # [3 + corpora, CALIB_CELLS] float32
        self._row_cache: dict[tuple[Source, ...], np.ndarray] = {}
        for t in self._tenants.values():
            t.calibration = Calibration(self._prior, self._config.calibration)

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
        state = self._tenant(tenant)
        if prompt is None:
            self._check_length(session.length + int(new_tokens.shape[0]))
            self._sessions.move_to_end(key)
            if session.last is not None and new_tokens.shape[0]:
                state.calibration.observe(*session.last, new_tokens)
        if new_tokens.shape[0]:
            session.extend(new_tokens)
        session.last_used_s = now_s
        return DraftResult(self._draft(session, state, max_nodes), session.length)

    def _draft(self, session: _Session, state: _Tenant, max_nodes: int) -> DraftTree:
        self._refresh_reference(session, state)
        enabled = self._config.sources
        candidates = ((Source.CONTEXT, session.index), (Source.TENANT, state.index),
                      (Source.REFERENCE, session.reference))
        used = [(src, ix) for src, ix in candidates if ix is not None and src in enabled]
        online, configs = [ix for _, ix in used], [self._cfg[src] for src, _ in used]
        self._last_inputs = [src.name.lower() for src, _ in used] + self._corpus_labels
        min_score = self._config.params.min_score
        if not self._config.calibrate:
            arrays = _core.draft(session.tail, online, configs, self._corpora, self._corpus_cfgs, max_nodes, min_score)
            return DraftTree(*arrays)
        rows = self._rows(tuple(src for src, _ in used))  # [inputs] int32: calibration row of each
        *arrays, cells = _core.draft_calibrated(session.tail, online, configs, self._corpora, self._corpus_cfgs,
                                                state.calibration.table(), rows, max_nodes, min_score)
        session.last = (arrays[0], arrays[1], cells)  # tokens, parents, flat cells: int32 [n] each
        return DraftTree(*arrays)

    def last_lookup_s(self) -> tuple[tuple[str, float], ...]:
        """(label, seconds) of the last draft on this thread: each index query ("context", "tenant",
        "reference", "corpus:NAME") and "build_tree"; () before any draft. Call on the drafting thread."""
        ns = _core.last_draft_ns()  # [inputs + 1] int64
        labels = [*self._last_inputs, "build_tree"]
        return tuple(zip(labels, (float(x) / 1e9 for x in ns))) if len(ns) == len(labels) else ()

    def _rows(self, online: tuple[Source, ...]) -> np.ndarray:
        rows = self._row_cache.get(online)
        if rows is None:
            corpus_rows = range(_CORPUS_ROW, _CORPUS_ROW + len(self._corpora))
            rows = self._row_cache[online] = np.array([_ROW[s] for s in online] + list(corpus_rows), np.int32)
        return rows

    def _refresh_reference(self, session: _Session, state: _Tenant) -> None:
        """(Re)selects the session's reference set (prior outputs + FAISS passages) at its
        start and every refresh_tokens."""
        params = self._config.reference
        if Source.REFERENCE not in self._config.sources or not (len(state.prior_outputs) or self._references):
            return
        if session.reference_at >= 0 and session.length - session.reference_at < params.refresh_tokens:
            return
        query = session.recent(params.window)
        session.reference = state.prior_outputs.select(query, store_passages(self._references, query, params.store_k))
        session.reference_at = session.length

    def end_session(self, tenant: str, session_id: str) -> int:
        """Hand the session's output to its tenant's index; returns its token count."""
        session = self._sessions.pop((tenant, session_id), None)
        if session is None:
            raise NotFound(f"session must exist to be ended, got unknown session {session_id!r}")
        return self._retire(tenant, session)

    def add_prior_output(self, tenant: str, tokens: np.ndarray) -> None:
        """Add one finished output (int32 [k]) to the tenant's index, e.g. from the shared log."""
        if tokens.shape[0]:
            self._tenant(tenant).add(tokens)

    def expire_idle(self, now_s: float | None = None) -> int:
        """End every session idle longer than `session_idle_s`; returns how many."""
        now_s = time.monotonic() if now_s is None else now_s
        idle = [k for k, s in self._sessions.items() if now_s - s.last_used_s > self._config.session_idle_s]
        for tenant, session_id in idle:
            self.end_session(tenant, session_id)
        return len(idle)

    def stats(self) -> DrafterStats:
        sessions = sum(s.index.memory_bytes for s in self._sessions.values())
        indexes = [t.index for t in self._tenants.values() if t.index is not None]
        return DrafterStats(len(self._sessions), len(indexes), sum(ix.num_tokens for ix in indexes),
                            sessions + sum(ix.memory_bytes for ix in indexes))

    def _tenant(self, tenant: str) -> _Tenant:
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant(self._config, self._prior)
        return state

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
