"""Tests for :mod:`tunnel2.transports`: byte strings in, byte strings out, trio's error meanings.

StreamTransport runs over trio's memory streams; WsprotoTransport over a connected socket pair
(and over TLS in ``tests/test_tls.py``).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import pytest
import trio
import trio.testing
import wsproto.events

from tunnel2 import frames
from tunnel2._sockets import FastSocketStream
from tunnel2.transports import (
    FrameTransport,
    StreamTransport,
    WsprotoTransport,
    accept_websocket,
    connect_websocket,
    lockstep_transport_pair,
    memory_transport_pair,
)
from tunnel2.uplink import open_uplink

# Bounds hangs only: each test takes milliseconds.
TIMEOUT: Final = 2


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


def is_pending(transport: WsprotoTransport) -> bool:
    return transport.pending


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
