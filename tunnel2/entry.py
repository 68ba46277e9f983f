"""ProxyEntry: the relay's public HTTP/1.1 side.

Layer: above server and uplink. May import trio, attrs, errors, uplink, server and the
internal HTTP/1.1 parser.

Each public connection is served by one task: it reads a request head, validates it strictly
(malformed and smuggling-shaped requests get a 4xx and the connection is closed), routes it to
a session's uplink, and streams the request body out and the response back without buffering
either whole. Heads are changed at the byte level (path prefix, hop-by-hop headers,
X-Forwarded-*); bodies pass through as bytes. Every failure becomes an HTTP answer that says
what happened (PROTOCOL.md §4); none of them ends anything but the one connection.
"""

from __future__ import annotations

import logging
from typing import Final, final

import trio

from tunnel2 import _http11 as http
from tunnel2.errors import ErrorCode, ProtocolError, StreamReset, UplinkClosed
from tunnel2.server import AGENT_PATH, ServerConfig, TunnelServer

TYPE_CHECKING = False
if TYPE_CHECKING:
    from tunnel2.uplink import TunnelStream

__all__ = ["ProxyEntry"]

logger = logging.getLogger(__name__)

_RECEIVE_SIZE: Final = 65536
_SESSION_PREFIX: Final = b"/session/"
# RFC 9110 §7.6.1, plus the proxy-only ones; the Connection header's own tokens are added.
_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"expect",
    }
)
_REASONS: Final = {
    400: b"Bad Request",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}
_RESET_STATUS: Final = {
    ErrorCode.BACKEND_UNAVAILABLE: 502,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.REFUSED_STREAM: 503,
}
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


def error_response(status: int, message: str, *, close: bool = False) -> bytes:
    """A complete plain-text response whose body says what went wrong."""
    body = f"{status} {_REASONS.get(status, b'Error').decode()}: {message}\n".encode()
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error")),
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"Connection: close\r\n" if close else b"",
            b"X-Tunnel2-Error: 1\r\n\r\n",
            body,
        ]
    )


class _Answer(Exception):
    """Answer the client with an error response (raised inside a request)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _ClientGone(Exception):
    """The public client closed or broke its connection mid-request."""


class _PrefixedStream(trio.abc.Stream):
    """A stream whose first reads return bytes that were already read from it."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            size = max_bytes or len(self._prefix)
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            await trio.lowlevel.checkpoint()
            return data
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._stream.aclose()


def _peer_address(stream: trio.abc.Stream) -> bytes:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return b"unknown"
    try:
        return str(sock.getpeername()[0]).encode()
    except OSError:
        return b"unknown"


@final
class ProxyEntry:
    """Serves public HTTP/1.1 connections for a :class:`~tunnel2.server.TunnelServer`.

    Constructing it only stores; :func:`tunnel2.serve_tunnel_server` hands it connections.
    """

    def __init__(self, server: TunnelServer) -> None:
        self.server = server
        self.config = server.config
        self._proto = server.base_url.partition("://")[0].encode() or b"http"
        self._domain_suffix = ("." + self.config.domain).encode() if self.config.domain else None

    def __repr__(self) -> str:
        return f"<ProxyEntry {self.server.base_url}>"

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one public connection until it closes; closes ``stream`` before returning.

        Requests on the agents' path with a WebSocket upgrade are handed to the server.
        """
        peer = _peer_address(stream)
        try:
            await self._serve(stream, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, _ClientGone):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve(self, client: trio.abc.Stream, peer: bytes) -> None:
        config = self.config
        buf = bytearray()
        first = True
        while True:
            # 1. A head, within the idle timeout (keep-alive) and the size limit.
            end = http.find_head_end(buf)
            with trio.move_on_after(config.idle_timeout if first or not buf else 30):
                while end < 0:
                    if len(buf) > config.max_head_size:
                        await client.send_all(
                            error_response(
                                431,
                                f"request head is over {config.max_head_size} bytes",
                                close=True,
                            )
                        )
                        return
                    data = await client.receive_some(_RECEIVE_SIZE)
                    if not data:
                        return
                    buf += data
                    end = http.find_head_end(buf, max(0, len(buf) - len(data) - 3))
            if end < 0:
                return  # idle keep-alive connection timed out
            first = False
            head = bytes(buf[:end])
            del buf[:end]
            try:
                request = http.parse_request_head(head, max_size=config.max_head_size)
                framing, length = http.request_framing(request)
            except ProtocolError as exc:
                await client.send_all(error_response(exc.status_hint, str(exc), close=True))
                return
            if request.target.startswith(AGENT_PATH.encode()) and (
                (request.get(b"upgrade") or b"").lower() == b"websocket"
            ):
                await self.server.handle_websocket(_PrefixedStream(client, head + bytes(buf)))
                return
            try:
                keep_alive = await self._proxy(client, peer, request, framing, length, buf)
            except _Answer as answer:
                # Nothing of a response went out yet; the request body may be unread.
                await client.send_all(error_response(answer.status, answer.message, close=True))
                return
            if not keep_alive:
                return

    # --- one request --------------------------------------------------------------------

    def _route(self, request: http.RequestHead) -> tuple[str, bytes]:
        """Return (session id, target for the backend) or raise _Answer 404."""
        if self._domain_suffix is not None:
            host = (request.get(b"host") or b"").rpartition(b":")[0] or request.get(b"host")
            if host and host.lower().endswith(self._domain_suffix):
                label = host[: -len(self._domain_suffix)]
                if label and b"." not in label:
                    return label.decode("ascii", "replace"), request.target
        target = request.target
        if target.startswith(_SESSION_PREFIX):
            rest = target[len(_SESSION_PREFIX) :]
            cut = len(rest)
            for sep in (b"/", b"?"):
                index = rest.find(sep)
                if index >= 0:
                    cut = min(cut, index)
            session_id, backend_target = rest[:cut], rest[cut:]
            if not backend_target.startswith(b"/"):
                backend_target = b"/" + backend_target
            if session_id:
                return session_id.decode("ascii", "replace"), backend_target
        raise _Answer(
            404,
            "no tunnel here: use /session/{id}/... "
            + (f"or Host {{id}}.{self.config.domain}" if self.config.domain else ""),
        )

    def _forward_head(
        self,
        request: http.RequestHead,
        target: bytes,
        framing: http.Framing,
        peer: bytes,
    ) -> bytes:
        drop = set(_HOP_BY_HOP)
        for value in request.get_all(b"connection"):
            drop.update(t.strip().lower() for t in value.split(b","))
        lines = [b"%s %s HTTP/1.1\r\n" % (request.method, target)]
        forwarded_for = peer
        host = b""
        for name, value in request.headers:
            lower = name.lower()
            if lower in drop:
                continue
            if lower == b"x-forwarded-for":
                forwarded_for = value + b", " + peer
                continue
            if lower in (b"x-forwarded-proto", b"x-forwarded-host"):
                continue
            if lower == b"host":
                host = value
            lines.append(b"%s: %s\r\n" % (name, value))
        if not host:
            host = self.server.base_url.partition("://")[2].encode()
            lines.append(b"Host: %s\r\n" % host)
        if framing is http.Framing.CHUNKED:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        lines.append(
            b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nX-Forwarded-Host: %s\r\n\r\n"
            % (forwarded_for, self._proto, host)
        )
        return b"".join(lines)

    async def _proxy(
        self,
        client: trio.abc.Stream,
        peer: bytes,
        request: http.RequestHead,
        framing: http.Framing,
        length: int,
        buf: bytearray,
    ) -> bool:
        """Carry one request through the tunnel; return whether the connection stays open."""
        config = self.config
        session_id, target = self._route(request)
        if (
            config.max_body_size is not None
            and framing is http.Framing.LENGTH
            and length > config.max_body_size
        ):
            raise _Answer(413, f"request body is {length} bytes, limit {config.max_body_size}")
        route = self.server.registry.route(session_id, trio.current_time())
        if route == "unknown":
            raise _Answer(404, f"session {session_id} is not connected to this relay")
        if route == "disconnected":
            raise _Answer(502, f"session {session_id} has no agent connected right now")
        assert not isinstance(route, str)
        head = self._forward_head(request, target, framing, peer)
        try:
            stream = route.open_stream(head)
        except UplinkClosed as exc:
            raise _Answer(502, f"agent of session {session_id} disconnected: {exc}") from None
        if request.get(b"expect") == b"100-continue" and framing is not http.Framing.NONE:
            await client.send_all(_CONTINUE)
        try:
            return await self._exchange(client, request, framing, length, buf, stream)
        except StreamReset as exc:
            status = _RESET_STATUS.get(exc.code, 502)
            raise _Answer(status, f"session {session_id}: {exc.reason or exc}") from None
        except UplinkClosed as exc:
            raise _Answer(
                502, f"agent of session {session_id} disconnected mid-request: {exc}"
            ) from None
        finally:
            stream.close()

    async def _exchange(
        self,
        client: trio.abc.Stream,
        request: http.RequestHead,
        framing: http.Framing,
        length: int,
        buf: bytearray,
        stream: TunnelStream,
    ) -> bool:
        pump = _BodyPump(client, http.make_body_reader(framing, length), buf, stream, self.config)
        result: bool | BaseException
        # Nothing raises out of this nursery (trio would wrap it in a group): the outcome is
        # kept and raised after it closes.
        async with trio.open_nursery() as nursery:
            if framing is http.Framing.NONE:
                stream.send_end()
                pump.done = True
            else:
                nursery.start_soon(pump.run)
            try:
                response_head = None
                with trio.move_on_after(self.config.request_timeout):
                    response_head = await stream.receive_head()
                if response_head is None:
                    stream.reset(ErrorCode.TIMEOUT, "relay timed out waiting for the response")
                    result = _Answer(
                        504,
                        f"no response from the tunnel within {self.config.request_timeout:g}s",
                    )
                else:
                    result = await self._respond(client, request, response_head, stream)
            except (StreamReset, UplinkClosed, _ClientGone, ProtocolError) as exc:
                result = pump.error or exc
            nursery.cancel_scope.cancel()
        if isinstance(result, BaseException):
            raise result
        return result and pump.done

    async def _respond(
        self,
        client: trio.abc.Stream,
        request: http.RequestHead,
        response_head: bytes,
        stream: TunnelStream,
    ) -> bool:
        response = http.parse_response_head(response_head)
        framing, length = http.response_framing(response, request.method)
        keep_alive = request.keep_alive and framing is not http.Framing.UNTIL_CLOSE
        chunked = framing is http.Framing.CHUNKED
        if request.http_version == b"1.0":
            if chunked:
                # HTTP/1.0 has no chunked coding: close-delimit the body instead.
                response_head = b"".join(
                    [response_head.partition(b"\r\n")[0], b"\r\n"]
                    + [
                        b"%s: %s\r\n" % (n, v)
                        for n, v in response.headers
                        if n.lower() != b"transfer-encoding"
                    ]
                    + [b"\r\n"]
                )
                chunked = False
                keep_alive = False
            response_head = response_head[:-2] + (
                b"Connection: keep-alive\r\n\r\n" if keep_alive else b"Connection: close\r\n\r\n"
            )
        elif not keep_alive:
            response_head = response_head[:-2] + b"Connection: close\r\n\r\n"
        # Content-Length bodies are counted so a misbehaving agent cannot desync the client.
        remaining = (
            length if framing is http.Framing.LENGTH else 0 if framing is http.Framing.NONE else -1
        )
        parts = [response_head]
        pending = len(response_head)
        try:
            while True:
                if pending and (pending >= _RECEIVE_SIZE or not stream.data_ready):
                    # Send what we have: the head and a small body go out in one write, a
                    # large body in writes of about 64 KiB.
                    await client.send_all(b"".join(parts))
                    parts = []
                    pending = 0
                data = await stream.receive_data()
                if not data:
                    break
                if remaining >= 0:
                    if len(data) > remaining:
                        raise UplinkClosed("the agent sent more body than the response declared")
                    remaining -= len(data)
                parts.append(http.encode_chunk(data) if chunked else data)
                pending += len(data)
            if chunked:
                parts.append(http.LAST_CHUNK)
            await client.send_all(b"".join(parts))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            stream.reset(ErrorCode.CANCEL, "client went away")
            raise _ClientGone() from None
        except (StreamReset, UplinkClosed) as exc:
            # The head is out: all we can do is cut the connection short so the client
            # sees an incomplete body rather than a wrong one.
            logger.info("stream %d failed after the response head: %s", stream.id, exc)
            raise _ClientGone() from None
        if remaining > 0:
            raise _ClientGone()
        return keep_alive


class _BodyPump:
    """Carries one request body from the client into a stream."""

    def __init__(
        self,
        client: trio.abc.Stream,
        reader: http.BodyReader,
        buf: bytearray,
        stream: TunnelStream,
        config: ServerConfig,
    ) -> None:
        self.client = client
        self.reader = reader
        self.buf = buf
        self.stream = stream
        self.limit = config.max_body_size
        self.done = False
        self.error: _Answer | None = None

    async def run(self) -> None:
        reader, buf, stream = self.reader, self.buf, self.stream
        total = 0
        try:
            while True:
                if buf:
                    data = reader.read(buf)
                    if data:
                        total += len(data)
                        if self.limit is not None and total > self.limit:
                            self.error = _Answer(
                                413, f"request body is over the limit of {self.limit} bytes"
                            )
                            stream.reset(ErrorCode.CANCEL, "request body over the limit")
                            return
                        await stream.send_data(data)
                    if reader.done:
                        break
                    if buf:
                        continue
                more = await self.client.receive_some(_RECEIVE_SIZE)
                if not more:
                    reader.feed_eof()
                    break
                buf += more
            stream.send_end()
            self.done = True
        except ProtocolError as exc:
            # A malformed body (bad chunk) or a client gone mid-body.
            self.error = _Answer(exc.status_hint, str(exc))
            stream.reset(ErrorCode.CANCEL, str(exc))
        except (StreamReset, UplinkClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            stream.close()  # the response side reports it
