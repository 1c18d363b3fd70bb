"""Offline build of a corpus datastore: read INPUTs, tokenize in batches, write.

Tokenization uses `Tokenizer.encode_batch[_fast]` (Rust, multi-threaded, no special tokens);
the next batch of texts is read on a helper thread while the current one is encoded.
The datastore is written by `retriever.store.datastore.write_datastore` (kind "suffix_array") or
`retriever.store.faiss_store.write_faiss_store` (kind "faiss", options in `FaissOptions`); both atomic.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from index_builder.inputs import InputReader, InputSummary, iter_documents, load_exclude_ids
from retriever.errors import InvalidArgument
from retriever.store.datastore import DEFAULT_SORTED_DEPTH, Manifest, check_target, write_datastore
from retriever.store.faiss_manifest import FaissManifest, WindowParams
from retriever.store.tokenizer import LoadedTokenizer, load_tokenizer

KINDS = ("suffix_array", "faiss")
_DONE_LABEL = {"suffix_array": "tokenized; sorting suffixes", "faiss": "tokenized; embedding"}

BATCH_DOCUMENTS = 512  # texts per encode_batch call, at most
BATCH_CHARS = 4 << 20  # characters per encode_batch call, about


@dataclass(frozen=True)
class FaissOptions:
    """Options of a kind "faiss" build (see retriever.store.faiss_store.write_faiss_store)."""

    index_type: str = "auto"  # "auto" | "flat" | "hnsw"
    dim: int = 512  # lexical embedding dimension
    windows: WindowParams = WindowParams()


@dataclass(frozen=True)
class BuildReport:
    """Outcome of one build."""

    path: Path
    manifest: Manifest | FaissManifest
    inputs: tuple[InputSummary, ...]
    tokens: int
    documents: int
    seconds: float
    tokens_per_s: float
    bytes_on_disk: int  # every file of the index, manifest.json included
    bytes_per_token: float

    @property
    def num_tokens(self) -> int:
        return self.tokens

    @property
    def num_documents(self) -> int:
        return self.documents

    def describe(self) -> str:
        return (f"built {self.path}: {self.tokens:,} tokens in {self.documents:,} documents, "
                f"{self.seconds:.1f} s ({self.tokens_per_s:,.0f} tokens/s), "
                f"{self.bytes_on_disk / 1e6:,.1f} MB on disk ({self.bytes_per_token:.2f} bytes/token)")


def build(inputs: Sequence[str | Path], tokenizer: str | Path | LoadedTokenizer, out_dir: str | Path, *,
          name: str | None = None, glob: str | None = None, exclude: Sequence[str] = (),
          exclude_ids: str | Path | Iterable[str] | None = None, overwrite: bool = False,
          max_tokens: int | None = None, progress: bool = True,
          sorted_depth: int = DEFAULT_SORTED_DEPTH, kind: str = "suffix_array",
          faiss: FaissOptions | None = None) -> BuildReport:
    """Builds the datastore of `inputs` (see index_builder.inputs) at `out_dir`.

    `tokenizer` is a tokenizer.json path, a directory holding one, or a loaded one;
    `exclude_ids` a JSON list file or the ids themselves; `max_tokens` caps the corpus
    (the last document is cut). `kind` "faiss" builds a FAISS datastore (`faiss` options).
    The output directory and any index directory under an INPUT are never read as input.
    Raises InvalidArgument (bad inputs/options, inputs without a single token: "INPUT produced
    no documents"), FailedPrecondition (faiss missing) or OSError.
    """
    if not inputs:
        raise InvalidArgument("inputs must name at least one file or directory, got none")
    if max_tokens is not None and max_tokens < 1:
        raise InvalidArgument(f"max_tokens must be positive, got {max_tokens}")
    if kind not in KINDS:
        raise InvalidArgument(f"kind must be one of {KINDS}, got {kind!r}")
    out = Path(out_dir)
    check_target(out.absolute(), overwrite, _replaceable(kind))  # fail early; checked again when moving
    tok = tokenizer if isinstance(tokenizer, LoadedTokenizer) else load_tokenizer(tokenizer)
    ids = exclude_ids if isinstance(exclude_ids, (frozenset, set, list, tuple)) else load_exclude_ids(exclude_ids)
    readers = [InputReader(p, glob, exclude, frozenset(str(i) for i in ids), skip=out.absolute()) for p in inputs]
    start = time.perf_counter()
    with _progress(progress) as bar:
        docs = _nonempty(tokenize(iter_documents(readers), tok, bar, _DONE_LABEL[kind]), readers)
        if max_tokens is not None:
            docs = _cap_tokens(docs, max_tokens)
        name = name or out.absolute().name
        if kind == "faiss":
            manifest = _write_faiss(out, docs, tok, name, _LazySources(readers), faiss or FaissOptions(), overwrite)
        else:
            manifest = write_datastore(out, docs, tok.info, name, _LazySources(readers),
                                       sorted_depth=sorted_depth, overwrite=overwrite)
    seconds = time.perf_counter() - start
    disk = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return BuildReport(out, manifest, tuple(r.summary() for r in readers), manifest.num_tokens,
                       manifest.num_documents, seconds, manifest.num_tokens / max(seconds, 1e-9), disk,
                       disk / max(manifest.num_tokens, 1))


def _replaceable(kind: str) -> frozenset[str]:
    """The file names an index that --overwrite may replace consists of."""
    from retriever.store.manifest import INDEX_FILES

    if kind == "faiss":
        from retriever.store.faiss_store import REPLACEABLE

        return REPLACEABLE
    return INDEX_FILES


def _write_faiss(out: Path, docs: Iterable[np.ndarray], tok: LoadedTokenizer, name: str, sources: Iterable[str],
                 opts: FaissOptions, overwrite: bool) -> FaissManifest:
    from retriever.store.embedding import LexicalEmbedder
    from retriever.store.faiss_store import write_faiss_store

    return write_faiss_store(out, docs, tok.info, name, sources, embedder=LexicalEmbedder(opts.dim),
                             windows=opts.windows, index_type=opts.index_type, overwrite=overwrite)


class _LazySources:
    """The readers' descriptions, taken when write_datastore iterates (after the documents)."""

    def __init__(self, readers: Sequence[InputReader]) -> None:
        self.readers = readers

    def __iter__(self) -> Iterator[str]:
        return (r.summary().describe() for r in self.readers)


def tokenize(texts: Iterable[str], tok: LoadedTokenizer, bar=None,
             done: str = "tokenized; sorting suffixes") -> Iterator[np.ndarray]:
    """int32[k] token ids of each text (no special tokens), encoded in batches."""
    # encode_batch_fast (tokenizers >= 0.21) skips the offsets we do not need.
    encode = getattr(tok.tokenizer, "encode_batch_fast", tok.tokenizer.encode_batch)
    with ThreadPoolExecutor(max_workers=1) as reader:
        batches = _batches(iter(texts))
        pending = reader.submit(next, batches, None)
        while (batch := pending.result()) is not None:
            pending = reader.submit(next, batches, None)  # read ahead while encoding
            encodings = encode(batch, add_special_tokens=False)
            arrays = [np.asarray(e.ids, dtype=np.int32) for e in encodings]
            if bar is not None:
                bar.update(sum(a.size for a in arrays))
            yield from arrays
    if bar is not None:
        bar.set_description_str(done)


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= BATCH_DOCUMENTS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _nonempty(docs: Iterator[np.ndarray], readers: Sequence[InputReader]) -> Iterator[np.ndarray]:
    """Passes the documents on; raises InvalidArgument at their end when they held no token."""
    tokens = 0
    for doc in docs:
        tokens += doc.size
        yield doc
    if tokens == 0:
        read = ", ".join(r.summary().describe() for r in readers)
        raise InvalidArgument(f"INPUT produced no documents: the inputs must hold at least one token, got none "
                              f"({read})")


def _cap_tokens(docs: Iterator[np.ndarray], max_tokens: int) -> Iterator[np.ndarray]:
    """Passes documents on until max_tokens tokens; the last one is cut to fit."""
    left = max_tokens
    for doc in docs:
        if left <= 0:
            return
        yield doc[:left]
        left -= min(left, doc.size)


class _progress:
    """A tqdm bar counting tokens (to stderr), or a no-op when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return None
        from tqdm import tqdm

        self.bar = tqdm(unit="tokens", unit_scale=True, desc="tokenizing", dynamic_ncols=True)
        return self.bar

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
