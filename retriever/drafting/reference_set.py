"""Per-session reference sets: a tenant's prior outputs most similar to the session (pure).

`PriorOutputs` keeps a tenant's last `max_docs` outputs with their hashed n-gram term
weights (orders 1..3, 512 buckets, log(1 + count): the lexical embedding's own
`ngram_counts` and `sublinear_tf`, `retriever.store.embedding`). `select` weighs them by an
IDF over those outputs (TF-IDF, cosine similarity), and returns an `OnlineIndex` over the `k` outputs most similar to
the query (the session's last `window` context tokens), the drafter's REFERENCE source;
`store_passages` adds the top `store_k` passages of each FAISS store (`retriever.store.faiss_store`)
for the same query to it.

Example:
    >>> from retriever.drafting.types import ReferenceParams
    >>> prior = PriorOutputs(ReferenceParams(k=1))
    >>> prior.add(np.array([1, 2, 3, 4], np.int32)); prior.add(np.array([7, 8, 9], np.int32))
    >>> prior.select(np.array([7, 8], np.int32)).num_tokens
    3
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Sequence

import numpy as np

from retriever import _core
from retriever.drafting.types import ReferenceParams
from retriever.store.embedding import ngram_counts, sublinear_tf

if TYPE_CHECKING:
    from retriever.store.faiss_store import FaissStore

DIM, MAX_ORDER = 512, 3


def term_frequencies(tokens: np.ndarray) -> np.ndarray:
    """int32[k] -> float32[DIM]: log(1 + count) of each n-gram bucket (0 where absent)."""
    return sublinear_tf(ngram_counts([tokens], DIM, MAX_ORDER))[0]


class PriorOutputs:
    """A tenant's recent outputs (int32 arrays) and their term frequencies; not thread-safe."""

    def __init__(self, params: ReferenceParams) -> None:
        self._params = params
        self._docs: deque[np.ndarray] = deque(maxlen=params.max_docs)
        self._tf: deque[np.ndarray] = deque(maxlen=params.max_docs)  # each float32[DIM]
        self._matrix: np.ndarray | None = None  # [docs, DIM] float32 TF-IDF rows, unit norm

    def __len__(self) -> int:
        return len(self._docs)

    def add(self, tokens: np.ndarray) -> None:
        if tokens.shape[0]:
            self._docs.append(tokens)
            self._tf.append(term_frequencies(tokens))
            self._matrix = None

    def top(self, query: np.ndarray, k: int) -> np.ndarray:
        """int64[<= k]: indexes of the k outputs most similar to query (int32[q]), best first."""
        if not self._docs or k <= 0:
            return np.empty(0, np.int64)
        if self._matrix is None:
            tf = np.stack(self._tf)  # [docs, DIM]
            self._idf = (np.log((1.0 + len(tf)) / (1.0 + np.count_nonzero(tf, axis=0))) + 1.0).astype(np.float32)
            rows = tf * self._idf
            self._matrix = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        sims = self._matrix @ (term_frequencies(query) * self._idf)  # [docs]
        k = min(k, sims.shape[0])
        best = np.argpartition(-sims, k - 1)[:k]
        return best[np.argsort(-sims[best], kind="stable")]

    def select(self, query: np.ndarray, passages: Sequence[np.ndarray] = ()) -> "_core.OnlineIndex | None":
        """An OnlineIndex over `passages` (int32 arrays, e.g. FAISS hits), then the `k` outputs
        most similar to query (most similar last); None if there are neither."""
        best = self.top(query[-self._params.window:], self._params.k)
        docs = [p for p in passages if p.shape[0]]
        docs += [self._docs[i] for i in best[::-1]]  # most similar last: the most recent to the index
        if not docs:
            return None
        index = _core.OnlineIndex(sum(d.shape[0] for d in docs) + 1)
        for d in docs:
            index.append(d)
            index.end_document()
        return index


def store_passages(stores: Sequence["FaissStore"], query: np.ndarray, k: int) -> list[np.ndarray]:
    """int32 arrays: each store's top-k passages (window + continuation) for query (int32[n]),
    store by store, each store's best last; [] when k < 1 or query is empty."""
    if k < 1 or not query.shape[0]:
        return []
    return [hit.tokens for store in stores for hit in reversed(store.search(query, k))]
