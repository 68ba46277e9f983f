"""Tests for :mod:`tunnel2.transports`: byte strings in, byte strings out, trio's error meanings.

StreamTransport runs over trio's memory streams; WsprotoTransport over a connected socket pair
(and over TLS in ``tests/test_tls.py``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import pytest
import trio
import trio.testing
import websockets.utils
import wsproto
import wsproto.events
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import ConnectionType

import tunnel2._sockets
from tunnel2 import frames
from tunnel2._sockets import FastSocketStream, serve_socket
from tunnel2.errors import UplinkClosed
from tunnel2.transports import (
    FrameTransport,
    StreamTransport,
    WsprotoTransport,
    _binary_frame,
    _WebSocketError,
    _WebSocketReader,
    _xor_mask,
    accept_websocket,
    connect_websocket,
    lockstep_transport_pair,
    memory_transport_pair,
)
from tunnel2.uplink import (
    _EARLY_FLUSH_FRAMES,
    _PROBE_AFTER_MIN,
    TunnelStream,
    TunnelUplink,
    open_uplink,
)

# Bounds hangs only: each test takes milliseconds.
TIMEOUT: Final = 2
REQUEST: Final = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
RESPONSE: Final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"


async def receive_exactly(transport: StreamTransport, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await transport.receive()
        assert chunk, "unexpected EOF"
        data += chunk
    return bytes(data)


# --- StreamTransport ------------------------------------------------------------------------


async def test_stream_transport_round_trips_bytes_both_ways() -> None:
    left, right = memory_transport_pair()
    wire = frames.encode(frames.Data(1, b"hello")) + frames.encode(frames.End(1))
    big = bytes(range(256)) * 1000
    with trio.fail_after(TIMEOUT):
        await left.send(wire)
        assert await receive_exactly(right, len(wire)) == wire
        await right.send(big)
        assert await receive_exactly(left, len(big)) == big


async def test_stream_transport_returns_empty_bytes_at_eof() -> None:
    left, right = memory_transport_pair()
    with trio.fail_after(TIMEOUT):
        await left.send(b"last words")
        await left.aclose()
        assert await receive_exactly(right, 10) == b"last words"
        assert await right.receive() == b""
        assert await right.receive() == b""


async def test_stream_transport_errors_keep_trio_meanings() -> None:
    left, right = memory_transport_pair()
    with trio.fail_after(TIMEOUT):
        await left.aclose()
        await left.aclose()  # idempotent
        with pytest.raises(trio.ClosedResourceError):
            await left.send(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await left.receive()
        with pytest.raises(trio.BrokenResourceError):
            await right.send(b"x")


async def test_stream_transport_over_a_custom_stream_honours_receive_size() -> None:
    left, right = trio.testing.memory_stream_pair()
    transport = StreamTransport(right, receive_size=4)
    with trio.fail_after(TIMEOUT):
        await left.send_all(b"0123456789")
        assert await transport.receive() == b"0123"
        assert await transport.receive() == b"4567"


async def test_lockstep_pair_blocks_the_sender_until_the_receiver_reads() -> None:
    left, right = lockstep_transport_pair()
    sent = trio.Event()

    async def sender() -> None:
        await left.send(b"payload")
        sent.set()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.testing.wait_all_tasks_blocked()
            assert not sent.is_set()
            assert await receive_exactly(right, 7) == b"payload"
            await sent.wait()


async def test_memory_pair_buffers_without_a_reader() -> None:
    left, right = memory_transport_pair()
    with trio.fail_after(TIMEOUT):
        with trio.testing.assert_checkpoints():
            await left.send(b"buffered")
        assert await receive_exactly(right, 8) == b"buffered"


# --- WsprotoTransport: wsproto driven from the caller's task over a bare socket --------------


@asynccontextmanager
async def wsproto_pair() -> AsyncIterator[tuple[WsprotoTransport, WsprotoTransport]]:
    """A client and a server WsprotoTransport over a connected socket pair."""
    left, right = socket.socketpair()
    client_stream, server_stream = FastSocketStream(left), FastSocketStream(right)
    request = b""

    async def read_request() -> None:
        nonlocal request
        while b"\r\n\r\n" not in request:
            request += await server_stream.receive_some(65536)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_request)
        client_box: list[WsprotoTransport] = []

        async def dial() -> None:
            client_box.append(await connect_websocket(client_stream, "relay.test", "/x"))

        nursery.start_soon(dial)
        await trio.testing.wait_all_tasks_blocked()
        server = await accept_websocket(server_stream, request)
    client = client_box[0]
    try:
        yield client, server
    finally:
        await client.aclose()
        await server.aclose()


async def test_wsproto_transport_round_trips_and_closes() -> None:
    with trio.fail_after(5):
        async with wsproto_pair() as (client, server):
            await client.send(b"hello")
            assert await server.receive() == b"hello"
            await server.send(b"back")
            assert await client.receive() == b"back"
            await client.aclose()
            assert await server.receive() == b""


async def test_wsproto_transport_returns_empty_bytes_when_the_peer_closes() -> None:
    with trio.fail_after(TIMEOUT):
        async with wsproto_pair() as (client, server):
            await server.send(b"goodbye")
            await server.aclose()
            assert await client.receive() == b"goodbye"
            assert await client.receive() == b""
            assert await client.receive() == b""
            with pytest.raises(trio.BrokenResourceError):
                await client.send(b"too late")


async def test_wsproto_transport_rejects_text_messages() -> None:
    with trio.fail_after(TIMEOUT):
        async with wsproto_pair() as (client, server):
            # The transport never sends text; write one with its wsproto connection.
            await server._stream.send_all(server._ws.send(wsproto.events.TextMessage("text")))
            with pytest.raises(trio.BrokenResourceError, match="text message"):
                await client.receive()


async def test_wsproto_transport_close_is_idempotent_and_frees_the_socket() -> None:
    with trio.fail_after(TIMEOUT):
        async with wsproto_pair() as (client, server):
            await server.aclose()
            assert await client.receive() == b""
            await client.aclose()
            await client.aclose()
            stream = client._stream
            assert isinstance(stream, FastSocketStream)
            assert stream.socket.fileno() == -1


async def test_a_client_masks_each_message_with_the_next_key_of_a_drawn_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Masking keys come from os.urandom 1,024 at a time (not a getrandom system call per
    message), each used once, in the order drawn; a server draws none."""
    draws: list[int] = []
    real_urandom = os.urandom

    def urandom(size: int) -> bytes:
        if size != 4096:
            return real_urandom(size)
        start = len(draws) * 1024
        draws.append(size)  # distinct, recognisable keys: 0, 1, 2, ... as 4-byte integers
        return b"".join(i.to_bytes(4, "big") for i in range(start, start + 1024))

    with trio.fail_after(TIMEOUT):
        async with wsproto_pair() as (client, server):
            monkeypatch.setattr(os, "urandom", urandom)
            messages = [b"message %d" % i for i in range(1030)]
            raw = bytearray()
            keys: list[int] = []

            async def read_raw() -> None:  # what the server's socket gets, unparsed
                stream = server._stream
                for message in messages:
                    while len(raw) < 6 + len(message):
                        raw.extend(await stream.receive_some(65536))
                    assert raw[0] == 0x82
                    assert raw[1] == 0x80 | len(message)
                    key = bytes(raw[2:6])
                    keys.append(int.from_bytes(key, "big"))
                    masked = raw[6 : 6 + len(message)]
                    assert websockets.utils.apply_mask(masked, key) == message
                    del raw[: 6 + len(message)]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_raw)
                for i, message in enumerate(messages):
                    if i % 2 and not client.pending:
                        assert client.send_nowait(message)
                    else:
                        await client.send(message)
                await client.flush()
            await server.send(b"unmasked")
            assert await client.receive() == b"unmasked"
            assert draws == [4096, 4096]
            assert keys == list(range(1030))


def is_pending(transport: WsprotoTransport) -> bool:
    return transport.pending


def is_closed(uplink: TunnelUplink) -> bool:  # (a call: mypy does not narrow it)
    return uplink.closed


async def test_wsproto_send_nowait_hands_the_unsent_rest_to_flush() -> None:
    big = bytes(range(256)) * 40_000  # ~10 MB: more than a socket buffer takes at once
    with trio.fail_after(10):
        async with wsproto_pair() as (client, server):
            assert client.send_nowait(big)
            assert is_pending(client)
            # Until the rest is flushed, no second message may overtake it.
            assert not client.send_nowait(b"later")
            received = bytearray()

            async def drain() -> None:
                while len(received) < len(big) + 5:
                    received.extend(await server.receive())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                await client.flush()
                assert not is_pending(client)
                await client.send(b"later")
            assert bytes(received) == big + b"later"


async def test_accept_websocket_refuses_a_plain_request() -> None:
    left, right = socket.socketpair()
    client, server = FastSocketStream(left), FastSocketStream(right)
    with trio.fail_after(5):
        with pytest.raises(trio.BrokenResourceError, match="WebSocket"):
            await accept_websocket(server, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        answer = await client.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 400 ")
    await client.aclose()
    await server.aclose()


async def test_uplink_over_wsproto_carries_a_burst_through_early_flushes() -> None:
    """More frames than the early-flush threshold queued in one pass go out in several
    immediate writes and all arrive, in order, on their streams."""
    with trio.fail_after(10):
        async with wsproto_pair() as (client, server):
            await carry_a_burst(client, server)


async def carry_a_burst(client: FrameTransport, server: FrameTransport) -> None:
    """Run uplinks on both transports; 40 requests queued in one pass all come back."""
    settings = frames.Welcome(session_id="s1", public_urls=("http://x/",), ping_interval=0)
    async with (
        open_uplink(server, frames.FrameDecoder(), settings, role="relay") as relay,
        open_uplink(client, frames.FrameDecoder(), settings, role="agent") as agent,
    ):
        streams = [relay.open_stream(b"GET /%d HTTP/1.1\r\n\r\n" % i) for i in range(40)]
        for stream in streams:
            stream.send_end()
        for i in range(40):
            incoming = await agent.accept_stream()
            assert incoming.head == b"GET /%d HTTP/1.1\r\n\r\n" % i
            incoming.send_head(b"HTTP/1.1 200 OK\r\n\r\n")
            incoming.send_data_nowait(b"body %d" % i, end=True)
        for i, stream in enumerate(streams):
            assert await stream.receive_head() == b"HTTP/1.1 200 OK\r\n\r\n"
            assert await stream.receive_data() == b"body %d" % i
            assert await stream.receive_data() == b""


# --- the binary-message fast path against wsproto as the oracle -------------------------------


def wsproto_connected() -> tuple[wsproto.WSConnection, wsproto.WSConnection]:
    """A wsproto client and server past their handshake."""
    client = wsproto.WSConnection(ConnectionType.CLIENT)
    server = wsproto.WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(wsproto.events.Request(host="relay.test", target="/")))
    assert isinstance(next(server.events()), wsproto.events.Request)
    client.receive_data(server.send(wsproto.events.AcceptConnection()))
    assert isinstance(next(client.events()), wsproto.events.AcceptConnection)
    return client, server


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


messages_st = st.lists(st.binary(min_size=1, max_size=70_000), min_size=1, max_size=6)
pings_st = st.lists(st.binary(max_size=125), max_size=6)


@settings(max_examples=60, deadline=None)
@given(
    client_sends=st.booleans(),
    messages=messages_st,
    pings=pings_st,
    ping_slots=st.lists(st.integers(0, 6), max_size=6),
)
def test_fast_path_frames_decode_in_wsproto(
    client_sends: bool, messages: list[bytes], pings: list[bytes], ping_slots: list[int]
) -> None:
    """What the fast path builds, masked (client) or not (server), is what wsproto reads,
    with control frames built by wsproto in between."""
    client, server = wsproto_connected()
    sender, receiver = (client, server) if client_sends else (server, client)
    wire = []
    slots = dict(zip(ping_slots, pings, strict=False))
    for i, message in enumerate(messages):
        if i in slots:
            wire.append(sender.send(wsproto.events.Ping(slots[i])))
        frame = _binary_frame(message, os.urandom(4) if client_sends else b"")
        assert bool(frame[1] & 0x80) is client_sends
        wire.append(frame)
    receiver.receive_data(b"".join(wire))
    got: list[bytes] = []
    current = b""
    pinged: list[bytes] = []
    for event in receiver.events():
        if isinstance(event, wsproto.events.BytesMessage):
            current += event.data
            if event.message_finished:
                got.append(current)
                current = b""
        else:
            assert isinstance(event, wsproto.events.Ping), event
            pinged.append(bytes(event.payload))
    assert got == messages
    assert pinged == [slots[i] for i in range(len(messages)) if i in slots]


@settings(max_examples=60, deadline=None)
@given(
    client_sends=st.booleans(),
    messages=messages_st,
    fragment_cuts=st.lists(st.integers(0, 70_000), max_size=8),
    pings=pings_st,
    read_cuts=st.lists(st.integers(0, 500_000), max_size=12),
)
def test_fast_path_reads_what_wsproto_sends(
    client_sends: bool,
    messages: list[bytes],
    fragment_cuts: list[int],
    pings: list[bytes],
    read_cuts: list[int],
) -> None:
    """wsproto's messages, fragmented, with PINGs between fragments, arrive through the fast
    path's reader as their bytes in order, however the stream is cut; the PINGs reach the
    reader's wsproto whole."""
    client, server = wsproto_connected()
    sender, own = (client, server) if client_sends else (server, client)
    wire = []
    pending_pings = list(pings)
    for message in messages:
        fragments = split_at(message, fragment_cuts)
        for n, fragment in enumerate(fragments):
            last = n == len(fragments) - 1
            wire.append(sender.send(wsproto.events.BytesMessage(fragment, message_finished=last)))
            if pending_pings:
                wire.append(sender.send(wsproto.events.Ping(pending_pings.pop())))
    reader = _WebSocketReader(masked=client_sends)
    received = b""
    for chunk in split_at(b"".join(wire), read_cuts):
        received += reader.receive_data(chunk)
    assert received == b"".join(messages)
    own.receive_data(b"".join(reader.control))
    got_pings = [bytes(e.payload) for e in own.events() if isinstance(e, wsproto.events.Ping)]
    assert got_pings == list(reversed(pings))[: len(got_pings)]
    assert len(got_pings) == min(len(pings), sum(len(split_at(m, fragment_cuts)) for m in messages))


def wsproto_outcome(receiver: wsproto.WSConnection, wire: bytes) -> tuple[bool, bytes]:
    """(failed, binary data) as wsproto reads ``wire``, a text message counting as failed
    (the transport carries binary only)."""
    receiver.receive_data(wire)
    data = b""
    for event in receiver.events():
        if isinstance(event, wsproto.events.BytesMessage):
            data += event.data
        elif isinstance(event, (wsproto.events.CloseConnection, wsproto.events.TextMessage)):
            return True, data
    return False, data


def fast_path_outcome(
    reader: _WebSocketReader, own: wsproto.WSConnection, wire: bytes
) -> tuple[bool, bytes]:
    try:
        data = reader.receive_data(wire)
    except _WebSocketError:
        return True, b""
    own.receive_data(b"".join(reader.control))
    for event in own.events():
        if isinstance(event, wsproto.events.CloseConnection):
            return True, data
    return False, data


@settings(max_examples=300, deadline=None)
@given(
    client_sends=st.booleans(),
    messages=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=5),
    fragment_cuts=st.lists(st.integers(0, 300), max_size=3),
    target=st.integers(0, 100),
    # Mostly first bytes a valid stream might hold, so both outcomes are common.
    byte=st.one_of(
        st.sampled_from([0x00, 0x02, 0x80, 0x82, 0x81, 0x88, 0x89, 0x8A, 0x09, 0xC2, 0x83]),
        st.integers(0, 255),
    ),
    mask_flip=st.booleans(),
)
def test_fast_path_refuses_what_wsproto_refuses(
    client_sends: bool,
    messages: list[bytes],
    fragment_cuts: list[int],
    target: int,
    byte: int,
    mask_flip: bool,
) -> None:
    """With one frame's first byte (FIN, reserved bits, opcode) replaced, or its mask bit
    flipped, the fast path fails exactly when wsproto does, and reads the same otherwise."""
    client, server = wsproto_connected()
    sender, own = (client, server) if client_sends else (server, client)
    frames_out = []
    for message in messages:
        fragments = split_at(message, fragment_cuts)
        for n, fragment in enumerate(fragments):
            last = n == len(fragments) - 1
            frames_out.append(
                bytearray(sender.send(wsproto.events.BytesMessage(fragment, message_finished=last)))
            )
        frames_out.append(bytearray(sender.send(wsproto.events.Ping(b"p"))))
    victim = frames_out[target % len(frames_out)]
    if mask_flip:
        victim[1] ^= 0x80
    else:
        victim[0] = byte
    wire = b"".join(frames_out)
    oracle = wsproto_connected()[1 if client_sends else 0]
    expected = wsproto_outcome(oracle, wire)
    got = fast_path_outcome(_WebSocketReader(masked=client_sends), own, wire)
    assert got[0] == expected[0]
    if not expected[0]:
        assert got[1] == expected[1]


@settings(max_examples=300, deadline=None)
@given(
    client_sends=st.booleans(),
    message=st.binary(max_size=300) | st.sampled_from([b"x" * 125, b"x" * 126, b"x" * 65536]),
    change=st.sampled_from(["none", "first byte", "mask bit", "long length"]),
    byte=st.sampled_from([0x02, 0x80, 0x81, 0x83, 0x88, 0x89, 0xC2, 0x92]),
)
def test_a_whole_message_in_one_read_is_read_as_wsproto_reads_it(
    client_sends: bool, message: bytes, change: str, byte: int
) -> None:
    """The reader's shortcut for one whole unfragmented frame in one read (the common small
    message) gives wsproto's outcome, also with a wrong first byte, a flipped mask bit or a
    length not in its shortest form."""
    client, server = wsproto_connected()
    sender, own = (client, server) if client_sends else (server, client)
    wire = bytearray(sender.send(wsproto.events.BytesMessage(message)))
    if change == "first byte":
        wire[0] = byte
    elif change == "mask bit":
        wire[1] ^= 0x80
    elif change == "long length" and len(message) < 126:
        wire[1:2] = bytes((wire[1] & 0x80 | 126, 0, len(message)))
    oracle = wsproto_connected()[1 if client_sends else 0]
    expected = wsproto_outcome(oracle, bytes(wire))
    got = fast_path_outcome(_WebSocketReader(masked=client_sends), own, bytes(wire))
    assert got[0] == expected[0]
    if not expected[0]:
        assert got[1] == expected[1]
    if change == "none":
        assert got == (False, message)


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 125, 126, 65535, 65536, 100_000])
def test_xor_mask_round_trips_at_every_offset(size: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    key = b"\x01\x80\xff\x37"
    masked = _xor_mask(data, key)
    assert masked == bytes(b ^ key[i % 4] for i, b in enumerate(data))
    assert _xor_mask(bytearray(data), key) == _xor_mask(memoryview(data), key) == masked
    # What a websockets build without its C extension would use instead: the same answers.
    assert websockets.utils.apply_mask(data, key) == masked
    for cut in {0, 1, 2, 3, size // 2}:
        if cut <= size:
            assert _xor_mask(masked[:cut], key) + _xor_mask(masked[cut:], key, cut % 4) == data


async def test_connect_websocket_keeps_frames_that_came_with_the_handshake_answer() -> None:
    """A server that writes its 101 and first messages in one go: the messages are not lost
    between wsproto (which reads the answer's head) and the fast path."""
    left, right = socket.socketpair()
    client_stream, server_stream = FastSocketStream(left), FastSocketStream(right)
    server = wsproto.WSConnection(ConnectionType.SERVER)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def answer() -> None:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += await server_stream.receive_some(65536)
                server.receive_data(request)
                assert isinstance(next(server.events()), wsproto.events.Request)
                await server_stream.send_all(
                    server.send(wsproto.events.AcceptConnection())
                    + server.send(wsproto.events.Ping(b"hi"))
                    + server.send(wsproto.events.BytesMessage(b"first", message_finished=False))
                    + server.send(wsproto.events.BytesMessage(b" message"))
                )

            nursery.start_soon(answer)
            client = await connect_websocket(client_stream, "relay.test", "/x")
        received = b""
        while len(received) < len(b"first message"):
            received += await client.receive()
        assert received == b"first message"
        await client.send(b"reply")
        server.receive_data(await server_stream.receive_some(65536))
        events = list(server.events())
        assert isinstance(events[0], wsproto.events.Pong)
        assert events[0].payload == b"hi"
        assert isinstance(events[1], wsproto.events.BytesMessage)
        assert events[1].data == b"reply"
        await client.aclose()
        await server_stream.aclose()


async def test_wsproto_transport_reports_invalid_frames() -> None:
    with trio.fail_after(TIMEOUT):
        async with wsproto_pair() as (client, server):
            await client._stream.send_all(b"\xc2\x80abcd")  # RSV1 set, never negotiated
            with pytest.raises(trio.BrokenResourceError, match="invalid websocket data"):
                await server.receive()
            assert await server.receive() == b""


def peek_frames(transport: WsprotoTransport, *, masked: bool) -> list[frames.Frame]:
    """The frames waiting unread on the socket behind ``transport`` (nothing is consumed),
    and checks they came as one WebSocket message."""
    stream = transport._stream
    assert isinstance(stream, FastSocketStream)
    wire = stream.socket.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    assert wire[0] == 0x82  # one final binary frame, small, and nothing after it
    assert len(wire) == 2 + 4 * masked + (wire[1] & 0x7F)
    reader = _WebSocketReader(masked=masked)
    decoder = frames.FrameDecoder()
    decoder.receive_data(reader.receive_data(wire))
    seen = []
    while (frame := decoder.next_frame()) is not None:
        seen.append(frame)
    return seen


async def test_uplink_writes_a_small_exchange_from_the_calling_task() -> None:
    """With the writer idle, a bodiless request (OPEN + END) and a small complete response
    (OPEN + DATA + END) each leave in one write made by the task that has them, before any
    checkpoint: the writer task is not woken for them."""
    settings = frames.Welcome(session_id="s1", public_urls=("http://x/",), ping_interval=0)
    with trio.fail_after(TIMEOUT):
        async with (
            wsproto_pair() as (client, server),
            open_uplink(server, frames.FrameDecoder(), settings, role="relay") as relay,
            open_uplink(client, frames.FrameDecoder(), settings, role="agent") as agent,
        ):
            await trio.testing.wait_all_tasks_blocked()
            stream = relay.open_stream(b"GET / HTTP/1.1\r\n\r\n", end=True)
            assert relay.statistics().queued_bytes == 0
            assert peek_frames(client, masked=False) == [
                frames.Open(stream.id, b"GET / HTTP/1.1\r\n\r\n"),
                frames.End(stream.id),
            ]
            incoming = await agent.accept_stream()
            await trio.testing.wait_all_tasks_blocked()
            incoming.send_head(b"HTTP/1.1 200 OK\r\n\r\n", b"hi", end=True)
            assert agent.statistics().queued_bytes == 0
            assert peek_frames(server, masked=True) == [
                frames.Open(stream.id, b"HTTP/1.1 200 OK\r\n\r\n"),
                frames.Data(stream.id, b"hi"),
                frames.End(stream.id),
            ]
            assert await stream.receive_head() == b"HTTP/1.1 200 OK\r\n\r\n"
            assert await stream.receive_data() == b"hi"
            assert await stream.receive_data() == b""


class CountingTransport(FrameTransport):
    """Delegates to a WsprotoTransport; counts the writes made from the calling task
    (``send_nowait``) and by the uplink's writer task (``send``)."""

    def __init__(self, inner: WsprotoTransport) -> None:
        self.inner = inner
        self.direct = 0
        self.by_writer = 0
        self.broken = False  # then every write fails as on a reset connection

    async def send(self, data: bytes) -> None:
        self.by_writer += 1
        if self.broken:
            raise trio.BrokenResourceError("connection reset")
        await self.inner.send(data)

    def send_nowait(self, data: bytes) -> bool:
        if self.broken:
            raise trio.BrokenResourceError("connection reset")
        sent = self.inner.send_nowait(data)
        self.direct += sent
        return sent

    @property
    def pending(self) -> bool:
        return self.inner.pending

    async def flush(self) -> None:
        await self.inner.flush()

    async def receive(self) -> bytes | bytearray:
        return await self.inner.receive()

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def counted_uplinks() -> AsyncIterator[
    tuple[TunnelUplink, CountingTransport, TunnelUplink, CountingTransport]
]:
    settings = frames.Welcome(session_id="s1", public_urls=("http://x/",), ping_interval=0)
    async with wsproto_pair() as (client, server):
        relay_side, agent_side = CountingTransport(server), CountingTransport(client)
        async with (
            open_uplink(relay_side, frames.FrameDecoder(), settings, role="relay") as relay,
            open_uplink(agent_side, frames.FrameDecoder(), settings, role="agent") as agent,
        ):
            await trio.testing.wait_all_tasks_blocked()
            yield relay, relay_side, agent, agent_side


async def test_uplink_coalesces_the_writes_of_one_scheduler_pass_under_load() -> None:
    """With other streams open, tasks that send in the same scheduler pass share writes:
    after at most _PROBE_AFTER_MIN - 1 direct writes the uplink waits for its writer, which
    sends what the rest of the pass queued in one write (under a real load: one system call
    for many requests, not one each)."""
    with trio.fail_after(TIMEOUT):
        async with counted_uplinks() as (relay, relay_side, agent, agent_side):
            for _ in range(2):  # open, unanswered
                relay.open_stream(REQUEST, end=True)
                await agent.accept_stream()
            await trio.testing.wait_all_tasks_blocked()
            writes_before = relay_side.direct + relay_side.by_writer
            opened: list[TunnelStream] = []

            async def open_one() -> None:
                opened.append(relay.open_stream(REQUEST, end=True))

            async with trio.open_nursery() as nursery:
                for _ in range(12):  # all start, and send, in one pass
                    nursery.start_soon(open_one)
            await trio.testing.wait_all_tasks_blocked()
            writes = relay_side.direct + relay_side.by_writer - writes_before
            assert writes <= _PROBE_AFTER_MIN
            assert relay_side.by_writer == 1
            incoming = [await agent.accept_stream() for _ in opened]
            assert sorted(stream.id for stream in incoming) == sorted(s.id for s in opened)

            writes_before = agent_side.direct + agent_side.by_writer

            async def answer(stream: TunnelStream) -> None:
                stream.send_head(RESPONSE, b"hi", end=True)

            async with trio.open_nursery() as nursery:
                for stream in incoming:
                    nursery.start_soon(answer, stream)
            for stream in opened:
                assert await stream.receive_head() == RESPONSE
                assert await stream.receive_data() == b"hi"
                assert await stream.receive_data() == b""
            assert agent_side.direct + agent_side.by_writer - writes_before <= _PROBE_AFTER_MIN


async def test_a_connection_reset_while_frames_wait_to_coalesce_closes_the_uplink_cleanly() -> None:
    """With coalescing on, a burst queues frames while the writer waits for its turn; when
    the connection breaks, the early flush of that burst fails. Callers that only queued get
    their streams (or UplinkClosed once the uplink is closed), close() finishes, and the
    uplink closes through its writer: no BrokenResourceError escapes to them or out of
    open_uplink (the agent would stop instead of dialling again)."""
    with trio.fail_after(TIMEOUT):
        async with counted_uplinks() as (relay, relay_side, _agent, _):
            relay.open_stream(REQUEST)
            relay.open_stream(REQUEST)
            relay._probe_in = 1  # the next direct write is a probe: coalescing starts
            relay_side.broken = True
            opened = [relay.open_stream(REQUEST, end=True) for _ in range(_EARLY_FLUSH_FRAMES)]
            assert len(opened) == _EARLY_FLUSH_FRAMES  # the flush failed; nothing raised
            assert not is_closed(relay)
            relay.close("closing with a burst queued")  # its GOAWAY makes one more flush
            assert is_closed(relay)
            with pytest.raises(UplinkClosed):
                relay.open_stream(REQUEST)
            for stream in opened:
                with pytest.raises(UplinkClosed):
                    await stream.receive_head()


async def test_two_tasks_writing_for_one_stream_in_a_pass_are_one_exchange() -> None:
    """What counts as load is several streams sending in one pass, not several tasks: the
    relay's connection task and its body pump write for the same request (OPEN, then END),
    so a probe that finds only them turns coalescing off again."""
    with trio.fail_after(TIMEOUT):
        async with counted_uplinks() as (relay, relay_side, agent, _):
            relay.open_stream(REQUEST)  # held open: two streams
            await agent.accept_stream()
            stream = relay.open_stream(REQUEST)
            incoming = await agent.accept_stream()
            await trio.testing.wait_all_tasks_blocked()
            relay._probe_in = 1  # the next direct write is a probe

            async def send(data: bytes) -> None:
                stream.send_data_nowait(data)

            woken_before = relay_side.by_writer
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, b"x")
                nursery.start_soon(send, b"y")
            await trio.testing.wait_all_tasks_blocked()
            assert relay_side.by_writer == woken_before + 1  # both in the probe's write
            direct_before = relay_side.direct
            stream.send_end()
            assert relay_side.direct == direct_before + 1  # written at once again
            received = b""
            while (chunk := await incoming.receive_data()) != b"":
                received += chunk
            assert sorted(received) == sorted(b"xy")


async def test_lone_requests_beside_a_stream_that_stays_open_are_written_directly() -> None:
    """A stream that stays open (a WebSocket, an event stream) keeps two streams open, so
    the uplink probes for coalescing; each probe that finds no other stream sending in its
    pass (here one task writes OPEN, DATA and END, each at once) makes the next one wait
    twice as long: 100 one-at-a-time exchanges (300 writes) wake the writer 8 times."""
    with trio.fail_after(TIMEOUT):
        async with counted_uplinks() as (relay, relay_side, agent, _):
            relay.open_stream(REQUEST, end=False)  # held open all along
            await agent.accept_stream()
            await trio.testing.wait_all_tasks_blocked()
            direct_before, woken_before = relay_side.direct, relay_side.by_writer
            for _ in range(100):
                stream = relay.open_stream(REQUEST)
                stream.send_data_nowait(b"x")
                stream.send_end()
                incoming = await agent.accept_stream()
                assert await incoming.receive_data() == b"x"
                incoming.send_head(RESPONSE, b"hi", end=True)
                assert await stream.receive_head() == RESPONSE
                assert await stream.receive_data() == b"hi"
                assert await stream.receive_data() == b""
                await trio.testing.wait_all_tasks_blocked()
            # Probes after 4, 4, 8, 16, 32, 64, 64, 64 direct writes; the writer's write
            # for a probe carries what its task sent behind it.
            assert relay_side.by_writer - woken_before == 8
            assert relay_side.direct - direct_before >= 300 - 3 * 8


class _FlakyListener(socket.socket):
    """A listening socket whose first accepts fail with the given errno values."""

    failures: list[int]

    def accept(self) -> tuple[socket.socket, object]:
        if self.failures:
            code = self.failures.pop(0)
            raise OSError(code, os.strerror(code))
        return super().accept()


async def _echo_once(stream: FastSocketStream) -> None:
    try:
        await stream.send_all(await stream.receive_some(100))
    finally:
        await stream.aclose()


@pytest.mark.parametrize("failures", [[], [errno.ECONNABORTED, errno.EMFILE, errno.EINTR]])
async def test_serve_socket_serves_each_connection_and_closes_the_listener(
    failures: list[int],
) -> None:
    listener = _FlakyListener(socket.AF_INET, socket.SOCK_STREAM)
    listener.failures = list(failures)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    address = listener.getsockname()
    count = 40  # more than one batch between yields
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_socket, listener, _echo_once, nursery)
            clients = []
            for index in range(count):
                client = trio.socket.socket()
                await client.connect(address)
                await client.send(b"hello %d" % index)
                clients.append(client)
            for index, client in enumerate(clients):
                with client:
                    assert await client.recv(100) == b"hello %d" % index
            nursery.cancel_scope.cancel()
    assert listener.failures == []
    assert listener.fileno() == -1  # closed by serve_socket


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    return client, accepted


async def test_fast_socket_stream_moves_bytes_both_ways_and_sees_the_peer_close() -> None:
    left, right = _tcp_pair()
    a, b = FastSocketStream(left), FastSocketStream(right)
    big = os.urandom(4 * 1024 * 1024)  # more than the socket buffers: send_all must wait
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.send_all, big)
            got = bytearray()
            while len(got) < len(big):
                got += await b.receive_some()
        assert got == big
        a.send_nowait(b"tail")
        assert await b.receive_some(100) == b"tail"
        await a.send_eof()
        assert await b.receive_some(100) == b""  # the peer's EOF
        await a.aclose()
        await b.aclose()


async def _send_until_refused(stream: FastSocketStream) -> None:
    for _ in range(100):  # the first write after a reset may still be taken
        await stream.send_all(b"x" * 65536)


async def test_fast_socket_stream_failures_are_trio_errors() -> None:
    left, right = _tcp_pair()
    a, b = FastSocketStream(left), FastSocketStream(right)
    # A reset by the peer (SO_LINGER 0): receiving and sending raise BrokenResourceError.
    right.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    b.close()
    with trio.fail_after(10):
        with pytest.raises(trio.BrokenResourceError, match="receive failed"):
            await a.receive_some(100)
        with pytest.raises(trio.BrokenResourceError, match="send failed"):
            await _send_until_refused(a)
        a.close()
        with pytest.raises(trio.ClosedResourceError):
            await a.receive_some(100)
        with pytest.raises(trio.ClosedResourceError):
            await a.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):
            a.send_nowait(b"x")


async def test_fast_socket_stream_closed_while_a_task_waits_to_receive() -> None:
    left, right = _tcp_pair()
    a = FastSocketStream(left)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def close_soon() -> None:
                await trio.testing.wait_all_tasks_blocked()
                a.close()

            nursery.start_soon(close_soon)
            with pytest.raises(trio.ClosedResourceError):
                await a.receive_some(100)
    assert left.fileno() == -1
    right.close()


@pytest.mark.parametrize(
    ("direction", "primed"), [("receive", False), ("receive", True), ("send", False)]
)
async def test_fast_socket_stream_closed_between_wake_up_and_resume(
    direction: str, primed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Woken by the kernel, then closed by another task before it resumes: the descriptor may
    # already belong to a new connection, whose bytes must be neither read nor written.
    # (primed: a read waited before, so this one polls before it waits.)
    left, right = _tcp_pair()
    stream = FastSocketStream(left)
    if primed:
        await _receive_after_a_wait(stream, right)
    newcomers: list[socket.socket] = []  # the pair whose first socket got our descriptor
    spare: list[socket.socket] = []
    name = "wait_readable" if direction == "receive" else "wait_writable"
    real_wait = getattr(trio.lowlevel, name)

    async def wait_then_lose_the_fd(fd: int) -> None:
        await real_wait(fd)
        stream.close()  # another task, in the same batch
        for _ in range(10):  # new connections take the lowest free descriptors
            pair = socket.socketpair()
            spare.extend(pair)
            if fd in (pair[0].fileno(), pair[1].fileno()):
                newcomers.extend(pair if pair[0].fileno() == fd else pair[::-1])
                break
        assert newcomers, "no new socket took the freed descriptor"
        newcomers[1].send(b"another connection's secret")

    monkeypatch.setattr(trio.lowlevel, name, wait_then_lose_the_fd)
    try:
        with trio.fail_after(10):
            if direction == "receive":
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_send_later, right, b"for this stream")
                    with pytest.raises(trio.ClosedResourceError):
                        await stream.receive_some(100)
                assert newcomers[0].recv(100) == b"another connection's secret"  # unread
            else:
                right.setblocking(False)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_drain_later, right)
                    with pytest.raises(trio.ClosedResourceError):
                        await stream.send_all(b"x" * (8 * 1024 * 1024))
                newcomers[1].setblocking(False)
                with pytest.raises(BlockingIOError):
                    newcomers[1].recv(100)  # nothing of ours reached the newcomer
    finally:
        right.close()
        for sock in spare:
            sock.close()


async def _receive_after_a_wait(stream: FastSocketStream, peer: socket.socket) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_later, peer, b"first")
            assert await stream.receive_some(100) == b"first"


async def test_fast_socket_stream_polls_a_socket_whose_reads_wait_turn_by_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A read that raises BlockingIOError costs ~7 times a zero-timeout poll: after one read
    # had to wait, the next ones poll first, as long as they find nothing there; a read that
    # finds its bytes there goes back to reading at once.
    reads: list[str] = []
    real_read = tunnel2._sockets._read

    def counted_read(fd: int, size: int) -> bytes:
        try:
            data = real_read(fd, size)
        except BlockingIOError:
            reads.append("would block")
            raise
        reads.append("read")
        return data

    monkeypatch.setattr(tunnel2._sockets, "_read", counted_read)
    left, right = _tcp_pair()
    stream = FastSocketStream(left)
    with trio.fail_after(10):
        for turn in range(20):  # the peer answers only once the reader waits
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send_later, right, b"turn %d" % turn)
                assert await stream.receive_some(100) == b"turn %d" % turn
        assert reads == ["would block"] + ["read"] * 20
        reads.clear()
        right.send(b"ready")  # there before the read: one poll finds it, the read follows
        assert await stream.receive_some(100) == b"ready"
        right.send(b"again")
        assert await stream.receive_some(100) == b"again"  # read at once, no poll
        assert reads == ["read", "read"]
        # The peer's EOF and a reset while a read polls first.
        await _receive_after_a_wait(stream, right)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_close_later, right, False)
            assert await stream.receive_some(100) == b""
    stream.close()
    left, right = _tcp_pair()
    stream = FastSocketStream(left)
    with trio.fail_after(10):
        await _receive_after_a_wait(stream, right)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_close_later, right, True)
            with pytest.raises(trio.BrokenResourceError, match="receive failed"):
                await stream.receive_some(100)
        with pytest.raises(ValueError, match="at least 1"):
            await stream.receive_some(-1)
    stream.close()


async def _close_later(sock: socket.socket, reset: bool) -> None:
    await trio.testing.wait_all_tasks_blocked()
    if reset:  # SO_LINGER 0: the close sends RST
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


async def _send_later(sock: socket.socket, data: bytes) -> None:
    await trio.testing.wait_all_tasks_blocked()
    sock.send(data)


async def _drain_later(sock: socket.socket) -> None:
    await trio.testing.wait_all_tasks_blocked()
    with contextlib.suppress(BlockingIOError):
        while sock.recv(1 << 20):
            pass


async def test_fast_socket_stream_refuses_a_negative_size() -> None:
    left, right = _tcp_pair()
    stream = FastSocketStream(left)
    with pytest.raises(ValueError, match="at least 1"):
        await stream.receive_some(-1)
    stream.close()
    right.close()
