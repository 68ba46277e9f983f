"""Small helpers shared by the layers that own nurseries, and by the command lines.

Layer: bottom. Imports trio only.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

import trio

__all__ = ["positive_float", "positive_int", "unwrap_lone_error"]


@contextmanager
def unwrap_lone_error() -> Iterator[None]:
    """Re-raise a nursery's exception group that holds one error besides cancellations as
    that error (trio's ``as_safe_channel`` habit), so callers can catch what they expect;
    groups nested by nested nurseries are looked through. Bigger groups pass unchanged."""
    try:
        yield
    except BaseExceptionGroup as group:
        error = _lone_error(group)
        if error is None:
            raise
        raise error from group


def _lone_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    # Nested nurseries nest groups: look through groups of one.
    errors = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
    if len(errors) != 1:
        return None
    if isinstance(errors[0], BaseExceptionGroup):
        return _lone_error(errors[0])
    return errors[0]


def positive_float(text: str) -> float:
    """An argparse ``type=``: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def positive_int(text: str) -> int:
    """An argparse ``type=``: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value
