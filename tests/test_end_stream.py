"""END_STREAM (PROTOCOL.md §2.1): OPEN and DATA may carry the flag instead of an END frame
after them, once HELLO and WELCOME agreed on the ``end_stream`` capability.

The codec, then each side against a peer that speaks the frames directly: a relay and an
agent that both have it use it both ways; against an agent or a relay from before it, or one
that did not ask for it, nothing is flagged and a flag is a protocol error.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from tunnel2 import frames
from tunnel2.agent import Agent
from tunnel2.entry import ProxyEntry
from tunnel2.errors import ErrorCode, RemoteProtocolError
from tunnel2.server import ServerConfig, TunnelServer
from tunnel2.testing import MEMORY_BASE_URL
from tunnel2.transports import FrameTransport, memory_transport_pair
from tunnel2.uplink import TunnelStream, receive_handshake_frame

_HEADER = struct.Struct("!IBBI")
HEAD = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
NO_BODY = b"HTTP/1.1 204 No Content\r\n\r\n"


def split_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of each frame in ``data``, read from the bytes."""
    out = []
    while data:
        length, ftype, flags, sid = _HEADER.unpack_from(data)
        out.append((ftype, flags, sid, data[10 : 10 + length]))
        data = data[10 + length :]
    return out


# --- the codec ------------------------------------------------------------------------------


def test_the_flag_on_the_wire() -> None:
    # DATA "hello" on stream 1 with END_STREAM: the worked example of §2, flags = 0x01.
    wire = bytes.fromhex("00000005 11 01 00000001 68656c6c6f")
    assert frames.encode(frames.Data(1, b"hello", end=True)) == wire
    assert frames.encode_data(1, b"hello", end=True) == wire
    assert frames.encode_open(3, HEAD, end=True)[4:6] == b"\x10\x01"
    assert frames.encode(frames.Open(3, HEAD, end=True)) == frames.encode_open(3, HEAD, True)
    assert frames.encode_open(3, HEAD)[4:6] == b"\x10\x00"


def test_a_decoder_that_agreed_on_it_reads_the_flag_as_an_end() -> None:
    decoder = frames.FrameDecoder()
    decoder.end_stream = True
    decoder.receive_data(
        frames.encode_open(1, HEAD, end=True)
        + frames.encode_open(3, HEAD)
        + frames.encode_data(3, b"body", end=True)
    )
    assert decoder.next_items() == [
        (frames.TYPE_OPEN, 1, HEAD),
        (frames.TYPE_END, 1, b""),
        (frames.TYPE_OPEN, 3, HEAD),
        (frames.TYPE_DATA, 3, b"body"),
        (frames.TYPE_END, 3, b""),
    ]
    decoder.receive_data(frames.encode_data(5, b"x", end=True) + frames.encode_open(7, HEAD))
    assert decoder.next_frame() == frames.Data(5, b"x", end=True)
    assert decoder.next_frame() == frames.Open(7, HEAD)
    assert decoder.next_frame() is None


@pytest.mark.parametrize(
    ("wire", "agreed"),
    [
        (frames.encode_open(1, HEAD, end=True), False),  # not negotiated
        (frames.encode_data(1, b"x", end=True), False),
        (_HEADER.pack(0, frames.TYPE_END, 0x01, 1), True),  # END has no flags
        (_HEADER.pack(4, 0x14, 0x01, 0) + b"\x00\x00\x00\x01", True),  # nor WINDOW
        (_HEADER.pack(8, 0x20, 0x01, 0) + b"12345678", True),  # nor PING
        (_HEADER.pack(1, frames.TYPE_DATA, 0x02, 1) + b"x", True),  # an unknown flag
        (_HEADER.pack(1, frames.TYPE_DATA, 0x03, 1) + b"x", True),
        (_HEADER.pack(0, frames.TYPE_DATA, 0x01, 1), True),  # empty DATA, flagged or not
        (_HEADER.pack(3, frames.TYPE_OPEN, 0x01, 1) + b"GET", True),  # not a whole head
        (_HEADER.pack(len(HEAD), frames.TYPE_OPEN, 0x01, 0) + HEAD, True),  # stream 0
    ],
)
def test_a_flag_anywhere_else_is_a_protocol_error(wire: bytes, agreed: bool) -> None:
    decoder = frames.FrameDecoder()
    decoder.end_stream = agreed
    decoder.receive_data(wire)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_items()
    assert info.value.code == ErrorCode.PROTOCOL_ERROR


def welcome_frame(**extra: object) -> bytes:
    """A WELCOME as a relay from before capabilities writes it (no such key), plus ``extra``."""
    fields = {
        "session_id": "s",
        "public_urls": ["http://relay.test/session/s/"],
        "resume_key": "r",
        "max_frame_size": 65536,
        "initial_window": 65536,
        "connection_window": 65536,
        "ping_interval": 0,
        **extra,
    }
    payload = b"\x00\x01" + json.dumps(fields).encode()
    return _HEADER.pack(len(payload), 0x02, 0, 0) + payload


def test_a_welcome_from_a_relay_before_capabilities_has_none() -> None:
    decoder = frames.FrameDecoder()
    decoder.receive_data(welcome_frame())
    welcome = decoder.next_frame()
    assert isinstance(welcome, frames.Welcome)
    assert welcome.capabilities == ()
    decoder = frames.FrameDecoder()
    decoder.receive_data(welcome_frame(capabilities="end_stream"))
    with pytest.raises(RemoteProtocolError, match="capabilities"):
        decoder.next_frame()


# --- the relay against an agent that speaks frames ------------------------------------------


class RawAgent:
    """An agent doing the handshake itself; it keeps every byte the relay sends it."""

    def __init__(self, transport: FrameTransport, capabilities: tuple[str, ...]) -> None:
        self.transport = transport
        self.capabilities = capabilities
        self.received = bytearray()
        self.welcome: frames.Welcome | None = None

    async def handshake(self) -> None:
        hello = frames.Hello(session_id="raw", capabilities=self.capabilities)
        await self.transport.send(frames.encode(hello))
        welcome = await receive_handshake_frame(self.transport, frames.FrameDecoder())
        assert isinstance(welcome, frames.Welcome)
        self.welcome = welcome

    async def next_request(self) -> list[tuple[int, int, int, bytes]]:
        """The frames of the next request, up to its END (flagged or a frame of its own)."""
        while True:
            parsed = split_frames(bytes(self.received))
            if any(t == frames.TYPE_END or flags & 1 for t, flags, _, _ in parsed):
                self.received.clear()
                return parsed
            self.received += await self.transport.receive()


@asynccontextmanager
async def relay_with(capabilities: tuple[str, ...]) -> AsyncIterator[tuple[ProxyEntry, RawAgent]]:
    async with trio.open_nursery() as nursery:
        server = TunnelServer(ServerConfig(ping_interval=0), base_url=MEMORY_BASE_URL)
        entry = ProxyEntry(server)
        nursery.start_soon(entry.run_timeouts)
        ours, theirs = memory_transport_pair()
        nursery.start_soon(server.handle_agent, theirs)
        agent = RawAgent(ours, capabilities)
        await agent.handshake()
        yield entry, agent
        nursery.cancel_scope.cancel()


async def fetch(
    entry: ProxyEntry, request: bytes, agent: RawAgent, answer: bytes
) -> tuple[list[tuple[int, int, int, bytes]], bytes]:
    """A visitor's request through ``entry``; the raw agent answers with ``answer``."""
    client, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(entry.handle_connection, server_side)
        await client.send_all(request)
        got = await agent.next_request()
        await agent.transport.send(answer)
        response = bytearray()
        while chunk := await client.receive_some(65536):
            response += chunk
    return got, bytes(response)


VISIT = b"GET /session/raw/ HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\r\n"


async def test_a_relay_and_an_agent_that_agree_flag_the_last_frame_both_ways() -> None:
    async with relay_with(frames.CAPABILITIES) as (entry, agent):
        assert agent.welcome is not None
        assert agent.welcome.capabilities == (frames.END_STREAM,)
        # The bodiless request: one OPEN, flagged, and no END frame.
        answer = frames.encode_open(1, OK) + frames.encode_data(1, b"ok", end=True)
        got, response = await fetch(entry, VISIT, agent, answer)
        assert [(t, flags) for t, flags, _, _ in got] == [(frames.TYPE_OPEN, 1)]
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")
        assert response.endswith(b"\r\n\r\nok")
        # A bodiless answer as one flagged OPEN.
        got, response = await fetch(entry, VISIT, agent, frames.encode_open(3, NO_BODY, True))
        assert got[0][2] == 3
        assert response.startswith(b"HTTP/1.1 204 No Content\r\n")
        # A request with a body: its last DATA is flagged (the body pump sends END alone
        # when the body ends after its last bytes went out: either is allowed).
        post = b"POST /session/raw/ HTTP/1.1\r\nHost: relay.test\r\nContent-Length: 4\r\n"
        got, response = await fetch(
            entry,
            post + b"Connection: close\r\n\r\nbody",
            agent,
            frames.encode_open(5, NO_BODY, end=True),
        )
        assert b"".join(p for t, _, _, p in got if t == frames.TYPE_DATA) == b"body"
        assert [t for t, _, _, _ in got].count(frames.TYPE_END) + sum(f for _, f, _, _ in got) == 1
        assert response.startswith(b"HTTP/1.1 204 No Content\r\n")


@pytest.mark.parametrize("capabilities", [(), ("something-else",)])
async def test_an_agent_that_did_not_ask_gets_end_frames_and_may_not_flag(
    capabilities: tuple[str, ...],
) -> None:
    async with relay_with(capabilities) as (entry, agent):
        assert agent.welcome is not None
        assert agent.welcome.capabilities == ()
        answer = frames.encode_open(1, OK) + frames.encode_data(1, b"ok") + frames.encode_end(1)
        got, response = await fetch(entry, VISIT, agent, answer)
        assert [(t, flags) for t, flags, _, _ in got] == [
            (frames.TYPE_OPEN, 0),
            (frames.TYPE_END, 0),
        ]
        assert response.endswith(b"\r\n\r\nok")
        # A flag it did not negotiate ends the uplink (PROTOCOL_ERROR): the visitor gets a
        # 502 that says the agent went away.
        got, response = await fetch(entry, VISIT, agent, frames.encode_open(3, NO_BODY, True))
        assert response.startswith(b"HTTP/1.1 502 "), response
        assert b"disconnected" in response


# --- the agent against a relay that speaks frames -------------------------------------------


async def answer_ok(stream: TunnelStream) -> int:
    stream.send_head(OK, b"ok", end=True)
    return 200


async def answer_no_body(stream: TunnelStream) -> int:
    stream.send_head(NO_BODY, end=True)
    return 204


@pytest.mark.parametrize("relay_speaks_it", [True, False])
async def test_the_agent_flags_only_for_a_relay_that_agreed(relay_speaks_it: bool) -> None:
    ours, theirs = memory_transport_pair()

    @asynccontextmanager
    async def connect() -> AsyncIterator[FrameTransport]:
        yield theirs

    for handler, expected in [(answer_ok, b"ok"), (answer_no_body, None)]:
        agent = Agent(connect, handler)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.serve)
            decoder = frames.FrameDecoder()
            hello = await receive_handshake_frame(ours, decoder)
            assert isinstance(hello, frames.Hello)
            assert frames.END_STREAM in hello.capabilities
            if relay_speaks_it:
                await ours.send(welcome_frame(capabilities=[frames.END_STREAM]))
            else:
                await ours.send(welcome_frame())  # an older relay: no such key
            if relay_speaks_it:
                await ours.send(frames.encode_open(1, HEAD, end=True))
            else:
                await ours.send(frames.encode_open(1, HEAD) + frames.encode_end(1))
            received = b""
            while not any(
                t == frames.TYPE_END or flags for t, flags, _, _ in split_frames(received)
            ):
                received += await ours.receive()
            got = [(t, flags) for t, flags, _, _ in split_frames(received)]
            if expected is not None:
                data = [p for t, _, _, p in split_frames(received) if t == frames.TYPE_DATA]
                assert data == [expected]
                assert got == (
                    [(frames.TYPE_OPEN, 0), (frames.TYPE_DATA, 1)]
                    if relay_speaks_it
                    else [(frames.TYPE_OPEN, 0), (frames.TYPE_DATA, 0), (frames.TYPE_END, 0)]
                )
            else:
                assert got == (
                    [(frames.TYPE_OPEN, 1)]
                    if relay_speaks_it
                    else [(frames.TYPE_OPEN, 0), (frames.TYPE_END, 0)]
                )
            nursery.cancel_scope.cancel()
        ours, theirs = memory_transport_pair()
