"""Drafting through a specdraft retriever inside vLLM (pinned: vllm==0.33.0, the `vllm` extra).

vLLM 0.33.0 loads a user proposer class for `speculative_config.method == "custom_class"`
(`vllm/v1/spec_decode/custom_class_proposer.py`): it imports `speculative_config.model`
("module.Class"), builds it with `Class(vllm_config)` and, after each step's bookkeeping, the V1
GPU model runner calls

    drafter.propose(sampled_token_ids, input_batch.num_tokens_no_spec, input_batch.token_ids_cpu,
                    slot_mappings=...) -> list[list[int]]

i.e. the n-gram proposer's `propose` without its leading `num_speculative_tokens`. Row i of the
batch: `sampled_token_ids[i]` the tokens accepted this step (empty: not drafting, e.g. a partial
prefill), `token_ids_cpu[i, :num_tokens_no_spec[i]]` its tokens so far (accepted ones included).
The answer is one chain per row: the best root path of our draft tree (`best_path`), at most
`num_speculative_tokens` tokens, empty when none. `SpecdraftProposer` implements it; nothing
here imports vllm (duck typing), so it runs and is tested on CPU without vLLM.

Wiring (Python):

    LLM(model=..., speculative_config={
            "method": "custom_class",
            "model": "specdraft.integrations.vllm.SpecdraftProposer",
            "num_speculative_tokens": 8},
        additional_config={"specdraft": {"target": "retriever:50051", "tenant": "team-a"}})

or `vllm serve MODEL --speculative-config '{"method": "custom_class", "model":
"specdraft.integrations.vllm.SpecdraftProposer", "num_speculative_tokens": 8}' --additional-config
'{"specdraft": {"target": "retriever:50051"}}'`. Settings (`ProposerSettings`) come from
`additional_config["specdraft"]`, else `SPECDRAFT_VLLM_<NAME>` environment variables (TARGET,
TENANT, DEADLINE_MS, MAX_NODES, MAX_BATCH, ...), else the defaults. `custom_class` runs on vLLM's V1
model runner with async scheduling off (vLLM picks both by itself; do not set
VLLM_USE_V2_MODEL_RUNNER=1). Check the interface of a downloaded wheel with
`python -m specdraft.integrations.vllm_check vllm-0.33.0-*.whl`.

Sessions: vLLM passes no request ids, so a request is recognized by its row's tokens: the
first `HEAD` tokens and the `TAIL` tokens before what the retriever already holds (rows move when
vLLM condenses the batch). Its first draft call sends the context as `prompt`, later ones only
the tokens since. A session whose request left the batch (finished or preempted) is ended
(EndSession, background thread): its output becomes a prior output of the tenant. All drafting
rows of a step go in ONE `DraftBatch` call (at most `max_batch` rows; rows past it get no draft)
with a deadline; NOT_FOUND items are resent with their prompt in the time left. Nothing is
ever raised into vLLM: a failed or late call gives empty drafts for that step and backs off.

Limits: the tokens of a request's last step are not sent before EndSession; two requests with
identical `HEAD` and identical tokens before the synced point are indistinguishable (drafts only
lose acceptance, never correctness); a preempted request starts a new session when resumed;
rows longer than `max_context_tokens` get no draft.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Sequence

import numpy as np

from retriever import config, errors
from retriever.client import DraftCall, DraftReply, RetrieverClient
from retriever.drafting.types import DraftTree

log = logging.getLogger(__name__)

ENV_PREFIX = "SPECDRAFT_VLLM_"
HEAD = 32  # tokens of a row's start fingerprinting its request
TAIL = 16  # tokens before the synced point fingerprinting its request


def best_path(tree: DraftTree, k: int) -> list[int]:
    """Tokens of the root path descending to the highest-score child (ties: lowest index); <= k tokens."""
    if k <= 0 or len(tree) == 0:
        return []
    parents, scores, ids = tree.parents.tolist(), tree.scores.tolist(), tree.token_ids.tolist()
    path: list[int] = []
    if scores == sorted(scores, reverse=True):  # best-first (the wire contract): a node's first child is its best
        node = -1
        for i, p in enumerate(parents):
            if p == node:
                path.append(ids[i])
                node = i
                if len(path) == k:
                    break
        return path
    best: dict[int, int] = {}  # node (-1: root) -> its best child
    for i, p in enumerate(parents):
        b = best.get(p)
        if b is None or scores[i] > scores[b]:
            best[p] = i
    node = best.get(-1)
    while node is not None and len(path) < k:
        path.append(ids[node])
        node = best.get(node)
    return path


@dataclass(frozen=True)
class ProposerSettings:
    """Where and how to draft; see the module docstring for the sources."""

    target: str = "127.0.0.1:50051"  # the retriever, host:port
    tenant: str = "default"  # prior outputs are shared within a tenant only
    deadline_ms: float = 20.0  # one step's DraftBatch (NOT_FOUND resend included)
    max_nodes: int = 64  # tree budget per row; the chain is the tree's best path
    max_batch: int = 256  # rows per DraftBatch (the server's SPECDRAFT_MAX_BATCH)
    max_context_tokens: int = 131072  # longer rows get no draft (the server's SPECDRAFT_MAX_CONTEXT_TOKENS)
    end_timeout_s: float = 2.0  # EndSession (background)

    @staticmethod
    def from_sources(additional: Mapping[str, Any] | None,
                     env: Mapping[str, str] | None = None) -> "ProposerSettings":
        """`additional["specdraft"]` entries, else SPECDRAFT_VLLM_<NAME> variables of `env` (default: the
        process's; read by `retriever.config.load`), else defaults."""
        given = dict((additional if isinstance(additional, Mapping) else {}).get("specdraft") or {})
        unknown = sorted(set(given) - {f.name for f in fields(ProposerSettings)})
        if unknown:
            raise ValueError(f"additional_config['specdraft'] keys must be ProposerSettings fields, got {unknown}")
        typed = {k: type(getattr(ProposerSettings(), k))(v) for k, v in given.items()}
        s = config.load(ProposerSettings, ENV_PREFIX, env, **typed)
        if s.deadline_ms <= 0 or s.max_nodes <= 0 or s.max_batch <= 0 or not s.tenant:
            raise ValueError(f"specdraft vLLM settings must have deadline_ms, max_nodes, max_batch > 0 and a tenant, "
                             f"got {s}")
        return s


@dataclass(frozen=True)
class ProposerStats:
    """Counts since start (steps: propose calls; failed_calls: DraftBatch calls failed or late)."""

    steps: int = 0
    drafted_rows: int = 0  # rows given a non-empty draft
    draft_tokens: int = 0
    failed_calls: int = 0
    sessions_started: int = 0
    sessions_ended: int = 0
    restarts: int = 0  # prompts resent (NOT_FOUND, failures, mismatched context)


@dataclass(frozen=True)
class _Session:
    """One vLLM request's retriever session; `synced` tokens of its row are on the server (0: none)."""

    session_id: str
    head: tuple[int, ...]  # [<= HEAD] first tokens of the row
    tail: tuple[int, ...]  # [<= TAIL] tokens of the row before `synced`
    synced: int = 0  # row tokens the server holds (0: send the prompt next)
    started: bool = False  # a prompt was sent (EndSession is due)
    failures: int = 0  # consecutive item errors (other than NOT_FOUND)
    retry_at: float = 0.0  # monotonic time before which the row gets no draft (after an item error)


@dataclass(frozen=True)
class _Item:
    """One drafting row of a step: its call and the row length the call brings the server to."""

    row: int
    n: int  # row tokens (num_tokens_no_spec)
    k: int  # draft length allowed
    call: DraftCall


def _fingerprint(row: np.ndarray, synced: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(row[:min(HEAD, synced)].tolist()), tuple(row[max(0, synced - TAIL):synced].tolist())


def _holds(s: _Session, row: np.ndarray, n: int) -> bool:
    """True if the row (n tokens) continues the session's request (unsynced: its first tokens match)."""
    if s.synced:
        return s.synced <= n and (s.head, s.tail) == _fingerprint(row, s.synced)
    return len(s.head) <= n and tuple(row[:len(s.head)].tolist()) == s.head


class SpecdraftProposer:
    """vLLM `custom_class` proposer drafting chains from a specdraft retriever (module docstring).

    Called from one thread (the model runner). `client` replaces the retriever channel (tests).
    """

    def __init__(self, vllm_config: Any, *, settings: ProposerSettings | None = None,
                 client: RetrieverClient | None = None) -> None:
        self.k = int(vllm_config.speculative_config.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.settings = settings or ProposerSettings.from_sources(getattr(vllm_config, "additional_config", None))
        s = self.settings
        self.client = client or RetrieverClient(s.target, s.deadline_ms / 1000, call_timeout_s=s.end_timeout_s)
        self.stats = ProposerStats()
        self._stats_lock = threading.Lock()  # EndSession counts come from a background thread
        self._rows: dict[int, _Session] = {}  # batch row -> session
        self._ends = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specdraft-end")
        self._pending: list[Future] = []
        self._retry_at, self._backoff = 0.0, 0.05

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """vLLM hands the target model here; no model to load."""

    def propose(self, sampled_token_ids: Sequence[Sequence[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings: Any = None) -> list[list[int]]:
        """[num_reqs] accepted tokens, [>= num_reqs] row lengths, [>= num_reqs, max_model_len] rows
        -> [num_reqs] chains (<= k tokens each, empty: no draft). Never raises."""
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        try:
            self._match(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
            items = self._items(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
            if items and time.monotonic() >= self._retry_at:
                self._draft(items, token_ids_cpu, drafts)
        except Exception:  # noqa: BLE001 - a drafting bug must never stop vLLM
            log.exception("specdraft proposer failed; no drafts this step")
        self._count(steps=1)
        return drafts

    def flush(self, timeout_s: float = 5.0) -> None:
        """Waits for the EndSession calls in flight."""
        for f in self._pending:
            f.exception(timeout=timeout_s)
        self._pending = [f for f in self._pending if not f.done()]

    def close(self) -> None:
        """Ends every open session, then closes the channel."""
        for s in self._rows.values():
            self._end(s)
        self._rows = {}
        self.flush(self.settings.end_timeout_s)
        self._ends.shutdown(wait=True)
        self.client.close()

    def session_ids(self) -> dict[int, str]:
        """Batch row -> session id of the request on it (as of the last step)."""
        return {row: s.session_id for row, s in self._rows.items()}

    # ------------------------------------------------------------ sessions

    def _match(self, sampled: Sequence[Sequence[int]], lengths: np.ndarray, tokens: np.ndarray) -> None:
        """Assigns each row its request's session; sessions whose request left the batch are ended."""
        num_reqs = len(sampled)
        old, new = dict(self._rows), {}
        for row in range(num_reqs):  # the request still on its row (the usual case)
            s = old.get(row)
            if s is not None and _holds(s, tokens[row], int(lengths[row])):
                new[row] = old.pop(row)
        for row in range(num_reqs):  # a request moved to another row (vLLM condensed the batch)
            if row in new:
                continue
            n = int(lengths[row])
            moved = next((r for r, s in old.items() if _holds(s, tokens[row], n)), None)
            if moved is not None:
                new[row] = old.pop(moved)
            elif sampled[row]:
                new[row] = _Session(uuid.uuid4().hex, tuple(tokens[row, :min(HEAD, n)].tolist()), ())
        for s in old.values():
            self._end(s)
        self._rows = new

    def _items(self, sampled: Sequence[Sequence[int]], lengths: np.ndarray, tokens: np.ndarray) -> list[_Item]:
        """The DraftBatch items of this step's drafting rows (at most max_batch)."""
        items: list[_Item] = []
        now = time.monotonic()
        for row, s in self._rows.items():
            n = int(lengths[row])
            k = min(self.k, self.max_model_len - n)
            if (not sampled[row] or k <= 0 or n > self.settings.max_context_tokens or n == s.synced
                    or now < s.retry_at or len(items) >= self.settings.max_batch):  # n == synced: nothing new
                continue
            items.append(_Item(row, n, k, self._call(s, tokens[row], n)))
        return items

    def _call(self, s: _Session, row: np.ndarray, n: int) -> DraftCall:
        t, nodes = self.settings.tenant, self.settings.max_nodes
        if s.synced:
            return DraftCall(t, s.session_id, new_tokens=row[s.synced:n].tolist(), max_nodes=nodes)
        return DraftCall(t, s.session_id, prompt=row[:n].tolist(), max_nodes=nodes)

    def _end(self, s: _Session) -> None:
        if not s.started:
            return
        self._pending.append(self._ends.submit(self._end_now, s.session_id))

    def _end_now(self, session_id: str) -> None:
        try:
            self.client.end_session(self.settings.tenant, session_id)
            self._count(sessions_ended=1)
        except errors.SpecdraftError as e:
            log.info("EndSession of %s failed: %s", session_id, e)

    # ------------------------------------------------------------ drafting

    def _draft(self, items: list[_Item], tokens: np.ndarray, drafts: list[list[int]]) -> None:
        """One DraftBatch (plus one resend of NOT_FOUND items) within the deadline; fills drafts."""
        deadline = time.monotonic() + self.settings.deadline_ms / 1000
        try:
            self._draft_rounds(items, tokens, drafts, deadline)
        finally:
            self._count(drafted_rows=sum(1 for it in items if drafts[it.row]),
                        draft_tokens=sum(len(drafts[it.row]) for it in items))

    def _draft_rounds(self, items: list[_Item], tokens: np.ndarray, drafts: list[list[int]], deadline: float) -> None:
        for _ in range(2):
            self._mark_started(items)
            replies = self._batch([it.call for it in items], deadline)
            if replies is None:
                for it in items:
                    self._unsync(it.row)
                return
            resend = [self._take(it, r, tokens[it.row], drafts) for it, r in zip(items, replies)]
            items = [replace(it, call=self._call(self._rows[it.row], tokens[it.row], it.n))
                     for it, again in zip(items, resend) if again]
            if not items:
                return

    def _batch(self, calls: list[DraftCall], deadline: float) -> list[DraftReply | errors.SpecdraftError] | None:
        """The replies, or None when the call failed or ran past the deadline (then: back off)."""
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise errors.Unavailable("no time left in the step's deadline")
            replies = self.client.draft_batch(calls, timeout_s=left)
        except errors.SpecdraftError as e:
            self._count(failed_calls=1)
            log.debug("DraftBatch failed (%s); no drafts, retry in %.2f s", e, self._backoff)
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(2 * self._backoff, 5.0)
            return None
        self._backoff = 0.05
        return replies

    def _take(self, it: _Item, reply: DraftReply | errors.SpecdraftError, row: np.ndarray,
              drafts: list[list[int]]) -> bool:
        """Records one item's reply (its draft, its session's sync); True: resend with the prompt."""
        s = self._rows[it.row]
        restarting = it.call.prompt is not None
        if isinstance(reply, errors.SpecdraftError):
            if isinstance(reply, errors.NotFound) and not restarting:
                self._unsync(it.row)
                return True
            log.debug("draft of session %s failed: %s", s.session_id, reply)
            self._rows[it.row] = replace(s, synced=0, failures=s.failures + 1,
                                         retry_at=time.monotonic() + min(0.05 * 2 ** s.failures, 5.0))
            return False
        if reply.context_tokens != it.n:  # the server's context is not this row's: restart next step
            self._unsync(it.row)
        else:
            head, tail = _fingerprint(row, it.n)
            self._rows[it.row] = replace(s, synced=it.n, head=head, tail=tail, failures=0)
        drafts[it.row] = best_path(reply.tree, it.k)
        return False

    def _mark_started(self, items: list[_Item]) -> None:
        """Sessions whose prompt goes out now are on the server from here on (EndSession is due)."""
        for it in items:
            s = self._rows[it.row]
            if it.call.prompt is not None:
                self._count(sessions_started=int(not s.started), restarts=int(s.started))
                self._rows[it.row] = replace(s, started=True)

    def _unsync(self, row: int) -> None:
        self._rows[row] = replace(self._rows[row], synced=0)

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            self.stats = replace(self.stats, **{k: getattr(self.stats, k) + v for k, v in deltas.items()})
