"""The step policy: per step, whether to ask the drafter at all, and how much of its tree to verify.

Verifying the first k best-first nodes of a tree is worth (1 + the sum of their acceptance
probabilities) tokens for cost(1 + k) ns (`CostModel`, refined from every step that runs); the
probabilities are the drafter's scores weighed by what this verifier observed for such scores
(`ScoreCalibration`, engine-wide) and by how this generation's drafts fared against that
(`GenerationTrust`: a node at depth d is trusted as p x t^d). k = 0 is plain decoding. The round
trip of a draft (`draft_ns`, an average of the measured ones) is sunk once the tree is here, so
`choose` ignores it. A miss is a draft whose best prefix, with its round trip, would not beat
plain decoding by more than `tolerance` (predicted), or a verified tree whose emitted tokens
(accepted + the bonus) per second, with the round trip, fell short of plain decoding's
(realized: nothing accepted, or too little for what the forward cost: a loaded machine may price
trees above the curve); a tree that paid ends the run of misses, and so does a new generation
(`start`). After m misses in a row the next min(2^(m-1), max_skip) steps decode without asking
(then one step asks again). So where drafts do not pay, a step costs what plain decoding costs.

timed=False (comparisons that must not follow the machine's clock, e.g. `specdraft bench predicted`):
a step is priced by the cost model's prediction for its size, not its measured time: the curve is not
refined, the realized-miss rule judges the predicted cost, and the round trip is not measured (it
stays at `draft_ns`: 0 for a new policy). `snapshot` / `restore` copy and put back the whole state
(cost, calibration, round trip, misses), so several runs can start from the same one.

Example: cost (1: 10 ms, 2: 12 ms), round trip 1 ms, a draft of one node scored 0.1 ->
rates 1/10 (k=0) vs 1.1/12 (k=1): choose 0; with the round trip 1/11 < (1 - 0.02)/10: a miss,
the next step asks nothing.
"""

from __future__ import annotations

import copy

import numpy as np

from retriever.drafting.types import DraftTree
from verifier.decoding.cost import CostModel, GenerationTrust, ScoreCalibration, consistent


class StepPolicy:
    """One engine's policy (not thread-safe; the engine runs one generation at a time)."""

    def __init__(self, cost: CostModel, calibrate: bool = True, tolerance: float = 0.02, max_skip: int = 16,
                 draft_weight: float = 0.2, timed: bool = True) -> None:
        """calibrate: weigh scores by observed acceptance (False: take them as probabilities);
        timed: price steps by their measured times (False: by the cost model's prediction)."""
        self.cost, self.timed = cost, timed
        self.calibration = ScoreCalibration() if calibrate else None
        self.trust = GenerationTrust()
        self.tolerance, self.max_skip, self.draft_weight = tolerance, max_skip, draft_weight
        self.draft_ns = 0.0  # moving average of the drafting round trip
        self.misses = 0  # drafts in a row that did not pay
        self.skip = 0  # steps left to decode without asking for a draft
        self.skipped = 0  # steps decoded without asking, in all

    def snapshot(self) -> "StepPolicy":
        """A deep copy of the whole state, for `restore` (possibly several times)."""
        return copy.deepcopy(self)

    def restore(self, snapshot: "StepPolicy") -> None:
        """Puts back the state `snapshot` copied (the snapshot itself stays unchanged)."""
        self.__dict__.update(copy.deepcopy(snapshot).__dict__)

    def start(self) -> None:
        """A new generation: its drafts have not missed yet and are fully trusted (the cost and
        calibration carry over)."""
        self.misses = self.skip = 0
        self.trust.reset()

    def wants_draft(self) -> bool:
        """Whether this step asks the drafter (False while backing off after misses)."""
        if self.skip > 0:
            self.skip -= 1
            self.skipped += 1
            return False
        return True

    def calibrated(self, tree: DraftTree) -> np.ndarray:
        """[n] float64 engine-wide acceptance probabilities of the tree's nodes (siblings summing
        to at most their parent's: `consistent`)."""
        scores = tree.scores
        probs = self.calibration(scores) if self.calibration is not None else scores.astype(np.float64)
        return consistent(probs, tree.parents)

    def probabilities(self, tree: DraftTree) -> np.ndarray:
        """[n] float64 acceptance probabilities of the tree's nodes (calibrated, then trusted)."""
        return self.trust(self.calibrated(tree), tree.depths())

    def choose(self, tree: DraftTree) -> int:
        """How many best-first nodes of the tree to verify (0: none)."""
        return self.cost.best_prefix(self.probabilities(tree))

    def drafted(self, tree: DraftTree | None, draft_ns: int) -> None:
        """A draft call took draft_ns and gave this tree (None: no tree)."""
        if self.timed:
            self.draft_ns += self.draft_weight * (draft_ns - self.draft_ns) if self.draft_ns else draft_ns
        probs = self.probabilities(tree) if tree is not None else np.zeros(0)
        pays = float(np.max(self.cost.rates(probs, self.draft_ns))) * float(self.cost.at(1))
        if pays < 1.0 - self.tolerance:
            self._miss()

    def _miss(self) -> None:
        self.misses += 1
        self.skip = min(2 ** (self.misses - 1), self.max_skip)

    def stepped(self, num_tokens: int, step_ns: int, tree: DraftTree, accepted_nodes: list[int]) -> None:
        """A forward of num_tokens inputs (root + the verified tree's nodes) took step_ns with its
        acceptance and commit; `accepted_nodes` are the accepted node indexes. A verified tree
        whose tokens (accepted + the bonus) per ns, with the round trip, fell short of a plain
        step's by more than `tolerance` is a miss; one that paid ends the run of misses. Every
        step refines the cost (timed only), the calibration and the trust (their evidence decays
        while nothing is verified). Untimed: step_ns is ignored, the step costs what the curve
        predicts."""
        plain_ns = float(self.cost.at(1))  # a plain step, as predicted before this one refines it
        if self.timed:
            self.cost.observe(num_tokens, step_ns)
        else:
            step_ns = float(self.cost.at(num_tokens))
        if len(tree):
            paid = (1 + len(accepted_nodes)) * plain_ns / (step_ns + self.draft_ns)
            if not accepted_nodes or paid < 1.0 - self.tolerance:  # nothing accepted never pays
                self._miss()
            else:
                self.misses = 0
        self.trust.update(self.calibrated(tree), tree.parents, accepted_nodes)
        if self.calibration is not None:
            self.calibration.update(tree.scores, accepted_nodes)
