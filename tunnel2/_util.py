"""Small helpers shared by the layers that own nurseries.

Layer: bottom. Imports trio only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio

__all__ = ["unwrap_lone_error"]


@contextmanager
def unwrap_lone_error() -> Iterator[None]:
    """Re-raise a nursery's exception group that holds one error besides cancellations as
    that error (trio's ``as_safe_channel`` habit), so callers can catch what they expect.
    Bigger groups pass through unchanged."""
    try:
        yield
    except BaseExceptionGroup as group:
        errors = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
        if len(errors) == 1 and not isinstance(errors[0], BaseExceptionGroup):
            raise errors[0] from group
        raise
