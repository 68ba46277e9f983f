"""TunnelServer: accepts agents, authenticates them and keeps the session registry.

Layer: above uplink. May import trio, trio-websocket, attrs, frames, transports, uplink,
errors. The public HTTP side lives in :mod:`tunnel2.entry`, which imports this module.

Invariant: the registry changes only synchronously (no ``await`` between a decision and its
bookkeeping), so a cancelled handshake or a dropped connection can never leave a session
half-claimed. An uplink is removed by identity, so a stale connection that ends late never
removes a newer one (PROTOCOL.md §3).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import logging
import secrets
from typing import Final, final

import attrs
import trio

from tunnel2 import frames
from tunnel2.errors import ErrorCode, HandshakeError, ProtocolError
from tunnel2.transports import FrameTransport, accept_websocket
from tunnel2.uplink import TunnelUplink, open_uplink, receive_handshake_frame

__all__ = [
    "AGENT_PATH",
    "IPNetwork",
    "ServerConfig",
    "SessionRegistry",
    "TunnelServer",
    "parse_networks",
]

logger = logging.getLogger(__name__)

AGENT_PATH: Final = "/_tunnel/connect"
_RANDOM_ID_BYTES: Final = 16  # 128 bits


@final
@attrs.frozen
class ServerConfig:
    """Settings of a relay (server, entry and the limits it grants agents).

    Attributes:
        host: address to bind.
        port: port to bind (0 picks a free one).
        public_url: the base URL agents are told; default ``http://HOST:PORT``.
        domain: if set, sessions are also reachable at ``http://{id}.{domain}[:port]/``.
        tokens: accepted agent tokens; ``None`` lets any agent in.
        grace_period: seconds a session is held for its agent to re-dial.
        handshake_timeout: seconds an agent has to send HELLO.
        request_timeout: seconds the entry waits for a response head before 504.
        idle_timeout: seconds an idle public keep-alive connection is kept.
        max_head_size: largest request head (431 past it).
        max_body_size: largest request body in bytes (413 past it); ``None`` for no limit.
        max_connections: public connections served at once; past it new ones get 503.
        max_streams_per_agent: requests in flight per agent connection; past it 503.
        max_frame_size: the frame size limit offered to agents.
        initial_window: per-stream credit.
        connection_window: per-connection credit.
        ping_interval: keepalive interval on uplinks (0 disables).
        drain_timeout: seconds in-flight requests get when the relay shuts down.
        trusted_proxies: networks (CIDRs, e.g. ``"10.0.0.0/8"``) of the proxies in front of
            the relay. From a peer in one of them the relay keeps the client's
            X-Forwarded-For chain (and its X-Forwarded-Proto/-Host) and appends the peer;
            from anyone else it drops visitor-supplied forwarding headers and writes its
            own (PROTOCOL.md §4.2).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = None
    domain: str | None = None
    tokens: frozenset[str] | None = None
    grace_period: float = 30.0
    handshake_timeout: float = 10.0
    request_timeout: float = 30.0
    idle_timeout: float = 75.0
    max_head_size: int = 65536
    max_body_size: int | None = None
    max_connections: int = 10000
    max_streams_per_agent: int = 4096
    max_frame_size: int = frames.DEFAULT_MAX_FRAME_SIZE
    initial_window: int = 256 * 1024
    connection_window: int = 4 * 1024 * 1024
    ping_interval: float = 15.0
    drain_timeout: float = 10.0
    trusted_proxies: tuple[str, ...] = attrs.field(
        default=(), validator=lambda _self, _attr, value: parse_networks(value)
    )


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """Parse CIDRs such as ``"10.0.0.0/8"`` or ``"::1"`` (host bits may be set).

    Raises:
        ValueError: one is not an IP network; the message names it.
    """
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError as exc:
            raise ValueError(f"{cidr!r} is not an IP network (CIDR): {exc}") from None
    return tuple(networks)


@attrs.define
class _Session:
    id: str
    resume_key: str
    fixed: bool
    epoch: int = 0
    uplinks: list[TunnelUplink] = attrs.Factory(list)
    lease_deadline: float | None = None
    turn: int = 0


class _Refusal(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@final
class SessionRegistry:
    """Sessions by id, with their connected uplinks and reconnect leases.

    In memory; the methods are synchronous so that a shared store (e.g. Redis, for several
    relay nodes) can later sit behind the same calls.
    """

    def __init__(self, *, grace_period: float) -> None:
        self.grace_period = grace_period
        self._sessions: dict[str, _Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def claim(self, hello: frames.Hello, now: float) -> tuple[_Session, int]:
        """Find or create the session a HELLO asks for; return it with the claim's epoch.

        Raises:
            _Refusal: the agent may not hold that session.
        """
        self._expire(now)
        requested = hello.session_id
        if requested is None:
            session = _Session(
                id=secrets.token_hex(_RANDOM_ID_BYTES),
                resume_key=secrets.token_urlsafe(24),
                fixed=False,
            )
            self._sessions[session.id] = session
        else:
            existing = self._sessions.get(requested)
            if existing is None:
                # An agent-chosen id, or a random one whose lease ran out: (re)create it.
                session = _Session(
                    id=requested,
                    resume_key=hello.resume_key or secrets.token_urlsafe(24),
                    fixed=hello.resume_key is None,
                )
                self._sessions[requested] = session
            elif existing.fixed or (
                hello.resume_key is not None
                and secrets.compare_digest(existing.resume_key, hello.resume_key)
            ):
                session = existing
            else:
                raise _Refusal(
                    ErrorCode.UNAUTHORIZED,
                    f"session {requested} is held by another agent and the resume key "
                    "does not match",
                )
        session.epoch += 1
        return session, session.epoch

    def attach(self, session: _Session, uplink: TunnelUplink) -> None:
        """Route the session's requests to ``uplink`` too (several agents share the load)."""
        session.uplinks.append(uplink)
        session.lease_deadline = None

    def detach(self, session: _Session, uplink: TunnelUplink | None, now: float) -> None:
        """Forget ``uplink`` (``None``: a claim whose handshake failed); the last one to
        leave starts the session's grace period."""
        if uplink is not None and uplink in session.uplinks:
            session.uplinks.remove(uplink)
        if not session.uplinks:
            session.lease_deadline = now + self.grace_period

    def route(self, session_id: str, now: float) -> TunnelUplink | str:
        """Pick an accepting uplink of the session (round robin), or say why there is none.

        Returns:
            the uplink, or ``"unknown"`` (no such session) or ``"disconnected"`` (the session
            is held but none of its agents is connected).
        """
        session = self._sessions.get(session_id)
        if session is None:
            return "unknown"
        if session.lease_deadline is not None and session.lease_deadline <= now:
            del self._sessions[session_id]
            return "unknown"
        uplinks = session.uplinks
        for _ in range(len(uplinks)):
            session.turn = (session.turn + 1) % len(uplinks)
            uplink = uplinks[session.turn]
            if uplink.accepting:
                return uplink
        return "disconnected"

    def _expire(self, now: float) -> None:
        expired = [
            sid
            for sid, session in self._sessions.items()
            if session.lease_deadline is not None and session.lease_deadline <= now
        ]
        for sid in expired:
            del self._sessions[sid]


@final
class TunnelServer:
    """The agent-facing half of a relay: handshakes, sessions, uplinks.

    Constructing it only stores; :func:`tunnel2.serve_tunnel_server` runs it together with
    the public :class:`~tunnel2.entry.ProxyEntry` on one port.
    """

    def __init__(self, config: ServerConfig, *, base_url: str, port: int = 0) -> None:
        self.config = config
        self.base_url = base_url.rstrip("/")
        self.port = port
        self.registry = SessionRegistry(grace_period=config.grace_period)
        self._uplinks: set[TunnelUplink] = set()
        self._counter = itertools.count(1)
        self._draining = False
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()

    def __repr__(self) -> str:
        return f"<TunnelServer {self.base_url} sessions={len(self.registry)}>"

    def public_urls(self, session_id: str) -> tuple[str, ...]:
        """The URLs at which a session is reachable, preferred first."""
        urls = [f"{self.base_url}/session/{session_id}/"]
        if self.config.domain:
            scheme, _, rest = self.base_url.partition("://")
            port = rest.rpartition(":")[2] if ":" in rest else ""
            host = f"{session_id}.{self.config.domain}" + (f":{port}" if port else "")
            urls.insert(0, f"{scheme}://{host}/")
        return tuple(urls)

    @property
    def uplinks(self) -> frozenset[TunnelUplink]:
        """The connected uplinks."""
        return frozenset(self._uplinks)

    async def handle_websocket(self, stream: trio.abc.Stream, request: bytes) -> None:
        """Serve an agent whose WebSocket upgrade request head (``request``) was read from
        ``stream``. Returns when the agent is gone; the connection is closed by then."""
        try:
            transport = await accept_websocket(stream, request)
        except trio.BrokenResourceError as exc:
            logger.info("agent websocket handshake failed: %s", exc)
            await trio.aclose_forcefully(stream)
            return
        await self.handle_agent(transport)

    async def handle_agent(self, transport: FrameTransport) -> None:
        """Run the handshake on a fresh agent transport, then serve its uplink until it closes.

        Closes ``transport`` before returning. Never raises for what the agent does wrong:
        that is logged and the connection is closed with a REFUSE or GOAWAY saying why.
        """
        name = f"agent-{next(self._counter)}"
        try:
            welcome, session, decoder = await self._handshake(transport, name)
        except (HandshakeError, ProtocolError, _Refusal) as exc:
            logger.info("%s handshake failed: %s", name, exc)
            await trio.aclose_forcefully(transport)
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            logger.info("%s disconnected during the handshake", name)
            await trio.aclose_forcefully(transport)
            return
        async with open_uplink(transport, decoder, welcome, role="relay", name=name) as uplink:
            # Decided synchronously: the uplink is routable the moment WELCOME is out.
            self.registry.attach(session, uplink)
            self._uplinks.add(uplink)
            logger.info(
                "%s connected: session %s (epoch %d, %d agent(s))",
                name,
                session.id,
                session.epoch,
                len(session.uplinks),
            )
            try:
                await uplink.wait_closed()
            finally:
                self._uplinks.discard(uplink)
                self.registry.detach(session, uplink, trio.current_time())
                logger.info("%s disconnected: %s", name, uplink.close_reason)

    async def _handshake(
        self, transport: FrameTransport, name: str
    ) -> tuple[frames.Welcome, _Session, frames.FrameDecoder]:
        config = self.config
        decoder = frames.FrameDecoder()
        try:
            with trio.fail_after(config.handshake_timeout):
                hello = await receive_handshake_frame(transport, decoder)
        except trio.TooSlowError:
            raise HandshakeError(f"no HELLO within {config.handshake_timeout}s") from None
        except ProtocolError as exc:
            await self._refuse(transport, exc.code, f"bad handshake: {exc}")
            raise
        try:
            if not isinstance(hello, frames.Hello):
                raise _Refusal(
                    ErrorCode.PROTOCOL_ERROR, f"expected HELLO, got {type(hello).__name__}"
                )
            if self._draining:
                raise _Refusal(ErrorCode.SESSION_UNAVAILABLE, "relay is shutting down")
            if config.tokens is not None and (
                hello.token is None
                or not any(secrets.compare_digest(hello.token, t) for t in config.tokens)
            ):
                raise _Refusal(ErrorCode.UNAUTHORIZED, "invalid or missing token")
            session, _epoch = self.registry.claim(hello, trio.current_time())
        except _Refusal as refusal:
            await self._refuse(transport, refusal.code, refusal.reason)
            raise
        welcome = frames.Welcome(
            session_id=session.id,
            public_urls=self.public_urls(session.id),
            resume_key=session.resume_key,
            max_frame_size=min(config.max_frame_size, hello.max_frame_size),
            initial_window=config.initial_window,
            connection_window=config.connection_window,
            ping_interval=config.ping_interval,
        )
        try:
            await transport.send(frames.encode(welcome))
        except BaseException:
            # The claim stands but nobody took it: start its lease so it can expire.
            self.registry.detach(session, None, trio.current_time())
            raise
        return welcome, session, decoder

    async def _refuse(self, transport: FrameTransport, code: int, reason: str) -> None:
        with trio.move_on_after(1):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await transport.send(frames.encode(frames.Refuse(code, reason[:1000])))

    @property
    def requests_in_flight(self) -> int:
        """Public requests whose response has not been fully sent yet."""
        return self._in_flight

    def request_started(self) -> None:
        """Count a public request in flight (the entry calls it)."""
        if not self._in_flight:
            self._idle = trio.Event()
        self._in_flight += 1

    def request_finished(self) -> None:
        """The response to a counted request is out, or failed."""
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()

    async def drain(self) -> None:
        """Refuse new agents, send GOAWAY on every uplink and give in-flight requests
        ``config.drain_timeout`` seconds (until their responses are sent, not just relayed)
        before the uplinks close."""
        self._draining = True
        with trio.move_on_after(self.config.drain_timeout):
            async with trio.open_nursery() as nursery:
                for uplink in list(self._uplinks):
                    nursery.start_soon(uplink.drain, self.config.drain_timeout)
                await self._idle.wait()
