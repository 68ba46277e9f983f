"""Tests for the public surface: ``tunnel2.__all__`` and :mod:`tunnel2.api`."""

from __future__ import annotations
import __future__

import json
import signal
import types
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import pytest
import trio
import trio.lowlevel
from httpbackend import Backend, serve_backend

import tunnel2
from tunnel2 import ServerConfig, TunnelServer
from tunnel2.api import handler_for
from tunnel2.asgi import AsgiHandler
from tunnel2.backend import BackendForwarder

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


# --- __all__ ----------------------------------------------------------------------------------


def public_names(module: types.ModuleType) -> set[str]:
    """Names importable from ``module`` that are not private, submodules or __future__ flags."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith(("_", "@"))  # "@": pytest assertion-rewrite helpers
        and not isinstance(value, types.ModuleType)
        and not isinstance(value, __future__._Feature)
    }


def test_all_matches_the_public_names() -> None:
    assert sorted(tunnel2.__all__) == sorted(set(tunnel2.__all__)), "duplicates in __all__"
    assert set(tunnel2.__all__) == public_names(tunnel2)


def test_every_name_in_all_exists() -> None:
    for name in tunnel2.__all__:
        assert getattr(tunnel2, name) is not None, name
    namespace: dict[str, object] = {}
    exec("from tunnel2 import *", namespace)
    assert set(tunnel2.__all__) <= set(namespace)


def test_the_entry_points_are_exported() -> None:
    for name in ("open_tunnel", "open_tunnel_server", "serve_tunnel_server", "ServerConfig"):
        assert name in tunnel2.__all__
    assert issubclass(tunnel2.HandshakeRefused, tunnel2.HandshakeError)
    assert issubclass(tunnel2.HandshakeError, tunnel2.TunnelError)


# --- handler_for --------------------------------------------------------------------------------


async def asgi_app(
    scope: Scope,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """Echo the scope and the request body as JSON."""
    assert scope["type"] == "http"
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    answer = {
        "method": scope["method"],
        "path": scope["path"],
        "raw_path": scope["raw_path"].decode(),
        "query_string": scope["query_string"].decode(),
        "headers": [[n.decode(), v.decode()] for n, v in scope["headers"]],
        "body": body.decode(),
    }
    await send(
        {
            "type": "http.response.start",
            "status": 201,
            "headers": [(b"content-type", b"application/json"), (b"x-app", b"asgi")],
        }
    )
    data = json.dumps(answer).encode()
    # In two parts, so the streamed (chunked) path is used.
    await send({"type": "http.response.body", "body": data[:10], "more_body": True})
    await send({"type": "http.response.body", "body": data[10:]})


def test_handler_for_a_port() -> None:
    for target in (8080, "8080"):
        handler = handler_for(target)
        assert isinstance(handler, BackendForwarder)
        assert (handler.host, handler.port) == ("127.0.0.1", 8080)


def test_handler_for_a_url() -> None:
    handler = handler_for("http://backend.internal:9000")
    assert isinstance(handler, BackendForwarder)
    assert (handler.host, handler.port) == ("backend.internal", 9000)
    handler = handler_for("http://backend.internal")
    assert isinstance(handler, BackendForwarder)
    assert (handler.host, handler.port) == ("backend.internal", 80)


def test_handler_for_an_asgi_app() -> None:
    handler = handler_for(asgi_app)
    assert isinstance(handler, AsgiHandler)
    assert handler.app is asgi_app


@pytest.mark.parametrize("target", ["ftp://x", "ftp://x:21", "http://"])
def test_handler_for_rejects_other_urls(target: str) -> None:
    with pytest.raises(ValueError, match="http"):
        handler_for(target)


# --- open_tunnel over a real relay ------------------------------------------------------------


@pytest.fixture
async def relay(nursery: trio.Nursery) -> TunnelServer:
    server: TunnelServer = await nursery.start(tunnel2.serve_tunnel_server, ServerConfig(port=0))
    return server


async def http_get(url: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """A minimal HTTP/1.1 exchange with ``Connection: close`` (curl-like, no h11)."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    async with stream:
        method, length = (b"POST", b"Content-Length: %d\r\n" % len(body)) if body else (b"GET", b"")
        await stream.send_all(
            b"%s %s HTTP/1.1\r\nHost: %s\r\n%sConnection: close\r\n\r\n%s"
            % (method, target.encode(), parts.netloc.encode(), length, body)
        )
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, payload = bytes(data).partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        decoded = bytearray()
        while True:
            size_line, _, payload = payload.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            decoded += payload[:size]
            payload = payload[size + 2 :]
        payload = bytes(decoded)
    return int(status_line.split()[1]), headers, payload


async def test_open_tunnel_to_an_asgi_app(relay: TunnelServer) -> None:
    with trio.fail_after(10):
        async with tunnel2.open_tunnel(relay.base_url, asgi_app) as tunnel:
            status, headers, body = await http_get(
                tunnel.public_url + "hello/w%C3%B6rld?x=1&y", b"request body"
            )
            assert status == 201
            assert headers["x-app"] == "asgi"
            answer = json.loads(body)
            assert answer["method"] == "POST"
            assert answer["path"] == "/hello/wörld"
            assert answer["raw_path"] == "/hello/w%C3%B6rld"
            assert answer["query_string"] == "x=1&y"
            assert answer["body"] == "request body"
            assert ["x-forwarded-for", "127.0.0.1"] in answer["headers"]


async def test_open_tunnel_yields_urls_and_session_id(
    relay: TunnelServer, nursery: trio.Nursery
) -> None:
    backend: Backend = await nursery.start(serve_backend, "echo")
    with trio.fail_after(10):
        async with tunnel2.open_tunnel(relay.base_url, backend.port) as tunnel:
            assert isinstance(tunnel.session_id, str)
            assert len(tunnel.session_id) >= 32  # at least 128 random bits, hex
            assert tunnel.public_url == f"{relay.base_url}/session/{tunnel.session_id}/"
            status, _, body = await http_get(tunnel.public_url + "ping")
            assert status == 200
            assert json.loads(body)["target"] == "/ping"
        async with tunnel2.open_tunnel(relay.base_url, backend.port, session_id="mine") as fixed:
            assert fixed.session_id == "mine"
            assert fixed.public_url == f"{relay.base_url}/session/mine/"


def tunnel_task_names(root: trio.lowlevel.Task) -> list[str]:
    names: list[str] = []
    stack = [root]
    while stack:
        task = stack.pop()
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                if "tunnel2" in child.name:
                    names.append(child.name)
                stack.append(child)
    return names


async def test_leaving_open_tunnel_stops_everything(relay: TunnelServer) -> None:
    me = trio.lowlevel.current_task()
    with trio.fail_after(10):
        async with tunnel2.open_tunnel(relay.base_url, asgi_app) as tunnel:
            assert len(relay.uplinks) == 1
            assert tunnel_task_names(me)  # the agent runs below this task while open
            url = tunnel.public_url
        # No task of the agent is left, and the relay sees its uplink go.
        assert tunnel_task_names(me) == []
        while relay.uplinks:  # noqa: ASYNC110 - the registry offers no event to wait on
            await trio.sleep(0.05)
        status, _, body = await http_get(url)
        assert status in (404, 502)
        assert tunnel.session_id is not None
        assert tunnel.session_id.encode() in body


async def test_open_tunnel_to_a_bad_url_raises_value_error(relay: TunnelServer) -> None:
    with trio.fail_after(5), pytest.raises(ValueError, match="ftp"):
        async with tunnel2.open_tunnel(relay.base_url, "ftp://x"):
            pytest.fail("opened a tunnel to an ftp URL")


# --- until_signalled ---------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_until_signalled_returns_the_result_or_none_once_a_signal_cancels(
    signum: int,
) -> None:
    async def double(x: int) -> int:
        await trio.lowlevel.checkpoint()
        return 2 * x

    assert await tunnel2.until_signalled(double, 21) == 42
    cancelled = False

    async def forever() -> int:
        nonlocal cancelled
        signal.raise_signal(signum)  # to the receiver, which is open while this runs
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled = True
            raise

    with trio.fail_after(5):
        assert await tunnel2.until_signalled(forever) is None
    assert cancelled
