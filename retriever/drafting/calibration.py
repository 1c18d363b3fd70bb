"""Online calibration of draft scores from acceptance feedback (pure: numpy + the core).

The calibrated tree builder (`_core.draft_calibrated`) scores a node as the probability that
its path is accepted: per source, the product along the path of P(node | parent accepted),
read from a table of `CALIB_CELLS` cells indexed by (e, share, support) (see core.h), fused
over sources by noisy-OR. This module learns that table per tenant, one row per source slot,
as Beta posteriors: each cell starts at a prior mean taken from the heuristic weights
(`SourceWeights`: share * reliability * e / (e + half_match)) worth `prior_strength`
observations; every later draft call reports which tested nodes were accepted
(`_core.tested_outcomes`), each an observation of its cell, and a cell's evidence decays
by `decay` per observation of that cell (an exponential window over its own history).

Example:
    >>> cal = Calibration(np.full((1, CALIB_CELLS), 0.5, np.float32), CalibrationParams(4.0, 1.0))
    >>> tokens, parents, cells = (np.array(x, np.int32) for x in ([5, 6], [-1, 0], [7, 7]))
    >>> cal.observe(tokens, parents, cells, np.array([5, 6, 9], np.int32))  # both accepted
    >>> round(float(cal.table()[0, 7]), 3)  # (2 + 4 * 0.5) / (2 + 4)
    0.667
"""

from __future__ import annotations

import numpy as np

from retriever import _core
from retriever.drafting.types import CalibrationParams

CALIB_CELLS: int = _core.CALIB_CELLS
_MIN_PROB, _MAX_PROB = 1e-4, 0.999


def _cell_edges() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower edges of every cell: e int32[C], share float32[C], support int32[C]."""
    edges = [_core.calib_cell_edges(c) for c in range(CALIB_CELLS)]
    e, share, support = (np.array(x) for x in zip(*edges))
    return e.astype(np.int32), share.astype(np.float32), support.astype(np.int32)


_E_LO, _SHARE_LO, _SUPPORT_LO = _cell_edges()


def prior_row(reliability: float, half_match: float) -> np.ndarray:
    """float32[C]: the heuristic P(node | parent) of each cell, at its buckets' lower edges
    (share: the bin's middle; the top bin is share 1)."""
    share = np.where(_SHARE_LO >= 1.0, 1.0, _SHARE_LO + 0.125)
    q = share * reliability * _E_LO / (_E_LO + half_match)
    return np.clip(q, _MIN_PROB, _MAX_PROB).astype(np.float32)


class Calibration:
    """Beta evidence per (row, cell) over a prior table float32[rows, C]; not thread-safe."""

    def __init__(self, prior: np.ndarray, params: CalibrationParams) -> None:
        self._prior = np.ascontiguousarray(prior, np.float32)  # [rows, C]
        self._params = params
        self._hits = np.zeros(self._prior.size, np.float64)  # [rows * C] decayed accepted counts
        self._trials = np.zeros(self._prior.size, np.float64)  # [rows * C] decayed tested counts
        self._table = self._prior.copy()  # [rows, C] posterior means (no evidence: the prior)
        # The flat buffers a drafting step updates in place (`_core.session_draft`).
        self.buffers = (self._hits, self._trials, self._table.reshape(-1), self._prior.reshape(-1))

    @property
    def trials(self) -> float:
        return float(self._trials.sum())

    def table(self) -> np.ndarray:
        """float32[rows, C]: posterior mean P(node | parent accepted), clipped to (0, 1).
        Updated in place by `observe` (callers must not keep a stale copy)."""
        return self._table

    def observe(self, tokens: np.ndarray, parents: np.ndarray, cells: np.ndarray, new_tokens: np.ndarray) -> None:
        """One report on a draft (tokens, parents, flat cells row * C + cell: int32[n] each)
        followed by new_tokens (int32[k]): each tested node observes its cell."""
        _core.calib_observe(tokens, parents, cells, new_tokens, *self.buffers, self._params.prior_strength,
                            self._params.decay)
