"""The KV cache of one generation: create it, and commit it to the accepted path.

A tree forward appends 1 + n entries (the root, then the draft nodes in draft order) to a
cache of cache_len entries. `commit(cache, cache_len, accepted)` keeps the first cache_len + 1
(prefix + root) and the accepted nodes' entries in path order, dropping rejected branches.

Example: cache_len 5, a 4-node draft, accepted nodes [0, 2]: the cache goes from 10 entries
(0..4 prefix, 5 root, 6..9 nodes) to 8: entries 0..5, then 6 (node 0) and 8 (node 2).

Works with transformers' `DynamicCache` of v5 (`cache.layers[i].keys/.values`) and v4
(`cache.key_cache[i]/.value_cache[i]`) through `_KV`; every tensor is
[batch, kv_heads, seq, head_dim] and entries are gathered along the sequence dim (-2).
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import DynamicCache


class _KV:
    """Uniform access to a DynamicCache's per-layer key/value tensors across transformers versions."""

    def __init__(self, cache: DynamicCache) -> None:
        self.cache = cache
        self.v5 = hasattr(cache, "layers")
        if self.v5:
            for layer in cache.layers:
                if getattr(layer, "is_sliding", False):
                    raise NotImplementedError(f"cache commit must see full-attention DynamicLayer layers, "
                                              f"got {type(layer).__name__} (sliding-window models unsupported)")

    def __len__(self) -> int:
        return len(self.cache.layers) if self.v5 else len(self.cache.key_cache)

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.v5:
            layer = self.cache.layers[i]
            return layer.keys, layer.values
        return self.cache.key_cache[i], self.cache.value_cache[i]

    def set(self, i: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self.v5:
            self.cache.layers[i].keys, self.cache.layers[i].values = keys, values
        else:
            self.cache.key_cache[i], self.cache.value_cache[i] = keys, values

    def initialized(self, i: int) -> bool:
        keys = self.get(i)[0]
        return keys is not None and keys.numel() > 0


def new_cache(model: torch.nn.Module) -> DynamicCache:
    """An empty dynamic cache laid out for the model's layers."""
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers v4: no config argument
        return DynamicCache()


def kv_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each [batch, kv_heads, seq, head_dim]."""
    kv = _KV(cache)
    return [kv.get(i) for i in range(len(kv))]


def commit(cache: DynamicCache, cache_len: int, accepted: Sequence[int]) -> None:
    """Keeps entries [0, cache_len] (prefix + root) and those of the accepted nodes; see module doc."""
    keep = cache_len + 1
    k = len(accepted)
    contiguous = list(accepted) == list(range(k))  # a chain accepted from its start: a plain crop
    kv = _KV(cache)
    index = None
    for i in range(len(kv)):
        if not kv.initialized(i):
            continue
        keys, values = kv.get(i)  # [b, h, keep+n, d]
        if not contiguous:
            if index is None:
                index = torch.as_tensor(list(accepted), dtype=torch.int64, device=keys.device) + keep  # [k]
            keys[:, :, keep:keep + k] = keys[:, :, index]  # the RHS is a copy: no overlap hazard
            values[:, :, keep:keep + k] = values[:, :, index]
        kv.set(i, keys[:, :, :keep + k], values[:, :, :keep + k])


def truncate(cache: DynamicCache, length: int) -> None:
    """Drops every entry from position `length` on."""
    kv = _KV(cache)
    for i in range(len(kv)):
        if kv.initialized(i):
            keys, values = kv.get(i)
            kv.set(i, keys[:, :, :length], values[:, :, :length])
