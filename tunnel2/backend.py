"""Backend forwarding: the agent's stream handler for an HTTP/1.1 (or https) backend.

Layer: beside the agent, above uplink. May import trio, errors, the stream layer
(``_sockets``, ``_tls``) and the internal HTTP/1.1 parser.

The relay wrote each request head canonically (PROTOCOL.md §4.3); :class:`BackendForwarder`
sends it over a pooled keep-alive connection, validates the backend's answer and carries it
back through the tunnel with its framing normalised, or splices raw bytes after a 101.
"""

from __future__ import annotations

import collections
import logging
import re
import ssl
from typing import Final, final

import trio

from tunnel2 import _http11 as http
from tunnel2._prefix import has_url_fields, url_rewrite_for
from tunnel2._sockets import connect_tcp
from tunnel2._tls import SocketOrTls, wrap_client
from tunnel2.errors import (
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    StreamReset,
    UplinkClosed,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from tunnel2.uplink import TunnelStream

__all__ = ["BackendForwarder", "check_host_header"]

logger = logging.getLogger("tunnel2.agent")

_RECEIVE_SIZE: Final = 65536


def _relay_head_framing(head: bytes) -> tuple[bytes, http.Framing, int]:
    """Method and body framing of a request head the relay wrote.

    The relay validated the client's request and states its framing canonically, once
    (PROTOCOL.md §4.3), so no full parse is needed here; the backend parses what it gets.
    """
    method = head[: head.find(b" ")]
    index = head.find(b"\r\nContent-Length: ")
    if index >= 0:
        start = index + len(b"\r\nContent-Length: ")
        return method, http.LENGTH, int(head[start : head.find(b"\r\n", start)])
    if head.find(b"\r\nTransfer-Encoding: chunked\r\n") >= 0:
        return method, http.CHUNKED, 0
    return method, http.NONE, 0


def _with_host_line(head: bytes, line: bytes) -> bytes:
    """``head`` (as the relay wrote it) with ``line`` as its only Host field line, right
    after the start line.

    The relay validated the head and lets at most one Host through (PROTOCOL.md §4.2), so
    the line is found with searches of the lower-cased head (~11,500 instructions for a
    300-byte head), not with a case-insensitive multi-line regex (``_HOST_FIELD_RE``,
    tried at every byte: ~27,000), which only a head with several Host lines still takes.
    """
    lower = head.lower()
    start = head.find(b"\r\n") + 2  # the first field line (no CR or LF in a start line)
    index = lower.find(b"\r\nhost:", start - 2) + 2
    if index < 2:  # none (the relay adds one to an HTTP/1.0 request without it)
        return b"".join((head[:start], line, head[start:]))
    end = head.find(b"\r\n", index) + 2
    if lower.find(b"\r\nhost:", end - 2) >= 0:  # several: not from a relay we know
        return b"".join((head[:start], line, _HOST_FIELD_RE.sub(b"", head[start:])))
    return b"".join((head[:start], line, head[start:index], head[end:]))


def _response_head_for_tunnel(
    response: http.ResponseHead,
    framing: http.Framing,
    request: bytes | None = None,
) -> tuple[bytes, bool]:
    """The head carried through the tunnel, and whether the backend keeps the connection.

    Works on the bytes (DESIGN.md: change heads at the byte level): hop-by-hop field lines
    are cut out with one regex search (a 101 keeps Connection and Upgrade), and the framing is
    normalised: close-delimited bodies become chunked (PROTOCOL.md §4.3). With ``request``,
    URLs that name the backend (Location, Content-Location, Refresh, Set-Cookie Path and
    Domain) are made to lead back through the tunnel (:mod:`tunnel2._prefix`, PROTOCOL.md
    §4.6); only a response that has such a field pays for more than one lookup per name.

    Args:
        response: the backend's response head, parsed (so every field line in it is valid).
        framing: the body framing of the response.
        request: the request head as the backend got it, when its answer's URLs may need
            rewriting (a path-form request, or a Host other than the public one); ``None``:
            no rewriting.
    """
    status = response.status
    fields = response.fields_without(_HOP_BY_HOP_101_RE if status == 101 else _HOP_BY_HOP_RE)
    tokens = http.connection_tokens(response)  # (found by the parser: an attribute read)
    if tokens:
        named = tokens - http.CONNECTION_OPTIONS
        if named:  # rare: fields the Connection header marks hop-by-hop
            fields = http.drop_fields(fields, named)
    if request is not None and has_url_fields(response):
        rewrite = url_rewrite_for(request)
        if rewrite is not None:
            fields = rewrite.fields(fields)
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, response.reason), fields]
    if framing is http.CHUNKED or framing is http.UNTIL_CLOSE:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    parts.append(b"\r\n")
    if b"close" in tokens:
        keep_alive = False
    else:
        keep_alive = response.http_version == b"1.1" or b"keep-alive" in tokens
    return b"".join(parts), keep_alive


_HOP_BY_HOP_RE: Final = http.field_names_re(http.HOP_BY_HOP)
_HOP_BY_HOP_101_RE: Final = http.field_names_re(http.HOP_BY_HOP - {b"connection", b"upgrade"})


# RESET reasons: kinds of failure, no addresses and no bytes of the backend's answer.
_REFUSED: Final = "the backend refused the connection"
_CLOSED: Final = "the backend closed the connection before answering"
_INVALID: Final = "the backend sent an invalid response"
_BROKE: Final = "the backend connection broke"
_HEAD_TOO_LARGE: Final = "the backend's response head is too large for the tunnel"
_TLS_FAILED: Final = "the TLS handshake with the backend failed"
_NO_HEAD: Final = "backend closed the connection before a complete response head"


class _BackendGone(Exception):
    """A reused keep-alive connection turned out to be closed before any answer."""


# What a backend exchange can fail with, besides _BackendGone.
_EXCHANGE_ERRORS: Final = (
    ProtocolError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    StreamReset,
    UplinkClosed,
)


_HOST_FIELD_RE: Final = http.field_lines_re({b"host"})
# The relay writes it in this form, on path-form requests only (PROTOCOL.md §4.2).
_PREFIX_FIELD: Final = b"\r\nX-Forwarded-Prefix: "
# A literal Host value: a DNS name or IPv4 address, or [IPv6], with an optional port.
_HOST_VALUE_RE: Final = re.compile(
    r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)(?::[0-9]{1,5})?"
)


def check_host_header(value: str) -> str:
    """``value`` if it is a valid ``host_header`` option: ``preserve``, ``rewrite`` or a
    literal ``host[:port]``.

    Raises:
        ValueError: anything else, saying what is accepted.
    """
    if value in ("preserve", "rewrite") or _HOST_VALUE_RE.fullmatch(value):
        return value
    raise ValueError(
        f"host header {value!r} must be 'preserve', 'rewrite' or a host[:port] such as "
        "'myapp.test:8080'"
    )


@final
class BackendForwarder:
    """Answers streams by forwarding them to an HTTP/1.1 backend at ``host:port``.

    Keeps up to ``max_idle`` keep-alive connections open for reuse. A request on a reused
    connection the backend had already closed is retried once on a fresh one when nothing of
    it was consumed yet (no body).

    With ``ssl_context`` the backend speaks https: the TLS handshake is part of opening a
    pooled connection, and the certificate is checked for ``host`` (also sent as SNI).

    ``host_header`` decides the request's Host (as ngrok's ``--host-header``): ``"preserve"``
    keeps the public one, ``"rewrite"`` names the backend (``host[:port]``, for dev servers
    that check Host), anything else is sent as it is; ``None`` (the default) is
    ``"preserve"`` for http and ``"rewrite"`` for https (the name its certificate is checked
    for). The public Host stays in X-Forwarded-Host either way.

    On a path-form request (X-Forwarded-Prefix), or when the backend got a Host other than
    the public one, URLs in its response head that name it are rewritten to lead back
    through the tunnel (:mod:`tunnel2._prefix`, PROTOCOL.md §4.6).

    Raises:
        ValueError: ``host_header`` is not ``preserve``, ``rewrite`` or a ``host[:port]``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_idle: int = 128,
        ssl_context: ssl.SSLContext | None = None,
        host_header: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self.ssl_context = ssl_context
        self._idle: collections.deque[SocketOrTls] = collections.deque()
        if host_header is None:
            host_header = "preserve" if ssl_context is None else "rewrite"
        mode = check_host_header(host_header)
        self.host_header = mode
        self._host_line: bytes | None = None
        if mode == "rewrite":
            name = f"[{host}]" if ":" in host else host
            default = 80 if ssl_context is None else 443
            authority = name if port == default else f"{name}:{port}"
            self._host_line = b"Host: %s\r\n" % authority.encode("idna")
        elif mode != "preserve":
            self._host_line = b"Host: %s\r\n" % mode.encode("ascii")

    def __repr__(self) -> str:
        return f"<BackendForwarder {self.target} idle={len(self._idle)}>"

    @property
    def target(self) -> str:
        """``http(s)://host:port`` for messages."""
        scheme = "http" if self.ssl_context is None else "https"
        return f"{scheme}://{self.host}:{self.port}"

    async def aclose(self) -> None:
        """Close the idle connections."""
        while self._idle:
            await trio.aclose_forcefully(self._idle.pop())

    async def __call__(self, stream: TunnelStream) -> int | None:
        """Forward one request; return the backend's status (None if it gave none)."""
        head = stream.head
        assert head is not None
        if self._host_line is not None:
            head = _with_host_line(head, self._host_line)
        method, framing, length = _relay_head_framing(head)
        has_body = length > 0 or framing is http.CHUNKED
        # Whose answer's URLs may need rewriting (checked once per request: one search).
        urls = head if self._host_line is not None or head.find(_PREFIX_FIELD) >= 0 else None
        for attempt in (0, 1):
            conn = self._checkout(check=has_body) if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                try:
                    conn = await self._open()
                except OSError as exc:
                    self._fail(stream, _REFUSED, exc.strerror or str(exc))
                    return None
                except trio.BrokenResourceError as exc:  # the TLS handshake failed
                    self._fail(stream, _TLS_FAILED, str(exc))
                    return None
            keep = False
            try:
                if has_body:
                    status, keep = await self._exchange_with_body(
                        conn, stream, head, method, framing, reused, urls
                    )
                    break
                # Without a body, the exchange inline (a coroutine less a request: ~-1,100).
                try:
                    await conn.send_all(head)
                except trio.BrokenResourceError:
                    if reused:
                        raise _BackendGone() from None
                    raise
                status, keep = await self._relay_response(conn, stream, method, reused, urls)
                break
            except _BackendGone:
                if has_body:  # its body is consumed: it cannot be sent again
                    self._fail(stream, _CLOSED, "a reused connection was closed")
                    return None
                continue  # retry once on a fresh connection
            except LocalProtocolError as exc:  # its head does not fit one OPEN frame
                self._fail(stream, _HEAD_TOO_LARGE, str(exc))
                return None
            except ProtocolError as exc:
                self._fail(stream, _INVALID, str(exc))
                return None
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._fail(stream, _BROKE, str(exc) or type(exc).__name__)
                return None
            finally:
                if keep and len(self._idle) < self.max_idle:
                    self._idle.append(conn)
                else:
                    await trio.aclose_forcefully(conn)
        else:  # pragma: no cover - the loop always breaks or returns
            return None
        return status

    def _fail(self, stream: TunnelStream, kind: str, detail: str) -> None:
        """Reset ``stream`` (the relay answers 502) with a generic ``kind`` of failure: the
        visitor learns neither the backend's address nor bytes of its answer. The details
        go to the agent's log, once (PROTOCOL.md §4.5)."""
        logger.warning(
            "stream %d: %s (backend %s:%d: %s)", stream.id, kind, self.host, self.port, detail
        )
        stream.reset(ErrorCode.BACKEND_UNAVAILABLE, kind)

    async def _open(self) -> SocketOrTls:
        conn = await connect_tcp(self.host, self.port)
        if self.ssl_context is None:
            return conn
        return await wrap_client(conn, self.ssl_context, self.host)

    def _checkout(self, *, check: bool) -> SocketOrTls | None:
        """An idle pooled connection, or None.

        With ``check`` (a request whose body cannot be sent twice), one the backend has
        closed meanwhile is dropped first (a peek, as urllib3 and httpcore do); without it,
        a closed one shows when the request is sent, and is retried on a fresh connection.
        """
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not check or not conn.peer_closed():
                return conn
            conn.close()
        return None

    async def _exchange_with_body(
        self,
        conn: SocketOrTls,
        stream: TunnelStream,
        head: bytes,
        method: bytes,
        framing: http.Framing,
        reused: bool,
        urls: bytes | None,
    ) -> tuple[int, bool]:
        """Send a request that has a body and relay the response; return (status,
        reusable)."""
        # The body streams to the backend while its answer may already come back. Errors
        # are kept and raised after the nursery (which would wrap them in a group).
        errors: list[BaseException] = []
        result: tuple[int, bool] | None = None
        sent = trio.Event()
        async with trio.open_nursery() as nursery:

            async def pump() -> None:
                try:
                    await self._pump_body(conn, stream, head, framing, sent)
                except _EXCHANGE_ERRORS as exc:
                    errors.append(exc)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(pump)
            try:
                result = await self._relay_response(conn, stream, method, reused, urls)
            except (_BackendGone, *_EXCHANGE_ERRORS) as exc:
                errors.append(exc)
            nursery.cancel_scope.cancel()  # an early answer: the rest of the body is unwanted
        if errors:
            raise errors[0]
        assert result is not None
        # Reusable only if the backend also got the whole body.
        return result[0], result[1] and sent.is_set()

    async def _pump_body(
        self,
        conn: SocketOrTls,
        stream: TunnelStream,
        head: bytes,
        framing: http.Framing,
        sent: trio.Event,
    ) -> None:
        chunked = framing is http.CHUNKED
        pending = head
        while True:
            data = await stream.receive_data()
            if not data:
                await conn.send_all(pending + http.LAST_CHUNK if chunked else pending)
                sent.set()
                return
            await conn.send_all(pending + (http.encode_chunk(data) if chunked else data))
            pending = b""

    async def _relay_response(
        self,
        conn: SocketOrTls,
        stream: TunnelStream,
        method: bytes,
        reused: bool,
        urls: bytes | None,
    ) -> tuple[int, bool]:
        # The common answer comes whole in the first read: its head and body are sliced from
        # that one bytes object, with no receive buffer or body reader made (~-9k
        # instructions per request); anything else goes the general way, through ``buf``.
        data = await conn.receive_some(_RECEIVE_SIZE)
        if not data:
            if reused:
                raise _BackendGone()
            raise RemoteProtocolError(_NO_HEAD)
        end = http.find_head_end(data)
        if end < 0:
            return await self._relay_response_slowly(
                conn, stream, bytearray(data), method, reused, urls
            )
        head = data if end == len(data) else data[:end]
        response = http.parse_response_head(head)
        status = response.status
        if status < 200 and status != 101:  # an interim answer: skip it, the general way
            return await self._relay_response_slowly(
                conn, stream, bytearray(data[end:]), method, reused, urls
            )
        framing, length = http.response_framing(response, method)
        tunnel_head, keep_alive = _response_head_for_tunnel(response, framing, urls)
        rest = b"" if end == len(data) else data[end:]
        if status != 101 and (
            (framing is http.LENGTH and len(rest) == length) or (framing is http.NONE and not rest)
        ):
            try:
                stream.send_head(tunnel_head, rest, end=True)
            except trio.WouldBlock:  # too large for the credit or one frame
                pass
            else:
                return status, keep_alive
        return await self._relay_body(
            conn, stream, bytearray(rest), response, framing, length, tunnel_head, keep_alive
        )

    async def _relay_response_slowly(
        self,
        conn: SocketOrTls,
        stream: TunnelStream,
        buf: bytearray,
        method: bytes,
        reused: bool,
        urls: bytes | None,
    ) -> tuple[int, bool]:
        # The head, skipping interim 1xx answers (the entry already said 100 Continue).
        while True:
            end = http.find_head_end(buf)
            while end < 0:
                data = await conn.receive_some(_RECEIVE_SIZE)
                if not data:
                    if reused and not buf:
                        raise _BackendGone()
                    raise RemoteProtocolError(_NO_HEAD)
                buf += data
                if len(buf) > http.MAX_HEAD_SIZE:
                    raise RemoteProtocolError("backend response head is too large")
                end = http.find_head_end(buf)
            head = http.take(buf, end)
            response = http.parse_response_head(head)
            if response.status >= 200 or response.status == 101:
                break
        framing, length = http.response_framing(response, method)
        tunnel_head, keep_alive = _response_head_for_tunnel(response, framing, urls)
        return await self._relay_body(
            conn, stream, buf, response, framing, length, tunnel_head, keep_alive
        )

    async def _relay_body(
        self,
        conn: SocketOrTls,
        stream: TunnelStream,
        buf: bytearray,
        response: http.ResponseHead,
        framing: http.Framing,
        length: int,
        tunnel_head: bytes,
        keep_alive: bool,
    ) -> tuple[int, bool]:
        if response.status == 101:
            stream.send_head(tunnel_head)
            await _splice(conn, stream, buf)
            return 101, False
        reader = http.make_body_reader(framing, length)
        data = reader.read(buf) if buf else b""
        try:
            if not reader.done:
                raise trio.WouldBlock
            # A small answer: head, body and END in one write, no yield.
            stream.send_head(tunnel_head, data, end=True)
        except trio.WouldBlock:
            stream.send_head(tunnel_head)
            while True:
                if reader.done:
                    try:
                        stream.send_data_nowait(data, end=True)
                    except trio.WouldBlock:
                        await stream.send_data(data, end=True)
                    break
                if data:
                    await stream.send_data(data)
                more = await conn.receive_some(_RECEIVE_SIZE)
                if not more:
                    reader.feed_eof()
                    await stream.send_data(b"", end=True)
                    break
                buf += more
                data = reader.read(buf)
        reusable = keep_alive and framing is not http.UNTIL_CLOSE and not buf
        return response.status, reusable


async def _splice(conn: SocketOrTls, stream: TunnelStream, buf: bytearray) -> None:
    """After a 101 from the backend: carry raw bytes both ways until either side is done."""

    async def downstream() -> None:
        try:
            while data := await stream.receive_data():
                await conn.send_all(data)
            if isinstance(conn, trio.abc.HalfCloseableStream):  # TLS cannot half-close
                await conn.send_eof()  # the client is done sending; the backend may still answer
        except (trio.BrokenResourceError, trio.ClosedResourceError, StreamReset, UplinkClosed):
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(downstream)
        try:
            if buf:
                await stream.send_data(bytes(buf))
                buf.clear()
            while data := await conn.receive_some(_RECEIVE_SIZE):
                await stream.send_data(data)
            stream.send_end()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        nursery.cancel_scope.cancel()
