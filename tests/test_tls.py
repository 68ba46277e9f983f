"""TLS on both legs: an HTTPS/WSS relay, agents that verify it, https backends.

Certificates come from trustme (a throwaway CA per test). Everything binds 127.0.0.1 port 0 and
is bounded with ``trio.fail_after``; no test asserts on timing (STYLE.md §8).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import socket
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import h11
import pytest
import trio
import trio.testing
import trustme
from httpbackend import Backend, Reply, Request, decode_echo, pattern_sha256, route, serve_backend
from test_cli import CLI, run
from test_e2e_sockets import raw_exchange
from test_transports import carry_a_burst

import tunnel2
from tunnel2 import ServerConfig, TunnelServer
from tunnel2._sockets import (
    CanSendNowait,
    CanTellPeerClosed,
    FastSocketStream,
    HasPeerAddress,
    can_send_nowait,
    can_tell_peer_closed,
    connect_tcp,
    has_peer_address,
)
from tunnel2._tls import TlsStream, wrap_client
from tunnel2.agent import websocket_connector
from tunnel2.transports import WsprotoTransport, accept_websocket, connect_websocket

TIMEOUT = 15


# --- certificates ---------------------------------------------------------------------------


@attrs.frozen
class Pki:
    """A CA and a certificate it issued for 127.0.0.1 and localhost, also as PEM files."""

    ca: trustme.CA
    cert: trustme.LeafCert
    ca_file: str
    cert_file: str
    key_file: str

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(context)
        return context

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


def make_pki(directory: Path) -> Pki:
    directory.mkdir()
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    for pem in cert.cert_chain_pems:
        pem.write_to_path(str(directory / "cert.pem"), append=True)
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    return Pki(
        ca, cert, str(directory / "ca.pem"), str(directory / "cert.pem"), str(directory / "key.pem")
    )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def other_pki(tmp_path: Path) -> Pki:
    """A second, unrelated CA: trusting it is trusting the wrong one."""
    return make_pki(tmp_path / "other")


# --- a small HTTPS client (h11 over trio's SSLStream) ---------------------------------------


@attrs.frozen
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def echo(self) -> Request:
        assert self.status == 200, (self.status, self.body[:300])
        return decode_echo(self.body)


async def send_request(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    url: str,
    method: str,
    body: bytes,
    headers: Iterable[tuple[bytes, bytes]],
) -> None:
    parts = urllib.parse.urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    fields = [(b"Host", parts.netloc.encode()), *headers]
    if body:
        fields.append((b"Content-Length", b"%d" % len(body)))
    data = conn.send(h11.Request(method=method, target=target, headers=fields))
    assert data is not None
    if body:
        data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def read_response(stream: trio.abc.Stream, conn: h11.Connection) -> Response:
    head: h11.Response | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return Response(head.status_code, dict(head.headers), bytes(body))


@asynccontextmanager
async def open_client(url: str, context: ssl.SSLContext | None) -> AsyncIterator[trio.abc.Stream]:
    """A connection to ``url``'s host: TLS trusting ``context`` for https, else plain TCP."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    stream: trio.abc.Stream
    if parts.scheme == "https":
        assert context is not None
        stream = await trio.open_ssl_over_tcp_stream(
            parts.hostname, parts.port, ssl_context=context, https_compatible=True
        )
    else:
        stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    try:
        yield stream
    finally:
        await trio.aclose_forcefully(stream)


async def fetch(
    url: str,
    context: ssl.SSLContext | None = None,
    method: str = "GET",
    body: bytes = b"",
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> Response:
    """One request on a fresh connection."""
    async with open_client(url, context) as stream:
        conn = h11.Connection(h11.CLIENT)
        await send_request(stream, conn, url, method, body, headers)
        return await read_response(stream, conn)


# --- fixtures ---------------------------------------------------------------------------------


async def start_tls_relay(nursery: trio.Nursery, pki: Pki, **config: object) -> TunnelServer:
    server: TunnelServer = await nursery.start(
        functools.partial(
            tunnel2.serve_tunnel_server,
            ServerConfig(port=0, **config),  # type: ignore[arg-type]
            ssl_context=pki.server_context(),
        )
    )
    return server


@pytest.fixture
async def backend(nursery: trio.Nursery) -> Backend:
    started: Backend = await nursery.start(serve_backend, "echo")
    return started


async def wait_until(predicate: Callable[[], bool]) -> None:
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(0.02)


# --- the stream layer --------------------------------------------------------------------------


@asynccontextmanager
async def tls_pair(pki: Pki) -> AsyncIterator[tuple[TlsStream, trio.SSLStream[trio.SocketStream]]]:
    """A server-side TlsStream (over a FastSocketStream) and a trio SSL client, handshaken."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        client_tcp = await trio.open_tcp_stream("127.0.0.1", port)
        accepted, _ = listener.accept()
    finally:
        listener.close()
    server = TlsStream(FastSocketStream(accepted), pki.server_context(), server_side=True)
    client = trio.SSLStream(client_tcp, pki.client_context(), server_hostname="127.0.0.1")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            await client.do_handshake()
        yield server, client
    finally:
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)


async def test_tls_stream_keeps_peer_address_and_peer_closed(pki: Pki) -> None:
    with trio.fail_after(TIMEOUT):
        async with tls_pair(pki) as (server, client):
            assert isinstance(server, HasPeerAddress)
            assert isinstance(server, CanTellPeerClosed)
            assert isinstance(server, CanSendNowait)
            # What TLS cannot do is not claimed (callers then take the ordinary path).
            abilities: object = server
            assert not isinstance(abilities, trio.abc.HalfCloseableStream)
            # The fast checks the entry and transports use agree (and remember per class).
            for _ in range(2):
                assert has_peer_address(server)
                assert can_tell_peer_closed(server)
                assert can_send_nowait(server)
                assert has_peer_address(server.transport)
                assert can_send_nowait(server.transport)
                assert not has_peer_address(client)
            assert server.getpeername() == "127.0.0.1"
            await client.send_all(b"ping")
            assert await server.receive_some(10) == b"ping"
            await server.send_all(b"pong")
            assert await client.receive_some(10) == b"pong"
            assert not server.peer_closed()
            await client.send_all(b"unread")  # data waiting is not a hang-up
            await trio.lowlevel.wait_readable(server.transport.socket)
            assert not server.peer_closed()
            # A spec-compliant close: close_notify (unread, before the end), then FIN.
            await client.aclose()
            await wait_until(server.peer_closed)


async def test_tls_stream_notices_a_peer_that_closes_without_close_notify(pki: Pki) -> None:
    with trio.fail_after(TIMEOUT):
        async with tls_pair(pki) as (server, client):
            assert not server.peer_closed()
            await client.transport_stream.aclose()
            await wait_until(server.peer_closed)


def tls_socket_pair(pki: Pki) -> tuple[TlsStream, TlsStream]:
    """A client and a server TlsStream over a socket pair (the handshake runs on first use)."""
    left, right = socket.socketpair()
    client = TlsStream(
        FastSocketStream(left), pki.client_context(), server_side=False, server_hostname="127.0.0.1"
    )
    server = TlsStream(FastSocketStream(right), pki.server_context(), server_side=True)
    assert server.getpeername() == "unknown"  # a socket pair has no peer address
    return client, server


async def receive_exactly(stream: trio.abc.Stream, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        data = await stream.receive_some(65536)
        assert data, f"EOF after {len(received)} of {size} bytes"
        received += data
    return bytes(received)


async def test_tls_stream_carries_big_transfers_both_ways_at_once(pki: Pki) -> None:
    client, server = tls_socket_pair(pki)
    up, down = bytes(range(256)) * 40_000, bytes(range(255, -1, -1)) * 40_000  # ~10 MB each
    got: dict[str, bytes] = {}

    async def receive(name: str, stream: TlsStream, size: int) -> None:
        got[name] = await receive_exactly(stream, size)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, up)
            nursery.start_soon(server.send_all, down)
            nursery.start_soon(receive, "server", server, len(up))
            nursery.start_soon(receive, "client", client, len(down))
        assert got == {"server": up, "client": down}
        await client.aclose()
        assert await server.receive_some(10) == b""  # the end without a close_notify
        assert await server.receive_some(10) == b""
        await server.aclose()


def pending(stream: CanSendNowait) -> bool:
    return stream.send_pending


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_send_nowait_keeps_the_rest_for_the_next_send_all(pki: Pki, tls: bool) -> None:
    client: FastSocketStream | TlsStream
    server: FastSocketStream | TlsStream
    if tls:
        client, server = tls_socket_pair(pki)
    else:
        left, right = socket.socketpair()
        client, server = FastSocketStream(left), FastSocketStream(right)
    big = bytes(range(256)) * 40_000  # more than the socket buffers take at once
    with trio.fail_after(TIMEOUT):
        if isinstance(client, TlsStream) and isinstance(server, TlsStream):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.do_handshake)
                nursery.start_soon(server.do_handshake)
        assert not pending(client)
        client.send_nowait(big)
        assert pending(client)
        client.send_nowait(b"after")  # queued behind the rest, never ahead of it
        received: list[bytes] = []

        async def drain() -> None:
            received.append(await receive_exactly(server, len(big) + 10))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            await client.send_all(b"")  # flushes what is pending
            assert not pending(client)
            await client.send_all(b"last.")
        assert received == [big + b"afterlast."]
        await client.aclose()
        await server.aclose()


async def test_tls_stream_errors_keep_trios_meanings(pki: Pki) -> None:
    client, server = tls_socket_pair(pki)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.receive_some, 10)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await server.receive_some(10)
            await client.send_all(b"x")
        # Closing while another task waits to receive: that task gets ClosedResourceError.
        async with trio.open_nursery() as nursery:

            async def receive_closed() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await server.receive_some(10)

            nursery.start_soon(receive_closed)
            await trio.testing.wait_all_tasks_blocked()
            await server.aclose()
        await server.aclose()  # idempotent
        for call in (server.send_all(b"x"), server.receive_some(10)):
            with pytest.raises(trio.ClosedResourceError):
                await call
        with pytest.raises(trio.ClosedResourceError):
            server.send_nowait(b"x")
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"y" * 10_000_000)  # the peer is gone
        await client.aclose()


async def handshake_then_wait(stream: trio.SSLStream[trio.SocketStream]) -> None:
    with contextlib.suppress(trio.BrokenResourceError):
        await stream.do_handshake()
        await trio.sleep_forever()


async def test_wrap_client_names_the_verification_failure(pki: Pki, other_pki: Pki) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                trio.serve_ssl_over_tcp, handshake_then_wait, 0, pki.server_context()
            )
            port = listeners[0].transport_listener.socket.getsockname()[1]
            tcp = await connect_tcp("127.0.0.1", port)
            with pytest.raises(trio.BrokenResourceError) as info:
                await wrap_client(tcp, other_pki.client_context(), "127.0.0.1")
            message = str(info.value)
            assert "127.0.0.1" in message
            assert "certificate verify failed: unable to get local issuer certificate" in message
            assert tcp.socket.fileno() == -1  # closed on failure
            nursery.cancel_scope.cancel()


# --- the relay over HTTPS and WSS ----------------------------------------------------------------


async def test_https_end_to_end_with_tls_files(
    nursery: trio.Nursery, pki: Pki, backend: Backend
) -> None:
    relay: TunnelServer = await nursery.start(
        tunnel2.serve_tunnel_server,
        ServerConfig(port=0, tls_cert=pki.cert_file, tls_key=pki.key_file),
    )
    assert relay.base_url.startswith("https://127.0.0.1:")
    body = bytes(range(256)) * 1000
    with trio.fail_after(TIMEOUT):
        async with tunnel2.open_tunnel(relay.base_url, backend.port, ca_file=pki.ca_file) as agent:
            assert agent.public_url == f"{relay.base_url}/session/{agent.session_id}/"
            response = await fetch(
                agent.public_url + "upload?x=1", pki.client_context(), "POST", body
            )
            seen = response.echo()
            assert seen.target == b"/upload?x=1"
            assert seen.body_length == len(body)
            assert seen.body_sha256 == hashlib.sha256(body).hexdigest()
            assert seen.get_all(b"x-forwarded-proto") == [b"https"]
            assert seen.get_all(b"x-forwarded-for") == [b"127.0.0.1"]
            download = await fetch(agent.public_url + "bytes/1000000", pki.client_context())
            assert download.status == 200
            assert hashlib.sha256(download.body).hexdigest() == pattern_sha256(1_000_000)


async def test_host_based_urls_say_https_too(
    nursery: trio.Nursery, pki: Pki, backend: Backend
) -> None:
    relay = await start_tls_relay(nursery, pki, domain="localhost")
    with trio.fail_after(TIMEOUT):
        async with tunnel2.open_tunnel(relay.base_url, backend.port, ca_file=pki.ca_file) as agent:
            host = f"{agent.session_id}.localhost:{relay.port}"
            assert f"https://{host}/" in agent.public_urls
            # Connected to 127.0.0.1 (what the certificate names); the Host picks the session.
            assert (await fetch(relay.base_url + "/y", pki.client_context())).status == 404
            async with open_client(relay.base_url, pki.client_context()) as stream:
                conn = h11.Connection(h11.CLIENT)
                await send_request(stream, conn, f"https://{host}/y", "GET", b"", ())
                seen = (await read_response(stream, conn)).echo()
            assert seen.target == b"/y"
            assert seen.get_all(b"x-forwarded-proto") == [b"https"]


async def test_agent_redials_over_wss_and_keeps_its_url(
    nursery: trio.Nursery, pki: Pki, backend: Backend
) -> None:
    relay = await start_tls_relay(nursery, pki)
    with trio.fail_after(TIMEOUT):
        async with tunnel2.open_tunnel(relay.base_url, backend.port, ca_file=pki.ca_file) as agent:
            url = agent.public_url
            (old,) = relay.uplinks
            old.close("test")
            await wait_until(lambda: len(relay.uplinks) == 1 and old not in relay.uplinks)
            assert agent.public_url == url
            assert agent.connections == 2
            assert (await fetch(url + "again", pki.client_context())).echo().target == b"/again"


async def test_keep_alive_requests_over_one_https_connection(
    nursery: trio.Nursery, pki: Pki, backend: Backend
) -> None:
    relay = await start_tls_relay(nursery, pki)
    with trio.fail_after(TIMEOUT):
        async with (
            tunnel2.open_tunnel(relay.base_url, backend.port, ca_file=pki.ca_file) as agent,
            open_client(relay.base_url, pki.client_context()) as stream,
        ):
            conn = h11.Connection(h11.CLIENT)
            for i in range(5):
                await send_request(stream, conn, agent.public_url + f"r/{i}", "GET", b"", ())
                assert (await read_response(stream, conn)).echo().target == b"/r/%d" % i
                conn.start_next_cycle()


async def test_a_client_hanging_up_mid_wait_is_noticed_over_tls(
    nursery: trio.Nursery, pki: Pki
) -> None:
    # ProxyEntry.run_timeouts asks the stream (CanTellPeerClosed); over TLS the client's
    # close_notify sits unread before the end, and the hang-up must still be seen long before
    # request_timeout.
    relay = await start_tls_relay(nursery, pki, request_timeout=600)
    gate = trio.Event()

    async def gated(request: Request) -> Reply:
        if request.target.endswith(b"/wait"):
            await gate.wait()
        return route(request)

    backend: Backend = await nursery.start(serve_backend, gated)
    with trio.fail_after(TIMEOUT):
        async with tunnel2.open_tunnel(
            relay.base_url, backend.port, ca_file=pki.ca_file, max_concurrent=1, max_queued=0
        ) as agent:
            (uplink,) = relay.uplinks
            stream = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", relay.port, ssl_context=pki.client_context()
            )
            conn = h11.Connection(h11.CLIENT)
            await send_request(stream, conn, agent.public_url + "wait", "GET", b"", ())
            await backend.request_received.wait()
            assert uplink.statistics().open_streams == 1
            await stream.aclose()  # close_notify, then FIN
            await wait_until(lambda: uplink.statistics().open_streams == 0)
            # The agent's only worker is free again.
            response = await fetch(agent.public_url + "next", pki.client_context())
            assert response.echo().target == b"/next"


async def test_plain_http_on_the_tls_port_is_redirected(nursery: trio.Nursery, pki: Pki) -> None:
    relay = await start_tls_relay(nursery, pki)
    netloc = f"127.0.0.1:{relay.port}"
    plain_url = f"http://{netloc}"
    with trio.fail_after(TIMEOUT):
        answer = await raw_exchange(
            plain_url,
            f"GET /session/abc/x?q=1 HTTP/1.1\r\nHost: {netloc}\r\n\r\n".encode(),
        )
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 308 ")
        location = f"https://{netloc}/session/abc/x?q=1"
        assert f"\r\nLocation: {location}\r\n".encode() in head
        assert location.encode() in body
        # Without a Host, the relay's own address; a Host that is no host name is not echoed.
        for request in (b"GET /a HTTP/1.0\r\n\r\n", b"GET /a HTTP/1.1\r\nHost: a.test/b\r\n\r\n"):
            answer = await raw_exchange(plain_url, request)
            assert f"\r\nLocation: {relay.base_url}/a\r\n".encode() in answer
        answer = await raw_exchange(plain_url, b"\x00not http at all\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ")
        assert b"use https://" in answer
        # The relay still serves TLS afterwards.
        response = await fetch(relay.base_url + "/", pki.client_context())
        assert response.status == 404


@pytest.mark.parametrize("silent_clients", [1, 2])
async def test_a_client_that_never_starts_tls_is_dropped_after_the_handshake_timeout(
    nursery: trio.Nursery, pki: Pki, silent_clients: int
) -> None:
    # Also past the per-address cap: its 429 goes out through TLS, which waits for a hello.
    relay = await start_tls_relay(nursery, pki, handshake_timeout=0.3, max_connections_per_ip=1)
    with trio.fail_after(TIMEOUT):
        streams = [
            await trio.open_tcp_stream("127.0.0.1", relay.port) for _ in range(silent_clients)
        ]
        try:
            for stream in streams:
                assert await stream.receive_some(65536) == b""  # closed without a word
        finally:
            for stream in streams:
                await stream.aclose()
        assert (await fetch(relay.base_url + "/", pki.client_context())).status in (404, 429)


async def test_a_plain_agent_on_the_tls_port_is_told_why(nursery: trio.Nursery, pki: Pki) -> None:
    relay = await start_tls_relay(nursery, pki)
    with trio.fail_after(TIMEOUT), pytest.raises(tunnel2.HandshakeError) as info:
        async with tunnel2.open_tunnel(f"http://127.0.0.1:{relay.port}", 9):
            pytest.fail("a ws:// agent got in on a TLS port")
    location = f"https://127.0.0.1:{relay.port}/_tunnel/connect"
    assert f"refused the WebSocket upgrade with HTTP 308 (redirect to {location})" in str(
        info.value
    )


async def test_agent_with_the_wrong_ca_names_the_verification_failure(
    nursery: trio.Nursery, pki: Pki, other_pki: Pki
) -> None:
    relay = await start_tls_relay(nursery, pki)
    with trio.fail_after(TIMEOUT):
        for ca_file in (other_pki.ca_file, None):  # the wrong CA, then the system store
            with pytest.raises(tunnel2.HandshakeError) as info:
                async with tunnel2.open_tunnel(relay.base_url, 9, ca_file=ca_file):
                    pytest.fail("connected to a relay whose certificate is not trusted")
            message = str(info.value)
            assert "certificate verify failed: unable to get local issuer certificate" in message
            assert "127.0.0.1" in message
        assert not relay.uplinks


async def test_agent_checks_the_host_name(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("relay.example").configure_cert(context)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    relay: TunnelServer = await nursery.start(
        functools.partial(tunnel2.serve_tunnel_server, ServerConfig(port=0), ssl_context=context)
    )
    with trio.fail_after(TIMEOUT), pytest.raises(tunnel2.HandshakeError, match="IP address"):
        async with tunnel2.open_tunnel(relay.base_url, 9, ca_file=str(tmp_path / "ca.pem")):
            pytest.fail("accepted a certificate for another name")


async def test_a_relay_that_never_answers_tls_fails_after_connect_timeout(
    nursery: trio.Nursery,
) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (backlog), never answers
    port = silent.getsockname()[1]
    try:
        with trio.fail_after(TIMEOUT), pytest.raises(tunnel2.HandshakeTimeout) as info:
            async with tunnel2.open_tunnel(f"https://127.0.0.1:{port}", 9, connect_timeout=1):
                pytest.fail("connected to nothing")
    finally:
        silent.close()
    assert "no TLS handshake" in str(info.value)
    assert f"127.0.0.1:{port}" in str(info.value)


# --- clear text only on loopback ----------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://192.0.2.1:8000", "ws://192.0.2.1/", "http://relay.example", "http://[2001:db8::1]"],
)
async def test_clear_text_to_a_remote_relay_is_refused_before_dialling(url: str) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(ValueError, match="clear text"):
        async with tunnel2.open_tunnel(url, 9):
            pytest.fail("dialled a clear-text relay")
    # Allowed on purpose: the connector is built (nothing is dialled here).
    websocket_connector(url, insecure_transport=True)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:1", "ws://127.5.6.7:1", "http://localhost:1", "http://[::1]:1"]
)
def test_clear_text_on_loopback_is_allowed(url: str) -> None:
    websocket_connector(url)


# --- https backends -----------------------------------------------------------------------


@pytest.fixture
async def plain_relay(nursery: trio.Nursery) -> TunnelServer:
    relay: TunnelServer = await nursery.start(tunnel2.serve_tunnel_server, ServerConfig(port=0))
    return relay


@pytest.fixture
async def https_backend(nursery: trio.Nursery, pki: Pki) -> Backend:
    backend: Backend = await nursery.start(
        functools.partial(serve_backend, "echo", ssl_context=pki.server_context())
    )
    return backend


async def test_https_backend_verified_with_its_ca(
    plain_relay: TunnelServer, https_backend: Backend, pki: Pki
) -> None:
    relay, backend = plain_relay, https_backend
    target = f"https://127.0.0.1:{backend.port}"
    with trio.fail_after(TIMEOUT):
        async with tunnel2.open_tunnel(
            relay.base_url, target, backend_ca_file=pki.ca_file
        ) as agent:
            for i in range(3):  # pooled: one TLS connection serves them all
                seen = (await fetch(agent.public_url + f"r/{i}")).echo()
                assert seen.target == b"/r/%d" % i
                # The backend's own name (as its certificate says); the client's in X-F-Host.
                assert seen.get_all(b"host") == [f"127.0.0.1:{backend.port}".encode()]
                assert seen.get_all(b"x-forwarded-host") == [f"127.0.0.1:{relay.port}".encode()]
            assert backend.connections == 1


async def test_https_backend_with_an_untrusted_cert(
    plain_relay: TunnelServer, https_backend: Backend
) -> None:
    relay = plain_relay
    target = f"https://127.0.0.1:{https_backend.port}"
    with trio.fail_after(TIMEOUT):
        async with tunnel2.open_tunnel(relay.base_url, target) as agent:
            response = await fetch(agent.public_url + "x")
            assert response.status == 502
            # The visitor learns the kind of failure; the details stay in the agent's log.
            assert b"the TLS handshake with the backend failed" in response.body
        async with tunnel2.open_tunnel(relay.base_url, target, backend_insecure=True) as agent:
            assert (await fetch(agent.public_url + "x")).echo().target == b"/x"


# --- the command line -------------------------------------------------------------------------


async def test_cli_relay_with_tls_and_agent_with_ca_file(
    tmp_path: Path, pki: Pki, backend: Backend
) -> None:
    with trio.fail_after(30):
        async with run(
            *CLI, "server", "--port", "0", "--tls-cert", pki.cert_file, "--tls-key", pki.key_file,
            stderr=tmp_path / "relay.err",
        ) as relay:  # fmt: skip
            line = await relay.readline()
            assert line.startswith("tunnel2 relay on https://127.0.0.1:"), line
            assert "(agents connect to wss://127.0.0.1:" in line, line
            relay_url = line.split()[3]
            async with run(
                *CLI, "http", str(backend.port), "--server", relay_url, "--ca-file", pki.ca_file,
                stderr=tmp_path / "agent.err",
            ) as agent:  # fmt: skip
                line = await agent.readline()
                assert line.startswith(f"Forwarding {relay_url}/session/"), line
                public_url = line.split()[1]
                result = await trio.run_process(
                    ["curl", "-sS", "--max-time", "5", "--cacert", pki.ca_file, public_url + "x"],
                    capture_stdout=True,
                    capture_stderr=True,
                )
                seen = decode_echo(result.stdout)
                assert seen.get_all(b"x-forwarded-proto") == [b"https"]
                assert await agent.interrupt() == 0
                assert "Traceback" not in agent.stderr(), agent.stderr()
            assert await relay.interrupt() == 0
            assert "Traceback" not in relay.stderr(), relay.stderr()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("server", "--port", "0", "--tls-cert", "/nonexistent.pem"), "/nonexistent.pem"),
        (("server", "--port", "0", "--tls-key", "key.pem"), "--tls-key needs --tls-cert"),
        (("http", "8080", "--server", "http://192.0.2.1:8000"), "clear text"),
        (("http", "8080", "--server", "ws://192.0.2.1"), "--insecure-transport"),
        (("http", "8080", "--server", "https://127.0.0.1:1", "--ca-file", "/no.pem"), "/no.pem"),
        (("http", "https://127.0.0.1:1", "--backend-ca-file", "/no.pem"), "/no.pem"),
    ],
)
async def test_cli_tls_mistakes_are_one_line_and_exit_2(
    args: tuple[str, ...], expected: str
) -> None:
    with trio.fail_after(15):
        result = await trio.run_process(
            [*CLI, *args], capture_stdout=True, capture_stderr=True, check=False
        )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"tunnel2 {args[0]}: "), stderr
    assert expected in stderr


async def test_an_upgrade_to_an_https_backend_carries_bytes_without_half_close(
    nursery: trio.Nursery, plain_relay: TunnelServer, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    # TLS cannot half-close: when the visitor sends EOF, the agent must not try to pass it on
    # (the splice asks for HalfCloseableStream), and the backend's answer still comes back.
    may_finish = trio.Event()

    async def upgrading(stream: trio.SSLStream[trio.SocketStream]) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(65536)
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
        )
        data = b""
        while b"." not in data:
            data = bytes(await stream.receive_some(65536))
            await stream.send_all(data.upper())
        await may_finish.wait()
        await stream.send_all(b"BYE")
        await stream.aclose()

    listeners = await nursery.start(trio.serve_ssl_over_tcp, upgrading, 0, pki.server_context())
    port = listeners[0].transport_listener.socket.getsockname()[1]
    with trio.fail_after(TIMEOUT):
        async with (
            tunnel2.open_tunnel(
                plain_relay.base_url, f"https://127.0.0.1:{port}", backend_ca_file=pki.ca_file
            ) as agent,
            open_client(plain_relay.base_url, None) as client,
        ):
            target = urllib.parse.urlsplit(agent.public_url).path + "ws"
            await client.send_all(
                f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
                "hello.".encode()
            )
            received = b""
            while b"HELLO." not in received:
                received += await client.receive_some(65536)
            assert received.startswith(b"HTTP/1.1 101 ")
            assert isinstance(client, trio.SocketStream)
            await client.send_eof()
            await trio.sleep(0.2)  # let the END reach the agent (a miss only weakens the test)
            may_finish.set()
            tail = b""
            while chunk := await client.receive_some(65536):
                tail += chunk
            assert tail == b"BYE"
            uplink = agent.uplink
            assert uplink is not None
            await wait_until(lambda: uplink.statistics().open_streams == 0)
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


async def test_uplink_over_wss_carries_a_burst_through_the_fast_path(pki: Pki) -> None:
    """More frames than the uplink's early-flush threshold, queued in one pass, go out with
    send_nowait over TLS and all arrive in order (the TLS twin of the test_transports one)."""
    client_stream, server_stream = tls_socket_pair(pki)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            dialled: list[WsprotoTransport] = []

            async def dial() -> None:
                dialled.append(await connect_websocket(client_stream, "relay.test", "/x"))

            nursery.start_soon(dial)
            request = b""
            while b"\r\n\r\n" not in request:
                request += await server_stream.receive_some(65536)
            server = await accept_websocket(server_stream, request)
        (client,) = dialled
        try:
            await carry_a_burst(client, server)
        finally:
            await client.aclose()
            await server.aclose()
