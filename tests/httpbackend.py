"""A scriptable HTTP/1.1 backend for the socket tests (not shipped, not the hot path).

Start it with ``backend = await nursery.start(serve_backend, "echo")``; it binds 127.0.0.1
port 0 and ``started()`` receives a :class:`Backend` (``.port``, ``.connections``,
``.requests``). Requests are parsed with h11; responses are written as raw bytes so a mode can
frame them any way a real backend might (Content-Length, chunked, HTTP/1.0 close-delimited).

Routes (every mode but ``"sleep"``):

- ``/bytes/N``: N deterministic bytes (:func:`pattern_sha256` gives their digest);
- ``/cookies``: two ``Set-Cookie`` fields;
- ``/status/NNN``: that status with no body (204, 304, ...);
- anything else: the request echoed as JSON (:func:`decode_echo`).

A HEAD request gets the head the GET would get, Content-Length included, and no body.

Modes:

- ``"echo"``: keep-alive, Content-Length.
- ``"chunked"``: keep-alive, ``Transfer-Encoding: chunked`` in several chunks.
- ``"http10-close"``: an ``HTTP/1.0`` response without Content-Length (close-delimited), the
  socket closed right after the last write (the "lose the tail" trap).
- ``"close-idle"``: Content-Length and *no* ``Connection: close``, but the socket is closed
  right after each response (the stale keep-alive pool trap).
- ``"sleep"``: reads the request and never answers.

Or pass a :data:`Handler` coroutine function returning a :class:`Reply`.

Run ``python tests/httpbackend.py [MODE]`` to serve in a subprocess; it prints the port.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Final, Literal, NoReturn

import attrs
import h11
import trio

__all__ = [
    "Backend",
    "Handler",
    "Mode",
    "Reply",
    "Request",
    "decode_echo",
    "pattern_chunks",
    "pattern_sha256",
    "route",
    "serve_backend",
]

Mode = Literal["echo", "chunked", "http10-close", "close-idle", "sleep"]
Framing = Literal["length", "chunked", "close"]

_BLOCK_SIZE: Final = 65536
_KEEP_BODY: Final = 1 << 20  # bodies beyond this are hashed, not kept


@attrs.define
class Request:
    """What the backend received (body hashed as it streamed in; kept if small)."""

    method: bytes
    target: bytes
    http_version: bytes
    headers: list[tuple[bytes, bytes]]
    body_length: int = 0
    body_sha256: str = ""
    body: bytes = b""

    def get_all(self, name: bytes) -> list[bytes]:
        """Every value of header ``name`` (lower case), in order."""
        return [v for n, v in self.headers if n == name]

    def to_json(self) -> bytes:
        """The echo body."""
        return json.dumps(
            {
                "method": self.method.decode("latin-1"),
                "target": self.target.decode("latin-1"),
                "http_version": self.http_version.decode("latin-1"),
                "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers],
                "body_length": self.body_length,
                "body_sha256": self.body_sha256,
            }
        ).encode()


def decode_echo(body: bytes) -> Request:
    """Turn an echo body back into a :class:`Request` (header names are lower case)."""
    data = json.loads(body)
    return Request(
        method=data["method"].encode("latin-1"),
        target=data["target"].encode("latin-1"),
        http_version=data["http_version"].encode("latin-1"),
        headers=[(n.encode("latin-1"), v.encode("latin-1")) for n, v in data["headers"]],
        body_length=data["body_length"],
        body_sha256=data["body_sha256"],
    )


@attrs.define
class Reply:
    """A response for the backend to write.

    Attributes:
        status: the status code.
        headers: fields to send as given (framing fields are added from ``framing``).
        body: bytes, or an iterable of chunks (streamed, never joined).
        length: the body length, needed for ``framing="length"`` with an iterable body.
        framing: ``"length"`` (Content-Length), ``"chunked"``, or ``"close"`` (an HTTP/1.0
            response delimited by closing the connection).
        close: close the connection right after this response, without saying so.
        bodyless: send no body and no framing fields (204, 304).
    """

    status: int = 200
    headers: list[tuple[bytes, bytes]] = attrs.Factory(list)
    body: bytes | Iterable[bytes] = b""
    length: int | None = None
    framing: Framing = "length"
    close: bool = False
    bodyless: bool = False


Handler = Callable[[Request], Awaitable[Reply]]


@attrs.define
class Backend:
    """A running backend: its port and what it has seen."""

    port: int
    connections: int = 0
    requests: list[Request] = attrs.Factory(list)
    request_received: trio.Event = attrs.Factory(trio.Event)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"


def _block(size: int) -> bytes:
    return random.Random(size).randbytes(_BLOCK_SIZE)


def pattern_chunks(size: int) -> Iterator[bytes]:
    """The ``size`` deterministic bytes of ``/bytes/{size}``, in chunks of 64 KiB."""
    block = _block(size)
    remaining = size
    while remaining > 0:
        chunk = block if remaining >= _BLOCK_SIZE else block[:remaining]
        remaining -= len(chunk)
        yield chunk


def pattern_sha256(size: int) -> str:
    """The sha256 of :func:`pattern_chunks` (``size``)."""
    digest = hashlib.sha256()
    for chunk in pattern_chunks(size):
        digest.update(chunk)
    return digest.hexdigest()


def route(request: Request, framing: Framing = "length") -> Reply:
    """The reply every mode gives to ``request`` (see the module docstring)."""
    path = request.target.partition(b"?")[0]
    if path.startswith(b"/bytes/"):
        size = int(path[len(b"/bytes/") :])
        headers = [(b"Content-Type", b"application/octet-stream")]
        return Reply(200, headers, pattern_chunks(size), length=size, framing=framing)
    if path == b"/cookies":
        headers = [(b"Set-Cookie", b"a=1; Path=/"), (b"Set-Cookie", b"b=2; Path=/")]
        return Reply(200, headers, b"cookies", framing=framing)
    if path.startswith(b"/status/"):
        status = int(path[len(b"/status/") :])
        return Reply(status, [(b"ETag", b'"v1"')], bodyless=True)
    headers = [(b"Content-Type", b"application/json"), (b"X-Backend", b"httpbackend")]
    return Reply(200, headers, request.to_json(), framing=framing)


async def _mode_reply(mode: Mode, request: Request) -> Reply:
    if mode == "sleep":
        await trio.sleep_forever()
    await trio.lowlevel.checkpoint()
    if mode == "echo":
        return route(request)
    if mode == "chunked":
        reply = route(request, "chunked")
        if isinstance(reply.body, bytes) and len(reply.body) > 3:
            # Several chunks, including a tiny one, so re-framing is exercised.
            body = reply.body
            reply.body = [body[:1], body[1:3], body[3:]]
        return reply
    if mode == "http10-close":
        return route(request, "close")
    if mode == "close-idle":
        reply = route(request)
        reply.close = True
        return reply
    raise ValueError(f"unknown mode {mode!r}")


_REASONS: Final = {200: b"OK", 204: b"No Content", 304: b"Not Modified", 404: b"Not Found"}


def _chunks(body: bytes | Iterable[bytes]) -> Iterable[bytes]:
    return [body] if isinstance(body, bytes) else body


async def _write_reply(stream: trio.abc.Stream, request: Request, reply: Reply) -> bool:
    """Write ``reply``; return whether the connection may carry another request."""
    version = b"1.0" if reply.framing == "close" else b"1.1"
    lines = [b"HTTP/%s %d %s\r\n" % (version, reply.status, _REASONS.get(reply.status, b"X"))]
    lines += [b"%s: %s\r\n" % (n, v) for n, v in reply.headers]
    if not reply.bodyless:
        if reply.framing == "length":
            length = reply.length
            if length is None:
                assert isinstance(reply.body, bytes), "an iterable body needs a length"
                length = len(reply.body)
            lines.append(b"Content-Length: %d\r\n" % length)
        elif reply.framing == "chunked":
            lines.append(b"Transfer-Encoding: chunked\r\n")
    lines.append(b"\r\n")
    head = b"".join(lines)
    if reply.bodyless or request.method == b"HEAD":
        await stream.send_all(head)
    elif reply.framing == "chunked":
        pending = head
        for chunk in _chunks(reply.body):
            if chunk:
                await stream.send_all(pending + b"%x\r\n%s\r\n" % (len(chunk), chunk))
                pending = b""
        await stream.send_all(pending + b"0\r\n\r\n")
    else:
        pending = head
        for chunk in _chunks(reply.body):
            await stream.send_all(pending + chunk)
            pending = b""
        if pending:
            await stream.send_all(pending)
    return not reply.close and reply.framing != "close"


async def _read_request(
    stream: trio.abc.Stream, conn: h11.Connection, backend: Backend
) -> Request | None:
    """Read one whole request (hashing its body); ``None`` at a clean EOF."""
    request: Request | None = None
    digest = hashlib.sha256()
    kept = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(_BLOCK_SIZE)
            if not data and request is None and not conn.trailing_data[0]:
                return None
            conn.receive_data(bytes(data))
        elif isinstance(event, h11.Request):
            request = Request(
                method=event.method,
                target=event.target,
                http_version=event.http_version,
                headers=list(event.headers),
            )
            backend.requests.append(request)
            backend.request_received.set()
        elif isinstance(event, h11.Data):
            assert request is not None
            digest.update(event.data)
            request.body_length += len(event.data)
            if len(kept) < _KEEP_BODY:
                kept += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            request.body_sha256 = digest.hexdigest()
            request.body = bytes(kept)
            return request
        elif isinstance(event, h11.ConnectionClosed):
            return None
        else:
            raise AssertionError(f"unexpected h11 event {event!r}")


async def _serve_connection(stream: trio.abc.Stream, backend: Backend, reply_for: Handler) -> None:
    backend.connections += 1
    leftover = b""
    try:
        while True:
            conn = h11.Connection(h11.SERVER)
            if leftover:  # b"" would mean EOF to h11
                conn.receive_data(leftover)
            try:
                request = await _read_request(stream, conn, backend)
            except (h11.RemoteProtocolError, trio.BrokenResourceError):
                return
            if request is None:
                return
            leftover = conn.trailing_data[0]
            reply = await reply_for(request)
            if not await _write_reply(stream, request, reply):
                return
    except trio.BrokenResourceError:
        return
    finally:
        await trio.aclose_forcefully(stream)


async def serve_backend(
    handler: Mode | Handler = "echo",
    *,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[Backend] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve HTTP (HTTPS with ``ssl_context``) on 127.0.0.1, port 0, until cancelled;
    ``started()`` gets the Backend."""
    reply_for: Handler
    if isinstance(handler, str):
        mode: Mode = handler

        async def mode_reply(request: Request) -> Reply:
            return await _mode_reply(mode, request)

        reply_for = mode_reply
    else:
        reply_for = handler
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    backend = Backend(port=listeners[0].socket.getsockname()[1])

    async def serve(stream: trio.SocketStream) -> None:
        if ssl_context is None:
            await _serve_connection(stream, backend, reply_for)
        else:
            tls = trio.SSLStream(stream, ssl_context, server_side=True, https_compatible=True)
            await _serve_connection(tls, backend, reply_for)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, serve, listeners)
        task_status.started(backend)
        await trio.sleep_forever()
    raise AssertionError("unreachable")


async def _main(mode: str) -> None:
    if mode not in ("echo", "chunked", "http10-close", "close-idle", "sleep"):
        raise SystemExit(f"unknown mode {mode!r}")
    async with trio.open_nursery() as nursery:
        backend = await nursery.start(serve_backend, mode)
        print(backend.port, flush=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_main, sys.argv[1] if len(sys.argv) > 1 else "echo")
