"""The decode loop: draft -> tree inputs -> one forward -> accept -> commit, one step at a time.

`Engine(loaded_model).generate(prompt_ids, max_new_tokens, sampling, drafter, stop_token_ids)`
yields one `StepResult` per forward pass. The prompt except its last token is prefilled into
the KV cache; the last token is the first root. Each step asks the `DraftSource` for a tree
(reporting the tokens emitted by the previous step and how many nodes of its last tree were
verified) unless the `StepPolicy` is backing off after drafts that did not pay, keeps the prefix
of the tree that maximizes expected tokens per second (the policy: the `CostModel`, measured once
per model and machine and kept by a `CostStore`, refined from every step; node scores weighed by
the acceptance rates observed so far), verifies it in one forward pass, accepts
(`verifier.decoding.accept`), and commits the KV cache to the accepted path. No draft (None, an
error, no drafter, or none worth verifying) means a plain decoding step.

The model is a `Backend` (`verifier.decoding.backend`: HF transformers or llama.cpp); a
`LoadedModel` is taken as the HF backend. The tests check speculative greedy output against
plain greedy output token for token.

Example:
    >>> engine = Engine(load_model(ModelSpec()), CostModel.flat())
    >>> steps = list(engine.generate(prompt_ids, 32, SamplingParams(), drafter=None))
    >>> sum(len(s.tokens) for s in steps) <= 32
    True
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from retriever.drafting.types import DraftTree
from verifier.decoding.accept import (
    Acceptance,
    SamplingParams,
    UniformStream,
    accept_greedy,
    accept_sampling,
    accept_typical,
)
from verifier.decoding.backend import Backend
from verifier.decoding.cost import CostModel
from verifier.decoding.cost_store import CostStore
from verifier.decoding.hf import HFBackend
from verifier.decoding.model import LoadedModel
from verifier.decoding.policy import StepPolicy
from verifier.decoding.stats import StepResult
from verifier.decoding.tree import TreeInputs, pruned

log = logging.getLogger(__name__)


@runtime_checkable
class DraftSource(Protocol):
    """Drafts for one generation at a time: start, then one draft call per step, then end."""

    def start(self, prompt_ids: list[int]) -> None: ...

    def draft(self, new_tokens: list[int], max_nodes: int, verified_nodes: int) -> DraftTree | None:
        """A tree continuing the context + new_tokens (emitted since the last call); None: no draft.
        verified_nodes: how many best-first nodes of the tree it returned last were verified (0: none,
        or it returned none)."""

    def end(self, verified_nodes: int) -> None:
        """The generation is over; verified_nodes as in `draft`."""


@dataclass
class _Sequence:
    """Mutable state of one generation: the backend's cache holds cache_len entries; root is not in it yet."""

    cache: object
    cache_len: int
    root: int
    emitted: int = 0
    uniforms: UniformStream | None = field(default=None)


class Engine:
    """Generates with one model; not thread-safe (one generation at a time)."""

    def __init__(self, model: "Backend | LoadedModel", cost_model: CostModel | None = None, max_nodes: int = 64,
                 calibrate: bool = True, cost_store: CostStore | None = None, save_every: int = 64,
                 timed: bool = True) -> None:
        """model: a Backend, or a LoadedModel (the HF backend). cost_model None: the curve kept in
        cost_store, else measured now on the model's device (a few seconds on a CPU) and kept there;
        the refined curve is written back after a generation once save_every steps have refined it.
        calibrate: weigh draft scores by the acceptance rates observed so far. timed False: the policy
        prices steps by the cost curve's prediction, not the clock (`StepPolicy`; comparisons)."""
        self.backend: Backend = HFBackend(model) if isinstance(model, LoadedModel) else model
        self.max_nodes, self.cost_store, self.save_every = max_nodes, cost_store, save_every
        if cost_model is None:
            cost_model = (cost_store.load_or_measure(self.backend, 1 + max_nodes) if cost_store is not None
                          else CostModel.measure(self.backend, max_tokens=1 + max_nodes))
        self.policy = StepPolicy(cost_model, calibrate, timed=timed)
        self._saved_at = 0  # cost observations when the curve was last written

    @property
    def cost_model(self) -> CostModel:
        return self.policy.cost

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
                 drafter: DraftSource | None = None, stop_token_ids: Sequence[int] | None = None
                 ) -> Iterator[StepResult]:
        """Steps until max_new_tokens tokens, a stop token (emitted, then the end), or the position limit."""
        prompt = self._check(prompt_ids, max_new_tokens)
        stops = set(self.backend.eos_token_ids if stop_token_ids is None else stop_token_ids)
        if max_new_tokens == 0:
            return
        seq = self.prefill(prompt)
        seq.uniforms = None if sampling.greedy else UniformStream(sampling.seed)
        unreported: list[int] = []  # emitted tokens the drafter has not been told of yet
        verified = 0  # nodes of the drafter's last tree that were verified
        self.policy.start()
        if drafter is not None:
            drafter.start(list(prompt))
        try:
            while seq.emitted < max_new_tokens and seq.cache_len < self.backend.max_positions:
                left = max_new_tokens - seq.emitted
                max_depth = min(left, self.backend.max_positions - seq.cache_len) - 1  # deepest node worth verifying
                t0 = time.perf_counter_ns()
                asked = drafter is not None and max_depth >= 1 and self.policy.wants_draft()
                draft = self._draft(drafter, unreported, verified) if asked else None
                t1 = time.perf_counter_ns()
                tree, kept = self._verified_prefix(draft, max_depth)
                if asked:
                    self.policy.drafted(draft, t1 - t0)
                    verified = kept
                logits, inputs = self.backend.verify(seq.cache, seq.cache_len, seq.root, tree)  # [1+n, V]
                acceptance = self.accept(logits, inputs, tree, sampling, seq)
                self.commit(seq, acceptance)
                t2 = time.perf_counter_ns()
                self.policy.stepped(1 + len(tree), t2 - t1, tree, acceptance.nodes.tolist())
                tokens = _cut(acceptance.tokens.tolist(), left, stops)
                accepted = acceptance.nodes.tolist()[:len(tokens)]
                yield StepResult(tokens, len(tree), len(accepted), tuple(int(s) for s in tree.sources[accepted]),
                                 t1 - t0, t2 - t1, len(draft) if draft is not None else 0)
                if len(tokens) < len(acceptance.tokens) or tokens[-1] in stops:
                    return
                unreported.extend(tokens)
        finally:
            if drafter is not None:
                drafter.end(verified_nodes=verified)
            self._keep_cost()

    def _check(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt_ids must hold at least one token, got none")
        bad = [t for t in prompt if not 0 <= t < self.backend.vocab_size]
        if bad:
            raise ValueError(f"prompt_ids must be in [0, {self.backend.vocab_size}), got {bad[0]}")
        if len(prompt) > self.backend.max_positions:
            raise ValueError(f"prompt must be at most {self.backend.max_positions} tokens, got {len(prompt)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        return prompt

    def _draft(self, drafter: DraftSource, unreported: list[int], verified: int) -> DraftTree | None:
        """The drafter's tree (told of, and clearing, `unreported`), or None; a failure costs only the draft."""
        new_tokens = unreported.copy()
        unreported.clear()
        try:
            return drafter.draft(new_tokens, self.max_nodes, verified_nodes=verified)
        except Exception:  # noqa: BLE001 - drafting is an optimization: never fail the generation
            log.warning("draft source failed; decoding this step without a draft", exc_info=True)
            return None

    def _verified_prefix(self, draft: DraftTree | None, max_depth: int) -> tuple[DraftTree, int]:
        """The nodes worth verifying (valid, at most max_depth deep, the policy's best prefix), and
        how many best-first nodes of the draft that covers (the drafter's `verified_nodes`)."""
        if draft is None or len(draft) == 0 or max_depth < 1:
            return DraftTree.empty(), 0
        keep = pruned(draft, self.backend.vocab_size, max_depth)  # [n] bool
        valid = (draft if keep.all() else draft.select(keep)).prefix(self.max_nodes)
        tree = valid.prefix(self.policy.choose(valid))
        chosen = np.zeros(len(draft), bool)
        chosen[np.flatnonzero(keep)[:len(tree)]] = True
        return tree, int(len(draft) if chosen.all() else np.argmin(chosen))

    def _keep_cost(self) -> None:
        """Writes the refined cost curve once save_every steps have refined it since the last write."""
        if self.cost_store is not None and self.cost_model.observed - self._saved_at >= self.save_every:
            self.cost_store.save(self.backend, self.cost_model)
            self._saved_at = self.cost_model.observed

    def prefill(self, prompt: list[int]) -> _Sequence:
        """A sequence whose cache holds prompt[:-1]; prompt[-1] is the first root."""
        return _Sequence(self.backend.start(prompt[:-1]), len(prompt) - 1, prompt[-1])

    @staticmethod
    def accept(logits: torch.Tensor, inputs: TreeInputs, tree: DraftTree, sampling: SamplingParams,
               seq: _Sequence) -> Acceptance:
        if sampling.greedy:
            return accept_greedy(logits, inputs)
        uniforms = seq.uniforms.take(seq.emitted, int(inputs.depth.max()) + 1)  # [max depth + 1] float64
        rule = accept_typical if sampling.typical else accept_sampling
        return rule(logits, tree, sampling, uniforms)

    def commit(self, seq: _Sequence, acceptance: Acceptance) -> None:
        """Cache := prefix + root + accepted nodes; the bonus token becomes the next root."""
        self.backend.commit(seq.cache, seq.cache_len, acceptance.nodes.tolist())
        seq.cache_len += 1 + len(acceptance.nodes)
        seq.root = int(acceptance.tokens[-1])
        seq.emitted += len(acceptance.tokens)


def _cut(tokens: list[int], budget: int, stops: set[int]) -> list[int]:
    """tokens up to the budget and up to (including) the first stop token."""
    tokens = tokens[:budget]
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i + 1]
    return tokens
