"""Agent: dials the relay and answers the streams it opens.

Layer: above uplink. May import trio, attrs, errors, frames, access, transports, uplink, the
stream layer (``_sockets``, ``_tls``) and the internal HTTP/1.1 parser.

The agent keeps one uplink to its relay, re-dialling with backoff when it drops (asking for its
session back with the resume key). A fixed pool of ``max_concurrent`` worker tasks takes
streams from the uplink; ``max_queued`` more wait, and past that the uplink resets new streams
with OVERLOADED (the entry answers 503). A worker answers a stream by forwarding it to a
backend over pooled keep-alive connections (:class:`BackendForwarder`) or by calling an ASGI 3
app in-process (:class:`AsgiHandler`).
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import math
import random
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from http import HTTPStatus
from typing import Any, Final, NoReturn, final

import attrs
import trio

from tunnel2 import _http11 as http
from tunnel2 import frames
from tunnel2._sockets import connect_tcp
from tunnel2._tls import SocketOrTls, client_context, wrap_client
from tunnel2.errors import (
    ErrorCode,
    HandshakeError,
    HandshakeRefused,
    HandshakeTimeout,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    StreamReset,
    UplinkClosed,
)
from tunnel2.observe import Observer, Reconnected, RequestFinished, RequestStarted, emit
from tunnel2.transports import FrameTransport, connect_websocket
from tunnel2.uplink import (
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
        backoff_initial: first re-dial delay in seconds, doubled per failure; each delay is
            drawn from its upper half at random (equal jitter), so agents that lost one
            relay do not re-dial it in step.
        backoff_max: longest re-dial delay once disconnected for ``backoff_early_period``.
        max_frame_size: largest frame the agent accepts.
        access: who may visit the tunnel; sent in HELLO and enforced by the relay
            (PROTOCOL.md §3.1.1). ``None``: everyone who has the URL.
        ca_file: trust only the CA certificates in this PEM file for a ``https``/``wss``
            relay; ``None`` trusts the system's store.
        insecure_transport: allow a clear-text (``http``/``ws``) relay that is not on
            loopback; the token and all traffic then cross the network unencrypted.
        backoff_early_max: longest re-dial delay during the first ``backoff_early_period``
            seconds of being disconnected (a relay restart is over in seconds).
        backoff_early_period: see ``backoff_early_max``.
        heartbeat_timeout: seconds of silence from the relay after which the uplink is
            dead and re-dialled; ``None``: twice the relay's ``ping_interval``.
        drain_timeout: seconds :meth:`Agent.drain` gives requests in flight.


    ``connect_timeout``, ``ca_file`` and ``insecure_transport`` also configure the connector
    (:func:`websocket_connector`); :func:`tunnel2.open_tunnel` passes them on.
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
    ca_file: str | None = None
    insecure_transport: bool = False
    backoff_early_max: float = 2.0
    backoff_early_period: float = 60.0
    heartbeat_timeout: float | None = None
    drain_timeout: float = 10.0


def agent_url(server_url: str) -> str:
    """The WebSocket URL of a relay's agent endpoint, from its ``http(s)``/``ws(s)`` URL."""
    # A bare HOST:PORT is taken as http://, as browsers and curl do.
    parts = urllib.parse.urlsplit(server_url if "://" in server_url else f"http://{server_url}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(
            f"relay URL {server_url!r} must be http://, https://, ws:// or wss://HOST[:PORT]"
        )
    try:
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError:
        raise ValueError(f"relay URL {server_url!r}: the port is out of range 1-65535") from None
    path = parts.path.rstrip("/")
    if not path.endswith(_AGENT_PATH):
        path += _AGENT_PATH
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def websocket_connector(
    server_url: str,
    *,
    connect_timeout: float = 10.0,
    ca_file: str | None = None,
    insecure_transport: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> Connector:
    """A connector that dials the relay's WebSocket endpoint.

    Both ``ws://`` and ``wss://`` are driven by wsproto from the uplink's own tasks
    (:class:`~tunnel2.transports.WsprotoTransport`), over a bare TCP stream or a TLS stream
    on it. TCP connect, TLS handshake and WebSocket handshake each get ``connect_timeout``.
    Everything is checked here, before anything is dialled.

    Args:
        server_url: the relay (``http(s)://`` or ``ws(s)://``).
        connect_timeout: seconds for each step of opening the connection.
        ca_file: trust only the CA certificates in this PEM file (TLS relays).
        insecure_transport: allow a clear-text relay that is not on loopback.
        ssl_context: the TLS settings to use instead of verifying against ``ca_file`` or
            the system's store.

    Raises:
        ValueError: not a relay URL, a clear-text one to a host that is not loopback
            (127.0.0.0/8, ::1, localhost) without ``insecure_transport``, or a ``ca_file``
            that cannot be loaded.
    """
    url = agent_url(server_url)
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    tls = parts.scheme == "wss"
    if not tls and not insecure_transport and not _is_loopback(host):
        raise ValueError(
            f"refusing to reach the relay at {server_url} in clear text (its token and "
            "traffic would cross the network unencrypted): use https://, or allow it with "
            "insecure_transport=True (--insecure-transport)"
        )
    context = (ssl_context or client_context(ca_file)) if tls else None
    port = parts.port or (443 if tls else 80)
    resource = parts.path or "/"

    @asynccontextmanager
    async def connect() -> AsyncIterator[FrameTransport]:
        try:
            with trio.fail_after(connect_timeout):
                tcp = await connect_tcp(host, port)
        except (OSError, trio.TooSlowError) as exc:
            why = str(exc) if isinstance(exc, OSError) else f"no connection in {connect_timeout}s"
            raise HandshakeError(f"cannot connect to the relay at {url}: {why}") from exc
        stream: SocketOrTls = tcp
        try:
            if context is not None:
                try:
                    with trio.fail_after(connect_timeout):
                        stream = await wrap_client(tcp, context, host)
                except trio.TooSlowError as exc:
                    raise HandshakeTimeout(
                        f"no TLS handshake from the relay at {url} within {connect_timeout}s "
                        "(does it serve TLS on that port?)"
                    ) from exc
                except trio.BrokenResourceError as exc:  # closed by wrap_client
                    raise HandshakeError(f"{exc} (relay {url})") from exc
            try:
                with trio.fail_after(connect_timeout):
                    transport = await connect_websocket(stream, parts.netloc, resource)
            except (trio.BrokenResourceError, trio.TooSlowError) as exc:
                why = str(exc) or f"no answer within {connect_timeout}s"
                raise HandshakeError(f"WebSocket handshake with {url} failed: {why}") from exc
        except BaseException:
            # Whatever stops the handshake (a failure, a cancellation) closes the socket.
            await trio.aclose_forcefully(stream)
            if stream is not tcp:
                await trio.aclose_forcefully(tcp)
            raise
        try:
            yield transport
        finally:
            await trio.aclose_forcefully(transport)

    return connect


@attrs.define
class _Backoff:
    """Re-dial delays: doubling from ``backoff_initial``, capped at ``backoff_early_max``
    for the first ``backoff_early_period`` seconds of being disconnected and at
    ``backoff_max`` after, each drawn from the upper half of its value (equal jitter, so
    a relay's agents do not re-dial in step and no delay is ever near zero twice)."""

    config: AgentConfig
    rng: random.Random
    attempt: int = 0
    since: float | None = None  # when the first delay of this outage was asked for

    def next_delay(self, now: float) -> float:
        config = self.config
        if self.since is None:
            self.since = now
        early = now - self.since < config.backoff_early_period
        cap = min(config.backoff_early_max, config.backoff_max) if early else config.backoff_max
        delay = min(cap, config.backoff_initial * 2.0 ** min(self.attempt, 60))
        self.attempt += 1
        return delay / 2 + self.rng.uniform(0, delay / 2)

    def reset(self) -> None:
        self.attempt = 0
        self.since = None


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
        rng: random.Random | None = None,
        observers: Iterable[Observer] = (),
    ) -> None:
        self.config = config or AgentConfig()
        self._random = rng or random.Random()
        self._draining = False
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
        """Connect, serve, and re-dial until :meth:`drain`, then wait to be cancelled.

        ``task_status.started(self)`` is called once the first handshake succeeded, so
        :attr:`public_url` is set when ``nursery.start`` returns. Before that, failures raise
        (so a wrong URL or token surfaces at once); after it, a lost connection is re-dialled
        with jittered exponential backoff (:class:`_Backoff`), asking for the same session,
        and at once after the relay's graceful GOAWAY (it restarts or hands the agent to
        another node). A refusal is final, except that a connected agent waits out a relay
        that is shutting down or overloaded.

        Raises:
            HandshakeRefused: the relay refused the agent.
            HandshakeError: the first connection or handshake failed.
        """
        config = self.config
        backoff = _Backoff(config, self._random)
        started = False
        immediate_at = -math.inf  # when we last re-dialled with no wait
        while not self.draining():
            goaway = False
            try:
                async with self._connect() as transport:
                    with trio.fail_after(config.connect_timeout):
                        welcome, decoder = await self._handshake(transport)
                    self._welcome = welcome
                    self.connections += 1
                    backoff.reset()
                    if self.draining():
                        break
                    goaway = await self._run_uplink(
                        transport, decoder, welcome, task_status, started
                    )
                    started = True
            except HandshakeRefused as exc:
                if not started or exc.code not in _TEMPORARY_REFUSALS:
                    raise
                why = f"relay refused us for now ({exc})"
            except (
                HandshakeError,
                ProtocolError,
                OSError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                trio.TooSlowError,
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
                why = f"connection to the relay lost ({exc})"
            else:
                why = "the relay said GOAWAY" if goaway else "connection to the relay closed"
            self._uplink = None
            if self.draining():
                break
            now = trio.current_time()
            # After a graceful GOAWAY, at once; but not twice in a row quickly (a relay that
            # says GOAWAY right after WELCOME must not make us dial in a loop).
            if goaway and now - immediate_at >= config.backoff_early_max:
                immediate_at, delay = now, 0.0
            else:
                delay = backoff.next_delay(now)
            logger.warning("%s; re-dialling in %.2fs", why, delay)
            await trio.sleep(delay)
        self._uplink = None
        await trio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    def draining(self) -> bool:
        """True once :meth:`drain` was called."""
        return self._draining

    async def drain(self, grace_period: float | None = None) -> None:
        """Stop serving gracefully: tell the relay (GOAWAY, PROTOCOL.md §6.3), so it sends
        new requests to the session's other agents or holds them for a replacement, give
        the requests in flight up to ``grace_period`` seconds (default ``config.drain_timeout``)
        and close the uplink. :meth:`serve` re-dials no more; it waits to be cancelled.
        Checkpoints; a cancellation closes the uplink at once.
        """
        self._draining = True
        uplink = self._uplink
        if uplink is not None and not uplink.closed:
            await uplink.drain(self.config.drain_timeout if grace_period is None else grace_period)
        else:
            await trio.lowlevel.checkpoint()

    async def _run_uplink(
        self,
        transport: FrameTransport,
        decoder: frames.FrameDecoder,
        welcome: frames.Welcome,
        task_status: trio.TaskStatus[Agent],
        started: bool,
    ) -> bool:
        """Serve one uplink until it closes; return whether the relay ended it with a
        graceful GOAWAY."""
        config = self.config
        async with open_uplink(
            transport,
            decoder,
            welcome,
            role="agent",
            max_incoming=config.max_queued,
            name=f"agent:{welcome.session_id[:8]}",
            heartbeat_timeout=config.heartbeat_timeout,
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
        return uplink.peer_draining

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
    tokens = http.connection_tokens(response)
    named = tokens - http.CONNECTION_OPTIONS
    if named:  # rare: fields the Connection header marks hop-by-hop
        fields = http.drop_fields(fields, named)
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


# RESET reasons: kinds of failure, no addresses and no bytes of the backend's answer.
_REFUSED: Final = "the backend refused the connection"
_CLOSED: Final = "the backend closed the connection before answering"
_INVALID: Final = "the backend sent an invalid response"
_BROKE: Final = "the backend connection broke"
_HEAD_TOO_LARGE: Final = "the backend's response head is too large for the tunnel"
_TLS_FAILED: Final = "the TLS handshake with the backend failed"


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


@final
class BackendForwarder:
    """Answers streams by forwarding them to an HTTP/1.1 backend at ``host:port``.

    Keeps up to ``max_idle`` keep-alive connections open for reuse. A request on a reused
    connection the backend had already closed is retried once on a fresh one when nothing of
    it was consumed yet (no body).

    With ``ssl_context`` the backend speaks https: the TLS handshake is part of opening a
    pooled connection, the certificate is checked for ``host`` (also sent as SNI), and the
    request's Host names the backend (as its certificate does); the client's Host stays in
    X-Forwarded-Host.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_idle: int = 128,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self.ssl_context = ssl_context
        self._idle: collections.deque[SocketOrTls] = collections.deque()
        self._host_line: bytes | None = None
        if ssl_context is not None:
            name = f"[{host}]" if ":" in host else host
            authority = name if port == 443 else f"{name}:{port}"
            self._host_line = b"Host: %s\r\n" % authority.encode("idna")

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
            start_line = head.find(b"\r\n") + 2
            head = b"".join(
                [head[:start_line], self._host_line, _HOST_FIELD_RE.sub(b"", head[start_line:])]
            )
        method, framing, length = _relay_head_framing(head)
        has_body = length > 0 or framing is http.Framing.CHUNKED
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
                status, keep = await self._exchange(
                    conn, stream, head, method, has_body, framing, reused
                )
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

    async def _exchange(
        self,
        conn: SocketOrTls,
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
        conn: SocketOrTls,
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
        conn: SocketOrTls,
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


def _forwarded_client(forwarded: bytes | None) -> tuple[str, int] | None:
    """The client address the relay determined, as an ASGI ``client``: from the first
    ``for=`` of the ``Forwarded`` field the relay writes (PROTOCOL.md §4.2), port 0 if
    unknown; ``None`` for ``for=unknown`` or no such field.

    The relay drops every visitor-supplied ``Forwarded`` line and writes exactly one whose
    first element is the client, so nothing a visitor sends can change this value (which
    is why X-Forwarded-For, which a trusted proxy's visitor can prefix, is not used).
    """
    if forwarded is None or forwarded[:4].lower() != b"for=":
        return None
    end = len(forwarded)
    for sep in (b";", b","):
        index = forwarded.find(sep)
        if 0 <= index < end:
            end = index
    node = forwarded[4:end].strip(b'"').decode("ascii", "replace")
    port = ""
    if node.startswith("["):
        node, _, rest = node[1:].partition("]")
        port = rest[1:]
    elif node.count(":") == 1:
        node, _, port = node.partition(":")
    try:
        ipaddress.ip_address(node)
    except ValueError:
        return None
    return node, int(port) if port.isdigit() and len(port) <= 5 else 0


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
            "client": _forwarded_client(request.get(b"forwarded")),
            "server": None,
        }
        state = _AsgiExchange(stream, framing is http.Framing.NONE, request.method == b"HEAD")
        try:
            await self.app(scope, state.receive, state.send)
        except Exception:
            if state.head_sent or stream.local_ended:
                raise
            logger.exception("ASGI app failed on stream %d", stream.id)
            body = b"500 Internal Server Error: the application raised an exception\n"
            stream.send_head(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body)
            )
            await stream.send_data(body, end=True)
            return 500
        if not state.head_sent and not stream.local_ended:
            raise RuntimeError("the ASGI app returned without sending a response")
        if not stream.local_ended:
            await stream.send_data(b"", end=True)
        return state.status


class _AsgiExchange:
    def __init__(self, stream: TunnelStream, body_done: bool, head_request: bool) -> None:
        self.stream = stream
        self.body_done = body_done
        # A response to HEAD has no body (RFC 9110 §9.3.2); apps may send one anyway and
        # leave it to the server to drop, as uvicorn and hypercorn do (fuzz F3).
        self.head_request = head_request
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
            stream = self.stream
            try:
                stream.send_head(_response_head_for_tunnel(response, head, framing)[0])
            except LocalProtocolError as exc:  # it does not fit one OPEN frame
                kind = "the application's response head is too large for the tunnel"
                logger.warning("stream %d: %s (%s)", stream.id, kind, exc)
                stream.reset(ErrorCode.BACKEND_UNAVAILABLE, kind)  # the relay answers 502
                raise StreamReset(
                    stream_id=stream.id, code=ErrorCode.BACKEND_UNAVAILABLE, reason=kind
                ) from None
            self.head_sent = True
        await self.stream.send_data(b"" if self.head_request else body, end=not more)
