"""The static-cache HF backend (`verifier.decoding.backend.Backend`): a preallocated KV cache,
tree inputs padded to a few fixed sizes, and on CUDA each size's forward captured once as a CUDA
graph and replayed (the GPU no longer waits on Python and kernel launches).

- Cache: one transformers `StaticCache` of `max_positions + max(sizes)` slots per layer, owned by
  the backend and reused by every generation (one at a time: `start` invalidates the previous
  handle). A forward writes its rows at slots [cache_len, cache_len + size); slots past the
  committed length hold stale rows that every mask blocks, so nothing is ever cleared.
- Padding: root + n nodes run as the smallest size of `sizes` (1, 9, 17, 33, 65: root + 0, 8,
  16, 32, 64 nodes) holding them. A padding row has token 0 at the root's position and attends to
  the prefix and itself only; no real row attends to it, and it is never committed. Larger trees
  run unpadded and eager.
- One packed int64 host->device copy per step (`pack_tree`: ids, positions, parent rows, ancestor
  matrix, cache_len); the 4-D mask [1, 1, size, slots] is built on the device from it.
- Commit: the accepted rows are gathered into place on the device (`index_select` + `index_copy_`
  over a fixed-length index, identity past the path; captured too); a chain accepted from its
  start is already in place.
- Acceptance: `accept_greedy` reads the device once per step (`verifier.decoding.accept`).

Graphs are captured only when the model is on CUDA and `graphs` is on; on a CPU the same padded
forward runs eagerly (the tests check it against plain greedy decoding in float64).

Example, root r, nodes [a, b] (parents [-1, 0]) at cache_len 5, size 9: ids [r, a, b, 0 x 6],
positions [5, 6, 7, 5 x 6], row 2 (b) attends to slots 0..4 and 5, 6, 7; padding row 3 to 0..4 and 8.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import numpy as np
import torch

from retriever.drafting.types import DraftTree
from verifier.decoding.model import LoadedModel
from verifier.decoding.tree import TreeInputs, tree_structure

log = logging.getLogger(__name__)

SIZES = (1, 9, 17, 33, 65)  # padded forward sizes: root + 0, 8, 16, 32, 64 nodes


def size_of(rows: int, sizes: Sequence[int] = SIZES) -> int:
    """The padded size of a forward of `rows` rows (root + nodes): the smallest size holding them, else rows."""
    return next((s for s in sizes if s >= rows), rows)


def pack_tree(root: int, tree: DraftTree, cache_len: int, size: int) -> np.ndarray:
    """[3 * size + size * size] int64: ids [size], positions [size], parent rows [size - 1],
    ancestor [size * size] (0/1, row-major), cache_len [1]; rows past 1 + n are padding."""
    n = len(tree)
    if 1 + n > size:
        raise ValueError(f"tree must fit the padded size, got root + {n} nodes for size {size}")
    depth, ancestor = tree_structure(tree.parents)  # [1+n] int64, [1+n, 1+n] bool
    ids = np.zeros(size, np.int64)
    ids[0], ids[1:1 + n] = root, tree.token_ids
    pos = np.full(size, cache_len, np.int64)
    pos[:1 + n] += depth
    parents = np.zeros(size - 1, np.int64)
    parents[:n] = tree.parents.astype(np.int64) + 1
    anc = np.eye(size, dtype=np.int64)  # padding rows: themselves only
    anc[:1 + n, :1 + n] = ancestor
    return np.concatenate([ids, pos, parents, anc.reshape(-1), [cache_len]])


class _Handle:
    """The cache of one generation: the backend's single StaticCache while `generation` is current."""

    def __init__(self, generation: int) -> None:
        self.generation = generation


class HFStaticBackend:
    """A `LoadedModel` over a static KV cache; `graphs`: capture each size's forward (CUDA only).

    max_positions: tokens a generation may hold (prompt + output), at most the model's.
    """

    kind = "hf"

    def __init__(self, loaded: LoadedModel, max_positions: int = 4096, graphs: bool = True,
                 sizes: Sequence[int] = SIZES) -> None:
        from transformers import StaticCache

        if max_positions < 2:
            raise ValueError(f"max_positions must be >= 2, got {max_positions}")
        if list(sizes) != sorted(set(sizes)) or sizes[0] != 1:
            raise ValueError(f"sizes must be increasing and start at 1, got {tuple(sizes)}")
        self.loaded, self.sizes = loaded, tuple(sizes)
        self.tokenizer, self.eos_token_ids = loaded.tokenizer, loaded.eos_token_ids
        self.vocab_size, self.path = loaded.vocab_size, loaded.path
        self.max_positions = min(max_positions, loaded.max_positions)
        self.slots = self.max_positions + self.sizes[-1]  # a full cache still fits the largest padded forward
        self.graphs = graphs and loaded.device.type == "cuda"
        self.precision = (f"{str(loaded.dtype).removeprefix('torch.')} {loaded.device} static "
                          f"{'graphs' if self.graphs else 'eager'}")
        self.cache = StaticCache(config=loaded.model.config, max_cache_len=self.slots)
        self._generation = 0
        self._cols = torch.arange(self.slots, device=loaded.device)  # [slots] int64
        with torch.no_grad():  # allocates the cache on the device (plain tensors, not inference tensors)
            zero = torch.zeros((1, 1), dtype=torch.int64, device=loaded.device)
            self._forward_model(zero, zero, self._causal_mask(1), 0)
        self._layers = list(self.cache.layers)
        if not all(hasattr(layer, "cumulative_length") for layer in self._layers):
            raise RuntimeError("StaticCache layers must keep a cumulative_length tensor (transformers >= 5.17)")
        self._steps = {s: _Step(self, s) for s in self.sizes}
        self._compaction = _Compaction(self, self.sizes[-1] - 1)

    # -- the Backend protocol -------------------------------------------------------------------

    @torch.inference_mode()
    def start(self, context: list[int]) -> _Handle:
        if len(context) > self.max_positions:
            raise ValueError(f"context must be at most {self.max_positions} tokens, got {len(context)}")
        self._generation += 1
        if context:
            ids = torch.tensor([context], dtype=torch.int64, device=self.loaded.device)  # [1, L]
            pos = torch.arange(len(context), device=self.loaded.device).view(1, -1)  # [1, L]
            self._forward_model(ids, pos, self._causal_mask(len(context)), 0, logits_to_keep=1)
        return _Handle(self._generation)

    @torch.inference_mode()
    def verify(self, cache: object, cache_len: int, root: int, tree: DraftTree) -> tuple[torch.Tensor, TreeInputs]:
        self._check(cache, cache_len)
        n = len(tree)
        size = size_of(1 + n, self.sizes)
        step = self._steps.get(size) or _Step(self, size)  # a size past the largest: unpadded, eager
        logits, mask, buf = step(pack_tree(root, tree, cache_len, size))
        ids, pos, parents, anc = _unpack(buf, size)
        inputs = TreeInputs(input_ids=ids[:, :1 + n], position_ids=pos[:, :1 + n],
                            attention_mask=mask[:, :, :1 + n, :cache_len + 1 + n],
                            depth=pos[0, :1 + n] - cache_len, ancestor=anc[:1 + n, :1 + n].bool(),
                            parent_rows=parents[:n], cache_len=cache_len)
        return logits[:1 + n], inputs

    @torch.inference_mode()
    def commit(self, cache: object, cache_len: int, accepted: list[int]) -> None:
        self._check(cache, cache_len)
        if list(accepted) != list(range(len(accepted))):  # a chain from the start is already in place
            self._compaction(cache_len + 1, accepted)

    def timer(self, cache_len: int) -> Callable[[int], int]:
        """Times the padded forward of t rows (root + t - 1 chain nodes): the cost of t's size."""
        ids = torch.randint(0, self.vocab_size, (cache_len,), generator=torch.Generator().manual_seed(0))
        handle = self.start(ids.tolist())
        sync = torch.cuda.synchronize if self.loaded.device.type == "cuda" else (lambda: None)

        def time_chain(t: int) -> int:
            sync()
            t0 = time.perf_counter_ns()
            logits, _ = self.verify(handle, cache_len, 0, DraftTree.chain([1] * (t - 1)))
            logits[0, 0].item()  # the step's one host sync
            return time.perf_counter_ns() - t0
        return time_chain

    # -- internals --------------------------------------------------------------------------------

    def _check(self, cache: object, cache_len: int) -> None:
        if not isinstance(cache, _Handle) or cache.generation != self._generation:
            raise RuntimeError("cache must be the handle of this backend's current generation (one at a time), "
                               f"got {type(cache).__name__}")
        if not 0 <= cache_len <= self.max_positions:
            raise ValueError(f"cache_len must be in [0, {self.max_positions}], got {cache_len}")

    def _causal_mask(self, rows: int) -> torch.Tensor:
        """[1, 1, rows, slots] model dtype: row i attends to slots 0..i."""
        allowed = self._cols[None, :] <= torch.arange(rows, device=self.loaded.device)[:, None]  # [rows, slots]
        return _float_mask(allowed, self.loaded.dtype).view(1, 1, rows, self.slots)

    def _forward_model(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, write_at: "int | torch.Tensor",
                       logits_to_keep: int = 0) -> torch.Tensor:
        """Logits [1, rows or logits_to_keep, V]; writes the rows' keys/values at slots write_at.."""
        for layer in getattr(self, "_layers", ()):  # none before the first forward allocates the cache
            if isinstance(write_at, torch.Tensor):
                layer.cumulative_length.copy_(write_at)
            else:
                layer.cumulative_length.fill_(write_at)
        out = self.loaded.model(ids, attention_mask=mask, position_ids=pos, past_key_values=self.cache,
                                use_cache=True, logits_to_keep=logits_to_keep)
        return out.logits


def _float_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where allowed, dtype min where blocked (the additive mask of `verifier.decoding.tree`)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _unpack(buf: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """Views of a packed step input (`pack_tree`): ids [1, size], positions [1, size], parent rows
    [size - 1], ancestor [size, size]."""
    ids = buf[:size].view(1, size)
    pos = buf[size:2 * size].view(1, size)
    parents = buf[2 * size:3 * size - 1]
    anc = buf[3 * size - 1:3 * size - 1 + size * size].view(size, size)
    return ids, pos, parents, anc


class _Step:
    """The padded forward of one size: host array -> device buffer -> (logits [size, V], mask, buffer).

    On CUDA with graphs, the buffer is static and the forward (mask building, cache writes,
    model) is captured once and replayed; otherwise it runs eagerly on a fresh buffer.
    """

    def __init__(self, backend: HFStaticBackend, size: int) -> None:
        self.backend, self.size = backend, size
        device = backend.loaded.device
        self.graph: torch.cuda.CUDAGraph | None = None
        if backend.graphs and size in backend.sizes:
            self.buf = torch.zeros(3 * size + size * size, dtype=torch.int64, device=device)
            self.staging = torch.zeros(self.buf.shape, dtype=torch.int64).pin_memory()
            self._capture()

    def __call__(self, packed: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.graph is None:
            buf = torch.from_numpy(packed).to(self.backend.loaded.device)
            logits, mask = self._run(buf)
            return logits, mask, buf
        self.staging.copy_(torch.from_numpy(packed))
        self.buf.copy_(self.staging, non_blocking=True)
        self.graph.replay()
        return self.out_logits, self.out_mask, self.buf

    def _run(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, size = self.backend, self.size
        ids, pos, _, anc = _unpack(buf, size)
        cache_len = buf[-1]  # 0-d int64
        rel = b._cols - cache_len  # [slots] int64, slot - cache_len
        tree_part = anc[:, rel.clamp(0, size - 1)].bool()  # [size, slots]
        allowed = (rel < 0)[None, :] | (((rel >= 0) & (rel < size))[None, :] & tree_part)
        mask = _float_mask(allowed, b.loaded.dtype).view(1, 1, size, b.slots)
        logits = b._forward_model(ids, pos, mask, cache_len)[0]  # [size, V]
        return logits, mask

    @torch.inference_mode()
    def _capture(self) -> None:
        """Warms up on a side stream, then captures; a failure leaves this size eager (logged)."""
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._run(self.buf)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.out_logits, self.out_mask = self._run(self.buf)
            self.graph = graph
        except Exception:  # noqa: BLE001 - a model whose forward cannot be captured still runs, eagerly
            log.warning("CUDA graph capture of the %d-row forward failed; that size runs eagerly", self.size,
                        exc_info=True)
            self.graph = None


class _Compaction:
    """Moves accepted rows into place in every layer: slots keep + accepted[i] -> keep + i, i < width.

    The index is [2, width] (sources, destinations), identity past the path, so one captured
    graph serves every path of up to `width` nodes.
    """

    def __init__(self, backend: HFStaticBackend, width: int) -> None:
        self.backend, self.width = backend, width
        self.index = torch.zeros((2, width), dtype=torch.int64, device=backend.loaded.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        if backend.graphs:
            try:
                with torch.inference_mode():
                    self._run()  # warm-up: identity moves of slots 0..width-1
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        self._run()
                self.graph = graph
            except Exception:  # noqa: BLE001 - compaction still runs, eagerly
                log.warning("CUDA graph capture of the KV compaction failed; it runs eagerly", exc_info=True)

    def __call__(self, keep: int, accepted: Sequence[int]) -> None:
        k = len(accepted)
        if k > self.width:  # a path past the captured width: an eager gather of its own
            index = torch.tensor([list(accepted), list(range(k))], dtype=torch.int64) + keep
            return self._move(index.to(self.backend.loaded.device))
        src = np.arange(self.width, dtype=np.int64)
        src[:k] = accepted
        index = torch.from_numpy(np.stack([src, np.arange(self.width, dtype=np.int64)]) + keep)
        self.index.copy_(index, non_blocking=self.graph is not None)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run()

    def _run(self) -> None:
        self._move(self.index)

    def _move(self, index: torch.Tensor) -> None:
        src, dst = index[0], index[1]
        for layer in self.backend._layers:
            for t in (layer.keys, layer.values):  # [1, kv_heads, slots, head_dim]
                t.index_copy_(2, dst, t.index_select(2, src))
