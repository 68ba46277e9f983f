"""One peer cannot hurt the others: the uplink's fairness, flood and stall limits (PROTOCOL.md §7).

A test plays the misbehaving peer by writing raw encoded frames to the other end of a memory
transport pair, and asserts on what other tasks and uplinks observe (interleaving, frames,
close reasons), never on timing. Stalls run under ``autojump_clock`` on memory transports.
"""

from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final

import pytest
import trio
import trio.testing
import wsproto
import wsproto.events
from test_transports import wsproto_connected
from test_uplink import (
    REQUEST_HEAD,
    RESPONSE_HEAD,
    TIMEOUT,
    Tap,
    check_round_trip,
    read_until_goaway,
    uplink_pair,
    welcome,
)

from tunnel2 import frames
from tunnel2.errors import ErrorCode, UplinkClosed
from tunnel2.server import ServerConfig, TunnelServer
from tunnel2.transports import (
    FrameTransport,
    StreamTransport,
    WsprotoTransport,
    lockstep_transport_pair,
    memory_transport_pair,
)
from tunnel2.uplink import (
    _FRAMES_PER_CHECKPOINT,
    _MAX_BATCH,
    TunnelUplink,
    UplinkLimits,
    open_uplink,
)

CALM: Final = ErrorCode.ENHANCE_YOUR_CALM
# Small buckets, so a handful of frames is a flood; rates low enough not to refill meanwhile.
TIGHT: Final = UplinkLimits(ping_rate=0.001, ping_burst=5, control_rate=0.001, control_burst=5)


@asynccontextmanager
async def raw_peer(
    *,
    role: str = "relay",
    settings: frames.Welcome | None = None,
    limits: UplinkLimits = TIGHT,
    transports: Callable[[], tuple[StreamTransport, StreamTransport]] = memory_transport_pair,
    max_incoming: int = 1024,
) -> AsyncIterator[tuple[TunnelUplink, FrameTransport]]:
    """An uplink with ``limits`` whose peer is a bare transport the test writes raw frames to.

    On exit the peer reads what is left, so a lockstep writer can flush its GOAWAY.
    """
    ours, raw = transports()
    async with (
        trio.open_nursery() as nursery,
        open_uplink(
            ours,
            frames.FrameDecoder(),
            settings or welcome(),
            role="relay" if role == "relay" else "agent",
            max_incoming=max_incoming,
            name=role,
            limits=limits,
        ) as uplink,
    ):
        try:
            yield uplink, raw
        finally:
            nursery.start_soon(read_to_eof, raw)


async def read_to_eof(raw: FrameTransport) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while await raw.receive():
            pass


class SizeTap(Tap):
    """A :class:`Tap` that also records the size of each send."""

    def __init__(self, inner: FrameTransport) -> None:
        super().__init__(inner)
        self.send_sizes: list[int] = []

    async def send(self, data: bytes) -> None:
        self.send_sizes.append(len(data))
        await super().send(data)


def wire(*items: frames.Frame) -> bytes:
    return b"".join(frames.encode(item) for item in items)


async def expect_calm(raw: FrameTransport, uplink: TunnelUplink, words: str) -> None:
    """The uplink closed with a GOAWAY(ENHANCE_YOUR_CALM) whose reason has ``words``."""
    goaway = (await read_until_goaway(raw))[-1]
    assert isinstance(goaway, frames.GoAway)
    assert goaway.code == CALM
    assert words in goaway.reason
    assert uplink.closed
    assert words in uplink.close_reason


# --- 1. the reader yields -------------------------------------------------------------------


async def test_reader_yields_to_other_tasks_while_a_peer_sends_many_tiny_frames() -> None:
    count = 50_000
    settings = welcome(initial_window=1 << 20, connection_window=1 << 21)
    left, right = trio.testing.memory_stream_pair()
    # One receive takes a whole message, so nothing but the reader's own checkpoints yields.
    ours, raw = StreamTransport(left, receive_size=1 << 22), StreamTransport(right)
    per_turn: list[int] = []

    async def other_task(stream_reader: Callable[[], bytes]) -> None:
        # Another task on the same loop: counts how much arrived between two of its turns.
        total = 0
        while total < count:
            got = 0
            while True:
                try:
                    got += len(stream_reader())
                except trio.WouldBlock:
                    break
            per_turn.append(got)
            total += got
            await trio.lowlevel.checkpoint()

    with trio.fail_after(10 * TIMEOUT):
        async with (
            open_uplink(ours, frames.FrameDecoder(), settings, role="relay") as relay,
            trio.open_nursery() as nursery,
        ):
            stream = relay.open_stream(REQUEST_HEAD)
            nursery.start_soon(other_task, stream.receive_data_nowait)
            # A few huge messages.
            for _ in range(5):
                await raw.send(wire(*(frames.Data(stream.id, b"x") for _ in range(count // 5))))
    assert sum(per_turn) == count
    # The other task ran hundreds of times while the frames were dispatched, never more than
    # two reader turns apart (trio may run the reader twice between two of its turns).
    assert max(per_turn) <= 2 * _FRAMES_PER_CHECKPOINT
    assert len([got for got in per_turn if got]) >= count // (2 * _FRAMES_PER_CHECKPOINT)


class EagerTransport(FrameTransport):
    """Hands out queued chunks without a checkpoint while it has any, as FastSocketStream
    does when the socket has data; then waits forever."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = collections.deque(chunks)

    async def send(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()

    async def receive(self) -> bytes:
        if self.chunks:
            return self.chunks.popleft()
        await trio.sleep_forever()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_reader_yields_while_big_frames_stream_in_without_checkpoints() -> None:
    # 64 KiB DATA frames arriving 1 KiB per receive: few frames, many receives.
    settings = welcome(max_frame_size=65536, initial_window=1 << 24, connection_window=1 << 24)
    frame_count = 32
    encoded = wire(*(frames.Data(1, bytes(65536)) for _ in range(frame_count)))
    chunks = [encoded[i : i + 1024] for i in range(0, len(encoded), 1024)]
    transport = EagerTransport(chunks)
    turns = 0

    async def other_task() -> None:
        nonlocal turns
        while transport.chunks:
            turns += 1
            await trio.lowlevel.checkpoint()

    with trio.fail_after(10 * TIMEOUT):
        async with (
            open_uplink(transport, frames.FrameDecoder(), settings, role="relay") as relay,
            trio.open_nursery() as nursery,
        ):
            stream = relay.open_stream(REQUEST_HEAD)
            nursery.start_soon(other_task)
            received = 0
            while received < frame_count * 65536:
                received += len(await stream.receive_data())
    # One receive of up to 2 KiB is one unit of the reader's turn: it yields every 128.
    assert turns >= len(chunks) // (2 * _FRAMES_PER_CHECKPOINT)


# --- 2. floods close the uplink, and only that one ------------------------------------------

FLOODS: Final[dict[str, tuple[str, Callable[[int], frames.Frame]]]] = {
    "PING": ("relay", lambda i: frames.Ping(i.to_bytes(8, "big"))),
    "PONG": ("relay", lambda i: frames.Pong(i.to_bytes(8, "big"))),
    "WINDOW": ("relay", lambda i: frames.Window(0, 1)),
    "RESET for unknown streams": ("relay", lambda i: frames.Reset(1001 + 2 * i, ErrorCode.CANCEL)),
    "END for unknown streams": ("agent", lambda i: frames.End(1001 + 2 * i)),
    "OPEN for unknown streams": ("relay", lambda i: frames.Open(1001 + 2 * i, RESPONSE_HEAD)),
    "GOAWAY": ("relay", lambda i: frames.GoAway(1, reason="bye")),
}


@pytest.mark.parametrize("kind", FLOODS)
async def test_a_flood_closes_that_uplink_with_enhance_your_calm(kind: str) -> None:
    role, make = FLOODS[kind]
    with trio.fail_after(TIMEOUT):
        async with uplink_pair() as bystander, raw_peer(role=role) as (uplink, raw):
            if role == "relay":
                # An open stream keeps a GOAWAY(NO_ERROR) from closing the uplink by itself.
                stream = uplink.open_stream(REQUEST_HEAD)
            # Past the burst and the three free frames the one stream opened grants.
            await raw.send(wire(*(make(i) for i in range(4 * TIGHT.ping_burst))))
            await expect_calm(raw, uplink, f"{kind} flood")
            if role == "relay":
                with pytest.raises(UplinkClosed):
                    await stream.receive_head()
            assert not bystander.relay.closed
            assert not bystander.agent.closed
            await check_round_trip(bystander)


@pytest.mark.parametrize("kind", ["PING", "WINDOW"])
async def test_default_limits_close_a_flood(kind: str) -> None:
    make = FLOODS[kind][1]
    limits = UplinkLimits()
    with trio.fail_after(TIMEOUT):
        async with raw_peer(limits=limits) as (uplink, raw):
            uplink.open_stream(REQUEST_HEAD)
            burst = limits.ping_burst if kind == "PING" else limits.control_burst
            # Twice the burst: the bucket refills a little while they are dispatched.
            await raw.send(wire(*(make(i) for i in range(2 * burst))))
            await expect_calm(raw, uplink, f"{kind} flood")


async def test_pings_at_the_allowed_rate_never_close_the_uplink(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = UplinkLimits(ping_rate=2, ping_burst=3)
    with trio.fail_after(1000):
        async with raw_peer(limits=limits) as (uplink, raw):
            decoder = frames.FrameDecoder()
            for i in range(100):  # 33 bursts' worth, spread out at the rate
                await raw.send(wire(frames.Ping(i.to_bytes(8, "big"))))
                decoder.receive_data(await raw.receive())
                assert decoder.next_frame() == frames.Pong(i.to_bytes(8, "big"))
                await trio.sleep(1 / limits.ping_rate)
            assert not uplink.closed


async def test_windows_returning_credit_for_our_data_are_free() -> None:
    # Both sides count every WINDOW beyond the allowance: one such frame would close them.
    strict = UplinkLimits(control_rate=0.001, control_burst=1)
    settings = welcome(max_frame_size=1024, initial_window=2048, connection_window=4096)
    left, right = memory_transport_pair()
    relay_tap, agent_tap = Tap(left), Tap(right)
    payload = bytes(range(256)) * 200  # 50 KiB: dozens of frames and WINDOWs each way

    async def agent_side(agent: TunnelUplink) -> None:
        stream = await agent.accept_stream()
        received = b""
        while data := await stream.receive_data():
            received += data
        assert received == payload
        stream.send_head(RESPONSE_HEAD)
        await stream.send_data(payload, end=True)

    with trio.fail_after(TIMEOUT):
        async with (
            open_uplink(
                relay_tap, frames.FrameDecoder(), settings, role="relay", limits=strict
            ) as relay,
            open_uplink(
                agent_tap, frames.FrameDecoder(), settings, role="agent", limits=strict
            ) as agent,
            trio.open_nursery() as nursery,
        ):
            for _ in range(3):
                nursery.start_soon(agent_side, agent)
                stream = relay.open_stream(REQUEST_HEAD)
                await stream.send_data(payload, end=True)
                await stream.receive_head()
                received = b""
                while data := await stream.receive_data():
                    received += data
                assert received == payload
            assert not relay.closed
            assert not agent.closed
    for tap in (relay_tap, agent_tap):
        assert tap.count(frames.Window) >= 50


async def test_frames_crossing_our_reset_are_free_up_to_three_per_stream() -> None:
    strict = UplinkLimits(control_rate=0.001, control_burst=1)
    with trio.fail_after(TIMEOUT):
        async with raw_peer(limits=strict) as (relay, raw):
            streams = [relay.open_stream(REQUEST_HEAD) for _ in range(10)]
            for stream in streams:
                stream.reset(ErrorCode.CANCEL, "client went away")
            # The agent's answers were already on their way: OPEN, END and RESET each.
            await raw.send(
                wire(
                    *(
                        frame
                        for stream in streams
                        for frame in (
                            frames.Open(stream.id, RESPONSE_HEAD),
                            frames.End(stream.id),
                            frames.Reset(stream.id, ErrorCode.CANCEL),
                        )
                    )
                )
            )
            await raw.send(wire(frames.Reset(999, ErrorCode.CANCEL)))  # the bucket's token
            await trio.testing.wait_all_tasks_blocked()
            assert not relay.closed
            await raw.send(wire(frames.Reset(1001, ErrorCode.CANCEL)))
            await expect_calm(raw, relay, "RESET for unknown streams flood")


async def test_data_for_finished_streams_is_paced_by_credit_not_counted() -> None:
    strict = UplinkLimits(control_rate=0.001, control_burst=1)
    with trio.fail_after(TIMEOUT):
        async with raw_peer(limits=strict) as (relay, raw):
            stream = relay.open_stream(REQUEST_HEAD)
            stream.reset()
            await raw.send(wire(*(frames.Data(stream.id, b"x") for _ in range(1000))))
            await trio.testing.wait_all_tasks_blocked()
            assert not relay.closed


async def test_relay_uplinks_use_the_server_configs_limits() -> None:
    config = ServerConfig(uplink_limits=TIGHT, ping_interval=0)
    server = TunnelServer(config, base_url="http://relay.test")
    ours, raw = memory_transport_pair()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handle_agent, ours)
            await raw.send(frames.encode(frames.Hello()))
            decoder = frames.FrameDecoder()
            while (frame := decoder.next_frame()) is None:
                decoder.receive_data(await raw.receive())
            assert isinstance(frame, frames.Welcome)
            await raw.send(wire(*(frames.Ping(bytes(8)) for _ in range(TIGHT.ping_burst + 1))))
            seen: list[frames.Frame] = []
            while not any(isinstance(f, frames.GoAway) for f in seen):
                while (frame := decoder.next_frame()) is not None:
                    seen.append(frame)
                if not any(isinstance(f, frames.GoAway) for f in seen):
                    decoder.receive_data(await raw.receive())
            goaway = seen[-1]
            assert isinstance(goaway, frames.GoAway)
            assert goaway.code == CALM
            assert "PING flood" in goaway.reason


# --- 3. what a peer that does not read can make us queue ------------------------------------


async def test_a_peer_that_does_not_read_gets_one_pong_at_a_time() -> None:
    limits = UplinkLimits(ping_burst=1000)
    with trio.fail_after(TIMEOUT):
        async with raw_peer(limits=limits, transports=lockstep_transport_pair) as (relay, raw):
            await raw.send(wire(*(frames.Ping(i.to_bytes(8, "big")) for i in range(500))))
            await trio.testing.wait_all_tasks_blocked()
            # The writer holds the first PONG (its send waits for the peer to read); the
            # other 499 PINGs queued nothing.
            assert relay.statistics().queued_bytes == 0
            decoder = frames.FrameDecoder()
            decoder.receive_data(await raw.receive())
            assert decoder.next_frame() == frames.Pong((0).to_bytes(8, "big"))
            assert decoder.next_frame() is None
            # Once that PONG is out (the writer saw its send complete), the next PING is
            # answered again.
            await trio.testing.wait_all_tasks_blocked()
            await raw.send(wire(frames.Ping(b"nextping")))
            decoder.receive_data(await raw.receive())
            assert decoder.next_frame() == frames.Pong(b"nextping")
            assert not relay.closed


async def test_refusals_a_non_reading_peer_provokes_are_capped() -> None:
    limits = UplinkLimits(max_unsent_replies=5)
    with trio.fail_after(TIMEOUT):
        async with raw_peer(
            role="agent", limits=limits, transports=lockstep_transport_pair, max_incoming=1
        ) as (agent, raw):
            # The first OPEN waits for a handler; every other is refused with a RESET.
            await raw.send(wire(*(frames.Open(2 * i + 1, REQUEST_HEAD) for i in range(50))))
            await expect_calm(raw, agent, "peer is not reading")
            assert "replies to its frames wait unsent" in agent.close_reason


async def test_refusals_to_a_reading_peer_are_not_capped() -> None:
    limits = UplinkLimits(max_unsent_replies=3 * _FRAMES_PER_CHECKPOINT)
    refused = 0
    with trio.fail_after(10 * TIMEOUT):
        async with (
            raw_peer(role="agent", limits=limits, max_incoming=1) as (agent, raw),
            trio.open_nursery() as nursery,
        ):

            async def read() -> None:
                nonlocal refused
                decoder = frames.FrameDecoder()
                while True:
                    decoder.receive_data(await raw.receive())
                    while (frame := decoder.next_frame()) is not None:
                        assert isinstance(frame, frames.Reset)
                        refused += 1

            nursery.start_soon(read)
            sent = 0
            for _ in range(20):
                await raw.send(
                    wire(*(frames.Open(2 * (sent + i) + 1, REQUEST_HEAD) for i in range(100)))
                )
                sent += 100
            while refused < sent - 1:
                await trio.lowlevel.checkpoint()
            assert not agent.closed
            nursery.cancel_scope.cancel()


async def test_a_backlog_many_batches_long_drains_in_order_in_bounded_writes() -> None:
    settings = welcome(max_frame_size=4096, initial_window=1 << 24, connection_window=1 << 24)
    left, right = lockstep_transport_pair()
    tap = SizeTap(left)
    total = 3 * _MAX_BATCH + 12345
    payload = bytes(i % 251 for i in range(total))
    with trio.fail_after(10 * TIMEOUT):
        async with (
            open_uplink(tap, frames.FrameDecoder(), settings, role="relay") as relay,
            trio.open_nursery() as nursery,
        ):
            stream = relay.open_stream(REQUEST_HEAD)
            nursery.start_soon(stream.send_data, payload)  # queued while nobody reads
            await trio.testing.wait_all_tasks_blocked()
            assert relay.statistics().queued_bytes > 2 * _MAX_BATCH
            decoder = frames.FrameDecoder(max_frame_size=frames.MAX_WINDOW)
            received = bytearray()
            while len(received) < total:
                decoder.receive_data(await right.receive())
                while (frame := decoder.next_frame()) is not None:
                    if isinstance(frame, frames.Data):
                        received += frame.data
            assert received == payload
    assert tap.sends >= 4
    assert max(tap.send_sizes) <= _MAX_BATCH


# --- 4. a peer that stops reading is closed -------------------------------------------------


async def test_a_peer_that_stops_reading_is_closed_after_the_write_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = UplinkLimits(write_timeout=30)
    with trio.fail_after(1000):
        async with raw_peer(limits=limits, transports=lockstep_transport_pair) as (relay, _raw):
            start = trio.current_time()
            stream = relay.open_stream(REQUEST_HEAD)  # its OPEN's write never completes
            await relay.wait_closed()
            assert trio.current_time() - start >= limits.write_timeout
            assert relay.close_reason == "peer is not reading: a write made no progress for 30s"
            with pytest.raises(UplinkClosed, match="not reading"):
                await stream.receive_head()


async def test_a_slow_reader_whose_writes_complete_in_time_stays_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = UplinkLimits(write_timeout=30)
    with trio.fail_after(1000):
        async with raw_peer(limits=limits, transports=lockstep_transport_pair) as (relay, raw):
            for _ in range(10):
                relay.open_stream(REQUEST_HEAD)
                await trio.sleep(20)  # each write waits 20 s for the peer, then completes
                assert await raw.receive()
            assert not relay.closed


async def test_an_infinite_write_timeout_never_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = UplinkLimits(write_timeout=math.inf)
    with trio.fail_after(10_000):
        async with raw_peer(limits=limits, transports=lockstep_transport_pair) as (relay, raw):
            relay.open_stream(REQUEST_HEAD)
            await trio.sleep(5000)
            assert not relay.closed
            assert await raw.receive()


@pytest.mark.parametrize(
    "field",
    [
        "ping_rate",
        "ping_burst",
        "control_rate",
        "control_burst",
        "max_unsent_replies",
        "write_timeout",
    ],
)
def test_limits_reject_values_below_one_or_zero(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        UplinkLimits(**{field: 0})


# --- 5. WebSocket-level PINGs (WsprotoTransport) --------------------------------------------


class EagerStream(trio.abc.Stream):
    """A byte stream that hands out queued chunks without a checkpoint, as FastSocketStream
    does when the socket has data; records what is sent."""

    def __init__(self) -> None:
        self.chunks: collections.deque[bytes] = collections.deque()
        self.sent = bytearray()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += data
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.chunks:
            return self.chunks.popleft()
        await trio.sleep_forever()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def websocket_pair() -> tuple[wsproto.WSConnection, WsprotoTransport, EagerStream]:
    """A wsproto client and the server WsprotoTransport it is connected to."""
    client, server = wsproto_connected()
    stream = EagerStream()
    return client, WsprotoTransport(stream, server), stream


async def test_websocket_pings_get_one_pong_for_the_latest() -> None:
    client, transport, stream = websocket_pair()
    pings = b"".join(client.send(wsproto.events.Ping(b"%d" % i)) for i in range(5000))
    stream.chunks.extend([pings, client.send(wsproto.events.BytesMessage(b"data"))])
    with trio.fail_after(TIMEOUT):
        assert await transport.receive() == b"data"
        await transport.send(b"reply")
    client.receive_data(bytes(stream.sent))
    events = list(client.events())
    assert [type(e) for e in events] == [wsproto.events.Pong, wsproto.events.BytesMessage]
    assert isinstance(events[0], wsproto.events.Pong)
    assert events[0].payload == b"4999"


async def test_websocket_receive_yields_while_only_pings_arrive() -> None:
    client, transport, stream = websocket_pair()
    reads = 40
    for _ in range(reads):
        stream.chunks.append(b"".join(client.send(wsproto.events.Ping(b"")) for _ in range(100)))
    stream.chunks.append(client.send(wsproto.events.BytesMessage(b"data")))
    turns = 0
    done = False

    async def other_task() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await trio.lowlevel.checkpoint()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_task)
            assert await transport.receive() == b"data"
            done = True
    assert turns >= reads // 2
