"""``tunnel2 backend`` and ``tunnel2 loadtest`` argument parsers (placeholder, being built)."""

from __future__ import annotations

import argparse


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the load-test subcommands on the ``tunnel2`` parser."""
