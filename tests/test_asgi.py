"""In-process ASGI apps (:mod:`tunnel2.asgi`): the ``websocket`` scope over wsproto, the
``lifespan`` protocol, which loop runs the app's code, and the scope's public values.

The FastAPI app under test is the README's own example ("In-process ASGI apps"), executed
from README.md, so the copy-paste example is what these tests run.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
import threading
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.lowlevel
import trio.testing
import wsproto
import wsproto.events as ws_events
from embed_helpers import STEP_TIMEOUT, fetch, sync_relay, tunnel_threads

import tunnel2
from tunnel2.asgi import AsgiHandler, AsgiLoop
from tunnel2.errors import AppStartupError
from tunnel2.testing import open_memory_tunnel

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

README = Path(__file__).parent.parent / "README.md"


def readme_app() -> Any:
    """A fresh FastAPI app from the README's example (its module-level code, run)."""
    section = README.read_text().split("### In-process ASGI apps", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(code.group(1), "README.md", "exec"), namespace)
    return namespace["app"]


# --- a visitor's WebSocket: wsproto over any trio stream ---------------------------------


class WsClient:
    """A visitor's WebSocket, wsproto as the client over a trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.events: collections.deque[ws_events.Event] = collections.deque()

    async def handshake(
        self, target: str, host: str = "relay.test", subprotocols: list[str] | None = None
    ) -> ws_events.Event:
        request = ws_events.Request(host=host, target=target, subprotocols=subprotocols or [])
        await self.send(request)
        return await self.next_event()

    async def send(self, event: ws_events.Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next_event(self) -> ws_events.Event:
        while not self.events:
            data = bytes(await self.stream.receive_some(65536))
            self.ws.receive_data(data or None)
            self.events.extend(self.ws.events())
        return self.events.popleft()

    async def receive_message(self) -> str | bytes | ws_events.CloseConnection:
        parts: list[Any] = []
        while True:
            event = await self.next_event()
            if isinstance(event, ws_events.CloseConnection):
                return event
            if isinstance(event, ws_events.Message):
                parts.append(event.data)
                if event.message_finished:
                    return "".join(parts) if isinstance(event.data, str) else b"".join(parts)

    async def read_rejection(self) -> bytes:
        body = b""
        while True:
            event = await self.next_event()
            assert isinstance(event, ws_events.RejectData)
            body += event.data
            if event.body_finished:
                return body


async def echo_session(client: WsClient, target: str) -> None:
    """The README app's /echo: subprotocol, text and binary (large and fragmented) both
    ways, and the app's own close with a code and reason."""
    accept = await client.handshake(target, subprotocols=["chat", "other"])
    assert isinstance(accept, ws_events.AcceptConnection)
    assert accept.subprotocol == "chat"
    assert (b"x-echo", b"1") in accept.extra_headers
    await client.send(ws_events.TextMessage(data="héllo"))
    assert await client.receive_message() == "héllo"
    await client.send(ws_events.BytesMessage(data=b"\x00\x01binary"))
    assert await client.receive_message() == b"\x00\x01binary"
    large = bytes(range(256)) * 4096  # 1 MiB: many tunnel frames, waits for credit
    await client.send(ws_events.BytesMessage(data=large))
    assert await client.receive_message() == large
    await client.send(ws_events.TextMessage(data="frag", message_finished=False))
    await client.send(ws_events.TextMessage(data="mented"))
    assert await client.receive_message() == "fragmented"
    await client.send(ws_events.TextMessage(data="bye"))
    close = await client.receive_message()
    assert isinstance(close, ws_events.CloseConnection)
    assert (close.code, close.reason) == (4000, "bye for now")
    await client.send(close.response())
    assert await client.stream.receive_some(65536) == b""  # then the stream ends


# --- a real relay on 127.0.0.1 -----------------------------------------------------------


@asynccontextmanager
async def socket_tunnel(
    app: Any, **options: Any
) -> AsyncIterator[tuple[tunnel2.Agent, tuple[str, int], str]]:
    """A relay on 127.0.0.1 port 0 and ``app`` through it: the agent, the relay's address
    and the session's path prefix."""
    config = tunnel2.ServerConfig(port=0, drain_timeout=1.0)
    async with (
        tunnel2.open_tunnel_server(config) as relay,
        tunnel2.open_tunnel(relay.base_url, app, drain_timeout=1.0, **options) as agent,
    ):
        parts = urllib.parse.urlsplit(agent.public_url)
        assert parts.hostname is not None
        assert parts.port is not None
        yield agent, (parts.hostname, parts.port), parts.path.rstrip("/")


async def test_fastapi_app_through_real_sockets() -> None:
    app = readme_app()
    with trio.fail_after(STEP_TIMEOUT):
        async with socket_tunnel(app) as (_agent, address, prefix):
            assert app.state.started  # the lifespan ran before open_tunnel yielded
            async with httpx.AsyncClient(timeout=STEP_TIMEOUT) as http:
                response = await http.get(f"http://{address[0]}:{address[1]}{prefix}/hello")
            status, body = response.status_code, response.content
            answer = json.loads(body)
            assert status == 200
            assert answer["greeting"] == "hello"  # lifespan state, per request
            assert answer["root_path"] == prefix
            assert answer["loop"] != 0  # the asyncio-only dependency had a running loop
            async with await trio.open_tcp_stream(*address) as stream:
                await echo_session(WsClient(stream), f"{prefix}/echo")
            assert not getattr(app.state, "stopped", False)
        assert app.state.stopped  # shutdown ran when the tunnel closed
    assert tunnel_threads(join=True) == []  # the app's asyncio loop thread is joined


async def test_fastapi_app_through_the_memory_tunnel() -> None:
    app = readme_app()
    with trio.fail_after(STEP_TIMEOUT):
        async with open_memory_tunnel(app) as tunnel:
            assert app.state.started
            response = await tunnel.request("GET", "/hello")
            assert response.status == 200
            assert json.loads(response.body)["greeting"] == "hello"
            await echo_session(WsClient(tunnel.open_client_stream()), f"{tunnel.path_prefix}/echo")
            uplink = tunnel.agent.uplink
            assert uplink is not None
            await until(lambda: uplink.statistics().open_streams == 0)
        assert app.state.stopped
    assert tunnel_threads(join=True) == []


async def until(done: Callable[[], bool]) -> None:
    """Wait for what an app on the asyncio thread records (trio's wait_all_tasks_blocked
    does not see that thread); bounded by the test's fail_after."""
    while not done():  # noqa: ASYNC110 - set on another thread, no trio.Event
        await trio.sleep(0.005)


def accept_and_record(heard: list[Message], count: int) -> Any:
    """A WebSocket app that accepts, then records the next ``count`` messages it receives."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            return
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        for _ in range(count):
            heard.append(await receive())

    return app


async def test_visitor_closes_with_a_code_and_the_app_hears_it() -> None:
    heard: list[Message] = []
    with trio.fail_after(STEP_TIMEOUT):
        async with open_memory_tunnel(accept_and_record(heard, 2)) as tunnel:
            client = WsClient(tunnel.open_client_stream())
            assert isinstance(
                await client.handshake(f"{tunnel.path_prefix}/ws"), ws_events.AcceptConnection
            )
            await client.send(ws_events.TextMessage(data="one"))
            await client.send(ws_events.CloseConnection(code=4321, reason="leaving"))
            answer = await client.receive_message()
            assert isinstance(answer, ws_events.CloseConnection)
            assert answer.code == 4321  # the close handshake is answered
            assert await client.stream.receive_some(65536) == b""
            await until(lambda: len(heard) == 2)
    assert heard == [
        {"type": "websocket.receive", "text": "one"},
        {"type": "websocket.disconnect", "code": 4321, "reason": "leaving"},
    ]


async def test_visitor_vanishing_is_a_1006_disconnect_and_send_then_raises() -> None:
    heard: list[Message] = []
    raised: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            return
        await receive()
        await send({"type": "websocket.accept"})
        heard.append(await receive())
        try:
            await send({"type": "websocket.send", "text": "too late"})
        except OSError as exc:  # ASGI 2.4: send on a closed WebSocket raises OSError
            raised.append(exc)

    with trio.fail_after(STEP_TIMEOUT):
        async with open_memory_tunnel(app) as tunnel:
            stream = tunnel.open_client_stream()
            client = WsClient(stream)
            assert isinstance(
                await client.handshake(f"{tunnel.path_prefix}/ws"), ws_events.AcceptConnection
            )
            await stream.send_eof()
            while await stream.receive_some(65536):
                pass
            await until(lambda: len(raised) == 1)
    assert heard == [{"type": "websocket.disconnect", "code": 1006, "reason": ""}]
    assert len(raised) == 1


async def websocket_refusing_app(scope: Scope, receive: Receive, send: Send) -> None:
    """/deny answers with the denial extension, /close closes before accepting, the rest
    returns without a word."""
    if scope["type"] != "websocket":
        return
    assert scope["extensions"] == {"websocket.http.response": {}}
    await receive()
    if scope["path"] == "/deny":
        await send(
            {
                "type": "websocket.http.response.start",
                "status": 403,
                "headers": [(b"content-type", b"text/plain"), (b"x-why", b"no-token")],
            }
        )
        await send({"type": "websocket.http.response.body", "body": b"no ", "more_body": True})
        await send({"type": "websocket.http.response.body", "body": b"token"})
    elif scope["path"] == "/close":
        await send({"type": "websocket.close", "code": 1008})
    # else: returns without answering, as an app that serves no WebSockets


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/deny", b"no token"),
        ("/close", b"403 Forbidden: the application refused the WebSocket\n"),
        ("/ignore", b"403 Forbidden: the application did not accept the WebSocket\n"),
    ],
)
async def test_websocket_denial_and_close_before_accept_are_http_answers(
    path: str, body: bytes
) -> None:
    with trio.fail_after(STEP_TIMEOUT):
        async with open_memory_tunnel(websocket_refusing_app) as tunnel:
            client = WsClient(tunnel.open_client_stream())
            reject = await client.handshake(tunnel.path_prefix + path)
            assert isinstance(reject, ws_events.RejectConnection)
            assert reject.status_code == 403
            assert await client.read_rejection() == body
            if path == "/deny":
                assert (b"x-why", b"no-token") in reject.headers
            uplink = tunnel.agent.uplink
            assert uplink is not None
            await until(lambda: uplink.statistics().open_streams == 0)


async def test_a_bad_websocket_handshake_is_400() -> None:
    with trio.fail_after(STEP_TIMEOUT):
        async with open_memory_tunnel(websocket_refusing_app) as tunnel:
            response = await tunnel.request(
                "GET", "/ws", headers=[("Connection", "Upgrade"), ("Upgrade", "websocket")]
            )
    assert response.status == 400
    assert "WebSocket handshake" in response.text


async def test_app_failing_after_accept_closes_1011() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            return
        await receive()
        await send({"type": "websocket.accept"})
        raise RuntimeError("boom")

    with trio.fail_after(STEP_TIMEOUT):
        async with open_memory_tunnel(app) as tunnel:
            client = WsClient(tunnel.open_client_stream())
            assert isinstance(
                await client.handshake(f"{tunnel.path_prefix}/ws"), ws_events.AcceptConnection
            )
            close = await client.receive_message()
            assert isinstance(close, ws_events.CloseConnection)
            assert close.code == 1011


# --- lifespan ------------------------------------------------------------------------------


def lifespan_app(log: list[str], *, fail: bool = False) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            assert (await receive())["type"] == "lifespan.startup"
            if fail:
                await send({"type": "lifespan.startup.failed", "message": "no database at db:5432"})
                return
            scope["state"]["answer"] = 42
            log.append("startup")
            await send({"type": "lifespan.startup.complete"})
            assert (await receive())["type"] == "lifespan.shutdown"
            log.append("shutdown")
            await send({"type": "lifespan.shutdown.complete"})
            return
        await receive()
        body = str(scope["state"]["answer"]).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
async def test_lifespan_startup_state_and_shutdown(loop: AsgiLoop) -> None:
    log: list[str] = []
    with trio.fail_after(STEP_TIMEOUT):
        async with open_memory_tunnel(lifespan_app(log), asgi_loop=loop) as tunnel:
            assert log == ["startup"]  # before the block was entered
            response = await tunnel.request("GET", "/")
            assert (response.status, response.body) == (200, b"42")
            assert log == ["startup"]
    assert log == ["startup", "shutdown"]


async def test_failing_startup_is_a_typed_error_naming_the_apps_message() -> None:
    app = lifespan_app([], fail=True)
    with trio.fail_after(STEP_TIMEOUT):
        with pytest.raises(AppStartupError, match="no database at db:5432") as info:
            async with open_memory_tunnel(app):
                raise AssertionError("the block must not be entered")
        assert info.value.message == "no database at db:5432"
        async with tunnel2.open_tunnel_server(tunnel2.ServerConfig(port=0)) as relay:
            with pytest.raises(AppStartupError, match="no database"):
                async with tunnel2.open_tunnel(relay.base_url, app):
                    raise AssertionError("the block must not be entered")
    assert tunnel_threads(join=True) == []


def test_failing_fastapi_startup_from_connect() -> None:
    from fastapi import FastAPI

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not hasattr(app.state, "database"):
            raise ConnectionRefusedError("the database refused us")
        yield

    with (
        sync_relay() as relay,
        pytest.raises(AppStartupError, match="ConnectionRefusedError: the database refused us"),
    ):
        tunnel2.connect(FastAPI(lifespan=lifespan), server=relay.base_url)
    assert tunnel_threads(join=True) == []


async def test_app_without_lifespan_support_keeps_working(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"  # raises on the lifespan scope
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"fine"})

    caplog.set_level(logging.INFO, "tunnel2.agent")
    with trio.fail_after(STEP_TIMEOUT):
        async with open_memory_tunnel(app) as tunnel:
            response = await tunnel.request("GET", "/")
    assert (response.status, response.body) == (200, b"fine")
    assert "raised on the lifespan scope" in caplog.text


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
async def test_cancelling_the_tunnel_runs_shutdown(loop: AsgiLoop) -> None:
    log: list[str] = []
    with trio.fail_after(STEP_TIMEOUT):
        async with trio.open_nursery() as nursery:
            opened = trio.Event()

            async def serve() -> None:
                async with open_memory_tunnel(lifespan_app(log), asgi_loop=loop):
                    opened.set()
                    await trio.sleep_forever()

            nursery.start_soon(serve)
            await opened.wait()
            nursery.cancel_scope.cancel()
    assert log == ["startup", "shutdown"]
    assert tunnel_threads(join=True) == []


async def test_cancelling_startup_stops_the_app() -> None:
    entered = threading.Event()  # set on the app's asyncio thread

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "lifespan"
        await receive()
        entered.set()
        await asyncio.sleep(3600)

    with trio.fail_after(STEP_TIMEOUT), trio.CancelScope() as scope:

        async def cancel_once_entered() -> None:
            assert await trio.to_thread.run_sync(entered.wait, STEP_TIMEOUT)
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_once_entered)
            async with open_memory_tunnel(app):
                raise AssertionError("startup never completes")
    assert scope.cancelled_caught
    assert tunnel_threads(join=True) == []


# --- which loop runs the app ------------------------------------------------------------


async def loop_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers with the id of the asyncio loop it runs on (0: none, it runs on trio)."""
    if scope["type"] != "http":
        return
    try:
        loop_id = id(asyncio.get_running_loop())
    except RuntimeError:
        loop_id = 0
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(loop_id).encode()})


async def test_asgi_loop_trio_runs_the_app_in_the_agents_tasks() -> None:
    async def trio_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await trio.lowlevel.checkpoint()
        await loop_app(scope, receive, send)

    with trio.fail_after(STEP_TIMEOUT):
        async with open_memory_tunnel(trio_app, asgi_loop="trio") as tunnel:
            response = await tunnel.request("GET", "/")
    assert response.body == b"0"


def test_aio_open_tunnel_runs_the_app_on_the_callers_loop() -> None:
    app = readme_app()

    async def main() -> None:
        async with (
            tunnel2.aio.open_tunnel_server(tunnel2.ServerConfig(port=0)) as relay,
            tunnel2.aio.open_tunnel(relay.base_url, app) as tunnel,
        ):
            assert app.state.loop is asyncio.get_running_loop()  # the lifespan's loop
            status, body = await asyncio.to_thread(fetch, tunnel.public_url + "hello")
            assert status == 200
            assert json.loads(body)["loop"] == id(asyncio.get_running_loop())
        assert app.state.stopped

    asyncio.run(asyncio.wait_for(main(), STEP_TIMEOUT))
    assert tunnel_threads(join=True) == []


def test_memory_tunnel_under_asyncio_runs_the_app_on_the_tests_loop() -> None:
    async def main() -> None:
        async with tunnel2.testing.open_memory_tunnel_here(loop_app) as tunnel:
            response = await tunnel.request("GET", "/")
        assert int(response.body) == id(asyncio.get_running_loop())

    asyncio.run(asyncio.wait_for(main(), STEP_TIMEOUT))


def test_connect_runs_an_asyncio_app_on_a_loop_of_its_own() -> None:
    with sync_relay() as relay, tunnel2.connect(loop_app, server=relay.base_url) as tunnel:
        assert "tunnel2-asgi-asyncio" in tunnel_threads()
        status, body = fetch(tunnel.public_url)
        assert status == 200
        assert int(body) != 0
    assert tunnel_threads(join=True) == []


async def test_a_reset_cancels_the_app_on_asyncio() -> None:
    cancelled = threading.Event()  # set on the app's asyncio thread

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while True:
                await send({"type": "http.response.body", "body": b"x" * 1024, "more_body": True})
                await asyncio.sleep(0.001)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with trio.fail_after(STEP_TIMEOUT):
        async with open_memory_tunnel(app) as tunnel:
            stream = tunnel.open_client_stream()
            await stream.send_all(
                f"GET {tunnel.path_prefix}/ HTTP/1.1\r\nHost: relay.test\r\n\r\n".encode()
            )
            assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200")
            await stream.aclose()  # the visitor goes: the relay resets the stream
            assert await trio.to_thread.run_sync(cancelled.wait, STEP_TIMEOUT)
            uplink = tunnel.agent.uplink
            assert uplink is not None
            await until(lambda: uplink.statistics().open_streams == 0)


async def test_an_unentered_handler_on_asyncio_says_so() -> None:
    handler = AsgiHandler(loop_app)
    stream: Any = object()
    with pytest.raises(RuntimeError, match="must be entered"):
        await handler(stream)
    with pytest.raises(ValueError, match="must be 'asyncio', 'trio'"):
        AsgiHandler(loop_app, loop="uvloop")  # type: ignore[arg-type]


# --- scope values -------------------------------------------------------------------------


async def scope_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] not in ("http", "websocket"):
        return
    facts = {k: scope[k] for k in ("scheme", "server", "root_path", "path", "client")}
    body = json.dumps(facts).encode()
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": body.decode()})
        await send({"type": "websocket.close"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


async def test_root_path_scheme_and_server_on_the_path_and_host_forms() -> None:
    config = tunnel2.ServerConfig(domain="tunnels.test")
    with trio.fail_after(STEP_TIMEOUT):
        async with open_memory_tunnel(scope_app, config=config, asgi_loop="trio") as tunnel:
            path_form = json.loads((await tunnel.request("GET", "/a/b")).body)
            host = f"{tunnel.agent.session_id}.tunnels.test:8443"
            host_form = json.loads(
                (await tunnel.request("GET", "/a/b", headers=[("Host", host)], raw_path=True)).body
            )
            client = WsClient(tunnel.open_client_stream())
            await client.handshake(f"{tunnel.path_prefix}/ws")
            message = await client.receive_message()
            assert isinstance(message, str)
            websocket = json.loads(message)
    assert path_form["root_path"] == tunnel.path_prefix
    assert path_form["path"] == "/a/b"  # the backend path; root_path is not in it
    assert (path_form["scheme"], path_form["server"]) == ("http", ["relay.test", 80])
    assert host_form["root_path"] == ""
    assert host_form["path"] == "/a/b"
    assert host_form["server"] == [f"{tunnel.agent.session_id}.tunnels.test", 8443]
    assert websocket["scheme"] == "ws"
    assert websocket["root_path"] == tunnel.path_prefix


async def test_a_visitors_own_forwarding_headers_do_not_reach_the_scope() -> None:
    forged = [("X-Forwarded-Prefix", "/evil"), ("X-Forwarded-Proto", "https")]
    with trio.fail_after(STEP_TIMEOUT):
        async with open_memory_tunnel(scope_app, asgi_loop="trio") as tunnel:
            facts = json.loads((await tunnel.request("GET", "/", headers=forged)).body)
    assert facts["root_path"] == tunnel.path_prefix
    assert facts["scheme"] == "http"


# --- access log --------------------------------------------------------------------------


@contextmanager
def request_log(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    caplog.set_level(logging.INFO, "tunnel2.requests")
    lines: list[str] = []
    yield lines
    lines.extend(r.getMessage() for r in caplog.records if r.name == "tunnel2.requests")


async def test_access_log_covers_asgi_http_and_websocket_requests(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = readme_app()
    agent_config = tunnel2.AgentConfig()
    with request_log(caplog) as lines, trio.fail_after(STEP_TIMEOUT):
        async with open_memory_tunnel(app, agent_config=agent_config) as tunnel:
            tunnel.agent.observers.append(tunnel2.observe.AccessLogObserver())
            await tunnel.request("GET", "/hello")
            await tunnel.request("GET", "/missing")
            await echo_session(WsClient(tunnel.open_client_stream()), f"{tunnel.path_prefix}/echo")
            client = WsClient(tunnel.open_client_stream())
            await client.handshake(f"{tunnel.path_prefix}/nowhere")  # FastAPI: 403
            await until(
                lambda: (
                    sum(
                        r.name == "tunnel2.requests" and r.getMessage().startswith("agent ")
                        for r in caplog.records
                    )
                    == 4
                )
            )
    agent_lines = [line for line in lines if line.startswith("agent ")]
    assert [line.split(" -> ")[0].split(" ", 2)[2] for line in agent_lines] == [
        "GET /hello",
        "GET /missing",
        "GET /echo",
        "GET /nowhere",
    ]
    assert [int(line.split(" -> ")[1].split()[0]) for line in agent_lines] == [200, 404, 101, 403]


# --- more of the protocol on asyncio -------------------------------------------------------


async def test_request_bodies_and_errors_cross_to_an_asyncio_app() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if body == b"fail":
            raise ValueError("the app failed")
        await asyncio.sleep(0)
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": body[::-1], "more_body": True})
        await send({"type": "http.response.body", "body": b"!"})

    with trio.fail_after(STEP_TIMEOUT):
        async with open_memory_tunnel(app) as tunnel:
            large = bytes(range(256)) * 1024
            echoed = await tunnel.request("POST", "/", body=large)
            failed = await tunnel.request("POST", "/", body=b"fail")
    assert (echoed.status, echoed.body) == (201, large[::-1] + b"!")
    assert failed.status == 500
    assert "the application raised an exception" in failed.text


async def test_pings_are_answered_and_oversized_messages_close_1009(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tunnel2.asgi, "MAX_WEBSOCKET_MESSAGE", 1000)
    heard: list[Message] = []
    with trio.fail_after(STEP_TIMEOUT):
        async with open_memory_tunnel(accept_and_record(heard, 2)) as tunnel:
            client = WsClient(tunnel.open_client_stream())
            accept = await client.handshake(f"{tunnel.path_prefix}/ws")
            assert isinstance(accept, ws_events.AcceptConnection)
            await client.send(ws_events.Ping(payload=b"are you there"))
            pong = await client.next_event()
            assert isinstance(pong, ws_events.Pong)
            assert pong.payload == b"are you there"
            await client.send(ws_events.TextMessage(data="small"))
            await client.send(ws_events.BytesMessage(data=b"x" * 600, message_finished=False))
            await client.send(ws_events.BytesMessage(data=b"x" * 600))
            close = await client.receive_message()
            assert isinstance(close, ws_events.CloseConnection)
            assert close.code == 1009
            await until(lambda: len(heard) == 2)
    assert heard == [
        {"type": "websocket.receive", "text": "small"},
        {"type": "websocket.disconnect", "code": 1009, "reason": ""},
    ]


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
async def test_an_invalid_response_head_is_a_500(loop: AsgiLoop) -> None:
    # On asyncio the last body crosses without a wait; what it raised is still the app's.
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"bad name", b"value")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"never"})

    with trio.fail_after(STEP_TIMEOUT):
        async with open_memory_tunnel(app, asgi_loop=loop) as tunnel:
            response = await tunnel.request("GET", "/")
    assert response.status == 500
    assert "the application raised an exception" in response.text


@pytest.mark.parametrize(
    ("status", "line"),
    [
        (422, b"HTTP/1.1 422 Unprocessable Content\r\n"),  # RFC 9110's name: the one table
        (207, b"HTTP/1.1 207 Multi-Status\r\n"),
        (299, b"HTTP/1.1 299 \r\n"),  # a status no table knows: an empty reason phrase
    ],
)
async def test_the_status_line_takes_its_phrase_from_the_one_table(
    status: int, line: bytes
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"x"})

    with trio.fail_after(STEP_TIMEOUT):
        async with open_memory_tunnel(app, asgi_loop="trio") as tunnel:
            stream = tunnel.open_client_stream()
            await stream.send_all(
                f"GET {tunnel.path_prefix}/ HTTP/1.1\r\nHost: relay.test\r\n\r\n".encode()
            )
            data = b""
            while b"\r\n\r\n" not in data:
                more = await stream.receive_some(65536)
                assert more
                data += more
            await stream.aclose()
    assert data.startswith(line)


async def test_a_call_from_a_task_the_app_left_running_does_not_stop_the_run() -> None:
    # Review finding: once the app returned, a receive() from a task it left running on the
    # asyncio loop, posted while the final body still went out, started in a closed nursery:
    # RuntimeError in trio's run_sync_soon callback, TrioInternalError, the agent gone.
    late: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async def leaked() -> None:
            await asyncio.sleep(0.05)
            try:
                await receive()
            except BaseException as exc:  # cancelled: nobody serves it any more
                late.append(exc)
                raise

        asyncio.get_running_loop().create_task(leaked())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x"})

    async def receive() -> Message:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            await trio.sleep(0.3)  # a slow visitor: the final send outlives the app

    with trio.fail_after(STEP_TIMEOUT):
        async with tunnel2.asgi._owned_asyncio_loop() as loop:
            await tunnel2.asgi._AsyncioBridge(loop, 1.0).run(app, {"type": "http"}, receive, send)
            await until(lambda: bool(late))
    assert isinstance(late[0], asyncio.CancelledError)
