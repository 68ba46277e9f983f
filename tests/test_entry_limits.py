"""Fair use of the entry: connection caps for visitors and agents, the per-address cap, and
the head, idle and write timeouts (README "Fair use: limits for visitors and agents").

Caps run over real sockets on 127.0.0.1 (the per-address cap keys on the TCP peer address);
timers run under ``autojump_clock`` over memory streams, plus one real-socket head timeout
that asserts nothing about time (STYLE.md §8). The bookkeeping class is tested without trio.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import h11
import pytest
import trio
import trio.testing

import tunnel2
from tunnel2 import HandshakeError, ServerConfig, TunnelServer
from tunnel2._util import compiled_modules
from tunnel2.cli import _server_config, build_parser, main
from tunnel2.entry import _AGENT, _SPARE, _UNCOUNTED, _VISITOR, ProxyEntry, _Connection, _Limits
from tunnel2.testing import MemoryTunnel, open_memory_tunnel

if TYPE_CHECKING:
    from tunnel2.asgi import AsgiApp

Scope = MutableMapping[str, Any]

# A TUNNEL2_COMPILE=1 build's classes do not let a test replace a method: the tests that
# count sweeps so run against the pure-Python build only (.ci/run runs both).
PATCHES_SWEEP = pytest.mark.skipif(
    "tunnel2.entry" in compiled_modules(), reason="patches ProxyEntry._sweep; entry is compiled"
)


async def ok_app(scope: Scope, receive: Any, send: Any) -> None:
    """Answers every request with ``ok`` (Content-Length framed)."""
    while (await receive()).get("more_body"):
        pass
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


# --- the bookkeeping, without trio --------------------------------------------------------


def connection(peer: bytes = b"unknown") -> _Connection:
    # (an entry of a relay that is not running: the bookkeeping tested here does not send)
    entry = ProxyEntry(TunnelServer(ServerConfig(), base_url="http://127.0.0.1"))
    conn = _Connection(trio.testing.memory_stream_pair()[1], entry)
    conn.peer = peer
    return conn


def test_connections_past_the_visitor_slots_take_spare_agent_slots() -> None:
    limits = _Limits(
        ServerConfig(
            max_visitor_connections=2, max_agent_connections=1, max_connections_per_ip=None
        )
    )
    first, second, spare, extra = (connection() for _ in range(4))
    assert [limits.admit(c) for c in (first, second, spare)] == [None, None, None]
    assert (first.pool, second.pool, spare.pool) == (_VISITOR, _VISITOR, _SPARE)
    refused = limits.admit(extra)
    assert refused is not None
    assert refused.startswith(b"HTTP/1.1 503 ")
    assert b"maximum of 2 visitor and 1 agent connections" in refused
    assert extra.pool == _UNCOUNTED
    # The spare's head was a visitor's while the visitor slots are still full.
    full = limits.seat_visitor(spare)
    assert full is not None
    assert b"maximum of 2 visitor connections" in full
    limits.release(first)
    assert limits.seat_visitor(spare) is None
    assert (spare.pool, limits.visitors, limits.agents) == (_VISITOR, 2, 0)
    for conn in (second, spare, extra):
        limits.release(conn)
    assert (limits.visitors, limits.agents) == (0, 0)


def test_agents_leave_the_visitor_slots_and_have_their_own_cap() -> None:
    limits = _Limits(ServerConfig(max_visitor_connections=2, max_agent_connections=1))
    agent, other, visitor = connection(b"10.0.0.1"), connection(b"10.0.0.1"), connection()
    for conn in (agent, other):
        assert limits.admit(conn) is None
    assert limits.seat_agent(agent) is None
    assert (agent.pool, limits.visitors, limits.agents) == (_AGENT, 1, 1)
    assert limits.by_peer == {b"10.0.0.1": 1}  # agents are not counted per address
    assert limits.admit(visitor) is None  # the agent freed its visitor slot
    refused = limits.seat_agent(other)
    assert refused is not None
    assert b"maximum of 1 agents" in refused
    for conn in (agent, other, visitor):
        limits.release(conn)
    assert (limits.visitors, limits.agents, limits.by_peer) == (0, 0, {})


def test_one_address_may_hold_max_connections_per_ip() -> None:
    limits = _Limits(ServerConfig(max_connections_per_ip=2))
    mine = [connection(b"10.0.0.1") for _ in range(3)]
    assert [limits.admit(c) for c in mine[:2]] == [None, None]
    refused = limits.admit(mine[2])
    assert refused is not None
    assert refused.startswith(b"HTTP/1.1 429 ")
    assert b"2 connections from 10.0.0.1 are open" in refused
    assert limits.admit(connection(b"10.0.0.2")) is None  # another address is not affected
    unknown = [connection() for _ in range(5)]  # in-memory streams have no address
    assert [limits.admit(c) for c in unknown] == [None] * 5
    limits.release(mine[0])
    assert limits.admit(mine[2]) is None
    assert limits.by_peer == {b"10.0.0.1": 2, b"10.0.0.2": 1}


def test_no_per_address_cap_when_max_connections_per_ip_is_none() -> None:
    limits = _Limits(ServerConfig(max_connections_per_ip=None))
    assert all(limits.admit(connection(b"10.0.0.1")) is None for _ in range(300))
    assert limits.by_peer == {}


@pytest.mark.parametrize(
    "field",
    [
        "max_visitor_connections",
        "max_agent_connections",
        "max_connections_per_ip",
        "head_timeout",
        "write_timeout",
    ],
)
def test_config_refuses_caps_and_timeouts_below_one_or_zero(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ServerConfig(**{field: 0})  # type: ignore[arg-type]


# --- timers, over memory streams under autojump_clock --------------------------------------


@asynccontextmanager
async def ok_tunnel(config: ServerConfig) -> AsyncIterator[MemoryTunnel]:
    async with open_memory_tunnel(ok_app, config=config, asgi_loop="trio") as tunnel:
        yield tunnel


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    received = bytearray()
    while chunk := await stream.receive_some(65536):
        received += chunk
    return bytes(received)


async def read_ok_response(stream: trio.abc.ReceiveStream) -> None:
    received = bytearray()
    while not received.endswith(b"\r\n\r\nok"):
        chunk = await stream.receive_some(65536)
        assert chunk, f"closed after {bytes(received)!r}"
        received += chunk
    assert received.startswith(b"HTTP/1.1 200 ")


async def served_client(
    tunnel: MemoryTunnel, *, extra: bytes = b""
) -> tuple[trio.abc.HalfCloseableStream, bytes]:
    """A client connection whose first request (returned) was answered, so it is kept
    alive; ``extra`` is sent right behind that request."""
    client = tunnel.open_client_stream()
    request = f"GET {tunnel.path_prefix}/ HTTP/1.1\r\nHost: a\r\n\r\n".encode()
    await client.send_all(request + extra)
    await read_ok_response(client)
    return client, request


async def test_fresh_connection_that_sends_nothing_gets_408_within_the_head_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The idle timeout is far away: only the head timeout, running from accept, ends this.
    with trio.fail_after(100):
        async with ok_tunnel(ServerConfig(head_timeout=5, idle_timeout=1000)) as tunnel:
            answer = await read_to_eof(tunnel.open_client_stream())
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"Connection: close\r\n" in answer
    assert b"X-Tunnel2-Error: the request head did not arrive within 5s\r\n" in answer


async def test_slowloris_head_on_a_keep_alive_connection_is_cut_with_408(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = ServerConfig(head_timeout=5, idle_timeout=1000)
    with trio.fail_after(500):
        async with ok_tunnel(config) as tunnel:
            client, request = await served_client(tunnel)
            sent = 0
            async with trio.open_nursery() as nursery:

                async def trickle() -> None:
                    # One byte a second: each byte is well within any idle timeout.
                    nonlocal sent
                    for byte in request[:-2] + b"X-Pad: " + b"a" * 200:
                        await trio.sleep(1)
                        try:
                            await client.send_all(bytes([byte]))
                        except trio.BrokenResourceError:
                            return
                        sent += 1

                nursery.start_soon(trickle)
                answer = await read_to_eof(client)
                nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert sent < len(request)  # cut while the head was still trickling in


async def test_pipelined_partial_head_is_cut_with_408(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The start of a second head arrives with the first request: once the first is
    # answered, its head timeout runs, not the idle timeout.
    with trio.fail_after(100):
        async with ok_tunnel(ServerConfig(head_timeout=5, idle_timeout=1000)) as tunnel:
            client, _ = await served_client(tunnel, extra=b"GET / HTTP")
            answer = await read_to_eof(client)
    assert answer.startswith(b"HTTP/1.1 408 ")


async def test_idle_keep_alive_connection_waits_idle_timeout_and_closes_silently(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(500):
        async with ok_tunnel(ServerConfig(head_timeout=5, idle_timeout=60)) as tunnel:
            client, request = await served_client(tunnel)
            await trio.sleep(30)  # longer than the head timeout, within the idle timeout
            await client.send_all(request)
            await read_ok_response(client)
            assert await read_to_eof(client) == b""  # closed after idle_timeout, no 408


@PATCHES_SWEEP
async def test_timers_of_closed_connections_cost_a_sweep_a_tick_not_one_each(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each connection leaves its head timeout's heap entry behind when it closes; 40 of them
    # come due within 0.4 s. The sweep (tick 0.25 s here) takes them a tick at a time.
    with trio.fail_after(100):
        async with ok_tunnel(ServerConfig(head_timeout=5, idle_timeout=1000)) as tunnel:
            entry = tunnel.entry
            sweeps: list[float] = []
            sweep = entry._sweep

            def counted(now: float, write_timeout: float) -> None:
                sweeps.append(now)
                sweep(now, write_timeout)

            monkeypatch.setattr(entry, "_sweep", counted)
            for _ in range(40):
                client, _ = await served_client(tunnel)
                await client.aclose()
                await trio.sleep(0.01)
            await trio.sleep(10)
            assert entry.connections == 0
    late = [t for t in sweeps if t >= 4.9]
    assert 1 <= len(late) <= 5, late


WRITE_TIMEOUT = 10.0


@asynccontextmanager
async def lockstep_download(app: AsgiApp) -> AsyncIterator[tuple[MemoryTunnel, trio.abc.Stream]]:
    """A tunnel to ``app`` and a visitor that sent ``GET /`` over a lockstep stream: a write
    blocks until the visitor reads, as over TCP once the socket buffers are full."""
    config = ServerConfig(write_timeout=WRITE_TIMEOUT, idle_timeout=1000, request_timeout=1000)
    async with (
        open_memory_tunnel(app, config=config, asgi_loop="trio") as tunnel,
        trio.open_nursery() as nursery,
    ):
        client, relay_side = trio.testing.lockstep_stream_pair()
        nursery.start_soon(tunnel.entry.handle_connection, relay_side)
        await client.send_all(f"GET {tunnel.path_prefix}/ HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        yield tunnel, client
        nursery.cancel_scope.cancel()


async def test_visitor_that_never_reads_is_closed_and_the_agent_worker_freed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler_done = trio.Event()

    async def endless_app(scope: Scope, receive: Any, send: Any) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            while True:
                await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
        finally:
            handler_done.set()

    with trio.fail_after(200):
        async with lockstep_download(endless_app) as (tunnel, client):
            await handler_done.wait()
            uplink = tunnel.agent.uplink
            assert uplink is not None
            # No event to wait on for these: poll (in virtual time).
            while uplink.statistics().open_streams or tunnel.entry.connections:  # noqa: ASYNC110
                await trio.sleep(1)
            # The relay closed the connection: what the visitor finds is at most the start of
            # the response it never read.
            tail = await read_to_eof(client)
            assert not tail or tail.startswith(b"HTTP/1.1 200 ")


async def test_slow_visitor_that_keeps_reading_gets_the_whole_body(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The write timeout is about writes that make no progress, not about the whole response:
    # this download takes far longer than write_timeout.
    size = 1024 * 1024

    async def big_app(scope: Scope, receive: Any, send: Any) -> None:
        headers = [(b"content-length", b"%d" % size)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for _ in range(size // 65536):
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    with trio.fail_after(1000):
        async with lockstep_download(big_app) as (_tunnel, client):
            conn = h11.Connection(h11.CLIENT)
            conn.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
            received = reads = 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    await trio.sleep(2)
                    conn.receive_data(bytes(await client.receive_some(65536)))
                    reads += 1
                elif isinstance(event, h11.Data):
                    received += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert received == size
            assert reads * 2 > 3 * WRITE_TIMEOUT  # a reader much slower than the timeout


# --- over real sockets ----------------------------------------------------------------------


async def start_relay(nursery: trio.Nursery, **config: Any) -> TunnelServer:
    server: TunnelServer = await nursery.start(
        tunnel2.serve_tunnel_server, ServerConfig(port=0, **config)
    )
    return server


class Visitor:
    """A raw keep-alive client connection to the relay."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def connect(cls, server: TunnelServer) -> Visitor:
        return cls(await trio.open_tcp_stream("127.0.0.1", server.port))

    async def get(self, url: str) -> tuple[int, bytes]:
        """GET ``url``'s path on this connection; return the status and the body."""
        path = "/" + url.split("/", 3)[3]
        await self.stream.send_all(f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target=path, headers=[("Host", "relay")]))
        conn.send(h11.EndOfMessage())
        status, body = 0, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, body

    async def aclose(self) -> None:
        await self.stream.aclose()


@asynccontextmanager
async def open_visitors(server: TunnelServer, count: int, url: str) -> AsyncIterator[list[Visitor]]:
    """``count`` keep-alive visitor connections, each served one GET of ``url`` (so each
    holds its slot for sure), all closed on exit."""
    visitors: list[Visitor] = []
    try:
        for _ in range(count):
            visitors.append(await Visitor.connect(server))
            assert await visitors[-1].get(url) == (200, b"ok")
        yield visitors
    finally:
        for visitor in visitors:
            await visitor.aclose()


async def fetch(server: TunnelServer, url: str) -> tuple[int, bytes]:
    """One GET on a fresh connection."""
    visitor = await Visitor.connect(server)
    try:
        return await visitor.get(url)
    finally:
        await visitor.aclose()


async def fetch_until_ok(server: TunnelServer, url: str) -> tuple[int, bytes]:
    """GET until the answer is 200 (the relay notices a closed connection soon, not at
    once); at most 100 tries. A refusal at accept may reach us as a reset."""
    status, body = 0, b""
    for _ in range(100):
        try:
            status, body = await fetch(server, url)
        except trio.BrokenResourceError:
            continue
        if status == 200:
            break
        await trio.sleep(0.05)
    return status, body


async def read_from_fresh_connection(server: TunnelServer, data: bytes) -> bytes:
    """Send ``data`` on a new connection; return what arrives until the relay closes it."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    try:
        await stream.send_all(data)
        return await read_to_eof(stream)
    finally:
        await stream.aclose()


async def test_partial_head_over_a_socket_is_answered_408(nursery: trio.Nursery) -> None:
    relay = await start_relay(nursery, head_timeout=0.5)
    with trio.fail_after(10):
        answer = await read_from_fresh_connection(relay, b"GET /session/x/ HTTP/1.1\r\nHost: a\r\n")
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"did not arrive within 0.5s" in answer


async def test_full_visitor_side_still_lets_agents_in(nursery: trio.Nursery) -> None:
    relay = await start_relay(nursery, max_visitor_connections=3, max_agent_connections=2)
    with trio.fail_after(20):
        # Agents take no visitor slot: three visitors are served beside the agent.
        async with (
            tunnel2.open_tunnel(relay.base_url, ok_app, asgi_loop="trio") as first,
            open_visitors(relay, 3, first.public_url) as visitors,
        ):
            status, body = await fetch(relay, first.public_url)
            assert status == 503
            assert b"maximum of 3 visitor connections" in body
            # The visitor side is full, yet an agent connects and its session serves.
            async with tunnel2.open_tunnel(relay.base_url, ok_app, asgi_loop="trio") as second:
                await visitors[0].aclose()
                assert await fetch_until_ok(relay, second.public_url) == (200, b"ok")
                with pytest.raises(HandshakeError, match="503"):
                    async with tunnel2.open_tunnel(relay.base_url, ok_app, asgi_loop="trio"):
                        pass  # a third agent: past max_agent_connections


async def test_one_address_may_hold_max_connections_per_ip_visitors(
    nursery: trio.Nursery,
) -> None:
    relay = await start_relay(nursery, max_connections_per_ip=2)
    with trio.fail_after(20):
        # The agent also comes from 127.0.0.1, and is not counted once identified.
        async with (
            tunnel2.open_tunnel(relay.base_url, ok_app, asgi_loop="trio") as agent,
            open_visitors(relay, 2, agent.public_url) as visitors,
        ):
            # Answered at once; sending nothing, we are sure to read it before the close.
            answer = await read_from_fresh_connection(relay, b"")
            assert answer.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
            assert b"2 connections from 127.0.0.1 are open" in answer
            await visitors[0].aclose()
            assert await fetch_until_ok(relay, agent.public_url) == (200, b"ok")


# --- the command line -------------------------------------------------------------------------


def test_cli_fair_use_options_reach_the_config() -> None:
    args = build_parser().parse_args(
        [
            "server",
            "--max-visitor-connections",
            "7",
            "--max-agent-connections",
            "3",
            "--max-connections-per-ip",
            "5",
            "--head-timeout",
            "2.5",
            "--write-timeout",
            "4",
            "--idle-timeout",
            "9",
        ]
    )
    config = _server_config(args)
    assert (
        config.max_visitor_connections,
        config.max_agent_connections,
        config.max_connections_per_ip,
        config.head_timeout,
        config.write_timeout,
        config.idle_timeout,
    ) == (7, 3, 5, 2.5, 4.0, 9.0)
    defaults = _server_config(build_parser().parse_args(["server", "--no-state"]))
    assert defaults == ServerConfig()
    no_cap = build_parser().parse_args(["server", "--max-connections-per-ip", "0"])
    assert _server_config(no_cap).max_connections_per_ip is None


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-visitor-connections", "0", "must be at least 1"),
        ("--max-agent-connections", "-1", "must be at least 1"),
        ("--max-connections-per-ip", "many", "is not an integer"),
        ("--head-timeout", "0", "must be positive"),
        ("--write-timeout", "-5", "must be positive"),
        ("--idle-timeout", "soon", "is not a number"),
    ],
)
def test_cli_refuses_bad_fair_use_values(
    option: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["server", f"{option}={value}"])
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("tunnel2 server: error: argument " + option), last_line
    assert message in last_line


@PATCHES_SWEEP
async def test_timeout_sweep_costs_what_is_due_not_what_is_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Idle keep-alive connections do not make the sweep tick: it sleeps till a deadline is
    due (at most one look per deadline armed, not one per 0.5 s over every connection),
    and still closes each connection on time."""
    with trio.fail_after(500):
        async with ok_tunnel(ServerConfig(head_timeout=5, idle_timeout=60)) as tunnel:
            entry = tunnel.entry
            clients = []
            for _ in range(20):
                clients.append((await served_client(tunnel))[0])
                await trio.sleep(1)
            sweeps = 0
            sweep = entry._sweep

            def counted(now: float, write_timeout: float) -> None:
                nonlocal sweeps
                sweeps += 1
                sweep(now, write_timeout)

            entry._sweep = counted  # type: ignore[method-assign]
            await trio.testing.wait_all_tasks_blocked()
            assert not entry._watched
            assert entry._sweep_long
            assert len(entry._timers) <= 2 * len(entry._connections)
            started = trio.current_time()
            for client in clients:
                assert await read_to_eof(client) == b""  # each closed after its idle timeout
            # 40 s of mock time: ticking every 0.5 s would have been 80 sweeps.
            assert trio.current_time() - started >= 35
            assert sweeps <= 2 * len(clients)
            await trio.testing.wait_all_tasks_blocked()
            assert not entry._connections
            assert entry._sweep_until == math.inf  # nothing left to look at


async def test_a_request_wakes_the_sleeping_sweep_to_watch_for_its_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A request that waits for its response while the sweep sleeps (nothing was watched)
    is watched at once: its request timeout still answers 504."""

    async def slow_app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":  # the lifespan scope returns: no lifespan
            await trio.sleep_forever()

    config = ServerConfig(head_timeout=5, idle_timeout=1000, request_timeout=30)
    with trio.fail_after(500):
        async with open_memory_tunnel(slow_app, config=config, asgi_loop="trio") as tunnel:
            await trio.testing.wait_all_tasks_blocked()
            assert tunnel.entry._sweep_long
            client = tunnel.open_client_stream()
            await client.send_all(f"GET {tunnel.path_prefix}/ HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            answer = await read_to_eof(client)
    assert answer.startswith(b"HTTP/1.1 504 ")
