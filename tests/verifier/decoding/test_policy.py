"""`StepPolicy`: which prefix it verifies, when it stops asking for drafts and when it asks again;
checked against the expected-rate rule written out by hand."""

import numpy as np
import pytest

from retriever.drafting.types import DraftTree
from verifier.decoding.cost import CostModel
from verifier.decoding.policy import StepPolicy

MS = 1e6


def chain(*scores: float) -> DraftTree:
    """A chain of nodes scored `scores` (tokens 1, 2, ...)."""
    return DraftTree(np.arange(1, len(scores) + 1, dtype=np.int32), np.arange(-1, len(scores) - 1, dtype=np.int32),
                     np.asarray(scores, np.float32), np.zeros(len(scores), np.uint8))


NONE = DraftTree.empty()


def policy(**kw) -> StepPolicy:
    return StepPolicy(CostModel((1, 2, 4), (10 * MS, 12 * MS, 30 * MS)), calibrate=False, **kw)


def test_choose_is_the_best_expected_rate_and_ignores_the_sunk_round_trip():
    p = policy()
    p.drafted(chain(0.9), int(5 * MS))  # a slow round trip is already paid
    assert p.choose(chain(0.9, 0.8, 0.1)) == 1  # 1.9/12 > 1/10 > 2.7/(12 + 9)...
    assert p.choose(chain(0.1)) == 0  # 1.1/12 < 1/10: verify nothing
    assert p.choose(NONE) == 0


def test_drafts_that_do_not_pay_back_off_doubling_then_ask_again():
    p = policy(max_skip=4)
    asked = []
    for step in range(24):
        wants = p.wants_draft()
        asked.append(wants)
        if wants:
            p.drafted(chain(0.05), int(1 * MS))  # never worth its round trip
    # misses 1, 2, 3, 4, 5: skips 1, 2, 4, 4 (capped), 4
    assert asked[:12] == [True, False, True, False, False, True, False, False, False, False, True, False]
    assert p.skipped == asked.count(False) and p.misses == asked.count(True)


def test_an_accepted_node_resets_the_back_off_and_a_rejected_tree_is_a_miss():
    p = policy()
    p.drafted(None, int(1 * MS))  # no tree: a round trip for nothing (10% of a step)
    assert p.misses == 1 and p.skip == 1
    assert not p.wants_draft() and p.wants_draft()
    p.drafted(chain(0.95, 0.9), int(1 * MS))  # 1.95/(12+1) * 10 > 1: predicted to pay
    assert p.misses == 1 and p.skip == 0
    p.stepped(2, int(12 * MS), chain(0.95), [0])  # and it did
    assert p.misses == 0
    for m in (1, 2, 3):  # verified trees of which nothing is accepted: the calibration was too hopeful
        p.stepped(2, int(12 * MS), chain(0.95), [])
        assert p.misses == m and p.skip == 2 ** (m - 1)
    p.stepped(1, int(10 * MS), NONE, [])  # a plain step is neither
    assert p.misses == 3


def test_a_tree_whose_tokens_did_not_pay_for_its_forward_is_a_miss():
    p = policy(tolerance=0.02)
    p.drafted(chain(0.95, 0.9, 0.9), int(1 * MS))  # round trip 1 ms
    p.stepped(4, int(30 * MS), chain(0.95, 0.9, 0.9), [0])  # 2 tokens in 31 ms: 2 * 10 / 31 < 0.98
    assert p.misses == 1 and p.skip == 1
    p.stepped(4, int(18 * MS), chain(0.95, 0.9, 0.9), [0])  # 2 tokens in 19 ms: 20 / 19 pays
    # (the first step cost what the curve says at 4 tokens: plain is still 10 ms)
    assert p.misses == 0


def test_a_cheap_round_trip_with_no_tree_is_within_tolerance():
    p = policy(tolerance=0.02)
    p.drafted(None, int(0.1 * MS))  # 1% of a step: not worth backing off for
    assert p.misses == 0 and p.wants_draft()


def test_stepped_refines_the_cost_and_the_calibration():
    p = StepPolicy(CostModel((1, 8), (10 * MS, 20 * MS)), calibrate=True)
    before = p.calibrated(chain(0.95))[0]
    for _ in range(50):
        p.stepped(3, int(30 * MS), chain(0.95, 0.95), [])  # never accepted, slower than thought
    assert p.calibrated(chain(0.95))[0] < before / 2
    assert float(p.cost.at(3)) > 20 * MS
    assert p.choose(chain(0.95, 0.95)) == 0


def test_a_rejected_tree_shrinks_the_next_prefix_until_trust_recovers():
    """Engine-wide rates would verify the whole chain; after this generation rejected one, the
    trust (t^depth) verifies a short prefix; plain steps decay the evidence and the whole chain
    comes back; a new generation starts trusted."""
    p = StepPolicy(CostModel((1, 2, 9), (10 * MS, 11 * MS, 20 * MS)), calibrate=False)
    long = chain(*[0.9] * 8)  # 1 + 7.2 tokens for 20 ms: the whole chain
    assert p.choose(long) == 8
    p.stepped(9, int(20 * MS), long, [])  # rejected at its first node: t = 2 / 2.9
    assert p.trust.factor == pytest.approx(2 / 2.9)
    assert 0 < p.choose(long) < 8
    for _ in range(30):
        p.stepped(1, int(10 * MS), NONE, [])
    assert p.choose(long) == 8
    p.stepped(9, int(20 * MS), long, [])
    p.start()
    assert p.trust.factor == 1.0 and p.choose(long) == 8


def test_a_wide_tree_is_worth_at_most_one_token_per_level_after_calibration():
    """Nodes scored 0.45 were always accepted (a chain workload), so the calibration maps 0.45 to
    ~1; eight siblings scored 0.45 are still one token at most (one of them can follow the root)."""
    p = StepPolicy(CostModel((1, 2, 9), (10 * MS, 11 * MS, 20 * MS)), calibrate=True)
    for _ in range(200):
        p.stepped(2, int(11 * MS), chain(0.45), [0])
    assert p.calibrated(chain(0.45))[0] > 0.9
    wide = DraftTree(np.arange(1, 9, dtype=np.int32), np.full(8, -1, np.int32), np.full(8, 0.45, np.float32),
                     np.zeros(8, np.uint8))
    assert p.calibrated(wide).sum() == pytest.approx(1.0)
    assert p.choose(wide) <= 1  # 8 siblings taken alone: 1 + 7.9 tokens for 20 ms would pick all 8


def test_untimed_prices_steps_by_the_curve_and_never_refines_it():
    p = policy(timed=False, tolerance=0.02)
    curve = (p.cost.tokens, p.cost.cost_ns, p.cost.scale)
    p.drafted(None, int(5 * MS))  # the round trip is not measured: priced at draft_ns = 0, no miss
    assert p.draft_ns == 0.0 and p.misses == 0
    p.stepped(2, int(100 * MS), chain(0.95), [0])  # priced 12 ms: 2 * 10 / 12 pays
    assert p.misses == 0
    p.stepped(4, int(1 * MS), chain(0.95, 0.9, 0.9), [0])  # priced 30 ms: 20 / 30 does not
    assert p.misses == 1 and p.skip == 1
    assert (p.cost.tokens, p.cost.cost_ns, p.cost.scale) == curve and p.cost.observed == 0
    timed = policy(tolerance=0.02)  # the same two steps, timed: the clock decides, and refines the curve
    timed.stepped(2, int(100 * MS), chain(0.95), [0])
    assert timed.misses == 1 and timed.cost.observed == 1 and timed.cost.scale > 1.0


def test_restore_puts_back_the_snapshot_every_time():
    p = StepPolicy(CostModel((1, 8), (10 * MS, 20 * MS)), calibrate=True)
    p.drafted(chain(0.9), int(2 * MS))
    p.stepped(2, int(15 * MS), chain(0.9), [0])
    snap = p.snapshot()
    state = (p.cost.tokens, p.cost.cost_ns, p.cost.scale, p.draft_ns, p.misses, p.skip,
             p.calibration.verified.tolist(), p.calibration.accepted.tolist(), p.trust.factor)
    for _ in range(2):  # each time: diverge (misses, a slower curve, a distrusting calibration), restore
        p.drafted(chain(0.9), int(8 * MS))
        for _ in range(5):
            p.stepped(3, int(40 * MS), chain(0.9, 0.9), [])
        assert (p.cost.scale, p.misses) != (state[2], state[4])
        p.restore(snap)
        assert (p.cost.tokens, p.cost.cost_ns, p.cost.scale, p.draft_ns, p.misses, p.skip,
                p.calibration.verified.tolist(), p.calibration.accepted.tolist(), p.trust.factor) == state
        assert p.cost is not snap.cost and p.calibration is not snap.calibration  # the snapshot stays apart
