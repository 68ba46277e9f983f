"""Restarts lose nothing (issue #8.1): ``tunnel2 server`` and ``tunnel2 http`` drain on the
first SIGTERM or SIGINT, stop at once on the second, and a session with two agents survives a
rolling restart. Real subprocesses and sockets on 127.0.0.1; the backend runs in the test so
it can tell when requests are in flight and hold them there.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import h11
import pytest
import trio
from httpbackend import Backend, serve_backend
from test_cli import CLI, Proc, run
from test_e2e_sockets import fetch, gated, wait_until

import tunnel2
from tunnel2 import ServerConfig, TunnelServer

IN_FLIGHT: Final = 20
TOKEN: Final = "rolling-restart-token"


async def relay_url_of(relay: Proc) -> str:
    line = await relay.readline()
    assert line.startswith("tunnel2 relay on http://127.0.0.1:"), line
    return line.split()[3]


async def public_url_of(agent: Proc) -> str:
    line = await agent.readline()
    assert line.startswith("Forwarding "), line
    return line.split()[1]


@asynccontextmanager
async def relay_process(tmp_path: Path, *args: str) -> AsyncIterator[tuple[Proc, str]]:
    async with run(
        *CLI, "server", "--port", "0", "--no-state", *args, stderr=tmp_path / "relay.err"
    ) as relay:
        yield relay, await relay_url_of(relay)


@asynccontextmanager
async def agent_process(
    tmp_path: Path, name: str, backend: Backend, relay_url: str, *args: str
) -> AsyncIterator[tuple[Proc, str]]:
    async with run(
        *CLI, "http", str(backend.port), "--server", relay_url, *args,
        stderr=tmp_path / f"{name}.err",
    ) as agent:  # fmt: skip
        yield agent, await public_url_of(agent)


async def send_in_flight(
    nursery: trio.Nursery, url: str, backend: Backend, statuses: list[int]
) -> None:
    """Start IN_FLIGHT requests held at the backend; return once all have reached it."""
    seen = len(backend.requests)

    async def one(i: int) -> None:
        try:
            response = await fetch(f"{url}gate/{i}")
        except (h11.RemoteProtocolError, trio.BrokenResourceError, OSError):
            statuses.append(0)  # cut with no answer (only a forced stop may do that)
        else:
            statuses.append(response.status)

    for i in range(IN_FLIGHT):
        nursery.start_soon(one, i)
    await wait_until(lambda: len(backend.requests) - seen >= IN_FLIGHT)


def assert_clean_exit(proc: Proc) -> None:
    assert "Traceback" not in proc.stderr(), proc.stderr()


async def test_sigterm_on_the_relay_lets_every_request_in_flight_finish(tmp_path: Path) -> None:
    gate = trio.Event()
    statuses: list[int] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            backend: Backend = await nursery.start(serve_backend, gated(gate))
            async with (
                relay_process(tmp_path) as (relay, relay_url),
                agent_process(tmp_path, "agent", backend, relay_url) as (_, url),
            ):
                async with trio.open_nursery() as clients:
                    await send_in_flight(clients, url, backend, statuses)
                    relay.process.send_signal(signal.SIGTERM)
                    await wait_until(lambda: "SIGTERM: draining" in relay.stderr())
                    # Draining: a new request gets 503 with Retry-After, not 502.
                    probe = await fetch(url)
                    assert probe.status == 503, probe
                    assert probe.get(b"retry-after") == b"1"
                    gate.set()
                assert statuses == [200] * IN_FLIGHT
                assert await relay.process.wait() == 0
            assert_clean_exit(relay)
            nursery.cancel_scope.cancel()


async def test_sigint_on_the_agent_lets_every_request_in_flight_finish(tmp_path: Path) -> None:
    gate = trio.Event()
    statuses: list[int] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            backend: Backend = await nursery.start(serve_backend, gated(gate))
            async with relay_process(tmp_path) as (relay, relay_url):
                async with agent_process(tmp_path, "agent", backend, relay_url) as (agent, url):
                    async with trio.open_nursery() as clients:
                        await send_in_flight(clients, url, backend, statuses)
                        agent.process.send_signal(signal.SIGINT)
                        await wait_until(lambda: "SIGINT: draining" in agent.stderr())
                        gate.set()
                    assert statuses == [200] * IN_FLIGHT
                    assert await agent.process.wait() == 0
                    assert_clean_exit(agent)
                relay.process.send_signal(signal.SIGTERM)
                assert await relay.process.wait() == 0
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("who", ["relay", "agent"])
async def test_a_second_signal_stops_at_once(tmp_path: Path, who: str) -> None:
    statuses: list[int] = []
    name, first = ("SIGTERM", signal.SIGTERM) if who == "relay" else ("SIGINT", signal.SIGINT)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            backend: Backend = await nursery.start(serve_backend, gated(None))  # never answers
            async with (
                relay_process(tmp_path, "--drain-timeout", "3600") as (relay, relay_url),
                agent_process(tmp_path, "agent", backend, relay_url, "--drain-timeout", "3600") as (
                    agent,
                    url,
                ),
                trio.open_nursery() as clients,
            ):
                await send_in_flight(clients, url, backend, statuses)
                proc = relay if who == "relay" else agent
                proc.process.send_signal(first)
                await wait_until(lambda: f"{name}: draining" in proc.stderr())
                proc.process.send_signal(first)
                assert await proc.process.wait() == 130
                assert_clean_exit(proc)
                clients.cancel_scope.cancel()
            nursery.cancel_scope.cancel()


async def test_a_rolling_restart_of_a_fixed_session_loses_no_request(tmp_path: Path) -> None:
    statuses: list[int] = []
    failures: list[str] = []
    stop = trio.Event()
    agent_args = ("--session", "app", "--token", TOKEN)
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            backend: Backend = await nursery.start(serve_backend, "echo")
            async with relay_process(tmp_path, "--token", TOKEN) as (_, relay_url):
                running = [0]

                async def client(url: str) -> None:
                    running[0] += 1
                    while not stop.is_set():
                        response = await fetch(f"{url}hello")
                        statuses.append(response.status)
                        if response.status != 200:
                            failures.append(response.body.decode(errors="replace"))
                    running[0] -= 1

                async with (
                    agent_process(tmp_path, "a1", backend, relay_url, *agent_args) as (a1, url),
                    agent_process(tmp_path, "a2", backend, relay_url, *agent_args) as (a2, _),
                    trio.open_nursery() as clients,
                ):
                    for _ in range(4):
                        clients.start_soon(client, url)
                    await wait_until(lambda: len(statuses) >= 20)
                    a1.process.send_signal(signal.SIGINT)  # a1 goes; a2 serves alone
                    assert await a1.process.wait() == 0
                    before = len(statuses)
                    await wait_until(lambda: len(statuses) >= before + 20)
                    async with agent_process(tmp_path, "a3", backend, relay_url, *agent_args):
                        a2.process.send_signal(signal.SIGINT)  # a2 goes; a3 takes over
                        assert await a2.process.wait() == 0
                        before = len(statuses)
                        await wait_until(lambda: len(statuses) >= before + 20)
                        stop.set()
                        await wait_until(lambda: running[0] == 0)  # before a3 is killed
                    assert_clean_exit(a1)
                    assert_clean_exit(a2)
            nursery.cancel_scope.cancel()
    assert statuses
    assert set(statuses) == {200}, failures


async def test_a_frozen_agent_is_skipped_while_its_twin_serves(tmp_path: Path) -> None:
    """SIGSTOP one of a session's two agents: the relay finds it dead by the heartbeat and
    the other one answers every request."""
    agent_args = ("--session", "app", "--token", TOKEN)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            backend: Backend = await nursery.start(serve_backend, "echo")
            config = ServerConfig(port=0, tokens=frozenset({TOKEN}), ping_interval=0.5)
            server: TunnelServer = await nursery.start(tunnel2.serve_tunnel_server, config)
            async with (
                agent_process(tmp_path, "a1", backend, server.base_url, *agent_args) as (a1, url),
                agent_process(tmp_path, "a2", backend, server.base_url, *agent_args),
            ):
                await wait_until(lambda: len(server.routes.uplinks_of("app")) == 2)
                a1.process.send_signal(signal.SIGSTOP)
                try:
                    # Until the relay notices, a request may reach the frozen agent: it gets
                    # 502 at detection instead of hanging.
                    while len(server.routes.uplinks_of("app")) == 2:
                        assert (await fetch(f"{url}hello")).status in (200, 502)
                    for _ in range(20):
                        assert (await fetch(f"{url}hello")).status == 200
                finally:
                    a1.process.send_signal(signal.SIGCONT)
            nursery.cancel_scope.cancel()
