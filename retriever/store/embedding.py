"""Embedders for the FAISS datastores: token-id windows -> L2-normalized float32 vectors.

An `Embedder` maps passages of token ids (no detokenization) to unit vectors whose inner
product measures similarity. The one shipped is `LexicalEmbedder` ("lexical-ngram"): hashed
token n-grams (orders 1..max_order) counted per passage (`ngram_counts`), weighted by sublinear
term frequency log(1 + count) (`sublinear_tf`) times an inverse document frequency per hash
bucket fitted on the corpus windows, then L2-normalized. The reference sets of the drafter
(`retriever.drafting.reference_set`) weigh prior outputs with the same two functions. It needs
no model and runs in numpy (a few M tokens/s).

An embedder is saved as its `name`, JSON `params()` and an optional float32 `state()` array
(the IDF for the lexical one); `load_embedder(name, params, state)` rebuilds it.
Pure module: numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

from retriever.errors import IndexFormatError, InvalidArgument

LEXICAL = "lexical-ngram"
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constants for the n-gram hash
_ORDER_SEEDS = (0x632BE59BD9B4E019, 0x85EBCA77C2B2AE63, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD)
_BATCH_TOKENS = 1 << 20  # tokens hashed at a time while fitting / embedding many passages


@runtime_checkable
class Embedder(Protocol):
    """Token-id passages -> unit vectors; inner product = similarity."""

    name: str
    dim: int

    def params(self) -> dict[str, Any]:
        """JSON-able parameters recorded in the manifest (with `name` they rebuild it)."""
        ...

    def state(self) -> np.ndarray | None:
        """float32[m] fitted state saved next to the index (None: stateless)."""
        ...

    def embed(self, passages: Sequence[np.ndarray]) -> np.ndarray:
        """Each passage int32[k_i] -> float32[len(passages), dim], rows L2-normalized (0 if empty)."""
        ...


@dataclass(frozen=True)
class LexicalEmbedder:
    """Hashed token n-gram TF-IDF vectors; `idf` float32[dim] (all ones until fitted)."""

    dim: int = 512
    max_order: int = 3
    idf: np.ndarray = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    name: str = LEXICAL

    def __post_init__(self) -> None:
        if not 16 <= self.dim <= 1 << 16:
            raise InvalidArgument(f"embedding dim must be in [16, 65536], got {self.dim}")
        if not 1 <= self.max_order <= len(_ORDER_SEEDS):
            raise InvalidArgument(f"max_order must be in [1, {len(_ORDER_SEEDS)}], got {self.max_order}")
        idf = np.ones(self.dim, np.float32) if self.idf is None else np.asarray(self.idf, np.float32)
        if idf.shape != (self.dim,):
            raise InvalidArgument(f"idf must have shape [{self.dim}], got {list(idf.shape)}")
        object.__setattr__(self, "idf", idf)

    def params(self) -> dict[str, Any]:
        return {"dim": self.dim, "max_order": self.max_order}

    def state(self) -> np.ndarray:
        return self.idf  # float32[dim]

    def fit(self, passages: Iterable[np.ndarray]) -> "LexicalEmbedder":
        """A copy whose idf is log((1 + N) / (1 + df)) + 1 over the buckets of `passages`."""
        df = np.zeros(self.dim, np.int64)
        n = 0
        for batch in _batches(passages):
            counts = ngram_counts(batch, self.dim, self.max_order)  # [b, dim] float32
            df += np.count_nonzero(counts, axis=0)
            n += len(batch)
        idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
        return LexicalEmbedder(self.dim, self.max_order, idf.astype(np.float32))

    def embed(self, passages: Sequence[np.ndarray]) -> np.ndarray:
        out = [self._embed_batch(b) for b in _batches(passages)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)  # [n, dim]

    def _embed_batch(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        counts = sublinear_tf(ngram_counts(batch, self.dim, self.max_order))  # [b, dim]
        counts *= self.idf[None, :]
        norms = np.linalg.norm(counts, axis=1, keepdims=True)
        return counts / np.maximum(norms, 1e-12)  # [b, dim] float32



def ngram_counts(batch: Sequence[np.ndarray], dim: int, max_order: int) -> np.ndarray:
    """float32[b, dim]: the n-gram (orders 1..max_order) bucket counts of each passage
    (int arrays [k_i]); n-grams never cross passages."""
    lengths = np.fromiter((p.size for p in batch), np.int64, len(batch))
    tokens = (np.concatenate([np.asarray(p) for p in batch]) if lengths.sum()
              else np.zeros(0, np.int64)).astype(np.uint64)  # [total]
    row = np.repeat(np.arange(len(batch), dtype=np.int64), lengths)  # [total] passage of each token
    flat = [row * dim + ngram_buckets(tokens, 1, dim)]
    for order in range(2, max_order + 1):
        same = row[order - 1:] == row[: row.size - order + 1]  # the n-gram lies in one passage
        flat.append((row[order - 1:] * dim + ngram_buckets(tokens, order, dim))[same])
    counts = np.bincount(np.concatenate(flat), minlength=len(batch) * dim)
    return counts.astype(np.float32).reshape(len(batch), dim)


def sublinear_tf(counts: np.ndarray) -> np.ndarray:
    """Term weights log(1 + count), in place (float32 [..., dim]); 0 stays 0."""
    return np.log1p(counts, out=counts)


def ngram_buckets(tokens: np.ndarray, order: int, dim: int) -> np.ndarray:
    """uint64[n] tokens -> int64[n - order + 1]: the hash bucket of each n-gram of that order."""
    n = tokens.size - order + 1
    if n <= 0:
        return np.zeros(0, np.int64)
    h = np.full(n, _ORDER_SEEDS[order - 1], np.uint64)
    with np.errstate(over="ignore"):
        for j in range(order):
            h = (h ^ tokens[j:j + n]) * _MIX
            h ^= h >> np.uint64(29)
        h *= _MIX
    h ^= h >> np.uint64(32)
    return (h % np.uint64(dim)).astype(np.int64)


def _batches(passages: Iterable[np.ndarray]) -> Iterable[list[np.ndarray]]:
    """Groups passages into lists of about _BATCH_TOKENS tokens."""
    batch: list[np.ndarray] = []
    tokens = 0
    for p in passages:
        batch.append(p)
        tokens += p.size
        if tokens >= _BATCH_TOKENS:
            yield batch
            batch, tokens = [], 0
    if batch:
        yield batch


def load_embedder(name: str, params: dict[str, Any], state: np.ndarray | None) -> Embedder:
    """Rebuilds a saved embedder; IndexFormatError for an unknown name or bad params."""
    if name != LEXICAL:
        raise IndexFormatError(f"embedder name must be '{LEXICAL}', got {name!r}")
    try:
        return LexicalEmbedder(int(params["dim"]), int(params["max_order"]), state)
    except (KeyError, TypeError, ValueError, InvalidArgument) as e:
        raise IndexFormatError(f"embedder params must be valid for {LEXICAL}, got {params!r} ({e})") from None
