"""The ``tunnel2`` command line: argument parsing, logging set-up and ``trio.run``.

Layer: top. No logic of its own: every subcommand calls the library.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tunnel2.loadtest import cli as loadtest_cli


def build_parser() -> argparse.ArgumentParser:
    """Return the parser for every ``tunnel2`` subcommand."""
    parser = argparse.ArgumentParser(
        prog="tunnel2", description="An embeddable HTTP tunnel for Python, built on trio."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    loadtest_cli.add_parsers(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    args = build_parser().parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
