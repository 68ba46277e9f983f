"""Small helpers shared by the layers that own nurseries, and by the command lines.

Layer: bottom. Imports trio and sniffio only. :func:`until_signalled` is public
(``tunnel2.until_signalled``).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import re
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import sniffio
import trio

_T = TypeVar("_T")

if TYPE_CHECKING:
    from mypy_extensions import mypyc_attr as mypyc_attr
else:

    def mypyc_attr(*args: Any, **kwargs: Any) -> Callable[[_T], _T]:
        """mypyc's class options (read by ``TUNNEL2_COMPILE=1`` builds at compile time);
        a no-op at run time, so that mypy_extensions is not a dependency."""
        return lambda cls: cls


def compiled_modules() -> list[str]:
    """The names of tunnel2's modules that run compiled (a ``TUNNEL2_COMPILE=1`` build),
    sorted; empty for the pure-Python build.

    A module is compiled when an extension module sits beside its source: Python's import
    system loads the extension first.
    """
    package = Path(__file__).parent
    return sorted(
        f"tunnel2.{path.name.partition('.')[0]}"
        for path in package.iterdir()
        if path.name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    )


_LABEL_RE: Final = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")

__all__ = [
    "compiled_modules",
    "domain_name",
    "mypyc_attr",
    "port_number",
    "positive_float",
    "positive_int",
    "require_async_library",
    "until_signalled",
    "unwrap_lone_error",
]


async def until_signalled(fn: Callable[..., Awaitable[_T]], *args: object) -> _T | None:
    """``await fn(*args)``, or ``None`` once SIGINT (Ctrl-C) or SIGTERM cancelled it.

    Made for ``trio.run(tunnel2.until_signalled, main)`` (``tunnel2 backend`` and ``tunnel2
    loadtest`` run so; ``server`` and ``http`` take the signals the same way, to drain). The
    signals come from a receiver: while it is open, trio raises no KeyboardInterrupt,
    which lands wherever the program happens to be and there can break trio's own bookkeeping
    (a task half way into ``Event.wait``: ``TrioInternalError``). What ``fn`` raises propagates;
    a ``fn`` that returns ``None`` itself cannot be told from a cancelled one.
    """
    result: list[_T] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def cancel_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(cancel_on_signal)
            result.append(await fn(*args))
            nursery.cancel_scope.cancel()
    return result[0] if result else None


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


def port_number(text: str) -> int:
    """An argparse ``type=``: a TCP port, 0 (any free one) to 65535; never wrapped around."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range 0-65535")
    return value


def domain_name(text: str) -> str:
    """An argparse ``type=``: a DNS name such as ``tunnels.example.com`` or ``localhost``."""
    name = text.strip().rstrip(".").lower()
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a domain name (letters, digits and hyphens, dot-separated)"
        )
    return name


def positive_int(text: str, least: int = 1) -> int:
    """An argparse ``type=``: a whole number of at least 1 (or ``least``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least {least}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse ``type=``: a whole number of at least 0."""
    return positive_int(text, 0)


def require_async_library(expected: str, name: str, instead: str) -> None:
    """Raise a clear error if the caller runs on another event loop than ``expected``.

    Called first thing by loop-specific entry points, so that the first error an asyncio
    caller of a trio API sees says what to use instead (not trio's confusion deep in a
    cleanup), and the other way round.

    Args:
        expected: the sniffio name of the library the entry point needs.
        name: the entry point, e.g. ``"tunnel2.open_tunnel"``.
        instead: what to call from other event loops.

    Raises:
        RuntimeError: the current async library is not ``expected``.
    """
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return  # not in async code at all: the library raises its own clear error
    if library != expected:
        raise RuntimeError(f"{name} runs on trio, but this code runs on {library}: use {instead}")
