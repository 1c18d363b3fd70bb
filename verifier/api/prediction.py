"""OpenAI Predicted Outputs: how the usage counts a prediction's tokens (pure).

`prediction_usage(prediction_ids, output_ids)` -> (accepted, rejected): `accepted` is the number
of prediction tokens that appear in the output in the same order, as the matching blocks of
difflib's SequenceMatcher find them (a longest common subsequence in practice, computed in
near-linear time on similar texts), `rejected` the other prediction tokens; they sum to the
prediction's token count. This is what the count means, not which draft tokens the verifier
took from the prediction (that is `specdraft.accepted_by_source["prediction"]`).

Example: prediction [1, 2, 3, 4], output [1, 2, 9, 4] -> (3, 1).
"""

from __future__ import annotations

from difflib import SequenceMatcher
from typing import Sequence


def prediction_usage(prediction_ids: Sequence[int], output_ids: Sequence[int]) -> tuple[int, int]:
    """(accepted, rejected) prediction tokens; accepted + rejected == len(prediction_ids)."""
    if not prediction_ids:
        return 0, 0
    matcher = SequenceMatcher(None, list(prediction_ids), list(output_ids), autojunk=False)
    accepted = sum(block.size for block in matcher.get_matching_blocks())
    return accepted, len(prediction_ids) - accepted
