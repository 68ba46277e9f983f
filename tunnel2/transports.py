"""What carries frames: one small interface, three implementations.

Layer: just above frames. May import trio and trio-websocket; nothing above it in tunnel2.

A :class:`FrameTransport` moves opaque byte strings, each holding one or more whole frames
(PROTOCOL.md §1). The decoder does not depend on message boundaries, so a byte stream works as
well as a message-oriented WebSocket. Errors keep trio's meanings:
``trio.ClosedResourceError`` if we closed it, ``trio.BrokenResourceError`` if the peer went away.
"""

from __future__ import annotations

import abc
from typing import Final

import trio
import trio.testing
import trio_websocket

__all__ = [
    "FrameTransport",
    "StreamTransport",
    "WebSocketTransport",
    "lockstep_transport_pair",
    "memory_transport_pair",
]

_RECEIVE_SIZE: Final = 65536


class FrameTransport(trio.abc.AsyncResource):
    """Sends and receives byte strings holding whole frames.

    Only one task may call :meth:`send` and one :meth:`receive` at a time (the uplink's
    writer and reader tasks).
    """

    @abc.abstractmethod
    async def send(self, data: bytes) -> None:
        """Send ``data``; a cancelled or failed send leaves the transport broken.

        Raises:
            trio.BrokenResourceError: the peer went away.
            trio.ClosedResourceError: this side closed the transport.
        """

    @abc.abstractmethod
    async def receive(self) -> bytes | bytearray:
        """Return the next bytes from the peer, or ``b""`` once the peer closed.

        Raises:
            trio.BrokenResourceError: the connection broke.
            trio.ClosedResourceError: this side closed the transport.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close the transport; idempotent, and frees it even if cancelled."""


class StreamTransport(FrameTransport):
    """Frames over any :class:`trio.abc.Stream` (TCP, TLS, memory); frames are already
    length-prefixed, so the byte stream needs no extra framing."""

    def __init__(self, stream: trio.abc.Stream, *, receive_size: int = _RECEIVE_SIZE) -> None:
        self._stream = stream
        self._receive_size = receive_size

    def __repr__(self) -> str:
        return f"<StreamTransport {self._stream!r}>"

    async def send(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def receive(self) -> bytes | bytearray:
        return await self._stream.receive_some(self._receive_size)

    async def aclose(self) -> None:
        await self._stream.aclose()


class WebSocketTransport(FrameTransport):
    """Frames in binary messages of a trio-websocket connection.

    Args:
        ws: the connection.
        stream: the byte stream under it, if the caller opened it; :meth:`aclose` closes it
            too (trio-websocket leaves it open when the peer closed first).
    """

    def __init__(
        self, ws: trio_websocket.WebSocketConnection, stream: trio.abc.Stream | None = None
    ) -> None:
        self._ws = ws
        self._stream = stream

    def __repr__(self) -> str:
        return f"<WebSocketTransport {self._ws!r}>"

    async def send(self, data: bytes) -> None:
        try:
            await self._ws.send_message(data)
        except trio_websocket.ConnectionClosed as exc:
            raise trio.BrokenResourceError(f"websocket closed: {exc.reason}") from exc

    async def receive(self) -> bytes:
        try:
            message = await self._ws.get_message()
        except trio_websocket.ConnectionClosed:
            return b""
        if isinstance(message, str):
            raise trio.BrokenResourceError("text message on a binary frame transport")
        return bytes(message)

    async def aclose(self) -> None:
        try:
            await self._ws.aclose()
        finally:
            if self._stream is not None:
                await trio.aclose_forcefully(self._stream)


def memory_transport_pair() -> tuple[StreamTransport, StreamTransport]:
    """Two connected in-memory transports with buffering (fast tests)."""
    left, right = trio.testing.memory_stream_pair()
    return StreamTransport(left), StreamTransport(right)


def lockstep_transport_pair() -> tuple[StreamTransport, StreamTransport]:
    """Two connected in-memory transports with no buffering: a send blocks until the peer
    receives it, which proves backpressure."""
    left, right = trio.testing.lockstep_stream_pair()
    return StreamTransport(left), StreamTransport(right)
