"""FAISS datastores: format "specdraft-faiss", version 1 (semantic passage retrieval).

Documents (token ids) are cut into passages: windows of `window` tokens starting every
`stride` tokens (the last window of a document ends at its end), each followed by up to
`continuation` more tokens of the same document. Each window is embedded (an `Embedder`,
by default `LexicalEmbedder`) into one vector of a FAISS inner-product index; a search
embeds the context tail (its last `window` tokens) and returns the nearest passages, window
plus continuation, as drafting material.

A datastore is a directory of:

- `index.faiss`: `IndexFlatIP` (exact) below `flat_max` passages (100k), else
  `IndexHNSWFlat` (M 16, efConstruction 40, efSearch 64, inner product); row i is passage i. Loaded memory-mapped
  (`IO_FLAG_MMAP_IFC`: the vectors stay in the page cache).
- `tokens.u24`: the documents as in `retriever.store.datastore` (24-bit LE, 0xFFFFFF after each).
- `passages.i64`: int64 LE [num_passages, 3]: (start, window_end, end) positions in
  tokens.u24; the window is [start, window_end), the passage [start, end).
- `embedder.f32`: the embedder's fitted state (float32 LE; the IDF for the lexical one).
- `manifest.json`, written last (`retriever.store.faiss_manifest`).

Writes are atomic (temp dir + rename); `open_faiss_store` checks the manifest, sizes and
checksums before mapping anything; `open_index` opens a directory of either kind by its format.
Pure module (numpy + faiss, imported lazily).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from retriever import __version__
from retriever.errors import FailedPrecondition, IndexFormatError, InvalidArgument
from retriever.store.datastore import (
    CorpusDatastore,
    check_files,
    collect_documents,
    file_sha256,
    open_datastore,
    staged_index,
    unpack_u24,
    write_synced,
    write_tokens,
)
from retriever.store.embedding import Embedder, LexicalEmbedder, load_embedder
from retriever.store.faiss_manifest import (
    EMBEDDER_FILE,
    FAISS_FILES,
    FAISS_FORMAT,
    FAISS_FORMAT_VERSION,
    FAISS_KIND,
    INDEX_FILE,
    METRIC,
    PASSAGE_FIELDS,
    PASSAGES_FILE,
    TOKENS_FILE,
    EmbedderInfo,
    FaissManifest,
    IndexInfo,
    WindowParams,
    read_faiss_manifest,
)
from retriever.store.manifest import (
    INDEX_FILES,
    MANIFEST_FILE,
    TOKEN_WIDTH_BYTES,
    BuildInfo,
    FileInfo,
    TokenizerInfo,
    index_format,
)
from retriever.store.manifest import check_tokenizer as _check_tokenizer

FLAT_MAX = 100_000  # passages up to which the index is exact (IndexFlatIP)
HNSW_M, EF_CONSTRUCTION, EF_SEARCH = 16, 40, 64
_ADD_BATCH = 16_384  # vectors embedded and added at a time
REPLACEABLE = FAISS_FILES | INDEX_FILES  # with overwrite, either kind of index may be replaced


def import_faiss():
    """The faiss module; FailedPrecondition naming the extra when it is not installed."""
    try:
        import faiss
    except ImportError as e:
        raise FailedPrecondition("faiss must be importable for FAISS datastores (pip install "
                                 f"'specdraft[faiss]'), got {e}") from None
    return faiss


@dataclass(frozen=True)
class Passage:
    """One search hit: passage `id`, inner-product `score`, and its tokens (window + continuation)."""

    id: int
    score: float
    tokens: np.ndarray  # [k] int32: the window, then up to `continuation` following tokens
    window_len: int  # tokens[:window_len] is the embedded window
    start: int  # position of tokens[0] in tokens.u24


@dataclass(frozen=True)
class FaissStore:
    """An opened FAISS datastore: manifest, faiss index (mmap), embedder, token and passage tables."""

    path: Path
    manifest: FaissManifest
    index: Any  # faiss.IndexFlatIP | faiss.IndexHNSWFlat
    embedder: Embedder
    token_bytes: np.ndarray  # [3 * num_positions] uint8, memory-mapped tokens.u24
    passages: np.ndarray  # [num_passages, 3] int64, memory-mapped (start, window_end, end)

    @property
    def name(self) -> str:
        return self.manifest.name

    def __len__(self) -> int:
        return self.manifest.num_passages

    def passage_tokens(self, i: int) -> np.ndarray:
        """int32[k]: passage i's window + continuation."""
        start, _, end = (int(v) for v in self.passages[i])
        return unpack_u24(self.token_bytes[start * TOKEN_WIDTH_BYTES:end * TOKEN_WIDTH_BYTES])

    def search(self, context_tokens: np.ndarray, k: int) -> list[Passage]:
        """The (up to) k passages nearest to the context's last `window` tokens (int32[n]), best first."""
        return self.search_many([context_tokens], k)[0]

    def search_many(self, contexts: Sequence[np.ndarray], k: int) -> list[list[Passage]]:
        """`search` for each context (int32[n_i]) in one faiss call; an empty context gets []."""
        if k < 1:
            raise InvalidArgument(f"k must be at least 1, got {k}")
        window = self.manifest.windows.window
        tails = [np.asarray(c, np.int32).reshape(-1)[-window:] for c in contexts]
        out: list[list[Passage]] = [[] for _ in tails]
        live = [i for i, t in enumerate(tails) if t.size]
        if not live or len(self) == 0:
            return out
        queries = self.embedder.embed([tails[i] for i in live])  # [q, dim] float32
        scores, ids = self.index.search(np.ascontiguousarray(queries), min(k, len(self)))  # [q, k] each
        for row, i in enumerate(live):
            out[i] = [self._hit(int(p), float(s)) for p, s in zip(ids[row], scores[row]) if p >= 0]
        return out

    def _hit(self, pid: int, score: float) -> Passage:
        start, window_end, _ = (int(v) for v in self.passages[pid])
        return Passage(pid, score, self.passage_tokens(pid), window_end - start, start)


# ---------------------------------------------------------------- writing

def passage_table(tokens: np.ndarray, windows: WindowParams) -> np.ndarray:
    """int32[num_positions] tokens (-1 after each document) -> int64[num_passages, 3] (start, window_end, end)."""
    ends = np.flatnonzero(tokens == -1)
    starts = np.concatenate([[0], ends[:-1] + 1]) if ends.size else np.zeros(0, np.int64)
    rows = []
    for doc_start, doc_end in zip(starts.tolist(), ends.tolist()):
        length = doc_end - doc_start
        offs = list(range(0, max(length - windows.window, 0) + 1, windows.stride))
        if offs[-1] + windows.window < length:
            offs.append(length - windows.window)  # the document's tail gets a window too
        for off in offs:
            s = doc_start + off
            rows.append((s, min(s + windows.window, doc_end), min(s + windows.window + windows.continuation, doc_end)))
    return np.array(rows, np.int64).reshape(-1, PASSAGE_FIELDS)


def write_faiss_store(out_dir: str | Path, documents: Iterable[np.ndarray], tokenizer: TokenizerInfo, name: str,
                      sources: Iterable[str] = (), *, embedder: Embedder | None = None,
                      windows: WindowParams = WindowParams(), index_type: str = "auto", flat_max: int = FLAT_MAX,
                      hnsw_m: int = HNSW_M, overwrite: bool = False) -> FaissManifest:
    """Writes `documents` (each int32[k], ids < tokenizer.vocab_size) as a FAISS datastore.

    `embedder` None: a `LexicalEmbedder()` fitted on the windows (an embedder with a `fit`
    method is fitted, others are used as given). `index_type` "auto" (flat up to
    `flat_max` passages, else hnsw), "flat" or "hnsw". Atomic, with the overwrite rules
    of `retriever.store.datastore.write_datastore` (an index of either kind may be replaced).
    Raises InvalidArgument (bad ids, options, target), FailedPrecondition (no faiss), OSError.
    """
    _check_options(windows, index_type, hnsw_m)
    faiss = import_faiss()
    with staged_index(Path(out_dir).absolute(), overwrite, REPLACEABLE) as tmp:
        start = time.perf_counter()
        tokens, num_documents = collect_documents(documents, tokenizer.vocab_size)  # int32[num_positions]
        table = passage_table(tokens, windows)  # [num_passages, 3] int64
        emb = _fitted(embedder, tokens, table)
        kind = index_type if index_type != "auto" else ("flat" if len(table) <= flat_max else "hnsw")
        index = _build_index(faiss, emb, tokens, table, kind, hnsw_m)
        files = _write_files(faiss, tmp, tokens, table, emb, index)
        info = IndexInfo(kind, METRIC, hnsw_m if kind == "hnsw" else 0,
                         EF_CONSTRUCTION if kind == "hnsw" else 0, EF_SEARCH if kind == "hnsw" else 0)
        manifest = _make_manifest(name, tokenizer, emb, info, windows, len(table), num_documents, files,
                                  sources, time.perf_counter() - start)
        write_synced(tmp / MANIFEST_FILE, manifest.to_json().encode())
    return manifest


def _check_options(windows: WindowParams, index_type: str, hnsw_m: int) -> None:
    if windows.window < 1 or windows.stride < 1 or windows.continuation < 0:
        raise InvalidArgument(f"window and stride must be positive and continuation non-negative, got {windows}")
    if index_type not in ("auto", "flat", "hnsw"):
        raise InvalidArgument(f"index_type must be 'auto', 'flat' or 'hnsw', got {index_type!r}")
    if hnsw_m < 2:
        raise InvalidArgument(f"hnsw_m must be at least 2, got {hnsw_m}")


def _windows_of(tokens: np.ndarray, table: np.ndarray, lo: int = 0, hi: int | None = None) -> list[np.ndarray]:
    """Views int32[window_end - start] of the windows of passages [lo, hi)."""
    return [tokens[s:e] for s, e, _ in table[lo:hi].tolist()]


def _fitted(embedder: Embedder | None, tokens: np.ndarray, table: np.ndarray) -> Embedder:
    emb = LexicalEmbedder() if embedder is None else embedder
    fit = getattr(emb, "fit", None)
    return fit(_windows_of(tokens, table)) if callable(fit) else emb


def _build_index(faiss, emb: Embedder, tokens: np.ndarray, table: np.ndarray, kind: str, hnsw_m: int):
    """A faiss index holding the embedding of every window, row i = passage i."""
    if kind == "flat":
        index = faiss.IndexFlatIP(emb.dim)
    else:
        index = faiss.IndexHNSWFlat(emb.dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = EF_CONSTRUCTION
        index.hnsw.efSearch = EF_SEARCH
    for lo in range(0, len(table), _ADD_BATCH):
        vectors = emb.embed(_windows_of(tokens, table, lo, lo + _ADD_BATCH))  # [b, dim] float32
        index.add(np.ascontiguousarray(vectors, np.float32))
    return index


def _write_files(faiss, tmp: Path, tokens: np.ndarray, table: np.ndarray, emb: Embedder,
                 index) -> dict[str, FileInfo]:
    files = {TOKENS_FILE: write_tokens(tmp / TOKENS_FILE, tokens)}
    for fname, arr in ((PASSAGES_FILE, np.ascontiguousarray(table, "<i8")),
                       (EMBEDDER_FILE, np.ascontiguousarray(_state(emb), "<f4"))):
        data = arr.tobytes()
        write_synced(tmp / fname, data)
        files[fname] = FileInfo(len(data), hashlib.sha256(data).hexdigest())
    faiss.write_index(index, str(tmp / INDEX_FILE))
    with open(tmp / INDEX_FILE, "rb+") as f:
        os.fsync(f.fileno())
    files[INDEX_FILE] = FileInfo((tmp / INDEX_FILE).stat().st_size, file_sha256(tmp / INDEX_FILE))
    return files


def _state(emb: Embedder) -> np.ndarray:
    state = emb.state()
    return np.zeros(0, np.float32) if state is None else np.asarray(state, np.float32).reshape(-1)  # [m]


def _make_manifest(name: str, tokenizer: TokenizerInfo, emb: Embedder, info: IndexInfo, windows: WindowParams,
                   num_passages: int, num_documents: int, files: dict[str, FileInfo], sources: Iterable[str],
                   seconds: float) -> FaissManifest:
    created = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    num_positions = files[TOKENS_FILE].bytes // TOKEN_WIDTH_BYTES
    return FaissManifest(
        format=FAISS_FORMAT, format_version=FAISS_FORMAT_VERSION, kind=FAISS_KIND, name=name, tokenizer=tokenizer,
        embedder=EmbedderInfo(emb.name, dict(emb.params()), emb.dim, files[EMBEDDER_FILE].bytes // 4),
        index=info, windows=windows, num_passages=num_passages, num_tokens=num_positions - num_documents,
        num_documents=num_documents, num_positions=num_positions, token_width_bytes=TOKEN_WIDTH_BYTES,
        files=files, sources=tuple(str(s) for s in sources), build=BuildInfo(created, __version__, round(seconds, 3)))


# ---------------------------------------------------------------- reading

def open_faiss_store(path: str | Path, expect_tokenizer: TokenizerInfo | None = None,
                     verify_checksums: bool = True, embedder: Embedder | None = None) -> FaissStore:
    """Validates the FAISS datastore at `path` and memory-maps it.

    `embedder` None: the one the manifest names is rebuilt (the lexical one); else the
    given embedder is used and must match the manifest's name, params and dim.
    Raises IndexFormatError (missing or corrupt files, unknown format or version, sizes,
    checksums or index contents not matching the manifest) or FailedPrecondition (built
    with a tokenizer other than `expect_tokenizer`, another embedder, or faiss not installed).
    """
    root = Path(path)
    m = read_faiss_manifest(root)
    if expect_tokenizer is not None:
        _check_tokenizer(m, root, expect_tokenizer)  # type: ignore[arg-type]  # reads only .tokenizer
    check_files(root, m, verify_checksums)  # type: ignore[arg-type]  # reads only .files
    faiss = import_faiss()
    embedder = _embedder(root, m, embedder)
    index = _read_index(faiss, root, m)
    passages = _map(root / PASSAGES_FILE, "<i8").reshape(-1, PASSAGE_FIELDS)  # [num_passages, 3] int64
    _check_passages(root, passages, m.num_positions)
    return FaissStore(root, m, index, embedder, _map(root / TOKENS_FILE, np.uint8), passages)


def open_index(path: str | Path, expect_tokenizer: TokenizerInfo | None = None) -> "CorpusDatastore | FaissStore":
    """Opens the index at `path` by its manifest's `format`: `open_faiss_store` for
    "specdraft-faiss", else `open_datastore` (which reports a missing or bad manifest).

    Raises what those raise (IndexFormatError, FailedPrecondition).
    """
    if index_format(Path(path)) == FAISS_FORMAT:
        return open_faiss_store(path, expect_tokenizer)
    return open_datastore(path, expect_tokenizer)


def _embedder(root: Path, m: FaissManifest, given: Embedder | None) -> Embedder:
    """The manifest's embedder (rebuilt from embedder.f32), or `given` once checked against it."""
    if given is not None:
        got, want = (given.name, dict(given.params()), given.dim), (m.embedder.name, m.embedder.params, m.embedder.dim)
        if got != want:
            raise FailedPrecondition(f"index {root} embedder must be {want} (name, params, dim), got {got}")
        return given
    state = np.fromfile(root / EMBEDDER_FILE, "<f4")  # [state_len] float32
    embedder = load_embedder(m.embedder.name, m.embedder.params, state if state.size else None)
    if embedder.dim != m.embedder.dim:
        raise IndexFormatError(f"index {root}: embedder dim must be {m.embedder.dim}, got {embedder.dim}")
    return embedder


def _read_index(faiss, root: Path, m: FaissManifest):
    """faiss.read_index, memory-mapped, checked against the manifest."""
    try:
        mmap = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)  # flat codes mapped in place
        index = faiss.read_index(str(root / INDEX_FILE), mmap | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as e:
        raise IndexFormatError(f"{root / INDEX_FILE} must be a readable faiss index, got {str(e)[:200]}") from None
    want = {"flat": faiss.IndexFlatIP, "hnsw": faiss.IndexHNSWFlat}[m.index.type]
    checks = [("type", want.__name__, type(index).__name__), ("ntotal", m.num_passages, index.ntotal),
              ("dimension", m.embedder.dim, index.d), ("metric", faiss.METRIC_INNER_PRODUCT, index.metric_type)]
    for what, expect, got in checks:
        if expect != got:
            raise IndexFormatError(f"{root / INDEX_FILE}: {what} must be {expect}, got {got}")
    if m.index.type == "hnsw":
        index.hnsw.efSearch = m.index.ef_search
    return index


def _map(path: Path, dtype) -> np.ndarray:
    """The file as a read-only memory-mapped 1-D array (an empty array for an empty file)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _check_passages(root: Path, passages: np.ndarray, num_positions: int) -> None:
    """Each row must satisfy 0 <= start < window_end <= end <= num_positions."""
    if not passages.size:
        return
    s, w, e = passages[:, 0], passages[:, 1], passages[:, 2]
    bad = np.flatnonzero((s < 0) | (w <= s) | (e < w) | (e > num_positions))
    if bad.size:
        i = int(bad[0])
        raise IndexFormatError(f"{root / PASSAGES_FILE}: row {i} must satisfy 0 <= start < window_end <= end <= "
                               f"{num_positions}, got {passages[i].tolist()}")
