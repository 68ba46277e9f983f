"""Tests for the test backend, :mod:`tunnel2.loadtest.backend`.

Real sockets on 127.0.0.1 port 0, started with ``nursery.start(serve_backend, ...)``; h11 is
the client, so every answer is also checked to be valid HTTP/1.1. Timers (``/delay``) run under
``autojump_clock`` over memory sockets only. No timing assertions.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator, Sequence

import h11
import pytest
import trio
import trio.testing

from tunnel2.loadtest.backend import (
    ENDPOINTS,
    Backend,
    BackendConfig,
    BackendStatistics,
    serve_backend,
)

Headers = Sequence[tuple[str, str]]


@pytest.fixture
async def backend(nursery: trio.Nursery) -> Backend:
    config = BackendConfig(max_head_size=2048, max_body_size=300_000)
    started: Backend = await nursery.start(
        functools.partial(serve_backend, "127.0.0.1", 0, config=config)
    )
    return started


class Client:
    """An h11 client over one TCP connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self, method: str, target: str, headers: Headers = (), body: bytes = b""
    ) -> tuple[h11.Response, bytes]:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        all_headers = [("Host", "test"), *headers]
        if body and not any(
            k.lower() in ("content-length", "transfer-encoding") for k, _ in headers
        ):
            all_headers.append(("Content-Length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=target, headers=all_headers))
        assert data is not None
        if body:
            data += self.conn.send(h11.Data(data=body)) or b""
        data += self.conn.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)
        return await self.response()

    async def response(self) -> tuple[h11.Response, bytes]:
        response: h11.Response | None = None
        chunks: list[bytes] = []
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                return response, b"".join(chunks)

    async def at_eof(self) -> bool:
        return await self.stream.receive_some(1) == b""


@pytest.fixture
async def client(backend: Backend) -> AsyncIterator[Client]:
    stream = await trio.open_tcp_stream("127.0.0.1", backend.port)
    async with stream:
        yield Client(stream)


def header(response: h11.Response, name: bytes) -> bytes | None:
    for key, value in response.headers:
        if key == name:
            return bytes(value)
    return None


async def raw_exchange(backend: Backend, data: bytes) -> bytes:
    """Send raw bytes, return everything the backend sends until it closes."""
    async with await trio.open_tcp_stream("127.0.0.1", backend.port) as stream:
        await stream.send_all(data)
        received = bytearray()
        while chunk := await stream.receive_some(65536):
            received += chunk
        return bytes(received)


async def test_started_value_is_the_bound_backend(backend: Backend) -> None:
    assert backend.port != 0
    assert backend.url == f"http://127.0.0.1:{backend.port}"
    assert repr(backend).startswith("<Backend http://127.0.0.1:")


async def test_ping_keep_alive(backend: Backend, client: Client) -> None:
    with trio.fail_after(5):
        for _ in range(3):
            response, body = await client.request("GET", "/loadtest/ping")
            assert (response.status_code, body) == (200, b"pong")
            assert header(response, b"connection") is None
        assert backend.statistics().requests == 3
        assert backend.statistics().connections == 1


async def test_fast_is_json(client: Client) -> None:
    with trio.fail_after(5):
        response, body = await client.request("GET", "/loadtest/fast")
    assert response.status_code == 200
    assert header(response, b"content-type") == b"application/json"
    assert json.loads(body)["status"] == "ok"


async def test_get_describes_the_request(client: Client) -> None:
    with trio.fail_after(5):
        response, body = await client.request(
            "GET", "/loadtest/get?a=1&a=2&b=", [("X-Test", "one"), ("X-Test", "two")]
        )
    assert response.status_code == 200
    document = json.loads(body)
    assert document["method"] == "GET"
    assert document["path"] == "/loadtest/get"
    assert document["query"] == {"a": ["1", "2"], "b": [""]}
    assert document["headers"]["X-Test"] == "one, two"
    assert document["headers"]["Host"] == "test"


async def test_info_lists_every_endpoint(client: Client) -> None:
    with trio.fail_after(5):
        response, body = await client.request("GET", "/loadtest/info")
    assert response.status_code == 200
    listed = {(e["method"], e["path"]) for e in json.loads(body)["endpoints"]}
    assert listed == {(method, path) for method, path, _ in ENDPOINTS}


async def test_delay_answers_without_holding_up_other_connections(
    backend: Backend, client: Client
) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def slow() -> None:
                await client.request("GET", "/loadtest/delay/30000")
                done.set()

            nursery.start_soon(slow)
            # While the slow request waits, another connection gets its answers.
            async with await trio.open_tcp_stream("127.0.0.1", backend.port) as stream:
                other = Client(stream)
                response, body = await other.request("GET", "/loadtest/delay/0")
                assert (response.status_code, json.loads(body)) == (200, {"delay_ms": 0})
            assert not done.is_set()
            nursery.cancel_scope.cancel()


async def test_delay_waits_for_its_milliseconds(autojump_clock: trio.testing.MockClock) -> None:
    backend = Backend(BackendConfig(), "memory", 0)
    client_sock, server_sock = trio.testing.memory_stream_pair()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.serve_connection, server_sock)
            start = trio.current_time()
            await client_sock.send_all(b"GET /loadtest/delay/1500 HTTP/1.1\r\nHost: m\r\n\r\n")
            data = await client_sock.receive_some(65536)
            assert trio.current_time() - start == pytest.approx(1.5)
            assert data.startswith(b"HTTP/1.1 200 OK\r\n")
            assert data.endswith(b'{"delay_ms":1500}')
            await client_sock.aclose()


@pytest.mark.parametrize("size", [0, 10, 65536, 65537, 250_000])
async def test_echo_content_length(client: Client, size: int) -> None:
    body = bytes(i % 251 for i in range(size))
    with trio.fail_after(10):
        response, echoed = await client.request(
            "POST", "/loadtest/echo", [("Content-Type", "x/y"), ("Content-Length", str(size))], body
        )
    assert response.status_code == 200
    assert header(response, b"content-type") == b"x/y"
    assert echoed == body


@pytest.mark.parametrize("size", [5, 250_000])
async def test_echo_chunked(client: Client, size: int) -> None:
    body = bytes(i % 13 for i in range(size))
    with trio.fail_after(10):
        response, echoed = await client.request(
            "POST", "/loadtest/echo", [("Transfer-Encoding", "chunked")], body
        )
    assert response.status_code == 200
    assert echoed == body
    # The connection is still usable afterwards.
    with trio.fail_after(5):
        response, pong = await client.request("GET", "/loadtest/ping")
    assert pong == b"pong"


async def test_echo_answers_expect_100_continue(backend: Backend) -> None:
    with trio.fail_after(5):
        async with await trio.open_tcp_stream("127.0.0.1", backend.port) as stream:
            await stream.send_all(
                b"POST /loadtest/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                b"Expect: 100-continue\r\n\r\n"
            )
            interim = await stream.receive_some(65536)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            await stream.send_all(b"hello")
            final = await stream.receive_some(65536)
            assert final.startswith(b"HTTP/1.1 200 OK\r\n")
            assert final.endswith(b"\r\n\r\nhello")


@pytest.mark.parametrize("size", [0, 1, 65536, 300_000])
async def test_bytes(client: Client, size: int) -> None:
    with trio.fail_after(10):
        response, body = await client.request("GET", f"/loadtest/bytes/{size}")
    assert response.status_code == 200
    assert header(response, b"content-length") == str(size).encode()
    assert len(body) == size


@pytest.mark.parametrize("code", [200, 204, 302, 404, 500, 503])
async def test_status(client: Client, code: int) -> None:
    with trio.fail_after(5):
        response, body = await client.request("GET", f"/loadtest/status/{code}")
        assert response.status_code == code
        # Still keep-alive afterwards, whatever the status.
        response, body = await client.request("GET", "/loadtest/ping")
        assert body == b"pong"


@pytest.mark.parametrize(
    ("target", "status", "reason"),
    [
        ("/nope", 404, b"no endpoint /nope"),
        ("/loadtest/delay/abc", 400, b"delay must be an integer"),
        ("/loadtest/delay/-1", 400, b"delay must be an integer"),
        ("/loadtest/delay/60001", 400, b"0..60000 ms"),
        ("/loadtest/bytes/9999999999999", 400, b"n must be an integer"),
        ("/loadtest/status/99", 400, b"status must be an integer 200..599"),
        ("/loadtest/status/600", 400, b"status must be an integer 200..599"),
    ],
)
async def test_bad_input_gets_4xx_with_one_line_reason(
    client: Client, target: str, status: int, reason: bytes
) -> None:
    with trio.fail_after(5):
        response, body = await client.request("GET", target)
        assert response.status_code == status
        assert body.endswith(b"\n")
        assert body.count(b"\n") == 1
        assert reason in body
        # A well-framed bad request leaves the connection usable.
        response, body = await client.request("GET", "/loadtest/ping")
        assert body == b"pong"


@pytest.mark.parametrize(
    ("method", "target", "allow"),
    [
        ("POST", "/loadtest/ping", b"GET"),
        ("DELETE", "/loadtest/get", b"GET"),
        ("GET", "/loadtest/echo", b"POST"),
    ],
)
async def test_wrong_method_is_405(client: Client, method: str, target: str, allow: bytes) -> None:
    with trio.fail_after(5):
        response, body = await client.request(
            method, target, body=b"xyz" if method == "POST" else b""
        )
        assert response.status_code == 405
        assert header(response, b"allow") == allow
        assert body.count(b"\n") == 1
        response, body = await client.request("GET", "/loadtest/ping")
        assert body == b"pong"


async def test_oversize_body_is_413_and_closes(backend: Backend) -> None:
    with trio.fail_after(5):
        data = await raw_exchange(
            backend,
            b"POST /loadtest/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 300001\r\n\r\n",
        )
    assert data.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close\r\n" in data
    assert data.endswith(b"body of 300001 bytes over limit 300000\n")


async def test_oversize_chunked_body_is_413(backend: Backend) -> None:
    chunk = b"%x\r\n%b\r\n" % (100_000, b"a" * 100_000)
    with trio.fail_after(5):
        data = await raw_exchange(
            backend,
            b"POST /loadtest/get HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunk * 4,
        )
    assert data.startswith(b"HTTP/1.1 413 ")


async def test_echo_over_the_limit_mid_answer_cuts_the_connection(backend: Backend) -> None:
    chunk = b"%x\r\n%b\r\n" % (100_000, b"a" * 100_000)
    received = bytearray()
    with trio.fail_after(10):
        async with await trio.open_tcp_stream("127.0.0.1", backend.port) as stream:

            async def send() -> None:
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(
                        b"POST /loadtest/echo HTTP/1.1\r\nHost: t\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 4
                    )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                with contextlib.suppress(trio.BrokenResourceError):
                    while data := await stream.receive_some(65536):
                        received += data
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Transfer-Encoding: chunked" in received
    assert b"413" not in received  # no error status after an answer has started
    assert not received.endswith(b"0\r\n\r\n")  # and the body is visibly incomplete


async def test_oversize_head_is_431(backend: Backend) -> None:
    with trio.fail_after(5):
        data = await raw_exchange(
            backend,
            b"GET /loadtest/ping HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n",
        )
    assert data.startswith(b"HTTP/1.1 431 ")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /loadtest/ping HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /loadtest/ping HTTP/2.0\r\nHost: t\r\n\r\n", 505),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /loadtest/ping HTTP/1.1\nHost: t\n\n", 400),
        (b"POST /loadtest/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST /loadtest/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST /loadtest/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"zz\r\n", 400),
    ],
)  # fmt: skip
async def test_malformed_request_is_answered_and_closed(
    backend: Backend, request_bytes: bytes, status: int
) -> None:
    with trio.fail_after(5):
        data = await raw_exchange(backend, request_bytes)
    assert data.startswith(b"HTTP/1.1 %d " % status)
    assert b"Connection: close\r\n" in data
    assert data.count(b"\n", data.index(b"\r\n\r\n") + 4) == 1


async def test_http10_closes_unless_keep_alive_asked(backend: Backend) -> None:
    with trio.fail_after(5):
        data = await raw_exchange(backend, b"GET /loadtest/ping HTTP/1.0\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Connection: close\r\n" in data
        assert data.endswith(b"pong")
        data = await raw_exchange(
            backend,
            b"GET /loadtest/ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
            b"GET /loadtest/fast HTTP/1.0\r\n\r\n",
        )
    first, second = data.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert b"Connection: keep-alive\r\n" in first
    assert first.endswith(b"pong")
    assert b"Connection: close\r\n" in second


async def test_connection_close_is_honoured(backend: Backend) -> None:
    with trio.fail_after(5):
        data = await raw_exchange(
            backend, b"GET /loadtest/ping HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
    assert data.endswith(b"Connection: close\r\n\r\npong")


async def test_pipelined_requests_are_answered_in_order(backend: Backend) -> None:
    requests = (
        b"GET /loadtest/ping HTTP/1.1\r\nHost: t\r\n\r\n"
        b"POST /loadtest/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /loadtest/delay/10 HTTP/1.1\r\nHost: t\r\n\r\n"
        b"GET /loadtest/nope HTTP/1.1\r\nHost: t\r\n\r\n"
        b"GET http://t/loadtest/status/201 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    with trio.fail_after(5):
        data = await raw_exchange(backend, requests)
    answers = []
    conn = h11.Connection(h11.CLIENT)
    for method in ("GET", "POST", "GET", "GET", "GET"):
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "t")]))
        conn.send(h11.EndOfMessage())
        conn.receive_data(data)
        status, body = 0, b""
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        answers.append((status, body))
        data = conn.trailing_data[0]
    assert [status for status, _ in answers] == [200, 200, 200, 404, 201]
    assert answers[0][1] == b"pong"
    assert answers[1][1] == b"abc"
    assert answers[2][1] == b'{"delay_ms":10}'
    assert data == b""


@pytest.mark.parametrize(
    "partial",
    [
        b"",
        b"GET /loadtest/pi",
        b"POST /loadtest/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nab",
    ],
)
async def test_client_closing_mid_request_ends_the_connection(partial: bytes) -> None:
    backend = Backend(BackendConfig(), "memory", 0)
    client_sock, server_sock = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.serve_connection, server_sock)
            await client_sock.send_all(partial)
            await client_sock.aclose()
    requests = 1 if b"\r\n\r\n" in partial else 0
    assert backend.statistics() == BackendStatistics(connections=0, requests=requests)


async def test_cancelling_serve_backend_closes_connections(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                backend: Backend = await inner.start(serve_backend, "127.0.0.1", 0)
                stream = await trio.open_tcp_stream("127.0.0.1", backend.port)
                client = Client(stream)
                await client.request("GET", "/loadtest/ping")
                scope.cancel()
        assert await client.at_eof()
        await stream.aclose()


async def test_bind_error_surfaces_from_start(backend: Backend, nursery: trio.Nursery) -> None:
    with trio.fail_after(5), pytest.raises(OSError, match="in use"):
        # SO_REUSEADDR does not allow two listeners on one port.
        await nursery.start(serve_backend, "127.0.0.1", backend.port)
