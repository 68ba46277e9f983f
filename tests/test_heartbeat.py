"""Dead peers are found fast (issue #8.2): heartbeat deadline, routing around a frozen agent,
least-in-flight choice, and the agent's re-dial backoff. In memory, under ``autojump_clock``.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final, cast

import attrs
import trio
import trio.testing

from tunnel2 import ErrorCode, ServerConfig, TunnelServer
from tunnel2.agent import Agent, AgentConfig, _Backoff
from tunnel2.asgi import AsgiHandler, AsgiMessage, AsgiScope
from tunnel2.entry import ProxyEntry
from tunnel2.sessions import DISCONNECTED, Routed, RouteTable
from tunnel2.testing import MEMORY_BASE_URL, MemoryTunnel
from tunnel2.transports import FrameTransport, memory_transport_pair

if TYPE_CHECKING:
    from tunnel2.uplink import TunnelUplink

TOKEN: Final = "heartbeat-token"
SESSION: Final = "app"


class Freezable(FrameTransport):
    """A transport that stops delivering, both ways, while ``frozen`` (a SIGSTOPped or cut-off
    peer): sends and receives wait until it thaws."""

    def __init__(self, inner: FrameTransport) -> None:
        self.inner = inner
        self.frozen = False
        self._thawed = trio.Event()

    def freeze(self) -> None:
        self.frozen = True
        self._thawed = trio.Event()

    async def _wait_thawed(self) -> None:
        while self.frozen:
            await self._thawed.wait()

    async def send(self, data: bytes) -> None:
        await self._wait_thawed()
        await self.inner.send(data)

    async def receive(self) -> bytes | bytearray:
        await self._wait_thawed()
        return await self.inner.receive()

    async def aclose(self) -> None:
        await self.inner.aclose()


def app_named(name: str, gate: trio.Event | None = None) -> AsgiHandler:
    """An app that answers its name (after ``gate``, if given)."""

    async def app(
        scope: AsgiScope,
        receive: Callable[[], Awaitable[AsgiMessage]],
        send: Callable[[AsgiMessage], Awaitable[None]],
    ) -> None:
        if gate is not None:
            await gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": name.encode()})

    return AsgiHandler(app, loop="trio")


async def connected(agent: Agent, times: int) -> None:
    """Wait until ``agent`` has connected ``times`` times (it offers no event for it)."""
    while agent.connections < times:  # noqa: ASYNC110
        await trio.sleep(0.001)


@attrs.define
class Relay:
    server: TunnelServer
    entry: ProxyEntry
    nursery: trio.Nursery
    links: dict[str, Freezable] = attrs.Factory(dict)

    async def start_agent(
        self, name: str, gate: trio.Event | None = None, **config: object
    ) -> Agent:
        """An agent of the shared session whose current transport is ``links[name]``."""

        @asynccontextmanager
        async def connect() -> AsyncIterator[FrameTransport]:
            ours, theirs = memory_transport_pair()
            link = self.links[name] = Freezable(ours)
            self.nursery.start_soon(self.server.handle_agent, theirs)
            try:
                yield link
            finally:
                await trio.aclose_forcefully(ours)

        agent_config = AgentConfig(token=TOKEN, session_id=SESSION, **config)  # type: ignore[arg-type]
        agent = Agent(connect, app_named(name, gate), agent_config, rng=random.Random(1))
        started: Agent = await self.nursery.start(agent.serve)
        return started

    async def get(self, name: str = "x") -> tuple[int, str]:
        tunnel = MemoryTunnel(self.server, self.entry, cast("Agent", None), self.nursery)
        response = await tunnel.request("GET", f"/session/{SESSION}/{name}", raw_path=True)
        return response.status, response.text


@asynccontextmanager
async def open_relay(**config: object) -> AsyncIterator[Relay]:
    server_config = ServerConfig(tokens=frozenset({TOKEN}), **config)  # type: ignore[arg-type]
    server = TunnelServer(server_config, base_url=MEMORY_BASE_URL)
    entry = ProxyEntry(server)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(entry.run_timeouts)
        try:
            yield Relay(server, entry, nursery)
        finally:
            nursery.cancel_scope.cancel()


# --- detection ---------------------------------------------------------------------------


async def test_a_frozen_agent_is_found_dead_within_the_heartbeat_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(1000):
        async with open_relay(ping_interval=5.0) as relay:
            # The agents' own deadline is far off, so the relay's heartbeat is what fires.
            await relay.start_agent("a", heartbeat_timeout=1000.0)
            await relay.start_agent("b", heartbeat_timeout=1000.0)
            frozen, _ = relay.server.routes.uplinks_of(SESSION)
            relay.links["a"].freeze()
            frozen_at = trio.current_time()
            results: list[tuple[int, str, float]] = []

            async def get() -> None:
                status, text = await relay.get()
                results.append((status, text, trio.current_time()))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(get)
                nursery.start_soon(get)  # the two go to different agents: least in flight
                await frozen.wait_closed()
                detected = trio.current_time()
            # Default heartbeat timeout: twice the 5 s ping interval (was 45-52 s).
            assert detected - frozen_at <= 10.0
            assert "heartbeat timeout" in frozen.close_reason
            results.sort()
            assert results[0][:2] == (200, "b")
            # The request on the frozen agent failed at detection, not before, not later.
            assert results[1][0] == 502
            assert results[1][2] == detected
            assert frozen not in relay.server.routes.uplinks_of(SESSION)


async def test_a_late_heartbeat_takes_the_agent_out_of_routing_before_it_is_dead(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(1000):
        async with open_relay(ping_interval=5.0) as relay:
            await relay.start_agent("a", heartbeat_timeout=1000.0)
            await relay.start_agent("b", heartbeat_timeout=1000.0)
            frozen, _ = relay.server.routes.uplinks_of(SESSION)
            relay.links["a"].freeze()
            await trio.sleep(8.0)  # PING unanswered for 3 s: late (7.5 s), not dead (10 s)
            assert not frozen.closed
            assert frozen.heartbeat_late(trio.current_time())
            # Idle agents tie, and ties alternate: without the check half would go to "a".
            for _ in range(4):
                assert await relay.get() == (200, "b")


async def test_the_agent_finds_a_silent_relay_dead_and_redials(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(1000):
        async with open_relay(ping_interval=5.0, heartbeat_timeout=1000.0) as relay:
            agent = await relay.start_agent("a")
            uplink = agent.uplink
            assert uplink is not None
            relay.links["a"].freeze()
            frozen_at = trio.current_time()
            await uplink.wait_closed()
            assert trio.current_time() - frozen_at <= 10.0  # twice WELCOME's ping_interval
            assert "heartbeat timeout" in uplink.close_reason
            await connected(agent, 2)
            assert await relay.get() == (200, "a")


# --- routing -----------------------------------------------------------------------------


@attrs.define(eq=False)
class FakeUplink:
    open_streams: int = 0
    late: bool = False
    accepting: bool = True
    peer_draining: bool = False

    def heartbeat_late(self, now: float) -> bool:
        return self.late


def table(*links: FakeUplink) -> RouteTable:
    routes = RouteTable(grace_period=30)
    for link in links:
        routes.attach("s", cast("TunnelUplink", link))
    return routes


def picked(routes: RouteTable) -> object:
    route = routes.route("s", now=0)
    assert isinstance(route, Routed)
    return route.uplink


def test_routing_picks_the_uplink_with_fewest_streams_in_flight() -> None:
    busy, idle, middle = FakeUplink(5), FakeUplink(1), FakeUplink(3)
    routes = table(busy, idle, middle)
    assert all(picked(routes) is idle for _ in range(6))  # not round robin


def test_routing_skips_late_and_draining_uplinks_unless_nothing_else_is_left() -> None:
    late, draining, loaded = FakeUplink(0, late=True), FakeUplink(0, accepting=False), FakeUplink(9)
    routes = table(late, draining, loaded)
    assert picked(routes) is loaded
    loaded.late = True
    assert picked(routes) is late  # all late: the least loaded of them
    late.accepting = loaded.accepting = False
    assert routes.route("s", now=0) is DISCONNECTED


def test_a_single_uplink_is_routed_late_or_not_but_not_once_it_stops_accepting() -> None:
    only = FakeUplink(0, late=True)
    routes = table(only)
    assert picked(routes) is only  # late, but nothing else is left
    only.accepting = False
    assert routes.route("s", now=0) is DISCONNECTED


def test_routing_results_follow_the_uplinks_as_they_attach_and_detach() -> None:
    a, b, c = FakeUplink(), FakeUplink(), FakeUplink()
    routes = table(a, b, c)
    routes.detach("s", cast("TunnelUplink", b), now=0)
    assert {picked(routes) for _ in range(4)} == {a, c}
    routes.detach("s", cast("TunnelUplink", a), now=0)
    assert picked(routes) is c
    assert routes.route("s", now=0) is routes.route("s", now=0)  # made once, at attach


def test_routing_ties_alternate() -> None:
    a, b = FakeUplink(), FakeUplink()
    routes = table(a, b)
    assert {picked(routes) for _ in range(2)} == {a, b}


# --- re-dial backoff -----------------------------------------------------------------------


def test_backoff_doubles_with_equal_jitter_capped_early_then_up_to_backoff_max() -> None:
    config = AgentConfig(backoff_initial=0.25, backoff_max=30.0)
    backoff = _Backoff(config, random.Random(42))
    now = 0.0
    for attempt in range(12):  # all within the first minute
        delay = backoff.next_delay(now)
        ceiling = min(2.0, 0.25 * 2**attempt)
        assert ceiling / 2 <= delay <= ceiling
        now += delay
    assert now < 60
    delays = [backoff.next_delay(61.0 + i) for i in range(4)]
    assert all(15.0 <= d <= 30.0 for d in delays)  # later: up to backoff_max
    assert len(set(delays)) == len(delays)  # jittered, not in step
    backoff.reset()
    assert 0.125 <= backoff.next_delay(100.0) <= 0.25


async def test_the_agent_redials_at_once_after_the_relays_goaway_and_backs_off_otherwise(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(1000):
        async with open_relay() as relay:
            agent = await relay.start_agent("a")
            (uplink,) = relay.server.routes.uplinks_of(SESSION)
            start = trio.current_time()
            await uplink.drain(0)  # a graceful GOAWAY (a relay node handing agents over)
            await connected(agent, 2)
            assert trio.current_time() - start < 0.125  # below the smallest backoff
            (uplink,) = relay.server.routes.uplinks_of(SESSION)
            start = trio.current_time()
            uplink.close("lost", ErrorCode.INTERNAL_ERROR)  # not graceful: back off
            await connected(agent, 3)
            assert trio.current_time() - start >= 0.125


# --- a draining agent --------------------------------------------------------------------


async def test_a_draining_agent_hands_new_requests_to_its_twin(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = trio.Event()
    with trio.fail_after(1000):
        async with open_relay() as relay:
            a = await relay.start_agent("a", gate)
            results: list[tuple[int, str]] = []
            async with trio.open_nursery() as nursery:

                async def get() -> None:
                    results.append(await relay.get())

                nursery.start_soon(get)  # held by "a"'s app
                await trio.sleep(1)
                await relay.start_agent("b")
                nursery.start_soon(a.drain)
                await trio.sleep(1)
                for _ in range(4):
                    assert await relay.get() == (200, "b")
                gate.set()
            assert results == [(200, "a")]


async def test_requests_wait_for_the_replacement_of_a_sessions_last_draining_agent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(1000):
        async with open_relay(drain_hold=5.0) as relay:
            old = await relay.start_agent("old")
            await old.drain()
            assert relay.server.routes.holding(SESSION, trio.current_time())
            results: list[tuple[int, str]] = []
            async with trio.open_nursery() as nursery:

                async def get() -> None:
                    results.append(await relay.get())

                nursery.start_soon(get)
                await trio.sleep(2)  # the new instance takes a moment to start
                assert results == []
                new = await relay.start_agent("new")
            assert results == [(200, "new")]
            # With no replacement, the wait ends at drain_hold with 502.
            await new.drain()
            start = trio.current_time()
            status, _ = await relay.get()
            assert status == 502
            assert trio.current_time() - start <= 5.0 + 0.01
