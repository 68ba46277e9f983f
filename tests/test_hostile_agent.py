"""The relay against an agent that lies: a fake agent speaks frames directly.

The fake agent does the handshake itself (frames.Hello / Welcome) and answers each OPEN with
frames a test crafts, so it can send what no real agent would: malformed heads, interim
answers, a second head, more body than declared. Each runs over an in-memory transport and
over a real WebSocket on 127.0.0.1. Whatever the agent sends, the visitor gets an HTTP answer
that names the session and the kind of failure, the relay logs one WARNING without the bad
bytes, and the uplink and its other requests live on.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.testing

import tunnel2
from tunnel2 import frames
from tunnel2.agent import websocket_connector
from tunnel2.entry import ProxyEntry
from tunnel2.server import ServerConfig, TunnelServer
from tunnel2.testing import MEMORY_BASE_URL
from tunnel2.transports import FrameTransport, memory_transport_pair
from tunnel2.uplink import receive_handshake_frame

SESSION = "hostile"
SECRET = b"SECRET-BYTES"  # put into bad heads; must never reach the visitor or the log
OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"

# (stream id, request head) -> the frames the fake agent answers with.
Answer = Callable[[int, bytes], list[frames.Frame]]


def ok(stream_id: int) -> list[frames.Frame]:
    return [frames.Open(stream_id, OK_HEAD), frames.Data(stream_id, b"ok"), frames.End(stream_id)]


def answering(bad: list[frames.Frame] | Callable[[int], list[frames.Frame]]) -> Answer:
    """``/ok`` gets a good answer; every other request gets ``bad``."""

    def answer(stream_id: int, head: bytes) -> list[frames.Frame]:
        if head.startswith(b"GET /ok "):
            return ok(stream_id)
        return bad(stream_id) if callable(bad) else bad

    return answer


async def fake_agent(
    transport: FrameTransport,
    answer: Answer,
    max_frame_size: int,
    *,
    task_status: trio.TaskStatus[frames.Welcome] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Handshake, then answer every OPEN with ``answer``'s frames in one message."""
    hello = frames.Hello(
        token=None, session_id=SESSION, resume_key=None, max_frame_size=max_frame_size
    )
    await transport.send(frames.encode(hello))
    decoder = frames.FrameDecoder(max_frame_size=max_frame_size)
    welcome = await receive_handshake_frame(transport, decoder)
    assert isinstance(welcome, frames.Welcome)
    decoder.max_frame_size = welcome.max_frame_size
    task_status.started(welcome)
    while True:
        while (frame := decoder.next_frame()) is not None:
            if isinstance(frame, frames.Open):
                reply = answer(frame.stream_id, frame.head)
                await transport.send(b"".join(frames.encode(f) for f in reply))
        data = await transport.receive()
        if not data:
            return
        decoder.receive_data(data)


@attrs.define
class Relay:
    server: TunnelServer
    entry: ProxyEntry | None = None  # set for memory transports: clients are memory streams

    async def fetch(self, request: bytes) -> bytes:
        """Send a raw request on a new connection; everything until the relay closes it."""
        if self.entry is not None:
            client, server_side = trio.testing.memory_stream_pair()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.entry.handle_connection, server_side)
                data = await _send_and_read(client, request)
            return data
        host, port = self.server.base_url.removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        return await _send_and_read(stream, request)


async def _send_and_read(stream: trio.abc.Stream, request: bytes) -> bytes:
    try:
        await stream.send_all(request)
        received = bytearray()
        while chunk := await stream.receive_some(65536):
            received += chunk
        return bytes(received)
    finally:
        await stream.aclose()


@asynccontextmanager
async def hostile_relay(
    kind: str, answer: Answer, *, max_frame_size: int = 65536, **config: object
) -> AsyncIterator[Relay]:
    """A relay with one fake agent on session ``hostile``, over memory or real sockets."""
    async with trio.open_nursery() as nursery:
        if kind == "memory":
            server = TunnelServer(ServerConfig(**config), base_url=MEMORY_BASE_URL)  # type: ignore[arg-type]
            entry = ProxyEntry(server)
            nursery.start_soon(entry.run_timeouts)
            ours, theirs = memory_transport_pair()
            nursery.start_soon(server.handle_agent, theirs)
            await nursery.start(fake_agent, ours, answer, max_frame_size)
            yield Relay(server, entry=entry)
        else:
            server = await nursery.start(
                tunnel2.serve_tunnel_server,
                ServerConfig(port=0, **config),  # type: ignore[arg-type]
            )
            async with (
                websocket_connector(server.base_url)() as transport,
                trio.open_nursery() as agent_nursery,
            ):
                await agent_nursery.start(fake_agent, transport, answer, max_frame_size)
                yield Relay(server)
                agent_nursery.cancel_scope.cancel()  # before the transport closes
        nursery.cancel_scope.cancel()


def get(path: bytes, *fields: bytes) -> bytes:
    lines = [b"GET /session/%s%s HTTP/1.1" % (SESSION.encode(), path), b"Host: relay.test"]
    return b"\r\n".join([*lines, *fields, b"Connection: close", b"", b""])


def body_of(answer: bytes) -> bytes:
    return answer.partition(b"\r\n\r\n")[2]


async def assert_uplink_still_serves(relay: Relay) -> None:
    (uplink,) = relay.server.uplinks
    answer = await relay.fetch(get(b"/ok"))
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert body_of(answer) == b"ok"
    assert relay.server.uplinks == {uplink}
    assert not uplink.closed


TRANSPORTS = ["memory", "sockets"]

INVALID = b"an invalid response head"
BAD_HEADS = {
    "status-line": (b"HTTP/1.1 2OO " + SECRET + b"\r\n\r\n", INVALID),
    "nul-in-value": (b"HTTP/1.1 200 OK\r\nX-A: " + SECRET + b"\x00\r\n\r\n", INVALID),
    "cr-in-value": (b"HTTP/1.1 200 OK\r\nX-A: " + SECRET + b"\rx\r\n\r\n", INVALID),
    "lf-in-value": (b"HTTP/1.1 200 OK\r\nX-A: " + SECRET + b"\nx\r\n\r\n", INVALID),
    "two-heads-in-one": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 " + SECRET + b"\r\n\r\n",
        INVALID,
    ),
    "conflicting-length": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\nX: " + SECRET + b"\r\n\r\n",
        INVALID,
    ),
    "length-and-chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\nX: "
        + SECRET
        + b"\r\n\r\n",
        INVALID,
    ),
    "length-over-2**63": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 9223372036854775808\r\nX: " + SECRET + b"\r\n\r\n",
        INVALID,
    ),
    "length-digits": (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"1" * 500 + b"\r\n\r\n", INVALID),
    "connection-tokens": (
        b"HTTP/1.1 200 OK\r\nConnection: " + b"a," * 40 + SECRET + b"\r\n\r\n",
        INVALID,
    ),
    "version": (b"HTTP/2.0 200 " + SECRET + b"\r\n\r\n", INVALID),
    "100-continue": (
        b"HTTP/1.1 100 Continue\r\nX: " + SECRET + b"\r\n\r\n",
        b"an interim 100 response (interim answers are not forwarded)",
    ),
    "103-early-hints": (
        b"HTTP/1.1 103 Early Hints\r\nLink: " + SECRET + b"\r\n\r\n",
        b"an interim 103 response (interim answers are not forwarded)",
    ),
    "101-unasked": (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: "
        + SECRET
        + b"\r\n\r\n",
        b"101 Switching Protocols to a request that asked for no upgrade",
    ),
}


def assert_one_warning(caplog: pytest.LogCaptureFixture, stream_id: int) -> None:
    relay_records = [r for r in caplog.records if r.name.startswith("tunnel2.entry")]
    warnings = [r for r in relay_records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    (record,) = warnings
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    message = record.getMessage()
    assert f"session {SESSION} stream {stream_id}" in message
    assert SECRET.decode() not in message
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("name", list(BAD_HEADS))
async def test_malformed_response_head_is_502_and_the_uplink_lives(
    kind: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    head, failure = BAD_HEADS[name]
    with trio.fail_after(10):
        bad: list[frames.Frame] = [frames.Open(1, head), frames.End(1)]
        async with hostile_relay(kind, answering(bad)) as relay:
            caplog.set_level(logging.INFO)
            answer = await relay.fetch(get(b"/bad"))
            assert answer.startswith(b"HTTP/1.1 502 "), answer[:200]
            assert b"Connection: close" in answer
            assert body_of(answer) == b"502 Bad Gateway: session hostile: the agent sent %s\n" % (
                failure
            )
            assert SECRET not in answer
            assert_one_warning(caplog, 1)
            await assert_uplink_still_serves(relay)


def switching(stream_id: int, head: bytes) -> list[frames.Frame]:
    """A 101 to protocol ``x`` and raw bytes after it, whatever was asked."""
    return [
        frames.Open(
            stream_id,
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n",
        ),
        frames.Data(stream_id, b"raw bytes"),
        frames.End(stream_id),
    ]


async def test_101_to_an_upgrade_request_is_spliced() -> None:
    # The check above refuses only what was not asked for.
    with trio.fail_after(10):
        async with hostile_relay("memory", switching) as relay:
            request = b"GET /session/hostile/ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n"
            answer_bytes = await relay.fetch(request + b"Upgrade: x\r\n\r\n")
    assert answer_bytes.startswith(b"HTTP/1.1 101 ")
    assert answer_bytes.endswith(b"\r\n\r\nraw bytes")


async def test_upgrade_field_without_connection_upgrade_asks_for_nothing() -> None:
    # Connection does not name upgrade (here there is no Connection at all): the request is
    # an ordinary one (RFC 9110 §7.8). Its Upgrade line is cut as hop-by-hop, and a 101 to
    # it is refused.
    seen: list[bytes] = []

    def answer(stream_id: int, head: bytes) -> list[frames.Frame]:
        seen.append(head)
        return switching(stream_id, head)

    with trio.fail_after(10):
        async with hostile_relay("memory", answer) as relay:
            request = b"GET /session/hostile/ws HTTP/1.1\r\nHost: a\r\nUpgrade: x\r\n\r\n"
            answer_bytes = await relay.fetch(request)
    assert len(seen) == 1
    lower = seen[0].lower()
    assert b"\r\nupgrade:" not in lower
    assert b"\r\nconnection:" not in lower
    assert answer_bytes.startswith(b"HTTP/1.1 502 "), answer_bytes[:200]
    assert b"101 Switching Protocols to a request that asked for no upgrade" in answer_bytes
    assert b"raw bytes" not in answer_bytes


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_second_response_head_is_502_and_the_uplink_lives(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    # PROTOCOL.md §4.1: a second OPEN is an error of that stream, not of the connection.
    def bad(stream_id: int) -> list[frames.Frame]:
        second = b"HTTP/1.1 200 " + SECRET + b"\r\n\r\n"
        return [frames.Open(stream_id, OK_HEAD), frames.Open(stream_id, second)]

    with trio.fail_after(10):
        async with hostile_relay(kind, answering(bad)) as relay:
            caplog.set_level(logging.INFO)
            answer = await relay.fetch(get(b"/bad"))
            assert answer.startswith(b"HTTP/1.1 502 "), answer[:200]
            assert body_of(answer) == (
                b"502 Bad Gateway: session hostile: the agent sent a second response head\n"
            )
            warnings = [
                r
                for r in caplog.records
                if r.levelno >= logging.WARNING and "open relay" not in r.getMessage()
            ]
            assert len(warnings) == 1
            assert "second OPEN on stream 1" in warnings[0].getMessage()
            assert SECRET not in answer
            await assert_uplink_still_serves(relay)


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_more_body_than_declared_is_502(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    def bad(stream_id: int) -> list[frames.Frame]:
        return [frames.Open(stream_id, OK_HEAD), frames.Data(stream_id, SECRET), frames.End(1)]

    with trio.fail_after(10):
        async with hostile_relay(kind, answering(bad)) as relay:
            caplog.set_level(logging.INFO)
            answer = await relay.fetch(get(b"/bad"))
            assert answer.startswith(b"HTTP/1.1 502 "), answer[:200]
            assert b"session hostile: the agent sent more body than its response head declared" in (
                answer
            )
            assert SECRET not in answer
            assert_one_warning(caplog, 1)
            await assert_uplink_still_serves(relay)


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_request_head_over_the_frame_limit_is_431_for_that_request_alone(
    kind: str,
) -> None:
    # Legal for the relay (under max_head_size), but the agent accepts frames of 1024 bytes:
    # the relay must not build an OPEN its peer's decoder refuses (that would close the uplink).
    with trio.fail_after(10):
        async with hostile_relay(kind, answering(ok), max_frame_size=1024) as relay:
            (uplink,) = relay.server.uplinks
            assert uplink.max_frame_size == 1024
            answer = await relay.fetch(get(b"/ok", b"X-Big: " + b"b" * 1000))
            assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
            assert b"over the tunnel's frame limit of 1024" in answer
            assert b"session hostile" in answer
            await assert_uplink_still_serves(relay)
            # Just under the limit still goes through.
            answer = await relay.fetch(get(b"/ok", b"X-Big: " + b"b" * 700))
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
