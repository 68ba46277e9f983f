"""The entry and agent end to end over in-memory transports (no sockets).

An ASGI app is the target, so every byte the backend sees is observable; the client side is
h11 over a memory stream, or raw bytes where h11 would refuse to send what we test.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import h11
import pytest
import trio
import trio.testing

from tunnel2 import _http11 as http
from tunnel2.agent import AgentConfig
from tunnel2.entry import _forwarding_lines
from tunnel2.server import ServerConfig, parse_networks
from tunnel2.testing import MemoryTunnel, open_memory_tunnel

if TYPE_CHECKING:
    from tunnel2.asgi import AsgiApp

Scope = MutableMapping[str, Any]


async def read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += bytes(message.get("body", b""))
        if not message.get("more_body"):
            return body


async def echo_app(scope: Scope, receive: Any, send: Any) -> None:
    """Answers with JSON describing the request it saw."""
    body = await read_body(receive)
    document = {
        "method": scope["method"],
        "path": scope["path"],
        "raw_path": scope["raw_path"].decode(),
        "query": scope["query_string"].decode("latin-1"),
        "headers": [[n.decode(), v.decode("latin-1")] for n, v in scope["headers"]],
        "body": body.decode("latin-1"),
        "client": scope["client"],
    }
    payload = json.dumps(document).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"set-cookie", b"a=1"),
                (b"set-cookie", b"b=2"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def streaming_app(chunks: list[bytes]) -> AsgiApp:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


@asynccontextmanager
async def tunnel_for(
    app: AsgiApp,
    config: ServerConfig | None = None,
    agent_config: AgentConfig | None = None,
) -> AsyncIterator[MemoryTunnel]:
    with trio.fail_after(10):
        async with open_memory_tunnel(
            app, config=config, agent_config=agent_config, asgi_loop="trio"
        ) as tunnel:
            yield tunnel


async def raw_exchange(tunnel: MemoryTunnel, data: bytes) -> bytes:
    """Send raw bytes on a new client connection; return everything until it closes."""
    stream = tunnel.open_client_stream()
    await stream.send_all(data)
    received = bytearray()
    while chunk := await stream.receive_some(65536):
        received += chunk
    await stream.aclose()
    return bytes(received)


def header_values(document: dict[str, Any], name: str) -> list[str]:
    return [v for n, v in document["headers"] if n == name]


# --- HTTP semantics ------------------------------------------------------------------------


async def test_path_query_and_headers_pass_through() -> None:
    async with tunnel_for(echo_app) as tunnel:
        response = await tunnel.request(
            "GET",
            "/a/b%2Fc?x=1&x=2&empty=&flag",
            headers=[("X-Multi", "one"), ("X-Multi", "two"), ("X-Forwarded-For", "10.9.8.7")],
        )
    assert response.status == 200
    seen = json.loads(response.body)
    assert seen["raw_path"] == "/a/b%2Fc"
    assert seen["query"] == "x=1&x=2&empty=&flag"
    assert header_values(seen, "x-multi") == ["one", "two"]
    assert header_values(seen, "host") == ["relay.test"]
    # A memory stream has no peer address; the visitor's X-Forwarded-For is not kept.
    assert header_values(seen, "x-forwarded-for") == ["unknown"]
    assert header_values(seen, "forwarded") == ['for=unknown;host="relay.test";proto=http']
    assert seen["client"] is None
    assert header_values(seen, "x-forwarded-proto") == ["http"]
    assert header_values(seen, "x-forwarded-host") == ["relay.test"]
    assert [v for n, v in response.headers if n == b"set-cookie"] == [b"a=1", b"b=2"]


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"])
async def test_every_method_reaches_the_app(method: str) -> None:
    async with tunnel_for(echo_app) as tunnel:
        response = await tunnel.request(method, "/m", body=b"payload" if method != "GET" else b"")
    seen = json.loads(response.body)
    assert seen["method"] == method
    assert seen["body"] == ("payload" if method != "GET" else "")


async def test_session_prefix_without_trailing_path_maps_to_root() -> None:
    async with tunnel_for(echo_app) as tunnel:
        response = await tunnel.request("GET", tunnel.path_prefix + "?q=1", raw_path=True)
    seen = json.loads(response.body)
    assert (seen["path"], seen["query"]) == ("/", "q=1")


async def test_chunked_request_body_is_reassembled() -> None:
    async with tunnel_for(echo_app) as tunnel:
        request = (
            f"POST {tunnel.path_prefix}/up HTTP/1.1\r\nHost: relay.test\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        ).encode()
        answer = await raw_exchange(tunnel, request)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    seen = json.loads(body)
    assert seen["body"] == "hello world"
    # The backend saw a chunked body, not the client's framing headers twice.
    assert header_values(seen, "transfer-encoding") == ["chunked"]


async def test_streamed_response_is_chunked_for_http11() -> None:
    chunks = [b"first,", b"second,", b"third"]
    async with tunnel_for(streaming_app(chunks)) as tunnel:
        response = await tunnel.request("GET", "/stream")
        assert response.body == b"first,second,third"
        assert response.header("transfer-encoding") == "chunked"


async def test_http10_client_gets_a_close_delimited_body() -> None:
    async with tunnel_for(streaming_app([b"abc", b"def"])) as tunnel:
        answer = await raw_exchange(tunnel, f"GET {tunnel.path_prefix}/ HTTP/1.0\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower()
    assert body == b"abcdef"


async def test_http10_keep_alive_client_keeps_its_connection() -> None:
    async with tunnel_for(echo_app) as tunnel:
        stream = tunnel.open_client_stream()
        request = f"GET {tunnel.path_prefix}/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        for _ in range(2):
            await stream.send_all(request.encode())
            conn = h11.Connection(h11.CLIENT)
            conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            conn.send(h11.EndOfMessage())
            status = 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    assert (b"connection", b"keep-alive") in list(event.headers)
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert status == 200
        await stream.aclose()


async def test_keep_alive_and_pipelining_on_one_connection() -> None:
    async with tunnel_for(echo_app) as tunnel:
        one = f"GET {tunnel.path_prefix}/one HTTP/1.1\r\nHost: relay.test\r\n\r\n"
        two = (
            f"GET {tunnel.path_prefix}/two HTTP/1.1\r\nHost: relay.test\r\n"
            "Connection: close\r\n\r\n"
        )
        answer = await raw_exchange(tunnel, (one + two).encode())
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(answer)
    paths = []
    for _ in range(2):
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        body = b""
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if isinstance(event, h11.Data):
                body += event.data
        paths.append(json.loads(body)["path"])
        if not paths[1:]:
            conn.start_next_cycle()
    assert paths == ["/one", "/two"]


async def test_head_204_and_304_have_no_body() -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await read_body(receive)
        status = int(scope["path"].strip("/"))
        headers = [(b"content-length", b"42")] if scope["method"] == "HEAD" else []
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async with tunnel_for(app) as tunnel:
        head = await tunnel.request("HEAD", "/200")
        no_content = await tunnel.request("GET", "/204")
        not_modified = await tunnel.request("GET", "/304")
    assert (head.status, head.body, head.header("content-length")) == (200, b"", "42")
    assert (no_content.status, no_content.body) == (204, b"")
    assert (not_modified.status, not_modified.body) == (304, b"")


async def test_expect_100_continue_is_answered_by_the_entry() -> None:
    async with tunnel_for(echo_app) as tunnel:
        stream = tunnel.open_client_stream()
        await stream.send_all(
            (
                f"POST {tunnel.path_prefix}/ HTTP/1.1\r\nHost: relay.test\r\n"
                "Content-Length: 4\r\nExpect: 100-continue\r\n\r\n"
            ).encode()
        )
        interim = await stream.receive_some(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        await stream.send_all(b"body")
        rest = bytes(interim[len(b"HTTP/1.1 100 Continue\r\n\r\n") :])
        while b'"body": "body"' not in rest:
            rest += await stream.receive_some(65536)
        assert rest.startswith(b"HTTP/1.1 200")
        await stream.aclose()


# --- refusals at the entry -----------------------------------------------------------------


async def test_unknown_session_is_404_naming_it() -> None:
    async with tunnel_for(echo_app) as tunnel:
        response = await tunnel.request("GET", "/session/nosuch/x", raw_path=True)
        outside = await tunnel.request("GET", "/elsewhere", raw_path=True)
    assert response.status == 404
    assert "nosuch" in response.text
    assert outside.status == 404
    assert "/session/" in outside.text


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /session/x/ HTTP/1.1\r\nHost: a\r\nBad Header: 1\r\n\r\n", 400),
        (b"GET /session/x/ HTTP/1.1\r\n\r\n", 400),  # no Host
        (
            b"POST /session/x/ HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"GET /session/x/ HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"POST /session/x/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (
            b"POST /session/x/ HTTP/1.1\r\nHost: a\r\nContent-Length: 9223372036854775808\r\n\r\n",
            400,
        ),
        (
            b"POST /session/x/ HTTP/1.1\r\nHost: a\r\nContent-Length: "
            + b"9" * 30000
            + b"\r\n\r\n",
            400,
        ),
        (b"GET /session/x/ HTTP/1.1\r\nHost: a\r\nConnection: " + b"a," * 40 + b"b\r\n\r\n", 400),
    ],
    ids=[
        "bad-header",
        "no-host",
        "cl-and-te",
        "version",
        "gzip-te",
        "cl-2**63",
        "cl-digits",
        "conn",
    ],
)
async def test_malformed_requests_are_refused(request_bytes: bytes, status: int) -> None:
    async with tunnel_for(echo_app) as tunnel:
        answer = await raw_exchange(tunnel, request_bytes)
    assert answer.startswith(b"HTTP/1.1 %d " % status)
    assert b"Connection: close" in answer


async def test_connection_header_names_are_cut_without_a_regex_per_request() -> None:
    # Names with regex syntax in them are plain names (they used to be compiled into a regex).
    async with tunnel_for(echo_app) as tunnel:
        response = await tunnel.request(
            "GET",
            "/c",
            headers=[("Connection", "x.y, keep-alive"), ("x.y", "cut"), ("xzy", "kept")],
        )
    seen = json.loads(response.body)
    assert header_values(seen, "x.y") == []
    assert header_values(seen, "xzy") == ["kept"]


async def test_oversize_head_is_431() -> None:
    async with tunnel_for(echo_app, ServerConfig(max_head_size=1024)) as tunnel:
        answer = await raw_exchange(
            tunnel,
            f"GET {tunnel.path_prefix}/ HTTP/1.1\r\nHost: a\r\nX-Big: {'x' * 4000}\r\n\r\n".encode(),  # noqa: E501
        )
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b"1024" in answer


async def test_oversize_body_is_413() -> None:
    seen: list[bytes] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # the lifespan scope
            return
        seen.append(await read_body(receive))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async with tunnel_for(app, ServerConfig(max_body_size=10)) as tunnel:
        declared = await tunnel.request("POST", "/", body=b"x" * 11)
        chunked = await raw_exchange(
            tunnel,
            (
                f"POST {tunnel.path_prefix}/ HTTP/1.1\r\nHost: a\r\n"
                "Transfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n"
            ).encode(),
        )
        fits = await tunnel.request("POST", "/", body=b"x" * 10)
    assert declared.status == 413
    assert "10" in declared.text
    assert chunked.startswith(b"HTTP/1.1 413 ")
    assert fits.status == 200
    assert seen == [b"x" * 10]


# --- failures past the entry -----------------------------------------------------------------


async def test_no_response_in_time_is_504_and_cancels_the_app(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cancelled = trio.Event()

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # the lifespan scope
            return
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    async with tunnel_for(app, ServerConfig(request_timeout=5, ping_interval=0)) as tunnel:
        response = await tunnel.request("GET", "/slow")
        await cancelled.wait()
        assert response.status == 504
        assert "5s" in response.text
        uplink = tunnel.agent.uplink
        assert uplink is not None
        await trio.testing.wait_all_tasks_blocked()
        assert uplink.statistics().open_streams == 0


async def test_saturated_agent_answers_503() -> None:
    release = trio.Event()
    started = 0

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # the lifespan scope
            return
        nonlocal started
        started += 1
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    statuses: list[int] = []
    agent_config = AgentConfig(max_concurrent=1, max_queued=1)
    async with tunnel_for(app, agent_config=agent_config) as tunnel:

        async def one() -> None:
            statuses.append((await tunnel.request("GET", "/")).status)

        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(one)
            await trio.testing.wait_all_tasks_blocked()
            third = await tunnel.request("GET", "/")
            release.set()
    assert third.status == 503
    assert "full" in third.text
    assert sorted(statuses) == [200, 200]
    assert started == 2


async def test_agent_gone_mid_request_is_502() -> None:
    tunnel_box: list[MemoryTunnel] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        uplink = tunnel_box[0].agent.uplink
        assert uplink is not None
        uplink.close("agent crashed")
        await trio.sleep_forever()

    async with tunnel_for(app) as tunnel:
        tunnel_box.append(tunnel)
        response = await tunnel.request("GET", "/")
    assert response.status == 502
    assert "disconnected" in response.text


async def test_app_exception_is_500() -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    async with tunnel_for(app) as tunnel:
        response = await tunnel.request("GET", "/")
        again = await tunnel.request("GET", "/")
    assert response.status == 500
    assert "exception" in response.text
    assert again.status == 500


async def test_client_gone_mid_response_cancels_the_app() -> None:
    finished = trio.Event()
    outcome: list[str] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while True:
                await send({"type": "http.response.body", "body": b"x" * 1024, "more_body": True})
        except BaseException as exc:
            outcome.append(type(exc).__name__)
            raise
        finally:
            finished.set()

    async with tunnel_for(app) as tunnel:
        stream = tunnel.open_client_stream()
        await stream.send_all(f"GET {tunnel.path_prefix}/ HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        first = await stream.receive_some(65536)
        assert first.startswith(b"HTTP/1.1 200")
        await stream.aclose()
        await finished.wait()
        await trio.testing.wait_all_tasks_blocked()
        uplink = tunnel.agent.uplink
        assert uplink is not None
        assert uplink.statistics().open_streams == 0
        assert len(tunnel.server.uplinks) == 1
        assert all(u.statistics().open_streams == 0 for u in tunnel.server.uplinks)
    # Cancelled by the reset, or the reset itself if the app was sending at that moment.
    assert outcome[:1] in (["Cancelled"], ["StreamReset"])


async def test_large_bodies_stream_both_ways() -> None:
    size = 5 * 1024 * 1024

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        total = 0
        while True:
            message = await receive()
            total += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        block = b"y" * 65536
        for _ in range(total // len(block)):
            await send({"type": "http.response.body", "body": block, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async with tunnel_for(app) as tunnel:
        response = await tunnel.request("POST", "/", body=b"x" * size)
    assert response.status == 200
    assert len(response.body) == size


async def test_connection_and_stream_limits_answer_503() -> None:
    release = trio.Event()

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # the lifespan scope
            return
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    config = ServerConfig(max_visitor_connections=2, max_streams_per_agent=1)
    async with tunnel_for(app, config) as tunnel:
        first = tunnel.open_client_stream()
        await first.send_all(f"GET {tunnel.path_prefix}/ HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        await trio.testing.wait_all_tasks_blocked()
        # A second request while the agent's one stream is busy: too many streams.
        busy = await tunnel.request("GET", "/")
        # Two connections open (the first, and an idle one): a third is refused.
        idle = tunnel.open_client_stream()
        await trio.testing.wait_all_tasks_blocked()
        refused = await raw_exchange(tunnel, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        release.set()
        answer = await first.receive_some(65536)
        await idle.aclose()
        await first.aclose()
    assert busy.status == 503
    assert "requests in flight" in busy.text
    assert refused.startswith(b"HTTP/1.1 503 ")
    assert b"maximum of 2 visitor connections" in refused
    assert answer.startswith(b"HTTP/1.1 200 ")


async def test_hop_by_hop_request_headers_are_not_forwarded() -> None:
    async with tunnel_for(echo_app) as tunnel:
        response = await tunnel.request(
            "GET",
            "/",
            headers=[
                ("Connection", "keep-alive, X-Private"),
                ("X-Private", "secret"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Proxy-Authorization", "Basic eDp5"),
                ("X-Forwarded-Proto", "spoofed"),
                ("X-Kept", "yes"),
            ],
        )
    seen = {name for name, _ in json.loads(response.body)["headers"]}
    assert "x-kept" in seen
    assert not seen & {"connection", "x-private", "keep-alive", "te", "proxy-authorization"}
    assert header_values(json.loads(response.body), "x-forwarded-proto") == ["http"]


async def test_empty_body_with_content_length_zero_is_answered() -> None:
    async with tunnel_for(echo_app) as tunnel:
        answer = await raw_exchange(
            tunnel,
            (
                f"POST {tunnel.path_prefix}/empty HTTP/1.1\r\nHost: a\r\n"
                "Content-Length: 0\r\nConnection: close\r\n\r\n"
            ).encode(),
        )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    seen = json.loads(body)
    assert seen["body"] == ""
    assert header_values(seen, "content-length") == ["0"]


async def test_bare_lf_request_is_400_and_the_relay_keeps_serving() -> None:
    async with tunnel_for(echo_app) as tunnel:
        answer = await raw_exchange(tunnel, b"GET / HTTP/1.1\nHost: a\n\n")
        after = await tunnel.request("GET", "/still")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"bare LF" in answer
    assert after.status == 200


async def test_host_routing_under_a_domain() -> None:
    async with tunnel_for(echo_app, ServerConfig(domain="tunnels.test")) as tunnel:
        session = tunnel.agent.session_id
        assert tunnel.public_url == f"http://{session}.tunnels.test/"
        assert tunnel.agent.public_urls[1] == f"http://relay.test/session/{session}/"
        routed = await tunnel.request(
            "GET", "/by/host?q=1", headers=[("Host", f"{session}.tunnels.test:8000")], raw_path=True
        )
        unknown = await tunnel.request(
            "GET", "/", headers=[("Host", "nosuch.tunnels.test")], raw_path=True
        )
    seen = json.loads(routed.body)
    assert (seen["path"], seen["query"]) == ("/by/host", "q=1")
    assert unknown.status == 404
    assert "nosuch" in unknown.text


# --- sizes: no frame the peer cannot accept (PROTOCOL.md §4.2) -----------------------------


async def test_request_head_over_the_agents_frame_limit_is_431_and_the_uplink_lives() -> None:
    async with tunnel_for(echo_app, agent_config=AgentConfig(max_frame_size=1024)) as tunnel:
        (uplink,) = tunnel.server.uplinks
        big = await tunnel.request("GET", "/big", headers=[("X-Big", "b" * 1000)])
        after = await tunnel.request("GET", "/after")
        assert tunnel.server.uplinks == {uplink}
        assert tunnel.agent.connections == 1
    assert big.status == 431
    assert f"as forwarded to session {tunnel.agent.session_id}" in big.text
    assert "over the tunnel's frame limit of 1024" in big.text
    assert after.status == 200


async def test_response_head_over_the_frame_limit_is_502_and_the_uplink_lives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["path"] != "/big":
            await echo_app(scope, receive, send)
            return
        await read_body(receive)
        headers = [(b"x-big", b"b" * 2000)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"never sent"})

    caplog.set_level(logging.INFO)
    async with tunnel_for(app, agent_config=AgentConfig(max_frame_size=1024)) as tunnel:
        (uplink,) = tunnel.server.uplinks
        big = await tunnel.request("GET", "/big")
        after = await tunnel.request("GET", "/after")
        assert tunnel.server.uplinks == {uplink}
        assert tunnel.agent.connections == 1
    assert big.status == 502
    assert big.text == (
        f"502 Bad Gateway: session {tunnel.agent.session_id}: "
        "the application's response head is too large for the tunnel\n"
    )
    assert after.status == 200
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "too large for the tunnel" in warning.getMessage()


# --- forwarded addresses (PROTOCOL.md §4.2) -------------------------------------------------


def forwarding(
    *fields: bytes, peer: tuple[bytes, int] = (b"192.0.2.1", 5000), trusted: tuple[str, ...] = ()
) -> dict[str, str]:
    head = b"\r\n".join([b"GET / HTTP/1.1", b"Host: h.test", *fields, b"", b""])
    request = http.parse_request_head(head)
    lines = _forwarding_lines(request, peer, b"http", b"h.test", parse_networks(trusted))
    assert lines.endswith(b"\r\n\r\n")
    parsed = http.parse_response_head(b"HTTP/1.1 200 OK\r\n" + lines)
    return {n.decode().lower(): v.decode() for n, v in parsed.headers}


def test_forwarding_lines_from_an_untrusted_peer_ignore_the_visitor() -> None:
    lines = forwarding(
        b"X-Forwarded-For: 6.6.6.6", b"X-Forwarded-Proto: https", trusted=("10.0.0.0/8",)
    )
    assert lines == {
        "x-forwarded-for": "192.0.2.1",
        "x-forwarded-proto": "http",
        "x-forwarded-host": "h.test",
        "forwarded": 'for="192.0.2.1:5000";host="h.test";proto=http',
    }


def test_forwarding_lines_walk_back_trusted_proxies() -> None:
    trusted = ("192.0.2.0/24", "10.0.0.0/8")
    chain = b"X-Forwarded-For: 6.6.6.6, 198.51.100.4:1234, 10.1.1.1"
    lines = forwarding(chain, b"X-Forwarded-Proto: HTTPS, http", trusted=trusted)
    assert lines["x-forwarded-for"] == "6.6.6.6, 198.51.100.4:1234, 10.1.1.1, 192.0.2.1"
    assert lines["x-forwarded-proto"] == "https"
    assert lines["forwarded"] == (
        'for=198.51.100.4;host="h.test";proto=https, for=10.1.1.1, for="192.0.2.1:5000"'
    )
    # A trusted peer that forwards nothing is the client itself.
    assert forwarding(trusted=trusted)["forwarded"] == (
        'for="192.0.2.1:5000";host="h.test";proto=http'
    )
    # Every element trusted: the leftmost is the client.
    assert forwarding(b"X-Forwarded-For: 10.0.0.2, 10.0.0.3", trusted=trusted)["forwarded"] == (
        'for=10.0.0.2;host="h.test";proto=http, for=10.0.0.3, for="192.0.2.1:5000"'
    )


def test_forwarding_lines_from_a_trusted_peer_are_still_checked() -> None:
    trusted = ("192.0.2.1",)
    lines = forwarding(
        b"X-Forwarded-For: not-an-address",
        b"X-Forwarded-Proto: javascript",
        b'X-Forwarded-Host: a";proto=https',
        trusted=trusted,
    )
    assert lines["x-forwarded-proto"] == "http"
    assert lines["x-forwarded-host"] == "h.test"
    assert lines["forwarded"] == 'for=unknown;host="h.test";proto=http, for="192.0.2.1:5000"'
    # The walk is bounded: a chain of trusted addresses stops after 16 of them.
    long_chain = b"X-Forwarded-For: 6.6.6.6, " + b", ".join([b"192.0.2.1"] * 40)
    forwarded = forwarding(long_chain, trusted=trusted)["forwarded"]
    assert forwarded.count("for=") == 17 + 1
    assert "6.6.6.6" not in forwarded


def test_forwarding_lines_for_ipv6_and_mapped_peers() -> None:
    v6 = forwarding(peer=(b"2001:db8::1", 443))
    assert v6["forwarded"] == 'for="[2001:db8::1]:443";host="h.test";proto=http'
    assert v6["x-forwarded-for"] == "2001:db8::1"
    mapped = forwarding(
        b"X-Forwarded-For: ::1", peer=(b"::ffff:192.0.2.1", 1), trusted=("192.0.2.1",)
    )
    assert mapped["forwarded"] == (
        'for="[::1]";host="h.test";proto=http, for="[::ffff:192.0.2.1]:1"'
    )


def test_trusted_proxies_must_be_networks() -> None:
    with pytest.raises(ValueError, match="'not-a-cidr' is not an IP network"):
        ServerConfig(trusted_proxies=("10.0.0.0/8", "not-a-cidr"))


async def test_visitor_forged_forwarding_headers_never_reach_the_app() -> None:
    forged = [
        ("X-Forwarded-For", "6.6.6.6"),
        ("Forwarded", "for=6.6.6.6"),
        ("X-Real-IP", "6.6.6.6"),
        ("X-Forwarded-Proto", "https"),
    ]
    async with tunnel_for(echo_app, ServerConfig(trusted_proxies=("0.0.0.0/0",))) as tunnel:
        response = await tunnel.request("GET", "/", headers=forged)
    seen = json.loads(response.body)
    assert seen["client"] is None
    assert not any("6.6.6.6" in value for _, value in seen["headers"])
    assert header_values(seen, "x-forwarded-proto") == ["http"]


async def test_the_path_form_names_its_prefix_and_the_host_form_none() -> None:
    forged = [("X-Forwarded-Prefix", "/evil"), ("x-forwarded-prefix", "/evil2")]
    async with tunnel_for(echo_app, ServerConfig(domain="tunnels.test")) as tunnel:
        session = tunnel.agent.session_id
        by_path = await tunnel.request("GET", "/a?b=1", headers=forged)
        by_host = await tunnel.request(
            "GET", "/a", headers=[("Host", f"{session}.tunnels.test"), *forged], raw_path=True
        )
    assert header_values(json.loads(by_path.body), "x-forwarded-prefix") == [f"/session/{session}"]
    assert header_values(json.loads(by_host.body), "x-forwarded-prefix") == []
