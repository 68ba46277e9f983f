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
import os
import struct
from collections.abc import Iterator
from typing import Final

import trio
import trio.testing
import wsproto
import wsproto.events
import wsproto.utilities
from wsproto.connection import ConnectionState, ConnectionType

try:  # websockets' masker in C (its wheels carry it), as websockets.frames imports it
    from websockets.speedups import apply_mask
except ImportError:  # a build without the C extension: its pure-Python twin
    from websockets.utils import apply_mask

from tunnel2._sockets import can_send_nowait
from tunnel2._util import mypyc_attr

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


@mypyc_attr(allow_interpreted_subclasses=True)  # a public base class
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


# --- the binary-message fast path (RFC 6455 §5) ------------------------------------------------
#
# wsproto parses and builds every frame through event objects, a bytearray buffer and a masker
# that walks the payload four bytes at a time: ~a fifth of a request's cost on each side. The
# data path needs only binary messages, so their frames are built and parsed here; wsproto keeps
# the handshake, every control frame (PING, PONG, CLOSE: their bytes are handed to it whole)
# and the connection's state, and is the oracle this codec is tested against
# (tests/test_transports.py).

_WS_BINARY_FIN: Final = 0x82
_WS_MASK_BIT: Final = 0x80
_WS_HEAD16: Final = struct.Struct("!BBH")
_WS_HEAD64: Final = struct.Struct("!BBQ")
_WS_U16: Final = struct.Struct("!H")
_WS_U64: Final = struct.Struct("!Q")
_WS_OP_CONTINUATION: Final = 0x0
_WS_OP_TEXT: Final = 0x1
_WS_OP_BINARY: Final = 0x2
_WS_OP_CLOSE: Final = 0x8
_WS_CONTROL: Final = frozenset({0x8, 0x9, 0xA})
_MASK_KEYS: Final = struct.Struct("4s" * 1024)  # masking keys per os.urandom call


class _WebSocketError(Exception):
    """The peer's bytes are not a valid WebSocket frame sequence for us."""


def _xor_mask(data: bytes | bytearray | memoryview, key: bytes, offset: int = 0) -> bytes:
    """``data`` XOR the 4-byte masking ``key`` (RFC 6455 §5.3), starting ``offset`` bytes
    into the key's cycle. websockets' C masker: ~11,000 instructions less than a big-integer
    XOR in Python for a 200-byte message, on each side of every message."""
    if offset:
        key = key[offset:] + key[:offset]
    return apply_mask(data, key)


def _binary_frame(data: bytes, key: bytes = b"") -> bytes:
    """One unfragmented binary WebSocket frame holding ``data``, masked with the 4-byte
    ``key`` if one is given (a client's frames must be, with a fresh unpredictable key each:
    RFC 6455 §5.3; see :func:`_draw_mask_keys`)."""
    size = len(data)
    bit = _WS_MASK_BIT if key else 0
    if size < 126:
        header = bytes((_WS_BINARY_FIN, size | bit))
    elif size < 65536:
        header = _WS_HEAD16.pack(_WS_BINARY_FIN, 126 | bit, size)
    else:
        header = _WS_HEAD64.pack(_WS_BINARY_FIN, 127 | bit, size)
    if not key:
        return header + data
    return b"".join((header, key, _xor_mask(data, key)))


def _draw_mask_keys() -> Iterator[bytes]:
    """A client's next masking keys, 4 bytes each from the system's CSPRNG, 1,024 per
    ``os.urandom`` call: one per frame is a ``getrandom`` system call per message (about one
    per request on the agent). Each key is used once, and none tells anything about the next
    (RFC 6455 §5.3 asks for no more). Split by one ``struct`` call and taken with
    ``next()``, both in C: a Python method per key cost ~1,300 instructions more per frame
    than ``os.urandom(4)``'s user-space part. One iterator per transport (one trio run)."""
    return iter(_MASK_KEYS.unpack(os.urandom(_MASK_KEYS.size)))


class _WebSocketReader:
    """Incremental parser of the frames one peer sends (sans-IO): the payload of binary
    messages comes out as it arrives (frames do not depend on message boundaries), control
    frames come out whole and raw, for wsproto.

    It checks what wsproto checks (no extension is negotiated): reserved bits clear, known
    opcodes, control frames unfragmented and at most 125 bytes, the shortest length encoding,
    the mask bit as the role requires, continuation frames only inside a message, no text.
    What it buffers is bounded by one header plus one control frame.
    """

    def __init__(self, *, masked: bool) -> None:
        self._masked = masked  # frames from the peer must be masked (we are the server)
        self._rest = b""  # a partial header or control frame
        self._remaining = 0  # payload bytes still to come in the current data frame
        self._key = b""  # its masking key, and how far into the key's cycle it is
        self._key_offset = 0
        self._in_message = False
        self.closed = False  # a CLOSE frame came: nothing after it is read
        self.control: list[bytes] = []  # control frames, raw, in order

    def receive_data(self, data: bytes | bytearray) -> bytes:
        """Parse ``data``; return the message payload bytes in it (maybe ``b""``); control
        frames are appended to :attr:`control`.

        Raises:
            _WebSocketError: the bytes break RFC 6455 (the reader must not be used again).
        """
        if self.closed:
            return b""
        if self._rest:
            data = self._rest + data
            self._rest = b""
        size = len(data)
        remaining = self._remaining
        if remaining >= size:  # the middle of a large frame, the common case
            self._remaining = remaining - size
            return self._unmask(data) if self._key else bytes(data)
        if not remaining and size > 2 and data[0] == _WS_BINARY_FIN and not self._in_message:
            # The common small message: exactly one whole unfragmented binary frame, with a
            # 7- or 16-bit length (the checks below are the loop's, for this case only).
            b1 = data[1]
            length = b1 & 0x7F
            header = 2
            if length == 126 and size > 4:
                header = 4
                length = (data[2] << 8) | data[3]
                if length < 126:
                    raise _WebSocketError("payload length not in its shortest form")
            # (a 64-bit length, or a 16-bit one not yet in, is left to the loop)
            if (header == 4 or length < 126) and (b1 & 0x80 == 0) is not self._masked:
                if self._masked:
                    if header + 4 + length == size:
                        return _xor_mask(data[header + 4 :], bytes(data[header : header + 4]))
                elif header + length == size:
                    return bytes(data[header:])
        out: list[bytes] = []
        pos = 0
        while pos < size:
            if remaining:
                end = pos + remaining if pos + remaining < size else size
                chunk = data[pos:end]
                out.append(self._unmask(chunk) if self._key else bytes(chunk))
                remaining -= end - pos
                pos = end
                continue
            if size - pos < 2:
                break
            b0 = data[pos]
            b1 = data[pos + 1]
            opcode = b0 & 0x0F
            if b0 & 0x70:
                raise _WebSocketError("reserved bit set")
            length = b1 & 0x7F
            control = opcode in _WS_CONTROL
            if control:
                if not b0 & 0x80:
                    raise _WebSocketError("fragmented control frame")
                if length > 125:
                    raise _WebSocketError("control frame over 125 bytes")
            elif opcode > _WS_OP_BINARY:
                raise _WebSocketError(f"invalid opcode 0x{opcode:x}")
            header = 2
            if length == 126:
                header = 4
                if size - pos < header:
                    break
                (length,) = _WS_U16.unpack_from(data, pos + 2)
                if length < 126:
                    raise _WebSocketError("payload length not in its shortest form")
            elif length == 127:
                header = 10
                if size - pos < header:
                    break
                (length,) = _WS_U64.unpack_from(data, pos + 2)
                if length < 65536:
                    raise _WebSocketError("payload length not in its shortest form")
                if length >> 63:
                    raise _WebSocketError("payload length with the high bit set")
            if bool(b1 & 0x80) is not self._masked:
                raise _WebSocketError(
                    "masked frame from the server" if b1 & 0x80 else "unmasked frame from a client"
                )
            key_at = pos + header
            if self._masked:
                header += 4
                if size - pos < header:
                    break
            if control:
                if size - pos < header + length:
                    break
                self.control.append(bytes(data[pos : pos + header + length]))
                pos += header + length
                if opcode == _WS_OP_CLOSE:
                    self.closed = True
                    size = pos  # what follows a CLOSE is not read (RFC 6455 §5.5.1)
                continue
            if opcode == _WS_OP_TEXT:
                raise _WebSocketError("text message on a binary frame transport")
            if (opcode == _WS_OP_CONTINUATION) is not self._in_message:
                raise _WebSocketError(
                    "new message inside a fragmented one"
                    if self._in_message
                    else "continuation frame outside a message"
                )
            self._in_message = not b0 & 0x80
            self._key = bytes(data[key_at : key_at + 4]) if self._masked else b""
            self._key_offset = 0
            remaining = length
            pos += header
        self._remaining = remaining
        if pos < size:
            self._rest = bytes(data[pos:size])
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)

    def _unmask(self, chunk: bytes | bytearray | memoryview) -> bytes:
        offset = self._key_offset
        self._key_offset = (offset + len(chunk)) & 3
        return _xor_mask(chunk, self._key, offset)


class WsprotoTransport(FrameTransport):
    """Frames in binary WebSocket messages, driven in the caller's task.

    A WebSocket library with its own reader task (trio-websocket) hands messages over a
    channel: one more task switch per message on the data path. This drives the protocol
    from the uplink's own reader and writer, and returns message data as soon as it arrives
    (frames don't depend on message boundaries). Binary messages go through the fast path
    above; wsproto does the handshake, the control frames and the connection's state.

    Build one with :func:`accept_websocket` or :func:`connect_websocket`.
    """

    def __init__(
        self, stream: trio.abc.Stream, ws: wsproto.WSConnection, initial: bytes = b""
    ) -> None:
        self._stream = stream
        # The fast path needs a stream that can send without waiting (TCP, TLS over TCP),
        # which keeps what the socket did not take and sends it first with the next write.
        self._fast = stream if can_send_nowait(stream) else None
        self._ws = ws
        # Whether wsproto's state is OPEN, kept here: only this class feeds or sends through
        # ``ws`` (its ``state`` is a property chain, read twice per message otherwise).
        self._open = ws.state is ConnectionState.OPEN
        client = ws.client
        # A client masks what it sends; a server gets masked frames.
        self._keys: Iterator[bytes] | None = iter(()) if client else None  # drawn when used
        self._reader = _WebSocketReader(masked=not client)
        self._initial = initial  # bytes that came right behind the handshake
        # Sent ahead of the next write: the PONG to the latest PING only (RFC 6455 §5.5.3
        # allows it, and a peer that pings without reading cannot grow it), close replies.
        self._pong = b""
        self._control: list[bytes] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"<WsprotoTransport {self._stream!r} {self._ws.state.name}>"

    def _message(self, data: bytes) -> bytes:
        if not self._open:
            raise trio.BrokenResourceError(f"websocket is closing ({self._ws.state.name})")
        keys = self._keys
        out = _binary_frame(
            data, (next(keys, None) or self._new_keys()) if keys is not None else b""
        )
        if self._control or self._pong:
            out = b"".join([self._pong, *self._control, out])
            self._control.clear()
            self._pong = b""
        return out

    def _new_keys(self) -> bytes:
        # The drawn keys are used up (once per 1,024 messages): draw more, return the first.
        self._keys = keys = _draw_mask_keys()
        return next(keys)

    async def send(self, data: bytes) -> None:
        await self._stream.send_all(self._message(data))

    def send_nowait(self, data: bytes) -> bool:
        stream = self._fast
        if stream is None or stream.send_pending or not self._open:
            return False  # (until the rest is out, no second message may overtake it)
        if self._control or self._pong:
            stream.send_nowait(self._message(data))
        else:  # _message's common case, inlined (a call less per message)
            keys = self._keys
            key = (next(keys, None) or self._new_keys()) if keys is not None else b""
            stream.send_nowait(_binary_frame(data, key))
        return True

    @property
    def pending(self) -> bool:
        stream = self._fast
        return stream is not None and stream.send_pending

    async def flush(self) -> None:
        await self._stream.send_all(b"")

    async def receive(self) -> bytes | bytearray:
        reader = self._reader
        read_before = False
        data: bytes | bytearray
        while True:
            if self._closed:
                return b""
            if self._initial:
                data, self._initial = self._initial, b""
            else:
                if read_before:
                    # What we read held no message data (PINGs, a partial header): let
                    # other tasks run before reading more, however fast the peer sends such
                    # bytes (a FastSocketStream with data ready returns without a checkpoint).
                    await trio.lowlevel.checkpoint()
                read_before = True
                data = await self._stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    return b""
            try:
                payload = reader.receive_data(data)
            except _WebSocketError as exc:
                self._closed = True
                raise trio.BrokenResourceError(f"invalid websocket data: {exc}") from exc
            if reader.control:
                self._control_frames()
            if payload:
                return payload

    def _control_frames(self) -> None:
        # wsproto parses the control frames and keeps the connection's state (CLOSE).
        ws = self._ws
        try:
            ws.receive_data(b"".join(self._reader.control))
            self._reader.control.clear()
            for event in ws.events():
                if isinstance(event, wsproto.events.Ping):
                    self._pong = ws.send(event.response())
                elif isinstance(event, wsproto.events.CloseConnection):
                    if ws.state is ConnectionState.REMOTE_CLOSING:
                        self._control.append(ws.send(event.response()))
                    self._closed = True
                    return
        finally:
            self._open = ws.state is ConnectionState.OPEN

    async def aclose(self) -> None:
        if not self._closed and self._open:
            self._closed = True
            self._open = False
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
    received = b""
    while True:
        data = await stream.receive_some(_RECEIVE_SIZE)
        if not data:
            raise trio.BrokenResourceError("the server closed during the WebSocket handshake")
        received += data
        end = received.find(b"\r\n\r\n")
        if end < 0:
            if len(received) > _RECEIVE_SIZE:
                raise trio.BrokenResourceError("the WebSocket handshake answer is too large")
            continue
        # wsproto gets the answer's head only: what follows is frames, for the fast path.
        ws.receive_data(received[: end + 4])
        for event in ws.events():
            if isinstance(event, wsproto.events.AcceptConnection):
                return WsprotoTransport(stream, ws, received[end + 4 :])
            if isinstance(event, wsproto.events.RejectConnection):
                # A redirect says where to go (a TLS relay sends plain ws:// to https://).
                location = dict(event.headers).get(b"location", b"").decode("latin-1")
                raise trio.BrokenResourceError(
                    f"the server refused the WebSocket upgrade with HTTP {event.status_code}"
                    + (f" (redirect to {location})" if location else "")
                )
        raise trio.BrokenResourceError("the server's answer to the WebSocket upgrade is incomplete")
