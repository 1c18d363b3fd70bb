"""The HF transformers backend (`verifier.decoding.backend.Backend`): a 4-D tree mask over a
dynamic KV cache, on the model's device (CPU or GPU).

The 4-D float mask is passed as `attention_mask`, and transformers (v5 `masking_utils`) uses a
4-D mask as given, with both the sdpa and the eager attention of Llama and Qwen2; the tests check
speculative greedy output against plain greedy output token for token (float64 on CPU).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from retriever.drafting.types import DraftTree
from verifier.decoding.cache import commit, new_cache, truncate
from verifier.decoding.model import LoadedModel
from verifier.decoding.tree import TreeInputs, build_tree_inputs


class HFBackend:
    """A `LoadedModel` as a Backend; `loaded` is the model itself (weights, dtype, device)."""

    kind = "hf"

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.tokenizer, self.eos_token_ids = loaded.tokenizer, loaded.eos_token_ids
        self.vocab_size, self.max_positions, self.path = loaded.vocab_size, loaded.max_positions, loaded.path
        self.precision = f"{str(loaded.dtype).removeprefix('torch.')} {loaded.device}"

    @torch.inference_mode()
    def start(self, context: list[int]) -> object:
        cache = new_cache(self.loaded.model)
        if context:
            ids = torch.tensor([context], dtype=torch.int64, device=self.loaded.device)  # [1, L]
            self.loaded.model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache

    @torch.inference_mode()
    def verify(self, cache: object, cache_len: int, root: int, tree: DraftTree) -> tuple[torch.Tensor, TreeInputs]:
        inputs = build_tree_inputs(root, tree, cache_len, self.loaded.dtype, self.loaded.device)
        return self._forward(cache, inputs), inputs

    def _forward(self, cache: object, inputs: TreeInputs) -> torch.Tensor:
        """Logits [1+n, V] of one tree forward; the cache grows by 1 + n entries."""
        out = self.loaded.model(inputs.input_ids, attention_mask=inputs.attention_mask,
                                position_ids=inputs.position_ids, past_key_values=cache, use_cache=True)
        return out.logits[0]

    @torch.inference_mode()
    def commit(self, cache: object, cache_len: int, accepted: list[int]) -> None:
        commit(cache, cache_len, accepted)

    def timer(self, cache_len: int) -> Callable[[int], int]:
        loaded = self.loaded
        ids = torch.randint(0, loaded.vocab_size, (cache_len,), generator=torch.Generator().manual_seed(0))
        cache = self.start(ids.tolist())
        sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)

        @torch.inference_mode()
        def time_chain(t: int) -> int:
            inputs = build_tree_inputs(0, DraftTree.chain([1] * (t - 1)), cache_len, loaded.dtype, loaded.device)
            sync()
            t0 = time.perf_counter_ns()
            self._forward(cache, inputs)
            sync()
            elapsed = time.perf_counter_ns() - t0
            truncate(cache, cache_len)
            return elapsed
        return time_chain
