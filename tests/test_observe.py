"""Events out (tunnel2.observe): what the relay and agent emit, the access log, JSON logs.

All over in-memory transports; every test bounded with ``trio.fail_after``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from httpbackend import serve_backend

import tunnel2
from tunnel2 import observe
from tunnel2.agent import Agent, StreamHandler
from tunnel2.asgi import AsgiHandler
from tunnel2.backend import BackendForwarder
from tunnel2.entry import ProxyEntry
from tunnel2.observe import (
    AccessLogObserver,
    AgentJoined,
    AgentLeft,
    DrainStarted,
    Event,
    JsonFormatter,
    Observer,
    Reconnected,
    Refused,
    RequestFinished,
    RequestStarted,
)
from tunnel2.server import ServerConfig, TunnelServer
from tunnel2.testing import MEMORY_BASE_URL, MemoryTunnel, memory_connector

Scope = MutableMapping[str, Any]


async def app(scope: Scope, receive: Any, send: Any) -> None:
    """200 "hello" on every path but /missing (404) and /slow (no answer); reads the body."""
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/slow":
        await trio.sleep_forever()
    status = 404 if scope["path"] == "/missing" else 200
    body = b"hello" if status == 200 else b"no"
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": body})


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.reconnected = trio.Event()

    def on_event(self, event: Event) -> None:
        self.events.append(event)
        if type(event) is Reconnected:
            self.reconnected.set()

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if type(e) is kind]


@asynccontextmanager
async def observed_tunnel(
    relay: list[Observer],
    agent: list[Observer],
    config: ServerConfig | None = None,
    handler: StreamHandler | None = None,
) -> AsyncIterator[MemoryTunnel]:
    server = TunnelServer(config or ServerConfig(), base_url=MEMORY_BASE_URL, observers=relay)
    entry = ProxyEntry(server)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(entry.run_timeouts)
        connector = memory_connector(server, nursery)
        tunnel_agent = Agent(connector, handler or AsgiHandler(app, loop="trio"), observers=agent)
        await nursery.start(tunnel_agent.serve)
        yield MemoryTunnel(server, entry, tunnel_agent, nursery)
        nursery.cancel_scope.cancel()


async def test_request_events_on_both_sides() -> None:
    relay, agent = Recorder(), Recorder()
    with trio.fail_after(10):
        async with observed_tunnel([relay], [agent]) as tunnel:
            ok = await tunnel.request("POST", "/a/b?token=secret", body=b"12345")
            missing = await tunnel.request("GET", "/missing")
            outside = await tunnel.request("GET", "/elsewhere", raw_path=True)
    assert (ok.status, missing.status, outside.status) == (200, 404, 404)
    session = tunnel.agent.session_id
    assert session is not None
    assert relay.of(RequestStarted)[0] == RequestStarted("relay", session, "POST", "/a/b", 5)
    finished = relay.of(RequestFinished)
    assert [(e.session_id, e.path, e.status) for e in finished] == [
        (session, "/a/b", 200),
        (session, "/missing", 404),
        ("", "/elsewhere", 404),  # no session in the URL: answered by the relay itself
    ]
    assert all(e.side == "relay" and e.duration >= 0 for e in finished)
    assert finished[0].request_body == 5
    assert finished[0].response_bytes is not None
    assert finished[0].response_bytes > len(b"hello")
    agent_done = agent.of(RequestFinished)
    assert [(e.side, e.session_id, e.method, e.path, e.status) for e in agent_done] == [
        ("agent", session, "POST", "/a/b", 200),
        ("agent", session, "GET", "/missing", 404),
    ]
    joined = relay.of(AgentJoined)
    assert joined == [AgentJoined(session, joined[0].agent, "", 1)]
    assert "secret" not in repr(relay.events + agent.events)


async def test_agent_events_carry_the_backends_status() -> None:
    agent = Recorder()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            backend = await nursery.start(serve_backend)
            forwarder = BackendForwarder("127.0.0.1", backend.port)
            async with observed_tunnel([], [agent], handler=forwarder) as tunnel:
                assert (await tunnel.request("GET", "/echo?q=1")).status == 200
                assert (await tunnel.request("GET", "/status/204")).status == 204
            await forwarder.aclose()
            nursery.cancel_scope.cancel()
    assert [(e.path, e.status) for e in agent.of(RequestFinished)] == [
        ("/echo", 200),
        ("/status/204", 204),
    ]


async def test_a_request_timeout_is_finished_as_504(autojump_clock: trio.testing.MockClock) -> None:
    relay, agent = Recorder(), Recorder()
    with trio.fail_after(100):
        async with observed_tunnel([relay], [agent], ServerConfig(request_timeout=5)) as tunnel:
            assert (await tunnel.request("GET", "/slow")).status == 504
            await trio.testing.wait_all_tasks_blocked()
    assert [(e.path, e.status) for e in relay.of(RequestFinished)] == [("/slow", 504)]
    assert relay.of(RequestFinished)[0].duration >= 5
    # The agent's handler was cancelled by the reset: it answered nothing.
    assert [(e.path, e.status) for e in agent.of(RequestFinished)] == [("/slow", 0)]


async def test_agent_left_reconnected_drain_and_refused() -> None:
    relay, agent = Recorder(), Recorder()
    with trio.fail_after(10):
        async with observed_tunnel([relay], [agent]) as tunnel:
            uplink = tunnel.agent.uplink
            assert uplink is not None
            uplink.close("test drops it")
            await agent.reconnected.wait()
            await tunnel.server.drain()
            # A new agent during the drain is refused, and the refusal is an event.
            async with trio.open_nursery() as nursery:
                late = Agent(
                    memory_connector(tunnel.server, nursery), AsgiHandler(app, loop="trio")
                )
                with pytest.raises(Exception, match="shutting down"):
                    await late.serve()
    reconnected = agent.of(Reconnected)[0]
    assert reconnected.session_id == tunnel.agent.session_id
    assert reconnected.connections == 2
    left = relay.of(AgentLeft)[0]
    assert left.session_id == tunnel.agent.session_id
    assert left.agent == relay.of(AgentJoined)[0].agent
    assert "test drops it" in left.reason, left
    assert relay.of(DrainStarted) == [DrainStarted(agents=1, in_flight=0)]
    refused = relay.of(Refused)
    assert [(r.reason_code, r.reason) for r in refused] == [
        ("SESSION_UNAVAILABLE", "relay is shutting down")
    ]


async def test_refused_for_a_bad_token() -> None:
    relay = Recorder()
    config = ServerConfig(tokens=frozenset({"good"}))
    server = TunnelServer(config, base_url=MEMORY_BASE_URL, observers=[relay])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            agent = Agent(memory_connector(server, nursery), AsgiHandler(app, loop="trio"))
            with pytest.raises(Exception, match="invalid or missing token"):
                await agent.serve()
    assert [(r.code, r.reason_code) for r in relay.of(Refused)] == [(10, "UNAUTHORIZED")]


class Raises:
    def __init__(self) -> None:
        self.calls = 0

    def on_event(self, event: Event) -> None:
        self.calls += 1
        raise RuntimeError("observer bug")


async def test_an_observer_that_raises_is_logged_once_and_removed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad, good = Raises(), Recorder()
    with trio.fail_after(10):
        async with observed_tunnel([bad, good], [bad]) as tunnel:
            first = await tunnel.request("GET", "/")
            second = await tunnel.request("GET", "/")
    assert (first.status, second.status) == (200, 200)
    assert bad.calls == 2  # once on each side, then removed from both lists
    assert len(good.of(RequestFinished)) == 2
    failures = [r for r in caplog.records if "observer" in r.getMessage()]
    assert len(failures) == 2
    assert all(r.exc_info is not None for r in failures)


async def test_no_observer_builds_no_events(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []
    for name in ("RequestStarted", "RequestFinished", "AgentJoined", "AgentLeft", "DrainStarted"):
        original = getattr(observe, name)

        def counting(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            built.append(_original.__name__)
            return _original(*args, **kwargs)

        for module in ("tunnel2.observe", "tunnel2.entry", "tunnel2.agent", "tunnel2.server"):
            monkeypatch.setattr(f"{module}.{name}", counting, raising=False)
    with trio.fail_after(10):
        async with observed_tunnel([], []) as tunnel:
            assert (await tunnel.request("GET", "/")).status == 200
            await tunnel.server.drain()
    assert built == []
    # The same patch does count when someone listens (the test can see constructions).
    with trio.fail_after(10):
        async with observed_tunnel([Recorder()], []) as tunnel:
            assert (await tunnel.request("GET", "/")).status == 200
    assert "RequestFinished" in built
    assert "AgentJoined" in built


async def test_access_log_line_per_request_on_relay_and_agent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tunnel2.requests")
    with trio.fail_after(10):
        async with observed_tunnel([AccessLogObserver()], [AccessLogObserver()]) as tunnel:
            await tunnel.request("GET", "/x?key=secret", headers=[("Cookie", "c=secret")])
            await tunnel.request("GET", "/missing", headers=[("Authorization", "Bearer secret")])
    lines = [r for r in caplog.records if r.name == "tunnel2.requests"]
    assert len(lines) == 4
    session = tunnel.agent.session_id
    assert session is not None
    messages = sorted(r.getMessage().rsplit(" (", 1)[0] for r in lines)
    assert messages == sorted(
        f"{side} {session[:8]} GET {path} -> {status}"
        for side in ("relay", "agent")
        for path, status in (("/x", 200), ("/missing", 404))
    )
    formatter = JsonFormatter()
    for record in lines:
        text = formatter.format(record)
        assert "secret" not in text
        fields = json.loads(text)
        assert fields["logger"] == "tunnel2.requests"
        assert fields["event"] == "RequestFinished"
        assert {"side", "session_id", "method", "path", "status", "duration"} <= set(fields)
        assert fields["session_id"] == session


FINISHED = RequestFinished("relay", "24370e4994b1c557", "GET", "/api/items", 0, 200, 43, 0.014)


@pytest.mark.parametrize("json_lines", [False, True])
def test_access_log_stream_writes_what_the_cli_formatters_would(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, json_lines: bool
) -> None:
    """Written to a stream, a line is the one the CLI's logging formatter (text, local time)
    or JsonFormatter (UTC) would have made of the logger's record at the same instant, to
    the millisecond as this Python's LogRecord takes it, and no record is made at all."""
    caplog.set_level(logging.INFO, logger="tunnel2.requests")
    out = io.StringIO()
    observer = AccessLogObserver(out, json=json_lines)
    formatter = (
        JsonFormatter()
        if json_lines
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    expected = []
    zone = os.environ.get("TZ")
    os.environ["TZ"] = "TST-05:30"  # POSIX: UTC+05:30, no zone files needed
    time.tzset()
    try:
        # Instants in one second (the stamp is cached), then the next one; just above a
        # millisecond (where float seconds and integer nanoseconds disagree), and just below
        # a second (where nanoseconds / 1e9 rounds up).
        for ns in (
            1764594558_250000000,
            1764594558_000000000,
            1764594558_001000000,
            1764594559_977000000,
            1764594559_999999900,
        ):
            monkeypatch.setattr("tunnel2.observe.time.time_ns", lambda ns=ns: ns)
            # time.time() as CPython makes it from the same reading: float(ns) / 1e9
            monkeypatch.setattr("tunnel2.observe.time.time", lambda ns=ns: ns / 1e9)
            observer.on_event(FINISHED)
            observer.on_event(RequestStarted("relay", "x", "GET", "/", 0))  # not a line
            AccessLogObserver().on_event(FINISHED)  # the logging path: the expected line
            expected.append(formatter.format(caplog.records.pop()) + "\n")
    finally:
        if zone is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = zone
        time.tzset()
    assert caplog.records == []
    assert out.getvalue() == "".join(expected)
    assert expected[0].count("relay 24370e49 GET /api/items -> 200 (14.0 ms)") == 1
    if json_lines:
        assert json.loads(expected[0])["time"].startswith("2025-12-01T13:09:18.")
    else:  # (the milliseconds: 249 before Python 3.13, 250 since; the comparison checks them)
        assert expected[0].startswith("2025-12-01 18:39:18,")


def test_access_log_stream_that_fails_is_removed_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = io.StringIO()
    out.close()
    observers: list[Observer] = [AccessLogObserver(out)]
    observe.emit(observers, FINISHED)
    assert observers == []
    assert [r.exc_info is not None for r in caplog.records if "observer" in r.getMessage()] == [
        True
    ]


def test_event_fields_are_the_attributes_of_every_event_class() -> None:
    events: list[Event] = [
        RequestStarted("agent", "s", "POST", "/p", None),
        FINISHED,
        AgentJoined("s", "agent-1", "ci", 2),
        AgentLeft("s", "agent-1", "ci", "gone"),
        DrainStarted(1, 2),
        Refused("agent-2", 4403, "token", "bad token"),
        Reconnected("s", "http://x/session/s/", 3),
    ]
    for event in events:
        assert observe.event_fields(event) == {"event": type(event).__name__, **attrs.asdict(event)}
        assert list(observe.event_fields(event))[1:] == [f.name for f in attrs.fields(type(event))]


def test_json_formatter_plain_record_and_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("tunnel2.x", logging.ERROR, "f", 1, "n=%d", (3,), sys.exc_info())
    fields = json.loads(JsonFormatter().format(record))
    assert fields["message"] == "n=3"
    assert fields["level"] == "ERROR"
    assert "ValueError: boom" in fields["exception"]
    assert fields["time"].endswith("Z")


# --- the CLI: --log-format json and --admin, as real subprocesses ---------------------------


async def test_cli_relay_logs_json_request_lines_and_serves_admin(tmp_path: Path) -> None:
    from test_admin import get
    from test_cli import CLI, run

    args = ("server", "--port", "0", "--log-format", "json", "--admin", "127.0.0.1:0")
    with trio.fail_after(30):
        async with run(*CLI, *args, stderr=tmp_path / "relay.err") as relay:
            relay_url = (await relay.readline()).split()[3]
            async with tunnel2.open_tunnel(relay_url, app, asgi_loop="trio") as agent:
                status, _ = await get(relay_url, f"/session/{agent.session_id}/x?token=secret")
                assert status == 200
                admin_lines = [
                    json.loads(line)
                    for line in relay.stderr().splitlines()
                    if "admin endpoint" in line
                ]
                admin_url = admin_lines[0]["message"].rsplit(" ", 1)[1]
                assert await get(admin_url, "/healthz") == (200, b"ok\n")
            assert await relay.interrupt() == 0
    lines = [json.loads(line) for line in relay.stderr().splitlines()]  # every line is JSON
    requests = [f for f in lines if f.get("event") == "RequestFinished"]
    assert [(f["side"], f["path"], f["status"]) for f in requests] == [("relay", "/x", 200)]
    assert requests[0]["session_id"] == agent.session_id
    assert "secret" not in relay.stderr()


async def test_cli_rejects_a_bad_admin_address() -> None:
    from test_cli import CLI

    with trio.fail_after(15):
        result = await trio.run_process(
            [*CLI, "http", "8080", "--admin", "nowhere"], capture_stderr=True, check=False
        )
    assert result.returncode == 2
    assert "is not HOST:PORT" in result.stderr.decode()


async def test_cli_admin_address_in_use_is_one_line_and_exit_1() -> None:
    from test_cli import CLI

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        admin = f"127.0.0.1:{busy.getsockname()[1]}"
        for command in (("server", "--port", "0"), ("http", "1", "--server", "http://127.0.0.1:1")):
            with trio.fail_after(20):
                result = await trio.run_process(
                    [*CLI, *command, "-q", "--admin", admin], capture_stderr=True, check=False
                )
            assert result.returncode == 1
            last = result.stderr.decode().strip().splitlines()[-1]
            assert last.startswith(f"tunnel2 {command[0]}: cannot serve the admin endpoint on")
            assert admin in last
            assert "Traceback" not in result.stderr.decode()
