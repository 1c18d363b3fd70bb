"""Drafting sessions over the C++ core: the pure heart of the retriever (no grpc, no redis).

A session holds its context (prompt + accepted output) in an `OnlineIndex`; each draft
queries that index, the tenant's index of prior outputs, the session's predicted output (when its first call
brought one: OpenAI Predicted Outputs), the session's reference set (the
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
from retriever.drafting.calibration import Calibration, prior_row
from retriever.drafting.reference_set import PriorOutputs, store_passages
from retriever.drafting.types import DrafterConfig, DrafterStats, DraftResult, DraftTree, EncodedDraft, Source
from retriever.errors import NotFound, ResourceExhausted

if TYPE_CHECKING:
    from retriever.store.datastore import CorpusDatastore
    from retriever.store.faiss_store import FaissStore



class _Session:
    """One generation: its core session (context index and last draft), reference set and idle clock."""

    __slots__ = ("core", "last_used_s", "reference", "reference_at", "prediction")

    def __init__(self, prompt: np.ndarray, max_context_tokens: int, now_s: float,
                 prediction: np.ndarray | None = None) -> None:
        self.core = _core.Session(prompt, max_context_tokens)
        self.last_used_s = now_s
        self.reference: _core.OnlineIndex | None = None
        self.reference_at = -1  # context length when the reference set was selected (-1: never)
        self.prediction: _core.OnlineIndex | None = None  # the predicted output, one document
        if prediction is not None and prediction.shape[0]:
            self.prediction = _core.OnlineIndex(max(int(prediction.shape[0]), 1))
            self.prediction.append(prediction)
            self.prediction.end_document()

    def recent(self, n: int) -> np.ndarray:  # [<= n] int32: the last n context tokens
        return self.core.tokens(max(self.core.length - n, 0))

    def output_tokens(self) -> np.ndarray:  # [output_len] int32
        return self.core.tokens(self.core.prompt_length)


class _Tenant:
    """A tenant's prior outputs (index + embeddings for reference sets) and its calibration."""

    def __init__(self, config: DrafterConfig, prior: np.ndarray) -> None:
        self.index: _core.OnlineIndex | None = None
        self.prior_outputs = PriorOutputs(config.reference)
        self._keep_outputs = Source.REFERENCE in config.sources  # only reference sets read them
        self.calibration = Calibration(prior, config.calibration)
        self._budget = config.tenant_token_budget

    def add(self, tokens: np.ndarray) -> None:
        if self.index is None:
            self.index = _core.OnlineIndex(self._budget)
        self.index.append(tokens)
        self.index.end_document()
        if self._keep_outputs:
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
                     Source.REFERENCE: p.reference.config(Source.REFERENCE),
                     Source.PREDICTION: p.prediction.config(Source.PREDICTION)}
        self._corpus_cfg = p.corpus.config(Source.CORPUS)
        self._use_tenant, self._use_reference = Source.TENANT in config.sources, Source.REFERENCE in config.sources
        self._use_prediction = Source.PREDICTION in config.sources
        self.set_corpora(corpora, references)

    def set_corpora(self, corpora: Sequence["CorpusDatastore"], references: Sequence["FaissStore"] = ()) -> None:
        """Replaces the corpora and the FAISS stores (searched for reference sets selected from
        now on, only with Source.REFERENCE); the tenants' calibrations restart from the prior."""
        self._corpora = [ds.index for ds in corpora] if Source.CORPUS in self._config.sources else []
        self._corpus_labels = [f"corpus:{ds.name}" for ds in corpora][:len(self._corpora)]
        self._last_used = (False, False, False)  # whether the last draft queried a tenant index, a reference set,
        # a prediction
        self._references = list(references) if Source.REFERENCE in self._config.sources else []
        p, cal = self._config.params, self._config.calibration
        self._plan = _core.DraftPlan(self._cfg[Source.CONTEXT], self._cfg[Source.TENANT], self._cfg[Source.REFERENCE],
                                     Source.CONTEXT in self._config.sources, self._corpora,
                                     [self._corpus_cfg] * len(self._corpora), p.min_score, self._config.calibrate,
                                     cal.prior_strength, cal.decay, self._cfg[Source.PREDICTION])
        rows = [prior_row(w.reliability, w.half_match) for w in (p.context, p.tenant, p.reference)]
        rows += [prior_row(p.corpus.reliability, p.corpus.half_match)] * len(self._corpora)
        rows.append(prior_row(p.prediction.reliability, p.prediction.half_match))  # the core's row after the corpora
        self._prior = np.stack(rows)  # [3 + corpora + 1, CALIB_CELLS] float32
        for t in self._tenants.values():
            t.calibration = Calibration(self._prior, self._config.calibration)

    def draft(self, tenant: str, session_id: str, prompt: np.ndarray | None, new_tokens: np.ndarray,
              max_nodes: int, prediction: np.ndarray | None = None) -> DraftResult:
        """Advance the session by `prompt` (restart) and/or `new_tokens`, then draft.
        `prediction` ([k] int32, with `prompt` only): the session's predicted output, one more
        draft source (Source.PREDICTION) for its whole life.

        Raises NotFound for new_tokens alone on an unknown session, ResourceExhausted when
        the context would exceed `max_context_tokens`.
        """
        step = self._step(tenant, session_id, prompt, new_tokens, prediction)
        arrays = _core.session_draft(*step[:-1], max_nodes, step[-1])
        return DraftResult(DraftTree(*arrays), step[0].length)

    def draft_response(self, tenant: str, session_id: str, prompt: np.ndarray | None, new_tokens: np.ndarray,
                       max_nodes: int, prediction: np.ndarray | None = None) -> EncodedDraft:
        """As `draft`, the draft encoded by the core as a specdraft.v1.DraftResponse (the service's
        answer, without numpy arrays or a protobuf message in between)."""
        step = self._step(tenant, session_id, prompt, new_tokens, prediction)
        return EncodedDraft(*_core.session_draft_response(*step[:-1], max_nodes, step[-1]))

    def _step(self, tenant: str, session_id: str, prompt: np.ndarray | None, new_tokens: np.ndarray,
              prediction: np.ndarray | None = None) -> tuple:
        """The session (started or advanced) and the arguments of its core step but max_nodes
        (the last one, the prediction index, goes after max_nodes)."""
        now_s = time.monotonic()
        key = (tenant, session_id)
        if prompt is not None:
            session = self._start(key, prompt, new_tokens, now_s, prediction)
        else:
            session = self._sessions.get(key)
            if session is None:
                raise NotFound(f"session must be started with a prompt first, got new_tokens for unknown session "
                               f"{session_id!r}")
            self._check_length(session.core.length + int(new_tokens.shape[0]))
            self._sessions.move_to_end(key)
        session.last_used_s = now_s
        state = self._tenants.get(tenant) or self._tenant(tenant)
        if self._use_reference:
            self._refresh_reference(session, state, new_tokens)
        tenant_index = state.index if self._use_tenant else None
        prediction_index = session.prediction if self._use_prediction else None
        self._last_used = (tenant_index is not None, session.reference is not None, prediction_index is not None)
        return (session.core, new_tokens, tenant_index, session.reference, self._plan, *state.calibration.buffers,
                prediction_index)

    def last_lookup_s(self) -> tuple[tuple[str, float], ...]:
        """(label, seconds) of the last draft on this thread: each index query ("context", "tenant",
        "reference", "corpus:NAME", "prediction") and "build_tree"; () before any draft. Call on the drafting
        thread."""
        ns = _core.last_draft_ns()  # [inputs + 1] int64
        tenant, reference, prediction = self._last_used
        labels = (["context"] if Source.CONTEXT in self._config.sources else []) + (["tenant"] if tenant else [])
        labels += (["reference"] if reference else []) + self._corpus_labels
        labels += (["prediction"] if prediction else []) + ["build_tree"]
        return tuple(zip(labels, (float(x) / 1e9 for x in ns))) if len(ns) == len(labels) else ()

    def _refresh_reference(self, session: _Session, state: _Tenant, pending: np.ndarray) -> None:
        """(Re)selects the session's reference set (prior outputs + FAISS passages) at its
        start and every refresh_tokens, over the context with `pending` (int32, about to be appended)."""
        params = self._config.reference
        if not (len(state.prior_outputs) or self._references):
            return
        length = session.core.length + int(pending.shape[0])
        if session.reference_at >= 0 and length - session.reference_at < params.refresh_tokens:
            return
        query = np.concatenate([session.recent(params.window), pending])[-params.window:]
        session.reference = state.prior_outputs.select(query, store_passages(self._references, query, params.store_k))
        session.reference_at = length

    def end_session(self, tenant: str, session_id: str, new_tokens: np.ndarray | None = None) -> int:
        """Hand the session's output (with `new_tokens`, int32 [k], reported on its last draft as a
        draft call would) to its tenant's index; returns its token count."""
        if (tenant, session_id) not in self._sessions:
            raise NotFound(f"session must exist to be ended, got unknown session {session_id!r}")
        if new_tokens is not None and new_tokens.shape[0]:
            step = self._step(tenant, session_id, None, new_tokens)
            _core.session_draft(*step[:-1], 0, step[-1])
        return self._retire(tenant, self._sessions.pop((tenant, session_id)))

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
        sessions = sum(s.core.memory_bytes for s in self._sessions.values())
        indexes = [t.index for t in self._tenants.values() if t.index is not None]
        return DrafterStats(len(self._sessions), len(indexes), sum(ix.num_tokens for ix in indexes),
                            sessions + sum(ix.memory_bytes for ix in indexes))

    def _tenant(self, tenant: str) -> _Tenant:
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant(self._config, self._prior)
        return state

    def _start(self, key: tuple[str, str], prompt: np.ndarray, new_tokens: np.ndarray, now_s: float,
               prediction: np.ndarray | None = None) -> _Session:
        self._check_length(int(prompt.shape[0]) + int(new_tokens.shape[0]))
        if prediction is not None:
            self._check_length(int(prediction.shape[0]))
        self._sessions.pop(key, None)  # a restart resends the old output inside the prompt
        session = _Session(prompt, self._config.max_context_tokens, now_s, prediction)
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
        """Raises ResourceExhausted when a session's context would exceed max_context_tokens."""
        if tokens > self._config.max_context_tokens:
            raise ResourceExhausted(
                f"session context must be at most {self._config.max_context_tokens} tokens, got {tokens}")
