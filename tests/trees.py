"""Draft trees for the tests: `tree(token_ids, parents, scores, sources)` from any sequences."""

import numpy as np

from retriever.drafting.types import DraftTree


def tree(token_ids, parents, scores, sources) -> DraftTree:
    """A checked `DraftTree` (int32 / float32 / uint8 arrays; InvalidArgument when it breaks the contract)."""
    return DraftTree(np.asarray(token_ids), np.asarray(parents), np.asarray(scores), np.asarray(sources)).checked()
