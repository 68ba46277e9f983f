"""Fuzz target 4: the relay fed hostile frames by a malicious agent.

Each case runs a relay with a well-behaved agent (its own session, an ASGI app) and a fake
agent that speaks frames directly over a memory transport: HELLO, then for every OPEN the
relay sends it, a scripted answer of response heads (valid, odd and malformed), DATA, END,
RESET, WINDOW, PING/PONG, GOAWAY, frames on other streams, raw garbage, pauses and an abrupt
close. A visitor sends one or two requests to the fake agent's session. Invariants:

* no ERROR record from a ``tunnel2`` logger, nothing raises out of the relay;
* the visitor reads valid HTTP/1.1 responses or a close (a response cut short by a close is
  a close; garbage never reaches it);
* the well-behaved agent's session still answers 200 afterwards, and once things settle no
  public connection or relay-side stream is left open.

Run: ``python -m fuzz.entry_agent --seconds 300``; ``--only agent_valid_heads`` restricts the
agent to response heads our parser accepts (what CI runs, see FINDINGS.md F5).
"""

from __future__ import annotations

import struct
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final, Literal

import attrs
import trio
import trio.testing
from hypothesis import strategies as st

from fuzz import _relay
from fuzz._campaign import Property, main
from fuzz._relay import Sent
from fuzz.request_parser import mutated
from tunnel2 import frames
from tunnel2.testing import MemoryTunnel, open_memory_tunnel
from tunnel2.transports import StreamTransport, memory_transport_pair
from tunnel2.uplink import receive_handshake_frame

# --- strategies -----------------------------------------------------------------------------

VALID_HEADS: Final = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\n",  # body until close
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 500 \r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 999 Odd\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 200\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n",
]
# Heads that parse but are wrong for the exchange: informational answers as final ones.
INFORMATIONAL_HEADS: Final = [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
]
MALFORMED_HEADS: Final = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n folded\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
    b"HTTP/2.0 200 OK\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"HTTP/1.1 099 Low\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
    b"garbage\r\n\r\n",
    b"\r\n\r\n",
]


@attrs.frozen
class Action:
    """One step of the fake agent's answer to an OPEN on stream ``sid``."""

    kind: Literal[
        "head",
        "data",
        "end",
        "reset",
        "window",
        "ping",
        "pong",
        "goaway",
        "raw",
        "other",
        "wait",
        "close",
    ]
    payload: bytes = b""
    number: int = 0

    def wire(self, sid: int) -> bytes:
        """The bytes this step sends (``wait`` and ``close`` send none)."""
        kind, number = self.kind, self.number
        if kind == "head":
            return _raw(0x10, self.payload, sid)  # raw: a head need not end in CRLF CRLF
        if kind == "data":
            return frames.encode(frames.Data(sid, self.payload))
        if kind == "end":
            return frames.encode(frames.End(sid))
        if kind == "reset":
            return frames.encode(frames.Reset(sid, number, "fuzz"))
        if kind == "window":
            increment = frames.MAX_WINDOW if number > 12 else 1 + number  # big: overflow
            return frames.encode(frames.Window(sid if number % 2 else 0, increment))
        if kind == "ping":
            return frames.encode(frames.Ping(b"12345678"))
        if kind == "pong":
            return frames.encode(frames.Pong(b"12345678"))
        if kind == "goaway":
            return frames.encode(frames.GoAway(sid, number % 3, "fuzz"))
        if kind == "other":  # a frame on a stream that is not this one
            other = [sid + 2, sid + 1, max(1, sid - 2), 2**32 - 1][number % 4]
            return [
                frames.encode(frames.Data(other, b"x")),
                frames.encode(frames.End(other)),
                frames.encode(frames.Open(other, VALID_HEADS[0])),
                frames.encode(frames.Reset(other, 1, "")),
            ][number // 4 % 4]
        if kind == "raw":
            return self.payload
        return b""


def _raw(ftype: int, payload: bytes, sid: int) -> bytes:
    return struct.pack("!IBBI", len(payload), ftype, 0, sid) + payload


# Long heads are built when drawn: hypothesis warns when a strategy's repr is huge.
_BIG_VALID: Final = st.just(20000).map(
    lambda n: b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * n + b"\r\nContent-Length: 5\r\n\r\n"
)
_BIG_MALFORMED: Final = st.just(70000).map(  # over MAX_HEAD_SIZE
    lambda n: b"HTTP/1.1 200 OK\r\nX-Long: " + b"v" * n + b"\r\n\r\n"
)

HeadKind = Literal["valid", "informational", "malformed"]


def _head_strategy(kind: HeadKind) -> st.SearchStrategy[bytes]:
    """Response heads: VALID_HEADS, plus INFORMATIONAL_HEADS (finding F7) or malformed ones:
    MALFORMED_HEADS, mutated valid heads and random bytes (finding F5). CI runs "valid"."""
    valid = st.sampled_from(VALID_HEADS) | _BIG_VALID
    if kind == "valid":
        return valid
    if kind == "informational":
        return valid | st.sampled_from(INFORMATIONAL_HEADS)
    junk = st.binary(max_size=60).map(lambda b: b + b"\r\n\r\n")
    malformed = st.sampled_from(MALFORMED_HEADS) | _BIG_MALFORMED
    return valid | malformed | st.sampled_from(VALID_HEADS).flatmap(mutated) | junk


def _actions(kind: HeadKind) -> st.SearchStrategy[list[Action]]:
    head = st.builds(Action, st.just("head"), _head_strategy(kind))
    body = st.sampled_from([b"hello", b"x", b"0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n"]) | st.just(
        70000
    ).map(lambda n: b"y" * n)
    step = st.one_of(
        st.builds(Action, st.just("data"), body | st.binary(min_size=1, max_size=30)),
        st.builds(Action, st.sampled_from(["end", "ping", "pong", "close"])),
        st.builds(
            Action,
            st.sampled_from(["reset", "goaway", "window", "other"]),
            number=st.integers(0, 15),
        ),
        st.builds(Action, st.just("wait"), number=st.sampled_from([0, 1, 12])),
        st.builds(Action, st.just("raw"), st.binary(min_size=1, max_size=30)),
    )
    common = st.lists(step, max_size=4)
    # Mostly: a head, then body and END, with odd steps mixed in.
    usual = st.tuples(
        common, head, st.lists(st.builds(Action, st.just("data"), body), max_size=2), common
    )
    return usual.map(lambda t: [*t[0], t[1], *t[2], Action("end"), *t[3]]) | st.lists(
        step | head, max_size=8
    )


_REQUESTS: Final = [
    (b"GET /session/@SID@/ HTTP/1.1\r\nHost: relay.test\r\n\r\n", [Sent()]),
    (b"HEAD /session/@SID@/ HTTP/1.1\r\nHost: relay.test\r\n\r\n", [Sent(b"HEAD")]),
    (
        b"POST /session/@SID@/ HTTP/1.1\r\nHost: relay.test\r\nContent-Length: 5\r\n\r\nhello",
        [Sent()],
    ),
    (
        b"POST /session/@SID@/ HTTP/1.1\r\nHost: relay.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        [Sent()],
    ),
    (b"GET /session/@SID@/ HTTP/1.0\r\n\r\n", [Sent()]),
    (
        b"GET /session/@SID@/ HTTP/1.1\r\nHost: relay.test\r\n\r\n"
        b"GET /session/@SID@/b HTTP/1.1\r\nHost: relay.test\r\n\r\n",
        [Sent(), Sent()],
    ),
    (
        b"GET /session/@SID@/ws HTTP/1.1\r\nHost: relay.test\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\n\r\n",
        [Sent(upgrade=True)],
    ),
]


@attrs.frozen
class AgentCase:
    """A request from the visitor and the fake agent's script for each OPEN it gets."""

    request: int  # index into _REQUESTS
    script: tuple[Action, ...]


def agent_cases(kind: HeadKind) -> st.SearchStrategy[AgentCase]:
    return st.builds(AgentCase, st.integers(0, len(_REQUESTS) - 1), _actions(kind).map(tuple))


# --- the fake agent ---------------------------------------------------------------------------


async def _fake_agent(
    transport: StreamTransport, script: tuple[Action, ...], hello_done: trio.Event, sid: list[str]
) -> None:
    """HELLO, then answer every OPEN with ``script``, reading whatever else comes.

    The relay's frames must always decode: a RemoteProtocolError here is a relay bug."""
    decoder = frames.FrameDecoder()
    try:
        await transport.send(frames.encode(frames.Hello()))
        welcome = await receive_handshake_frame(transport, decoder)
        assert isinstance(welcome, frames.Welcome), welcome
        decoder.max_frame_size = welcome.max_frame_size
        sid.append(welcome.session_id)
        hello_done.set()
        async with trio.open_nursery() as nursery:
            try:
                while data := await transport.receive():
                    decoder.receive_data(data)
                    while (frame := decoder.next_frame()) is not None:
                        if isinstance(frame, frames.Open):
                            nursery.start_soon(_answer, transport, script, frame.stream_id)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()
    finally:
        hello_done.set()
        await trio.aclose_forcefully(transport)


class _Closed(Exception):
    """A script step closed the connection."""


async def _answer(transport: StreamTransport, script: tuple[Action, ...], sid: int) -> None:
    try:
        for action in script:
            if action.kind == "wait":
                await trio.sleep(action.number)
            elif action.kind == "close":
                await trio.aclose_forcefully(transport)
                return
            else:
                await transport.send(action.wire(sid))
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
        pass  # closed by the relay or by another answer's "close"


# --- the check ----------------------------------------------------------------------------


# Finding F6 (fuzz/FINDINGS.md): once a response head is out, the entry waits for the body with
# no timeout and does not notice the client leaving, so an agent that stalls pins the public
# connection. The visitor gives up after VISITOR_PATIENCE; while this is True, a case where it
# had to is not checked for connections left open. Set to False once entry.py is fixed.
TOLERATE_F6_STALLED_BODY: Final = False
VISITOR_PATIENCE: Final = 120.0  # virtual seconds; longer than every relay timeout


async def visit(tunnel: MemoryTunnel, sid: str, data: bytes) -> tuple[bytes, bool]:
    """Send ``data`` on a new connection and read until EOF; return what was read and
    whether the visitor had to give up waiting."""
    client = tunnel.open_client_stream()
    received = bytearray()
    with trio.move_on_after(VISITOR_PATIENCE) as patience:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_relay.read_all, client, received)
            try:
                await client.send_all(data.replace(_relay.SID, sid.encode()))
                await client.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
    await client.aclose()
    return bytes(received), patience.cancelled_caught


@asynccontextmanager
async def open_fake_agent(tunnel: MemoryTunnel, script: tuple[Action, ...]) -> AsyncIterator[str]:
    """Connect a fake agent answering every OPEN with ``script`` to ``tunnel``'s relay, for
    the block; yields its session id."""
    ours, theirs = memory_transport_pair()
    hello_done = trio.Event()
    sid: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tunnel.server.handle_agent, theirs)
        nursery.start_soon(_fake_agent, ours, script, hello_done, sid)
        await hello_done.wait()
        assert sid, "the relay refused a plain HELLO"
        yield sid[0]
        nursery.cancel_scope.cancel()


def check_agent(case: AgentCase, *, tolerate_f5: bool = False) -> None:
    """See the module docstring; ``tolerate_f5`` lets the ERROR records of finding F5 pass."""
    data, sent = _REQUESTS[case.request]

    async def one_case() -> None:
        async with (
            open_memory_tunnel(_relay.app, config=_relay.CONFIG, asgi_loop="trio") as tunnel,
            open_fake_agent(tunnel, case.script) as sid,
        ):
            received, gave_up = await visit(tunnel, sid, data)
            answers = _relay.parse_responses(received, sent)
            assert len(answers.statuses) <= len(sent)
            response = await tunnel.request("GET", "/")
            assert response.status == 200, (response.status, response.body[:200])
            if not (gave_up and TOLERATE_F6_STALLED_BODY):
                await trio.sleep(_relay.SETTLE)
                assert tunnel.entry.connections == 0, f"{tunnel.entry.connections} left open"
                for uplink in tunnel.server.uplinks:
                    assert uplink.open_streams == 0, uplink

    _relay.run_case(one_case, tolerate_f5=tolerate_f5)


def check_agent_past_f5(case: AgentCase) -> None:
    """:func:`check_agent`, letting finding F5 pass so the campaign can look past it."""
    check_agent(case, tolerate_f5=True)


PROPERTIES: Final = (
    Property("agent_valid_heads", agent_cases("valid"), check_agent),
    Property("agent_informational", agent_cases("informational"), check_agent),
    Property("agent_malformed", agent_cases("malformed"), check_agent),
    Property("agent_malformed_past_f5", agent_cases("malformed"), check_agent_past_f5),
)

if __name__ == "__main__":
    sys.exit(main("entry_agent", PROPERTIES))
