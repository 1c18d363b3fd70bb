"""`specdraft index inspect DIR`: either kind of index (suffix-array datastore, FAISS store).

Prints the manifest summary, verifies sizes and checksums, opens the index (memory-mapped)
and, given the tokenizer, checks it matches and decodes sample documents (or passages).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

from retriever.store.faiss_manifest import FaissManifest

SAMPLE_TOKENS = 120  # tokens decoded per sample document or passage


def inspect_faiss(args: argparse.Namespace, tok) -> int:
    """Runs the inspection; `tok` is a LoadedTokenizer or None. Raises the store's errors."""
    from retriever.store.datastore import check_files
    from retriever.store.faiss_manifest import read_faiss_manifest
    from retriever.store.faiss_store import open_faiss_store
    from retriever.store.manifest import check_tokenizer

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
    idx, w = m.index, m.windows
    index = f"{idx.type} ({idx.metric}" + (f", M {idx.hnsw_m}, efSearch {idx.ef_search})" if idx.type == "hnsw"
                                           else ", exact)")
    return manifest_lines(path, m, index, [
        ("embedder", f"{m.embedder.name} dim {m.embedder.dim} {m.embedder.params}"),
        ("passages", f"{m.num_passages:,} (window {w.window}, stride {w.stride}, continuation {w.continuation})")])


def inspect(args: argparse.Namespace) -> int:
    """Runs `specdraft index inspect` on either kind of index; raises the stores' errors."""
    from retriever.store.datastore import check_files, check_tokenizer, open_datastore, read_manifest
    from retriever.store.faiss_manifest import FAISS_FORMAT
    from retriever.store.manifest import index_format

    tok = None
    if args.tokenizer:
        from retriever.store.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    if index_format(args.dir) == FAISS_FORMAT:
        return inspect_faiss(args, tok)
    m = read_manifest(args.dir)
    for line in manifest_lines(args.dir, m, f"sorted_depth {m.sorted_depth}"):
        print(line)
    t0 = time.perf_counter()
    check_files(args.dir, m, verify_checksums=not args.no_verify)
    ds = open_datastore(args.dir, verify_checksums=False)
    what = "sizes ok (checksums not verified)" if args.no_verify else "sha256 ok"
    print(f"{'files':<11}{what} ({time.perf_counter() - t0:.2f} s)")
    if tok is not None:
        check_tokenizer(m, args.dir, tok.info)
        print(f"{'tokenizer':<11}matches {tok.path}")
        for pos, doc in sample_documents(ds, args.samples):
            text = tok.tokenizer.decode(doc[:SAMPLE_TOKENS].tolist(), skip_special_tokens=False)
            cut = " ..." if doc.size > SAMPLE_TOKENS else ""
            print(f"--- sample at position {pos:,}\n{text}{cut}")
    return 0


def manifest_lines(path: Path, m, format_detail: str, extra: Sequence[tuple[str, str]] = ()) -> list[str]:
    """Human summary of either kind's manifest, one "key  value" line each; `format_detail` goes
    after the kind on the format line, `extra` rows after it."""
    files = ", ".join(f"{n} {f.bytes / 1e6:,.1f} MB" for n, f in m.files.items())
    disk = sum(f.bytes for f in m.files.values())
    rows = [
        ("index", str(path)),
        ("name", m.name),
        ("format", f"{m.format} v{m.format_version} ({m.kind}, {format_detail})"),
        *extra,
        ("tokenizer", f"{m.tokenizer.name} (vocab {m.tokenizer.vocab_size:,}, sha256 {m.tokenizer.sha256[:16]})"),
        ("tokens", f"{m.num_tokens:,} in {m.num_documents:,} documents"),
        ("data", f"{files} ({disk / max(m.num_tokens, 1):.2f} bytes/token)"),
        ("built", f"{m.build.created_at} by specdraft {m.build.specdraft_version} in {m.build.seconds:.1f} s"),
    ]
    rows += [("source", s) for s in m.sources]
    return [f"{k:<11}{v}" for k, v in rows]


def sample_documents(ds, n: int) -> list[tuple[int, Any]]:
    """Up to n (position, int32 tokens) document starts spread evenly over the datastore.

    The tokens run to the document's end, or at most SAMPLE_TOKENS + 1 of them.
    """
    import numpy as np

    from retriever.store.datastore import read_tokens

    total, out = ds.manifest.num_positions, []
    for k in range(max(n, 0)):
        start = total * k // n
        window = read_tokens(ds, start, min(total, start + 8192))  # int32[<= 8192]
        if start > 0:  # move on to the next document start, if one is near
            seps = np.flatnonzero(window == -1)
            skip = int(seps[0]) + 1 if seps.size and seps[0] + 1 < window.size else 0
            start, window = start + skip, window[skip:]
        ends = np.flatnonzero(window == -1)
        doc = window[: int(ends[0]) if ends.size else SAMPLE_TOKENS + 1][: SAMPLE_TOKENS + 1]
        if doc.size and (not out or out[-1][0] != start):
            out.append((start, doc))
    return out
