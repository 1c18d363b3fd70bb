"""`specdraft index build` and `specdraft index inspect` (suffix-array and FAISS datastores).

Errors a user can fix (bad inputs, options, corrupt indexes) print "error: ..." to
stderr and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from retriever.errors import SpecdraftError

EXIT_ERROR = 2
SAMPLE_TOKENS = 120  # tokens decoded per sample document


def register(subparsers) -> None:
    """Adds the `index` command with its `build` and `inspect` subcommands."""
    index = subparsers.add_parser("index", help="build and inspect corpus datastores",
                                  description="Build and inspect corpus datastores.")
    sub = index.add_subparsers(dest="index_command", required=True)

    b = sub.add_parser("build", help="tokenize INPUTs into a corpus datastore",
                       description="Tokenize INPUTs (directories, .jsonl with a 'text' field, ShareGPT "
                                   ".json) into a corpus datastore at OUT_DIR (atomically).")
    b.add_argument("inputs", nargs="+", metavar="INPUT", help="directory, .jsonl or ShareGPT .json file")
    b.add_argument("--tokenizer", required=True, metavar="DIR_OR_FILE",
                   help="the target model's tokenizer.json, or a directory holding it")
    b.add_argument("--out", required=True, type=Path, metavar="OUT_DIR", help="datastore directory to create")
    b.add_argument("--name", help="datastore name (default: OUT_DIR's name)")
    b.add_argument("--glob", metavar="PAT", help="in directories, only files matching PAT (e.g. '*.py')")
    b.add_argument("--exclude", action="append", default=[], metavar="PAT",
                   help="in directories, skip files and subdirectories matching PAT (repeatable)")
    b.add_argument("--exclude-ids", metavar="FILE", help="JSON list of ShareGPT conversation ids to leave out")
    b.add_argument("--overwrite", action="store_true", help="replace an existing datastore at OUT_DIR")
    b.add_argument("--max-tokens", type=_positive_int, metavar="N", help="stop after N tokens")
    b.add_argument("--sorted-depth", type=_positive_int, default=256, metavar="N",
                   help="suffixes are sorted on their first N tokens (default 256)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    _faiss_arguments(b)
    b.set_defaults(run=_guarded(_build))

    i = sub.add_parser("inspect", help="print a datastore's manifest and verify its files (either kind)",
                       description="Print a datastore's manifest summary and verify its checksums.")
    i.add_argument("dir", type=Path, metavar="DIR")
    i.add_argument("--tokenizer", metavar="DIR_OR_FILE", help="check it matches and decode sample documents")
    i.add_argument("--samples", type=int, default=3, metavar="N", help="sample documents to decode (default 3)")
    i.add_argument("--no-verify", action="store_true", help="skip the sha256 checks")
    i.set_defaults(run=_guarded(_inspect))


def _faiss_arguments(b: argparse.ArgumentParser) -> None:
    """--kind and the options of a FAISS build."""
    b.add_argument("--kind", choices=("suffix_array", "faiss"), default="suffix_array",
                   help="suffix_array (default): exact suffix matching; faiss: passage retrieval by embedding "
                        "(needs the 'faiss' extra)")
    g = b.add_argument_group("faiss datastores (--kind faiss)")
    g.add_argument("--index-type", choices=("auto", "flat", "hnsw"), default="auto",
                   help="auto (default): exact flat below 100k passages, HNSW above")
    g.add_argument("--dim", type=_positive_int, default=512, metavar="N", help="embedding dimension (default 512)")
    g.add_argument("--window", type=_positive_int, default=256, metavar="N",
                   help="tokens embedded per passage (default 256)")
    g.add_argument("--stride", type=_positive_int, default=192, metavar="N",
                   help="tokens between passage starts in a document (default 192)")
    g.add_argument("--continuation", type=int, default=256, metavar="N",
                   help="tokens kept after each window as drafting material (default 256)")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}")
    return v


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """fn, with expected errors printed as one "error: ..." line (exit 2)."""
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except SpecdraftError as e:
            print(f"error: {e}", file=sys.stderr)
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
        return EXIT_ERROR
    return run


def _build(args: argparse.Namespace) -> int:
    from index_builder.build import FaissOptions, build
    from retriever.faiss_manifest import WindowParams

    faiss = FaissOptions(args.index_type, args.dim, WindowParams(args.window, args.stride, args.continuation))
    report = build(args.inputs, args.tokenizer, args.out, name=args.name, glob=args.glob, exclude=args.exclude,
                   exclude_ids=args.exclude_ids, overwrite=args.overwrite, max_tokens=args.max_tokens,
                   progress=not args.no_progress, sorted_depth=args.sorted_depth, kind=args.kind, faiss=faiss)
    for summary in report.inputs:
        print(f"  {summary.describe()}")
    print(report.describe())
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from retriever.datastore import check_files, check_tokenizer, open_datastore, read_manifest
    from retriever.faiss_manifest import FAISS_FORMAT
    from retriever.manifest import index_format

    tok = None
    if args.tokenizer:
        from index_builder.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    if index_format(args.dir) == FAISS_FORMAT:
        from index_builder.inspect_faiss import inspect_faiss

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

    from retriever.datastore import read_tokens

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
