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
from it.

Bounds (`DrafterConfig`): the sessions' memory (`session_memory_bytes`, a running total kept
from `_core.Session.memory_bytes` after each step), each tenant's open sessions and their
context tokens (`tenant_max_sessions`, `tenant_max_tokens`). A step that would pass one first
evicts sessions idle at least `evict_idle_s` (least recently used first, their output kept as
at `end_session`), then raises ResourceExhausted. A tenant with neither open sessions nor prior
outputs is dropped; at `max_tenants` the least recently used tenant without sessions goes. Not thread-safe: the caller serializes calls (the service runs them on its loop).

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
from retriever.drafting.state import SessionState, TenantState
from retriever.drafting.types import DrafterConfig, DrafterStats, DraftResult, DraftTree, EncodedDraft, Source
from retriever.errors import NotFound, ResourceExhausted

SESSION_BYTES_PER_TOKEN = 256  # a session's memory per context token, about (~213 B measured; exact after each step)
SESSION_BASE_BYTES = 4096  # a new session's memory besides its tokens, about

if TYPE_CHECKING:
    from retriever.store.datastore import CorpusDatastore
    from retriever.store.faiss_store import FaissStore



class Drafter:
    """Sessions, tenant indexes and corpora; see the module docstring for the lifecycle."""

    def __init__(self, config: DrafterConfig, corpora: Sequence["CorpusDatastore"] = (),
                 on_output: Callable[[str, np.ndarray], None] | None = None,
                 references: Sequence["FaissStore"] = ()) -> None:
        """`on_output(tenant, tokens)` is told of every retired output (e.g. to publish it);
        `references`: FAISS stores feeding the reference sets (see `set_corpora`)."""
        self._config = config
        self._on_output = on_output
        self._sessions: OrderedDict[tuple[str, str], SessionState] = OrderedDict()  # least recently used first
        self._tenants: OrderedDict[str, TenantState] = OrderedDict()  # least recently used first
        self.evicted = 0  # idle sessions evicted to make room (quotas, memory budget)
        self._session_bytes = 0  # running total of the sessions' accounted memory (`_account`)
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
              max_nodes: int, prediction: np.ndarray | None = None, verified_nodes: int | None = None
              ) -> DraftResult:
        """Advance the session by `prompt` (restart) and/or `new_tokens`, then draft.
        `prediction` ([k] int32, with `prompt` only): the session's predicted output, one more
        draft source (Source.PREDICTION) for its whole life. `verified_nodes`: the verifier tested
        only this best-first prefix of the session's last draft (None: all of it); the calibration
        learns from those nodes alone.

        Raises NotFound for new_tokens alone on an unknown session, ResourceExhausted when
        the context would exceed `max_context_tokens`, or a memory bound (module doc) would be
        passed with no idle session left to evict, or a new tenant finds `max_tenants` all busy.
        """
        session, step = self._step(tenant, session_id, prompt, new_tokens, prediction, verified_nodes)
        arrays = _core.session_draft(*step[:-1], max_nodes, step[-1])
        self._account(session)
        return DraftResult(DraftTree(*arrays), step[0].length)

    def draft_response(self, tenant: str, session_id: str, prompt: np.ndarray | None, new_tokens: np.ndarray,
                       max_nodes: int, prediction: np.ndarray | None = None, verified_nodes: int | None = None
                       ) -> EncodedDraft:
        """As `draft`, the draft encoded by the core as a specdraft.v1.DraftResponse (the service's
        answer, without numpy arrays or a protobuf message in between)."""
        session, step = self._step(tenant, session_id, prompt, new_tokens, prediction, verified_nodes)
        encoded = EncodedDraft(*_core.session_draft_response(*step[:-1], max_nodes, step[-1]))
        self._account(session)
        return encoded

    def _step(self, tenant: str, session_id: str, prompt: np.ndarray | None, new_tokens: np.ndarray,
              prediction: np.ndarray | None = None, verified_nodes: int | None = None) -> tuple[SessionState, tuple]:
        """The session (started or advanced, room made for it: `_make_room`) and the arguments of
        its core step but max_nodes (the last one, the prediction index, goes after max_nodes)."""
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
            session.owner.sessions.move_to_end(session_id)
            self._make_room(session.owner, key, int(new_tokens.shape[0]), now_s, False)
            if verified_nodes is not None:
                session.core.keep_verified(verified_nodes)
        session.last_used_s = now_s
        if self._use_prediction:
            session.follow(new_tokens)
        state = session.owner
        self._tenants.move_to_end(tenant)
        if self._use_reference:
            self._refresh_reference(session, state, new_tokens)
        tenant_index = state.index if self._use_tenant else None
        prediction_index = session.prediction if self._use_prediction else None
        self._last_used = (tenant_index is not None, session.reference is not None, prediction_index is not None)
        return session, (session.core, new_tokens, tenant_index, session.reference, self._plan,
                         *state.calibration.buffers, prediction_index)

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

    def _refresh_reference(self, session: SessionState, state: TenantState, pending: np.ndarray) -> None:
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

    def end_session(self, tenant: str, session_id: str, new_tokens: np.ndarray | None = None,
                    verified_nodes: int | None = None) -> int:
        """Hand the session's output (with `new_tokens`, int32 [k], reported on its last draft as a
        draft call would, `verified_nodes` likewise) to its tenant's index; returns its token count."""
        if (tenant, session_id) not in self._sessions:
            raise NotFound(f"session must exist to be ended, got unknown session {session_id!r}")
        if new_tokens is not None and new_tokens.shape[0]:
            step = self._step(tenant, session_id, None, new_tokens, None, verified_nodes)[1]
            _core.session_draft(*step[:-1], 0, step[-1])
        return self._retire((tenant, session_id))

    def add_prior_output(self, tenant: str, tokens: np.ndarray) -> None:
        """Add one finished output (int32 [k]) to the tenant's index, e.g. from the shared log."""
        state = self._tenant(tenant, required=False) if tokens.shape[0] else None
        if state is not None:  # None: the tenant cap is reached and every tenant has open sessions
            state.add(tokens)

    def reserve_prior(self, tenant: str, tokens: int, outputs: int) -> None:
        """Makes room in the tenant's index for `outputs` more outputs of `tokens` tokens in all (a
        replay about to add them): its tables are sized once instead of doubling as they fill."""
        state = self._tenant(tenant, required=False) if tokens > 0 else None
        if state is not None:
            state.reserve(tokens + outputs)  # a separator after each output

    def add_prior_outputs(self, tenant: str, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Add outputs in order, their tokens concatenated (int32 [sum(lengths)], lengths int64 [k]),
        as `add_prior_output` on each would (e.g. a replay): the index is sized once and filled
        level by level, GIL released. Raises ValueError, nothing added, on a bad id or length."""
        state = self._tenant(tenant, required=False) if tokens.shape[0] else None
        if state is not None:
            state.add_many(tokens, lengths)

    def drop_tenant(self, tenant: str) -> bool:
        """Frees the tenant's prior outputs (index, reference outputs; e.g. another replica owns it now);
        its open sessions go on. True if it held any."""
        state = self._tenants.get(tenant)
        if state is None or state.index is None:
            return False
        if state.sessions:
            state.index, state.prior_outputs = None, PriorOutputs(self._config.reference)
        else:
            del self._tenants[tenant]
        return True

    def expire_idle(self, now_s: float | None = None) -> int:
        """End every session idle longer than `session_idle_s`; returns how many."""
        now_s = time.monotonic() if now_s is None else now_s
        idle = [k for k, s in self._sessions.items() if now_s - s.last_used_s > self._config.session_idle_s]
        for tenant, session_id in idle:
            self.end_session(tenant, session_id)
        return len(idle)

    def stats(self) -> DrafterStats:
        sessions = self._session_bytes
        indexes = [t.index for t in self._tenants.values() if t.index is not None]
        return DrafterStats(len(self._sessions), len(indexes), sum(ix.num_tokens for ix in indexes),
                            sessions + sum(ix.memory_bytes for ix in indexes), sessions, self.evicted)

    def _tenant(self, tenant: str, required: bool = True) -> TenantState | None:
        """The tenant's state, created when new; at `max_tenants` the least recently used tenant without
        open sessions goes first. When every one has sessions: ResourceExhausted, or None if not `required`."""
        state = self._tenants.get(tenant)
        if state is None:
            cap = self._config.max_tenants
            if len(self._tenants) >= cap and not self._evict_tenant():
                if not required:
                    return None
                raise ResourceExhausted(f"tenants held must be at most {cap}, got {cap + 1} (all have open sessions)")
            state = self._tenants[tenant] = TenantState(self._config, self._prior)
        return state

    def _evict_tenant(self) -> bool:
        """Drops the least recently used tenant without open sessions; False when there is none."""
        for name, state in self._tenants.items():
            if not state.sessions:
                del self._tenants[name]
                return True
        return False

    def _forget_if_empty(self, tenant: str) -> None:
        """Drops a tenant holding neither open sessions nor prior outputs (nothing to keep)."""
        state = self._tenants.get(tenant)
        if state is not None and not state.sessions and state.index is None:
            del self._tenants[tenant]

    def _start(self, key: tuple[str, str], prompt: np.ndarray, new_tokens: np.ndarray, now_s: float,
               prediction: np.ndarray | None = None) -> SessionState:
        n = int(prompt.shape[0]) + int(new_tokens.shape[0])
        self._check_length(n)
        if prediction is not None:
            self._check_length(int(prediction.shape[0]))
        if key in self._sessions:
            self._drop(key)  # a restart resends the old output inside the prompt
        owner = self._tenant(key[0])
        try:
            self._make_room(owner, key, n, now_s, True)
        except ResourceExhausted:
            self._forget_if_empty(key[0])
            raise
        self._tenants[key[0]] = owner  # back if evicting its last (empty) session forgot it
        session = SessionState(prompt, self._config.max_context_tokens, now_s, owner, prediction)
        self._sessions[key] = owner.sessions[key[1]] = session
        self._account(session)
        while len(self._sessions) > self._config.max_sessions:
            self._retire(next(iter(self._sessions)))
        return session

    def _make_room(self, owner: TenantState, key: tuple[str, str], tokens: int, now_s: float, new: bool) -> None:
        """Makes room for `tokens` more context tokens (and with `new` one more session) of `key`:
        evicts sessions idle at least `evict_idle_s` (least recently used first, never `key`) while the
        tenant's quotas or the session memory budget would be exceeded; raises ResourceExhausted when
        no idle session is left to evict."""
        c, tenant = self._config, key[0]
        idle_before = now_s - c.evict_idle_s
        while new and len(owner.sessions) >= c.tenant_max_sessions:
            if not self._evict_idle(owner.sessions, key, idle_before, tenant):
                raise ResourceExhausted(f"open sessions of tenant {tenant!r} must be at most {c.tenant_max_sessions}, "
                                        f"got {len(owner.sessions) + 1} (none idle {c.evict_idle_s:g} s to evict)")
        while owner.context_tokens + tokens > c.tenant_max_tokens:
            if not self._evict_idle(owner.sessions, key, idle_before, tenant):
                raise ResourceExhausted(f"context tokens of tenant {tenant!r}'s open sessions must be at most "
                                        f"{c.tenant_max_tokens}, got {owner.context_tokens + tokens} "
                                        f"(none idle {c.evict_idle_s:g} s to evict)")
        need = tokens * SESSION_BYTES_PER_TOKEN + (SESSION_BASE_BYTES if new else 0)
        while self._session_bytes + need > c.session_memory_bytes:
            if not self._evict_idle(self._sessions, key, idle_before):
                raise ResourceExhausted(f"session memory must be at most {c.session_memory_bytes} bytes, got "
                                        f"{self._session_bytes + need} bytes (none idle {c.evict_idle_s:g} s to evict)")

    def _evict_idle(self, order: "OrderedDict", key: tuple[str, str], idle_before: float, tenant: str = "") -> bool:
        """Retires the least recently used session of `order` (all sessions, or `tenant`'s by id) if it
        is not `key` and was last used before `idle_before`; False when it may not be evicted."""
        if not order:
            return False
        name, oldest = next(iter(order.items()))
        oldest_key = (tenant, name) if tenant else name
        if oldest_key == key or oldest.last_used_s > idle_before:
            return False
        self._retire(oldest_key)
        self.evicted += 1
        return True

    def _account(self, session: SessionState) -> None:
        """Brings the running totals up to date with the session's memory and context length (O(1))."""
        now_bytes = session.core.memory_bytes + session.rewrites_bytes + sum(
            ix.memory_bytes for ix in (session.reference, session.prediction) if ix is not None)
        length = session.core.length
        self._session_bytes += now_bytes - session.bytes
        session.owner.context_tokens += length - session.tokens
        session.bytes, session.tokens = now_bytes, length

    def _drop(self, key: tuple[str, str]) -> SessionState:
        """Removes the session from every table and its share of the running totals."""
        session = self._sessions.pop(key)
        del session.owner.sessions[key[1]]
        self._session_bytes -= session.bytes
        session.owner.context_tokens -= session.tokens
        return session

    def _retire(self, key: tuple[str, str]) -> int:
        """Ends the session: its output goes to its tenant (and `on_output`); returns its token count."""
        session = self._drop(key)
        output = session.output_tokens()
        self.add_prior_output(key[0], output)
        if self._on_output is not None and output.shape[0]:
            self._on_output(key[0], output)
        self._forget_if_empty(key[0])
        return int(output.shape[0])

    def _check_length(self, tokens: int) -> None:
        """Raises ResourceExhausted when a session's context would exceed max_context_tokens."""
        if tokens > self._config.max_context_tokens:
            raise ResourceExhausted(
                f"session context must be at most {self._config.max_context_tokens} tokens, got {tokens}")
