"""The public exception tree of tunnel2.

Layer: bottom. Imports nothing else from tunnel2, so every layer can raise these.

Every error a user can see derives from :class:`TunnelError`. Protocol errors carry the
code to put in the RESET/GOAWAY frame they cause (``code``) and the HTTP status the entry
should answer with (``status_hint``), so no layer has to guess (h11's ``error_status_hint``).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "AppStartupError",
    "ErrorCode",
    "HandshakeError",
    "HandshakeRefused",
    "HandshakeTimeout",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "StreamError",
    "StreamReset",
    "TunnelError",
    "UplinkClosed",
]


class ErrorCode:
    """Numeric codes carried by RESET, GOAWAY and REFUSE frames (PROTOCOL.md §5)."""

    NO_ERROR: Final = 0
    PROTOCOL_ERROR: Final = 1
    INTERNAL_ERROR: Final = 2
    FLOW_CONTROL_ERROR: Final = 3
    FRAME_SIZE_ERROR: Final = 4
    REFUSED_STREAM: Final = 5
    CANCEL: Final = 6
    BACKEND_UNAVAILABLE: Final = 7
    TIMEOUT: Final = 8
    OVERLOADED: Final = 9
    UNAUTHORIZED: Final = 10
    SESSION_UNAVAILABLE: Final = 11
    UNSUPPORTED_VERSION: Final = 12
    ENHANCE_YOUR_CALM: Final = 13

    @classmethod
    def name_of(cls, code: int) -> str:
        """Return the symbolic name of ``code``, or ``"UNKNOWN(code)"``."""
        for name, value in vars(cls).items():
            if name.isupper() and value == code:
                return name
        return f"UNKNOWN({code})"


class TunnelError(Exception):
    """Base class of every exception tunnel2 raises on purpose."""


class ProtocolError(TunnelError):
    """Something on the wire broke the tunnel protocol.

    Attributes:
        code: the :class:`ErrorCode` to send in the RESET or GOAWAY this error causes.
        status_hint: the HTTP status an entry should answer with when a request fails
            because of this error.
    """

    def __init__(
        self,
        message: str,
        *,
        code: int = ErrorCode.PROTOCOL_ERROR,
        status_hint: int = 502,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status_hint = status_hint


class LocalProtocolError(ProtocolError):
    """We were asked to encode or send something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""


class HandshakeError(TunnelError):
    """The agent/server handshake did not complete."""


class HandshakeRefused(HandshakeError):
    """The server answered the agent's hello with a refusal.

    Attributes:
        code: the :class:`ErrorCode` the server gave.
        reason: the server's human-readable reason.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"handshake refused ({ErrorCode.name_of(code)}): {reason}")
        self.code = code
        self.reason = reason


class HandshakeTimeout(HandshakeError):
    """The peer did not complete the handshake in time."""


class UplinkClosed(TunnelError):
    """The uplink is closed; raised by any call on it.

    Attributes:
        reason: why it closed, for log lines and HTTP error bodies.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StreamError(TunnelError):
    """A single stream failed; the uplink carrying it is unaffected.

    Attributes:
        stream_id: the id of the stream.
    """

    def __init__(self, message: str, *, stream_id: int) -> None:
        super().__init__(message)
        self.stream_id = stream_id


class StreamReset(StreamError):
    """The peer reset the stream.

    Attributes:
        code: the :class:`ErrorCode` of the RESET frame.
        reason: the text the peer gave with it (may be empty).
    """

    def __init__(self, *, stream_id: int, code: int, reason: str = "") -> None:
        text = f"stream {stream_id} reset by peer ({ErrorCode.name_of(code)})"
        if reason:
            text += f": {reason}"
        super().__init__(text, stream_id=stream_id)
        self.code = code
        self.reason = reason


class AppStartupError(TunnelError):
    """An in-process ASGI app's lifespan startup failed (it sent
    ``lifespan.startup.failed``, as Starlette and FastAPI do when startup raises); the
    tunnel was not opened.

    Attributes:
        message: the app's own message (for Starlette/FastAPI, the traceback text).
    """

    def __init__(self, message: str) -> None:
        lines = [line for line in message.strip().splitlines() if line.strip()]
        last = lines[-1].strip() if lines else "no message"
        super().__init__(f"the ASGI app's lifespan startup failed: {last}")
        self.message = message
