"""What the decode loop needs of a target model: a `Backend`, one generation at a time.

Implementations: `verifier.decoding.hf.HFBackend` (HF transformers, CPU or GPU: a 4-D tree
mask over a dynamic KV cache), `verifier.decoding.hf_static.HFStaticBackend` (HF transformers over a
static KV cache, trees padded to fixed sizes, CUDA graphs on CUDA; kind "hf" too) and `verifier.decoding.llama_cpp.LlamaCppBackend` (llama.cpp on a
GGUF file, CPU: one `llama_decode` per tree, sequence ids as the tree mask). A cache is the
backend's own object; the engine keeps its length.

Contract of one step (cache holds `cache_len` entries, the root token is not in it yet):
`verify(cache, cache_len, root, tree)` scores root + nodes in one forward and returns the logits
[1+n, V] (row 0 after the root, row 1+i after node i) with the tree's structure (`TreeInputs`:
ids, depth, ancestor, parent rows), the cache holding the tree until `commit(cache, cache_len,
accepted)` keeps prefix + root + the accepted nodes (root to leaf) and drops the rest.
`timer(cache_len)` returns a function timing a chain forward of t tokens (ns) over a cache of
cache_len tokens, for the cost model. Optional attributes tell `CostModel.measure` the shape of
the curve: `sizes` (forwards padded to these sizes: a staircase), `tiled` (true: the kernels tile
the batch, a size may cost less than a smaller one: timed at every size).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from retriever.drafting.types import DraftTree
from verifier.decoding.tree import TreeInputs

BACKENDS = ("hf", "llama.cpp")


class Backend(Protocol):
    kind: str  # one of BACKENDS
    tokenizer: object  # an HF tokenizer: encode, decode, chat template
    eos_token_ids: tuple[int, ...]
    vocab_size: int  # rows of the logits
    max_positions: int  # tokens a generation may hold (prompt + output)
    path: str  # the model file or folder (a cost model's key)
    precision: str  # the logits' dtype and device, e.g. "float32 cpu" (a cost model's key)

    def start(self, context: list[int]) -> object:
        """A cache holding `context` (the prompt without its last token, which is the first root)."""

    def verify(self, cache: object, cache_len: int, root: int, tree: DraftTree) -> tuple[torch.Tensor, TreeInputs]:
        """Logits [1+n, V] of root + tree in one forward, and the tree's structure (module doc)."""

    def commit(self, cache: object, cache_len: int, accepted: list[int]) -> None:
        """Cache := its first cache_len entries + root + the accepted nodes (node indexes, root to leaf)."""

    def timer(self, cache_len: int) -> Callable[[int], int]:
        """A function: t -> ns of one chain forward of t tokens over a cache of cache_len random tokens."""
