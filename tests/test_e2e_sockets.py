"""End-to-end tests over real sockets: client -> relay (entry) -> agent -> HTTP backend.

Everything binds 127.0.0.1 port 0. Every test is bounded with ``trio.fail_after``; nothing
asserts on timing, and no mock clock runs while real sockets are in flight (STYLE.md §8).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import h11
import pytest
import trio
from httpbackend import (
    Backend,
    Handler,
    Reply,
    Request,
    decode_echo,
    pattern_chunks,
    pattern_sha256,
    route,
    serve_backend,
)

import tunnel2
from tunnel2 import ErrorCode, ServerConfig, TunnelServer, frames
from tunnel2.agent import websocket_connector
from tunnel2.uplink import receive_handshake_frame

# --- a small HTTP/1.1 client (h11 on a trio socket) --------------------------------------------


@attrs.frozen
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    body_length: int
    body_sha256: str

    def get_all(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]

    def get(self, name: bytes) -> bytes | None:
        values = self.get_all(name)
        return values[0] if values else None

    def echo(self) -> Request:
        assert self.status == 200, (self.status, self.body[:500])
        return decode_echo(self.body)


def split_url(url: str) -> tuple[str, int, str]:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port, parts.path or "/"


class Client:
    """One keep-alive client connection driven by h11."""

    def __init__(self, stream: trio.SocketStream, host: bytes) -> None:
        self.stream = stream
        self.host = host
        self.conn = h11.Connection(h11.CLIENT)
        self.closed = False

    @classmethod
    async def connect(cls, url: str, *, rcvbuf: int | None = None) -> Client:
        host, port, _ = split_url(url)
        if rcvbuf is None:
            stream = await trio.open_tcp_stream(host, port)
        else:
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            await sock.connect((host, port))
            stream = trio.SocketStream(sock)
        return cls(stream, f"{host}:{port}".encode())

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def request(
        self,
        method: str | bytes,
        target: str | bytes,
        headers: Iterable[tuple[bytes, bytes]] = (),
        body: bytes | Iterable[bytes] = b"",
        *,
        length: int | None = None,
        chunked: bool = False,
        keep_body: bool = True,
        pace: float = 0.0,
    ) -> Response:
        """Send one request and read the whole response (hashing the body as it comes)."""
        assert not self.closed, "the server closed this connection"
        fields = list(headers)
        if not any(n.lower() == b"host" for n, _ in fields):
            fields.insert(0, (b"Host", self.host))
        if chunked:
            fields.append((b"Transfer-Encoding", b"chunked"))
        elif isinstance(body, bytes):
            if body:  # an empty body goes without Content-Length unless asked for
                fields.append((b"Content-Length", b"%d" % len(body)))
        else:
            assert length is not None
            fields.append((b"Content-Length", b"%d" % length))
        conn = self.conn
        out = conn.send(h11.Request(method=method, target=target, headers=fields))
        assert out is not None
        pending = out
        for chunk in [body] if isinstance(body, bytes) else body:
            if chunk:
                data = conn.send(h11.Data(data=chunk))
                assert data is not None
                await self.stream.send_all(pending + data)
                pending = b""
        end = conn.send(h11.EndOfMessage())
        assert end is not None
        await self.stream.send_all(pending + end)
        return await self._read_response(keep_body=keep_body, pace=pace)

    async def _read_response(self, *, keep_body: bool, pace: float) -> Response:
        conn = self.conn
        head: h11.Response | None = None
        digest = hashlib.sha256()
        kept: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if pace:
                    await trio.sleep(pace)
                conn.receive_data(await self.stream.receive_some(16384 if pace else 65536))
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.InformationalResponse):
                continue
            elif isinstance(event, h11.Data):
                digest.update(event.data)
                size += len(event.data)
                if keep_body:
                    kept.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected {event!r} before the end of the response")
        assert head is not None
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            self.closed = True
        return Response(
            status=head.status_code,
            headers=list(head.headers),
            body=b"".join(kept),
            body_length=size,
            body_sha256=digest.hexdigest(),
        )

    async def at_eof(self) -> bool:
        """True if the server closed the connection (reads what is left)."""
        return await self.stream.receive_some(1) == b""


@asynccontextmanager
async def open_client(url: str, *, rcvbuf: int | None = None) -> AsyncIterator[Client]:
    client = await Client.connect(url, rcvbuf=rcvbuf)
    try:
        yield client
    finally:
        await client.aclose()


async def fetch(
    url: str,
    method: str = "GET",
    *,
    headers: Iterable[tuple[bytes, bytes]] = (),
    body: bytes = b"",
) -> Response:
    """One request on a fresh connection to ``url`` (path and query taken from it)."""
    parts = urllib.parse.urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    client = await Client.connect(url)
    try:
        return await client.request(method, target, headers, body)
    finally:
        await client.aclose()


async def raw_exchange(url: str, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    host, port, _ = split_url(url)
    stream = await trio.open_tcp_stream(host, port)
    try:
        await stream.send_all(data)
        received = bytearray()
        while chunk := await stream.receive_some(65536):
            received += chunk
        return bytes(received)
    finally:
        await stream.aclose()


def parse_raw_response(data: bytes) -> tuple[bytes, dict[bytes, list[bytes]], bytes]:
    """(status line, lower-cased header fields, body) of one response read to EOF."""
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete head in {data[:200]!r}"
    status_line, *lines = head.split(b"\r\n")
    fields: dict[bytes, list[bytes]] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        fields.setdefault(name.strip().lower(), []).append(value.strip())
    return status_line, fields, body


# --- fixtures and helpers -----------------------------------------------------------------


async def start_relay(nursery: trio.Nursery, **config: object) -> TunnelServer:
    server: TunnelServer = await nursery.start(
        tunnel2.serve_tunnel_server,
        ServerConfig(port=0, **config),  # type: ignore[arg-type]
    )
    return server


@pytest.fixture
async def relay(nursery: trio.Nursery) -> TunnelServer:
    return await start_relay(nursery)


@pytest.fixture
async def backend(nursery: trio.Nursery) -> Backend:
    started: Backend = await nursery.start(serve_backend, "echo")
    return started


def gated(gate: trio.Event | None = None) -> Handler:
    """Echo/route every request; a target starting with ``/gate`` first waits for ``gate``
    (forever if ``None``) and is then routed without that prefix."""

    async def reply(request: Request) -> Reply:
        if request.target.startswith(b"/gate"):
            if gate is None:
                await trio.sleep_forever()
            else:
                await gate.wait()
            request.target = request.target[len(b"/gate") :] or b"/"
        await trio.lowlevel.checkpoint()
        return route(request)

    return reply


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` (the state lives in objects that offer no event to wait on)."""
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(0.05)


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def task_names(root: trio.lowlevel.Task) -> list[str]:
    """The names of every task below ``root``."""
    names: list[str] = []
    stack = [root]
    while stack:
        task = stack.pop()
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                names.append(child.name)
                stack.append(child)
    return names


def tunnel_tasks(root: trio.lowlevel.Task) -> list[str]:
    """Tasks of tunnel2 (or of the libraries it runs) below ``root``."""
    return [name for name in task_names(root) if "tunnel2" in name]


def relay_tasks(root: trio.lowlevel.Task) -> list[str]:
    """Tasks of a relay (server, entry, the serve function) below ``root``."""
    markers = ("tunnel2.server", "tunnel2.entry", "tunnel2.api.serve_tunnel_server")
    return [name for name in task_names(root) if any(m in name for m in markers)]


async def connect_refused(url: str) -> bool:
    host, port, _ = split_url(url)
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError:
        return True
    await stream.aclose()
    return False


# --- 1. methods, targets, headers ---------------------------------------------------------


async def test_methods_and_query_bytes_reach_the_backend_exactly(
    relay: TunnelServer, backend: Backend
) -> None:
    with trio.fail_after(10):
        async with tunnel2.open_tunnel(relay.base_url, backend.port) as agent:
            _, _, path = split_url(agent.public_url)
            assert path == f"/session/{agent.session_id}/"
            async with open_client(agent.public_url) as client:
                query = "?a=1&a=2&b=%2F&c"
                for method in ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"]:
                    body = (
                        f"body of {method}".encode() if method in ("POST", "PUT", "PATCH") else b""
                    )
                    response = await client.request(method, f"{path}rest/x{query}", body=body)
                    echo = response.echo()
                    assert echo.method == method.encode()
                    assert echo.target == f"/rest/x{query}".encode()
                    assert echo.body_sha256 == hashlib.sha256(body).hexdigest()
                    assert echo.body_length == len(body)


@pytest.mark.parametrize(
    ("suffix", "backend_target"),
    [
        ("", b"/"),
        ("?q=%20x", b"/?q=%20x"),
        ("/", b"/"),
        ("/rest", b"/rest"),
        ("/rest/deeper/?x=/session/y/", b"/rest/deeper/?x=/session/y/"),
    ],
)
async def test_session_prefix_is_stripped(
    relay: TunnelServer, backend: Backend, suffix: str, backend_target: bytes
) -> None:
    with trio.fail_after(10):
        async with tunnel2.open_tunnel(relay.base_url, backend.port) as agent:
            url = f"{relay.base_url}/session/{agent.session_id}{suffix}"
            response = await fetch(url)
            assert response.echo().target == backend_target


async def test_repeated_and_forwarding_headers(relay: TunnelServer, backend: Backend) -> None:
    with trio.fail_after(10):
        async with tunnel2.open_tunnel(relay.base_url, backend.port) as agent:
            host, port, _ = split_url(relay.base_url)
            response = await fetch(
                agent.public_url + "headers",
                headers=[
                    (b"X-Multi", b"one"),
                    (b"X-Other", b"x"),
                    (b"X-Multi", b"two"),
                    # a visitor cannot spoof any of these (no trusted proxies)
                    (b"X-Forwarded-For", b"10.0.0.1"),
                    (b"X-Forwarded-Proto", b"https"),
                    (b"X-Forwarded-Host", b"evil.example"),
                    (b"Forwarded", b"for=10.0.0.1"),
                    (b"X-Real-IP", b"10.0.0.1"),
                    # hop-by-hop: none of these may reach the backend
                    (b"Connection", b"keep-alive, X-Hop"),
                    (b"X-Hop", b"secret"),
                    (b"Keep-Alive", b"timeout=5"),
                    (b"TE", b"trailers"),
                    (b"Proxy-Authorization", b"Basic Zm9vOmJhcg=="),
                ],
            )
            echo = response.echo()
            assert echo.get_all(b"x-multi") == [b"one", b"two"]
            assert echo.get_all(b"x-other") == [b"x"]
            assert echo.get_all(b"x-forwarded-for") == [b"127.0.0.1"]
            assert echo.get_all(b"x-forwarded-proto") == [b"http"]
            assert echo.get_all(b"x-forwarded-host") == [f"{host}:{port}".encode()]
            (forwarded,) = echo.get_all(b"forwarded")
            assert re.fullmatch(
                rb'for="127\.0\.0\.1:[0-9]+";host="%s:%d";proto=http' % (host.encode(), port),
                forwarded,
            ), forwarded
            assert echo.get_all(b"x-real-ip") == []
            assert echo.get_all(b"host") == [f"{host}:{port}".encode()]
            for hop in (b"connection", b"x-hop", b"keep-alive", b"te", b"proxy-authorization"):
                assert echo.get_all(hop) == [], hop


async def test_forwarding_headers_from_a_trusted_proxy(
    nursery: trio.Nursery, backend: Backend
) -> None:
    relay = await start_relay(nursery, trusted_proxies=("127.0.0.0/8",))
    with trio.fail_after(10):
        async with tunnel2.open_tunnel(relay.base_url, backend.port) as agent:
            response = await fetch(
                agent.public_url + "headers",
                headers=[
                    # 203.0.113.9 is forgeable by 10.0.0.1; 127.0.0.5 is a trusted proxy
                    (b"X-Forwarded-For", b"203.0.113.9, 10.0.0.1"),
                    (b"X-Forwarded-For", b"127.0.0.5"),
                    (b"X-Forwarded-Proto", b"https"),
                    (b"X-Forwarded-Host", b"public.example"),
                    (b"Forwarded", b"for=198.51.100.1"),  # rebuilt from X-Forwarded-For
                ],
            )
            echo = response.echo()
            assert echo.get_all(b"x-forwarded-for") == [
                b"203.0.113.9, 10.0.0.1, 127.0.0.5, 127.0.0.1"
            ]
            assert echo.get_all(b"x-forwarded-proto") == [b"https"]
            assert echo.get_all(b"x-forwarded-host") == [b"public.example"]
            (forwarded,) = echo.get_all(b"forwarded")
            assert re.fullmatch(
                rb'for=10\.0\.0\.1;host="public\.example";proto=https, '
                rb'for=127\.0\.0\.5, for="127\.0\.0\.1:[0-9]+"',
                forwarded,
            ), forwarded


async def client_seen_by_the_app(relay: TunnelServer, *fields: bytes) -> list[object]:
    """``scope["client"]`` of an ASGI app behind the relay, for a request with ``fields``,
    followed by the local port of the connection it came on."""

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        body = json.dumps(scope["client"]).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": body})  # type: ignore[operator]

    async with tunnel2.open_tunnel(relay.base_url, app) as agent:  # type: ignore[arg-type]
        host, port, path = split_url(agent.public_url)
        stream = await trio.open_tcp_stream(host, port)
        local_port = stream.socket.getsockname()[1]
        request = b"\r\n".join(
            [b"GET %sc HTTP/1.1" % path.encode(), b"Host: x", *fields, b"Connection: close"]
        )
        await stream.send_all(request + b"\r\n\r\n")
        received = bytearray()
        while chunk := await stream.receive_some(65536):
            received += chunk
        await stream.aclose()
    client: list[object] = json.loads(parse_raw_response(bytes(received))[2])
    return [*client, local_port]


async def test_asgi_client_is_the_peer_whatever_the_visitor_forges(relay: TunnelServer) -> None:
    forged = [b"X-Forwarded-For: 6.6.6.6", b"Forwarded: for=6.6.6.6", b"X-Real-IP: 6.6.6.6"]
    with trio.fail_after(10):
        host, port, local_port = await client_seen_by_the_app(relay, *forged)
    assert (host, port) == ("127.0.0.1", local_port)


async def test_asgi_client_behind_a_trusted_proxy(nursery: trio.Nursery) -> None:
    relay = await start_relay(nursery, trusted_proxies=("127.0.0.1/32",))
    with trio.fail_after(10):
        client = await client_seen_by_the_app(
            relay, b"X-Forwarded-For: 6.6.6.6, 192.0.2.7", b"Forwarded: for=6.6.6.6"
        )
    assert client[:2] == ["192.0.2.7", 0]


async def forwarding_seen_on_one_connection(
    relay: TunnelServer, requests: list[list[bytes]]
) -> list[dict[str, str]]:
    """The X-Forwarded-For/-Host and Forwarded values an ASGI app sees for each of
    ``requests`` (their extra field lines), all sent on one keep-alive connection."""

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        wanted = (b"x-forwarded-for", b"x-forwarded-host", b"forwarded")
        seen = {n.decode(): v.decode() for n, v in scope["headers"] if n in wanted}  # type: ignore[attr-defined]
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": json.dumps(seen).encode()})  # type: ignore[operator]

    async with tunnel2.open_tunnel(relay.base_url, app) as agent:  # type: ignore[arg-type]
        host, port, path = split_url(agent.public_url)
        stream = await trio.open_tcp_stream(host, port)
        conn = h11.Connection(h11.CLIENT)
        seen: list[dict[str, str]] = []
        for fields in requests:
            request = b"\r\n".join([b"GET %sc HTTP/1.1" % path.encode(), *fields])
            await stream.send_all(request + b"\r\n\r\n")
            # (h11 only reads the answers: it is told of a request like the one sent)
            conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            conn.send(h11.EndOfMessage())
            body = b""
            while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Data):
                    body += event.data
            seen.append(json.loads(body))
            conn.start_next_cycle()
        await stream.aclose()
    return seen


async def test_forwarding_lines_follow_each_request_on_a_keep_alive_connection(
    relay: TunnelServer,
) -> None:
    with trio.fail_after(10):
        seen = await forwarding_seen_on_one_connection(
            relay, [[b"Host: a.example"], [b"Host: a.example"], [b"Host: b.example"]]
        )
    hosts = [s["x-forwarded-host"] for s in seen]
    assert hosts == ["a.example", "a.example", "b.example"]
    assert {s["x-forwarded-for"] for s in seen} == {"127.0.0.1"}
    assert [s["forwarded"].partition(";")[2] for s in seen] == [
        f'host="{host}";proto=http' for host in hosts
    ]


async def test_a_trusted_proxy_names_a_new_client_on_each_request(nursery: trio.Nursery) -> None:
    relay = await start_relay(nursery, trusted_proxies=("127.0.0.1/32",))
    with trio.fail_after(10):
        seen = await forwarding_seen_on_one_connection(
            relay,
            [
                [b"Host: h", b"X-Forwarded-For: 192.0.2.7"],
                [b"Host: h", b"X-Forwarded-For: 192.0.2.8"],
                [b"Host: h"],
            ],
        )
    assert [s["x-forwarded-for"] for s in seen] == [
        "192.0.2.7, 127.0.0.1",
        "192.0.2.8, 127.0.0.1",
        "127.0.0.1",
    ]


async def test_repeated_response_headers(relay: TunnelServer, backend: Backend) -> None:
    with trio.fail_after(10):
        async with tunnel2.open_tunnel(relay.base_url, backend.port) as agent:
            response = await fetch(agent.public_url + "cookies")
            assert response.status == 200
            # In order, each kept (their Paths under the session's prefix, PROTOCOL.md §4.6).
            prefix = f"/session/{agent.session_id}".encode()
            assert response.get_all(b"set-cookie") == [
                b"a=1; Path=%s" % prefix,
                b"b=2; Path=%s" % prefix,
            ]
            assert response.body == b"cookies"


# --- 2. bodies and body-less responses -------------------------------------------------------


@pytest.mark.parametrize("mode", ["echo", "chunked"])
@pytest.mark.parametrize("request_chunked", [False, True])
async def test_request_and_response_bodies(
    nursery: trio.Nursery, relay: TunnelServer, mode: str, request_chunked: bool
) -> None:
    size = 300_000  # more than one stream window (256 KiB): flow control is exercised
    backend: Backend = await nursery.start(serve_backend, mode)
    with trio.fail_after(15):
        async with (
            tunnel2.open_tunnel(relay.base_url, backend.port) as agent,
            open_client(agent.public_url) as client,
        ):
            path = split_url(agent.public_url)[2]
            upload = b"".join(pattern_chunks(size))
            pieces = [upload[:1], upload[1:70_000], upload[70_000:]]
            response = await client.request(
                "POST", path + "upload", body=pieces, length=size, chunked=request_chunked
            )
            echo = response.echo()
            assert (echo.body_length, echo.body_sha256) == (size, pattern_sha256(size))
            if request_chunked:
                assert echo.get_all(b"transfer-encoding") == [b"chunked"]
                assert echo.get_all(b"content-length") == []
            else:
                assert echo.get_all(b"content-length") == [str(size).encode()]

            response = await client.request("GET", path + f"bytes/{size}")
            assert response.status == 200
            assert (response.body_length, response.body_sha256) == (size, pattern_sha256(size))
            if mode == "chunked":
                assert response.get_all(b"transfer-encoding") == [b"chunked"]
            else:
                assert response.get_all(b"content-length") == [str(size).encode()]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
async def test_content_length_zero_request(
    relay: TunnelServer, backend: Backend, method: str
) -> None:
    # "Content-Length: 0" is what most clients send for an empty POST (curl -d '', fetch()).
    with trio.fail_after(5):
        async with (
            tunnel2.open_tunnel(relay.base_url, backend.port) as agent,
            open_client(agent.public_url) as client,
        ):
            path = split_url(agent.public_url)[2]
            response = await client.request(
                method, path + "empty", [(b"Content-Length", b"0")], body=b""
            )
            echo = response.echo()
            assert (echo.method, echo.body_length) == (method.encode(), 0)
            assert echo.get_all(b"content-length") == [b"0"]


@pytest.mark.parametrize("mode", ["echo", "chunked"])
async def test_head_204_304_have_no_body(
    nursery: trio.Nursery, relay: TunnelServer, mode: str
) -> None:
    backend: Backend = await nursery.start(serve_backend, mode)
    with trio.fail_after(10):
        async with tunnel2.open_tunnel(relay.base_url, backend.port) as agent:
            path = split_url(agent.public_url)[2]
            # One keep-alive connection: a stray body byte would corrupt the next response.
            async with open_client(agent.public_url) as client:
                response = await client.request("HEAD", path + "bytes/1000")
                assert response.status == 200
                assert response.body == b""
                if mode == "echo":
                    assert response.get_all(b"content-length") == [b"1000"]
                response = await client.request("GET", path + "bytes/10")
                assert response.body == b"".join(pattern_chunks(10))
                for status in (204, 304):
                    response = await client.request("GET", path + f"status/{status}")
                    assert response.status == status
                    assert response.body == b""
                    assert response.get_all(b"etag") == [b'"v1"']
                    response = await client.request("GET", path + "after")
                    assert response.echo().target == b"/after"


# --- 3. HTTP/1.0 and Connection: close, both sides ------------------------------------------------


@pytest.mark.parametrize("mode", ["echo", "chunked", "http10-close"])
async def test_http10_client_gets_a_complete_answer(
    nursery: trio.Nursery, relay: TunnelServer, mode: str
) -> None:
    size = 70_000
    backend: Backend = await nursery.start(serve_backend, mode)
    with trio.fail_after(10):
        async with tunnel2.open_tunnel(relay.base_url, backend.port) as agent:
            path = split_url(agent.public_url)[2]
            data = await raw_exchange(
                agent.public_url,
                f"GET {path}bytes/{size} HTTP/1.0\r\nHost: x\r\n\r\n".encode(),
            )
            status_line, fields, body = parse_raw_response(data)
            assert status_line.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))
            assert b"chunked" not in b"".join(fields.get(b"transfer-encoding", []))
            assert b"keep-alive" not in b"".join(fields.get(b"connection", [])).lower()
            assert hashlib.sha256(body).hexdigest() == pattern_sha256(size)
            if b"content-length" in fields:
                assert fields[b"content-length"] == [str(size).encode()]


async def test_http10_client_with_curl(relay: TunnelServer, backend: Backend) -> None:
    with trio.fail_after(10):
        async with tunnel2.open_tunnel(relay.base_url, backend.port) as agent:
            result = await trio.run_process(
                ["curl", "-sS", "--http1.0", "--max-time", "5", agent.public_url + "bytes/5000"],
                capture_stdout=True,
                capture_stderr=True,
            )
            assert hashlib.sha256(result.stdout).hexdigest() == pattern_sha256(5000)


@pytest.mark.parametrize("mode", ["echo", "chunked", "http10-close"])
async def test_connection_close_client(
    nursery: trio.Nursery, relay: TunnelServer, mode: str
) -> None:
    backend: Backend = await nursery.start(serve_backend, mode)
    with trio.fail_after(10):
        async with (
            tunnel2.open_tunnel(relay.base_url, backend.port) as agent,
            open_client(agent.public_url) as client,
        ):
            path = split_url(agent.public_url)[2]
            response = await client.request(
                "GET", path + "bytes/40000", [(b"Connection", b"close")]
            )
            assert response.body_sha256 == pattern_sha256(40000)
            assert b"close" in b"".join(response.get_all(b"connection")).lower()
            assert await client.at_eof()


async def test_close_delimited_backend_never_loses_the_tail(
    nursery: trio.Nursery, relay: TunnelServer
) -> None:
    backend: Backend = await nursery.start(serve_backend, "http10-close")
    with trio.fail_after(30):
        async with (
            tunnel2.open_tunnel(relay.base_url, backend.port) as agent,
            open_client(agent.public_url) as client,
        ):
            path = split_url(agent.public_url)[2]
            for i in range(200):
                size = (i * 7919) % 150_000 + 1  # sizes from 1 byte to ~150 KB
                response = await client.request("GET", path + f"bytes/{size}")
                assert response.status == 200
                assert (response.body_length, response.body_sha256) == (
                    size,
                    pattern_sha256(size),
                ), f"request {i}: body of {size} bytes"
            assert backend.connections == 200


# --- 4. keep-alive pooling to the backend -----------------------------------------------------


async def test_backend_connections_are_pooled(relay: TunnelServer, backend: Backend) -> None:
    with trio.fail_after(15):
        async with tunnel2.open_tunnel(relay.base_url, backend.port) as agent:
            for i in range(50):
                # A fresh public connection each time: only the agent's pool can reuse.
                response = await fetch(agent.public_url + f"n/{i}")
                assert response.echo().target == f"/n/{i}".encode()
            assert len(backend.requests) == 50
            assert backend.connections < 5


async def test_stale_pooled_connection_is_retried(
    nursery: trio.Nursery, relay: TunnelServer
) -> None:
    backend: Backend = await nursery.start(serve_backend, "close-idle")
    with trio.fail_after(15):
        async with (
            tunnel2.open_tunnel(relay.base_url, backend.port) as agent,
            open_client(agent.public_url) as client,
        ):
            path = split_url(agent.public_url)[2]
            for i in range(50):
                response = await client.request("GET", path + f"n/{i}")
                assert response.status == 200, (i, response.body)
                assert response.echo().target == f"/n/{i}".encode()
            assert backend.connections >= 50  # the backend really closed every connection


async def test_stale_pooled_connection_with_a_request_body(
    nursery: trio.Nursery, relay: TunnelServer
) -> None:
    # Backends that close idle keep-alive connections are common (Node's 5 s default); a POST
    # that picks such a connection from the pool must not fail because it carries a body.
    backend: Backend = await nursery.start(serve_backend, "close-idle")
    with trio.fail_after(15):
        async with (
            tunnel2.open_tunnel(relay.base_url, backend.port) as agent,
            open_client(agent.public_url) as client,
        ):
            path = split_url(agent.public_url)[2]
            for i in range(20):
                # The GET leaves its connection in the pool; the backend closes it; the POST
                # takes it.
                response = await client.request("GET", path + f"get/{i}")
                assert response.status == 200, (i, response.status, response.body)
                body = b"payload %d" % i
                response = await client.request("POST", path + f"post/{i}", body=body)
                assert response.status == 200, (i, response.status, response.body)
                assert response.echo().body_sha256 == hashlib.sha256(body).hexdigest()
            assert backend.connections >= 40


async def test_requests_with_bodies_reuse_backend_connections(
    relay: TunnelServer, backend: Backend
) -> None:
    with trio.fail_after(15):
        async with (
            tunnel2.open_tunnel(relay.base_url, backend.port) as agent,
            open_client(agent.public_url) as client,
        ):
            path = split_url(agent.public_url)[2]
            for i in range(30):
                body = b"payload %d" % i
                response = await client.request("POST", path + f"post/{i}", body=body)
                assert response.echo().body_sha256 == hashlib.sha256(body).hexdigest()
            assert len(backend.requests) == 30
            assert backend.connections < 5, f"{backend.connections} connections for 30 POSTs"


# --- 5. failures map to clear HTTP answers --------------------------------------------------------


async def assert_relay_still_serves(public_url: str) -> None:
    response = await fetch(public_url + "still-ok")
    assert response.echo().target == b"/still-ok"


async def test_unknown_session_is_404(relay: TunnelServer, backend: Backend) -> None:
    with trio.fail_after(10):
        async with tunnel2.open_tunnel(relay.base_url, backend.port) as agent:
            response = await fetch(f"{relay.base_url}/session/no-such-session-42/x")
            assert response.status == 404
            assert b"no-such-session-42" in response.body
            response = await fetch(f"{relay.base_url}/not-a-session-path")
            assert response.status == 404
            await assert_relay_still_serves(agent.public_url)


async def test_backend_refused_is_502(relay: TunnelServer, backend: Backend) -> None:
    with trio.fail_after(10):
        async with (
            tunnel2.open_tunnel(relay.base_url, free_port()) as dead,
            tunnel2.open_tunnel(relay.base_url, backend.port) as alive,
        ):
            response = await fetch(dead.public_url + "x")
            assert response.status == 502
            # The kind of failure and the session, never the backend's address.
            assert (
                response.body
                == (
                    f"502 Bad Gateway: session {dead.session_id}: "
                    "the backend refused the connection\n"
                ).encode()
            )
            await assert_relay_still_serves(alive.public_url)
            response = await fetch(dead.public_url + "again")
            assert response.status == 502


async def test_invalid_backend_response_is_502_without_its_bytes(
    nursery: trio.Nursery, relay: TunnelServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def serve_garbage(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nX-Secret: s3cr3t\x00\r\n\r\n")
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, serve_garbage, listeners)
    caplog.set_level(logging.INFO)
    with trio.fail_after(10):
        async with tunnel2.open_tunnel(relay.base_url, port) as agent:
            response = await fetch(agent.public_url + "x")
            assert response.status == 502
            assert (
                response.body
                == (
                    f"502 Bad Gateway: session {agent.session_id}: "
                    "the backend sent an invalid response\n"
                ).encode()
            )
    # The details stay in the agent's log, once.
    (warning,) = [
        r for r in caplog.records if r.levelno >= logging.WARNING and r.name != "tunnel2.api"
    ]  # (tunnel2.api warns that the test relay is an open one)
    assert warning.name == "tunnel2.agent"
    assert f"127.0.0.1:{port}" in warning.getMessage()
    assert "invalid value" in warning.getMessage()


async def test_response_head_over_the_frame_limit_is_502_and_the_uplink_lives(
    nursery: trio.Nursery,
) -> None:
    relay = await start_relay(nursery, max_frame_size=1024)

    async def reply(request: Request) -> Reply:
        await trio.lowlevel.checkpoint()
        if request.target == b"/big":
            return Reply(headers=[(b"X-Big", b"b" * 2000)], body=b"never sent")
        return route(request)

    backend: Backend = await nursery.start(serve_backend, reply)
    with trio.fail_after(10):
        async with tunnel2.open_tunnel(relay.base_url, backend.port) as agent:
            (uplink,) = relay.uplinks
            response = await fetch(agent.public_url + "big")
            assert response.status == 502
            assert (
                response.body
                == (
                    f"502 Bad Gateway: session {agent.session_id}: "
                    "the backend's response head is too large for the tunnel\n"
                ).encode()
            )
            await assert_relay_still_serves(agent.public_url)
            assert relay.uplinks == {uplink}
            assert agent.connections == 1


async def test_request_head_over_the_frame_limit_is_431_and_the_uplink_lives(
    nursery: trio.Nursery, backend: Backend
) -> None:
    relay = await start_relay(nursery, max_frame_size=1024)
    with trio.fail_after(10):
        async with tunnel2.open_tunnel(relay.base_url, backend.port) as agent:
            (uplink,) = relay.uplinks
            response = await fetch(agent.public_url + "big", headers=[(b"X-Big", b"b" * 1000)])
            assert response.status == 431
            assert b"over the tunnel's frame limit of 1024" in response.body
            await assert_relay_still_serves(agent.public_url)
            assert relay.uplinks == {uplink}
            assert agent.connections == 1


async def test_backend_never_answers_is_504(nursery: trio.Nursery) -> None:
    relay = await start_relay(nursery, request_timeout=1)
    backend: Backend = await nursery.start(serve_backend, gated())
    with trio.fail_after(10):
        async with tunnel2.open_tunnel(relay.base_url, backend.port) as agent:
            response = await fetch(agent.public_url + "gate/never")
            assert response.status == 504
            assert b"no response" in response.body
            assert b"1s" in response.body
            await assert_relay_still_serves(agent.public_url)


async def test_agent_gone_mid_request_is_502(nursery: trio.Nursery, relay: TunnelServer) -> None:
    backend: Backend = await nursery.start(serve_backend, gated())
    with trio.fail_after(15):
        async with tunnel2.open_tunnel(relay.base_url, backend.port) as agent:
            result: list[Response] = []

            async def in_flight() -> None:
                result.append(await fetch(agent.public_url + "gate/forever"))

            async with trio.open_nursery() as inner:
                inner.start_soon(in_flight)
                await backend.request_received.wait()
                (old,) = relay.uplinks
                for uplink in relay.uplinks:
                    uplink.close("test")
            (response,) = result
            assert response.status == 502
            assert b"disconnected" in response.body
            # The agent re-dials; the relay serves the session again.
            await wait_until(lambda: len(relay.uplinks) == 1 and old not in relay.uplinks)
            await assert_relay_still_serves(agent.public_url)


async def test_agent_saturated_is_503(nursery: trio.Nursery, relay: TunnelServer) -> None:
    backend: Backend = await nursery.start(serve_backend, gated())
    with trio.fail_after(15):
        async with tunnel2.open_tunnel(
            relay.base_url, backend.port, max_concurrent=1, max_queued=1
        ) as agent:
            statuses: dict[str, int] = {}

            async def request(name: str) -> None:
                response = await fetch(agent.public_url + f"gate/{name}")
                statuses[name] = response.status
                if response.status == 503:
                    assert b"queue" in response.body

            async with trio.open_nursery() as inner:
                inner.start_soon(request, "busy")
                await wait_until(lambda: len(backend.requests) == 1)  # the worker has it
                inner.start_soon(request, "queued")
                uplink = agent.uplink
                assert uplink is not None
                await wait_until(lambda: uplink.statistics().incoming_queued == 1)
                async with trio.open_nursery() as extra:
                    for name in ("extra1", "extra2", "extra3"):
                        extra.start_soon(request, name)
                assert statuses == {"extra1": 503, "extra2": 503, "extra3": 503}
                async with tunnel2.open_tunnel(relay.base_url, backend.port) as other:
                    await assert_relay_still_serves(other.public_url)
                inner.cancel_scope.cancel()


async def test_client_that_gives_up_frees_the_agent_worker(
    nursery: trio.Nursery, relay: TunnelServer
) -> None:
    # PROTOCOL.md §5 CANCEL: "the stream is no longer wanted (e.g. the client went away)".
    # A client that disconnects while waiting must not hold one of the agent's workers until
    # request_timeout (30 s here).
    backend: Backend = await nursery.start(serve_backend, gated())
    with trio.fail_after(15):
        async with tunnel2.open_tunnel(
            relay.base_url, backend.port, max_concurrent=1, max_queued=0
        ) as agent:
            async with trio.open_nursery() as inner:
                inner.start_soon(fetch, agent.public_url + "gate/abandoned")
                await backend.request_received.wait()
                inner.cancel_scope.cancel()  # the client closes its connection
            statuses: list[int] = []
            with trio.move_on_after(2):
                while not statuses or statuses[-1] != 200:
                    statuses.append((await fetch(agent.public_url + "next")).status)
                    await trio.sleep(0.05)
            assert statuses
            assert statuses[-1] == 200, f"worker still busy: {statuses[-3:]}"


# --- 6. reconnect, shared sessions, resume keys ---------------------------------------------------


async def test_agent_redials_and_keeps_its_url(relay: TunnelServer, backend: Backend) -> None:
    with trio.fail_after(15):
        async with tunnel2.open_tunnel(relay.base_url, backend.port) as agent:
            url, session_id = agent.public_url, agent.session_id
            await assert_relay_still_serves(url)
            (old,) = relay.uplinks
            old.close("test")
            await wait_until(lambda: len(relay.uplinks) == 1 and old not in relay.uplinks)
            assert (agent.public_url, agent.session_id) == (url, session_id)
            assert agent.connections == 2
            await assert_relay_still_serves(url)


async def test_two_agents_of_one_identity_share_a_fixed_session(nursery: trio.Nursery) -> None:
    relay = await start_relay(nursery, tokens=frozenset({"team=team-token"}))
    first: Backend = await nursery.start(serve_backend, "echo")
    second: Backend = await nursery.start(serve_backend, "echo")
    with trio.fail_after(15):
        async with (
            tunnel2.open_tunnel(
                relay.base_url, first.port, session_id="shared-1", token="team-token"
            ) as a,
            tunnel2.open_tunnel(
                relay.base_url, second.port, session_id="shared-1", token="team-token"
            ) as b,
        ):
            assert a.public_url == b.public_url == f"{relay.base_url}/session/shared-1/"
            assert len(relay.uplinks) == 2
            for i in range(20):
                response = await fetch(a.public_url + f"r/{i}")
                assert response.status == 200
            assert len(first.requests) + len(second.requests) == 20
            assert first.requests
            assert second.requests


async def test_random_session_cannot_be_taken_without_its_resume_key(
    relay: TunnelServer, backend: Backend
) -> None:
    with trio.fail_after(10):
        async with tunnel2.open_tunnel(relay.base_url, backend.port) as agent:
            with pytest.raises(tunnel2.HandshakeRefused) as info:
                async with tunnel2.open_tunnel(
                    relay.base_url, backend.port, session_id=agent.session_id
                ):
                    pytest.fail("a second agent took over a random session")
            assert info.value.code == ErrorCode.UNAUTHORIZED
            assert len(relay.uplinks) == 1
            await assert_relay_still_serves(agent.public_url)


# --- 7. tokens and unreachable relays -------------------------------------------------------------


async def test_token_is_checked(nursery: trio.Nursery, backend: Backend) -> None:
    relay = await start_relay(nursery, tokens=frozenset({"s3cret"}))
    with trio.fail_after(10):
        for token in ("wrong", None):
            with pytest.raises(tunnel2.HandshakeRefused) as info:
                async with tunnel2.open_tunnel(relay.base_url, backend.port, token=token):
                    pytest.fail("the relay let in an agent without the right token")
            assert info.value.code == ErrorCode.UNAUTHORIZED
        assert not relay.uplinks
        async with tunnel2.open_tunnel(relay.base_url, backend.port, token="s3cret") as agent:
            await assert_relay_still_serves(agent.public_url)


async def assert_refused(relay_url: str, port: int, **options: object) -> None:
    with pytest.raises(tunnel2.HandshakeRefused) as info:
        async with tunnel2.open_tunnel(relay_url, port, **options):  # type: ignore[arg-type]
            pytest.fail("an intruder got a session that is not theirs")
    assert info.value.code == ErrorCode.UNAUTHORIZED


async def test_an_intruder_with_another_token_takes_nothing(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Fixed and random sessions stay their owner's: while connected, after the lease ran
    out, and after a relay restart (the owner's agent re-dials and gets its URL back)."""
    tokens = tmp_path / "tokens"
    tokens.write_text("bob-token-1 bob\nmallory-token-1 mallory\n")
    config = ServerConfig(
        port=free_port(), token_file=str(tokens), state_dir=str(tmp_path / "s"), grace_period=0.5
    )
    owned: Backend = await nursery.start(serve_backend, "echo")
    stolen: Backend = await nursery.start(serve_backend, "echo")
    mallory = {"token": "mallory-token-1"}

    async def run_relay(*, task_status: trio.TaskStatus[TunnelServer]) -> None:
        await tunnel2.serve_tunnel_server(config, task_status=task_status)

    with trio.fail_after(30):
        async with trio.open_nursery() as first_life:
            relay: TunnelServer = await first_life.start(run_relay)
            url = relay.base_url
            async with tunnel2.open_tunnel(
                url, owned.port, session_id="bobs-app", token="bob-token-1"
            ) as fixed:
                await assert_refused(url, stolen.port, session_id="bobs-app", **mallory)
                for i in range(10):
                    assert (await fetch(fixed.public_url + f"r/{i}")).status == 200
                assert len(owned.requests) == 10
                assert not stolen.requests
            await trio.sleep(1)  # the lease runs out
            await assert_refused(url, stolen.port, session_id="bobs-app", **mallory)
            async with tunnel2.open_tunnel(url, owned.port, token="bob-token-1") as random:
                sid, key = random.session_id, random._welcome.resume_key  # type: ignore[union-attr]
                await assert_refused(url, stolen.port, session_id=sid, **mallory)
                first_life.cancel_scope.cancel()  # the relay stops; the agent re-dials
                async with trio.open_nursery() as second_life:
                    await second_life.start(run_relay)
                    await wait_until(lambda: random.connections == 2 and bool(random.uplink))
                    assert random.session_id == sid
                    assert (await fetch(random.public_url + "back")).status == 200
                    # Even with the stolen resume key, over a raw connection:
                    stolen_hello = frames.Hello(
                        token="mallory-token-1", session_id=sid, resume_key=key
                    )
                    async with websocket_connector(url)() as transport:
                        await transport.send(frames.encode(stolen_hello))
                        answer = await receive_handshake_frame(transport, frames.FrameDecoder())
                    assert isinstance(answer, frames.Refuse)
                    assert "only its own agent" in answer.reason
                    await assert_refused(url, stolen.port, session_id=sid, **mallory)
                    await assert_refused(url, stolen.port, session_id="bobs-app", **mallory)
                    second_life.cancel_scope.cancel()
        assert not stolen.requests


async def test_unreachable_relay_raises_handshake_error(backend: Backend) -> None:
    with trio.fail_after(10), pytest.raises(tunnel2.HandshakeError) as info:
        async with tunnel2.open_tunnel(f"http://127.0.0.1:{free_port()}", backend.port):
            pytest.fail("connected to nothing")
    assert not isinstance(info.value, tunnel2.HandshakeRefused)


# --- 8. large bodies are streamed through the CLI processes ---------------------------------------


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


class LineReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def readline(self) -> str:
        while b"\n" not in self.buf:
            data = await self.stream.receive_some(4096)
            if not data:
                raise EOFError(f"EOF before a whole line: {bytes(self.buf)!r}")
            self.buf += data
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf[:] = rest
        return line.decode()


@asynccontextmanager
async def cli(*args: str, stderr: Path) -> AsyncIterator[tuple[trio.Process, LineReader]]:
    with stderr.open("wb") as err:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tunnel2.cli", *args], stdout=subprocess.PIPE, stderr=err
        )
    try:
        assert process.stdout is not None
        yield process, LineReader(process.stdout)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGINT)
                with trio.move_on_after(5):
                    await process.wait()
            if process.returncode is None:
                process.kill()
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


async def test_100mb_up_and_down_through_cli_processes(
    nursery: trio.Nursery, backend: Backend, tmp_path: Path
) -> None:
    size = 100_000_000
    with trio.fail_after(40):
        async with cli("server", "--port", "0", "-q", stderr=tmp_path / "relay.err") as (
            relay,
            relay_out,
        ):
            line = await relay_out.readline()
            assert line.startswith("tunnel2 relay on http://127.0.0.1:"), line
            relay_url = line.split()[3]
            assert not relay_url.endswith(":0"), f"--port 0 printed {line!r}"
            async with cli(
                "http", str(backend.port), "--server", relay_url, "-q", stderr=tmp_path / "a.err"
            ) as (agent, agent_out):
                line = await agent_out.readline()
                prefix, public_url, arrow, target = line.split(" ")
                assert (prefix, arrow) == ("Forwarding", "->")
                assert public_url.startswith(relay_url + "/session/")
                assert target == f"http://127.0.0.1:{backend.port}"

                async with open_client(public_url) as client:
                    path = split_url(public_url)[2]
                    response = await client.request(
                        "PUT", path + "upload", body=pattern_chunks(size), length=size
                    )
                    echo = response.echo()
                    assert (echo.body_length, echo.body_sha256) == (size, pattern_sha256(size))

                    response = await client.request("GET", path + f"bytes/{size}", keep_body=False)
                    assert response.status == 200
                    assert (response.body_length, response.body_sha256) == (
                        size,
                        pattern_sha256(size),
                    )
                limit = 100 * 1024
                assert vm_hwm_kib(relay.pid) < limit, "the relay buffered a large body"
                assert vm_hwm_kib(agent.pid) < limit, "the agent buffered a large body"


# --- 9. graceful shutdown ---------------------------------------------------------------------


async def test_relay_exit_drains_the_request_in_flight(nursery: trio.Nursery) -> None:
    gate = trio.Event()
    backend: Backend = await nursery.start(serve_backend, gated(gate))
    me = trio.lowlevel.current_task()
    with trio.fail_after(15):
        leave = trio.Event()
        relay_gone = trio.Event()
        result: list[Response] = []

        async def run_relay(*, task_status: trio.TaskStatus[TunnelServer]) -> None:
            config = ServerConfig(port=0, drain_timeout=10)
            async with tunnel2.open_tunnel_server(config) as srv:
                task_status.started(srv)
                await leave.wait()
            relay_gone.set()

        async with trio.open_nursery() as outer:
            server: TunnelServer = await outer.start(run_relay)
            async with tunnel2.open_tunnel(server.base_url, backend.port) as agent:

                async def client() -> None:
                    result.append(await fetch(agent.public_url + "gate/bytes/200000"))

                outer.start_soon(client)
                await backend.request_received.wait()
                leave.set()  # the relay starts draining with the request in flight
                await wait_until(lambda: all(not u.accepting for u in server.uplinks))
                gate.set()
                await wait_until(lambda: bool(result))
                (response,) = result
                assert response.status == 200
                assert response.body_sha256 == pattern_sha256(200_000)
                # The relay is gone: no listener, and none of its tasks remain.
                await relay_gone.wait()
                assert await connect_refused(server.base_url)
                assert relay_tasks(me) == []
        assert tunnel_tasks(me) == []


async def test_relay_exit_lets_a_slow_reader_finish(nursery: trio.Nursery) -> None:
    size = 4_000_000
    gate = trio.Event()
    backend: Backend = await nursery.start(serve_backend, gated(gate))
    with trio.fail_after(20):
        leave = trio.Event()
        result: list[Response | BaseException] = []

        async def run_relay(*, task_status: trio.TaskStatus[TunnelServer]) -> None:
            config = ServerConfig(port=0, drain_timeout=10)
            async with tunnel2.open_tunnel_server(config) as srv:
                task_status.started(srv)
                await leave.wait()

        async with trio.open_nursery() as outer:
            server: TunnelServer = await outer.start(run_relay)
            async with tunnel2.open_tunnel(server.base_url, backend.port) as agent:

                async def read_slowly() -> None:
                    path = split_url(agent.public_url)[2]
                    # A small receive buffer, read slowly: the relay's writes to this client
                    # block while the tunnel stream has already finished.
                    async with open_client(agent.public_url, rcvbuf=8192) as client:
                        try:
                            response = await client.request(
                                "GET", path + f"gate/bytes/{size}", keep_body=False, pace=0.002
                            )
                        except (h11.RemoteProtocolError, trio.BrokenResourceError) as exc:
                            result.append(exc)
                        else:
                            result.append(response)

                outer.start_soon(read_slowly)
                await backend.request_received.wait()
                leave.set()
                await wait_until(lambda: all(not u.accepting for u in server.uplinks))
                gate.set()
                await wait_until(lambda: bool(result))
                (response,) = result
                assert isinstance(response, Response), f"response cut short: {response!r}"
                assert (response.body_length, response.body_sha256) == (
                    size,
                    pattern_sha256(size),
                )


async def test_agent_survives_a_refusal_while_the_relay_drains(nursery: trio.Nursery) -> None:
    # PROTOCOL.md §3.3: SESSION_UNAVAILABLE means "re-dial later or elsewhere", so an agent
    # that was already serving must keep re-dialling rather than die.
    gate = trio.Event()
    slow: Backend = await nursery.start(serve_backend, gated(gate))
    idle: Backend = await nursery.start(serve_backend, "echo")
    with trio.fail_after(20):
        leave = trio.Event()

        async def run_relay(*, task_status: trio.TaskStatus[TunnelServer]) -> None:
            config = ServerConfig(port=0, drain_timeout=10, tokens=frozenset({"team-token"}))
            async with tunnel2.open_tunnel_server(config) as srv:
                task_status.started(srv)
                await leave.wait()

        async with trio.open_nursery() as outer:
            server: TunnelServer = await outer.start(run_relay)
            async with tunnel2.open_tunnel(
                server.base_url, slow.port, session_id="s", token="team-token"
            ) as busy:
                outer.start_soon(fetch, busy.public_url + "gate/x")
                await slow.request_received.wait()
                async with tunnel2.open_tunnel(
                    server.base_url, idle.port, session_id="s", token="team-token"
                ) as a:
                    assert len(server.uplinks) == 2
                    leave.set()  # GOAWAY: the idle agent's uplink closes at once, it re-dials
                    await wait_until(lambda: a.connections == 1 and a.uplink is None)
                    # Keep draining (the slow request holds it) past the first re-dial.
                    await trio.sleep(1)
                    gate.set()
