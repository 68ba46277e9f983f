"""Tests for :mod:`tunnel2.sync`: ``tunnel2.connect`` and ``tunnel2.start_relay``, the
thread-backed handles for synchronous code (scripts, threads, the REPL, Flask)."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
from apps.flask_app import app as flask_app
from embed_helpers import (
    STEP_TIMEOUT,
    fetch,
    hello_app,
    run_python,
    silent_listener,
    sync_relay,
    tunnel_threads,
    wsgi_server,
)

import tunnel2
from tunnel2.sync import ThreadHandle, TrioThread


def test_connect_serves_an_asgi_app_and_close_removes_the_session() -> None:
    with sync_relay() as relay:
        with tunnel2.connect(hello_app, server=relay.base_url) as tunnel:
            assert tunnel.public_url.startswith(relay.base_url)
            assert tunnel.session_id in tunnel.public_url
            assert tunnel.public_urls[0] == tunnel.public_url
            assert fetch(tunnel.public_url + "x") == (200, "hello /x")
            states = [tunnel.closed]
        states.append(tunnel.closed)
        assert states == [False, True]
        status, body = fetch(tunnel.public_url)
        assert status in (404, 502), body  # the relay saw the agent leave
        assert tunnel_threads() == ["tunnel2-relay"], "close() joins the tunnel's thread"


def test_flask_behind_a_real_wsgi_server_through_the_tunnel() -> None:
    with (
        wsgi_server(flask_app) as port,
        sync_relay() as relay,
        tunnel2.connect(port, server=relay.base_url) as tunnel,
    ):
        answer = httpx.get(tunnel.public_url, timeout=STEP_TIMEOUT)
        assert answer.status_code == 200
        assert answer.text == "hello from flask, path /"
        item = httpx.get(tunnel.public_url + "items/7", timeout=STEP_TIMEOUT)
        assert item.json() == {"item": 7}


def test_several_handles_at_once() -> None:
    with sync_relay() as relay, sync_relay() as other:
        tunnels = [tunnel2.connect(hello_app, server=r.base_url) for r in (relay, relay, other)]
        try:
            assert len({t.session_id for t in tunnels}) == 3
            for n, tunnel in enumerate(tunnels):
                assert fetch(tunnel.public_url + str(n)) == (200, f"hello /{n}")
        finally:
            for tunnel in tunnels:
                tunnel.close()
        assert tunnel_threads() == ["tunnel2-relay", "tunnel2-relay"]


def test_connect_from_a_plain_thread() -> None:
    results: list[tuple[int, str]] = []
    with sync_relay() as relay:

        def worker() -> None:
            with tunnel2.connect(hello_app, server=relay.base_url) as tunnel:
                results.append(fetch(tunnel.public_url + "t"))

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join(STEP_TIMEOUT)
    assert results == [(200, "hello /t")]


def test_close_is_idempotent() -> None:
    with sync_relay() as relay:
        tunnel = tunnel2.connect(hello_app, server=relay.base_url)
        tunnel.close()
        tunnel.close()
        assert tunnel.closed
        assert "CLOSED" in repr(tunnel)


def test_a_refusal_is_raised_from_connect_with_its_reason() -> None:
    with (
        sync_relay(tokens=frozenset({"right"})) as relay,
        pytest.raises(tunnel2.HandshakeRefused) as info,
    ):
        tunnel2.connect(hello_app, server=relay.base_url, token="wrong")
    assert "token" in info.value.reason
    assert tunnel_threads() == []


def test_an_unreachable_relay_is_raised_from_connect() -> None:
    with silent_listener() as port:
        pass  # closed again: nothing listens there now
    with pytest.raises(tunnel2.HandshakeError, match="cannot connect"):
        tunnel2.connect(hello_app, server=f"http://127.0.0.1:{port}")
    assert tunnel_threads() == []


def test_a_silent_relay_fails_connect_in_time() -> None:
    with silent_listener() as port, pytest.raises(tunnel2.HandshakeError):
        tunnel2.connect(hello_app, server=f"http://127.0.0.1:{port}", connect_timeout=0.5)
    assert tunnel_threads() == []


def test_start_relay_reports_a_bind_error() -> None:
    with sync_relay() as relay, pytest.raises(OSError, match="in use"):
        tunnel2.start_relay(tunnel2.ServerConfig(port=relay.port))


# Registered before tunnel2 is imported, so it runs after tunnel2's own atexit hook.
EXIT_PROBE = """\
import atexit, threading
names = lambda: [t.name for t in threading.enumerate() if t.name.startswith("tunnel2-")]
_ = atexit.register(lambda: print("AT EXIT", tunnel.closed, relay.closed, names()))
import tunnel2
from tunnel2.sync import ThreadHandle, TrioThread
from embed_helpers import hello_app
relay = tunnel2.start_relay(tunnel2.ServerConfig(port=0, drain_timeout=1.0))
tunnel = tunnel2.connect(hello_app, server=relay.base_url)
print("OPEN", tunnel.public_url.startswith(relay.base_url), flush=True)
"""


def test_exit_with_open_handles_closes_them() -> None:
    done = run_python(EXIT_PROBE)
    assert done.returncode == 0, done.stderr
    assert "OPEN True" in done.stdout
    assert "AT EXIT True True []" in done.stdout, done.stdout + done.stderr


def test_the_repl_can_open_a_tunnel_and_exit() -> None:
    done = run_python(EXIT_PROBE + "print('REPL', tunnel.closed)\n", repl=True)
    assert done.returncode == 0, done.stderr
    assert "REPL False" in done.stdout
    assert "AT EXIT True True []" in done.stdout, done.stdout + done.stderr


def test_exit_is_bounded_when_a_handle_cannot_stop() -> None:
    code = """\
    import time
    import tunnel2, tunnel2.sync
    tunnel2.sync.EXIT_TIMEOUT = 0.2
    relay = tunnel2.start_relay(tunnel2.ServerConfig(port=0))
    async def block_the_thread() -> None:
        time.sleep(3600)  # a bug: blocks trio's thread, so the relay can never stop
    relay._run.submit(block_the_thread)
    print("BLOCKED", flush=True)
    """
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert "BLOCKED" in done.stdout
    assert "did not stop within 0.2s at exit" in done.stderr


# --- TrioThread: the bridge both front doors and tunnel2.testing stand on ---------------


@asynccontextmanager
async def nothing() -> AsyncIterator[str]:
    await trio.lowlevel.checkpoint()
    yield "value"


async def fail(message: str) -> None:
    await trio.lowlevel.checkpoint()
    raise ValueError(message)


def test_a_submitted_call_returns_raises_and_cancels() -> None:
    run = TrioThread(nothing, "tunnel2-test")
    run.start()
    try:
        assert run.ready.result(STEP_TIMEOUT) == "value"
        future, _ = run.submit(trio.to_thread.run_sync, sum, [1, 2])
        assert future.result(STEP_TIMEOUT) == 3
        future, _ = run.submit(fail, "as itself")
        with pytest.raises(ValueError, match="as itself"):
            future.result(STEP_TIMEOUT)
        future, cancel = run.submit(trio.sleep_forever)
        cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            future.result(STEP_TIMEOUT)
    finally:
        run.stop()
        assert run.join(STEP_TIMEOUT)
    assert run.done.result(0) is None
    with pytest.raises(RuntimeError, match="not open"):
        run.submit(trio.sleep_forever)


def test_stopping_before_the_block_is_entered() -> None:
    run = TrioThread(nothing, "tunnel2-test")
    run.stop()  # before start: the run gives up at once
    run.start()
    assert run.join(STEP_TIMEOUT)
    with pytest.raises(RuntimeError, match="stopped before"):
        run.ready.result(0)


@asynccontextmanager
async def fails_on_exit() -> AsyncIterator[str]:
    yield "value"
    await trio.lowlevel.checkpoint()
    raise ValueError("raised after the block was open")


def test_close_raises_what_the_background_run_raised_once() -> None:
    handle = ThreadHandle(fails_on_exit, "tunnel2-test", STEP_TIMEOUT)
    with pytest.raises(ValueError, match="after the block was open"):
        handle.close()
    handle.close()
    assert handle.closed
