"""Agent: dials the relay and answers the streams it opens.

Layer: above uplink. May import trio, attrs, errors, frames, access, transports, uplink, the
stream layer (``_sockets``, ``_tls``) and the internal HTTP/1.1 parser.

The agent keeps one uplink to its relay, re-dialling with backoff when it drops (asking for its
session back with the resume key). A fixed pool of ``max_concurrent`` worker tasks takes
streams from the uplink; ``max_queued`` more wait, and past that the uplink resets new streams
with OVERLOADED (the entry answers 503). A worker answers a stream by forwarding it to a
backend over pooled keep-alive connections (:class:`tunnel2.backend.BackendForwarder`) or by
calling an ASGI 3 app in-process (:class:`tunnel2.asgi.AsgiHandler`).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import random
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Final, NoReturn, final

import attrs
import trio

from tunnel2 import _http11 as http
from tunnel2 import frames
from tunnel2._sockets import connect_tcp
from tunnel2._tls import SocketOrTls, client_context, wrap_client
from tunnel2.backend import _relay_head_framing
from tunnel2.errors import (
    ErrorCode,
    HandshakeError,
    HandshakeRefused,
    HandshakeTimeout,
    ProtocolError,
    StreamReset,
    UplinkClosed,
)
from tunnel2.inspect import Exchange, Inspector
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
    "StreamHandler",
    "websocket_connector",
]

logger = logging.getLogger(__name__)

_AGENT_PATH: Final = "/_tunnel/connect"
# Refusals a connected agent waits out (the relay restarts or sheds load) instead of quitting.
_TEMPORARY_REFUSALS: Final = frozenset({ErrorCode.SESSION_UNAVAILABLE, ErrorCode.OVERLOADED})

# A handler may return the status it answered (for RequestFinished; None: not known).
StreamHandler = Callable[[TunnelStream], Awaitable[int | None]]
Connector = Callable[[], AbstractAsyncContextManager[FrameTransport]]


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
        host_header: the Host a port or URL target is sent (``"preserve"``, ``"rewrite"``
            or a literal ``host[:port]``; ``None``: preserve for http, rewrite for https);
            :func:`tunnel2.open_tunnel` gives it to the target's
            :class:`~tunnel2.backend.BackendForwarder`.
        inspect: keep the last ``inspect_capacity`` exchanges for :meth:`Agent.requests`,
            :meth:`Agent.replay` and the admin page (:mod:`tunnel2.inspect`); off: no cost.
        inspect_capacity: exchanges the inspector keeps.
        inspect_body_bytes: bytes of each request and response body it keeps.


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
    host_header: str | None = None
    # --- inspect ---
    inspect: bool = False
    inspect_capacity: int = 100
    inspect_body_bytes: int = 16 * 1024


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
        # --- inspect: the recording wrapper exists only when inspection is on ---
        self.inspector: Inspector | None = None
        if self.config.inspect:
            self.inspector = Inspector(
                handler,
                capacity=self.config.inspect_capacity,
                body_bytes=self.config.inspect_body_bytes,
                max_frame_size=self.config.max_frame_size,
            )
            handler = self.inspector.handle
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

    # --- inspect ---

    def requests(self) -> list[Exchange]:
        """The recent exchanges, oldest first (see :meth:`tunnel2.inspect.Inspector.requests`).

        Raises:
            RuntimeError: inspection is off (``AgentConfig.inspect``).
        """
        return self._inspecting().requests()

    async def replay(self, exchange_id: int) -> Exchange:
        """Send a recorded request to the backend again, not through the relay; return the
        new exchange (see :meth:`tunnel2.inspect.Inspector.replay`).

        Raises:
            RuntimeError: inspection is off.
            KeyError: no such exchange is kept.
            ValueError: it cannot be replayed (an upgrade, or a body longer than was kept).
        """
        await trio.lowlevel.checkpoint()
        return await self._inspecting().replay(exchange_id)

    def _inspecting(self) -> Inspector:
        if self.inspector is None:
            raise RuntimeError(
                "inspection is off: open the tunnel with inspect=True (tunnel2 http --inspect)"
            )
        return self.inspector

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
            capabilities=frames.CAPABILITIES,
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
        body = None if framing is http.CHUNKED else length
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
