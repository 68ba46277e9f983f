"""The inspector (tunnel2.inspect): the ring, redaction, truncation, replay, its web API.

Over in-memory tunnels (ASGI apps, or a real backend on 127.0.0.1 port 0) and over real
sockets (relay, agent and admin endpoint on 127.0.0.1 port 0). The page itself is tested in
headless Chromium (test_inspect_browser.py). Every test bounded with ``trio.fail_after``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from httpbackend import Backend, serve_backend
from test_admin import get
from test_cli import CLI, run
from test_upgrade import upgrading_backend

import tunnel2
import tunnel2.aio
from tunnel2 import cli
from tunnel2.agent import Agent, AgentConfig, websocket_connector
from tunnel2.inspect import (
    REDACTED,
    Exchange,
    Inspector,
    InspectorApp,
    _exchange,
    _Record,
    _RecordingStream,
)
from tunnel2.server import ServerConfig
from tunnel2.testing import open_memory_tunnel
from tunnel2.uplink import TunnelStream

Scope = MutableMapping[str, Any]
INSPECT = AgentConfig(inspect=True)
TIMEOUT = 10


async def app(scope: Scope, receive: Any, send: Any) -> None:
    """Echoes the request body after ``you sent: ``; sets a cookie; /missing is 404."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    status = 404 if scope["path"] == "/missing" else 200
    headers = [(b"set-cookie", b"session=s3cret-cookie"), (b"content-type", b"text/plain")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"you sent: " + body})


def free_port() -> int:
    """A port nothing listens on (bound and closed at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def call(
    asgi: InspectorApp,
    path: str,
    method: str = "GET",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[int, Any]:
    """One request to the inspector's ASGI app, in-process; JSON bodies decoded."""
    status, headers_sent, body = await call_raw(asgi, path, method, headers)
    return status, json.loads(body) if headers_sent.get(
        b"content-type"
    ) == b"application/json" else body


async def call_raw(
    asgi: InspectorApp,
    path: str,
    method: str = "GET",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request to the inspector's ASGI app, in-process: status, head fields, body."""
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    if headers is None:
        headers = [(b"host", b"127.0.0.1:9101")]
        if method == "POST":
            headers.append((b"content-type", b"application/json"))
    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    await asgi(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return sent[0]["status"], dict(sent[0]["headers"]), body


def inspector_of(agent: Agent) -> Inspector:
    assert agent.inspector is not None
    return agent.inspector


# --- off means off ---------------------------------------------------------------------


async def test_no_wrapper_when_inspection_is_off() -> None:
    async def handler(stream: TunnelStream) -> int | None:
        raise AssertionError("not called")

    connector = websocket_connector("http://127.0.0.1:1")  # never dialled here
    plain = Agent(connector, handler)
    assert plain.inspector is None
    assert plain._handler is handler
    with pytest.raises(RuntimeError, match="inspection is off"):
        plain.requests()
    with pytest.raises(RuntimeError, match="inspection is off"), trio.testing.assert_checkpoints():
        await plain.replay(1)
    inspecting = Agent(connector, handler, INSPECT)
    assert inspecting.inspector is not None
    assert inspecting._handler == inspecting.inspector.handle
    assert inspecting.inspector.handler is handler


def test_recording_stream_has_every_public_member_of_tunnel_stream() -> None:
    stream = TunnelStream(SimpleNamespace(_initial_window=1), 1, None)  # type: ignore[arg-type]
    public = {name for name in dir(stream) if not name.startswith("_")}
    mine = {name for name in dir(_RecordingStream) if not name.startswith("_")}
    assert public == mine


def test_bad_sizes_are_refused() -> None:
    async def handler(stream: TunnelStream) -> int | None:
        return None

    with pytest.raises(ValueError, match="at least 1"):
        Inspector(handler, capacity=0)
    with pytest.raises(ValueError, match="negative"):
        Inspector(handler, body_bytes=-1)


# --- what is recorded ------------------------------------------------------------------


async def test_ring_keeps_the_last_capacity_exchanges() -> None:
    config = AgentConfig(inspect=True, inspect_capacity=3)
    with trio.fail_after(TIMEOUT):
        async with open_memory_tunnel(app, agent_config=config, asgi_loop="trio") as tunnel:
            for n in range(5):
                await tunnel.request("GET", f"/n/{n}")
            kept = tunnel.agent.requests()
            assert [e.id for e in kept] == [3, 4, 5]  # oldest first
            assert [e.target for e in kept] == ["/n/2", "/n/3", "/n/4"]
            inspector = inspector_of(tunnel.agent)
            assert inspector.oldest_id == 3
            with pytest.raises(KeyError, match="no exchange 2 is kept"):
                inspector.get(2)
            with pytest.raises(KeyError):
                inspector.get(6)
            status, listing = await call(InspectorApp(inspector), "/api/requests")
    assert status == 200
    assert [e["id"] for e in listing["requests"]] == [3, 4, 5]
    assert listing["capacity"] == 3


async def test_exchange_fields() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_memory_tunnel(app, agent_config=INSPECT, asgi_loop="trio") as tunnel:
            await tunnel.request("POST", "/form?x=1", body=b"a=b")
            await tunnel.request("GET", "/missing")
            first, second = tunnel.agent.requests()
    assert (first.method, first.target, first.http_version) == ("POST", "/form?x=1", "1.1")
    assert (first.status, first.reason) == (200, "OK")
    assert first.request_body == b"a=b"
    assert first.request_size == 3
    assert first.response_body == b"you sent: a=b"
    assert first.response_size == len(b"you sent: a=b")
    assert first.complete
    assert first.error is None
    assert first.replay_of is None
    assert first.duration is not None
    assert first.response_after is not None
    assert 0 <= first.response_after <= first.duration
    assert ("content-type", "text/plain") in first.response_headers
    assert second.status == 404


async def test_credentials_are_redacted_in_the_api_but_replayed_as_they_came() -> None:
    secrets = {"Authorization": "Bearer s3cret-token", "Cookie": "session=s3cret-visitor"}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            backend: Backend = await nursery.start(serve_backend, "echo")
            async with open_memory_tunnel(backend.port, agent_config=INSPECT) as tunnel:
                await tunnel.request("GET", "/cookies", headers=[*secrets.items(), ("X-A", "b")])
                (exchange,) = tunnel.agent.requests()
                inspector = inspector_of(tunnel.agent)
                _, document = await call(InspectorApp(inspector), "/api/requests/1")
                replayed = await tunnel.agent.replay(1)
            nursery.cancel_scope.cancel()
    fields = dict(exchange.request_headers)
    for name in secrets:
        assert fields[name] == REDACTED
    assert fields["X-A"] == "b"
    text = json.dumps(document) + repr(exchange) + repr(replayed)
    assert "s3cret" not in text
    assert REDACTED in text
    # The backend got the credentials both times.
    for request in backend.requests:
        assert request.get_all(b"authorization") == [b"Bearer s3cret-token"]
        assert request.get_all(b"cookie") == [b"session=s3cret-visitor"]
    assert len(backend.requests) == 2


def test_proxy_authorization_is_redacted_too() -> None:
    # The relay drops it (hop-by-hop), so it is shown here on a record of its own.
    head = b"GET / HTTP/1.1\r\nHost: a\r\nProxy-Authorization: Basic czNjcmV0\r\n\r\n"
    exchange = _exchange(_Record(1, None, 0.0, 0.0, head))
    assert exchange.request_headers == (("Host", "a"), ("Proxy-Authorization", REDACTED))


async def test_set_cookie_is_redacted() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_memory_tunnel(app, agent_config=INSPECT, asgi_loop="trio") as tunnel:
            response = await tunnel.request("GET", "/")
            (exchange,) = tunnel.agent.requests()
    assert response.header("set-cookie") == "session=s3cret-cookie"  # the visitor gets it
    assert ("set-cookie", REDACTED) in exchange.response_headers
    assert "s3cret" not in json.dumps(exchange.to_json())


async def test_bodies_are_truncated_and_such_a_request_is_not_replayed() -> None:
    config = AgentConfig(inspect=True, inspect_body_bytes=8)
    with trio.fail_after(TIMEOUT):
        async with open_memory_tunnel(app, agent_config=config, asgi_loop="trio") as tunnel:
            await tunnel.request("POST", "/", body=b"0123456789abcdef")
            (exchange,) = tunnel.agent.requests()
            with pytest.raises(ValueError, match="16 bytes and only the first 8 were kept"):
                await tunnel.agent.replay(1)
            status, answer = await call(
                InspectorApp(inspector_of(tunnel.agent)), "/api/requests/1/replay", "POST"
            )
            assert len(tunnel.agent.requests()) == 1  # nothing was replayed
    assert exchange.request_body == b"01234567"
    assert exchange.request_size == 16
    assert exchange.request_truncated
    assert exchange.response_body == b"you sent"
    assert exchange.response_size == len(b"you sent: 0123456789abcdef")
    assert exchange.response_truncated
    body = exchange.to_json()["request_body"]
    assert body == {"base64": "MDEyMzQ1Njc=", "text": "01234567", "size": 16, "truncated": True}
    assert status == 409
    assert "only the first 8 were kept" in answer["error"]


async def test_binary_body_has_no_text() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_memory_tunnel(app, agent_config=INSPECT, asgi_loop="trio") as tunnel:
            await tunnel.request("POST", "/", body=b"\xff\x00\xfe")
            (exchange,) = tunnel.agent.requests()
    request_body = exchange.to_json()["request_body"]
    assert isinstance(request_body, dict)
    assert request_body["text"] is None
    assert request_body["size"] == 3


async def test_upgrade_records_the_handshake_not_the_bytes(nursery: trio.Nursery) -> None:
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, upgrading_backend, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(TIMEOUT):
        async with open_memory_tunnel(port, agent_config=INSPECT) as tunnel:
            client = tunnel.open_client_stream()
            await client.send_all(
                f"GET {tunnel.path_prefix}/ws HTTP/1.1\r\nHost: relay.test\r\n"
                "Connection: Upgrade\r\nUpgrade: echo\r\n\r\nsecret-bytes".encode()
            )
            received = b""
            while b"SECRET-BYTES" not in received:
                received += await client.receive_some(65536)
            await client.send_eof()
            while await client.receive_some(65536):
                pass
            await trio.testing.wait_all_tasks_blocked()
            (exchange,) = tunnel.agent.requests()
            with pytest.raises(ValueError, match="upgrade"):
                await tunnel.agent.replay(exchange.id)
    assert exchange.status == 101
    assert exchange.upgraded
    assert ("Upgrade", "echo") in exchange.request_headers
    assert exchange.request_body == exchange.response_body == b""
    assert exchange.request_size == exchange.response_size == 0


async def test_an_exchange_in_flight_is_listed() -> None:
    release = trio.Event()

    async def slow(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":  # not the lifespan scope: it would hold up the start
            await release.wait()
        await app(scope, receive, send)

    with trio.fail_after(TIMEOUT):
        async with open_memory_tunnel(slow, agent_config=INSPECT, asgi_loop="trio") as tunnel:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tunnel.request, "GET", "/slow")
                await trio.testing.wait_all_tasks_blocked()
                (pending,) = tunnel.agent.requests()
                release.set()
            (done,) = tunnel.agent.requests()
    assert (pending.status, pending.complete, pending.error) == (None, False, None)
    assert (done.status, done.complete) == (200, True)


# --- replay ----------------------------------------------------------------------------


async def test_replay_of_a_post_with_body_reaches_the_backend_again() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            backend: Backend = await nursery.start(serve_backend, "echo")
            async with open_memory_tunnel(backend.port, agent_config=INSPECT) as tunnel:
                response = await tunnel.request("POST", "/hook?n=1", body=b'{"event": "push"}')
                assert response.status == 200
                replayed = await tunnel.agent.replay(1)
                again = await tunnel.agent.replay(replayed.id)  # a replay replays too
                listed = tunnel.agent.requests()
            nursery.cancel_scope.cancel()
    assert [r.body for r in backend.requests] == [b'{"event": "push"}'] * 3
    assert [r.target for r in backend.requests] == [b"/hook?n=1"] * 3
    assert (replayed.id, replayed.replay_of, replayed.status) == (2, 1, 200)
    assert replayed.request_body == b'{"event": "push"}'
    assert replayed.response_body == response.body
    assert (again.id, again.replay_of) == (3, 2)
    assert [e.id for e in listed] == [1, 2, 3]


async def test_replay_through_the_api_of_an_asgi_app() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_memory_tunnel(app, agent_config=INSPECT, asgi_loop="trio") as tunnel:
            await tunnel.request("PUT", "/item", body=b"data")
            asgi = InspectorApp(inspector_of(tunnel.agent))
            status, answer = await call(asgi, "/api/requests/1/replay", "POST")
            _, detail = await call(asgi, "/api/requests/2")
    assert status == 200
    assert answer["exchange"]["replay_of"] == 1
    assert answer["exchange"]["status"] == 200
    assert answer["exchange"]["response_body"]["text"] == "you sent: data"
    assert detail["id"] == 2
    assert detail["not_replayable"] is None


async def test_replay_when_the_backend_is_down() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_memory_tunnel(free_port(), agent_config=INSPECT) as tunnel:
            response = await tunnel.request("GET", "/")
            assert response.status == 502
            replayed = await tunnel.agent.replay(1)
            asgi = InspectorApp(inspector_of(tunnel.agent))
            status, answer = await call(asgi, "/api/requests/1/replay", "POST")
            (first, *_) = tunnel.agent.requests()
    assert first.error == "the backend refused the connection"
    assert first.status is None
    assert replayed.error == "the backend refused the connection"
    assert (replayed.status, replayed.replay_of, replayed.complete) == (None, 1, True)
    assert status == 502
    assert answer["error"] == "the backend refused the connection"
    assert answer["exchange"]["id"] == 3


async def test_replay_of_an_unknown_exchange() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_memory_tunnel(app, agent_config=INSPECT, asgi_loop="trio") as tunnel:
            with pytest.raises(KeyError), trio.testing.assert_checkpoints():
                await tunnel.agent.replay(7)
            asgi = InspectorApp(inspector_of(tunnel.agent))
            assert (await call(asgi, "/api/requests/7/replay", "POST"))[0] == 404
            assert (await call(asgi, "/api/requests/7"))[0] == 404


async def test_replay_that_times_out_answers_504() -> None:
    async def hang(scope: Scope, receive: Any, send: Any) -> None:
        if scope["path"] == "/hang":
            await trio.sleep_forever()
        await app(scope, receive, send)

    with trio.fail_after(TIMEOUT):
        async with open_memory_tunnel(hang, agent_config=INSPECT, asgi_loop="trio") as tunnel:
            await tunnel.request("GET", "/")
            inspector = inspector_of(tunnel.agent)
            # Point exchange 1 at /hang: the replay of it never gets an answer.
            record = inspector._record(1)
            record.request_head = record.request_head.replace(b"GET / ", b"GET /hang ", 1)
            status, answer = await call(
                InspectorApp(inspector, replay_timeout=0.2), "/api/requests/1/replay", "POST"
            )
            replay = inspector.get(2)
    assert status == 504
    assert "within 0.2s" in answer["error"]
    assert (replay.error, replay.complete) == ("cancelled", True)


# --- the web API's guards ----------------------------------------------------------------


async def test_replay_refuses_cross_site_requests() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_memory_tunnel(app, agent_config=INSPECT, asgi_loop="trio") as tunnel:
            await tunnel.request("POST", "/transfer", body=b"amount=1000")
            asgi = InspectorApp(inspector_of(tunnel.agent))
            host = (b"host", b"127.0.0.1:9101")
            json_type = (b"content-type", b"application/json")
            refused = [
                # A form a web page posts: no JSON content type.
                [host, (b"content-type", b"application/x-www-form-urlencoded")],
                [host, (b"content-type", b"text/plain")],
                [host],
                # fetch() from another origin.
                [host, json_type, (b"origin", b"http://evil.example")],
                [host, json_type, (b"sec-fetch-site", b"cross-site")],
                [host, json_type, (b"sec-fetch-site", b"same-site")],
                # DNS rebinding: a name that resolves to 127.0.0.1, same-origin to the page.
                [(b"host", b"evil.example:9101"), json_type],
                [
                    (b"host", b"evil.example:9101"),
                    json_type,
                    (b"origin", b"http://evil.example:9101"),
                ],
                [json_type],  # no Host at all
            ]
            answers = [
                await call(asgi, "/api/requests/1/replay", "POST", headers) for headers in refused
            ]
            wrong_method = await call(asgi, "/api/requests/1/replay", "GET")
            reading_by_name = await call(asgi, "/api/requests", "GET", [(b"host", b"evil.example")])
            assert len(tunnel.agent.requests()) == 1  # none of them replayed
            same_origin = [
                host, json_type, (b"origin", b"http://127.0.0.1:9101"),
                (b"sec-fetch-site", b"same-origin"),
            ]  # fmt: skip
            allowed = await call(asgi, "/api/requests/1/replay", "POST", same_origin)
            by_localhost = await call(
                asgi, "/api/requests/1/replay", "POST", [(b"host", b"localhost:9101"), json_type]
            )
            assert len(tunnel.agent.requests()) == 3
    assert [status for status, _ in answers] == [403] * len(refused)
    assert "Content-Type: application/json" in answers[0][1]["error"]
    assert "Origin http://evil.example" in answers[3][1]["error"]
    assert "Sec-Fetch-Site is cross-site" in answers[4][1]["error"]
    assert b"IP address or localhost" in answers[6][1]
    assert wrong_method[0] == 405
    assert reading_by_name[0] == 403
    assert allowed[0] == by_localhost[0] == 200


async def test_page_and_script_are_served() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_memory_tunnel(app, agent_config=INSPECT, asgi_loop="trio") as tunnel:
            asgi = InspectorApp(inspector_of(tunnel.agent))
            page = await call(asgi, "/")
            _, page_headers, _ = await call_raw(asgi, "/")
            script = await call(asgi, "/inspector.js")
            missing = await call(asgi, "/api/nothing")
            posted = await call(asgi, "/api/requests", "POST")
    assert page[0] == script[0] == 200
    assert b"<title>tunnel2 inspector</title>" in page[1]
    assert b'src="/inspector.js"' in page[1]
    assert page_headers[b"content-security-policy"].startswith(b"default-src 'self'")
    assert page_headers[b"x-frame-options"] == b"DENY"
    assert b"EventSource" in script[1]
    assert b"innerHTML" not in script[1]  # visitors' bytes go in as text only
    assert missing[0] == 404
    assert posted[0] == 405


async def test_events_stream_new_and_finished_exchanges() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_memory_tunnel(app, agent_config=INSPECT, asgi_loop="trio") as tunnel:
            await tunnel.request("GET", "/before")
            asgi = InspectorApp(inspector_of(tunnel.agent))
            messages: list[dict[str, Any]] = []
            got = trio.Event()
            disconnect = trio.Event()

            async def receive() -> dict[str, Any]:
                await disconnect.wait()
                return {"type": "http.disconnect"}

            async def send(message: MutableMapping[str, Any]) -> None:
                body = message.get("body", b"")
                if body.startswith(b"data: "):
                    messages.append(json.loads(body[len(b"data: ") :]))
                    got.set()

            scope = {"type": "http", "method": "GET", "path": "/api/events",
                     "headers": [(b"host", b"[::1]:9101")]}  # fmt: skip
            async with trio.open_nursery() as nursery:
                nursery.start_soon(asgi, scope, receive, send)
                await got.wait()
                got = trio.Event()
                await tunnel.request("GET", "/after")
                while not any(e["target"] == "/after" and e["complete"]
                              for m in messages for e in m["requests"]):  # fmt: skip
                    await got.wait()
                    got = trio.Event()
                disconnect.set()  # the stream ends when the page goes
    first = messages[0]
    assert first["oldest"] == 1
    assert [e["target"] for e in first["requests"]] == ["/before"]
    later = [e for m in messages[1:] for e in m["requests"]]
    assert {e["id"] for e in later} == {2}


# --- the front doors -------------------------------------------------------------------


@attrs.frozen
class RealTunnel:
    base_url: str  # the relay's
    session_id: str
    admin_url: str  # the agent's
    agent: Agent


@asynccontextmanager
async def real_tunnel(port: int) -> AsyncIterator[RealTunnel]:
    """A relay and an inspecting agent with its admin endpoint, on 127.0.0.1 port 0,
    forwarding to the backend on ``port``."""
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(tunnel2.serve_tunnel_server, ServerConfig(port=0))
        )
        async with tunnel2.open_tunnel(
            server.base_url, port, admin=("127.0.0.1", 0), inspect=True
        ) as agent:
            assert agent.admin_url is not None
            assert agent.session_id is not None
            yield RealTunnel(server.base_url, agent.session_id, agent.admin_url, agent)
        nursery.cancel_scope.cancel()


async def test_over_real_sockets_with_the_admin_endpoint() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            backend: Backend = await nursery.start(serve_backend, "echo")
            async with real_tunnel(backend.port) as tunnel:
                url = f"{tunnel.base_url}/session/{tunnel.session_id}/webhook"
                status, _ = await fetch(url, "POST", b"payload")
                assert status == 200
                status, listing = await fetch(tunnel.admin_url + "/api/requests")
                assert status == 200
                (summary,) = json.loads(listing)["requests"]
                assert (summary["method"], summary["target"]) == ("POST", "/webhook")
                replay_url = f"{tunnel.admin_url}/api/requests/{summary['id']}/replay"
                status, _ = await fetch(replay_url, "POST", b"{}", "text/plain")
                assert status == 403
                status, answer = await fetch(replay_url, "POST", b"{}", "application/json")
                assert status == 200
                assert json.loads(answer)["exchange"]["replay_of"] == summary["id"]
                status, page = await fetch(tunnel.admin_url + "/")
                assert status == 200
                assert b"tunnel2 inspector" in page
                status, _ = await fetch(tunnel.admin_url + "/metrics")
                assert status == 200  # the admin routes are still there
            nursery.cancel_scope.cancel()
    assert [r.body for r in backend.requests] == [b"payload", b"payload"]


async def test_admin_without_inspection_has_no_page() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                functools.partial(tunnel2.serve_tunnel_server, ServerConfig(port=0))
            )
            async with tunnel2.open_tunnel(server.base_url, app, admin=("127.0.0.1", 0)) as agent:
                assert agent.admin_url is not None
                assert (await fetch(agent.admin_url + "/"))[0] == 404
                assert (await fetch(agent.admin_url + "/api/requests"))[0] == 404
            nursery.cancel_scope.cancel()


async def fetch(
    url: str, method: str = "GET", body: bytes = b"", content_type: str | None = None
) -> tuple[int, bytes]:
    """One request to a full URL on a real socket."""
    base, _, path = url.removeprefix("http://").partition("/")
    return await get(f"http://{base}", "/" + path, method, body, content_type)


def test_sync_handle_lists_and_replays() -> None:
    with (
        tunnel2.start_relay(ServerConfig(port=0)) as relay,
        tunnel2.connect(app, server=relay.base_url, inspect=True) as tunnel,
    ):
        url = f"{relay.base_url}/session/{tunnel.session_id}/sync"
        assert trio.run(fetch, url, "POST", b"from sync")[0] == 200
        (exchange,) = tunnel.requests()
        replayed = tunnel.replay(exchange.id, timeout=TIMEOUT)
        assert [e.id for e in tunnel.requests()] == [1, 2]
    assert exchange.request_body == b"from sync"
    assert (replayed.replay_of, replayed.status) == (1, 200)


def test_sync_handle_without_inspection() -> None:
    with (
        tunnel2.start_relay(ServerConfig(port=0)) as relay,
        tunnel2.connect(app, server=relay.base_url) as tunnel,
        pytest.raises(RuntimeError, match="inspection is off"),
    ):
        tunnel.requests()


def test_asyncio_handle_lists_and_replays() -> None:
    async def main() -> tuple[list[Exchange], Exchange]:
        async with (
            tunnel2.aio.open_tunnel_server(ServerConfig(port=0)) as relay,
            tunnel2.aio.open_tunnel(relay.base_url, app, inspect=True) as tunnel,
        ):
            url = f"{relay.base_url}/session/{tunnel.session_id}/aio"
            await asyncio.to_thread(lambda: trio.run(fetch, url, "POST", b"from asyncio"))
            listed = await tunnel.requests()
            return listed, await asyncio.wait_for(tunnel.replay(1), TIMEOUT)

    listed, replayed = asyncio.run(main())
    assert [e.request_body for e in listed] == [b"from asyncio"]
    assert (replayed.replay_of, replayed.status) == (1, 200)


# --- the command line ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], False),
        (["--admin", "127.0.0.1:9101"], True),  # as ngrok's :4040
        (["--inspect"], True),
        (["--admin", "127.0.0.1:9101", "--no-inspect"], False),
    ],
)
def test_cli_inspects_by_default_with_admin(argv: list[str], expected: bool) -> None:
    args = cli.build_parser().parse_args(["http", "8080", *argv])
    assert cli._inspecting(args) is expected
    assert args.inspect_requests == 100
    assert args.inspect_body_bytes == 16384


@pytest.mark.parametrize("inspect", [True, False])
async def test_cli_http_serves_the_inspector_with_admin(tmp_path: Path, inspect: bool) -> None:
    extra = () if inspect else ("--no-inspect",)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            backend: Backend = await nursery.start(serve_backend, "echo")
            server = await nursery.start(
                functools.partial(tunnel2.serve_tunnel_server, ServerConfig(port=0))
            )
            argv = [*CLI, "http", str(backend.port), "--server", server.base_url]
            async with run(
                *argv, "--admin", "127.0.0.1:0", *extra, stderr=tmp_path / "agent.err"
            ) as agent:
                public_url = (await agent.readline()).split()[1]
                assert (await fetch(public_url + "cli"))[0] == 200
                lines = agent.stderr().splitlines()
                admin_url = next(x for x in lines if "admin endpoint" in x).rsplit(" ", 1)[1]
                inspector_lines = [x for x in lines if "inspector" in x]
                status, listing = await fetch(admin_url + "/api/requests")
                assert await agent.interrupt() == 0
            nursery.cancel_scope.cancel()
    if inspect:
        assert inspector_lines[0].endswith(f"inspector (your traffic, replay) on {admin_url}/")
        assert status == 200
        assert [e["target"] for e in json.loads(listing)["requests"]] == ["/cli"]
    else:
        assert inspector_lines == []
        assert status == 404


async def test_cli_inspect_without_admin_is_a_usage_error() -> None:
    with trio.fail_after(15):
        result = await trio.run_process(
            [*CLI, "http", "8080", "--inspect"], capture_stderr=True, check=False
        )
    assert result.returncode == 2
    assert result.stderr.decode() == (
        "tunnel2 http: --inspect needs --admin HOST:PORT (its page is there)\n"
    )


def test_cli_inspect_sizes() -> None:
    args = cli.build_parser().parse_args(
        ["http", "8080", "--inspect-requests", "5", "--inspect-body-bytes", "0"]
    )
    assert (args.inspect_requests, args.inspect_body_bytes) == (5, 0)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["http", "8080", "--inspect-requests", "0"])
