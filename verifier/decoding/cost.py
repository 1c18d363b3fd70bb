"""The step policy's two models: what a forward costs, and how often a scored node is accepted.

- `CostModel`: step time by input size (root + nodes) on the model's device, measured once
  (`CostModel.measure`, kept on disk by `verifier.decoding.cost_store`) and refined from the steps
  that run (`observe`); `best_prefix(scores)` is the number of best-first nodes maximizing expected
  tokens per second.
- `ScoreCalibration`: drafter scores -> the acceptance rates this model shows, learned from the
  verified steps.
- `consistent`: calibrated path probabilities made those of disjoint events again (siblings sum
  to at most their parent's).
- `GenerationTrust`: how the current generation's drafts fare against that calibration (a
  workload the engine-wide rates flatter gets short prefixes until its drafts are accepted).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable

    from verifier.decoding.backend import Backend


class CostModel:
    """Step time (ns) by number of input tokens (root + draft nodes): `scale` x a piecewise-linear
    curve through points (the shape), extended past the end with its slope over the last half (`_curve`).

    The shape need not rise everywhere: llama.cpp's CPU matmuls tile the batch, so a forward that
    fills whole tiles can cost less than one of a token fewer (measured on Qwen2.5-Coder Q4_K_M, 2
    cores: 31 tokens 998 ms, 32 tokens 730 ms), and `best_prefix` then verifies the larger prefix.
    `observe(t, ns)` refines both from a step that ran: ns is first clipped to [1/2, 2] x at(t)
    (one stall moves little); `scale` moves `weight` of the way toward scale x ns / at(t) (the
    device got slower or faster at every size: another process, a warmer cache), then the shape's
    point at t (added if new) moves weight / 2 of the way toward ns / scale. Last, every point's
    ratio to the 1-token point is kept within [2/3, 3/2] x the baseline's (the measured curve): a
    busy spell can move the curve's level without bound (the scale), its shape only so far, so
    steps timed while another process ran never make drafting look worthless for good. Not
    thread-safe (one engine).

    Example: tokens (1, 2, 4), cost_ns (10, 10, 14) -> at(3) = 12; best_prefix([0.9, 0.5, 0.1])
    compares (1 + 0) / 10, (1 + 0.9) / 10, (1 + 1.4) / 12, (1 + 1.5) / 14 -> 2 nodes.
    observe(2, 20) with weight 0.5 -> scale 1.5, point 2 -> 10 + 0.25 * (20 / 1.5 - 10) = 10.83,
    point 4 stays 14: at(2) = 16.25, at(4) = 21. With cost_ns (10, 30, 20) instead, 3 tokens cost
    25 and 4 cost 20: best_prefix([0.9, 0.5, 0.1]) -> 3 nodes ((1 + 1.5) / 20).
    """

    def __init__(self, tokens: tuple[int, ...], cost_ns: tuple[float, ...], weight: float = 0.1,
                 scale: float = 1.0, baseline: "tuple[tuple[int, ...], tuple[float, ...]] | None" = None) -> None:
        """tokens: increasing sizes, the first 1; cost_ns: one per size; baseline: the measured
        (tokens, cost_ns) that bound the shape (None: this curve); raises ValueError otherwise."""
        for xs, ys in ((tokens, cost_ns),) + ((baseline,) if baseline is not None else ()):
            if not xs or xs[0] != 1 or len(xs) != len(ys) or any(b <= a for a, b in zip(xs, xs[1:])):
                raise ValueError(f"cost model tokens must be increasing from 1 with one cost each, got {xs} "
                                 f"and {len(ys)} costs")
        self.tokens: tuple[int, ...] = tuple(int(t) for t in tokens)
        self.cost_ns: tuple[float, ...] = tuple(float(c) for c in cost_ns)
        bx, by = baseline if baseline is not None else (self.tokens, self.cost_ns)
        self.baseline: tuple[tuple[int, ...], tuple[float, ...]] = (tuple(int(t) for t in bx), tuple(float(c) for c in by))
        self.weight, self.scale = weight, scale
        self.observed = 0  # observations since construction

    def at(self, num_tokens: np.ndarray | int) -> np.ndarray:
        """Interpolated cost in ns (scale x the shape); linear extrapolation past the last point."""
        return self.scale * _curve(num_tokens, self.tokens, self.cost_ns)

    def rates(self, scores: np.ndarray, overhead_ns: float = 0.0) -> np.ndarray:
        """[n+1] float64 expected tokens per ns of verifying the first k nodes, k = 0..n (scores [n]
        best-first acceptance probabilities), each step costing `overhead_ns` more."""
        expected = 1.0 + np.concatenate([[0.0], np.cumsum(np.clip(scores, 0.0, 1.0), dtype=np.float64)])  # [n+1]
        return expected / (self.at(np.arange(1, len(scores) + 2)) + overhead_ns)

    def best_prefix(self, scores: np.ndarray) -> int:
        """k maximizing (1 + sum of the first k scores) / cost(1 + k); scores [n] float32 best-first."""
        return int(np.argmax(self.rates(scores)))

    def observe(self, num_tokens: int, ns: float) -> None:
        """One step of num_tokens input tokens took ns (see the class doc)."""
        self.observed += 1
        if self.weight == 0.0:
            return
        current = float(self.at(num_tokens))
        shape = current / self.scale  # the shape at num_tokens (interpolated or extrapolated)
        ns = min(max(float(ns), 0.5 * current), 2.0 * current)
        self.scale *= 1.0 + self.weight * (ns / current - 1.0)
        target = shape + 0.5 * self.weight * (ns / self.scale - shape)
        tokens, costs = list(self.tokens), list(self.cost_ns)
        j = int(np.searchsorted(tokens, num_tokens))
        if j == len(tokens) or tokens[j] != num_tokens:
            tokens.insert(j, int(num_tokens))
            costs.insert(j, shape)
        costs[j] = target
        self.tokens, self.cost_ns = tuple(tokens), tuple(self._bounded(tokens, costs))

    def _bounded(self, tokens: list[int], costs: list[float]) -> list[float]:
        """costs with each point's ratio to the first within [2/3, 3/2] x the baseline's at its size."""
        ratio = _curve(tokens, *self.baseline) / self.baseline[1][0]  # [points]
        return np.clip(np.asarray(costs), costs[0] * ratio * 2 / 3, costs[0] * ratio * 1.5).tolist()

    @staticmethod
    def flat(max_tokens: int = 1024, step_ns: float = 1e9) -> "CostModel":
        """Every size costs step_ns, never refined (weight 0): verify the whole draft, and a
        drafting round trip is negligible next to a step (tests, or a GPU far from saturation)."""
        return CostModel((1, max_tokens), (step_ns, step_ns), weight=0.0)

    @staticmethod
    def measure(backend: "Backend", max_tokens: int = 257, cache_len: int = 256, reps: int = 3,
                stop_ratio: float = 24.0) -> "CostModel":
        """Times chain forwards over a random cache of cache_len entries, of 1, 2, 4, ... tokens
        (the least of `reps` after a warm-up; more tokens never cost less).

        Stops past max_tokens or once a size costs stop_ratio times a single token (the rest is
        extrapolated linearly: no tree is worth that much on such a device). A backend that pads
        its forwards to fixed sizes (a `sizes` attribute, e.g. (1, 9, 17, 33, 65)) is timed at
        those sizes instead, and the curve is a staircase: every size up to a padded size costs
        what that padded size costs. A backend whose kernels tile the batch (`tiled` true:
        llama.cpp on a CPU) is timed at every size, in two passes (up, then down: drift cancels),
        the least of the two kept as it is: a size filling whole tiles may cost less than a smaller one.
        """
        time_chain = backend.timer(max(1, min(cache_len, backend.max_positions - 2 * max_tokens)))
        if getattr(backend, "tiled", False):
            return _measure_every_size(time_chain, max_tokens, stop_ratio)
        padded = tuple(getattr(backend, "sizes", ()))
        sizes, costs, t = [], [], 1
        while True:
            samples = [time_chain(t) for _ in range(reps + 1)]  # the first warms up
            sizes.append(t)
            costs.append(max(float(min(samples[1:])), costs[-1] if costs else 0.0))  # more tokens never cost less
            if t >= max_tokens or costs[-1] > stop_ratio * costs[0]:
                return CostModel(*_staircase(sizes, costs)) if padded else CostModel(tuple(sizes), tuple(costs))
            t = next((s for s in padded if s > t), max_tokens) if padded else 2 * t
            t = min(t, max_tokens)


def _measure_every_size(time_chain: "Callable[[int], int]", max_tokens: int, stop_ratio: float) -> CostModel:
    """`CostModel.measure` of a tiled backend: sizes 1, 2, 3, ... up to max_tokens or the first
    costing stop_ratio x one token, timed going up, then again going down; the least of the two."""
    time_chain(1)  # warm-up
    costs: list[float] = []
    while len(costs) < max_tokens and (len(costs) < 2 or costs[-1] <= stop_ratio * costs[0]):
        costs.append(float(time_chain(len(costs) + 1)))
    for t in range(len(costs), 0, -1):
        costs[t - 1] = min(costs[t - 1], float(time_chain(t)))
    return CostModel(tuple(range(1, len(costs) + 1)), tuple(costs))


def _curve(num_tokens: "np.ndarray | int | list[int]", tokens: tuple[int, ...], cost_ns: tuple[float, ...]
           ) -> np.ndarray:
    """The piecewise-linear curve through (tokens, cost_ns) at num_tokens, extended past the last
    point with the slope from the last point at or below half its size (through powers of two:
    the last slope; through every size: not the rise or fall of one tile), never falling."""
    x, y = np.asarray(tokens, np.float64), np.asarray(cost_ns, np.float64)
    n = np.asarray(num_tokens, np.float64)
    k = max(int(np.searchsorted(x, x[-1] / 2, side="right")) - 1, 0)  # the last point at or below half the last size
    slope = (y[-1] - y[k]) / (x[-1] - x[k]) if len(x) > 1 else 0.0
    return np.where(n <= x[-1], np.interp(n, x, y), y[-1] + max(slope, 0.0) * (n - x[-1]))


def _staircase(sizes: list[int], costs: list[float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Points of a step-shaped curve: sizes (1, 9, 17) costing (a, b, c) -> (1, 2, 9, 10, 17)
    costing (a, b, b, c, c): a forward of 2..9 tokens runs as 9."""
    tokens, out = [1], [costs[0]]
    for prev, size, cost in zip(sizes, sizes[1:], costs[1:]):
        tokens += [prev + 1] + ([size] if size > prev + 1 else [])
        out += [cost] + ([cost] if size > prev + 1 else [])
    return tuple(tokens), tuple(out)


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


def consistent(probs: np.ndarray, parents: np.ndarray) -> np.ndarray:
    """[n] float64 path probabilities, [n] int32 parents (-1: the root; parents precede children)
    -> [n] float64 where the children of each node (the root: 1) sum to at most its probability.

    At most one child of a node is accepted (one token follows it), so the drafter's scores obey
    this; a calibration that maps each score alone (siblings 0.45 and 0.45 to 0.8 each) does not,
    and a wide tree would look worth more tokens than its depth. Each node is scaled by
    min(1, p'_parent / sum of its raw siblings), parents first.

    Example: parents [-1, -1, 0], probs [0.8, 0.8, 0.9] -> [0.5, 0.5, 0.5].
    """
    p, par = probs.tolist(), parents.tolist()
    sums = [0.0] * (len(p) + 1)  # [n+1] raw children sums, slot 0: the root's
    for i, j in enumerate(par):
        sums[j + 1] += p[i]
    out = [0.0] * len(p)
    for i, j in enumerate(par):
        cap = 1.0 if j < 0 else out[j]
        out[i] = p[i] * min(1.0, cap / sums[j + 1]) if sums[j + 1] > 0 else 0.0
    return np.asarray(out, np.float64)


class GenerationTrust:
    """How one generation's drafts fare against the calibrated probabilities: a factor t in (0, 1].

    A verified node is tested when its parent is the root or was accepted; its calibrated
    conditional probability is p_node / p_parent (p_root = 1). t = (accepted + prior) /
    (expected + prior), at most 1, over the tested nodes of this generation (expected: the sum
    of their conditional probabilities), the evidence decaying by `decay` per step, so t drifts
    back to 1 while nothing is verified. A node at depth d is trusted as p x t^d (its path holds
    d conditional steps): where the engine-wide calibration, learned on other workloads, would
    verify whole trees that this generation rejects, the policy verifies short prefixes (cheap
    probes) until they are accepted again. Counting only tested nodes, a rejected 15-node chain
    is one piece of evidence (its first node), not 15.

    Example: prior 2; a chain whose first node (p 0.9) is rejected: expected 0.9, accepted 0 ->
    t = 2 / 2.9 = 0.69, and p (0.9, 0.85, 0.8) at depths (1, 2, 3) -> (0.62, 0.40, 0.26). Sixteen
    steps later (decay 0.95, about the longest back-off, so misses across back-offs add up):
    expected 0.40, t = 0.83.
    """

    def __init__(self, prior: float = 2.0, decay: float = 0.95) -> None:
        self.prior, self.decay = prior, decay
        self.expected = 0.0  # decayed sum of the tested nodes' conditional probabilities
        self.accepted = 0.0  # decayed count of the accepted nodes

    def reset(self) -> None:
        """A new generation: no evidence, t = 1."""
        self.expected = self.accepted = 0.0

    @property
    def factor(self) -> float:
        return min(1.0, (self.accepted + self.prior) / (self.expected + self.prior))

    def __call__(self, probs: np.ndarray, depths: np.ndarray) -> np.ndarray:
        """[n] float64 probabilities, [n] int32 depths -> [n] float64 trusted probabilities."""
        return probs * self.factor ** depths.astype(np.float64)

    def update(self, probs: np.ndarray, parents: np.ndarray, accepted_nodes: list[int]) -> None:
        """One step: probs [n] float64 calibrated (untrusted) probabilities of the verified nodes,
        parents [n] int32 (-1: the root), the accepted nodes' indices (none for a plain step)."""
        self.expected *= self.decay
        self.accepted *= self.decay
        if len(probs) == 0:
            return
        accepted = np.zeros(len(probs) + 1, bool)  # [n+1], slot n: the root
        accepted[-1] = True
        accepted[accepted_nodes] = True
        tested = accepted[parents]  # [n] bool (parents -1 -> the root's slot)
        parent_p = np.where(parents >= 0, probs[np.maximum(parents, 0)], 1.0)  # [n] float64
        conditional = np.clip(probs / np.maximum(parent_p, 1e-9), 0.0, 1.0)  # [n] float64
        self.expected += float(conditional[tested].sum())
        self.accepted += float(len(accepted_nodes))
