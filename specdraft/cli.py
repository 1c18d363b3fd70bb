"""The `specdraft` console script: one entry point, subcommands per component.

Each component module exposes `register(subparsers)`, adding its commands with
`set_defaults(run=callable)`; the callable takes the parsed args and returns an
exit code.
"""

import argparse
import sys
from typing import Sequence

from specdraft import __version__


def build_parser() -> argparse.ArgumentParser:
    from index_builder import cli as index_cli
    from retriever.service import cli as retriever_cli
    from specdraft import demo, generate
    from specdraft.bench import cli as bench_cli
    from specdraft.fuzz import cli as fuzz_cli
    from verifier.api import cli as verifier_cli

    parser = argparse.ArgumentParser(prog="specdraft", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"specdraft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    index_cli.register(sub)
    retriever_cli.register(sub)
    verifier_cli.register(sub)
    generate.register(sub)
    demo.register(sub)
    bench_cli.register(sub)
    fuzz_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
