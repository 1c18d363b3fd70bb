"""The step policy's models and the KV commit against slow references on random inputs:
`CostModel.at` / `best_prefix`, `ScoreCalibration`, `verifier.decoding.cache.commit`."""

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from verifier.decoding.cache import commit, kv_tensors
from verifier.decoding.cost import CostModel, ScoreCalibration


def ref_at(tokens: list[int], costs: list[float], n: float) -> float:
    """Piecewise-linear cost through the measured points, extended with the slope from the last
    point at or below half the last size (never falling)."""
    if n <= tokens[-1]:
        for (x0, y0), (x1, y1) in zip(zip(tokens, costs), zip(tokens[1:], costs[1:])):
            if x0 <= n <= x1:
                return y0 + (y1 - y0) * (n - x0) / (x1 - x0)
        return costs[0]
    k = max([i for i, x in enumerate(tokens) if x <= tokens[-1] / 2], default=0)
    slope = (costs[-1] - costs[k]) / (tokens[-1] - tokens[k]) if len(tokens) > 1 else 0.0
    return costs[-1] + max(slope, 0.0) * (n - tokens[-1])


def ref_best_prefix(tokens: list[int], costs: list[float], scores: list[float]) -> int:
    best, best_rate = 0, -1.0
    for k in range(len(scores) + 1):
        rate = (1 + sum(min(max(s, 0.0), 1.0) for s in scores[:k])) / ref_at(tokens, costs, 1 + k)
        if rate > best_rate * (1 + 1e-12):
            best, best_rate = k, rate
    return best


@pytest.mark.parametrize("seed", range(20))
def test_best_prefix_matches_a_slow_reference(seed):
    rng = np.random.default_rng(seed)
    sizes = [1] + sorted(set(rng.integers(2, 80, int(rng.integers(1, 6))).tolist()))
    costs = np.cumsum(rng.uniform(0.0, 5.0, len(sizes))) + 10.0  # non-decreasing
    cm = CostModel(tuple(sizes), tuple(costs.tolist()))
    scores = np.sort(rng.uniform(-0.1, 1.1, int(rng.integers(0, 90))).astype(np.float32))[::-1]
    for n in (1, 2.5, sizes[-1], sizes[-1] + 7):
        assert float(cm.at(n)) == pytest.approx(ref_at(sizes, costs.tolist(), n))
    assert cm.best_prefix(scores) == ref_best_prefix(sizes, costs.tolist(), scores.tolist())


@pytest.mark.parametrize("seed", range(10))
def test_score_calibration_matches_a_slow_reference(seed):
    rng = np.random.default_rng(seed)
    bins, prior, decay = int(rng.integers(2, 12)), float(rng.uniform(0.5, 10)), float(rng.uniform(0.8, 1.0))
    cal = ScoreCalibration(bins, prior, decay)
    verified, accepted = [0.0] * bins, [0.0] * bins

    def bin_of(s: float) -> int:
        return min(max(int(float(s) * bins), 0), bins - 1)
    for _ in range(30):
        scores = rng.uniform(-0.2, 1.2, int(rng.integers(0, 20))).astype(np.float32)
        hit = sorted(rng.choice(len(scores), int(rng.integers(0, len(scores) + 1)), replace=False).tolist()) \
            if len(scores) else []
        cal.update(scores, hit)
        verified = [v * decay for v in verified]
        accepted = [a * decay for a in accepted]
        for i, s in enumerate(scores):
            verified[bin_of(s)] += 1
            accepted[bin_of(s)] += i in hit
        probe = rng.uniform(0, 1, 16).astype(np.float32)
        want = [(accepted[bin_of(s)] + prior * (bin_of(s) + 0.5) / bins) / (verified[bin_of(s)] + prior)
                for s in probe]
        assert cal(probe) == pytest.approx(want)


@pytest.mark.parametrize("seed", range(10))
def test_commit_matches_a_slow_reference(seed):
    """Random caches, random accepted paths (increasing node indexes): the cache keeps prefix + root,
    then exactly the accepted nodes' entries in path order, in every layer, keys and values."""
    rng = np.random.default_rng(seed)
    layers, cache_len, n = int(rng.integers(1, 4)), int(rng.integers(0, 9)), int(rng.integers(0, 12))
    entries = [torch.randn(1, 2, cache_len + 1 + n, 3, dtype=torch.float64) for _ in range(2 * layers)]
    cache = DynamicCache()
    for i in range(layers):
        cache.update(entries[2 * i].clone(), entries[2 * i + 1].clone(), i)
    accepted = sorted(rng.choice(n, int(rng.integers(0, n + 1)), replace=False).tolist()) if n else []
    commit(cache, cache_len, accepted)
    keep = list(range(cache_len + 1)) + [cache_len + 1 + a for a in accepted]
    for i, (k, v) in enumerate(kv_tensors(cache)):
        assert torch.equal(k, torch.stack([entries[2 * i][:, :, j] for j in keep], dim=2))
        assert torch.equal(v, torch.stack([entries[2 * i + 1][:, :, j] for j in keep], dim=2))


def ref_observe(points: dict[int, float], scale: float, weight: float, t: int, ns: float,
                bx: list[int], by: list[float]) -> tuple[dict[int, float], float]:
    """CostModel.observe written out: ns clipped to [1/2, 2] x the curve at t; the scale moves
    weight of the way toward scale x ns / curve(t); the shape's point at t moves weight / 2 toward
    ns / new scale (the others stay: a curve may fall); then every point's ratio to the 1-token
    point within [2/3, 3/2] x the baseline's (bx, by)."""
    xs, ys = list(points), list(points.values())
    shape = ref_at(xs, ys, t)
    current = scale * shape
    ns = min(max(ns, 0.5 * current), 2.0 * current)
    scale = scale * (1 + weight * (ns / current - 1))
    target = shape + weight / 2 * (ns / scale - shape)
    out = dict(points)
    out[t] = target
    out = dict(sorted(out.items()))
    first = out[1]
    return {x: min(max(c, first * ref_at(bx, by, x) / by[0] * 2 / 3), first * ref_at(bx, by, x) / by[0] * 1.5)
            for x, c in out.items()}, scale


@pytest.mark.parametrize("seed", range(20))
def test_observe_matches_a_slow_reference(seed):
    rng = np.random.default_rng(seed)
    sizes = [1] + sorted(set(rng.integers(2, 40, int(rng.integers(0, 5))).tolist()))
    costs = (np.cumsum(rng.uniform(-2.0, 5.0, len(sizes))) + 10.0).tolist()  # falling here and there (tiles)
    weight = float(rng.uniform(0.05, 1.0))
    cm = CostModel(tuple(sizes), tuple(costs), weight=weight)
    points, scale = dict(zip(sizes, costs)), 1.0
    for _ in range(30):
        t, ns = int(rng.integers(1, 60)), float(rng.uniform(0.0, 60.0))
        points, scale = ref_observe(points, scale, weight, t, ns, sizes, costs)
        cm.observe(t, ns)
        assert cm.tokens == tuple(points) and cm.scale == pytest.approx(scale)
        assert cm.cost_ns == pytest.approx(list(points.values()))
    assert cm.observed == 30


def test_a_falling_curve_is_kept_and_the_larger_cheaper_prefix_verified():
    """The class doc's example: 4 tokens cost less than 3 (a whole tile), so 3 nodes beat 2."""
    cm = CostModel((1, 2, 4), (10.0, 30.0, 20.0))
    assert cm.cost_ns == (10.0, 30.0, 20.0) and float(cm.at(3)) == pytest.approx(25.0)
    assert cm.best_prefix(np.array([0.9, 0.5, 0.1], np.float32)) == 3
    assert cm.best_prefix(np.array([0.9, 0.5], np.float32)) == 0  # no third node: 2.4 / 25 < 1 / 10
    dense = CostModel(tuple(range(1, 9)), (10.0, 12.0, 14.0, 12.0, 16.0, 18.0, 20.0, 16.0))
    assert float(dense.at(10)) == pytest.approx(16.0 + 2 * (16.0 - 12.0) / 4)  # the slope over the last half, 4..8


def _tiled_timer(falls_at: int, noise: list[float]):
    """Pure stand-in for a tiled backend's `timer`: t tokens cost 100 + 10 t ns, but a multiple of
    `falls_at` costs 10 t; each call multiplies by the next noise factor (the first call is the warm-up)."""
    calls = []

    def time_chain(t: int) -> int:
        calls.append(t)
        return int((10 * t if t % falls_at == 0 else 100 + 10 * t) * noise[len(calls) - 1])
    return time_chain, calls


def test_a_tiled_backend_is_timed_at_every_size_up_then_down_keeping_the_least():
    from verifier.decoding.cost import _measure_every_size

    time_chain, calls = _tiled_timer(4, [9.0] + [1.5] * 6 + [1.0] * 6)  # the first pass ran slow
    cm = _measure_every_size(time_chain, 6, stop_ratio=100.0)
    assert calls == [1, 1, 2, 3, 4, 5, 6, 6, 5, 4, 3, 2, 1]
    assert cm.tokens == (1, 2, 3, 4, 5, 6) and cm.cost_ns == (110.0, 120.0, 130.0, 40.0, 150.0, 160.0)
    assert cm.best_prefix(np.full(5, 0.9, np.float32)) == 3  # 4 tokens: a whole tile
    time_chain, calls = _tiled_timer(4, [1.0] * 20)
    stopped = _measure_every_size(time_chain, 64, stop_ratio=1.15)  # 3 tokens cost 130 > 1.15 x 110: stop there
    assert stopped.tokens == (1, 2, 3) and calls == [1, 1, 2, 3, 3, 2, 1]


def test_observe_converges_to_the_steps_that_run_and_flat_never_moves():
    cm = CostModel((1, 8), (10.0, 20.0), weight=0.2)
    for _ in range(300):
        cm.observe(4, 40.0)  # the device got slower (at the size it runs): the curve follows
    assert float(cm.at(4)) == pytest.approx(40.0, rel=1e-3)
    assert float(cm.at(8)) >= float(cm.at(4)) and float(cm.at(1)) < float(cm.at(4))
    flat = CostModel.flat(64)
    flat.observe(5, 1.0)
    assert flat.tokens == (1, 64) and flat.cost_ns == (1e9, 1e9) and flat.observed == 1


def test_a_busy_spell_moves_the_level_but_bounds_the_shape():
    cm = CostModel((1, 2, 8), (10.0, 16.0, 40.0), weight=0.2)
    for _ in range(300):
        cm.observe(2, 80.0)  # 2-token steps timed while another process ran (5x the measured)
    ratio = float(cm.at(2)) / float(cm.at(1))
    assert ratio == pytest.approx(1.6 * 1.5)  # the shape stops at 3/2 x the measured ratio
    assert float(cm.at(2)) == pytest.approx(80.0, rel=1e-3)  # the level (scale) follows
    for _ in range(300):
        cm.observe(8, 1.0)  # and far too fast: at most 2/3 x the measured ratio
    assert float(cm.at(8)) / float(cm.at(1)) == pytest.approx(4.0 * 2 / 3)
    assert cm.baseline == ((1, 2, 8), (10.0, 16.0, 40.0))


def test_a_baseline_is_checked_like_the_curve():
    with pytest.raises(ValueError, match="increasing from 1"):
        CostModel((1, 2), (1.0, 2.0), baseline=((2, 3), (1.0, 2.0)))


@pytest.mark.parametrize("tokens, costs", [((), ()), ((2, 4), (1.0, 2.0)), ((1, 1), (1.0, 1.0)), ((1, 2), (1.0,))])
def test_a_malformed_curve_is_refused(tokens, costs):
    with pytest.raises(ValueError, match="increasing from 1"):
        CostModel(tokens, costs)


def test_staircase_points_of_padded_sizes():
    from verifier.decoding.cost import _staircase

    assert _staircase([1, 9, 17], [1.0, 2.0, 3.0]) == ((1, 2, 9, 10, 17), (1.0, 2.0, 2.0, 3.0, 3.0))
    assert _staircase([1, 2, 4], [1.0, 2.0, 3.0]) == ((1, 2, 3, 4), (1.0, 2.0, 3.0, 3.0))
    cm = CostModel(*_staircase([1, 9, 17], [1.0, 2.0, 3.0]))
    assert [float(cm.at(n)) for n in (1, 2, 5, 9, 10, 17)] == [1.0, 2.0, 2.0, 2.0, 3.0, 3.0]
