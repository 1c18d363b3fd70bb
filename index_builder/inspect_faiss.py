"""`specdraft index inspect` for a FAISS datastore (format "specdraft-faiss").

Prints the manifest summary, verifies sizes and checksums, opens the index (memory-mapped)
and, given the tokenizer, checks it matches and decodes sample passages.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from retriever.faiss_manifest import FaissManifest

SAMPLE_TOKENS = 120  # tokens decoded per sample passage


def inspect_faiss(args: argparse.Namespace, tok) -> int:
    """Runs the inspection; `tok` is a LoadedTokenizer or None. Raises the store's errors."""
    from retriever.datastore import check_files
    from retriever.faiss_manifest import read_faiss_manifest
    from retriever.faiss_store import open_faiss_store
    from retriever.manifest import check_tokenizer

    m = read_faiss_manifest(args.dir)
    for line in faiss_manifest_lines(args.dir, m):
        print(line)
    t0 = time.perf_counter()
    check_files(args.dir, m, verify_checksums=not args.no_verify)  # type: ignore[arg-type]
    store = open_faiss_store(args.dir, verify_checksums=False)
    what = "sizes ok (checksums not verified)" if args.no_verify else "sha256 ok"
    print(f"{'files':<11}{what}; faiss index opened ({time.perf_counter() - t0:.2f} s)")
    if tok is not None:
        check_tokenizer(m, args.dir, tok.info)  # type: ignore[arg-type]
        print(f"{'tokenizer':<11}matches {tok.path}")
        n = max(args.samples, 0)
        for pid in sorted({len(store) * k // n for k in range(n)} if len(store) else ()):
            tokens = store.passage_tokens(pid)  # [k] int32
            text = tok.tokenizer.decode(tokens[:SAMPLE_TOKENS].tolist(), skip_special_tokens=False)
            cut = " ..." if tokens.size > SAMPLE_TOKENS else ""
            print(f"--- sample passage {pid:,}\n{text}{cut}")
    return 0


def faiss_manifest_lines(path: Path, m: FaissManifest) -> list[str]:
    """Human summary of a FaissManifest, one "key  value" line each."""
    from index_builder.cli import manifest_lines

    idx, w = m.index, m.windows
    index = f"{idx.type} ({idx.metric}" + (f", M {idx.hnsw_m}, efSearch {idx.ef_search})" if idx.type == "hnsw"
                                           else ", exact)")
    return manifest_lines(path, m, index, [
        ("embedder", f"{m.embedder.name} dim {m.embedder.dim} {m.embedder.params}"),
        ("passages", f"{m.num_passages:,} (window {w.window}, stride {w.stride}, continuation {w.continuation})")])
