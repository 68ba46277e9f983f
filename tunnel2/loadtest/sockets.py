"""The small socket interface the backend and the load generator run on, and a memory pair.

Layer: load-test kit, bottom. Imports trio only.

Both hot loops talk to a bare :class:`trio.socket.SocketType` (DESIGN.md, "Performance model":
bare sockets, one ``send`` per response). :class:`SocketLike` is the three methods they use, so
tests can run them over :func:`memory_socket_pair` with no kernel socket, where trio's
``MockClock`` with autojump is safe to use.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable
from typing import Protocol, final

import trio
import trio.testing

__all__ = ["MemorySocket", "SocketLike", "memory_socket_pair", "send_all"]


class SocketLike(Protocol):
    """What the backend and the load generator need of a connected stream socket.

    :class:`trio.socket.SocketType` satisfies it. ``recv`` returns ``b""`` at EOF; errors are
    :class:`OSError` (``ConnectionResetError`` and friends).
    """

    def send(self, data: bytes | bytearray | memoryview, /) -> Awaitable[int]:
        """Send some of ``data``; return how many bytes were sent."""
        ...

    def recv(self, bufsize: int, /) -> Awaitable[bytes]:
        """Receive up to ``bufsize`` bytes; ``b""`` means the peer closed its side."""
        ...

    def shutdown(self, how: int, /) -> None:
        """Shut down one or both directions (``socket.SHUT_WR``: send EOF to the peer)."""
        ...

    def close(self) -> None:
        """Close the socket; idempotent, never blocks."""
        ...


async def send_all(sock: SocketLike, data: bytes | bytearray) -> None:
    """Send all of ``data`` on ``sock``.

    Usually one ``send`` call; a partial send continues from where it stopped. A cancelled or
    failed call leaves an unknown part of ``data`` sent: the caller must close ``sock``.
    """
    sent = await sock.send(data)
    if sent < len(data):
        view = memoryview(data)
        while sent < len(view):
            sent += await sock.send(view[sent:])


@final
class MemorySocket:
    """One end of :func:`memory_socket_pair`: a :class:`SocketLike` over trio memory streams.

    ``close()`` gives the peer EOF; sending to a closed peer raises ``ConnectionResetError``.
    """

    def __init__(
        self,
        send_stream: trio.testing.MemorySendStream,
        receive_stream: trio.testing.MemoryReceiveStream,
    ) -> None:
        self._send_stream = send_stream
        self._receive_stream = receive_stream

    async def send(self, data: bytes | bytearray | memoryview, /) -> int:
        """Send all of ``data``; return its length."""
        try:
            await self._send_stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionResetError(errno.ECONNRESET, "memory socket peer closed") from exc
        return len(data)

    async def recv(self, bufsize: int, /) -> bytes:
        """Receive up to ``bufsize`` bytes; ``b""`` once the peer has closed."""
        try:
            return bytes(await self._receive_stream.receive_some(bufsize))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionResetError(errno.ECONNRESET, "memory socket closed") from exc

    def shutdown(self, how: int, /) -> None:
        """Close the sending direction (the peer reads EOF); ``how`` is ignored."""
        self._send_stream.close()

    def close(self) -> None:
        """Close both directions."""
        self._send_stream.close()
        self._receive_stream.close()


def memory_socket_pair() -> tuple[MemorySocket, MemorySocket]:
    """Return two connected :class:`MemorySocket` ends (unbounded buffers, no kernel)."""
    a_send, b_receive = trio.testing.memory_stream_one_way_pair()
    b_send, a_receive = trio.testing.memory_stream_one_way_pair()
    return MemorySocket(a_send, a_receive), MemorySocket(b_send, b_receive)
