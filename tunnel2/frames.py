"""The sans-IO frame codec of the tunnel protocol (PROTOCOL.md).

Layer: bottom. May import the standard library, attrs and :mod:`tunnel2.errors`; no trio, no
sockets, no clock, no logging (a test enforces this).

Shape, after h11 and wsproto: push bytes in with :meth:`FrameDecoder.receive_data`, pull frames
out with :meth:`FrameDecoder.next_frame` (``None`` means "need more bytes"), and turn frames into
bytes with :func:`encode`.

Invariants:

* Frames are frozen attrs classes that validate in their constructor, so an invalid frame can
  neither be encoded nor come out of the decoder. Constructor errors are
  :class:`~tunnel2.errors.LocalProtocolError`; the decoder re-types them as
  :class:`~tunnel2.errors.RemoteProtocolError`.
* A frame header is checked against ``max_frame_size`` as soon as its 10 bytes are in, before
  any of the payload is buffered.
* Once the decoder has raised it stays failed: every later call raises the same error.
"""

from __future__ import annotations

import json
import string
import struct
from typing import Any, ClassVar, Final, TypeAlias

import attrs

from tunnel2.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "CAPABILITIES",
    "DEFAULT_MAX_FRAME_SIZE",
    "END_STREAM",
    "HEADER_SIZE",
    "MAX_STREAM_ID",
    "MAX_WINDOW",
    "MIN_MAX_FRAME_SIZE",
    "PROTOCOL_VERSION",
    "TYPE_DATA",
    "TYPE_END",
    "TYPE_OPEN",
    "Data",
    "End",
    "Frame",
    "FrameDecoder",
    "GoAway",
    "Hello",
    "Open",
    "Ping",
    "Pong",
    "Refuse",
    "Reset",
    "StreamItem",
    "Welcome",
    "Window",
    "encode",
    "encode_data",
    "encode_end",
    "encode_open",
]

PROTOCOL_VERSION: Final = 1
HEADER_SIZE: Final = 10
MIN_MAX_FRAME_SIZE: Final = 1024
DEFAULT_MAX_FRAME_SIZE: Final = 65536
MAX_STREAM_ID: Final = 2**32 - 1
MAX_WINDOW: Final = 2**31 - 1

# length (payload bytes), type, flags, stream id -- PROTOCOL.md §2.
_HEADER: Final = struct.Struct("!IBBI")
_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")
_GOAWAY: Final = struct.Struct("!IH")

_FLAG_NONE: Final = 0
_FLAG_END: Final = 0x01  # END_STREAM on OPEN and DATA, once negotiated (PROTOCOL.md §2.1)

# The optional features this side speaks (HELLO/WELCOME ``capabilities``, PROTOCOL.md §3).
END_STREAM: Final = "end_stream"
CAPABILITIES: Final = (END_STREAM,)
_NO_LIMIT: Final = -1  # FrameDecoder._take: every complete frame

_TYPE_HELLO: Final = 0x01
_TYPE_WELCOME: Final = 0x02
_TYPE_REFUSE: Final = 0x03
_TYPE_OPEN: Final = 0x10
_TYPE_DATA: Final = 0x11
_TYPE_END: Final = 0x12
TYPE_OPEN: Final = _TYPE_OPEN
TYPE_DATA: Final = _TYPE_DATA
TYPE_END: Final = _TYPE_END
_TYPE_RESET: Final = 0x13
_TYPE_WINDOW: Final = 0x14
_TYPE_PING: Final = 0x20
_TYPE_PONG: Final = 0x21
_TYPE_GOAWAY: Final = 0x22


def _fail(message: str, code: int = ErrorCode.PROTOCOL_ERROR) -> LocalProtocolError:
    return LocalProtocolError(message, code=code)


def _check_connection_frame(stream_id: int) -> None:
    if stream_id != 0:
        raise _fail(f"connection frame on stream {stream_id}, expected stream 0")


def _check_code(code: int) -> None:
    if not 0 <= code <= 0xFFFF:
        raise _fail(f"error code {code} is out of range 0..65535")


def _check_reason(reason: str) -> None:
    try:
        size = len(reason.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise _fail("reason is not encodable as UTF-8") from exc
    if size > 1024:
        raise _fail("reason is longer than 1024 bytes")


def _check_int(value: object, what: str) -> None:
    # bool is an int subclass; a window of True is a bug, not a number.
    if type(value) is not int:
        raise _fail(f"{what} must be an int, not {type(value).__name__}")


@attrs.frozen
class Hello:
    """The agent's opening frame (PROTOCOL.md §3).

    Attributes:
        version: the protocol version the agent speaks.
        token: the agent's credential, or ``None``.
        session_id: the session the agent asks for (fixed id or one to resume), or ``None``.
        resume_key: the secret from an earlier :class:`Welcome`, to reclaim a random session.
        max_frame_size: the largest frame the agent accepts.
        capabilities: optional features the agent supports.
        access: the visitor access policy as a JSON object (PROTOCOL.md §3.1.1), or ``None``
            for none. The codec checks only that it is a JSON object;
            :class:`tunnel2.access.AccessPolicy` reads it.
    """

    version: int = PROTOCOL_VERSION
    token: str | None = None
    session_id: str | None = None
    resume_key: str | None = None
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    capabilities: tuple[str, ...] = ()
    access: dict[str, Any] | None = attrs.field(default=None, hash=False)

    stream_id: ClassVar[int] = 0

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.version <= 0xFFFF:
            raise _fail(f"version {self.version} is out of range")
        if self.max_frame_size < MIN_MAX_FRAME_SIZE:
            raise _fail(f"max_frame_size {self.max_frame_size} is below {MIN_MAX_FRAME_SIZE}")
        if self.session_id is not None and not _valid_session_id(self.session_id):
            raise _fail(f"session id {self.session_id!r} is not 1-64 of [A-Za-z0-9_-]")
        if self.access is not None:
            if not isinstance(self.access, dict):
                raise _fail("HELLO access policy is not a JSON object")
            try:
                json.dumps(self.access, allow_nan=False)
            except (TypeError, ValueError, RecursionError) as exc:
                raise _fail(f"HELLO access policy is not valid JSON: {exc}") from exc


@attrs.frozen
class Welcome:
    """The server's acceptance of a :class:`Hello` (PROTOCOL.md §3).

    Attributes:
        version: the protocol version both sides now speak.
        session_id: the session this connection serves.
        public_urls: the URLs at which the session is reachable, preferred first.
        resume_key: the secret that reclaims the session after a reconnect.
        max_frame_size: the negotiated frame size limit for both directions.
        initial_window: the per-stream credit each side starts with.
        connection_window: the per-connection credit each side starts with.
        ping_interval: seconds between keepalive pings (0 disables them).
        capabilities: the optional features both sides use: those of the agent's HELLO the
            relay speaks too.
    """

    session_id: str
    public_urls: tuple[str, ...]
    resume_key: str = ""
    version: int = PROTOCOL_VERSION
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    initial_window: int = 256 * 1024
    connection_window: int = 4 * 1024 * 1024
    ping_interval: float = 15.0
    capabilities: tuple[str, ...] = ()

    stream_id: ClassVar[int] = 0

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.version <= 0xFFFF:
            raise _fail(f"version {self.version} is out of range")
        if not _valid_session_id(self.session_id):
            raise _fail(f"session id {self.session_id!r} is not 1-64 of [A-Za-z0-9_-]")
        if not self.public_urls:
            raise _fail("WELCOME has no public URL")
        _check_int(self.max_frame_size, "max_frame_size")
        if self.max_frame_size < MIN_MAX_FRAME_SIZE:
            raise _fail(f"max_frame_size {self.max_frame_size} is below {MIN_MAX_FRAME_SIZE}")
        for window in (self.initial_window, self.connection_window):
            _check_int(window, "window")
            if not 0 < window <= MAX_WINDOW:
                raise _fail(f"window {window} is out of range 1..{MAX_WINDOW}")
        if not 0 <= self.ping_interval <= 86400:
            raise _fail(f"ping_interval {self.ping_interval} is not within 0..86400 seconds")

    @property
    def public_url(self) -> str:
        """The preferred public URL."""
        return self.public_urls[0]


@attrs.frozen
class Refuse:
    """The server's refusal of a :class:`Hello`; the connection closes after it."""

    code: int
    reason: str = ""

    stream_id: ClassVar[int] = 0

    def __attrs_post_init__(self) -> None:
        _check_code(self.code)
        _check_reason(self.reason)


@attrs.frozen
class Open:
    """Opens a stream (from the relay, with a request head) or answers one (from the agent,
    with a response head). ``head`` is a complete HTTP/1.1 head ending in CRLF CRLF.
    ``end``: the sender's last frame on the stream, as if END followed (the END_STREAM flag,
    once negotiated)."""

    stream_id: int
    head: bytes
    end: bool = False

    def __attrs_post_init__(self) -> None:
        if not 0 < self.stream_id <= MAX_STREAM_ID:  # inlined: hot path
            raise _fail(f"stream id {self.stream_id} is out of range 1..{MAX_STREAM_ID}")
        if not self.head.endswith(b"\r\n\r\n"):
            raise _fail("OPEN head does not end with CRLF CRLF")


@attrs.frozen
class Data:
    """Body bytes on a stream; they consume flow-control credit. ``end`` as on :class:`Open`."""

    stream_id: int
    data: bytes
    end: bool = False

    def __attrs_post_init__(self) -> None:
        if not 0 < self.stream_id <= MAX_STREAM_ID:  # inlined: hot path
            raise _fail(f"stream id {self.stream_id} is out of range 1..{MAX_STREAM_ID}")
        if not self.data:
            raise _fail("DATA frame with an empty payload")


@attrs.frozen
class End:
    """The sender will send nothing more on this stream (half-close)."""

    stream_id: int

    def __attrs_post_init__(self) -> None:
        if not 0 < self.stream_id <= MAX_STREAM_ID:  # inlined: hot path
            raise _fail(f"stream id {self.stream_id} is out of range 1..{MAX_STREAM_ID}")


@attrs.frozen
class Reset:
    """Aborts a stream in both directions."""

    stream_id: int
    code: int
    reason: str = ""

    def __attrs_post_init__(self) -> None:
        if not 0 < self.stream_id <= MAX_STREAM_ID:  # inlined: hot path
            raise _fail(f"stream id {self.stream_id} is out of range 1..{MAX_STREAM_ID}")
        _check_code(self.code)
        _check_reason(self.reason)


@attrs.frozen
class Window:
    """Grants ``increment`` more bytes of credit on a stream, or on the connection (id 0)."""

    stream_id: int
    increment: int

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.stream_id <= MAX_STREAM_ID:
            raise _fail(f"stream id {self.stream_id} is out of range 0..{MAX_STREAM_ID}")
        if not 0 < self.increment <= MAX_WINDOW:
            raise _fail(
                f"window increment {self.increment} is out of range 1..{MAX_WINDOW}",
                ErrorCode.FLOW_CONTROL_ERROR,
            )


@attrs.frozen
class Ping:
    """Asks the peer to answer with a :class:`Pong` carrying the same 8 bytes."""

    opaque: bytes

    stream_id: ClassVar[int] = 0

    def __attrs_post_init__(self) -> None:
        if len(self.opaque) != 8:
            raise _fail(f"PING payload is {len(self.opaque)} bytes, expected 8")


@attrs.frozen
class Pong:
    """The answer to a :class:`Ping`."""

    opaque: bytes

    stream_id: ClassVar[int] = 0

    def __attrs_post_init__(self) -> None:
        if len(self.opaque) != 8:
            raise _fail(f"PONG payload is {len(self.opaque)} bytes, expected 8")


@attrs.frozen
class GoAway:
    """The sender opens no stream after ``last_stream_id`` and will close once the
    streams in flight are done (PROTOCOL.md §6)."""

    last_stream_id: int
    code: int = ErrorCode.NO_ERROR
    reason: str = ""

    stream_id: ClassVar[int] = 0

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.last_stream_id <= MAX_STREAM_ID:
            raise _fail(f"last stream id {self.last_stream_id} is out of range")
        _check_code(self.code)
        _check_reason(self.reason)


Frame: TypeAlias = (
    Hello | Welcome | Refuse | Open | Data | End | Reset | Window | Ping | Pong | GoAway
)
# An OPEN, DATA or END frame as FrameDecoder.next_items gives it: (type, stream id, payload).
StreamItem: TypeAlias = tuple[int, int, bytes]

_SESSION_ID_CHARS: Final = frozenset(string.ascii_letters + string.digits + "-_")


def _valid_session_id(session_id: str) -> bool:
    return 0 < len(session_id) <= 64 and _SESSION_ID_CHARS.issuperset(session_id)


def _json_payload(version: int, fields: dict[str, Any]) -> bytes:
    return _U16.pack(version) + json.dumps(fields, separators=(",", ":")).encode()


# The stream frames of the data path, encoded without building a frame object first (the
# checks are the constructors'; they raise the constructors' errors).


def encode_open(stream_id: int, head: bytes, end: bool = False) -> bytes:
    """``encode(Open(stream_id, head, end))``, without the object.

    Raises:
        LocalProtocolError: as :class:`Open` does.
    """
    if not 0 < stream_id <= MAX_STREAM_ID or not head.endswith(b"\r\n\r\n"):
        Open(stream_id, head)  # raises
    return _HEADER.pack(len(head), _TYPE_OPEN, _FLAG_END if end else _FLAG_NONE, stream_id) + head


def encode_data(stream_id: int, data: bytes, end: bool = False) -> bytes:
    """``encode(Data(stream_id, data, end))``, without the object.

    Raises:
        LocalProtocolError: as :class:`Data` does.
    """
    if not 0 < stream_id <= MAX_STREAM_ID or not data:
        Data(stream_id, data)  # raises
    return _HEADER.pack(len(data), _TYPE_DATA, _FLAG_END if end else _FLAG_NONE, stream_id) + data


def encode_end(stream_id: int) -> bytes:
    """``encode(End(stream_id))``, without the object.

    Raises:
        LocalProtocolError: as :class:`End` does.
    """
    if not 0 < stream_id <= MAX_STREAM_ID:
        End(stream_id)  # raises
    return _HEADER.pack(0, _TYPE_END, _FLAG_NONE, stream_id)


def encode(frame: Frame) -> bytes:
    """Serialise one frame to its wire form (PROTOCOL.md §2).

    Raises:
        LocalProtocolError: never for a constructed frame (constructors validate); kept in
            the contract so callers need not care.
    """
    # Ordered by frequency on the data path.
    if type(frame) is Data:
        return encode_data(frame.stream_id, frame.data, frame.end)
    if type(frame) is End:
        return encode_end(frame.stream_id)
    if type(frame) is Open:
        return encode_open(frame.stream_id, frame.head, frame.end)
    payload: bytes
    sid = 0
    if isinstance(frame, Window):
        ftype, payload, sid = _TYPE_WINDOW, _U32.pack(frame.increment), frame.stream_id
    elif isinstance(frame, Reset):
        ftype, sid = _TYPE_RESET, frame.stream_id
        payload = _U16.pack(frame.code) + frame.reason.encode()
    elif isinstance(frame, Ping):
        ftype, payload = _TYPE_PING, frame.opaque
    elif isinstance(frame, Pong):
        ftype, payload = _TYPE_PONG, frame.opaque
    elif isinstance(frame, GoAway):
        ftype = _TYPE_GOAWAY
        payload = _GOAWAY.pack(frame.last_stream_id, frame.code)
        payload += frame.reason.encode()
    elif isinstance(frame, Hello):
        ftype = _TYPE_HELLO
        fields: dict[str, Any] = {
            "token": frame.token,
            "session_id": frame.session_id,
            "resume_key": frame.resume_key,
            "max_frame_size": frame.max_frame_size,
            "capabilities": list(frame.capabilities),
        }
        if frame.access is not None:  # absent = no policy (PROTOCOL.md §3.1)
            fields["access"] = frame.access
        payload = _json_payload(frame.version, fields)
    elif isinstance(frame, Welcome):
        ftype = _TYPE_WELCOME
        payload = _json_payload(
            frame.version,
            {
                "session_id": frame.session_id,
                "public_urls": list(frame.public_urls),
                "resume_key": frame.resume_key,
                "max_frame_size": frame.max_frame_size,
                "initial_window": frame.initial_window,
                "connection_window": frame.connection_window,
                "ping_interval": frame.ping_interval,
                "capabilities": list(frame.capabilities),
            },
        )
    else:
        assert isinstance(frame, Refuse)
        ftype = _TYPE_REFUSE
        payload = _U16.pack(frame.code) + frame.reason.encode()
    return _HEADER.pack(len(payload), ftype, _FLAG_NONE, sid) + payload


# --- decoding -------------------------------------------------------------------------------


def _text(payload: bytes, what: str) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(f"{what} is not valid UTF-8") from exc


def _json_fields(payload: bytes, what: str) -> tuple[int, dict[str, Any]]:
    if len(payload) < 2:
        raise _fail(f"{what} payload is {len(payload)} bytes, too short for a version")
    (version,) = _U16.unpack_from(payload)
    if version != PROTOCOL_VERSION:
        raise _fail(
            f"{what} speaks protocol version {version}, this side speaks {PROTOCOL_VERSION}",
            ErrorCode.UNSUPPORTED_VERSION,
        )
    try:
        fields = json.loads(_text(payload[2:], what))
    except (ValueError, RecursionError) as exc:
        raise _fail(f"{what} payload is not valid JSON: {exc}") from exc
    if not isinstance(fields, dict):
        raise _fail(f"{what} payload is not a JSON object")
    return version, fields


def _field(fields: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = fields.get(name)
    # bool is an int subclass; never accept it where a number is meant.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise _fail(f"{what} field {name!r} has the wrong type")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _str_list(fields: dict[str, Any], name: str, what: str) -> tuple[str, ...]:
    value = _field(fields, name, list, what)
    if not all(isinstance(item, str) for item in value):
        raise _fail(f"{what} field {name!r} must be a list of strings")
    return tuple(value)


def _decode_hello(payload: bytes) -> Hello:
    version, f = _json_fields(payload, "HELLO")
    optional = (str, type(None))
    return Hello(
        version=version,
        token=_field(f, "token", optional, "HELLO"),
        session_id=_field(f, "session_id", optional, "HELLO"),
        resume_key=_field(f, "resume_key", optional, "HELLO"),
        max_frame_size=_field(f, "max_frame_size", int, "HELLO"),
        capabilities=_str_list(f, "capabilities", "HELLO"),
        access=_field(f, "access", (dict, type(None)), "HELLO"),
    )


def _decode_welcome(payload: bytes) -> Welcome:
    version, f = _json_fields(payload, "WELCOME")
    interval = _field(f, "ping_interval", (int, float), "WELCOME")
    if not 0 <= interval <= 86400:  # also refuses NaN, inf and huge ints before float()
        raise _fail(f"WELCOME ping_interval {interval} is not within 0..86400 seconds")
    return Welcome(
        version=version,
        session_id=_field(f, "session_id", str, "WELCOME"),
        public_urls=_str_list(f, "public_urls", "WELCOME"),
        resume_key=_field(f, "resume_key", str, "WELCOME"),
        max_frame_size=_field(f, "max_frame_size", int, "WELCOME"),
        initial_window=_field(f, "initial_window", int, "WELCOME"),
        connection_window=_field(f, "connection_window", int, "WELCOME"),
        ping_interval=float(interval),
        # Optional (absent from relays before it): none.
        capabilities=_str_list(f, "capabilities", "WELCOME") if "capabilities" in f else (),
    )


def _code_and_reason(payload: bytes, what: str) -> tuple[int, str]:
    if len(payload) < 2:
        raise _fail(f"{what} payload is {len(payload)} bytes, expected at least 2")
    return _U16.unpack_from(payload)[0], _text(payload[2:], f"{what} reason")


_CONNECTION_TYPES: Final = frozenset(
    {_TYPE_PING, _TYPE_PONG, _TYPE_GOAWAY, _TYPE_HELLO, _TYPE_WELCOME, _TYPE_REFUSE}
)


def _decode_payload(ftype: int, sid: int, payload: bytes) -> Frame:
    if ftype == _TYPE_DATA:
        return Data(sid, payload)
    if ftype == _TYPE_END:
        if payload:
            raise _fail(f"END frame with a {len(payload)}-byte payload")
        return End(sid)
    if ftype == _TYPE_OPEN:
        return Open(sid, payload)
    if ftype == _TYPE_WINDOW:
        if len(payload) != 4:
            raise _fail(f"WINDOW payload is {len(payload)} bytes, expected 4")
        return Window(sid, _U32.unpack(payload)[0])
    if ftype == _TYPE_RESET:
        code, reason = _code_and_reason(payload, "RESET")
        return Reset(sid, code, reason)
    if ftype not in _CONNECTION_TYPES:
        raise _fail(f"unknown frame type 0x{ftype:02x}")
    # The rest are connection frames.
    _check_connection_frame(sid)
    if ftype == _TYPE_PING:
        return Ping(payload)
    if ftype == _TYPE_PONG:
        return Pong(payload)
    if ftype == _TYPE_GOAWAY:
        if len(payload) < _GOAWAY.size:
            raise _fail(f"GOAWAY payload is {len(payload)} bytes, expected at least 6")
        last, code = _GOAWAY.unpack_from(payload)
        return GoAway(last, code, _text(payload[_GOAWAY.size :], "GOAWAY reason"))
    if ftype == _TYPE_HELLO:
        return _decode_hello(payload)
    if ftype == _TYPE_WELCOME:
        return _decode_welcome(payload)
    if ftype == _TYPE_REFUSE:
        code, reason = _code_and_reason(payload, "REFUSE")
        return Refuse(code, reason)
    raise _fail(f"unknown frame type 0x{ftype:02x}")


class FrameDecoder:
    """Incremental decoder: bytes in, frames out.

    Args:
        max_frame_size: the largest payload accepted; checked as soon as a header is read.
            May be lowered or raised later (after the handshake) by assigning the attribute.
    """

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        # Whether OPEN and DATA may carry the END_STREAM flag: set once WELCOME agreed on
        # it (PROTOCOL.md §2.1); any flag is an error until then.
        self.end_stream = False
        # What was received and not yet returned starts at _offset. A receive that finds
        # nothing left over is kept as the bytes it came as, so each payload is one slice
        # of it (one copy, where a bytearray costs a slice and a bytes() of it, ~800
        # instructions a frame); a frame split across receives is gathered in a bytearray
        # (amortised appends: a peer trickling bytes cannot make us copy a frame per byte).
        self._buffer: bytes | bytearray = b""
        self._offset = 0
        self._eof = False
        self._error: RemoteProtocolError | None = None

    def __repr__(self) -> str:
        state = "ERROR" if self._error else "EOF" if self._eof else "OPEN"
        return f"<FrameDecoder buffered={self.buffered} {state}>"

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buffer) - self._offset

    @property
    def at_eof(self) -> bool:
        """True once EOF was received and every frame before it was returned."""
        return self._eof and self.buffered == 0

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes from the transport; ``b""`` means the transport reached EOF.

        Raises:
            RuntimeError: data after EOF.
            RemoteProtocolError: the decoder failed earlier.
        """
        if self._error is not None:
            raise self._error
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("received data after EOF")
        buf = self._buffer
        offset = self._offset
        if offset == len(buf):  # everything before was returned
            self._buffer = data if type(data) is bytes else bytes(data)
            self._offset = 0
        elif type(buf) is bytes:  # the start of a frame: gather the rest behind it
            gathered = bytearray(memoryview(buf)[offset:])
            gathered += data
            self._buffer = gathered
            self._offset = 0
        else:
            buf += data

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or ``None`` if more bytes are needed.

        Raises:
            RemoteProtocolError: the bytes are not a valid frame (with ``code`` set), or EOF
                came in the middle of a frame. The decoder stays failed.
        """
        items = self._take(1)
        if not items:
            return None
        item = items[0]
        if not isinstance(item, tuple):
            return item
        kind, stream_id, payload = item
        end = len(items) > 1  # the END that an END_STREAM flag stands for
        if kind == TYPE_DATA:
            return Data(stream_id, payload, end)
        if kind == TYPE_END:
            return End(stream_id)
        return Open(stream_id, payload, end)

    def next_items(self) -> list[StreamItem | Frame]:
        """Every complete frame buffered, in order, in one call (the uplink's reader makes
        one per receive instead of one per frame): OPEN, DATA and END as
        ``(TYPE_OPEN | TYPE_DATA | TYPE_END, stream_id, payload)``, checked as their
        constructors check; every other frame as its object. An OPEN or DATA with the
        END_STREAM flag comes as its item followed by an END item. An empty list means more
        bytes are needed.

        Raises:
            RemoteProtocolError: as :meth:`next_frame`, when the first frame it would return
                is bad. A bad frame behind good ones ends the list before it and fails the
                decoder (:attr:`error`): the caller handles the good ones, then the error.

        The frames leave the buffer with this call: a caller that stops part-way through
        the list drops the rest (the uplink's reader is the only consumer, and a reader
        that stops ends its uplink).
        """
        return self._take(_NO_LIMIT)

    @property
    def error(self) -> RemoteProtocolError | None:
        """The error the decoder failed with (every later call raises it), or ``None``."""
        return self._error

    def _take(self, limit: int) -> list[StreamItem | Frame]:
        if self._error is not None:
            raise self._error
        buf = self._buffer
        size = len(buf)
        start = self._offset
        kept = buf if isinstance(buf, bytes) else None  # as received: slices are bytes
        max_size = self.max_frame_size
        items: list[StreamItem | Frame] = []
        failure: LocalProtocolError | None = None
        while limit:
            available = size - start
            if available < HEADER_SIZE:
                if self._eof and available:
                    failure = _fail(f"connection closed mid-frame ({available} bytes buffered)")
                break
            length, ftype, flags, sid = _HEADER.unpack_from(buf, start)
            if length > max_size:
                failure = _fail(
                    f"frame length {length} exceeds max {max_size}", ErrorCode.FRAME_SIZE_ERROR
                )
                break
            end = start + HEADER_SIZE + length
            if end > size:
                if self._eof:
                    failure = _fail(f"connection closed mid-frame ({available} bytes buffered)")
                break
            if flags and (
                flags != _FLAG_END
                or not self.end_stream
                or (ftype != _TYPE_OPEN and ftype != _TYPE_DATA)
            ):
                failure = _fail(f"frame type 0x{ftype:02x} has unknown flags 0x{flags:02x}")
                break
            payload = (
                kept[start + HEADER_SIZE : end]
                if kept is not None
                else bytes(buf[start + HEADER_SIZE : end])
            )
            if 0 < sid <= MAX_STREAM_ID and (
                (ftype == _TYPE_DATA and payload)
                or (ftype == _TYPE_END and not payload)
                or (ftype == _TYPE_OPEN and payload.endswith(b"\r\n\r\n"))
            ):
                items.append((ftype, sid, payload))
                if flags:  # END_STREAM: the END it stands for
                    items.append((_TYPE_END, sid, b""))
            else:
                try:
                    items.append(_decode_payload(ftype, sid, payload))
                except LocalProtocolError as exc:
                    failure = exc
                    break
            start = end
            limit -= 1
        # Bytes as received are let go once all read (an idle uplink holds no message); a
        # gathering buffer is compacted lazily, once consumed bytes dominate it.
        if kept is not None:
            if start == size:
                self._buffer = b""
                start = 0
        else:
            assert isinstance(buf, bytearray)
            if start == size:
                buf.clear()
                start = 0
            elif start > 65536 and start * 2 > size:
                del buf[:start]
                start = 0
        self._offset = start
        if failure is not None:
            if not items:
                self._raise(failure)
            self._error = self._remote_error(failure)
        return items

    def _raise(self, exc: LocalProtocolError) -> Any:
        self._error = self._remote_error(exc)
        raise self._error from exc

    @staticmethod
    def _remote_error(exc: LocalProtocolError) -> RemoteProtocolError:
        error = RemoteProtocolError(str(exc), code=exc.code, status_hint=exc.status_hint)
        error.__cause__ = exc
        return error
