"""Agent: dials the relay and answers the streams it opens.

Layer: above uplink. May import trio, trio-websocket, attrs, errors, frames, access, transports,
uplink and the internal HTTP/1.1 parser.

The agent keeps one uplink to its relay, re-dialling with backoff when it drops (asking for its
session back with the resume key). A fixed pool of ``max_concurrent`` worker tasks takes
streams from the uplink; ``max_queued`` more wait, and past that the uplink resets new streams
with OVERLOADED (the entry answers 503). A worker answers a stream by forwarding it to a
backend over pooled keep-alive connections (:class:`BackendForwarder`) or by calling an ASGI 3
app in-process (:class:`AsgiHandler`).
"""

from __future__ import annotations

import collections
import logging
import math
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from http import HTTPStatus
from typing import Any, Final, NoReturn, final

import attrs
import trio
import trio_websocket

from tunnel2 import _http11 as http
from tunnel2 import frames
from tunnel2._sockets import FastSocketStream, connect_tcp
from tunnel2.errors import (
    ErrorCode,
    HandshakeError,
    HandshakeRefused,
    HandshakeTimeout,
    ProtocolError,
    RemoteProtocolError,
    StreamReset,
    UplinkClosed,
)
from tunnel2.observe import Observer, Reconnected, RequestFinished, RequestStarted, emit
from tunnel2.transports import FrameTransport, WebSocketTransport, connect_websocket
from tunnel2.uplink import (
    MAX_MESSAGE_SIZE,
    TunnelStream,
    TunnelUplink,
    open_uplink,
    receive_handshake_frame,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from tunnel2.access import AccessPolicy

__all__ = [
    "Agent",
    "AgentConfig",
    "AsgiApp",
    "AsgiHandler",
    "BackendForwarder",
    "StreamHandler",
    "websocket_connector",
]

logger = logging.getLogger(__name__)

_AGENT_PATH: Final = "/_tunnel/connect"
# Refusals a connected agent waits out (the relay restarts or sheds load) instead of quitting.
_TEMPORARY_REFUSALS: Final = frozenset({ErrorCode.SESSION_UNAVAILABLE, ErrorCode.OVERLOADED})
_RECEIVE_SIZE: Final = 65536

# A handler may return the status it answered (for RequestFinished; None: not known).
StreamHandler = Callable[[TunnelStream], Awaitable[int | None]]
Connector = Callable[[], AbstractAsyncContextManager[FrameTransport]]
AsgiScope = MutableMapping[str, Any]
AsgiMessage = MutableMapping[str, Any]
AsgiApp = Callable[
    [AsgiScope, Callable[[], Awaitable[AsgiMessage]], Callable[[AsgiMessage], Awaitable[None]]],
    Awaitable[None],
]


@final
@attrs.frozen
class AgentConfig:
    """Settings of an :class:`Agent`.

    Attributes:
        token: the credential sent in HELLO.
        session_id: a fixed session id to ask for; ``None`` lets the relay pick one.
        max_concurrent: requests answered at once (worker tasks).
        max_queued: requests that may wait for a worker; past it the relay answers 503.
        connect_timeout: seconds for the connection and handshake.
        backoff_initial: first re-dial delay in seconds, doubled per failure.
        backoff_max: longest re-dial delay.
        max_frame_size: largest frame the agent accepts.
        access: who may visit the tunnel; sent in HELLO and enforced by the relay
            (PROTOCOL.md §3.1.1). ``None``: everyone who has the URL.
    """

    token: str | None = None
    session_id: str | None = None
    max_concurrent: int = 64
    max_queued: int = 1024
    connect_timeout: float = 10.0
    backoff_initial: float = 0.25
    backoff_max: float = 30.0
    max_frame_size: int = frames.DEFAULT_MAX_FRAME_SIZE
    access: AccessPolicy | None = None


def agent_url(server_url: str) -> str:
    """The WebSocket URL of a relay's agent endpoint, from its ``http(s)``/``ws(s)`` URL."""
    parts = urllib.parse.urlsplit(server_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"relay URL {server_url!r} must start with http://, https://, ws://")
    path = parts.path.rstrip("/")
    if not path.endswith(_AGENT_PATH):
        path += _AGENT_PATH
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


def websocket_connector(server_url: str, *, connect_timeout: float = 10.0) -> Connector:
    """A connector that dials the relay's WebSocket endpoint.

    ``ws://`` connections are driven by wsproto over a :class:`FastSocketStream` from the
    uplink's own tasks (:class:`WsprotoTransport`); ``wss://`` ones go through
    ``trio_websocket.open_websocket_url``, which brings TLS.
    """
    url = agent_url(server_url)
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    resource = parts.path or "/"

    @asynccontextmanager
    async def connect_tls() -> AsyncIterator[FrameTransport]:
        try:
            async with trio_websocket.open_websocket_url(
                url,
                max_message_size=MAX_MESSAGE_SIZE,
                receive_buffer_size=65536,
                connect_timeout=connect_timeout,
                disconnect_timeout=2,
            ) as ws:
                yield WebSocketTransport(ws)
        except trio_websocket.HandshakeError as exc:
            reason = exc.__cause__ or exc
            raise HandshakeError(f"cannot open a WebSocket to {url}: {reason}") from exc

    @asynccontextmanager
    async def connect() -> AsyncIterator[FrameTransport]:
        try:
            with trio.fail_after(connect_timeout):
                stream = await connect_tcp(host, port)
        except (OSError, trio.TooSlowError) as exc:
            raise HandshakeError(f"cannot connect to the relay at {url}: {exc}") from exc
        try:
            with trio.fail_after(connect_timeout):
                transport = await connect_websocket(stream, parts.netloc, resource)
        except (trio.BrokenResourceError, trio.TooSlowError) as exc:
            await trio.aclose_forcefully(stream)
            raise HandshakeError(f"WebSocket handshake with {url} failed: {exc}") from exc
        try:
            yield transport
        finally:
            await trio.aclose_forcefully(transport)

    return connect if parts.scheme == "ws" else connect_tls


@final
class Agent:
    """Keeps a session on a relay and answers its requests with ``handler``.

    Constructing it only stores; run it with ``await nursery.start(agent.serve)``, or use
    :func:`tunnel2.open_tunnel`.
    """

    def __init__(
        self,
        connect: Connector,
        handler: StreamHandler,
        config: AgentConfig | None = None,
        *,
        observers: Iterable[Observer] = (),
    ) -> None:
        self.config = config or AgentConfig()
        self.observers: list[Observer] = list(observers)  # --- observe ---
        self.admin_url: str | None = None  # the admin endpoint, if one is served
        self._connect = connect
        self._handler = handler
        self._welcome: frames.Welcome | None = None
        self._uplink: TunnelUplink | None = None
        self.connections = 0

    def __repr__(self) -> str:
        state = "CONNECTED" if self._uplink and not self._uplink.closed else "DISCONNECTED"
        return f"<Agent session={self.session_id} {state}>"

    @property
    def public_url(self) -> str:
        """The session's preferred public URL (after the first handshake)."""
        if self._welcome is None:
            raise RuntimeError("the agent has not connected yet")
        return self._welcome.public_url

    @property
    def public_urls(self) -> tuple[str, ...]:
        """Every public URL of the session, preferred first."""
        if self._welcome is None:
            raise RuntimeError("the agent has not connected yet")
        return self._welcome.public_urls

    @property
    def session_id(self) -> str | None:
        """The session id, once assigned."""
        return self._welcome.session_id if self._welcome else self.config.session_id

    @property
    def uplink(self) -> TunnelUplink | None:
        """The current uplink, if connected."""
        return self._uplink

    async def serve(
        self, *, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Connect, serve, and re-dial forever.

        ``task_status.started(self)`` is called once the first handshake succeeded, so
        :attr:`public_url` is set when ``nursery.start`` returns. Before that, failures raise
        (so a wrong URL or token surfaces at once); after it, a lost connection is re-dialled
        with exponential backoff, asking for the same session. A refusal is final, except
        that a connected agent waits out a relay that is shutting down or overloaded.

        Raises:
            HandshakeRefused: the relay refused the agent.
            HandshakeError: the first connection or handshake failed.
        """
        config = self.config
        delay = config.backoff_initial
        started = False
        while True:
            try:
                async with self._connect() as transport:
                    with trio.fail_after(config.connect_timeout):
                        welcome, decoder = await self._handshake(transport)
                    self._welcome = welcome
                    self.connections += 1
                    delay = config.backoff_initial
                    await self._run_uplink(transport, decoder, welcome, task_status, started)
                    started = True
            except HandshakeRefused as exc:
                if not started or exc.code not in _TEMPORARY_REFUSALS:
                    raise
                logger.warning("relay refused us for now (%s); re-dialling in %.2fs", exc, delay)
            except (
                HandshakeError,
                ProtocolError,
                OSError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                trio.TooSlowError,
                trio_websocket.ConnectionClosed,
            ) as exc:
                if not started and self._welcome is None:
                    if isinstance(exc, trio.TooSlowError):
                        raise HandshakeTimeout(
                            f"no answer from the relay within {config.connect_timeout}s"
                        ) from exc
                    if isinstance(exc, HandshakeError):
                        raise
                    raise HandshakeError(f"cannot connect to the relay: {exc}") from exc
                started = True
                logger.warning(
                    "connection to the relay lost (%s); re-dialling in %.2fs", exc, delay
                )
            else:
                logger.warning("connection to the relay closed; re-dialling in %.2fs", delay)
            self._uplink = None
            await trio.sleep(delay)
            delay = min(delay * 2, config.backoff_max)

    async def _run_uplink(
        self,
        transport: FrameTransport,
        decoder: frames.FrameDecoder,
        welcome: frames.Welcome,
        task_status: trio.TaskStatus[Agent],
        started: bool,
    ) -> None:
        config = self.config
        async with open_uplink(
            transport,
            decoder,
            welcome,
            role="agent",
            max_incoming=config.max_queued,
            name=f"agent:{welcome.session_id[:8]}",
        ) as uplink:
            self._uplink = uplink
            if started:
                logger.info("reconnected: %s", welcome.public_url)
                if self.observers:  # --- observe ---
                    event = Reconnected(welcome.session_id, welcome.public_url, self.connections)
                    emit(self.observers, event)
            else:
                task_status.started(self)
            async with trio.open_nursery() as workers:
                for _ in range(config.max_concurrent):
                    workers.start_soon(self._worker, uplink)

    async def _handshake(
        self, transport: FrameTransport
    ) -> tuple[frames.Welcome, frames.FrameDecoder]:
        config = self.config
        known = self._welcome
        hello = frames.Hello(
            token=config.token,
            session_id=known.session_id if known else config.session_id,
            resume_key=known.resume_key if known else None,
            max_frame_size=config.max_frame_size,
            access=config.access.to_json() if config.access is not None else None,
        )
        await transport.send(frames.encode(hello))
        decoder = frames.FrameDecoder(max_frame_size=config.max_frame_size)
        answer = await receive_handshake_frame(transport, decoder)
        if isinstance(answer, frames.Refuse):
            raise HandshakeRefused(answer.code, answer.reason)
        if not isinstance(answer, frames.Welcome):
            raise HandshakeError(f"expected WELCOME, got {type(answer).__name__}")
        return answer, decoder

    async def _worker(self, uplink: TunnelUplink) -> None:
        handler = self._handler
        while not uplink.closed:
            # One cancel scope serves stream after stream until a reset cancels it (a new
            # scope per request would cost trio two bookkeeping calls each time).
            with trio.CancelScope() as scope:
                while True:
                    try:
                        stream = await uplink.accept_stream()
                    except UplinkClosed:
                        return
                    stream.cancel_on_reset(scope)
                    observed = self._request_started(stream) if self.observers else None
                    status: int | None = 0
                    try:
                        status = await handler(stream)
                    except (StreamReset, UplinkClosed):
                        pass
                    except Exception:
                        logger.exception("handler failed on stream %d", stream.id)
                        stream.reset(ErrorCode.INTERNAL_ERROR, "the agent's handler failed")
                    finally:
                        stream.cancel_on_reset(None)
                        stream.close()
                        if observed is not None:
                            self._request_finished(observed, status)

    # --- observe: request events, built only when someone listens ------------------------

    def _request_started(self, stream: TunnelStream) -> tuple[RequestStarted, float]:
        head = stream.head or b""
        method, framing, length = _relay_head_framing(head)
        target = head[len(method) + 1 : head.find(b" ", len(method) + 1)]
        path = target.partition(b"?")[0].decode("ascii", "replace")
        body = None if framing is http.Framing.CHUNKED else length
        started = RequestStarted("agent", self.session_id or "", method.decode(), path, body)
        emit(self.observers, started)
        return started, trio.current_time()

    def _request_finished(self, observed: tuple[RequestStarted, float], status: int | None) -> None:
        started, start = observed
        finished = RequestFinished(
            "agent",
            started.session_id,
            started.method,
            started.path,
            started.request_body,
            status or 0,
            None,
            trio.current_time() - start,
        )
        emit(self.observers, finished)


def _relay_head_framing(head: bytes) -> tuple[bytes, http.Framing, int]:
    """Method and body framing of a request head the relay wrote.

    The relay validated the client's request and states its framing canonically, once
    (PROTOCOL.md §4.3), so no full parse is needed here; the backend parses what it gets.
    """
    method = head[: head.find(b" ")]
    index = head.find(b"\r\nContent-Length: ")
    if index >= 0:
        start = index + len(b"\r\nContent-Length: ")
        return method, http.Framing.LENGTH, int(head[start : head.find(b"\r\n", start)])
    if head.find(b"\r\nTransfer-Encoding: chunked\r\n") >= 0:
        return method, http.Framing.CHUNKED, 0
    return method, http.Framing.NONE, 0


def _response_head_for_tunnel(
    response: http.ResponseHead, head: bytes, framing: http.Framing
) -> tuple[bytes, bool]:
    """The head carried through the tunnel, and whether the backend keeps the connection.

    Works on the bytes (DESIGN.md: change heads at the byte level): hop-by-hop field lines
    are cut out with one regex pass (a 101 keeps Connection and Upgrade), and the framing is
    normalised: close-delimited bodies become chunked (PROTOCOL.md §4.3).

    Args:
        response: ``head`` parsed (so every field line in it is valid).
        head: the backend's response head, ending in CRLF CRLF.
        framing: the body framing of the response.
    """
    status = response.status
    fields = head[head.find(b"\r\n") + 2 : -2]
    fields = (_HOP_BY_HOP_101_RE if status == 101 else _HOP_BY_HOP_RE).sub(b"", fields)
    tokens = {t.strip().lower() for v in response.get_all(b"connection") for t in v.split(b",")}
    named = tokens - http.CONNECTION_OPTIONS
    if named:  # rare: fields the Connection header marks hop-by-hop
        fields = http.field_lines_re(named).sub(b"", fields)
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, response.reason), fields]
    if framing is http.Framing.CHUNKED or framing is http.Framing.UNTIL_CLOSE:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    parts.append(b"\r\n")
    if b"close" in tokens:
        keep_alive = False
    else:
        keep_alive = response.http_version == b"1.1" or b"keep-alive" in tokens
    return b"".join(parts), keep_alive


_HOP_BY_HOP_RE: Final = http.field_lines_re(http.HOP_BY_HOP)
_HOP_BY_HOP_101_RE: Final = http.field_lines_re(http.HOP_BY_HOP - {b"connection", b"upgrade"})


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


@final
class BackendForwarder:
    """Answers streams by forwarding them to an HTTP/1.1 backend at ``host:port``.

    Keeps up to ``max_idle`` keep-alive connections open for reuse. A request on a reused
    connection the backend had already closed is retried once on a fresh one when nothing of
    it was consumed yet (no body).
    """

    def __init__(self, host: str, port: int, *, max_idle: int = 128) -> None:
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self._idle: collections.deque[FastSocketStream] = collections.deque()

    def __repr__(self) -> str:
        return f"<BackendForwarder {self.host}:{self.port} idle={len(self._idle)}>"

    @property
    def target(self) -> str:
        """``http://host:port`` for messages."""
        return f"http://{self.host}:{self.port}"

    async def aclose(self) -> None:
        """Close the idle connections."""
        while self._idle:
            await trio.aclose_forcefully(self._idle.pop())

    async def __call__(self, stream: TunnelStream) -> int | None:
        """Forward one request; return the backend's status (None if it gave none)."""
        head = stream.head
        assert head is not None
        method, framing, length = _relay_head_framing(head)
        has_body = length > 0 or framing is http.Framing.CHUNKED
        for attempt in (0, 1):
            conn = self._checkout(check=has_body) if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                try:
                    conn = await self._open()
                except OSError as exc:
                    stream.reset(
                        ErrorCode.BACKEND_UNAVAILABLE,
                        f"backend {self.host}:{self.port} refused the connection "
                        f"({exc.strerror or exc})",
                    )
                    return None
            keep = False
            try:
                status, keep = await self._exchange(
                    conn, stream, head, method, has_body, framing, reused
                )
                break
            except _BackendGone:
                if has_body:  # its body is consumed: it cannot be sent again
                    stream.reset(
                        ErrorCode.BACKEND_UNAVAILABLE,
                        "backend closed the connection before answering",
                    )
                    return None
                continue  # retry once on a fresh connection
            except ProtocolError as exc:
                stream.reset(
                    ErrorCode.BACKEND_UNAVAILABLE, f"backend sent an invalid response: {exc}"
                )
                return None
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                stream.reset(ErrorCode.BACKEND_UNAVAILABLE, f"backend connection broke: {exc}")
                return None
            finally:
                if keep and len(self._idle) < self.max_idle:
                    self._idle.append(conn)
                else:
                    await trio.aclose_forcefully(conn)
        else:  # pragma: no cover - the loop always breaks or returns
            return None
        return status

    async def _open(self) -> FastSocketStream:
        return await connect_tcp(self.host, self.port)

    def _checkout(self, *, check: bool) -> FastSocketStream | None:
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

    async def _exchange(
        self,
        conn: FastSocketStream,
        stream: TunnelStream,
        head: bytes,
        method: bytes,
        has_body: bool,
        framing: http.Framing,
        reused: bool,
    ) -> tuple[int, bool]:
        """Send the request and relay the response; return (status, reusable)."""
        buf = bytearray()
        if not has_body:
            try:
                await conn.send_all(head)
            except trio.BrokenResourceError:
                if reused:
                    raise _BackendGone() from None
                raise
            return await self._relay_response(conn, stream, buf, method, reused)
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
                result = await self._relay_response(conn, stream, buf, method, reused)
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
        conn: FastSocketStream,
        stream: TunnelStream,
        head: bytes,
        framing: http.Framing,
        sent: trio.Event,
    ) -> None:
        chunked = framing is http.Framing.CHUNKED
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
        conn: FastSocketStream,
        stream: TunnelStream,
        buf: bytearray,
        method: bytes,
        reused: bool,
    ) -> tuple[int, bool]:
        # The head, skipping interim 1xx answers (the entry already said 100 Continue).
        while True:
            end = http.find_head_end(buf)
            while end < 0:
                data = await conn.receive_some(_RECEIVE_SIZE)
                if not data:
                    if reused and not buf:
                        raise _BackendGone()
                    raise RemoteProtocolError(
                        "backend closed the connection before a complete response head"
                    )
                buf += data
                if len(buf) > http.MAX_HEAD_SIZE:
                    raise RemoteProtocolError("backend response head is too large")
                end = http.find_head_end(buf)
            head = http.take(buf, end)
            response = http.parse_response_head(head)
            if response.status >= 200 or response.status == 101:
                break
        framing, length = http.response_framing(response, method)
        tunnel_head, keep_alive = _response_head_for_tunnel(response, head, framing)
        stream.send_head(tunnel_head)
        if response.status == 101:
            await _splice(conn, stream, buf)
            return 101, False
        reader = http.make_body_reader(framing, length)
        while True:
            data = reader.read(buf) if buf else b""
            if reader.done:
                try:  # the common small answer: head, body and END in one write, no yield
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
        reusable = keep_alive and framing is not http.Framing.UNTIL_CLOSE and not buf
        return response.status, reusable


async def _splice(conn: FastSocketStream, stream: TunnelStream, buf: bytearray) -> None:
    """After a 101 from the backend: carry raw bytes both ways until either side is done."""

    async def downstream() -> None:
        try:
            while data := await stream.receive_data():
                await conn.send_all(data)
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


@final
class AsgiHandler:
    """Answers streams by calling an ASGI 3 application in-process (HTTP scope only)."""

    def __init__(self, app: AsgiApp) -> None:
        self.app = app

    def __repr__(self) -> str:
        return f"<AsgiHandler {self.app!r}>"

    async def __call__(self, stream: TunnelStream) -> int | None:
        """Answer one request with the app; return the status it sent."""
        head = stream.head
        assert head is not None
        request = http.parse_request_head(head)
        framing, _length = http.request_framing(request)
        path, _, query = request.target.partition(b"?")
        forwarded = (request.get(b"x-forwarded-for") or b"").split(b",")[0].strip()
        scope: AsgiScope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version.decode(),
            "method": request.method.decode(),
            "scheme": (request.get(b"x-forwarded-proto") or b"http").decode(),
            "path": urllib.parse.unquote(path.decode("latin-1")),
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": [(n.lower(), v) for n, v in request.headers],
            "client": (forwarded.decode(), 0) if forwarded else None,
            "server": None,
        }
        state = _AsgiExchange(stream, framing is http.Framing.NONE)
        try:
            await self.app(scope, state.receive, state.send)
        except Exception:
            if state.head_sent:
                raise
            logger.exception("ASGI app failed on stream %d", stream.id)
            body = b"500 Internal Server Error: the application raised an exception\n"
            stream.send_head(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body)
            )
            await stream.send_data(body, end=True)
            return 500
        if not state.head_sent:
            raise RuntimeError("the ASGI app returned without sending a response")
        if not stream.local_ended:
            await stream.send_data(b"", end=True)
        return state.status


class _AsgiExchange:
    def __init__(self, stream: TunnelStream, body_done: bool) -> None:
        self.stream = stream
        self.body_done = body_done
        self.request_delivered = False
        self.head_sent = False
        self.status = 0  # the status sent, once head_sent
        self._start: AsgiMessage | None = None

    async def receive(self) -> AsgiMessage:
        if not self.body_done:
            data = await self.stream.receive_data()
            self.body_done = self.request_delivered = not data
            return {"type": "http.request", "body": data, "more_body": bool(data)}
        if not self.request_delivered:
            # A request with no body still gets one (empty) http.request message.
            self.request_delivered = True
            await trio.lowlevel.checkpoint()
            return {"type": "http.request", "body": b"", "more_body": False}
        # After the body: wait until the client goes away (the stream is reset).
        await trio.sleep(math.inf)
        raise AssertionError("unreachable")  # pragma: no cover

    async def send(self, message: AsgiMessage) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self._start is not None:
                raise RuntimeError("http.response.start sent twice")
            self._start = message
            await trio.lowlevel.checkpoint()
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unsupported ASGI message {kind!r}")
        if self._start is None:
            raise RuntimeError("http.response.body before http.response.start")
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if not self.head_sent:
            status = self.status = int(self._start["status"])
            headers = [(bytes(n), bytes(v)) for n, v in self._start.get("headers", [])]
            has_length = any(n.lower() == b"content-length" for n, _ in headers)
            if not has_length and not more:
                headers.append((b"Content-Length", b"%d" % len(body)))
                framing = http.Framing.LENGTH
            else:
                framing = http.Framing.LENGTH if has_length else http.Framing.CHUNKED
            try:
                reason = HTTPStatus(status).phrase.encode()
            except ValueError:
                reason = b""
            head = b"".join(
                [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
                + [b"%s: %s\r\n" % (n, v) for n, v in headers]
                + [b"\r\n"]
            )
            # Parsed like a backend's answer: an app's invalid header fails here, loudly.
            response = http.parse_response_head(head)
            self.stream.send_head(_response_head_for_tunnel(response, head, framing)[0])
            self.head_sent = True
        await self.stream.send_data(body, end=not more)
