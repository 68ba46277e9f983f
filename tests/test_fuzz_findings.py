"""Regression tests for the fuzzers' findings F1-F7 (fuzz/FINDINGS.md): each failed before
its fix."""

from __future__ import annotations

import logging
from typing import Any

import h11
import pytest
import trio
import trio.testing

from fuzz import _relay
from fuzz.entry_agent import Action, open_fake_agent, visit
from tunnel2.testing import MemoryTunnel, open_memory_tunnel

CONFIG = _relay.CONFIG


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("tunnel2")
    ]


async def _exchange(tunnel: MemoryTunnel, data: bytes) -> bytes:
    received, gave_up = await visit(tunnel, tunnel.agent.session_id or "", data)
    assert not gave_up, f"no answer and no close; read {received[:200]!r}"
    return received


def _responses(data: bytes, method: bytes) -> tuple[list[h11.Response], bytes]:
    """The responses to one request with ``method`` in ``data``, and the bytes after them."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "relay.test")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    responses: list[h11.Response] = []
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return responses, conn.trailing_data[0]  # closed without (a whole) answer
        if isinstance(event, h11.Response | h11.InformationalResponse):
            responses.append(event)  # type: ignore[arg-type]
        if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed) or event is h11.NEED_DATA:
            return responses, conn.trailing_data[0]


# --- F1: the entry's error responses to HEAD carry a body ---------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"HEAD /p HTTP/1.1\r\n\r\n",  # 400: no Host
        b"HEAD /session/nope/ HTTP/1.1\r\nHost: relay.test\r\n\r\n",  # 404: no such session
        # 400 from transports.accept_websocket: not a valid upgrade
        b"HEAD /_tunnel/connect HTTP/1.1\r\nHost: relay.test\r\nConnection: upgrade\r\n"
        b"Upgrade: websocket\r\n\r\n",
    ],
)
async def test_f1_error_response_to_head_has_no_body(
    head: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(60):
        async with open_memory_tunnel(_relay.app, config=CONFIG, asgi_loop="trio") as tunnel:
            data = await _exchange(tunnel, head)
    responses, rest = _responses(data, b"HEAD")
    assert [r.status_code for r in responses] in ([400], [404])
    assert rest == b"", f"a response to HEAD carried {len(rest)} bytes of body: {rest!r}"


# --- F2: a visitor's malformed body makes the agent log ERROR -----------------------------------


async def test_f2_malformed_request_body_logs_no_error(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    request = (
        b"POST /session/@SID@/ HTTP/1.1\r\nHost: relay.test\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n5\r\nhelloXX0\r\n\r\n"
    )
    with trio.fail_after(60):
        async with open_memory_tunnel(_relay.app, config=CONFIG, asgi_loop="trio") as tunnel:
            data = await _exchange(tunnel, request)
            await trio.sleep(_relay.SETTLE)
    assert _responses(data, b"POST")[0][0].status_code == 400
    assert _errors(caplog) == []


# --- F3: HEAD to an app that sends a body gets no response --------------------------------------


async def _head_with_body_app(scope: _relay.Scope, receive: Any, send: Any) -> None:
    await receive()
    headers = [(b"content-length", b"5")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"hello"})  # as most ASGI apps do


async def test_f3_head_to_app_sending_a_body_gets_a_response(
    autojump_clock: trio.testing.MockClock,
) -> None:
    request = b"HEAD /session/@SID@/ HTTP/1.1\r\nHost: relay.test\r\n\r\n"
    with trio.fail_after(60):
        async with open_memory_tunnel(
            _head_with_body_app, config=CONFIG, asgi_loop="trio"
        ) as tunnel:
            data = await _exchange(tunnel, request)
    responses, rest = _responses(data, b"HEAD")
    assert [r.status_code for r in responses] == [200], data
    assert dict(responses[0].headers).get(b"content-length") == b"5"
    assert rest == b""


# --- F4: "Expect: 100-continue" and an early close leak the tunnel stream -----------------------

_EXPECT = (
    b"POST /session/@SID@/ HTTP/1.1\r\nHost: relay.test\r\nExpect: 100-continue\r\n"
    b"Content-Length: 0\r\n\r\n"
)


async def _leak(tunnel: MemoryTunnel, count: int) -> None:
    sid = (tunnel.agent.session_id or "").encode()
    for _ in range(count):
        client = tunnel.open_client_stream()
        await client.send_all(_EXPECT.replace(_relay.SID, sid))
        await client.aclose()  # gone before the entry writes its 100 Continue
    await trio.sleep(_relay.SETTLE)


async def test_f4_expect_continue_and_early_close_leaves_no_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(120):
        async with open_memory_tunnel(_relay.app, config=CONFIG, asgi_loop="trio") as tunnel:
            await _leak(tunnel, 3)
            assert [u.open_streams for u in tunnel.server.uplinks] == [0]


async def test_f4_leaked_streams_do_not_use_up_the_agent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The relay never ends a leaked stream's request body, so the agent's app waits for it
    # for ever: past AgentConfig.max_concurrent (64) leaks, no worker is left for anyone.
    with trio.fail_after(600):
        async with open_memory_tunnel(_relay.app, config=CONFIG, asgi_loop="trio") as tunnel:
            await _leak(tunnel, 70)
            response = await tunnel.request("GET", "/")
            assert response.status == 200, (response.status, response.body)


# --- F5: a malformed response head from the agent escapes as ERROR, with no answer ---------------


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"garbage\r\n\r\n",
    ],
)
async def test_f5_malformed_response_head_answers_502(
    head: bytes, caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    script = (Action("head", head), Action("data", b"hello"), Action("end"))
    with trio.fail_after(60):
        async with (
            open_memory_tunnel(_relay.app, config=CONFIG, asgi_loop="trio") as tunnel,
            open_fake_agent(tunnel, script) as sid,
        ):
            data, _ = await visit(tunnel, sid, b"GET /session/@SID@/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [r.status_code for r in _responses(data, b"GET")[0]] == [502], data
    assert _errors(caplog) == []


# --- F6: a stalled response body pins the public connection ---------------------------------------


async def test_f6_stalled_response_body_releases_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    script = (Action("head", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),)
    with trio.fail_after(3600):
        async with (
            open_memory_tunnel(_relay.app, config=CONFIG, asgi_loop="trio") as tunnel,
            open_fake_agent(tunnel, script) as sid,
        ):
            await visit(tunnel, sid, b"GET /session/@SID@/ HTTP/1.1\r\nHost: x\r\n\r\n")
            # The visitor gave up and closed; the entry should let go of it in bounded time.
            await trio.sleep(10 * CONFIG.idle_timeout)
            assert tunnel.entry.connections == 0


# --- F7: an informational head from the agent is passed on as the final response ----------------


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
    ],
)
async def test_f7_informational_head_as_final_answers_502(
    head: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    script = (Action("head", head), Action("end"))
    with trio.fail_after(600):
        async with (
            open_memory_tunnel(_relay.app, config=CONFIG, asgi_loop="trio") as tunnel,
            open_fake_agent(tunnel, script) as sid,
        ):
            data, _ = await visit(tunnel, sid, b"GET /session/@SID@/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 502 "), data
