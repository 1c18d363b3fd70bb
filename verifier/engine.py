"""The decode loop: draft -> tree inputs -> one forward -> accept -> commit, one step at a time.

`Engine(loaded_model).generate(prompt_ids, max_new_tokens, sampling, drafter, stop_token_ids)`
yields one `StepResult` per forward pass. The prompt except its last token is prefilled into
the KV cache; the last token is the first root. Each step asks the `DraftSource` for a tree
(reporting the tokens emitted by the previous step), keeps the prefix of the tree that
maximizes expected tokens per second under the measured `CostModel` (node scores weighed by
the acceptance rates observed so far, `ScoreCalibration`), verifies it in one
forward pass with a 4-D tree mask, accepts (`verifier.accept`), and commits the KV cache to
the accepted path. No draft (None, an error, or no drafter) means a plain decoding step.

The 4-D float mask is passed as `attention_mask` and transformers (v5 `masking_utils`) uses a
4-D mask as given, with both the sdpa and the eager attention of Llama and Qwen2; the tests
check speculative greedy output against plain greedy output token for token.

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
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from verifier.accept import (Acceptance, SamplingParams, UniformStream, accept_greedy, accept_sampling,
                             accept_typical)
from verifier.cache import commit, new_cache, truncate
from verifier.tree import Draft, TreeInputs, build_tree_inputs, prefix_by_score, prune

if TYPE_CHECKING:
    from retriever.drafter import Drafter
    from verifier.model import LoadedModel

__all__ = ["CostModel", "DraftSource", "Engine", "LocalDraftSource", "SamplingParams", "ScoreCalibration",
           "StepResult"]
log = logging.getLogger(__name__)


@runtime_checkable
class DraftSource(Protocol):
    """Drafts for one generation at a time: start, then one draft call per step, then end."""

    def start(self, prompt_ids: list[int]) -> None: ...

    def draft(self, new_tokens: list[int], max_nodes: int) -> Draft | None:
        """A tree continuing the context + new_tokens (emitted since the last call); None: no draft."""

    def end(self) -> None: ...


@dataclass(frozen=True)
class StepResult:
    tokens: list[int]  # emitted this step: accepted draft tokens then the bonus (cut at EOS / max tokens)
    draft_nodes: int  # nodes verified in the forward (the chosen prefix of the draft)
    accepted_nodes: int  # emitted tokens that came from draft nodes
    accepted_sources: tuple[int, ...]  # [accepted_nodes] retriever Source of each accepted draft token
    draft_ns: int  # time in DraftSource.draft
    verify_ns: int  # tree inputs + forward + accept + commit
    drafted_nodes: int = 0  # nodes the drafter returned (before pruning and the prefix choice)


@dataclass(frozen=True)
class CostModel:
    """Forward time by number of input tokens (root + draft nodes), measured on one device.

    Example: tokens (1, 2, 4), cost_ns (10, 10, 14) -> at(3) = 12; best_prefix([0.9, 0.5, 0.1])
    compares (1 + 0) / 10, (1 + 0.9) / 10, (1 + 1.4) / 12, (1 + 1.5) / 14 -> 2 nodes.
    """

    tokens: tuple[int, ...]  # measured forward sizes, increasing, the first 1
    cost_ns: tuple[float, ...]

    def at(self, num_tokens: np.ndarray | int) -> np.ndarray:
        """Interpolated cost in ns; linear extrapolation past the last measured size."""
        x, y = np.asarray(self.tokens, np.float64), np.asarray(self.cost_ns, np.float64)
        n = np.asarray(num_tokens, np.float64)
        slope = (y[-1] - y[-2]) / (x[-1] - x[-2]) if len(x) > 1 else 0.0
        return np.where(n <= x[-1], np.interp(n, x, y), y[-1] + max(slope, 0.0) * (n - x[-1]))

    def best_prefix(self, scores: np.ndarray) -> int:
        """k maximizing (1 + sum of the first k scores) / cost(1 + k); scores [n] float32 best-first."""
        expected = 1.0 + np.concatenate([[0.0], np.cumsum(np.clip(scores, 0.0, 1.0), dtype=np.float64)])  # [n+1]
        rate = expected / self.at(np.arange(1, len(scores) + 2))
        return int(np.argmax(rate))

    @staticmethod
    def flat(max_tokens: int = 1024) -> "CostModel":
        """Every size costs the same: verify the whole draft (tests, or a GPU far from saturation)."""
        return CostModel((1, max_tokens), (1.0, 1.0))

    @staticmethod
    def measure(loaded: "LoadedModel", max_tokens: int = 257, cache_len: int = 256, reps: int = 3,
                stop_ratio: float = 8.0) -> "CostModel":
        """Times chain-tree forwards of 1, 2, 4, ... tokens over a random cache of cache_len entries.

        Stops past max_tokens or once a size costs stop_ratio times a single token (the rest is
        extrapolated linearly: no tree is worth that much on such a device).
        """
        model, device = loaded.model, loaded.device
        cache_len = max(1, min(cache_len, loaded.max_positions - 2 * max_tokens))
        cache = new_cache(model)
        with torch.inference_mode():
            ids = torch.randint(0, loaded.vocab_size, (1, cache_len), generator=torch.Generator().manual_seed(0))
            model(ids.to(device), past_key_values=cache, use_cache=True, logits_to_keep=1)
        sizes, costs, t = [], [], 1
        while True:
            inputs = build_tree_inputs(0, Draft.chain([1] * (t - 1)), cache_len, loaded.dtype, device)
            samples = [_timed_forward(model, inputs, cache, device) for _ in range(reps + 1)]  # first: warm-up
            sizes.append(t)
            costs.append(max(float(min(samples[1:])), costs[-1] if costs else 0.0))  # more tokens never cost less
            if t >= max_tokens or costs[-1] > stop_ratio * costs[0]:
                return CostModel(tuple(sizes), tuple(costs))
            t = min(2 * t, max_tokens)


class ScoreCalibration:
    """Maps drafter scores to the acceptance rates this model shows (engine-wide, decaying evidence).

    Scores fall into `bins` equal bins over [0, 1]; bin b's rate is
    (accepted_b + prior * mid_b) / (verified_b + prior): the identity at first, then the observed
    rate of the verified nodes. Evidence decays by `decay` per step, so after a run of bad drafts
    (no tree verified, no new evidence) the rates drift back to the scores and drafting resumes.

    Example: 40 verified nodes scored 0.8..0.9 (mid 0.85), 4 accepted, prior 8:
    rate = (4 + 8 * 0.85) / (40 + 8) = 0.225.
    """

    def __init__(self, bins: int = 10, prior: float = 2.0, decay: float = 0.99) -> None:
        self.bins, self.prior, self.decay = bins, prior, decay
        self.mid = (np.arange(bins) + 0.5) / bins  # [bins] float64
        self.verified = np.zeros(bins)  # [bins] float64, decayed counts
        self.accepted = np.zeros(bins)  # [bins] float64

    def _bin(self, scores: np.ndarray) -> np.ndarray:  # [n] float32 -> [n] int64
        return np.clip((np.asarray(scores, np.float64) * self.bins).astype(np.int64), 0, self.bins - 1)

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated acceptance probabilities, [n] float32 -> [n] float64."""
        rate = (self.accepted + self.prior * self.mid) / (self.verified + self.prior)  # [bins]
        return rate[self._bin(scores)]

    def update(self, scores: np.ndarray, accepted_nodes: list[int]) -> None:
        """One step: scores [n] of the verified nodes, the accepted ones' indices."""
        self.verified *= self.decay
        self.accepted *= self.decay
        bins = self._bin(scores)
        np.add.at(self.verified, bins, 1.0)
        np.add.at(self.accepted, bins[accepted_nodes], 1.0)


@torch.inference_mode()
def _timed_forward(model: torch.nn.Module, inputs: TreeInputs, cache, device: torch.device) -> int:
    """ns of one tree forward; the cache is cut back to its length before the call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter_ns()
    model(inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
          past_key_values=cache, use_cache=True)
    sync()
    elapsed = time.perf_counter_ns() - t0
    truncate(cache, inputs.cache_len)
    return elapsed


@dataclass
class _Sequence:
    """Mutable state of one generation: the cache holds cache_len entries; root is not in it yet."""

    cache: object
    cache_len: int
    root: int
    emitted: int = 0
    uniforms: UniformStream | None = field(default=None)


class Engine:
    """Generates with one model; not thread-safe (one generation at a time)."""

    def __init__(self, loaded: "LoadedModel", cost_model: CostModel | None = None, max_nodes: int = 64,
                 calibrate: bool = True) -> None:
        """cost_model None: measured now on the model's device (a few seconds on a CPU).
        calibrate: weigh draft scores by the acceptance rates observed so far (`ScoreCalibration`)."""
        self.loaded = loaded
        self.max_nodes = max_nodes
        self.calibration = ScoreCalibration() if calibrate else None
        self.cost_model = cost_model if cost_model is not None else CostModel.measure(loaded, max_tokens=1 + max_nodes)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
                 drafter: DraftSource | None = None, stop_token_ids: Sequence[int] | None = None
                 ) -> Iterator[StepResult]:
        """Steps until max_new_tokens tokens, a stop token (emitted, then the end), or the position limit."""
        prompt = self._check(prompt_ids, max_new_tokens)
        stops = set(self.loaded.eos_token_ids if stop_token_ids is None else stop_token_ids)
        if max_new_tokens == 0:
            return
        seq = self.prefill(prompt)
        seq.uniforms = None if sampling.greedy else UniformStream(sampling.seed)
        unreported: list[int] = []  # emitted tokens the drafter has not been told of yet
        if drafter is not None:
            drafter.start(list(prompt))
        try:
            while seq.emitted < max_new_tokens and seq.cache_len < self.loaded.max_positions:
                left = max_new_tokens - seq.emitted
                max_depth = min(left, self.loaded.max_positions - seq.cache_len) - 1  # deepest node worth verifying
                t0 = time.perf_counter_ns()
                draft = self._draft(drafter, unreported, max_depth)
                t1 = time.perf_counter_ns()
                tree = self._verified_prefix(draft, max_depth)
                inputs = build_tree_inputs(seq.root, tree, seq.cache_len, self.loaded.dtype, self.loaded.device)
                logits = self.forward(seq, inputs)  # [1+n, V]
                acceptance = self.accept(logits, inputs, tree, sampling, seq)
                self.commit(seq, acceptance)
                if self.calibration is not None:
                    self.calibration.update(tree.scores, acceptance.nodes.tolist())
                tokens = _cut(acceptance.tokens.tolist(), left, stops)
                t2 = time.perf_counter_ns()
                accepted = acceptance.nodes.tolist()[:len(tokens)]
                yield StepResult(tokens, len(tree), len(accepted), tuple(int(s) for s in tree.sources[accepted]),
                                 t1 - t0, t2 - t1, len(draft) if draft is not None else 0)
                if len(tokens) < len(acceptance.tokens) or tokens[-1] in stops:
                    return
                unreported.extend(tokens)
        finally:
            if drafter is not None:
                drafter.end()

    def _check(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt_ids must hold at least one token, got none")
        bad = [t for t in prompt if not 0 <= t < self.loaded.vocab_size]
        if bad:
            raise ValueError(f"prompt_ids must be in [0, {self.loaded.vocab_size}), got {bad[0]}")
        if len(prompt) > self.loaded.max_positions:
            raise ValueError(f"prompt must be at most {self.loaded.max_positions} tokens, got {len(prompt)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        return prompt

    def _draft(self, drafter: DraftSource | None, unreported: list[int], max_depth: int) -> Draft | None:
        """The drafter's tree (told of, and clearing, `unreported`), or None; a failure costs only the draft."""
        if drafter is None or max_depth < 1:
            return None
        new_tokens = unreported.copy()
        unreported.clear()
        try:
            return drafter.draft(new_tokens, self.max_nodes)
        except Exception:  # noqa: BLE001 - drafting is an optimization: never fail the generation
            log.warning("draft source failed; decoding this step without a draft", exc_info=True)
            return None

    def _verified_prefix(self, draft: Draft | None, max_depth: int) -> Draft:
        """The nodes worth verifying: valid, at most max_depth deep, the best prefix under the cost model."""
        if draft is None or len(draft) == 0 or max_depth < 1:
            return Draft.empty()
        draft = prune(draft, self.loaded.vocab_size, max_depth)
        draft = prefix_by_score(draft, self.max_nodes)
        scores = self.calibration(draft.scores) if self.calibration is not None else draft.scores
        return prefix_by_score(draft, self.cost_model.best_prefix(scores))

    @torch.inference_mode()
    def prefill(self, prompt: list[int]) -> _Sequence:
        """A sequence whose cache holds prompt[:-1]; prompt[-1] is the first root."""
        cache = new_cache(self.loaded.model)
        if len(prompt) > 1:
            ids = torch.tensor([prompt[:-1]], dtype=torch.int64, device=self.loaded.device)  # [1, L-1]
            self.loaded.model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return _Sequence(cache, len(prompt) - 1, prompt[-1])

    @torch.inference_mode()
    def forward(self, seq: _Sequence, inputs: TreeInputs) -> torch.Tensor:
        """Logits [1+n, V] of the tree; the cache grows by 1 + n entries."""
        out = self.loaded.model(inputs.input_ids, attention_mask=inputs.attention_mask,
                                position_ids=inputs.position_ids, past_key_values=seq.cache, use_cache=True)
        return out.logits[0]

    @staticmethod
    def accept(logits: torch.Tensor, inputs: TreeInputs, tree: Draft, sampling: SamplingParams,
               seq: _Sequence) -> Acceptance:
        if sampling.greedy:
            return accept_greedy(logits, inputs)
        uniforms = seq.uniforms.take(seq.emitted, int(inputs.depth.max()) + 1)  # [max depth + 1] float64
        rule = accept_typical if sampling.typical else accept_sampling
        return rule(logits, tree, sampling, uniforms)

    @staticmethod
    @torch.inference_mode()
    def commit(seq: _Sequence, acceptance: Acceptance) -> None:
        """Cache := prefix + root + accepted nodes; the bonus token becomes the next root."""
        commit(seq.cache, seq.cache_len, acceptance.nodes.tolist())
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


class LocalDraftSource:
    """A DraftSource over an in-process `retriever.drafter.Drafter` (one session per generation)."""

    def __init__(self, drafter: "Drafter", tenant: str = "local", session_id: str = "local") -> None:
        self.drafter, self.tenant, self.session_id = drafter, tenant, session_id
        self._prompt: np.ndarray | None = None

    def start(self, prompt_ids: list[int]) -> None:
        self._prompt = np.asarray(prompt_ids, np.int32)

    def draft(self, new_tokens: list[int], max_nodes: int) -> Draft | None:
        prompt, self._prompt = self._prompt, None  # the first call (re)starts the session
        tree = self.drafter.draft(self.tenant, self.session_id, prompt, np.asarray(new_tokens, np.int32),
                                  max_nodes).tree
        return Draft(tree.token_ids, tree.parents, tree.scores, tree.sources) if len(tree) else None

    def end(self) -> None:
        if self._prompt is None:
            self.drafter.end_session(self.tenant, self.session_id)
