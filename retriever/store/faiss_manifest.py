"""The manifest of a FAISS datastore (format "specdraft-faiss", version 1).

`manifest.json` is written last by a build; see `retriever.store.faiss_store` for the files it
describes. `read_faiss_manifest` checks every field and the counts' consistency, raising
IndexFormatError with the file and field named (the "must be X, got Y" style of
`retriever.store.manifest`). Pure module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retriever.errors import IndexFormatError
from retriever.store.manifest import (
    MANIFEST_FILE,
    TOKEN_WIDTH_BYTES,
    BuildInfo,
    FileInfo,
    TokenizerInfo,
    _Fields,
    check_header,
    load_manifest_json,
    manifest_json,
    parse_build,
    parse_files,
    parse_sources,
    parse_tokenizer,
)

FAISS_FORMAT = "specdraft-faiss"
FAISS_FORMAT_VERSION = 1
FAISS_KIND = "faiss"
METRIC = "inner_product"
INDEX_TYPES = ("flat", "hnsw")
INDEX_FILE, TOKENS_FILE, PASSAGES_FILE, EMBEDDER_FILE = "index.faiss", "tokens.u24", "passages.i64", "embedder.f32"
FAISS_FILES = frozenset({INDEX_FILE, TOKENS_FILE, PASSAGES_FILE, EMBEDDER_FILE, MANIFEST_FILE})
PASSAGE_FIELDS = 3  # passages.i64 rows: (start, window_end, end) positions in tokens.u24


@dataclass(frozen=True)
class WindowParams:
    """How documents are cut into passages: embedded windows plus continuation tokens."""

    window: int = 256  # tokens embedded per passage
    stride: int = 192  # window starts are this far apart within a document
    continuation: int = 256  # tokens after the window kept as continuation material


@dataclass(frozen=True)
class EmbedderInfo:
    name: str
    params: dict[str, Any]
    dim: int
    state_len: int  # float32 entries of embedder.f32


@dataclass(frozen=True)
class IndexInfo:
    type: str  # "flat" (IndexFlatIP) | "hnsw" (IndexHNSWFlat)
    metric: str  # "inner_product"
    hnsw_m: int  # 0 for flat
    ef_construction: int
    ef_search: int


@dataclass(frozen=True)
class FaissManifest:
    """The parsed, validated manifest.json of a FAISS datastore."""

    format: str
    format_version: int
    kind: str
    name: str
    tokenizer: TokenizerInfo
    embedder: EmbedderInfo
    index: IndexInfo
    windows: WindowParams
    num_passages: int
    num_tokens: int
    num_documents: int
    num_positions: int  # tokens + one separator per document, as in tokens.u24
    token_width_bytes: int
    files: dict[str, FileInfo]
    sources: tuple[str, ...]
    build: BuildInfo

    def to_json(self) -> str:
        return manifest_json(self)


def read_faiss_manifest(root: Path) -> FaissManifest:
    """Parses and validates `root`/manifest.json of a FAISS datastore (fields and counts only)."""
    return parse_faiss_manifest(load_manifest_json(root), root / MANIFEST_FILE)


def parse_faiss_manifest(raw: Any, mpath: Path) -> FaissManifest:
    f = _Fields(raw, str(mpath))
    check_header(f, FAISS_FORMAT, FAISS_FORMAT_VERSION, FAISS_KIND)
    m = FaissManifest(
        format=FAISS_FORMAT, format_version=FAISS_FORMAT_VERSION, kind=FAISS_KIND, name=f.get("name", str),
        tokenizer=parse_tokenizer(f.sub("tokenizer")), embedder=_embedder(f.sub("embedder")),
        index=_index(f.sub("index")), windows=_windows(f.sub("windows")),
        num_passages=f.count("num_passages"), num_tokens=f.count("num_tokens"),
        num_documents=f.count("num_documents"), num_positions=f.count("num_positions"),
        token_width_bytes=TOKEN_WIDTH_BYTES,
        files=parse_files(f.sub("files"), (INDEX_FILE, TOKENS_FILE, PASSAGES_FILE, EMBEDDER_FILE)),
        sources=parse_sources(f), build=parse_build(f.sub("build")))
    _check_counts(m, str(mpath))
    return m


def _embedder(e: _Fields) -> EmbedderInfo:
    return EmbedderInfo(e.get("name", str), e.get("params", dict, want="a JSON object"),
                        e.get("dim", int, lambda v: v >= 1, "a positive integer"), e.count("state_len"))


def _index(i: _Fields) -> IndexInfo:
    return IndexInfo(i.get("type", str, lambda v: v in INDEX_TYPES, f"one of {INDEX_TYPES}"),
                     i.get("metric", str, lambda v: v == METRIC, f"'{METRIC}'"),
                     i.count("hnsw_m"), i.count("ef_construction"), i.count("ef_search"))


def _windows(w: _Fields) -> WindowParams:
    pos = (int, lambda v: v >= 1, "a positive integer")
    return WindowParams(w.get("window", *pos), w.get("stride", *pos), w.count("continuation"))


def _check_counts(m: FaissManifest, where: str) -> None:
    expected = [
        ("num_positions", m.num_tokens + m.num_documents, m.num_positions, "num_tokens + num_documents"),
        (f"files.{TOKENS_FILE}.bytes", m.num_positions * TOKEN_WIDTH_BYTES, m.files[TOKENS_FILE].bytes,
         "3 * num_positions"),
        (f"files.{PASSAGES_FILE}.bytes", m.num_passages * PASSAGE_FIELDS * 8, m.files[PASSAGES_FILE].bytes,
         "24 * num_passages"),
        (f"files.{EMBEDDER_FILE}.bytes", m.embedder.state_len * 4, m.files[EMBEDDER_FILE].bytes,
         "4 * embedder.state_len"),
    ]
    for field, want, got, how in expected:
        if want != got:
            raise IndexFormatError(f"{where}: field '{field}' must be {want} ({how}), got {got}")
    if m.index.type == "hnsw" and m.index.hnsw_m < 2:
        raise IndexFormatError(f"{where}: field 'index.hnsw_m' must be at least 2 for hnsw, got {m.index.hnsw_m}")
