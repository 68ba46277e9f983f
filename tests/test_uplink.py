"""Tests for :mod:`tunnel2.uplink`: streams multiplexed over one frame transport.

Real uplinks run over in-memory transports (STYLE.md §8): ``memory_transport_pair()`` for speed,
``lockstep_transport_pair()`` where backpressure must be proven. A :class:`Tap` wraps a transport
and decodes what its uplink sends, so tests assert on frames and send calls, never on timing.
Where a test plays a misbehaving peer it writes raw encoded frames to the other end of a pair.
Timers run under ``autojump_clock`` on memory transports only.
"""

from __future__ import annotations

import random
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final

import attrs
import pytest
import trio
import trio.testing

from tunnel2 import frames
from tunnel2.errors import (
    ErrorCode,
    HandshakeError,
    RemoteProtocolError,
    StreamReset,
    UplinkClosed,
)
from tunnel2.transports import (
    FrameTransport,
    StreamTransport,
    lockstep_transport_pair,
    memory_transport_pair,
)
from tunnel2.uplink import TunnelStream, TunnelUplink, open_uplink, receive_handshake_frame

REQUEST_HEAD: Final = b"POST /upload HTTP/1.1\r\nHost: example.com\r\n\r\n"
RESPONSE_HEAD: Final = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
# Bounds hangs only: each test takes milliseconds when the uplink works.
TIMEOUT: Final = 2

TransportPair = Callable[[], tuple[StreamTransport, StreamTransport]]


def welcome(
    *,
    max_frame_size: int = 1024,
    initial_window: int = 4096,
    connection_window: int = 16384,
    ping_interval: float = 0.0,
) -> frames.Welcome:
    """Small limits by default, so a few KiB exercise framing and flow control."""
    return frames.Welcome(
        session_id="s1",
        public_urls=("http://x/",),
        max_frame_size=max_frame_size,
        initial_window=initial_window,
        connection_window=connection_window,
        ping_interval=ping_interval,
    )


class Tap(FrameTransport):
    """Wraps a transport; counts send calls and decodes the frames they carry.

    Frames are recorded when handed to ``send``, before the inner transport accepts them, so
    byte counts are an upper bound on what the uplink put on the wire.
    """

    def __init__(self, inner: FrameTransport) -> None:
        self.inner = inner
        self.sends = 0
        self.sent: list[frames.Frame] = []
        self._decoder = frames.FrameDecoder(max_frame_size=frames.MAX_WINDOW)

    async def send(self, data: bytes) -> None:
        self.sends += 1
        self._decoder.receive_data(data)
        while (frame := self._decoder.next_frame()) is not None:
            self.sent.append(frame)
        await self.inner.send(data)

    async def receive(self) -> bytes | bytearray:
        return await self.inner.receive()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def count(self, kind: type[frames.Frame]) -> int:
        return sum(type(frame) is kind for frame in self.sent)

    def data_bytes(self, stream_id: int | None = None) -> int:
        return sum(
            len(frame.data)
            for frame in self.sent
            if isinstance(frame, frames.Data) and stream_id in (None, frame.stream_id)
        )


class BlackHole(FrameTransport):
    """A peer that swallows everything and never answers."""

    async def send(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()

    async def receive(self) -> bytes:
        await trio.sleep_forever()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@attrs.frozen
class Pair:
    relay: TunnelUplink
    agent: TunnelUplink
    relay_tap: Tap
    agent_tap: Tap


@asynccontextmanager
async def uplink_pair(
    settings: frames.Welcome | None = None,
    *,
    transports: TransportPair = memory_transport_pair,
    max_incoming: int = 1024,
) -> AsyncIterator[Pair]:
    """A relay uplink and an agent uplink connected to each other, same settings."""
    settings = settings or welcome()
    left, right = transports()
    relay_tap, agent_tap = Tap(left), Tap(right)
    async with (
        open_uplink(
            relay_tap, frames.FrameDecoder(), settings, role="relay", name="relay"
        ) as relay,
        open_uplink(
            agent_tap,
            frames.FrameDecoder(),
            settings,
            role="agent",
            max_incoming=max_incoming,
            name="agent",
        ) as agent,
    ):
        yield Pair(relay, agent, relay_tap, agent_tap)


@asynccontextmanager
async def raw_peer(
    settings: frames.Welcome, *, role: str, max_incoming: int = 1024
) -> AsyncIterator[tuple[TunnelUplink, StreamTransport]]:
    """An uplink whose peer is a bare transport the test writes raw frames to."""
    left, raw = memory_transport_pair()
    async with open_uplink(
        left,
        frames.FrameDecoder(),
        settings,
        role="relay" if role == "relay" else "agent",
        max_incoming=max_incoming,
        name=role,
    ) as uplink:
        yield uplink, raw


async def read_until_goaway(raw: FrameTransport) -> list[frames.Frame]:
    """Read frames from a raw transport until a GOAWAY (returned last) or EOF."""
    decoder = frames.FrameDecoder(max_frame_size=frames.MAX_WINDOW)
    seen: list[frames.Frame] = []
    while True:
        while (frame := decoder.next_frame()) is not None:
            seen.append(frame)
            if isinstance(frame, frames.GoAway):
                return seen
        data = await raw.receive()
        if not data:
            return seen
        decoder.receive_data(data)


def body(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def read_body(stream: TunnelStream) -> bytes:
    parts = []
    while data := await stream.receive_data():
        parts.append(data)
    return b"".join(parts)


async def check_round_trip(
    pair: Pair, request: bytes = b"hello", response: bytes = b"world"
) -> None:
    """One complete exchange on a new stream: proves the pair is (still) usable."""
    received: list[bytes] = []
    relay_open = pair.relay.statistics().open_streams
    agent_open = pair.agent.statistics().open_streams

    async def agent_side() -> None:
        stream = await pair.agent.accept_stream()
        assert stream.head == REQUEST_HEAD
        received.append(await read_body(stream))
        stream.send_head(RESPONSE_HEAD)
        await stream.send_data(response, end=True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent_side)
        stream = pair.relay.open_stream(REQUEST_HEAD)
        await stream.send_data(request, end=True)
        assert await stream.receive_head() == RESPONSE_HEAD
        assert await read_body(stream) == response
    assert received == [request]
    await trio.testing.wait_all_tasks_blocked()
    assert pair.relay.statistics().open_streams == relay_open
    assert pair.agent.statistics().open_streams == agent_open


# --- 1. multiplexing ------------------------------------------------------------------------


@pytest.mark.parametrize("transports", [memory_transport_pair, lockstep_transport_pair])
async def test_many_concurrent_streams_arrive_intact(transports: TransportPair) -> None:
    count = 50
    rng = random.Random(50)
    sizes = [0, 1, 1023, 1024, 1025, 5000, 16384, 65537, 100_000]
    request_sizes = [rng.choice(sizes) for _ in range(count)]
    response_sizes = [rng.choice(sizes) for _ in range(count)]
    # Some bodies far above max_frame_size, initial_window and connection_window.
    request_sizes[0] = response_sizes[1] = 1_000_000
    request_sizes[2] = response_sizes[2] = 300_000
    requests = [body(i, size) for i, size in enumerate(request_sizes)]
    responses = [body(1000 + i, size) for i, size in enumerate(response_sizes)]
    got_requests: dict[int, bytes] = {}
    got_responses: dict[int, bytes] = {}
    settings = welcome(max_frame_size=16384, initial_window=65536, connection_window=262144)

    async def send_chunked(stream: TunnelStream, data: bytes, seed: int) -> None:
        chunks = random.Random(seed)
        offset = 0
        while offset < len(data):
            size = chunks.randint(1, 70_000)
            last = offset + size >= len(data)
            await stream.send_data(data[offset : offset + size], end=last and seed % 2 == 0)
            offset += size
        if not stream.local_ended:
            stream.send_end()

    async def relay_side(pair: Pair, i: int) -> None:
        stream = pair.relay.open_stream(f"POST /{i} HTTP/1.1\r\n\r\n".encode())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_chunked, stream, requests[i], i)
            assert await stream.receive_head() == f"HTTP/1.1 200 {i}\r\n\r\n".encode()
            got_responses[i] = await read_body(stream)

    async def agent_side(stream: TunnelStream) -> None:
        assert stream.head is not None
        i = int(stream.head.split(b" ")[1][1:])
        for _ in range(i % 7):
            await trio.lowlevel.checkpoint()
        stream.send_head(f"HTTP/1.1 200 {i}\r\n\r\n".encode())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_chunked, stream, responses[i], i + 1)
            got_requests[i] = await read_body(stream)

    with trio.fail_after(2 * TIMEOUT):
        async with uplink_pair(settings, transports=transports) as pair:
            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(relay_side, pair, i)
                accepted = [await pair.agent.accept_stream() for _ in range(count)]
                rng.shuffle(accepted)
                for stream in accepted:
                    nursery.start_soon(agent_side, stream)
            assert got_requests == dict(enumerate(requests))
            assert got_responses == dict(enumerate(responses))
            await trio.testing.wait_all_tasks_blocked()
            assert pair.relay.statistics().open_streams == 0
            assert pair.agent.statistics().open_streams == 0
            # Every frame respected the negotiated size.
            for tap in (pair.relay_tap, pair.agent_tap):
                assert all(
                    len(f.data) <= settings.max_frame_size
                    for f in tap.sent
                    if isinstance(f, frames.Data)
                )
            assert pair.relay_tap.data_bytes() == sum(request_sizes)
            assert pair.agent_tap.data_bytes() == sum(response_sizes)


# --- 2. coalescing --------------------------------------------------------------------------


async def test_frames_queued_together_leave_in_one_send() -> None:
    with trio.fail_after(TIMEOUT):
        async with uplink_pair() as pair:
            sends_before = pair.relay_tap.sends
            streams = [pair.relay.open_stream(REQUEST_HEAD) for _ in range(5)]
            for stream in streams:
                stream.send_end()
            await trio.testing.wait_all_tasks_blocked()
            assert pair.relay_tap.sends - sends_before == 1
            assert pair.relay_tap.count(frames.Open) == 5
            assert pair.relay_tap.count(frames.End) == 5

            accepted = [await pair.agent.accept_stream() for _ in range(5)]
            sends_before = pair.agent_tap.sends
            for stream in accepted:
                stream.send_head(RESPONSE_HEAD)
                stream.send_end()
            await trio.testing.wait_all_tasks_blocked()
            assert pair.agent_tap.sends - sends_before == 1
            assert pair.agent_tap.count(frames.Open) + pair.agent_tap.count(frames.End) == 10
            assert pair.agent_tap.sends < len(pair.agent_tap.sent)
            for stream in streams:
                assert await stream.receive_head() == RESPONSE_HEAD
                assert await stream.receive_data() == b""


# --- 3. flow control ------------------------------------------------------------------------


async def test_unread_streams_get_at_most_their_windows() -> None:
    settings = welcome(max_frame_size=1024, initial_window=4096, connection_window=10240)
    size = 20000
    payloads = [body(i, size) for i in range(3)]
    done: list[int] = []
    received: dict[int, bytes] = {}

    async def sender(stream: TunnelStream, data: bytes) -> None:
        await stream.send_data(data, end=True)
        done.append(stream.id)

    async def reader(stream: TunnelStream) -> None:
        received[stream.id] = await read_body(stream)

    with trio.fail_after(TIMEOUT):
        async with uplink_pair(settings, transports=lockstep_transport_pair) as pair:
            async with trio.open_nursery() as nursery:
                streams = [pair.relay.open_stream(REQUEST_HEAD) for _ in payloads]
                for stream, data in zip(streams, payloads, strict=True):
                    nursery.start_soon(sender, stream, data)
                accepted = [await pair.agent.accept_stream() for _ in streams]
                await trio.testing.wait_all_tasks_blocked()
                # Nobody reads: each stream got at most its window, all of them together
                # exactly the connection window, and every sender is blocked in send_data.
                assert done == []
                for stream in streams:
                    assert pair.relay_tap.data_bytes(stream.id) <= settings.initial_window
                assert pair.relay_tap.data_bytes() == settings.connection_window
                assert pair.relay.statistics().remote_window == 0
                assert pair.agent.statistics().local_window == 0
                assert pair.agent_tap.count(frames.Window) == 0
                # Once the agent reads, credit comes back and every sender finishes.
                for stream in accepted:
                    nursery.start_soon(reader, stream)
            assert sorted(done) == [stream.id for stream in streams]
            assert received == {
                stream.id: data for stream, data in zip(streams, payloads, strict=True)
            }
            assert pair.agent_tap.count(frames.Window) > 0
            assert all(
                len(f.data) <= settings.max_frame_size
                for f in pair.relay_tap.sent
                if isinstance(f, frames.Data)
            )


async def test_every_blocked_sender_wakes_when_its_credit_returns() -> None:
    # Two senders wait for stream credit; the FIRST one to wait gets credit back. Each
    # waiter must be woken by the WINDOW for its own stream, whoever waited last.
    settings = welcome(initial_window=4096, connection_window=65536)
    first_done = trio.Event()

    async def sender(stream: TunnelStream, done: trio.Event) -> None:
        await stream.send_data(b"a" * 10000, end=True)
        done.set()

    with trio.fail_after(TIMEOUT):
        async with uplink_pair(settings) as pair, trio.open_nursery() as nursery:
            first = pair.relay.open_stream(REQUEST_HEAD)
            nursery.start_soon(sender, first, first_done)
            agent_first = await pair.agent.accept_stream()
            await trio.testing.wait_all_tasks_blocked()
            second = pair.relay.open_stream(REQUEST_HEAD)
            nursery.start_soon(sender, second, trio.Event())
            await pair.agent.accept_stream()
            await trio.testing.wait_all_tasks_blocked()
            assert pair.relay_tap.data_bytes(first.id) == 4096
            assert pair.relay_tap.data_bytes(second.id) == 4096
            assert await read_body(agent_first) == b"a" * 10000
            await first_done.wait()
            nursery.cancel_scope.cancel()


async def test_second_stream_is_not_starved_by_an_unread_one() -> None:
    settings = welcome(initial_window=4096, connection_window=16384)
    blocked_done = trio.Event()

    async def blocked_sender(stream: TunnelStream) -> None:
        await stream.send_data(b"b" * 20000, end=True)
        blocked_done.set()

    with trio.fail_after(TIMEOUT):
        async with (
            uplink_pair(settings, transports=lockstep_transport_pair) as pair,
            trio.open_nursery() as nursery,
        ):
            blocked = pair.relay.open_stream(REQUEST_HEAD)
            nursery.start_soon(blocked_sender, blocked)
            agent_blocked = await pair.agent.accept_stream()
            await trio.testing.wait_all_tasks_blocked()
            assert pair.relay_tap.data_bytes(blocked.id) == settings.initial_window
            # Another stream completes while the first stays blocked.
            await check_round_trip(pair, request=b"r" * 4000, response=b"s" * 30000)
            assert not blocked_done.is_set()
            assert pair.relay_tap.data_bytes(blocked.id) == settings.initial_window
            # Reading the first stream lets its sender continue.
            assert await read_body(agent_blocked) == b"b" * 20000
            await blocked_done.wait()


async def test_unread_stream_holding_most_of_the_connection_window_does_not_stall_others() -> None:
    # The unread stream holds 8 KiB of a 12 KiB connection window. The second stream's body
    # is read by the agent as it arrives, so the agent must give the connection credit back
    # even though less than half the connection window was *consumed* (h2's WindowManager
    # does so once the window is exhausted); otherwise the second stream waits forever.
    settings = welcome(initial_window=8192, connection_window=12288)
    request = body(7, 8192)

    async def hold(stream: TunnelStream) -> None:
        await stream.send_data(b"h" * 8192)

    with trio.fail_after(TIMEOUT):
        async with uplink_pair(settings) as pair, trio.open_nursery() as nursery:
            holder = pair.relay.open_stream(REQUEST_HEAD)
            nursery.start_soon(hold, holder)
            await pair.agent.accept_stream()
            await trio.testing.wait_all_tasks_blocked()
            assert pair.relay_tap.data_bytes(holder.id) == 8192
            await check_round_trip(pair, request=request)
            nursery.cancel_scope.cancel()


async def test_send_data_waits_for_credit_then_continues_on_window() -> None:
    settings = welcome(initial_window=4096, connection_window=65536)
    sent = trio.Event()

    async def sender(stream: TunnelStream) -> None:
        await stream.send_data(b"w" * 6000)
        sent.set()

    with trio.fail_after(TIMEOUT):
        async with uplink_pair(settings, transports=lockstep_transport_pair) as pair:
            async with trio.open_nursery() as nursery:
                stream = pair.relay.open_stream(REQUEST_HEAD)
                nursery.start_soon(sender, stream)
                agent_stream = await pair.agent.accept_stream()
                await trio.testing.wait_all_tasks_blocked()
                assert not sent.is_set()
                assert pair.relay_tap.data_bytes(stream.id) == 4096
                windows_before = pair.agent_tap.count(frames.Window)
                got = b""
                while len(got) < 6000:
                    got += await agent_stream.receive_data()
                await sent.wait()
            assert got == b"w" * 6000
            assert pair.agent_tap.count(frames.Window) > windows_before


MIB: Final = 1024 * 1024


async def test_every_sender_waiting_on_a_full_write_queue_wakes() -> None:
    # More than one batch (1 MiB) queued makes send_data wait for the writer; when the
    # peer finally reads, every waiting sender must wake, not only the last one to wait.
    settings = welcome(max_frame_size=65536, initial_window=4 * MIB, connection_window=8 * MIB)
    left, raw = lockstep_transport_pair()
    done: list[int] = []
    both_done = trio.Event()

    async def send(stream: TunnelStream, size: int) -> None:
        await stream.send_data(b"q" * size)
        done.append(stream.id)
        if len(done) == 2:
            both_done.set()

    async def peer_reads() -> None:
        while await raw.receive():
            pass

    with trio.fail_after(TIMEOUT):
        # The nursery outlives the uplink, so the peer still reads while it closes.
        async with (
            trio.open_nursery() as nursery,
            open_uplink(left, frames.FrameDecoder(), settings, role="relay") as relay,
        ):
            first = relay.open_stream(REQUEST_HEAD)
            second = relay.open_stream(REQUEST_HEAD)
            nursery.start_soon(send, first, 3 * MIB)
            await trio.testing.wait_all_tasks_blocked()
            assert relay.statistics().queued_bytes > MIB
            nursery.start_soon(send, second, 100_000)
            await trio.testing.wait_all_tasks_blocked()
            assert done == []
            nursery.start_soon(peer_reads)
            await both_done.wait()
            assert sorted(done) == [first.id, second.id]
            assert relay.statistics().queued_bytes <= MIB


async def test_close_wakes_a_sender_waiting_on_a_full_write_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = welcome(max_frame_size=65536, initial_window=4 * MIB, connection_window=8 * MIB)
    left, _raw = lockstep_transport_pair()  # the peer never reads
    outcome: list[str] = []

    async def send(stream: TunnelStream) -> None:
        try:
            await stream.send_data(b"q" * 3 * MIB)
        except UplinkClosed:
            outcome.append("UplinkClosed")
        else:
            outcome.append("returned")

    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            async with open_uplink(left, frames.FrameDecoder(), settings, role="relay") as relay:
                nursery.start_soon(send, relay.open_stream(REQUEST_HEAD))
                await trio.testing.wait_all_tasks_blocked()
                assert relay.statistics().queued_bytes > MIB
                assert outcome == []
                relay.close("shutting down")
                await trio.testing.wait_all_tasks_blocked()
                # The sender must not stay blocked on a queue nobody will ever drain.
                assert outcome != []
            await trio.testing.wait_all_tasks_blocked()
            assert outcome != []
            nursery.cancel_scope.cancel()


# --- 4. a peer overrunning credit -----------------------------------------------------------


@pytest.mark.parametrize(
    ("stream_ids", "initial_window", "connection_window", "what"),
    [
        ((1,), 4096, 65536, "stream 1"),
        ((1, 3, 5), 4096, 10240, "connection window"),
    ],
)
async def test_peer_overrunning_credit_is_a_flow_control_error(
    stream_ids: tuple[int, ...], initial_window: int, connection_window: int, what: str
) -> None:
    settings = welcome(initial_window=initial_window, connection_window=connection_window)
    with trio.fail_after(TIMEOUT):
        async with raw_peer(settings, role="agent") as (agent, raw):
            await raw.send(
                b"".join(frames.encode(frames.Open(i, REQUEST_HEAD)) for i in stream_ids)
            )
            accepted = [await agent.accept_stream() for _ in stream_ids]
            # Fill every stream's window; with one stream, add a frame past it. With three,
            # each stays within its own window but together they pass the connection's.
            per_stream = initial_window // 1024 + (len(stream_ids) == 1)
            wire = b"".join(
                frames.encode(frames.Data(i, b"x" * 1024)) * per_stream for i in stream_ids
            )
            await raw.send(wire)
            seen = await read_until_goaway(raw)
            goaway = seen[-1]
            assert isinstance(goaway, frames.GoAway)
            assert goaway.code == ErrorCode.FLOW_CONTROL_ERROR
            assert agent.closed
            assert what in agent.close_reason
            for stream in accepted:
                with pytest.raises(UplinkClosed):
                    await stream.receive_data()


@pytest.mark.parametrize("stream_id", [0, 1])
async def test_window_past_2_31_is_a_flow_control_error(stream_id: int) -> None:
    with trio.fail_after(TIMEOUT):
        async with raw_peer(welcome(), role="relay") as (relay, raw):
            relay.open_stream(REQUEST_HEAD)
            await raw.send(frames.encode(frames.Window(stream_id, frames.MAX_WINDOW)))
            goaway = (await read_until_goaway(raw))[-1]
            assert isinstance(goaway, frames.GoAway)
            assert goaway.code == ErrorCode.FLOW_CONTROL_ERROR
            assert relay.closed


# --- 5. cancellation ------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["receive_head", "send_data", "receive_data"])
async def test_cancelled_relay_task_leaves_no_stream_behind(where: str) -> None:
    reached: list[str] = []

    async def relay_task(pair: Pair) -> None:
        stream = pair.relay.open_stream(REQUEST_HEAD)
        try:
            if where == "receive_head":
                reached.append(where)
                await stream.receive_head()
            elif where == "send_data":
                reached.append(where)
                await stream.send_data(b"x" * 100_000)
            else:
                await stream.receive_head()
                assert await stream.receive_data() == b"partial"
                reached.append(where)
                await stream.receive_data()
            raise AssertionError("not reached")
        finally:
            stream.close()

    with trio.fail_after(TIMEOUT):
        async with uplink_pair() as pair:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay_task, pair)
                agent_stream = await pair.agent.accept_stream()
                if where == "receive_data":
                    agent_stream.send_head(RESPONSE_HEAD)
                    await agent_stream.send_data(b"partial")
                await trio.testing.wait_all_tasks_blocked()
                assert reached == [where]
                assert pair.relay.statistics().open_streams == 1
                nursery.cancel_scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert pair.relay.statistics().open_streams == 0
            assert pair.agent.statistics().open_streams == 0
            with pytest.raises(StreamReset) as info:
                await agent_stream.receive_data()
            assert info.value.code == ErrorCode.CANCEL
            with pytest.raises(StreamReset):
                await agent_stream.send_data(b"late")
            # The uplink still works, credit included.
            await check_round_trip(pair, request=body(1, 40000), response=body(2, 40000))


async def test_cancelled_receive_data_loses_no_data() -> None:
    with trio.fail_after(TIMEOUT):
        async with uplink_pair() as pair:
            stream = pair.relay.open_stream(REQUEST_HEAD)
            agent_stream = await pair.agent.accept_stream()
            agent_stream.send_head(RESPONSE_HEAD)
            await agent_stream.send_data(b"abc", end=True)
            await trio.testing.wait_all_tasks_blocked()
            assert stream.data_ready
            # A receive_data() cancelled at its checkpoint either returns the data or raises
            # Cancelled leaving the data in place (trio's receive_nowait + shielded checkpoint).
            results: list[bytes] = []
            with trio.CancelScope() as scope:
                scope.cancel()
                results.append(await stream.receive_data())
            if scope.cancelled_caught:
                results.append(await stream.receive_data())
            assert results == [b"abc"]
            assert await stream.receive_data() == b""


async def test_cancelled_accept_stream_takes_no_stream() -> None:
    # With nothing queued, accept_stream parks at once (no checkpoint before it): a
    # cancellation already pending lands there and leaves no acceptor behind; with a stream
    # queued, a cancelled accept does not take it.
    with trio.fail_after(TIMEOUT):
        async with uplink_pair() as pair:
            with trio.CancelScope() as scope:
                scope.cancel()
                await pair.agent.accept_stream()
            assert scope.cancelled_caught
            stream = pair.relay.open_stream(REQUEST_HEAD)
            await trio.testing.wait_all_tasks_blocked()
            assert pair.agent.statistics().incoming_queued == 1  # no stale acceptor took it
            with trio.CancelScope() as scope:
                scope.cancel()
                await pair.agent.accept_stream()
            assert scope.cancelled_caught
            assert pair.agent.statistics().incoming_queued == 1
            incoming = await pair.agent.accept_stream()
            assert incoming.head == REQUEST_HEAD
            incoming.send_head(RESPONSE_HEAD)
            await incoming.send_data(b"", end=True)
            assert await stream.receive_head() == RESPONSE_HEAD
            assert await read_body(stream) == b""
            await check_round_trip(pair)


async def test_receive_head_cancelled_then_again_and_one_reader_at_a_time() -> None:
    with trio.fail_after(TIMEOUT):
        async with uplink_pair() as pair:
            stream = pair.relay.open_stream(REQUEST_HEAD, end=True)
            with trio.CancelScope() as scope:  # parked, then cancelled: no waiter is left
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(stream.receive_head)
                    await trio.testing.wait_all_tasks_blocked()
                    scope.cancel()
            assert scope.cancelled_caught
            incoming = await pair.agent.accept_stream()
            heads: list[bytes] = []

            async def reader() -> None:
                heads.append(await stream.receive_head())

            async def second_reader() -> None:
                with pytest.raises(trio.BusyResourceError):
                    await stream.receive_head()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(second_reader)
                await trio.testing.wait_all_tasks_blocked()
                incoming.send_head(RESPONSE_HEAD)
                await incoming.send_data(b"", end=True)
            assert heads == [RESPONSE_HEAD]
            assert await read_body(stream) == b""


# --- 6. reset -------------------------------------------------------------------------------


async def test_agent_reset_reaches_relay_with_code_and_reason() -> None:
    with trio.fail_after(TIMEOUT):
        async with uplink_pair() as pair:
            stream = pair.relay.open_stream(REQUEST_HEAD)
            agent_stream = await pair.agent.accept_stream()
            agent_stream.reset(ErrorCode.BACKEND_UNAVAILABLE, "backend refused")
            with pytest.raises(StreamReset) as info:
                await stream.receive_head()
            assert info.value.code == ErrorCode.BACKEND_UNAVAILABLE
            assert info.value.reason == "backend refused"
            assert info.value.stream_id == stream.id
            with pytest.raises(StreamReset):
                await stream.send_data(b"more")
            with pytest.raises(StreamReset):
                agent_stream.send_head(RESPONSE_HEAD)
            assert pair.relay.statistics().open_streams == 0
            assert pair.agent.statistics().open_streams == 0
            await check_round_trip(pair)


async def test_cancel_on_reset_cancels_the_scope_when_the_peer_resets() -> None:
    with trio.fail_after(TIMEOUT):
        async with uplink_pair() as pair:
            stream = pair.relay.open_stream(REQUEST_HEAD)
            agent_stream = await pair.agent.accept_stream()
            scopes: list[trio.CancelScope] = []

            async def handler() -> None:
                with trio.CancelScope() as scope:
                    scopes.append(scope)
                    agent_stream.cancel_on_reset(scope)
                    await trio.sleep_forever()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(handler)
                await trio.testing.wait_all_tasks_blocked()
                assert not scopes[0].cancel_called
                stream.reset(ErrorCode.CANCEL, "client went away")
            assert scopes[0].cancelled_caught

            # Registering on a stream that is already reset cancels at once.
            with trio.CancelScope() as late:
                agent_stream.cancel_on_reset(late)
                await trio.sleep_forever()
            assert late.cancelled_caught


async def test_cancel_on_reset_cancels_the_scope_when_the_uplink_closes() -> None:
    with trio.fail_after(TIMEOUT):
        async with uplink_pair() as pair:
            pair.relay.open_stream(REQUEST_HEAD)
            agent_stream = await pair.agent.accept_stream()
            with trio.CancelScope() as scope:
                agent_stream.cancel_on_reset(scope)
                pair.agent.close("shutting down")
                await trio.sleep_forever()
            assert scope.cancelled_caught


# --- 7. keepalive ---------------------------------------------------------------------------


async def test_idle_uplink_pings_and_stays_open(autojump_clock: trio.testing.MockClock) -> None:
    interval = 10.0
    with trio.fail_after(1000):
        async with uplink_pair(welcome(ping_interval=interval)) as pair:
            await trio.sleep(20 * interval)
            assert not pair.relay.closed
            assert not pair.agent.closed
            for tap in (pair.relay_tap, pair.agent_tap):
                # Something went each way in every interval, so neither side saw silence.
                assert tap.count(frames.Ping) + tap.count(frames.Pong) >= 20
            assert pair.relay_tap.count(frames.Ping) + pair.agent_tap.count(frames.Ping) >= 20
            assert pair.relay_tap.count(frames.Pong) + pair.agent_tap.count(frames.Pong) >= 10
            await check_round_trip(pair)


async def test_silent_peer_is_closed_at_the_heartbeat_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    interval = 10.0
    tap = Tap(BlackHole())
    with trio.fail_after(1000):
        start = trio.current_time()
        async with open_uplink(
            tap, frames.FrameDecoder(), welcome(ping_interval=interval), role="relay"
        ) as relay:
            stream = relay.open_stream(REQUEST_HEAD)
            await relay.wait_closed()
            elapsed = trio.current_time() - start
            # Dead after twice the ping interval by default (PROTOCOL.md §6.2), not later.
            assert 2 * interval <= elapsed <= 2.1 * interval
            assert "no frame from the peer" in relay.close_reason
            assert tap.count(frames.Ping) == 1  # one PING after an interval of silence
            with pytest.raises(UplinkClosed):
                await stream.receive_head()


# --- 8. GOAWAY and drain --------------------------------------------------------------------


async def test_drain_refuses_new_streams_and_finishes_the_one_in_flight() -> None:
    with trio.fail_after(TIMEOUT):
        async with uplink_pair() as pair:
            stream = pair.relay.open_stream(REQUEST_HEAD)
            await stream.send_data(b"request", end=True)
            agent_stream = await pair.agent.accept_stream()
            drained = trio.Event()

            async def drain() -> None:
                await pair.relay.drain(60)
                drained.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                await trio.testing.wait_all_tasks_blocked()
                assert not drained.is_set()
                assert not pair.relay.accepting
                with pytest.raises(UplinkClosed):
                    pair.relay.open_stream(REQUEST_HEAD)
                assert not pair.agent.accepting  # the agent got the GOAWAY
                assert pair.relay_tap.count(frames.GoAway) == 1
                assert await read_body(agent_stream) == b"request"
                agent_stream.send_head(RESPONSE_HEAD)
                await agent_stream.send_data(b"response", end=True)
                assert await stream.receive_head() == RESPONSE_HEAD
                assert await read_body(stream) == b"response"
            # Both sides close once the stream is done (the relay either because its drain
            # finished or because the agent's GOAWAY arrived first).
            assert drained.is_set()
            assert pair.relay.closed
            await pair.agent.wait_closed()
            assert "GOAWAY" in pair.agent.close_reason


async def test_drain_fails_unfinished_streams_at_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    grace = 30.0
    with trio.fail_after(1000):
        async with uplink_pair() as pair:
            stream = pair.relay.open_stream(REQUEST_HEAD)
            await pair.agent.accept_stream()
            start = trio.current_time()
            await pair.relay.drain(grace)
            assert trio.current_time() - start == pytest.approx(grace)
            assert pair.relay.closed
            assert pair.relay.statistics().open_streams == 0
            with pytest.raises(UplinkClosed):
                await stream.receive_head()


async def test_agent_refuses_streams_while_draining() -> None:
    with trio.fail_after(TIMEOUT):
        async with uplink_pair() as pair:
            first = pair.relay.open_stream(REQUEST_HEAD)
            agent_first = await pair.agent.accept_stream()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pair.agent.drain, 60)
                await trio.testing.wait_all_tasks_blocked()
                assert not pair.relay.accepting  # the relay got the agent's GOAWAY
                # Finish the stream in flight; the agent then closes.
                first.send_end()
                assert await agent_first.receive_data() == b""
                agent_first.send_head(RESPONSE_HEAD)
                agent_first.send_end()
                assert await first.receive_head() == RESPONSE_HEAD
                assert await first.receive_data() == b""
            # The relay closes once its side of the last stream is done; the agent follows.
            await pair.relay.wait_closed()
            assert pair.agent.closed
            assert pair.agent_tap.count(frames.Reset) == 0


async def test_agent_drain_serves_an_open_that_crossed_its_goaway() -> None:
    # RFC 9113 §6.8: the agent's GOAWAY names the largest id and a PING follows, so a stream
    # the relay opened before it read the GOAWAY is served, not refused.
    with trio.fail_after(TIMEOUT):
        async with uplink_pair() as pair:
            crossing = pair.relay.open_stream(REQUEST_HEAD)  # queued before the GOAWAY lands
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pair.agent.drain, 60)
                agent_stream = await pair.agent.accept_stream()
                crossing.send_end()
                assert await agent_stream.receive_data() == b""
                agent_stream.send_head(RESPONSE_HEAD)
                agent_stream.send_end()
                assert await crossing.receive_head() == RESPONSE_HEAD
                assert await crossing.receive_data() == b""
            goaways = [f for f in pair.agent_tap.sent if isinstance(f, frames.GoAway)]
            assert goaways[0].last_stream_id == frames.MAX_STREAM_ID
            assert pair.agent_tap.count(frames.Reset) == 0


# --- 9. protocol errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(struct.pack("!IBBI", 0, 0x7F, 0, 0), id="unknown-type"),
        pytest.param(struct.pack("!IBBI", 0, 0x12, 1, 1), id="flags"),
        pytest.param(frames.encode(frames.Hello()), id="hello-after-handshake"),
        pytest.param(struct.pack("!IBBI", 1, 0x12, 0, 1) + b"x", id="end-with-payload"),
    ],
)
async def test_garbage_from_peer_closes_only_that_uplink(garbage: bytes) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            uplink_pair() as bystander,
            raw_peer(welcome(), role="relay") as (relay, raw),
        ):
            stream = relay.open_stream(REQUEST_HEAD)
            await raw.send(garbage)
            seen = await read_until_goaway(raw)
            goaway = seen[-1]
            assert isinstance(goaway, frames.GoAway)
            assert goaway.code == ErrorCode.PROTOCOL_ERROR
            assert relay.closed
            assert "protocol error" in relay.close_reason
            with pytest.raises(UplinkClosed):
                await stream.receive_head()
            with pytest.raises(UplinkClosed):
                relay.open_stream(REQUEST_HEAD)
            assert not bystander.relay.closed
            assert not bystander.agent.closed
            await check_round_trip(bystander)


@pytest.mark.parametrize("stream_ids", [(3, 1), (1, 1), (2,)])
async def test_agent_rejects_open_with_bad_stream_id(stream_ids: tuple[int, ...]) -> None:
    with trio.fail_after(TIMEOUT):
        async with raw_peer(welcome(), role="agent") as (agent, raw):
            await raw.send(
                b"".join(frames.encode(frames.Open(i, REQUEST_HEAD)) for i in stream_ids)
            )
            seen = await read_until_goaway(raw)
            goaway = seen[-1]
            assert isinstance(goaway, frames.GoAway)
            assert goaway.code == ErrorCode.PROTOCOL_ERROR
            assert agent.closed
            with pytest.raises(UplinkClosed):
                await agent.accept_stream()


# --- 10. overload ---------------------------------------------------------------------------


async def test_agent_resets_streams_beyond_its_queue_with_overloaded() -> None:
    with trio.fail_after(TIMEOUT):
        async with uplink_pair(max_incoming=2) as pair:
            streams = [pair.relay.open_stream(REQUEST_HEAD) for _ in range(3)]
            with pytest.raises(StreamReset) as info:
                await streams[2].receive_head()
            assert info.value.code == ErrorCode.OVERLOADED
            stats = pair.agent.statistics()
            assert stats.incoming_queued == 2
            assert stats.open_streams == 2
            assert pair.relay.statistics().open_streams == 2
            # The queued ones are still served.
            accepted = [await pair.agent.accept_stream() for _ in range(2)]
            assert [s.id for s in accepted] == [streams[0].id, streams[1].id]
            for stream in accepted:
                stream.reset(ErrorCode.CANCEL)


# --- 11. closing ----------------------------------------------------------------------------


async def test_leaving_the_block_fails_streams_and_closes_the_peer() -> None:
    left, right = memory_transport_pair()
    tap = Tap(left)
    errors: list[BaseException] = []

    async def wait_head(stream: TunnelStream) -> None:
        try:
            await stream.receive_head()
        except UplinkClosed as exc:
            errors.append(exc)

    with trio.fail_after(TIMEOUT):
        async with (
            open_uplink(right, frames.FrameDecoder(), welcome(), role="agent") as agent,
            trio.open_nursery() as nursery,
        ):
            task = trio.lowlevel.current_task()
            outer = set(task.child_nurseries)
            async with open_uplink(tap, frames.FrameDecoder(), welcome(), role="relay") as relay:
                (uplink_nursery,) = set(task.child_nurseries) - outer
                assert uplink_nursery.child_tasks
                stream = relay.open_stream(REQUEST_HEAD)
                agent_stream = await agent.accept_stream()
                nursery.start_soon(wait_head, stream)
                await trio.testing.wait_all_tasks_blocked()
                assert errors == []
            # No task of the uplink outlives its block.
            assert uplink_nursery not in task.child_nurseries
            assert not uplink_nursery.child_tasks
            await trio.testing.wait_all_tasks_blocked()
            assert len(errors) == 1
            assert relay.closed
            assert relay.close_reason == "closed locally"
            assert relay.statistics().open_streams == 0
            # The peer sees the connection end and fails its streams.
            await agent.wait_closed()
            with pytest.raises(UplinkClosed):
                await agent_stream.receive_data()
            assert agent.statistics().open_streams == 0
            # close() is idempotent.
            relay.close("again")
            relay.close("and again", ErrorCode.INTERNAL_ERROR)
            assert relay.close_reason == "closed locally"
            assert tap.count(frames.GoAway) == 1
            with pytest.raises(UplinkClosed):
                relay.open_stream(REQUEST_HEAD)


async def test_close_fails_waiting_accept_and_senders() -> None:
    settings = welcome(initial_window=1024)
    errors: list[BaseException] = []

    async def expect_closed(fn: Callable[[], object]) -> None:
        try:
            await fn()  # type: ignore[misc]
        except UplinkClosed as exc:
            errors.append(exc)

    with trio.fail_after(TIMEOUT):
        async with uplink_pair(settings) as pair:
            stream = pair.relay.open_stream(REQUEST_HEAD)
            await pair.agent.accept_stream()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(expect_closed, pair.agent.accept_stream)
                nursery.start_soon(expect_closed, lambda: stream.send_data(b"z" * 5000))
                await trio.testing.wait_all_tasks_blocked()
                assert errors == []
                pair.agent.close("bye")
                pair.relay.close("bye")
            assert len(errors) == 2


# --- 12. handshake --------------------------------------------------------------------------


async def test_receive_handshake_frame_assembles_a_frame_sent_byte_by_byte() -> None:
    left, right = memory_transport_pair()
    wire = frames.encode(frames.Hello(token="t"))
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def trickle() -> None:
                for i in range(len(wire)):
                    await left.send(wire[i : i + 1])
                    await trio.testing.wait_all_tasks_blocked()

            nursery.start_soon(trickle)
            frame = await receive_handshake_frame(right, frames.FrameDecoder())
        assert frame == frames.Hello(token="t")


async def test_receive_handshake_frame_leaves_later_frames_in_the_decoder() -> None:
    left, right = memory_transport_pair()
    decoder = frames.FrameDecoder()
    with trio.fail_after(TIMEOUT):
        await left.send(frames.encode(frames.Hello()) + frames.encode(frames.Ping(b"12345678")))
        assert await receive_handshake_frame(right, decoder) == frames.Hello()
        assert decoder.next_frame() == frames.Ping(b"12345678")
        assert decoder.next_frame() is None


async def test_receive_handshake_frame_raises_when_the_peer_closes_first() -> None:
    left, right = memory_transport_pair()
    with trio.fail_after(TIMEOUT):
        await left.aclose()
        with pytest.raises(HandshakeError):
            await receive_handshake_frame(right, frames.FrameDecoder())


async def test_receive_handshake_frame_raises_when_the_peer_closes_mid_frame() -> None:
    left, right = memory_transport_pair()
    with trio.fail_after(TIMEOUT):
        await left.send(frames.encode(frames.Hello())[:15])
        await left.aclose()
        with pytest.raises(HandshakeError):
            await receive_handshake_frame(right, frames.FrameDecoder())


async def test_receive_handshake_frame_rejects_garbage() -> None:
    left, right = memory_transport_pair()
    with trio.fail_after(TIMEOUT):
        await left.send(struct.pack("!IBBI", 0, 0x7F, 0, 0))
        with pytest.raises(RemoteProtocolError):
            await receive_handshake_frame(right, frames.FrameDecoder())


# --- 13. checkpoints ------------------------------------------------------------------------


async def test_fast_paths_checkpoint() -> None:
    with trio.fail_after(TIMEOUT):
        async with uplink_pair() as pair:
            stream = pair.relay.open_stream(REQUEST_HEAD)
            with trio.testing.assert_checkpoints():
                await stream.send_data(b"x")
            agent_stream = await pair.agent.accept_stream()
            agent_stream.send_head(RESPONSE_HEAD)
            await agent_stream.send_data(b"abc", end=True)
            await trio.testing.wait_all_tasks_blocked()
            assert stream.data_ready
            with trio.testing.assert_checkpoints():
                assert await stream.receive_head() == RESPONSE_HEAD
            with trio.testing.assert_checkpoints():
                assert await stream.receive_data() == b"abc"
            with trio.testing.assert_checkpoints():
                assert await stream.receive_data() == b""
            with trio.testing.assert_checkpoints():
                await stream.send_data(b"", end=True)
            with trio.testing.assert_checkpoints():
                await pair.agent.drain(0)
            with trio.testing.assert_checkpoints():
                await pair.agent.wait_closed()


async def test_send_head_with_a_body_over_the_credit_sends_nothing() -> None:
    """A response head with a body that does not fit the credit (or one frame) is refused
    whole, and the stream is as before: the head can still go out alone, then the body."""
    with trio.fail_after(TIMEOUT):
        async with uplink_pair(welcome(max_frame_size=1024, initial_window=1024)) as pair:
            stream = pair.relay.open_stream(b"GET / HTTP/1.1\r\n\r\n", end=True)
            incoming = await pair.agent.accept_stream()
            with pytest.raises(trio.WouldBlock):
                incoming.send_head(b"HTTP/1.1 200 OK\r\n\r\n", b"x" * 1025, end=True)
            assert pair.agent.statistics().queued_bytes == 0
            assert not incoming.local_ended
            incoming.send_head(b"HTTP/1.1 200 OK\r\n\r\n", b"y" * 10)
            await incoming.send_data(b"x" * 1000, end=True)
            assert await stream.receive_head() == b"HTTP/1.1 200 OK\r\n\r\n"
            body = b""
            while data := await stream.receive_data():
                body += data
            assert body == b"y" * 10 + b"x" * 1000


async def test_accept_stream_hands_streams_to_waiting_handlers_in_order() -> None:
    """A stream goes straight to the handler that has waited longest; a handler cancelled
    while waiting takes none; a queued stream is taken with a checkpoint; closing the uplink
    wakes every waiting handler with UplinkClosed."""
    with trio.fail_after(TIMEOUT):
        async with uplink_pair() as pair:
            got: list[tuple[str, int]] = []

            async def handler(name: str) -> None:
                stream = await pair.agent.accept_stream()
                got.append((name, stream.id))

            async with trio.open_nursery() as nursery:
                async with trio.open_nursery() as inner:
                    inner.start_soon(handler, "cancelled")
                    await trio.testing.wait_all_tasks_blocked()
                    inner.cancel_scope.cancel()
                nursery.start_soon(handler, "first")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(handler, "second")
                await trio.testing.wait_all_tasks_blocked()
                one = pair.relay.open_stream(b"GET /1 HTTP/1.1\r\n\r\n", end=True)
                two = pair.relay.open_stream(b"GET /2 HTTP/1.1\r\n\r\n", end=True)
            assert dict(got) == {"first": one.id, "second": two.id}  # (they run in any order)
            three = pair.relay.open_stream(b"GET /3 HTTP/1.1\r\n\r\n", end=True)
            await trio.testing.wait_all_tasks_blocked()
            assert pair.agent.statistics().incoming_queued == 1
            with trio.testing.assert_checkpoints():
                assert (await pair.agent.accept_stream()).id == three.id
            errors: list[BaseException] = []

            async def waiter() -> None:
                with pytest.raises(UplinkClosed) as info:
                    await pair.agent.accept_stream()
                errors.append(info.value)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                pair.agent.close("test closes")
            assert len(errors) == 2
            with pytest.raises(UplinkClosed):
                await pair.agent.accept_stream()


async def test_a_second_reader_of_one_stream_is_refused_and_the_first_still_wakes() -> None:
    # Review finding: a second waiter used to replace the first (under python -O), and the
    # first one's cancellation then cleared the second's registration: a lost wake-up.
    with trio.fail_after(5):
        async with uplink_pair() as pair:
            stream = pair.relay.open_stream(b"GET / HTTP/1.1\r\n\r\n")
            served = await pair.agent.accept_stream()
            got: list[bytes] = []

            async def first() -> None:
                got.append(await served.receive_data())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(first)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError, match="already reading stream"):
                    await served.receive_data()
                await stream.send_data(b"hello")
            assert got == [b"hello"]
