"""The llama.cpp backend (`verifier.decoding.backend.Backend`): a GGUF file as it is (mmap, no
dequantization) through llama-cpp-python's low-level API, on the CPU. Needs the `llama` extra.

One tree, one `llama_decode`: the root and every node are batch tokens at position cache_len +
depth, each tagged with the sequence id of every root-to-leaf path through it (leaf k owns
sequence k, the committed prefix is a member of every sequence). llama.cpp lets a token attend
to a cell iff the cell holds the token's first sequence and is not at a later position, so each
node sees exactly the prefix, the root and its ancestors: the tree mask. This needs one unified
KV stream (`kv_unified`) and at least as many sequences as leaves (`n_seq_max` = max_nodes + 1,
at most LLAMA_MAX_SEQ = 256).

Commit keeps root + accepted path in sequence 0 (`seq_keep`, `seq_rm`, `seq_cp`; metadata only).
The CPU attention accumulates over cells in their index order, so cells must stay in position
order for the logits to equal plain decoding bit for bit: the tree is laid out depth-first, best
child first (the usual accepted path is batch nodes 0..j-1, kept in place), and an accepted node
after a hole is dropped from the cache and decoded again at the front of the next batch.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from retriever.drafting.types import DraftTree
from verifier.decoding.tree import TreeInputs, build_tree_inputs

_log_callback = None  # the ctypes callback stays referenced while llama.cpp may call it


def _llama():
    """The low-level bindings, the backend initialized once (llama.cpp's own logging: errors only)."""
    global _log_callback
    import llama_cpp.llama_cpp as L

    if _log_callback is None:
        @L.llama_log_callback
        def errors_only(level, text, user_data):  # ggml_log_level 4: ERROR
            if level == 4:
                os.write(2, text)
        _log_callback = errors_only
        L.llama_log_set(_log_callback, ctypes.c_void_p(0))
        L.llama_backend_init()
    return L


def depth_first(parents: np.ndarray) -> np.ndarray:
    """[n] int64 perm (perm[batch position] = node): pre-order, children in node order (best first).

    Example: parents [-1, -1, 0] (root -> 0 -> 2, root -> 1) -> [0, 2, 1].
    """
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents.tolist()):
        children.setdefault(p, []).append(i)
    order, stack = [], list(reversed(children.get(-1, [])))
    while stack:
        v = stack.pop()
        order.append(v)
        stack.extend(reversed(children.get(v, [])))
    return np.asarray(order, np.int64)


class LlamaCppBackend:
    """One GGUF model and one context; generations run one at a time (the cache is the backend)."""

    kind = "llama.cpp"
    keeps_prefix = True  # `start` keeps what a new context shares with the cache (callers may time a prefill once)
    tiled = True  # its CPU matmuls tile the batch: 32 tokens may cost less than 31 (the cost curve is timed at every size)

    def __init__(self, path: str, max_nodes: int = 64, n_ctx: int = 4096, n_threads: int = 0,
                 tokenizer: object | None = None) -> None:
        """`n_threads` 0: every core of this machine; `tokenizer`: an HF tokenizer (default: the
        GGUF's own, converted by transformers). Raises ModelLoadError when the file does not load."""
        from verifier.decoding.model import ModelLoadError

        if not 1 <= max_nodes < 256:
            raise ValueError(f"max_nodes must be in [1, 255] for llama.cpp (LLAMA_MAX_SEQ 256), got {max_nodes}")
        L = self._L = _llama()
        params = L.llama_model_default_params()
        params.n_gpu_layers = 0
        params.load_mode = L.LLAMA_LOAD_MODE_MMAP
        self._model = L.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise ModelLoadError(f"GGUF model file must load in llama.cpp, got {path!r}")
        threads = n_threads or len(os.sched_getaffinity(0))
        self._ctx = L.llama_init_from_model(self._model, self._context_params(n_ctx, max_nodes, threads))
        if not self._ctx:
            raise ModelLoadError(f"llama.cpp context must be created for {path!r} (n_ctx {n_ctx}), got none")
        self._mem = L.llama_get_memory(self._ctx)
        vocab = L.llama_model_get_vocab(self._model)
        self.vocab_size = int(L.llama_vocab_n_tokens(vocab))
        self.max_positions = min(int(L.llama_n_ctx(self._ctx)), int(L.llama_model_n_ctx_train(self._model)))
        self.tokenizer = tokenizer if tokenizer is not None else _gguf_tokenizer(Path(path))
        self.eos_token_ids = _eos_ids(L, vocab, self.tokenizer)
        self.path, self.precision = str(path), f"gguf cpu {threads} threads"
        self._batch = _Batch(L, int(L.llama_n_batch(self._ctx)), int(L.llama_n_seq_max(self._ctx)))
        self._cached = 0  # tokens in sequence 0 of the KV cache
        self._history: list[int] = []  # [_cached] the token at each of those positions
        self._uncached: list[int] = []  # committed tokens decoded again with the next batch
        self.reused = 0  # context tokens the last `start` kept from the cache
        self._pending: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @staticmethod
    def _context_params(n_ctx: int, max_nodes: int, threads: int):
        L = _llama()
        params = L.llama_context_default_params()
        params.n_ctx, params.n_batch = n_ctx, 512
        params.n_ubatch = params.n_batch  # a tree is one graph evaluation
        params.n_seq_max = max_nodes + 1  # a tree of n nodes has at most n leaves
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True  # one KV stream: seq_cp is metadata only, masks work across sequences
        # flash attention stays as llama.cpp's default sets it (auto: on for the CPU): without it a tree's
        # logits are not a plain step's (0.08 apart on SmolLM2; the exactness tests fail), though a
        # 32-node tree runs 10-20% faster; its V cache layout also keeps llama_cpp.Llama (off) from loading ours
        params.no_perf, params.embeddings = True, False
        return params

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self._L.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            self._L.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        self.close()

    # ------------------------------------------------------------ Backend

    def start(self, context: list[int]) -> object:
        """The cache of `context`, keeping the longest prefix it shares with what the cache holds
        (the last generation's prompt and output, as llama.cpp's server does with cache_prompt):
        only the rest is decoded. `reused` tells how many tokens were kept."""
        keep = 0 if self._pending is not None else _common_prefix(self._history, context)
        if keep == 0:
            self._L.llama_memory_clear(self._mem, True)
        else:
            self._L.llama_memory_seq_rm(self._mem, 0, keep, -1)
        self._cached, self._history, self._uncached, self._pending = keep, list(context[:keep]), [], None
        for i in range(keep, len(context), self._batch.size):
            chunk = context[i:i + self._batch.size]
            self._batch.fill_chain(chunk, self._cached, 1, outputs=False)
            self._decode(len(chunk))
            self._cached += len(chunk)
            self._history += chunk
        self.reused = keep
        return self

    def forget(self) -> None:
        """Empties the cache: the next `start` decodes its whole context."""
        self._L.llama_memory_clear(self._mem, True)
        self._cached, self._history, self._uncached, self._pending = 0, [], [], None

    def verify(self, cache: object, cache_len: int, root: int, tree: DraftTree) -> tuple[torch.Tensor, TreeInputs]:
        if self._pending is not None or cache_len != self._cached + len(self._uncached):
            raise RuntimeError(f"llama.cpp cache must hold {cache_len} tokens with no tree pending, got "
                               f"{self._cached + len(self._uncached)} (pending: {self._pending is not None})")
        order = depth_first(tree.parents)  # [n] node of each batch position
        batch_of = np.empty(len(order), np.int64)
        batch_of[order] = np.arange(len(order))
        parents = np.where(tree.parents[order] >= 0, batch_of[np.maximum(tree.parents[order], 0)], -1)  # [n]
        leaves = _leaves(parents)
        for seq in range(1, len(leaves)):  # the committed prefix is on every path
            self._L.llama_memory_seq_cp(self._mem, 0, seq, -1, -1)
        chain = len(self._uncached)
        if chain + 1 + len(order) > self._batch.size:
            raise ValueError(f"a tree must fit one batch of {self._batch.size} tokens, got {chain} + 1 + {len(order)}")
        self._batch.fill_chain(self._uncached, self._cached, len(leaves), outputs=False)
        first_seq = self._batch.fill_tree(chain, root, tree.token_ids[order], parents, tree.depths()[order], leaves,
                                          self._cached + chain)
        self._decode(chain + 1 + len(order))
        self._cached += chain
        self._history += self._uncached
        self._uncached = []
        logits = self._batch.logits(self._L, self._ctx, 1 + len(order), self.vocab_size)  # [1+n, V] batch order
        self._pending = (root, first_seq, tree.token_ids[order], batch_of)
        rows = np.concatenate([[0], 1 + batch_of])  # node order: row 1+i is node i
        return torch.from_numpy(logits[rows]), build_tree_inputs(root, tree, 0, torch.float32, "cpu")

    def commit(self, cache: object, cache_len: int, accepted: list[int]) -> None:
        root, first_seq, tokens, batch_of = self._pending
        path = [int(batch_of[a]) for a in accepted]  # batch positions, root to leaf
        kept = 0
        while kept < len(path) and path[kept] == kept:  # accepted nodes right after the root: no hole
            kept += 1
        seq = int(first_seq[path[kept - 1]]) if kept else 0  # a path through the deepest kept node
        if len(first_seq) and int(first_seq.max()) > 0:
            self._L.llama_memory_seq_keep(self._mem, seq)
        self._L.llama_memory_seq_rm(self._mem, seq, self._cached + 1 + kept, -1)
        if seq != 0:
            self._L.llama_memory_seq_cp(self._mem, seq, 0, -1, -1)
            self._L.llama_memory_seq_keep(self._mem, 0)
        self._cached += 1 + kept
        self._history += [int(root)] + [int(tokens[p]) for p in path[:kept]]
        self._uncached = [int(tokens[p]) for p in path[kept:]]
        self._pending = None

    def timer(self, cache_len: int) -> Callable[[int], int]:
        self.start(np.random.default_rng(0).integers(0, self.vocab_size, cache_len).tolist())

        def time_chain(t: int) -> int:
            t0 = time.perf_counter_ns()
            self.verify(self, cache_len, 1, DraftTree.chain([1] * (t - 1)))
            elapsed = time.perf_counter_ns() - t0
            self.commit(self, cache_len, [])
            self._L.llama_memory_seq_rm(self._mem, 0, cache_len, -1)  # back to the context alone
            self._cached = cache_len
            del self._history[cache_len:]
            return elapsed
        return time_chain

    def _decode(self, n: int) -> None:
        self._batch.struct.n_tokens = n
        rc = self._L.llama_decode(self._ctx, self._batch.struct)
        if rc != 0:
            raise RuntimeError(f"llama_decode must succeed, got return code {rc} (1: no KV slot: context full)")


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n], np.int64) != np.asarray(b[:n], np.int64))
    return int(diff[0]) if len(diff) else n


def _leaves(parents: np.ndarray) -> np.ndarray:
    """[k >= 1] int64: the nodes without children ([-1]: the root alone, an empty tree)."""
    has_child = np.zeros(len(parents), bool)
    has_child[parents[parents >= 0]] = True
    leaves = np.flatnonzero(~has_child)
    return leaves if len(leaves) else np.array([-1], np.int64)


class _Batch:
    """A `llama_batch` whose arrays are numpy buffers (filled in bulk, not through ctypes per item)."""

    def __init__(self, L, size: int, n_seq: int) -> None:
        self.size = size
        self.tok, self.pos = np.zeros(size, np.int32), np.zeros(size, np.int32)  # [size]
        self.nseq, self.out = np.zeros(size, np.int32), np.zeros(size, np.int8)  # [size]
        self.seq = np.zeros((size, n_seq), np.int32)  # [size, n_seq] sequence ids of each token
        i32p = ctypes.POINTER(ctypes.c_int32)
        self._rows = (i32p * size)(*[ctypes.cast(self.seq.ctypes.data + i * self.seq.strides[0], i32p)
                                     for i in range(size)])
        b = self.struct = L.llama_batch()
        b.token, b.pos, b.n_seq_id = (a.ctypes.data_as(i32p) for a in (self.tok, self.pos, self.nseq))
        b.embd = ctypes.POINTER(ctypes.c_float)()
        b.seq_id = ctypes.cast(self._rows, ctypes.POINTER(i32p))
        b.logits = self.out.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))

    def fill_chain(self, tokens: list[int], start_pos: int, n_seqs: int, outputs: bool) -> None:
        """tokens at positions start_pos.. in batch slots 0.., on sequences 0..n_seqs-1."""
        m = len(tokens)
        self.tok[:m], self.pos[:m] = tokens, np.arange(start_pos, start_pos + m)
        self.nseq[:m], self.seq[:m, :n_seqs], self.out[:m] = n_seqs, np.arange(n_seqs), int(outputs)

    def fill_tree(self, at: int, root: int, tokens: np.ndarray, parents: np.ndarray, depth: np.ndarray,
                  leaves: np.ndarray, root_pos: int) -> np.ndarray:
        """Root then nodes (batch order; depth [n] int32, root 0) from slot `at`; leaf k's path on
        sequence k. Returns [n] int32, the first sequence of each node (a path through it)."""
        n, k = len(tokens), len(leaves)
        first = np.full(n, -1, np.int32)
        counts = np.zeros(n, np.int32)
        for seq, leaf in enumerate(leaves.tolist()):
            v = leaf
            while v >= 0:
                self.seq[at + 1 + v, counts[v]] = seq
                counts[v] += 1
                first[v] = seq if first[v] < 0 else first[v]
                v = int(parents[v])
        self.tok[at], self.pos[at], self.nseq[at], self.seq[at, :k] = root, root_pos, k, np.arange(k)
        self.tok[at + 1:at + 1 + n], self.pos[at + 1:at + 1 + n] = tokens, root_pos + depth
        self.nseq[at + 1:at + 1 + n] = counts
        self.out[at:at + 1 + n] = 1
        return first

    @staticmethod
    def logits(L, ctx, rows: int, vocab: int) -> np.ndarray:
        """[rows, vocab] float32: the outputs of the last decode, in batch order."""
        return np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(rows, vocab)).copy()


def _gguf_tokenizer(path: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def _eos_ids(L, vocab, tokenizer) -> tuple[int, ...]:
    """The GGUF's end-of-generation tokens (eos, eot), then the tokenizer's eos."""
    ids = [int(L.llama_vocab_eos(vocab)), int(L.llama_vocab_eot(vocab)), getattr(tokenizer, "eos_token_id", None)]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None and int(i) >= 0))
