"""ProxyEntry: the relay's public HTTP/1.1 side.

Layer: above server and uplink. May import trio, attrs, errors, access, uplink, server and
the internal HTTP/1.1 parser.

Each public connection is served by one task: it reads a request head, validates it strictly
(malformed and smuggling-shaped requests get a 4xx and the connection is closed), routes it to
a session's uplink, and streams the request body out and the response back without buffering
either whole. Heads are changed at the byte level (path prefix, hop-by-hop headers,
X-Forwarded-*); bodies pass through as bytes. Every failure becomes an HTTP answer that says
what happened (PROTOCOL.md §4); none of them ends anything but the one connection.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import logging
import math
import re
from typing import Final, NoReturn, final

import trio

from tunnel2 import _http11 as http
from tunnel2._sockets import (
    CanSendNowait,
    FastSocketStream,
    can_send_nowait,
    can_tell_peer_closed,
    has_peer_address,
)
from tunnel2.access import CREDENTIAL_HEADER, AccessPolicy
from tunnel2.errors import ErrorCode, LocalProtocolError, ProtocolError, StreamReset, UplinkClosed
from tunnel2.observe import RequestFinished, RequestStarted, emit
from tunnel2.server import AGENT_PATH, IPNetwork, ServerConfig, TunnelServer, parse_networks
from tunnel2.sessions import DISCONNECTED, Routed

_AGENT_PATH: Final = AGENT_PATH.encode()

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from tunnel2.uplink import TunnelStream

__all__ = ["ProxyEntry"]

logger = logging.getLogger(__name__)

_RECEIVE_SIZE: Final = 65536
# The path form: the session id runs from the prefix to the first "/" or "?" (one C call).
_SESSION_TARGET_RE: Final = re.compile(rb"/session/([^/?]+)")


# Cut from the request on its way to the agent; the relay writes its own framing and
# forwarding lines (PROTOCOL.md §4.2).
_DROPPED: Final = (
    http.HOP_BY_HOP
    | {b"proxy-authorization", b"proxy-authenticate", b"expect", b"content-length"}
    | {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"}
    | {b"x-forwarded-prefix"}
    | {b"x-real-ip"}
)
_DROP_RE: Final = http.field_names_re(_DROPPED)
# A session whose access policy checks credentials: the credential stays at the relay.
_DROP_WITH_CREDENTIAL_RE: Final = http.field_names_re(_DROPPED | {CREDENTIAL_HEADER})
# Trusted proxies walked back through X-Forwarded-For at most; past that, the element
# reached counts as the client (a visitor cannot make the relay parse a 60 KiB chain).
_MAX_TRUSTED_HOPS: Final = 16
_FORWARDED_HOST_RE: Final = re.compile(rb"[A-Za-z0-9.:\[\]_-]{1,255}")
_RESET_STATUS: Final = {
    ErrorCode.BACKEND_UNAVAILABLE: 502,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.REFUSED_STREAM: 503,
}
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

# Which of the two connection pools a connection's slot is in (_Limits).
_UNCOUNTED: Final = 0  # refused at accept
_VISITOR: Final = 1  # a visitor slot: a visitor, or not identified yet
_SPARE: Final = 2  # an agent slot taken while the visitor slots were full; not identified yet
_AGENT: Final = 3  # an agent slot: an agent
_NO_PEER: Final = b"unknown"  # what _peer_address says when it cannot tell
# _Connection.write_started while a write is under way that no sweep of run_timeouts saw yet.
_WRITE_BEGUN: Final = -math.inf


def _unparsed_head_answer(status: int, message: str) -> bytes:
    """The answer to a head that was never parsed (too large, or too slow): without a body,
    since whether it was a HEAD (whose answer has none) is unknown; the reason goes in the
    X-Tunnel2-Error field instead."""
    return (
        b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\nX-Tunnel2-Error: %s\r\n\r\n"
        % (
            status,
            http.reason_phrase(status),
            message.encode(),
        )
    )


class _Answer(Exception):
    """Answer the client with an error response (raised inside a request)."""

    def __init__(self, status: int, message: str, headers: bytes = b"") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class _ClientGone(Exception):
    """The public client closed or broke its connection mid-request."""


class _Connection:
    """Per-connection state of the entry."""

    __slots__ = (
        "buf",
        "check_at",
        "client",
        "deadline",
        "entry",
        "forwarded",
        "gone",
        "head_request",
        "in_head",
        "nowait",
        "peer",
        "peer_port",
        "peer_trusted",
        "pool",
        "sent",
        "status",
        "timer",
        "waiting",
        "write_started",
    )

    def __init__(self, client: trio.abc.Stream, entry: ProxyEntry) -> None:
        self.client = client
        self.entry = entry
        self.nowait = client if can_send_nowait(client) else None
        self.peer, self.peer_port = _peer_address(client)
        self.peer_trusted: bool | None = None  # a trusted proxy? (known at its first request)
        # (Host, the forwarding lines for it) of the last request: from a peer that is not
        # a trusted proxy they depend on nothing else, so a keep-alive connection formats
        # them once (~1 % of the relay per request).
        self.forwarded: tuple[bytes, bytes] | None = None
        self.buf = bytearray()
        # One scope per connection, cancelled by ProxyEntry.run_timeouts once `deadline`
        # passes: the idle or head timeout while a head is awaited, the request timeout
        # while a response head is, and infinite otherwise. (Moving a CancelScope's own
        # deadline costs trio a heap update per change; this is a float store.)
        self.timer = trio.CancelScope()
        self.deadline = math.inf
        self.check_at = math.inf  # when run_timeouts next looks at `deadline` (its heap)
        self.in_head = False  # `deadline` is the head timeout (answered 408)
        self.gone = False  # run_timeouts saw the client close while we waited
        self.head_request = False  # the request being served is a HEAD (no error bodies)
        self.waiting: TunnelStream | None = None
        self.pool = _UNCOUNTED
        # When the write to the client under way began, as run_timeouts first saw it
        # (_WRITE_BEGUN until it has); infinite while no write is under way.
        self.write_started = math.inf
        self.sent = 0  # bytes written to the client (RequestFinished.response_bytes)
        self.status = 0  # the status of the response going out now

    async def send(self, data: bytes | bytearray) -> None:
        """Send to the client, within the write timeout (ProxyEntry.run_timeouts). A write
        the socket takes at once costs nothing more; one it does not is watched by the
        sweep until it is done (two float stores and a set entry, no clock read and no
        cancel scope per write)."""
        stream = self.nowait
        if stream is not None and not stream.send_pending:
            stream.send_nowait(bytes(data))
            self.sent += len(data)  # (what the socket did not take goes first with the next)
            if not _unsent(stream):
                return
            data = b""  # send_all(b"") flushes the rest
        self.write_started = _WRITE_BEGUN
        watched = self.entry._watched
        self.entry._watch(self)
        try:
            await self.client.send_all(data)
        finally:
            watched.discard(self)
        self.write_started = math.inf
        self.sent += len(data)


def _unsent(stream: CanSendNowait) -> bool:
    # (a function, so that mypy does not take send_pending as unchanged by send_nowait)
    return stream.send_pending


@final
class _Limits:
    """Connection counts against the relay's caps: plain synchronous bookkeeping, asked at
    accept and once a connection's first head tells an agent from a visitor.

    Limits for visitors never lock agents out (DESIGN.md, Trust). Two pools bound every
    connection: visitor slots hold visitors and connections not identified yet; agent slots
    hold agents, and the connections accepted while the visitor slots were full (spares:
    their first head decides). A spare that turns out a visitor takes a visitor slot if one
    is free by then, else it gets 503. So at most both caps together are ever open, and a
    relay whose visitor side is full still lets agents in. One peer address may hold
    ``max_connections_per_ip`` connections that are not agents; past it a new connection
    gets 429 before anything is read (an agent there re-dials with its backoff). Streams
    whose peer address is unknown (in memory) are not counted per address.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.max_visitors = config.max_visitor_connections
        self.max_agents = config.max_agent_connections
        self.max_per_peer = config.max_connections_per_ip
        self.visitors = 0  # connections in visitor slots
        self.agents = 0  # connections in agent slots (agents and spares)
        self.by_peer: dict[bytes, int] = {}  # connections that are not agents, per address

    def admit(self, conn: _Connection) -> bytes | None:
        """Give a new connection a slot, or return the answer that refuses it."""
        peer = conn.peer
        limit = self.max_per_peer if peer != _NO_PEER else None
        if limit is not None and self.by_peer.get(peer, 0) >= limit:
            message = (
                f"{limit} connections from {peer.decode()} are open, the most one address may have"
            )
            return http.plain_response(429, message, close=True)
        if self.visitors < self.max_visitors:
            self.visitors += 1
            conn.pool = _VISITOR
        elif self.agents < self.max_agents:
            self.agents += 1
            conn.pool = _SPARE
        else:
            message = (
                f"the relay is serving its maximum of {self.max_visitors} visitor and "
                f"{self.max_agents} agent connections"
            )
            return http.plain_response(503, message, close=True)
        if limit is not None:
            self.by_peer[peer] = self.by_peer.get(peer, 0) + 1
        return None

    def seat_visitor(self, conn: _Connection) -> bytes | None:
        """A spare sent a visitor's request: move it to a visitor slot, or return the 503."""
        if self.visitors >= self.max_visitors:
            message = f"the relay is serving its maximum of {self.max_visitors} visitor connections"
            return http.plain_response(503, message, close=True)
        self.agents -= 1
        self.visitors += 1
        conn.pool = _VISITOR
        return None

    def seat_agent(self, conn: _Connection) -> bytes | None:
        """A connection asked to be an agent: give it an agent slot, or return the 503."""
        if conn.pool == _VISITOR:
            if self.agents >= self.max_agents:
                message = f"the relay is serving its maximum of {self.max_agents} agents"
                return http.plain_response(503, message, close=True)
            self.visitors -= 1
            self.agents += 1
        self._forget_peer(conn)
        conn.pool = _AGENT
        return None

    def release(self, conn: _Connection) -> None:
        """Free the slot of a connection that closed."""
        pool = conn.pool
        conn.pool = _UNCOUNTED
        if pool == _VISITOR:
            self.visitors -= 1
        elif pool == _UNCOUNTED:
            return
        else:
            self.agents -= 1
        if pool != _AGENT:
            self._forget_peer(conn)

    def _forget_peer(self, conn: _Connection) -> None:
        peer = conn.peer
        if self.max_per_peer is not None and peer != _NO_PEER:
            left = self.by_peer[peer] - 1
            if left:
                self.by_peer[peer] = left
            else:
                del self.by_peer[peer]


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


def _peer_address(stream: trio.abc.Stream) -> tuple[bytes, int]:
    """The peer's IP address and port, or ``(b"unknown", 0)``."""
    if has_peer_address(stream):
        address, port = stream.peer_address()
        return address.encode(), port
    return b"unknown", 0


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
        # Connections that are not agents (run_timeouts enforces their timeouts).
        self._connections: set[_Connection] = set()
        # What run_timeouts looks at, so its cost is proportional to what is due, not to
        # what is open: a heap of (when, seq, connection) for deadlines (lazy: an entry is
        # looked at when due and re-armed if the deadline moved later), and the connections
        # it checks every tick (a response head awaited, a write the socket did not take).
        self._timers: list[tuple[float, int, _Connection]] = []
        self._timer_seq = itertools.count()
        self._watched: set[_Connection] = set()
        self._busy = False  # something was watched since the last tick
        self._sweep_wake = trio.Event()
        self._sweep_long = False  # the sweep sleeps till _sweep_until or _sweep_wake
        self._sweep_until = math.inf
        self._host = server.base_url.partition("://")[2].encode()
        self._limits = _Limits(self.config)
        self._observers = server.observers  # --- observe --- (the server's list itself)
        self._head_timeout_answer = _unparsed_head_answer(
            408, f"the request head did not arrive within {self.config.head_timeout:g}s"
        )
        self._trusted = parse_networks(self.config.trusted_proxies)
        # What the entry reads the clock with. While run_timeouts runs, the run's clock
        # itself: one call instead of trio.current_time()'s four (~1,200 instructions less a
        # read, twice per request); the same time either way.
        self._now: Callable[[], float] = trio.current_time

    def __repr__(self) -> str:
        return f"<ProxyEntry {self.server.base_url}>"

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one public connection until it closes; closes ``stream`` before returning.

        Requests on the agents' path with a WebSocket upgrade are handed to the server. A
        connection past the visitor, agent or per-address caps is answered 503 or 429 and
        closed (:class:`_Limits`).
        """
        if isinstance(stream, trio.SocketStream):
            stream = FastSocketStream.from_trio(stream)
        conn = _Connection(stream, self)
        refusal = self._limits.admit(conn)
        self._connections.add(conn)
        try:
            with conn.timer:
                if refusal is not None:
                    await conn.send(refusal)
                    return
                # A fresh connection's first head is due within the head timeout from
                # accept (nginx's client_header_timeout), not the longer idle timeout.
                self._arm_head_timeout(conn)
                await self._serve(conn)
            if conn.timer.cancelled_caught:
                await self._timed_out(conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError, _ClientGone):
            pass
        except Exception:
            # A bug must cost one connection, never the relay (its listener nursery).
            logger.exception("entry connection failed unexpectedly")
        finally:
            self._connections.discard(conn)
            self._limits.release(conn)
            if isinstance(stream, FastSocketStream):
                stream.close()  # at once: the task ends here, no checkpoint needed
            else:
                await trio.aclose_forcefully(stream)

    async def _timed_out(self, conn: _Connection) -> None:
        """Finish a connection whose timer run_timeouts cancelled, as the cause demands."""
        config = self.config
        if conn.waiting is not None and conn.gone:
            conn.waiting.reset(ErrorCode.CANCEL, "the client went away")
        elif conn.waiting is not None:
            # The request timeout fired while we waited for the response head.
            conn.waiting.reset(ErrorCode.TIMEOUT, "relay timed out waiting for the response")
            message = f"no response from the tunnel within {config.request_timeout:g}s"
            answer = http.plain_response(504, message, close=True, head=conn.head_request)
            await self._send_last(conn, answer)
        elif conn.write_started != math.inf:
            # The client read nothing for write_timeout; the stream it was fed from is
            # reset by now (_proxy's finally), which frees the agent's worker.
            logger.debug("entry: %s read nothing for %gs", conn.peer, config.write_timeout)
        elif conn.in_head:
            await self._send_last(conn, self._head_timeout_answer)
        # else the idle timeout: the connection closes without an answer.

    async def _send_last(self, conn: _Connection, data: bytes) -> None:
        """Send a connection's final answer, within the write timeout."""
        with trio.move_on_after(self.config.write_timeout):
            await conn.client.send_all(data)

    def _arm_head_timeout(self, conn: _Connection) -> None:
        self._set_deadline(conn, self._now() + self.config.head_timeout)
        conn.in_head = True

    def _set_deadline(self, conn: _Connection, when: float) -> None:
        """Set ``conn.deadline`` for run_timeouts; arm its heap if it looks later than that."""
        conn.deadline = when
        if when < conn.check_at:
            conn.check_at = when
            timers = self._timers
            if len(timers) > 2 * len(self._connections) + 64:
                # Entries of closed connections and of deadlines moved earlier wait till
                # they are due: past twice the live ones, keep only the live ones
                # (amortised O(1) per push).
                live = self._connections
                timers[:] = [t for t in timers if t[2].check_at == t[0] and t[2] in live]
                heapq.heapify(timers)
            heapq.heappush(timers, (when, next(self._timer_seq), conn))
            if self._sweep_long and when < self._sweep_until:
                self._sweep_wake.set()

    def _watch(self, conn: _Connection) -> None:
        """Have run_timeouts check ``conn`` every tick until it leaves ``_watched``."""
        self._watched.add(conn)
        self._busy = True
        if self._sweep_long:
            self._sweep_wake.set()

    @property
    def connections(self) -> int:
        """Public connections open now that are not agents (visitors, and connections
        whose first head is not read yet)."""
        return len(self._connections)

    async def run_timeouts(self) -> NoReturn:
        """Enforce the idle, head, request and write timeouts of every connection that is
        not an agent, and notice clients that close while they wait for a response head
        (their stream is reset, so the agent stops working for nobody); runs until cancelled.

        :func:`tunnel2.serve_tunnel_server` runs it beside the listeners. Its cost is
        proportional to what is due, not to what is open: deadlines sit in a heap, and only
        connections awaiting a response head or with a write the socket did not take at once
        are looked at every tick; with none of those it sleeps till the first deadline
        (sweeping at most once a tick, however many entries come due one by one).
        Timeouts fire up to a twentieth of their length late (at most 0.5 s), as does the
        notice; the write timeout up to a tenth (at most 1 s), as a write is first seen by a
        tick.
        """
        config = self.config
        write_timeout = config.write_timeout
        timeouts = (config.request_timeout, config.idle_timeout, config.head_timeout)
        tick = max(0.01, min(0.5, write_timeout / 20, *(t / 20 for t in timeouts)))
        self._now = trio.lowlevel.current_clock().current_time
        try:
            await self._run_timeouts(tick, write_timeout)
        finally:
            self._now = trio.current_time  # this run's clock is not the next one's

    async def _run_timeouts(self, tick: float, write_timeout: float) -> NoReturn:
        swept = -math.inf
        while True:
            if self._watched or self._busy:
                self._busy = False
                await trio.sleep(tick)
            else:
                # Not sooner than a tick after the last sweep: the entries of connections
                # that closed (each left its head timeout's) come due one after another,
                # and would cost a wake-up each (~50,000 instructions) instead of one a tick.
                timers = self._timers
                self._sweep_until = max(timers[0][0], swept + tick) if timers else math.inf
                self._sweep_wake = trio.Event()
                self._sweep_long = True
                try:
                    with trio.move_on_at(self._sweep_until):
                        await self._sweep_wake.wait()
                finally:
                    self._sweep_long = False
                    self._sweep_until = math.inf
            swept = self._now()
            self._sweep(swept, write_timeout)

    def _sweep(self, now: float, write_timeout: float) -> None:
        timers = self._timers
        live = self._connections
        while timers and timers[0][0] <= now:
            when, _, conn = heapq.heappop(timers)
            if when != conn.check_at or conn not in live:
                continue  # superseded by an earlier look, or closed
            conn.check_at = math.inf
            if conn.deadline <= now:
                conn.timer.cancel()
            elif conn.deadline != math.inf:  # it moved later: look again then
                conn.check_at = conn.deadline
                heapq.heappush(timers, (conn.deadline, next(self._timer_seq), conn))
        for conn in self._watched:
            if conn.deadline <= now:
                conn.timer.cancel()
            elif conn.write_started != math.inf:
                if conn.write_started == _WRITE_BEGUN:
                    conn.write_started = now
                elif conn.write_started + write_timeout <= now:
                    conn.timer.cancel()
            elif (
                conn.waiting is not None
                and can_tell_peer_closed(conn.client)
                and conn.client.peer_closed()
            ):
                conn.gone = True
                conn.timer.cancel()

    async def _read_head(self, conn: _Connection) -> bytes | None:
        """Read until a whole head is in, within the size limit; return it (taken out of
        ``conn.buf``, which keeps what followed it), or None if the client closed or was
        answered 431.

        Until a keep-alive request's first byte the idle timeout runs, from there to the
        head's end the head timeout (a slowloris trickling bytes is cut); a fresh
        connection's head timeout runs from accept (handle_connection arms it).
        """
        config = self.config
        client, buf = conn.client, conn.buf
        if buf:
            end = http.find_head_end(buf)
            if end >= 0:
                return http.take(buf, end)
            self._arm_head_timeout(conn)  # part of a pipelined head is in
        elif not conn.in_head:
            when = conn.deadline = self._now() + config.idle_timeout
            if when < conn.check_at:  # (inlined _set_deadline: once per request)
                self._set_deadline(conn, when)
        while True:
            if len(buf) > config.max_head_size:
                message = f"request head is over {config.max_head_size} bytes"
                await conn.send(_unparsed_head_answer(431, message))
                return None
            data = await client.receive_some(_RECEIVE_SIZE)
            if not data:
                return None
            if buf:
                buf += data
                end = http.find_head_end(buf, max(0, len(buf) - len(data) - 3))
            else:
                end = http.find_head_end(data)
                if end == len(data):  # the common read: one whole head, nothing after it
                    # No copy into the buffer and out again (~-3,900 instructions); bytes()
                    # returns a bytes object itself (a memory stream gives a bytearray).
                    head = bytes(data)
                    break
                buf += data
            if end >= 0:
                head = http.take(buf, end)
                break
            if not conn.in_head:
                self._arm_head_timeout(conn)  # the first bytes of a head, and not all of it
        conn.deadline = math.inf
        if conn.in_head:
            conn.in_head = False
        return head

    async def _serve(self, conn: _Connection) -> None:
        config = self.config
        client, buf = conn.client, conn.buf
        while True:
            # 1. A head, within the idle timeout (keep-alive) and the size limit.
            try:
                head = await self._read_head(conn)
            except ProtocolError as exc:
                await conn.send(http.plain_response(exc.status_hint, str(exc), close=True))
                return
            if head is None:
                return  # the client closed, or its head was too large (answered 431)
            try:
                request = http.parse_request_head(head, max_size=config.max_head_size)
                framing, length = http.request_framing(request)
            except ProtocolError as exc:
                is_head = head.startswith(b"HEAD ")
                await conn.send(
                    http.plain_response(exc.status_hint, str(exc), close=True, head=is_head)
                )
                return
            is_head = conn.head_request = request.method == b"HEAD"
            if request.target.startswith(_AGENT_PATH) and (
                (request.get(b"upgrade") or b"").lower() == b"websocket"
            ):
                refusal = self._limits.seat_agent(conn)
                if refusal is not None:
                    await conn.send(refusal)
                    return
                self._connections.discard(conn)  # agents have no entry timeouts
                agent = _PrefixedStream(client, bytes(buf)) if buf else client
                await self.server.handle_websocket(agent, head)
                return
            if conn.pool == _SPARE:  # accepted while the visitor slots were full
                refusal = self._limits.seat_visitor(conn)
                if refusal is not None:
                    await conn.send(refusal)
                    return
            # Counted in flight until the response is out, so a draining relay waits for it.
            self.server.request_started()
            routing = self._route(request)
            observed = (
                self._request_started(conn, request, length, framing, routing)
                if self._observers
                else None
            )
            try:
                keep_alive = await self._proxy(conn, request, framing, length, routing)
            except _Answer as answer:
                conn.status = answer.status
                # Nothing of a response went out yet; the request body may be unread.
                await conn.send(
                    http.plain_response(
                        answer.status,
                        answer.message,
                        close=True,
                        headers=answer.headers,
                        head=is_head,
                    )
                )
                return
            finally:
                self.server.request_finished()
                if observed is not None:
                    self._request_finished(conn, observed)
            if not keep_alive:
                return

    # --- observe: request events, built only when someone listens ------------------------

    def _request_started(
        self,
        conn: _Connection,
        request: http.RequestHead,
        length: int,
        framing: http.Framing,
        routing: tuple[str, bytes, bytes] | None,
    ) -> tuple[RequestStarted, float, int]:
        session_id, target = routing[:2] if routing is not None else ("", request.target)
        path = target.partition(b"?")[0].decode("ascii", "replace")
        body = None if framing is http.CHUNKED else length
        started = RequestStarted("relay", session_id, request.method.decode(), path, body)
        emit(self._observers, started)
        conn.status = 0
        return started, self._now(), conn.sent

    def _request_finished(
        self, conn: _Connection, observed: tuple[RequestStarted, float, int]
    ) -> None:
        started, start, sent = observed
        status = conn.status or (504 if conn.waiting is not None and not conn.gone else 0)
        finished = RequestFinished(
            "relay",
            started.session_id,
            started.method,
            started.path,
            started.request_body,
            status,
            conn.sent - sent,
            self._now() - start,
        )
        emit(self._observers, finished)

    # --- one request --------------------------------------------------------------------

    def _route(self, request: http.RequestHead) -> tuple[str, bytes, bytes] | None:
        """Return (session id, target for the backend, public path prefix), or None if the
        request names no session (_proxy answers 404). The prefix is ``/session/{id}`` on the
        path form, empty on the Host form."""
        if self._domain_suffix is not None:
            # Host names are case-insensitive (browsers send them lower-cased): the label is
            # matched lower-cased, so a session id with capitals has no Host form (the relay
            # does not list one for it, PROTOCOL.md §4.6).
            host = (request.get(b"host") or b"").rpartition(b":")[0] or request.get(b"host")
            if host:
                host = host.lower()
                if host.endswith(self._domain_suffix):
                    label = host[: -len(self._domain_suffix)]
                    if label and b"." not in label:
                        return label.decode("ascii", "replace"), request.target, b""
        target = request.target
        match = _SESSION_TARGET_RE.match(target)
        if match is None:
            return None
        end = match.end()
        backend_target = target[end:]
        if backend_target[:1] != b"/":  # "/session/{id}" or "/session/{id}?query"
            backend_target = b"/" + backend_target
        return match[1].decode("ascii", "replace"), backend_target, target[:end]

    def _forward_head(
        self,
        request: http.RequestHead,
        drop: re.Pattern[bytes],
        target: bytes,
        prefix: bytes,
        framing: http.Framing,
        length: int,
        conn: _Connection,
        *,
        upgrade: bytes | None,
        plain: bool,
    ) -> bytes:
        """The request head for the agent, changed at the byte level (DESIGN.md): the
        request line gets the backend's target, the field lines ``drop`` names (hop-by-hop,
        X-Forwarded-*, a credential the relay checked) are cut out in one regex search, and
        our own framing and X-Forwarded-* lines are added (``X-Forwarded-Prefix`` with the
        public path prefix, on the path form only). ``plain``: the request's Connection
        fields (if any) name no token."""
        fields = request.fields_without(drop)
        if not plain:
            named = http.connection_tokens(request) - http.CONNECTION_OPTIONS
            if named:  # rare: fields the Connection header marks hop-by-hop
                fields = http.drop_fields(fields, named)
        parts = [b"%s %s HTTP/1.1\r\n" % (request.method, target), fields]
        if upgrade is not None:
            parts.append(b"Connection: Upgrade\r\nUpgrade: %s\r\n" % upgrade)
        host = request.get(b"host")
        if host is None:  # HTTP/1.0 without Host: name the relay
            host = self._host
            parts.append(b"Host: %s\r\n" % host)
        # Framing stated canonically, once (PROTOCOL.md §4.3): the agent reads it without a
        # full parse.
        if framing is http.CHUNKED:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif framing is http.LENGTH:
            parts.append(b"Content-Length: %d\r\n" % length)
        if prefix:
            parts.append(b"X-Forwarded-Prefix: %s\r\n" % prefix)
        forwarded = conn.forwarded
        if forwarded is not None and forwarded[0] == host:
            parts.append(forwarded[1])
        else:
            peer = (conn.peer, conn.peer_port)
            lines = _forwarding_lines(request, peer, self._proto, host, self._trusted)
            if conn.peer_trusted is None:
                conn.peer_trusted = bool(self._trusted) and _is_trusted(conn.peer, self._trusted)
            if not conn.peer_trusted:  # else they depend on the request's own fields
                conn.forwarded = (host, lines)
            parts.append(lines)
        return b"".join(parts)

    async def _proxy(
        self,
        conn: _Connection,
        request: http.RequestHead,
        framing: http.Framing,
        length: int,
        routing: tuple[str, bytes, bytes] | None,
    ) -> bool:
        """Carry one request through the tunnel (``routing``: what :meth:`_route` found in
        it); return whether the connection stays open."""
        config = self.config
        if routing is None:
            raise _Answer(
                404,
                "no tunnel here: use /session/{id}/... "
                + (f"or Host {{id}}.{config.domain}" if config.domain else ""),
            )
        session_id, target, prefix = routing
        if (
            framing is http.LENGTH
            and config.max_body_size is not None
            and length > config.max_body_size
        ):
            raise _Answer(413, f"request body is {length} bytes, limit {config.max_body_size}")
        if self.server.draining:  # a restart: the client may retry soon (PROTOCOL.md §6.3)
            raise _Answer(503, "the relay is shutting down", headers=b"Retry-After: 1\r\n")
        # One clock read for routing and the response head's deadline (another after a wait
        # for a re-dialling agent or a 100 Continue the client was slow to take).
        now = self._now()
        routed = self.server.routes.route(session_id, now)
        if routed is DISCONNECTED and self.server.routes.holding(session_id, now):
            routed = await self.server.wait_for_agent(session_id)  # a rolling restart
            now = self._now()
        if type(routed) is not Routed:
            if routed is DISCONNECTED:
                raise _Answer(502, f"session {session_id} has no agent connected right now")
            wait = self.server.restart_grace_left(now)
            if wait > 0:
                raise _Answer(
                    503,
                    f"session {session_id} is not connected yet: the relay restarted "
                    "and its agents are re-dialling",
                    headers=b"Retry-After: %d\r\n" % math.ceil(wait),
                )
            raise _Answer(404, f"session {session_id} is not connected to this relay")
        route = routed.uplink
        access = self.server.policy_for(session_id)  # refused here, never at the agent
        drop = _DROP_RE if access is None else _admit(access, request, conn.peer)
        if route.open_streams >= config.max_streams_per_agent:
            raise _Answer(
                503,
                f"session {session_id} has {config.max_streams_per_agent} requests in flight, "
                "the most one agent connection may carry",
            )
        # Most requests have no Connection field (the parser knows: no search): then they
        # ask for no upgrade (an Upgrade field alone is none), name no fields hop-by-hop and
        # persist by their version's default.
        plain = not http.connection_tokens(request)
        upgrade = None if plain or framing is not http.NONE else _upgrade_of(request)
        head = self._forward_head(
            request, drop, target, prefix, framing, length, conn, upgrade=upgrade, plain=plain
        )
        bodiless = upgrade is None and (
            framing is http.NONE or (framing is http.LENGTH and not length)
        )
        try:
            # A request without a body: its END goes out with its OPEN, in one write.
            stream = route.open_stream(head, end=bodiless)
        except UplinkClosed as exc:
            raise _Answer(502, f"agent of session {session_id} disconnected: {exc}") from None
        except LocalProtocolError:
            # It would not fit one OPEN frame (PROTOCOL.md §4.2): refuse this request only.
            raise _Answer(
                431,
                f"the request head is {len(head)} bytes as forwarded to session {session_id}, "
                f"over the tunnel's frame limit of {route.max_frame_size}",
            ) from None
        # RFC 9112 §9.3: without a Connection field HTTP/1.1 persists and HTTP/1.0 does not.
        keep_alive = request.http_version == b"1.1" if plain else request.keep_alive
        exchange = _Exchange(
            session_id,
            request,
            stream,
            upgrade is not None,
            now + config.request_timeout,
            keep_alive,
        )
        # From here on nothing may leave without closing the stream: a client gone before
        # its 100 Continue must not leave the agent waiting for a body for ever (fuzz F4).
        try:
            if framing is not http.NONE and request.get(b"expect") == b"100-continue":
                await conn.send(_CONTINUE)
                exchange.deadline = self._now() + config.request_timeout
            if upgrade is not None:
                # Keep our direction open: after a 101 it carries the new protocol's bytes.
                response_head, response = await self._wait_response(conn, exchange)
                if response.status == 101:
                    await self._splice(conn, response_head, stream)
                    return False
                stream.send_end()
                return await self._respond(conn, exchange, response_head, response)
            if bodiless:
                response_head, response = await self._wait_response(conn, exchange)
                return await self._respond(conn, exchange, response_head, response)
            return await self._exchange(conn, exchange, framing, length)
        except StreamReset as exc:
            status = _RESET_STATUS.get(exc.code, 502)
            raise _Answer(status, f"session {session_id}: {exc.reason or exc}") from None
        except UplinkClosed as exc:
            raise _Answer(
                502, f"agent of session {session_id} disconnected mid-request: {exc}"
            ) from None
        finally:
            if conn.waiting is not stream:  # else handle_connection resets it with TIMEOUT
                stream.close()

    async def _wait_response(
        self, conn: _Connection, exchange: _Exchange
    ) -> tuple[bytes, http.ResponseHead]:
        """Wait for the response head and validate it: everything from an agent is hostile
        (PROTOCOL.md §4.2). Raises _Answer 502 for a head the client must not get."""
        # run_timeouts cancels the connection's scope if this passes; handle_connection
        # then answers 504.
        stream = exchange.stream
        conn.deadline = exchange.deadline
        conn.waiting = stream
        # Watched (inlined _watch): the deadline is checked every tick, and the client's
        # presence.
        self._watched.add(conn)
        self._busy = True
        if self._sweep_long:
            self._sweep_wake.set()
        try:
            head = await stream.receive_head()
        finally:
            self._watched.discard(conn)
        conn.waiting = None
        conn.deadline = math.inf
        try:
            # The frame limit already bounds the head's size.
            response = http.parse_response_head(head, max_size=len(head))
        except ProtocolError:
            kind = "an invalid response head"
        else:
            status = response.status
            if status >= 200 or (status == 101 and exchange.upgrade):
                return head, response
            if status == 101:
                kind = "101 Switching Protocols to a request that asked for no upgrade"
            else:
                kind = f"an interim {status} response (interim answers are not forwarded)"
        # The bad bytes stay out of the log and the answer: they are the agent's, not ours.
        logger.warning(
            "session %s stream %d: the agent sent %s (%d bytes); answered 502",
            exchange.session_id,
            stream.id,
            kind,
            len(head),
        )
        stream.reset(ErrorCode.PROTOCOL_ERROR, "invalid response head")
        raise _Answer(502, f"session {exchange.session_id}: the agent sent {kind}")

    async def _exchange(
        self, conn: _Connection, exchange: _Exchange, framing: http.Framing, length: int
    ) -> bool:
        """Carry a request that has a body: the body streams out while the response may
        already come back."""
        reader = http.make_body_reader(framing, length)
        pump = _BodyPump(conn.client, reader, conn.buf, exchange.stream, self.config)
        result: bool | BaseException
        # Nothing raises out of this nursery (trio would wrap it in a group): the outcome is
        # kept and raised after it closes.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.run)
            try:
                response_head, response = await self._wait_response(conn, exchange)
                result = await self._respond(conn, exchange, response_head, response)
            except (StreamReset, UplinkClosed, _ClientGone, _Answer, ProtocolError) as exc:
                result = pump.error or exc
            nursery.cancel_scope.cancel()
        if isinstance(result, BaseException):
            raise result
        return result and pump.done

    async def _respond(
        self,
        conn: _Connection,
        exchange: _Exchange,
        response_head: bytes,
        response: http.ResponseHead,
    ) -> bool:
        request, stream = exchange.request, exchange.stream
        conn.status = response.status
        framing, length = http.response_framing(response, request.method)
        keep_alive = exchange.keep_alive and framing is not http.UNTIL_CLOSE
        chunked = framing is http.CHUNKED
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
        remaining = length if framing is http.LENGTH else 0 if framing is http.NONE else -1
        parts = [response_head]
        pending = len(response_head)
        head_out = False
        try:
            while True:
                try:
                    data = stream.receive_data_nowait()
                except trio.WouldBlock:
                    if pending:
                        # Send what we have: the head and a small body go out in one write.
                        head_out = True
                        await conn.send(b"".join(parts))
                        parts = []
                        pending = 0
                    # A body that stalls for idle_timeout is cut (as nginx's
                    # proxy_read_timeout): a stalling agent cannot pin public connections
                    # (fuzz F6). run_timeouts enforces it; the float store is all it costs.
                    self._set_deadline(conn, self._now() + self.config.idle_timeout)
                    data = await stream.receive_data()
                    conn.deadline = math.inf
                if not data:
                    break
                if remaining >= 0:
                    if len(data) > remaining:
                        kind = "more body than its response head declared"
                        logger.warning(
                            "session %s stream %d: the agent sent %s",
                            exchange.session_id,
                            stream.id,
                            kind,
                        )
                        stream.reset(ErrorCode.PROTOCOL_ERROR, kind)
                        if head_out:
                            raise _ClientGone()
                        raise _Answer(502, f"session {exchange.session_id}: the agent sent {kind}")
                    remaining -= len(data)
                parts.append(http.encode_chunk(data) if chunked else data)
                pending += len(data)
                if pending >= _RECEIVE_SIZE:  # a large body goes out in ~64 KiB writes
                    head_out = True
                    await conn.send(b"".join(parts))
                    parts = []
                    pending = 0
            if chunked:
                parts.append(http.LAST_CHUNK)
            head_out = True
            await conn.send(b"".join(parts))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            stream.reset(ErrorCode.CANCEL, "client went away")
            raise _ClientGone() from None
        except (StreamReset, UplinkClosed) as exc:
            if not head_out:
                raise  # nothing went out yet: _proxy answers 502/503/504 for it
            # The head is out: all we can do is cut the connection short so the client
            # sees an incomplete body rather than a wrong one.
            logger.info("stream %d failed after the response head: %s", stream.id, exc)
            raise _ClientGone() from None
        if remaining > 0:
            raise _ClientGone()
        return keep_alive

    async def _splice(self, conn: _Connection, response_head: bytes, stream: TunnelStream) -> None:
        """After a 101 answer (validated by _wait_response): carry raw bytes both ways until
        either side is done."""
        client = conn.client
        await conn.send(response_head)

        async def upstream() -> None:
            try:
                if conn.buf:
                    await stream.send_data(bytes(conn.buf))
                    conn.buf.clear()
                while data := await client.receive_some(_RECEIVE_SIZE):
                    await stream.send_data(bytes(data))
                stream.send_end()
            except (trio.BrokenResourceError, trio.ClosedResourceError, StreamReset, UplinkClosed):
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upstream)
            try:
                while data := await stream.receive_data():
                    await conn.send(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, StreamReset, UplinkClosed):
                pass
            nursery.cancel_scope.cancel()


def _admit(access: AccessPolicy, request: http.RequestHead, peer: bytes) -> re.Pattern[bytes]:
    """Check a request against its session's access policy (PROTOCOL.md §3.1.1) and return
    the field lines to drop from it (the credential the policy used, too); raise _Answer
    400/401/403 if refused.

    The address is the TCP peer the entry accepted, never a header a visitor could forge.
    """
    credentials = request.get_all(CREDENTIAL_HEADER) if access.uses_credentials else []
    if len(credentials) > 1:
        raise _Answer(400, "the request has more than one Authorization header")
    refusal = access.check(credentials[0] if credentials else None, peer.decode("ascii", "replace"))
    if refusal is not None:
        headers = b"".join(b"%s: %s\r\n" % field for field in refusal.headers)
        raise _Answer(refusal.status, refusal.message, headers)
    return _DROP_WITH_CREDENTIAL_RE if access.uses_credentials else _DROP_RE


def _forwarding_lines(
    request: http.RequestHead,
    peer: tuple[bytes, int],
    proto: bytes,
    host: bytes,
    trusted: tuple[IPNetwork, ...],
) -> bytes:
    """X-Forwarded-For/-Proto/-Host and Forwarded (RFC 7239) lines, ending the head.

    From an untrusted peer, visitor-supplied values are ignored (their lines were cut): the
    peer is the client. From a trusted proxy its X-Forwarded-For chain is kept and the peer
    appended; the client is the last element that is not itself a trusted proxy, and
    ``Forwarded`` starts at it, so its first ``for=`` is the address the agent uses as the
    client (PROTOCOL.md §4.2); what lies left of it is forgeable and not repeated there.
    """
    peer_ip, peer_port = peer
    # The peer's address comes from getpeername(): formatted, not parsed (the hot path).
    if peer_ip == b"unknown":
        hops = [b"for=unknown"]
    else:
        hops = [
            (b'for="[%s]:%d"' if peer_ip.find(b":") >= 0 else b'for="%s:%d"') % (peer_ip, peer_port)
        ]
    chain: list[bytes] = []
    if trusted and _is_trusted(peer_ip, trusted):
        chain = [e.strip() for v in request.get_all(b"x-forwarded-for") for e in v.split(b",")]
        chain = [e for e in chain if e]
        client = len(chain) - 1
        while client > 0 and len(chain) - client <= _MAX_TRUSTED_HOPS:
            if not _is_trusted(chain[client], trusted):
                break
            client -= 1
        if chain:
            hops = [_node(e) for e in chain[max(client, 0) :]] + hops
        given_proto = (request.get(b"x-forwarded-proto") or b"").partition(b",")[0].strip()
        if given_proto.lower() in (b"http", b"https"):
            proto = given_proto.lower()
        given_host = (request.get(b"x-forwarded-host") or b"").partition(b",")[0].strip()
        if _FORWARDED_HOST_RE.fullmatch(given_host):
            host = given_host
    hops[0] += b';host="%s";proto=%s' % (host.replace(b'"', b"").replace(b"\\", b""), proto)
    return (
        b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nX-Forwarded-Host: %s\r\n"
        b"Forwarded: %s\r\n\r\n" % (b", ".join([*chain, peer_ip]), proto, host, b", ".join(hops))
    )


def _ip(text: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in an X-Forwarded-For element (``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:80``,
    ``::1``), IPv4-mapped IPv6 as IPv4; None if it is none."""
    name = text.decode("ascii", "replace")
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_trusted(text: bytes, trusted: tuple[IPNetwork, ...]) -> bool:
    address = _ip(text)
    return address is not None and any(address in network for network in trusted)


def _node(text: bytes) -> bytes:
    """``for=`` and the address of an X-Forwarded-For element (RFC 7239 §6), without a
    port: ``for=192.0.2.1``, ``for="[::1]"``, or ``for=unknown`` for what is none."""
    address = _ip(text)
    if address is None:
        return b"for=unknown"
    return (
        b'for="[%s]"' % str(address).encode()
        if address.version == 6
        else b"for=%s" % (str(address).encode())
    )


class _Exchange:
    """One request in flight through the tunnel."""

    __slots__ = ("deadline", "keep_alive", "request", "session_id", "stream", "upgrade")

    def __init__(
        self,
        session_id: str,
        request: http.RequestHead,
        stream: TunnelStream,
        upgrade: bool,
        deadline: float,
        keep_alive: bool,
    ) -> None:
        self.session_id = session_id
        self.request = request
        self.stream = stream
        self.upgrade = upgrade  # the request asked for a protocol switch (PROTOCOL.md §4.4)
        self.deadline = deadline  # for the response head (the request timeout)
        self.keep_alive = keep_alive  # the request lets the connection persist


def _upgrade_of(request: http.RequestHead) -> bytes | None:
    """The protocol a request asks to switch to (``Upgrade`` named in ``Connection``)."""
    upgrade = request.get(b"upgrade")
    if upgrade is None or request.http_version != b"1.1":
        return None
    return upgrade if b"upgrade" in http.connection_tokens(request) else None


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
            while not reader.done:
                if buf:
                    before = len(buf)
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
                    if len(buf) < before:
                        continue  # progress: done now, or more of buf to read
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
