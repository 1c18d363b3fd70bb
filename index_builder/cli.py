"""`specdraft index build` and `specdraft index inspect` (suffix-array and FAISS datastores).

Errors a user can fix (bad inputs, options, corrupt indexes) print "error: ..." to
stderr and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from index_builder.inspect import inspect
from retriever.errors import SpecdraftError

EXIT_ERROR = 2


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
    i.set_defaults(run=_guarded(inspect))


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
    from retriever.store.faiss_manifest import WindowParams

    faiss = FaissOptions(args.index_type, args.dim, WindowParams(args.window, args.stride, args.continuation))
    report = build(args.inputs, args.tokenizer, args.out, name=args.name, glob=args.glob, exclude=args.exclude,
                   exclude_ids=args.exclude_ids, overwrite=args.overwrite, max_tokens=args.max_tokens,
                   progress=not args.no_progress, sorted_depth=args.sorted_depth, kind=args.kind, faiss=faiss)
    for summary in report.inputs:
        print(f"  {summary.describe()}")
    print(report.describe())
    return 0
