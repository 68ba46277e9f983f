"""What carries frames: one small interface, two implementations (and in-memory pairs).

Layer: just above frames. May import trio, wsproto and the stream layer
(:mod:`tunnel2._sockets`); nothing above it in tunnel2.

There is one WebSocket transport, :class:`WsprotoTransport`, for ``ws://`` (over a
:class:`~tunnel2._sockets.FastSocketStream`) and ``wss://`` (over a
:class:`~tunnel2._tls.TlsStream`) alike (STYLE.md §10, "one of each").

A :class:`FrameTransport` moves opaque byte strings, each holding one or more whole frames
(PROTOCOL.md §1). The decoder does not depend on message boundaries, so a byte stream works as
well as a message-oriented WebSocket. Errors keep trio's meanings:
``trio.ClosedResourceError`` if we closed it, ``trio.BrokenResourceError`` if the peer went away.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Final

import trio
import trio.testing
import wsproto
import wsproto.events
import wsproto.utilities
from wsproto.connection import ConnectionState, ConnectionType

from tunnel2._sockets import can_send_nowait

__all__ = [
    "FrameTransport",
    "StreamTransport",
    "WsprotoTransport",
    "accept_websocket",
    "connect_websocket",
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

    def send_nowait(self, data: bytes) -> bool:
        """Try to send ``data`` at once from the calling task, without waiting.

        Returns False (and sends nothing) when that isn't possible now; then ``data`` must go
        through :meth:`send`. True means it is sent, or that what the socket didn't take yet
        will go out ahead of the next :meth:`send` or :meth:`flush`. Never called while a
        :meth:`send` is in progress.
        """
        return False

    @property
    def pending(self) -> bool:
        """True if bytes accepted by :meth:`send_nowait` still wait for :meth:`flush`."""
        return False

    async def flush(self) -> None:
        """Send what :meth:`send_nowait` left behind."""
        await trio.lowlevel.checkpoint()


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


def memory_transport_pair() -> tuple[StreamTransport, StreamTransport]:
    """Two connected in-memory transports with buffering (fast tests)."""
    left, right = trio.testing.memory_stream_pair()
    return StreamTransport(left), StreamTransport(right)


def lockstep_transport_pair() -> tuple[StreamTransport, StreamTransport]:
    """Two connected in-memory transports with no buffering: a send blocks until the peer
    receives it, which proves backpressure."""
    left, right = trio.testing.lockstep_stream_pair()
    return StreamTransport(left), StreamTransport(right)


class WsprotoTransport(FrameTransport):
    """Frames in binary WebSocket messages, driven by wsproto in the caller's task.

    A WebSocket library with its own reader task (trio-websocket) hands messages over a
    channel: one more task switch per message on the data path. This drives the protocol
    engine (wsproto) from the uplink's own reader and writer, and returns message data as soon
    as it arrives (frames don't depend on message boundaries).

    Build one with :func:`accept_websocket` or :func:`connect_websocket`.
    """

    def __init__(self, stream: trio.abc.Stream, ws: wsproto.WSConnection) -> None:
        self._stream = stream
        # The fast path needs a stream that can send without waiting (TCP, TLS over TCP),
        # which keeps what the socket did not take and sends it first with the next write.
        self._fast = stream if can_send_nowait(stream) else None
        self._ws = ws
        # Sent ahead of the next write: the PONG to the latest PING only (RFC 6455 §5.5.3
        # allows it, and a peer that pings without reading cannot grow it), close replies.
        self._pong = b""
        self._control: list[bytes] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"<WsprotoTransport {self._stream!r} {self._ws.state.name}>"

    async def send(self, data: bytes) -> None:
        try:
            out = self._ws.send(wsproto.events.BytesMessage(data=data))
        except wsproto.utilities.LocalProtocolError as exc:
            raise trio.BrokenResourceError(f"websocket is closing: {exc}") from exc
        if self._control or self._pong:
            out = b"".join([self._pong, *self._control, out])
            self._control.clear()
            self._pong = b""
        await self._stream.send_all(out)

    def send_nowait(self, data: bytes) -> bool:
        stream = self._fast
        if stream is None or stream.send_pending:
            return False  # (until the rest is out, no second message may overtake it)
        try:
            out = self._ws.send(wsproto.events.BytesMessage(data=data))
        except wsproto.utilities.LocalProtocolError:
            return False  # closing: let send() report it
        if self._control or self._pong:
            out = b"".join([self._pong, *self._control, out])
            self._control.clear()
            self._pong = b""
        stream.send_nowait(out)
        return True

    @property
    def pending(self) -> bool:
        stream = self._fast
        return stream is not None and stream.send_pending

    async def flush(self) -> None:
        await self._stream.send_all(b"")

    async def receive(self) -> bytes | bytearray:
        ws = self._ws
        read_before = False
        while True:
            chunks: list[bytes] = []
            for event in ws.events():
                if isinstance(event, wsproto.events.BytesMessage):
                    chunks.append(bytes(event.data))
                elif isinstance(event, wsproto.events.Ping):
                    self._pong = ws.send(event.response())
                elif isinstance(event, wsproto.events.CloseConnection):
                    if ws.state is ConnectionState.REMOTE_CLOSING:
                        self._control.append(ws.send(event.response()))
                    self._closed = True
                elif isinstance(event, wsproto.events.TextMessage):
                    raise trio.BrokenResourceError("text message on a binary frame transport")
            if chunks:
                return b"".join(chunks)
            if self._closed:
                return b""
            if read_before:
                # What we read held no message data (PINGs, a partial header): let other tasks
                # run before reading more, however fast the peer sends such bytes (a
                # FastSocketStream with data ready returns without a checkpoint).
                await trio.lowlevel.checkpoint()
            read_before = True
            data = await self._stream.receive_some(_RECEIVE_SIZE)
            if not data:
                return b""
            try:
                ws.receive_data(bytes(data))
            except wsproto.utilities.RemoteProtocolError as exc:
                raise trio.BrokenResourceError(f"invalid websocket data: {exc}") from exc

    async def aclose(self) -> None:
        if not self._closed and self._ws.state is ConnectionState.OPEN:
            self._closed = True
            with trio.move_on_after(1) as scope:
                scope.shield = True
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._stream.send_all(
                        b"".join(
                            [
                                self._pong,
                                *self._control,
                                self._ws.send(wsproto.events.CloseConnection(1000)),
                            ]
                        )
                    )
        await trio.aclose_forcefully(self._stream)


async def accept_websocket(stream: trio.abc.Stream, request: bytes) -> WsprotoTransport:
    """Answer a WebSocket upgrade whose request head (``request``) was read from ``stream``.

    Raises:
        trio.BrokenResourceError: the request is not a valid WebSocket upgrade (a 400 went
            out) or the client went away.
    """
    ws = wsproto.WSConnection(ConnectionType.SERVER)
    try:
        ws.receive_data(request)
        for event in ws.events():
            if isinstance(event, wsproto.events.Request):
                await stream.send_all(ws.send(wsproto.events.AcceptConnection()))
                return WsprotoTransport(stream, ws)
            break
    except wsproto.utilities.RemoteProtocolError:
        pass  # answered below
    body = b"" if request.startswith(b"HEAD ") else b"not a valid WebSocket upgrade\n"
    with trio.move_on_after(1):
        await stream.send_all(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 30\r\nConnection: close\r\n\r\n" + body
        )
    raise trio.BrokenResourceError("not a valid WebSocket upgrade request")


async def connect_websocket(stream: trio.abc.Stream, host: str, resource: str) -> WsprotoTransport:
    """Run the client side of a WebSocket handshake on ``stream``.

    Takes no timeout: callers use :func:`trio.fail_after`.

    Raises:
        trio.BrokenResourceError: the server refused the upgrade or went away.
    """
    ws = wsproto.WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(wsproto.events.Request(host=host, target=resource)))
    while True:
        data = await stream.receive_some(_RECEIVE_SIZE)
        if not data:
            raise trio.BrokenResourceError("the server closed during the WebSocket handshake")
        ws.receive_data(bytes(data))
        for event in ws.events():
            if isinstance(event, wsproto.events.AcceptConnection):
                return WsprotoTransport(stream, ws)
            if isinstance(event, wsproto.events.RejectConnection):
                # A redirect says where to go (a TLS relay sends plain ws:// to https://).
                location = dict(event.headers).get(b"location", b"").decode("latin-1")
                raise trio.BrokenResourceError(
                    f"the server refused the WebSocket upgrade with HTTP {event.status_code}"
                    + (f" (redirect to {location})" if location else "")
                )
