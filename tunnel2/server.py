"""TunnelServer: accepts agents, authenticates them and decides who holds which session.

Layer: above uplink. May import trio, attrs, frames, access, transports, uplink, sessions,
tokens, errors. The public HTTP side lives in :mod:`tunnel2.entry`, which imports this module.

Trust (PROTOCOL.md §3.4): a token names an identity; a session belongs to the identity that
claimed it (or that the token file grants it to). A random session's resume key is a MAC of
its id and owner under the relay's secret, so the relay can check it with no stored state —
after a lease ran out or a restart — and nobody else's key, nor a guessed one, passes.

Invariants: claims are decided by the (async) session store, atomically; the local route table
changes only synchronously, with no ``await`` between a decision and its bookkeeping. An uplink
is removed by identity and a claim released by its epoch, so a stale connection that ends late
never removes a newer one.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import itertools
import logging
import os
import re
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Final, final

import attrs
import trio

from tunnel2 import frames
from tunnel2.access import AccessPolicy
from tunnel2.errors import ErrorCode, HandshakeError, ProtocolError
from tunnel2.observe import AgentJoined, AgentLeft, DrainStarted, Observer, Refused, emit
from tunnel2.sessions import (
    Lease,
    MemorySessionStore,
    Route,
    Routed,
    RouteTable,
    SessionLimit,
    SessionStore,
    SessionTaken,
)
from tunnel2.tokens import Identity, TokenTable
from tunnel2.transports import FrameTransport, accept_websocket
from tunnel2.uplink import TunnelUplink, UplinkLimits, open_uplink, receive_handshake_frame

__all__ = [
    "AGENT_PATH",
    "IPNetwork",
    "ServerConfig",
    "TunnelServer",
    "parse_networks",
]

logger = logging.getLogger(__name__)

AGENT_PATH: Final = "/_tunnel/connect"
_RANDOM_ID_BYTES: Final = 16  # 128 bits
# The form of the ids the relay assigns: never granted to a claim for a fixed id, so a
# random session cannot be taken by naming it once its agent is away (PROTOCOL.md §3.4).
_RANDOM_ID_RE: Final = re.compile(r"[0-9a-f]{32}")
_SECRET_FILE: Final = "relay-secret"
_OWNERS_FILE: Final = "session-owners.json"
_STOPPED_FILE: Final = "stopped-at"


@final
@attrs.frozen
class ServerConfig:
    """Settings of a relay (server, entry and the limits it grants agents).

    Attributes:
        host: address to bind.
        port: port to bind (0 picks a free one).
        public_url: the base URL agents are told; default ``http://HOST:PORT``.
        domain: if set, sessions are also reachable at ``http://{id}.{domain}[:port]/``.
        tokens: accepted agent tokens, each its own identity (``NAME=TOKEN`` names it);
            ``None`` and no ``token_file``: an open relay, which any agent may use.
        grace_period: seconds a session is held for its agent to re-dial.
        handshake_timeout: seconds an agent has to send HELLO.
        request_timeout: seconds the entry waits for a response head before 504.
        idle_timeout: seconds a public keep-alive connection may wait for the first byte of
            its next request (then it is closed without an answer).
        max_head_size: largest request head (431 past it).
        max_body_size: largest request body in bytes (413 past it); ``None`` for no limit.
        max_streams_per_agent: requests in flight per agent connection; past it 503.
        max_frame_size: the frame size limit offered to agents.
        initial_window: per-stream credit.
        connection_window: per-connection credit.
        ping_interval: keepalive interval on uplinks (0 disables).
        drain_timeout: seconds in-flight requests get when the relay shuts down.
        token_file: a file of ``TOKEN NAME [SESSION-ID-GLOB ...]`` lines (see
            :mod:`tunnel2.tokens`); re-read by :meth:`TunnelServer.reload_tokens`.
        state_dir: a directory for what must survive a restart: the relay's secret (so
            random sessions can be resumed) and the owners of fixed session ids. ``None``:
            a fresh secret per process, owners kept in memory.
        max_visitor_connections: visitor connections served at once, counting those whose
            first request head is not read yet; past it a visitor gets 503 (an agent still
            connects: see ``max_agent_connections``).
        max_agent_connections: agent connections at once; past it an agent gets 503. Their
            slots also take connections accepted while the visitor side is full, until
            their first head tells whether they are agents.
        max_connections_per_ip: connections that are not agents from one TCP peer address;
            past it new ones get 429 at once. ``None`` for no cap (behind a reverse proxy,
            where every visitor has the proxy's address).
        head_timeout: seconds from the first byte of a request head to its end, and from
            accept to the end of a connection's first head; past it 408 and close.
        write_timeout: seconds a write to a visitor may go without completing (the visitor
            reads nothing); past it the connection is closed and its stream reset.
        uplink_limits: flood and stall limits for each agent's uplink (PROTOCOL.md §7).
        tls_cert: PEM certificate chain; set, the port serves HTTPS and WSS.
        tls_key: PEM private key of ``tls_cert`` (``None``: it is in ``tls_cert``).
        trusted_proxies: networks (CIDRs, e.g. ``"10.0.0.0/8"``) of the proxies in front of
            the relay. From a peer in one of them the relay keeps the client's
            X-Forwarded-For chain (and its X-Forwarded-Proto/-Host) and appends the peer;
            from anyone else it drops visitor-supplied forwarding headers and writes its
            own (PROTOCOL.md §4.2).
        heartbeat_timeout: seconds of silence after which an agent's uplink is dead and
            closed (its requests in flight get 502); ``None``: twice ``ping_interval``
            (PROTOCOL.md §6.2).
        drain_hold: seconds a request waits for an agent when the session's agents are
            draining (a rolling restart) before it gets 502; 0 answers at once.
        max_sessions_per_identity: sessions one identity may have at once (held, in their
            grace period, or fixed ids it owns); a HELLO for one more is refused with
            ``OVERLOADED``. On an open relay every agent is the same identity. ``None``: no
            cap.
    """

    host: str = "127.0.0.1"
    port: int = attrs.field(
        default=8000, validator=[attrs.validators.ge(0), attrs.validators.le(65535)]
    )
    public_url: str | None = None
    domain: str | None = None
    tokens: frozenset[str] | None = None
    grace_period: float = 30.0
    handshake_timeout: float = 10.0
    request_timeout: float = 30.0
    idle_timeout: float = 75.0
    max_head_size: int = 65536
    max_body_size: int | None = None
    max_streams_per_agent: int = 4096
    max_frame_size: int = frames.DEFAULT_MAX_FRAME_SIZE
    initial_window: int = 256 * 1024
    connection_window: int = 4 * 1024 * 1024
    ping_interval: float = 5.0
    drain_timeout: float = 10.0
    token_file: str | None = None
    state_dir: str | None = None
    max_visitor_connections: int = attrs.field(default=10000, validator=attrs.validators.ge(1))
    max_agent_connections: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    max_connections_per_ip: int | None = attrs.field(
        default=256,
        validator=attrs.validators.optional(attrs.validators.ge(1)),  # type: ignore[arg-type]
    )
    head_timeout: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    write_timeout: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    uplink_limits: UplinkLimits = attrs.field(factory=UplinkLimits)
    tls_cert: str | None = None
    tls_key: str | None = None
    trusted_proxies: tuple[str, ...] = attrs.field(
        default=(), validator=lambda _self, _attr, value: parse_networks(value)
    )

    heartbeat_timeout: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.gt(0))
    )
    drain_hold: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    max_sessions_per_identity: int | None = attrs.field(
        default=1000,
        validator=attrs.validators.optional(attrs.validators.ge(1)),  # type: ignore[arg-type]
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


class _Refusal(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _refused(name: str, exc: ProtocolError | _Refusal) -> Refused:
    reason = exc.reason if isinstance(exc, _Refusal) else str(exc)
    return Refused(name, exc.code, ErrorCode.name_of(exc.code), reason)


def _access_policy(hello: frames.Hello) -> AccessPolicy | None:
    """The policy a HELLO sets; a malformed one refuses the agent (PROTOCOL.md §3.1.1)."""
    if hello.access is None:
        return None
    try:
        return AccessPolicy.from_json(hello.access)
    except ValueError as exc:
        raise _Refusal(ErrorCode.PROTOCOL_ERROR, f"malformed access policy: {exc}") from None


def load_tokens(config: ServerConfig) -> TokenTable | None:
    """The token table ``config`` describes, or ``None`` for an open relay.

    Raises:
        tunnel2.tokens.TokenError: a malformed token or token file line.
        OSError: the token file cannot be read.
    """
    if config.tokens is None and config.token_file is None:
        return None
    table = TokenTable.from_tokens(config.tokens or ())
    if config.token_file is not None:
        table = table.merged(TokenTable.load(config.token_file))
    return table


def _load_secret(state_dir: str | None) -> bytes:
    """The relay's secret: kept in ``state_dir`` (made on first use), else a fresh one."""
    if state_dir is None:
        return secrets.token_bytes(32)
    path = Path(state_dir)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret_path = path / _SECRET_FILE
    try:
        secret = bytes.fromhex(secret_path.read_text(encoding="ascii").strip())
    except FileNotFoundError:
        secret = b""
    except ValueError as exc:
        raise ValueError(f"{secret_path} does not hold a hex secret: {exc}") from exc
    if len(secret) < 16:
        secret = secrets.token_bytes(32)
        fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(secret.hex() + "\n")
    return secret


def _stopped_recently(state_dir: str | None, within: float) -> bool:
    """True if a relay with this state directory stopped less than ``within`` s ago."""
    if state_dir is None:
        return False
    try:
        stopped = float((Path(state_dir) / _STOPPED_FILE).read_text(encoding="ascii"))
    except (OSError, ValueError):
        return False
    return 0 <= time.time() - stopped < within


@final
class TunnelServer:
    """The agent-facing half of a relay: handshakes, sessions, uplinks.

    Constructing it reads the token file and the state directory, nothing else;
    :func:`tunnel2.serve_tunnel_server` runs it together with the public
    :class:`~tunnel2.entry.ProxyEntry` on one port.

    Args:
        config: the relay's settings.
        base_url: the advertised base URL.
        port: the bound port.
        store: where claims are decided (default: a :class:`MemorySessionStore`, with its
            owners kept in ``config.state_dir`` if set); pass a shared one for several relay
            nodes.
        secret: the key for resume keys (default: from ``config.state_dir``, else random).
        observers: told of agents joining and leaving, refusals, drains and (through the
            entry) every request (:mod:`tunnel2.observe`).
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        base_url: str,
        port: int = 0,
        store: SessionStore | None = None,
        secret: bytes | None = None,
        observers: Iterable[Observer] = (),
    ) -> None:
        self.config = config
        self.base_url = base_url.rstrip("/")
        self.port = port
        self._tokens = load_tokens(config)
        self._secret = secret or _load_secret(config.state_dir)
        if store is None:
            owners = Path(config.state_dir) / _OWNERS_FILE if config.state_dir else None
            store = MemorySessionStore(grace_period=config.grace_period, owners_file=owners)
        self.store: SessionStore = store
        self.routes = RouteTable(grace_period=config.grace_period, drain_hold=config.drain_hold)
        # Visitor access policies of sessions with a connected agent (PROTOCOL.md §3.1.1).
        self.access_policies: dict[str, AccessPolicy] = {}
        # After a restart, agents need a moment to re-dial: unknown sessions get 503 for one
        # grace period instead of 404 (PROTOCOL.md §4.5).
        restarted = _stopped_recently(config.state_dir, config.grace_period)
        self._restart_grace_until = trio.current_time() + config.grace_period if restarted else -1.0
        self._uplinks: dict[TunnelUplink, str] = {}  # uplink -> the identity it came as
        self._counter = itertools.count(1)
        self._draining = False
        self._in_flight = 0
        # Set when _in_flight drops to 0; made only while drain() waits for it (not per
        # request: a trio.Event built and set per request costs ~1 % of the relay).
        self._idle: trio.Event | None = None
        # --- observe --- (the entry emits the request events to the same list)
        self.observers: list[Observer] = list(observers)
        self.admin_url: str | None = None  # the admin endpoint, if one is served

    def __repr__(self) -> str:
        return f"<TunnelServer {self.base_url} sessions={len(self.routes)}>"

    @property
    def open_relay(self) -> bool:
        """True if any agent may connect (no tokens configured)."""
        return self._tokens is None

    def public_urls(self, session_id: str) -> tuple[str, ...]:
        """The URLs at which a session is reachable, preferred first.

        The Host form ``{id}.{domain}`` only for an id without capitals: host names are
        matched lower-cased (browsers send them so), so ``MyApp.{domain}`` would reach
        session ``myapp``."""
        urls = [f"{self.base_url}/session/{session_id}/"]
        if self.config.domain and session_id == session_id.lower():
            scheme, _, rest = self.base_url.partition("://")
            port = rest.rpartition(":")[2] if ":" in rest else ""
            host = f"{session_id}.{self.config.domain}" + (f":{port}" if port else "")
            urls.insert(0, f"{scheme}://{host}/")
        return tuple(urls)

    @property
    def uplinks(self) -> frozenset[TunnelUplink]:
        """The connected uplinks."""
        return frozenset(self._uplinks)

    def mark_stopped(self) -> None:
        """Note in the state directory that this relay stopped now, so one started within a
        grace period knows it is a restart (:func:`tunnel2.serve_tunnel_server` calls it)."""
        if self.config.state_dir is not None:
            with contextlib.suppress(OSError):
                (Path(self.config.state_dir) / _STOPPED_FILE).write_text(f"{time.time()}\n")

    def restart_grace_left(self, now: float) -> float:
        """Seconds left of the start-up grace after a restart (0 if none)."""
        return max(0.0, self._restart_grace_until - now)

    def reload_tokens(self) -> None:
        """Re-read the tokens (``config.token_file``); connected agents stay, except those
        whose identity is no longer in the table, which are disconnected.

        Raises:
            tunnel2.tokens.TokenError, OSError: the file is malformed or unreadable; the
                table in force is kept.
        """
        tokens = load_tokens(self.config)
        self._tokens = tokens
        names = tokens.identities if tokens is not None else frozenset()
        revoked = [
            u for u, name in self._uplinks.items() if tokens is not None and name not in names
        ]
        for uplink in revoked:
            uplink.close("the agent's token was revoked", ErrorCode.UNAUTHORIZED)
        logger.info(
            "tokens reloaded: %d identities, %d agent(s) disconnected",
            len(names),
            len(revoked),
        )

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
            welcome, lease, decoder, access = await self._handshake(transport, name)
        except (HandshakeError, ProtocolError, _Refusal) as exc:
            logger.info("%s handshake failed: %s", name, exc)
            if self.observers and isinstance(exc, (ProtocolError, _Refusal)):  # --- observe ---
                emit(self.observers, _refused(name, exc))
            await trio.aclose_forcefully(transport)
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            logger.info("%s disconnected during the handshake", name)
            await trio.aclose_forcefully(transport)
            return
        try:
            async with open_uplink(
                transport,
                decoder,
                welcome,
                role="relay",
                name=name,
                limits=self.config.uplink_limits,
                heartbeat_timeout=self.config.heartbeat_timeout,
            ) as uplink:
                # Decided synchronously: the uplink is routable the moment WELCOME is out.
                self.routes.attach(lease.session_id, uplink)
                self._set_policy(lease.session_id, access)  # the most recent agent's wins
                self._uplinks[uplink] = lease.owner
                logger.info(
                    "%s connected: session %s as %s (epoch %d, %d agent(s))",
                    name,
                    lease.session_id,
                    lease.owner or "anonymous",
                    lease.epoch,
                    len(self.routes.uplinks_of(lease.session_id)),
                )
                if self.observers:  # --- observe ---
                    agents = len(self.routes.uplinks_of(lease.session_id))
                    emit(self.observers, AgentJoined(lease.session_id, name, lease.owner, agents))
                try:
                    await uplink.wait_closed()
                finally:
                    self._uplinks.pop(uplink, None)
                    self.routes.detach(lease.session_id, uplink, trio.current_time())
                    if not self.routes.uplinks_of(lease.session_id):
                        self.access_policies.pop(lease.session_id, None)
                    logger.info("%s disconnected: %s", name, uplink.close_reason)
                    if self.observers:  # --- observe ---
                        left = AgentLeft(lease.session_id, name, lease.owner, uplink.close_reason)
                        emit(self.observers, left)
        finally:
            await self._release(lease)

    async def _release(self, lease: Lease) -> None:
        # Shielded and bounded: a release must happen even when we are being cancelled,
        # and a remote store that hangs must not hold the task forever.
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await self.store.release(lease, now=trio.current_time())

    def _resume_key(self, kind: str, owner: str, session_id: str, nonce: str = "") -> str:
        message = "\0".join((kind, owner, session_id, nonce)).encode()
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:24]).decode()

    def _identify(self, token: str | None) -> Identity | None:
        if self._tokens is None:
            return None
        identity = self._tokens.identify(token)
        if identity is None:
            raise _Refusal(ErrorCode.UNAUTHORIZED, "invalid or missing token")
        return identity

    async def _claim(self, hello: frames.Hello, identity: Identity | None) -> tuple[Lease, str]:
        """Decide the HELLO's claim; return the lease and the resume key to hand out."""
        owner = identity.name if identity is not None else ""
        now = trio.current_time()
        requested = hello.session_id
        store = self.store
        cap = self.config.max_sessions_per_identity
        if requested is None:
            session_id = secrets.token_hex(_RANDOM_ID_BYTES)
            lease = await store.claim(
                session_id, owner, now=now, exclusive=True, keep_owner=False, max_per_owner=cap
            )
            return lease, self._resume_key("random", owner, session_id)
        random_key = self._resume_key("random", owner, requested)
        if hello.resume_key is not None and hmac.compare_digest(hello.resume_key, random_key):
            # Its own agent, back (after a drop, a lease that ran out, or a relay restart).
            lease = await store.claim(
                requested, owner, now=now, exclusive=False, keep_owner=False, max_per_owner=cap
            )
            return lease, random_key
        if _RANDOM_ID_RE.fullmatch(requested):
            raise _Refusal(
                ErrorCode.UNAUTHORIZED,
                f"session {requested} is one the relay assigns; only its own agent can "
                "reclaim it, with its resume key",
            )
        if identity is not None:
            assert self._tokens is not None
            if not self._tokens.may_claim(identity, requested):
                raise _Refusal(
                    ErrorCode.UNAUTHORIZED,
                    f"the token of {identity.name} may not hold session {requested}",
                )
            # Same identity joins; the owner is kept for good (PROTOCOL.md §3.4).
            lease = await store.claim(
                requested, owner, now=now, exclusive=False, keep_owner=True, max_per_owner=cap
            )
        else:
            # An open relay knows no identities: a held fixed id is rejoined only with the
            # resume key of its current holder, and never shared with anyone else.
            nonce = None
            if hello.resume_key is not None:
                current = await store.get(requested, now=now)
                if current is not None and hmac.compare_digest(
                    hello.resume_key, self._resume_key("fixed", "", requested, current.nonce)
                ):
                    nonce = current.nonce
            lease = await store.claim(
                requested,
                "",
                now=now,
                exclusive=True,
                keep_owner=False,
                nonce=nonce,
                max_per_owner=cap,
            )
        return lease, self._resume_key("fixed", owner, requested, lease.nonce)

    async def _handshake(
        self, transport: FrameTransport, name: str
    ) -> tuple[frames.Welcome, Lease, frames.FrameDecoder, AccessPolicy | None]:
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
            identity = self._identify(hello.token)
            access = _access_policy(hello)
            try:
                lease, resume_key = await self._claim(hello, identity)
            except SessionLimit as exc:
                raise _Refusal(ErrorCode.OVERLOADED, exc.reason) from None
            except SessionTaken as exc:
                raise _Refusal(ErrorCode.UNAUTHORIZED, exc.reason) from None
        except _Refusal as refusal:
            await self._refuse(transport, refusal.code, refusal.reason)
            raise
        welcome = frames.Welcome(
            session_id=lease.session_id,
            public_urls=self.public_urls(lease.session_id),
            resume_key=resume_key,
            max_frame_size=min(config.max_frame_size, hello.max_frame_size),
            initial_window=config.initial_window,
            connection_window=config.connection_window,
            ping_interval=config.ping_interval,
            # What the agent asked for that this relay speaks too (PROTOCOL.md §3.2).
            capabilities=tuple(c for c in frames.CAPABILITIES if c in hello.capabilities),
        )
        try:
            await transport.send(frames.encode(welcome))
        except BaseException:
            # The claim stands but nobody took it: release it so its lease can run out.
            await self._release(lease)
            raise
        return welcome, lease, decoder, access

    def policy_for(self, session_id: str) -> AccessPolicy | None:
        """The visitor access policy of a session, or ``None`` if it has none."""
        return self.access_policies.get(session_id)

    def _set_policy(self, session_id: str, access: AccessPolicy | None) -> None:
        if access is None:
            self.access_policies.pop(session_id, None)
        else:
            self.access_policies[session_id] = access
            logger.info("session %s admits %s", session_id, access.describe())

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
        self._in_flight += 1

    def request_finished(self) -> None:
        """The response to a counted request is out, or failed."""
        self._in_flight -= 1
        if not self._in_flight and self._idle is not None:
            self._idle.set()
            self._idle = None

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` began: new requests get 503 with ``Retry-After``."""
        return self._draining

    async def wait_for_agent(self, session_id: str) -> Route:
        """Wait up to ``config.drain_hold`` seconds for an agent of ``session_id`` to take
        requests (its agents are draining, :meth:`RouteTable.holding`), then route."""
        with trio.move_on_after(self.config.drain_hold):
            while (event := self.routes.attached_event(session_id)) is not None:
                await event.wait()
                routed = self.routes.route(session_id, trio.current_time())
                if type(routed) is Routed:
                    return routed
        await trio.lowlevel.checkpoint()
        return self.routes.route(session_id, trio.current_time())

    async def drain(self) -> None:
        """Refuse new agents, send GOAWAY on every uplink and give in-flight requests
        ``config.drain_timeout`` seconds (until their responses are sent, not just relayed)
        before the uplinks close."""
        if self.observers and not self._draining:  # --- observe ---
            emit(self.observers, DrainStarted(len(self._uplinks), self._in_flight))
        self._draining = True
        with trio.move_on_after(self.config.drain_timeout):
            async with trio.open_nursery() as nursery:
                for uplink in list(self._uplinks):
                    nursery.start_soon(uplink.drain, self.config.drain_timeout)
                if self._in_flight:
                    if self._idle is None:
                        self._idle = trio.Event()
                    await self._idle.wait()
