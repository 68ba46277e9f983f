"""``tunnel2 backend``: a fast HTTP/1.1 test backend on bare sockets.

Layer: load-test kit. Imports trio, attrs, :mod:`tunnel2._http11`, :mod:`tunnel2.errors` and
the stream layer :mod:`tunnel2._sockets`.

It must never be the bottleneck of a tunnel measurement, so it follows DESIGN.md's performance
model: bare sockets with TCP_NODELAY (the tunnel's own
:class:`~tunnel2._sockets.FastSocketStream`), the head parsed by the strict
:mod:`tunnel2._http11` parser, pre-built response bytes for the static endpoints, keep-alive,
and one ``send`` per batch of answers (a client that pipelines gets all answers to the requests
already in the buffer in one write).

Invariants:

* Answers go out in request order (one request at a time per connection); bytes after a
  request stay in the buffer for the next one, so pipelining is safe.
* Every request body is read to its end, echoed or discarded, before the next head is parsed.
* Bad input gets a 4xx (or 505/501) with a one-line ``text/plain`` reason. After a framing or
  parse error, and after a 413, the connection is closed, since its byte stream can no longer
  be trusted; after a 404/405/400 on a well-framed request it stays open.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket as _stdlib_socket
from typing import TYPE_CHECKING, Final, NoReturn, final
from urllib.parse import parse_qs

import attrs
import trio

from tunnel2._http11 import (
    CHUNKED,
    LAST_CHUNK,
    LENGTH,
    NONE,
    BodyReader,
    Framing,
    RequestHead,
    encode_chunk,
    find_head_end,
    make_body_reader,
    parse_request_head,
    reason_phrase,
    request_framing,
    take,
)
from tunnel2._sockets import serve_socket, take_socket
from tunnel2.errors import RemoteProtocolError

if TYPE_CHECKING:
    from trio.abc import HalfCloseableStream

__all__ = ["ENDPOINTS", "Backend", "BackendConfig", "BackendStatistics", "serve_backend"]

logger = logging.getLogger(__name__)

_RECV_SIZE: Final = 65536
_BLOCK: Final = bytes(range(32, 127)) * (65536 // 95 + 1)
_BLOCK_SIZE: Final = 65536
_LINGER_SECONDS: Final = 2.0
_LINGER_BYTES: Final = 1024 * 1024
_SMALL_ECHO: Final = 65536  # echo bodies up to this size are answered in one send
_SERVER: Final = b"Server: tunnel2-backend\r\n"
_GONE: Final = (trio.BrokenResourceError, trio.ClosedResourceError)  # the client went away

ENDPOINTS: Final[tuple[tuple[str, str, str], ...]] = (
    ("GET", "/loadtest/ping", "smallest possible answer: 200, body 'pong', pre-built bytes"),
    ("GET", "/loadtest/get", "JSON describing the request: method, path, query, headers"),
    ("GET", "/loadtest/fast", "a pre-serialized JSON document (~200 bytes)"),
    ("GET", "/loadtest/delay/{ms}", "JSON after {ms} ms (0..max); other requests are not held up"),
    ("POST", "/loadtest/echo", "streams the request body back (Content-Length or chunked)"),
    ("GET", "/loadtest/bytes/{n}", "n bytes of printable ASCII, streamed, Content-Length n"),
    ("GET", "/loadtest/status/{code}", "an answer with status {code} (200..599)"),
    ("GET", "/loadtest/info", "this list"),
)  # fmt: skip
"""``(method, path, description)`` of every endpoint, as ``GET /loadtest/info`` lists them."""

# Connection modes: which Connection header an answer carries.
_KEEP_11: Final = 0  # HTTP/1.1 persistent: no header needed
_KEEP_10: Final = 1  # HTTP/1.0 client that asked for keep-alive
_CLOSE: Final = 2
_CONNECTION_HEADER: Final = (b"", b"Connection: keep-alive\r\n", b"Connection: close\r\n")


def _head(status: int, mode: int, content_type: bytes | None, length: int | None) -> bytes:
    reason = reason_phrase(status, b"Unknown")
    parts = [b"HTTP/1.1 %d %b\r\n" % (status, reason), _SERVER]
    if content_type is not None:
        parts.append(b"Content-Type: %b\r\n" % content_type)
    if length is not None:
        parts.append(b"Content-Length: %d\r\n" % length)
    parts += [_CONNECTION_HEADER[mode], b"\r\n"]
    return b"".join(parts)


def _response(status: int, mode: int, content_type: bytes, body: bytes) -> bytes:
    return _head(status, mode, content_type, len(body)) + body


def _prebuilt(content_type: bytes, body: bytes) -> tuple[bytes, bytes, bytes]:
    """The answer in each connection mode, indexed by mode."""
    return (
        _response(200, _KEEP_11, content_type, body),
        _response(200, _KEEP_10, content_type, body),
        _response(200, _CLOSE, content_type, body),
    )


_JSON: Final = b"application/json"
_TEXT: Final = b"text/plain; charset=utf-8"
_PING: Final = _prebuilt(b"text/plain", b"pong")
_FAST: Final = _prebuilt(
    _JSON,
    json.dumps(
        {
            "status": "ok",
            "service": "tunnel2-backend",
            "endpoint": "/loadtest/fast",
            "items": [{"id": i, "name": f"item-{i}", "ok": True} for i in range(4)],
        },
        separators=(",", ":"),
    ).encode(),
)
_INFO: Final = _prebuilt(
    _JSON,
    json.dumps(
        {
            "service": "tunnel2-backend",
            "endpoints": [
                {"method": method, "path": path, "description": text}
                for method, path, text in ENDPOINTS
            ],
        },
        indent=2,
    ).encode()
    + b"\n",
)
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


@final
@attrs.frozen
class BackendConfig:
    """Limits of the test backend.

    Attributes:
        max_head_size: largest request head accepted (431 above).
        max_body_size: largest request body accepted, echoed or discarded (413 above).
        max_delay_ms: largest ``/loadtest/delay/{ms}`` (400 above).
        max_bytes: largest ``/loadtest/bytes/{n}`` (400 above).
        backlog: the listen backlog.
    """

    max_head_size: int = 16384
    max_body_size: int = 64 * 1024 * 1024
    max_delay_ms: int = 60_000
    max_bytes: int = 1024 * 1024 * 1024
    backlog: int = 1024


@final
@attrs.frozen
class BackendStatistics:
    """A snapshot of a :class:`Backend`: open connections and requests parsed so far."""

    connections: int
    requests: int


class _Abort(Exception):
    """Raised inside a handler to close the connection without another byte (mid-answer)."""


class _Close(Exception):
    """Raised inside a handler to answer ``response`` and close the connection."""

    def __init__(self, response: bytes) -> None:
        super().__init__()
        self.response = response


def _error(status: int, message: str, mode: int) -> bytes:
    body = f"{status} {reason_phrase(status).decode()}: {message}\n".encode(errors="replace")
    return _response(status, mode, _TEXT, body)


def _mode(head: RequestHead) -> int:
    if not head.keep_alive:
        return _CLOSE
    return _KEEP_11 if head.http_version == b"1.1" else _KEEP_10


def _int_param(text: bytes, low: int, high: int) -> int | None:
    if not text.isdigit() or len(text) > 12:
        return None
    value = int(text)
    return value if low <= value <= high else None


@final
class Backend:
    """A running test backend, as :func:`serve_backend` passes to ``task_status.started()``.

    Attributes:
        config: its limits.
        host: the address it listens on.
        port: the port it bound (the real one when asked for port 0).
    """

    def __init__(self, config: BackendConfig, host: str, port: int) -> None:
        self.config = config
        self.host = host
        self.port = port
        self._connections = 0
        self._requests = 0

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def statistics(self) -> BackendStatistics:
        """Return open connections and requests parsed so far."""
        return BackendStatistics(connections=self._connections, requests=self._requests)

    def __repr__(self) -> str:
        return f"<Backend {self.url} connections={self._connections} requests={self._requests}>"

    def __str__(self) -> str:
        return f"backend-{self.port}"

    async def serve_connection(self, stream: HalfCloseableStream) -> None:
        """Serve HTTP/1.1 requests on one connected stream until either side closes it.

        Closes ``stream`` on return. Network errors end the connection quietly; a bug is logged
        at ERROR and ends only this connection. Checkpoints; a cancellation closes ``stream``.

        Args:
            stream: a :class:`~tunnel2._sockets.FastSocketStream`, or one end of
                :func:`trio.testing.memory_stream_pair` in tests.
        """
        self._connections += 1
        buf = bytearray()
        out = bytearray()  # answers not yet sent: flushed before any wait for input
        max_head = self.config.max_head_size
        try:
            while True:
                end = find_head_end(buf)
                if end < 0:
                    if out:
                        await stream.send_all(out)
                        out.clear()
                    while end < 0:
                        if len(buf) > max_head:
                            raise RemoteProtocolError(
                                f"request head over {max_head} bytes", status_hint=431
                            )
                        data = await stream.receive_some(_RECV_SIZE)
                        if not data:
                            return  # the client closed; a partial head gets no answer
                        start = max(0, len(buf) - 3)
                        buf += data
                        end = find_head_end(buf, start)
                head_bytes = take(buf, end)
                head = parse_request_head(head_bytes, max_size=max_head)
                self._requests += 1
                if not await self._dispatch(stream, head, buf, out):
                    await stream.send_all(out)
                    await _lingering_close(stream)
                    return
        except RemoteProtocolError as exc:
            out += _error(exc.status_hint, str(exc), _CLOSE)
            await _flush_and_linger(stream, out)
        except _Close as exc:
            out += exc.response
            await _flush_and_linger(stream, out)
        except _Abort:
            pass
        except _GONE:
            pass  # the client went away
        except Exception:
            logger.error("%s: connection handler failed", self, exc_info=True)
        finally:
            await trio.aclose_forcefully(stream)
            self._connections -= 1

    async def _dispatch(
        self, stream: HalfCloseableStream, head: RequestHead, buf: bytearray, out: bytearray
    ) -> bool:
        """Answer one request; return whether the connection stays open."""
        mode = _mode(head)
        method = head.method
        target = head.target
        # Fast path first: the static endpoints need no body handling when there is none.
        framing, length = request_framing(head)
        if framing is NONE and method == b"GET":
            if target == b"/loadtest/ping":
                out += _PING[mode]
                return mode != _CLOSE
            if target == b"/loadtest/fast":
                out += _FAST[mode]
                return mode != _CLOSE
        if not target.startswith(b"/"):
            # absolute-form (RFC 9112 §3.2.2): keep only the path and query.
            scheme, sep, rest = target.partition(b"://")
            if not sep or not scheme.isalpha():
                await self._discard_body(stream, head, buf, framing, length)
                out += _error(400, f"request target {_show(target)} is not a path", mode)
                return mode != _CLOSE
            slash = rest.find(b"/")
            target = rest[slash:] if slash >= 0 else b"/"
        path, _, query = target.partition(b"?")
        if path == b"/loadtest/echo" and method == b"POST":
            await self._echo(stream, head, buf, out, mode, framing, length)
            return mode != _CLOSE
        await self._discard_body(stream, head, buf, framing, length)
        if not _known(path):
            out += _error(404, f"no endpoint {_show(path)}; GET /loadtest/info lists them", mode)
        elif method != (allowed := b"POST" if path == b"/loadtest/echo" else b"GET"):
            body = (
                f"405 Method Not Allowed: {_show(method)} {_show(path)}; use {allowed.decode()}\n"
            ).encode()
            out += _head(405, mode, _TEXT, len(body))[:-2] + b"Allow: %b\r\n\r\n" % allowed
            out += body
        elif path == b"/loadtest/ping":
            out += _PING[mode]
        elif path == b"/loadtest/fast":
            out += _FAST[mode]
        elif path == b"/loadtest/info":
            out += _INFO[mode]
        elif path == b"/loadtest/get":
            out += _response(200, mode, _JSON, _describe(head, path, query))
        elif path.startswith(b"/loadtest/delay/"):
            limit = self.config.max_delay_ms
            ms = _int_param(path[16:], 0, limit)
            if ms is None:
                message = f"delay must be an integer 0..{limit} ms, got {_show(path[16:])!r}"
                out += _error(400, message, mode)
            else:
                if out:  # answers to earlier pipelined requests need not wait
                    await stream.send_all(out)
                    out.clear()
                await trio.sleep(ms / 1000)
                out += _response(200, mode, _JSON, b'{"delay_ms":%d}' % ms)
        elif path.startswith(b"/loadtest/bytes/"):
            limit = self.config.max_bytes
            n = _int_param(path[16:], 0, limit)
            if n is None:
                out += _error(
                    400, f"n must be an integer 0..{limit}, got {_show(path[16:])!r}", mode
                )
            else:
                await self._send_bytes(stream, out, mode, n)
        else:  # /loadtest/status/
            code = _int_param(path[17:], 200, 599)
            if code is None:
                message = f"status must be an integer 200..599, got {_show(path[17:])!r}"
                out += _error(400, message, mode)
            elif code in (204, 304):
                out += _head(code, mode, None, None)
            else:
                out += _response(code, mode, _TEXT, b"status %d\n" % code)
        return mode != _CLOSE

    async def _expect_continue(
        self, stream: HalfCloseableStream, head: RequestHead, buf: bytearray
    ) -> None:
        # RFC 9110 §10.1.1: a client waiting for 100 Continue may hold the body back.
        if not buf and head.http_version == b"1.1":
            expect = head.get(b"expect")
            if expect is not None and expect.lower() == b"100-continue":
                await stream.send_all(_CONTINUE)

    def _check_length(self, framing: Framing, length: int) -> None:
        if framing is LENGTH and length > self.config.max_body_size:
            raise _Close(
                _error(
                    413, f"body of {length} bytes over limit {self.config.max_body_size}", _CLOSE
                )
            )

    async def _read_body(
        self, stream: HalfCloseableStream, reader: BodyReader, buf: bytearray, received: int
    ) -> tuple[bytes, int]:
        """Return the next piece of body (waiting for input if none is buffered)."""
        while True:
            data = reader.read(buf)
            if data or reader.done:
                received += len(data)
                if received > self.config.max_body_size:
                    raise _Close(
                        _error(413, f"body over limit {self.config.max_body_size}", _CLOSE)
                    )
                return data, received
            more = await stream.receive_some(_RECV_SIZE)
            if not more:
                reader.feed_eof()  # raises: no request body is framed by EOF
            buf += more

    async def _discard_body(
        self,
        stream: HalfCloseableStream,
        head: RequestHead,
        buf: bytearray,
        framing: Framing,
        length: int,
    ) -> None:
        if framing is NONE or (framing is LENGTH and length == 0):
            return
        self._check_length(framing, length)
        await self._expect_continue(stream, head, buf)
        reader = make_body_reader(framing, length)
        received = 0
        while not reader.done:
            _, received = await self._read_body(stream, reader, buf, received)

    async def _echo(
        self,
        stream: HalfCloseableStream,
        head: RequestHead,
        buf: bytearray,
        out: bytearray,
        mode: int,
        framing: Framing,
        length: int,
    ) -> None:
        content_type = head.get(b"content-type") or b"application/octet-stream"
        if framing is NONE:
            out += _response(200, mode, content_type, b"")
            return
        self._check_length(framing, length)
        await self._expect_continue(stream, head, buf)
        reader = make_body_reader(framing, length)
        received = 0
        if framing is LENGTH and length <= _SMALL_ECHO:
            pieces = []
            while not reader.done:
                data, received = await self._read_body(stream, reader, buf, received)
                pieces.append(data)
            out += _response(200, mode, content_type, b"".join(pieces))
            return
        # Stream: answer each piece as it arrives.
        first, received = await self._read_body(stream, reader, buf, received)
        if reader.done and framing is CHUNKED:
            out += _response(200, mode, content_type, first)  # the whole body was buffered
            return
        try:
            await self._stream_echo(
                stream, reader, buf, out, mode, content_type, framing, length, first, received
            )
        except (_Close, RemoteProtocolError) as exc:
            # The answer has started: no error status can follow it, only a cut connection.
            raise _Abort from exc

    async def _stream_echo(
        self,
        stream: HalfCloseableStream,
        reader: BodyReader,
        buf: bytearray,
        out: bytearray,
        mode: int,
        content_type: bytes,
        framing: Framing,
        length: int,
        first: bytes,
        received: int,
    ) -> None:
        if framing is LENGTH:
            out += _head(200, mode, content_type, length)
            out += first
            await stream.send_all(out)
            out.clear()
            while not reader.done:
                data, received = await self._read_body(stream, reader, buf, received)
                await stream.send_all(data)
            return
        out += _head(200, mode, content_type, None)[:-2] + b"Transfer-Encoding: chunked\r\n\r\n"
        if first:
            out += encode_chunk(first)
        await stream.send_all(out)
        out.clear()
        while not reader.done:
            data, received = await self._read_body(stream, reader, buf, received)
            if data:
                await stream.send_all(encode_chunk(data))
        out += LAST_CHUNK

    async def _send_bytes(
        self, stream: HalfCloseableStream, out: bytearray, mode: int, n: int
    ) -> None:
        out += _head(200, mode, b"application/octet-stream", n)
        if n <= _BLOCK_SIZE:
            out += _BLOCK[:n]
            return
        out += _BLOCK[:_BLOCK_SIZE]
        await stream.send_all(out)
        out.clear()
        left = n - _BLOCK_SIZE
        block = _BLOCK[:_BLOCK_SIZE]
        while left >= _BLOCK_SIZE:
            await stream.send_all(block)
            left -= _BLOCK_SIZE
        if left:
            await stream.send_all(block[:left])


async def _lingering_close(stream: HalfCloseableStream) -> None:
    """Send EOF, then read and drop what the client still sends, for a bounded time.

    Closing a socket with unread input makes the kernel send RST, which can destroy the answer
    we just sent before the client reads it (RFC 9112 §9.6; nginx's ``lingering_close``).
    """
    with contextlib.suppress(*_GONE), trio.move_on_after(_LINGER_SECONDS):
        await stream.send_eof()
        drained = 0
        while drained < _LINGER_BYTES:
            data = await stream.receive_some(_RECV_SIZE)
            if not data:
                break
            drained += len(data)


async def _flush_and_linger(stream: HalfCloseableStream, out: bytearray) -> None:
    with contextlib.suppress(*_GONE):
        await stream.send_all(out)
        await _lingering_close(stream)


_PATHS: Final = frozenset(
    {b"/loadtest/ping", b"/loadtest/fast", b"/loadtest/info", b"/loadtest/get", b"/loadtest/echo"}
)
_PREFIXES: Final = (b"/loadtest/delay/", b"/loadtest/bytes/", b"/loadtest/status/")


def _known(path: bytes) -> bool:
    return path in _PATHS or path.startswith(_PREFIXES)


def _show(data: bytes) -> str:
    """``data`` for a one-line error message: decoded, at most 100 characters."""
    text = data[:100].decode("latin-1")
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


def _describe(head: RequestHead, path: bytes, query: bytes) -> bytes:
    headers: dict[str, str] = {}
    for name, value in head.headers:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    document = {
        "method": head.method.decode("latin-1"),
        "path": path.decode("latin-1"),
        "query": parse_qs(query.decode("latin-1"), keep_blank_values=True),
        "http_version": head.http_version.decode("latin-1"),
        "headers": headers,
    }
    return json.dumps(document, separators=(",", ":")).encode()


async def serve_backend(
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    config: BackendConfig | None = None,
    task_status: trio.TaskStatus[Backend] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run the test backend on ``host:port`` until cancelled.

    Each connection is served by its own task in a nursery this function owns; cancelling it
    closes the listening socket and every connection.

    Args:
        host: address to listen on.
        port: port to listen on; 0 picks a free one (read it from the started value).
        config: limits; the defaults of :class:`BackendConfig` if ``None``.
        task_status: ``nursery.start`` works: ``started()`` receives the :class:`Backend`
            once the socket is listening, so a bind error is raised from ``start``.

    Raises:
        OSError: the address could not be bound (raised from ``nursery.start``, ungrouped).
        ExceptionGroup: an unexpected error of the accept loop, grouped by the nursery this
            function owns; errors of one connection end only that connection.
    """
    config = config or BackendConfig()
    infos = await trio.socket.getaddrinfo(
        host, port, type=_stdlib_socket.SOCK_STREAM, flags=_stdlib_socket.AI_PASSIVE
    )
    family, type_, proto, _, sockaddr = infos[0]
    listener = trio.socket.socket(family, type_, proto)
    with listener:
        listener.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_REUSEADDR, 1)
        await listener.bind(sockaddr)
        listener.listen(config.backlog)
        bound_host, bound_port = listener.getsockname()[:2]
        backend = Backend(config, bound_host, bound_port)
        logger.info("%s: listening on %s", backend, backend.url)
        async with trio.open_nursery() as nursery:
            task_status.started(backend)
            await serve_socket(take_socket(listener), backend.serve_connection, nursery)
