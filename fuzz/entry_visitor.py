"""Fuzz target 3: a whole relay (entry, server, agent, ASGI app) fed hostile visitor bytes.

Each case runs a fresh :func:`tunnel2.testing.open_memory_tunnel` and sends one connection's
worth of bytes: pipelined requests (valid, smuggling-shaped, oversized, upgrades, the agents'
WebSocket path, hostile heads from :mod:`fuzz.request_parser`, random bytes), byte-mutated,
split into pieces with pauses (some past the idle timeout), then ends with EOF, an early close
or an abort after the first piece. Invariants:

* no ERROR record from a ``tunnel2`` logger (``entry connection failed unexpectedly`` is a
  bug: an exception escaped a connection task) and nothing raises out of the relay;
* what the client reads is a sequence of valid HTTP/1.1 responses (parsed by h11 as the
  client), one per request at most, nothing after a closing response, never cut mid-message;
  and without long pauses every request the entry could read gets its response unless an
  earlier response closed the connection;
* afterwards a normal request on a fresh connection gets 200, and once things settle no
  public connection or tunnel stream is left open.

Run: ``python -m fuzz.entry_visitor --seconds 300``.
"""

from __future__ import annotations

import itertools
import sys
from typing import Final, Literal

import attrs
import trio
from hypothesis import strategies as st

from fuzz import _relay
from fuzz._campaign import Property, main
from fuzz._relay import SID, Sent
from fuzz.request_parser import mutated, request_heads
from tunnel2 import _http11 as http
from tunnel2.errors import RemoteProtocolError
from tunnel2.server import AGENT_PATH
from tunnel2.testing import MemoryTunnel, open_memory_tunnel

# Finding F4 (fuzz/FINDINGS.md): a client that sends "Expect: 100-continue" and closes before
# the 100 goes out leaks the tunnel stream. While this is True, cases that close early carry no
# Expect field; set to False once entry.py is fixed.
TOLERATE_F4_EXPECT_LEAK: Final = False

# --- strategies -----------------------------------------------------------------------------

_paths = st.sampled_from(
    [b"/session/@SID@/", b"/session/@SID@/stream", b"/session/@SID@/empty", b"/session/@SID@/big"]
    * 3
    + [b"/session/@SID@?q=1", b"/session/@SID@", b"/session/nope/x", b"/", b"/session/"]
    + [b"/session//x", b"http://relay.test/session/@SID@/", AGENT_PATH.encode(), b"*"]
)
_extra_fields = st.sampled_from(
    [
        b"Connection: close\r\n",
        b"Connection: keep-alive\r\n",
        b"Connection: upgrade\r\nUpgrade: websocket\r\n",
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
        b"Expect: 100-continue\r\n",
        b"X-Forwarded-For: 1.2.3.4\r\n",
        b"Connection: X-Secret\r\nX-Secret: 1\r\n",
        b"Proxy-Connection: keep-alive\r\n",
        b"TE: trailers\r\n",
        b"Trailer: X-T\r\n",
        b"Host: other.test\r\n",
    ]
)
_bodies = (
    st.sampled_from([b"", b"hello"])
    | st.just(30000).map(lambda n: b"x" * n)  # over max_body_size
    | st.binary(max_size=40)
)
_chunked_bodies = st.sampled_from(
    [
        b"5\r\nhello\r\n0\r\n\r\n",
        b"0\r\n\r\n",
        b"5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
        b"5\r\nhelloXX0\r\n\r\n",  # chunk data not followed by CRLF
        b"ffffffffffffffffff\r\n",  # chunk size too long
        b"5 \r\nhello\r\n0\r\n\r\n",  # whitespace before CRLF
        b"-1\r\n",
        b"5\r\nhel",  # cut short
        b"0\r\n",  # no final CRLF
    ]
) | st.just(0x8000).map(lambda n: b"%x\r\n%b\r\n0\r\n\r\n" % (n, b"y" * n))  # over the limit


@st.composite
def _request(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(request_heads)
    if kind == 1:
        return draw(st.binary(max_size=200))
    method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"DELETE"]))
    version = draw(st.sampled_from([b"1.1"] * 5 + [b"1.0"]))
    head = method + b" " + draw(_paths) + b" HTTP/" + version + b"\r\n"
    if draw(st.integers(0, 9)):
        head += b"Host: relay.test\r\n"
    head += b"".join(draw(st.lists(_extra_fields, max_size=3)))
    framing = draw(st.integers(0, 3))
    if framing == 1:
        body = draw(_bodies)
        length = draw(st.sampled_from([len(body)] * 6 + [len(body) + 3, max(0, len(body) - 2)]))
        return head + b"Content-Length: %d\r\n\r\n" % length + body
    if framing == 2:
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + draw(_chunked_bodies)
    return head + b"\r\n"


Ending = Literal["eof", "close", "abort"]
_ENDINGS: Final[list[Ending]] = ["eof", "eof", "eof", "eof", "eof", "eof", "close", "abort"]


@attrs.frozen
class VisitorCase:
    """One connection's worth of visitor behaviour."""

    data: bytes
    cuts: tuple[int, ...]
    pauses: tuple[float, ...]  # virtual seconds to wait after each piece
    ending: Ending

    def pieces(self, session_id: bytes) -> list[bytes]:
        data = self.data.replace(SID, session_id)
        bounds = [0, *(min(c, len(data)) for c in self.cuts), len(data)]
        return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@st.composite
def visitor_cases(draw: st.DrawFn) -> VisitorCase:
    data = b"".join(draw(st.lists(_request(), min_size=1, max_size=4)))
    if draw(st.integers(0, 3)) == 0 and len(data) < 5000:
        data = draw(mutated(data))
    cuts = tuple(sorted(draw(st.lists(st.integers(0, len(data)), max_size=5))))
    pauses = tuple(
        draw(st.lists(st.sampled_from([0.0] * 8 + [1.0, 12.0]), min_size=len(cuts) + 1))[
            : len(cuts) + 1
        ]
    )
    ending = draw(st.sampled_from(_ENDINGS))
    if TOLERATE_F4_EXPECT_LEAK and ending != "eof":
        data = data.replace(b"Expect: 100-continue\r\n", b"")
    return VisitorCase(data, cuts, pauses, ending)


# --- a model of what the entry can answer ------------------------------------------------------


def model(data: bytes, max_head_size: int) -> list[Sent]:
    """The requests the entry reads from ``data`` followed by EOF, in order, each of which
    it must answer (or close before): a bad or oversized head is answered once and ends the
    connection, a bad or cut-short body too, and a request that does not keep the
    connection alive is the last."""
    buf = bytearray(data)
    sent: list[Sent] = []
    while buf:
        try:
            end = http.find_head_end(buf)
        except RemoteProtocolError:
            sent.append(Sent())
            break
        if end < 0:
            if len(buf) > max_head_size:
                sent.append(Sent())  # 431
            break
        head = http.take(buf, end)
        try:
            request = http.parse_request_head(head, max_size=max_head_size)
            framing, length = http.request_framing(request)
        except RemoteProtocolError:
            sent.append(Sent(head.split(b" ", 1)[0]))
            break
        upgrade = (request.get(b"upgrade") or b"").lower() == b"websocket"
        sent.append(Sent(request.method, upgrade))
        if upgrade and request.target.startswith(AGENT_PATH.encode()):
            break  # the rest belongs to the agents' WebSocket
        reader = http.make_body_reader(framing, length)
        try:
            while buf and not reader.done:
                before = len(buf)
                reader.read(buf)
                if len(buf) == before:
                    break
        except RemoteProtocolError:
            break
        if not reader.done or not request.keep_alive:
            break
    return sent


# --- the check ----------------------------------------------------------------------------


async def healthy(tunnel: MemoryTunnel) -> None:
    """A normal request on a fresh connection still gets 200."""
    response = await tunnel.request("GET", "/")
    assert response.status == 200, (response.status, response.body[:200])
    assert response.body == b"ok 0", response.body[:200]


async def settled(tunnel: MemoryTunnel) -> None:
    """Once every timeout has passed, nothing is left open."""
    await trio.sleep(_relay.SETTLE)
    assert tunnel.entry.connections == 0, f"{tunnel.entry.connections} connections left open"
    for uplink in tunnel.server.uplinks:
        assert uplink.open_streams == 0, uplink


async def _send(client: trio.abc.HalfCloseableStream, case: VisitorCase, sid: bytes) -> None:
    pieces = case.pieces(sid)
    try:
        for piece, pause in zip(pieces, case.pauses, strict=False):
            await client.send_all(piece)
            if case.ending == "abort":
                break
            await trio.sleep(pause)
        if case.ending == "eof":
            await client.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def check_visitor(case: VisitorCase) -> None:
    """See the module docstring."""

    async def one_case() -> None:
        async with open_memory_tunnel(_relay.app, config=_relay.CONFIG, asgi_loop="trio") as tunnel:
            assert tunnel.agent.session_id is not None
            sid = tunnel.agent.session_id.encode()
            client = tunnel.open_client_stream()
            received = bytearray()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_relay.read_all, client, received)
                await _send(client, case, sid)
                if case.ending != "eof":
                    await client.aclose()
            await client.aclose()
            if case.ending == "eof":
                data = case.data.replace(SID, sid)
                answers = _relay.parse_responses(
                    bytes(received), model(data, _relay.CONFIG.max_head_size)
                )
                assert not answers.truncated, f"response cut short: {bytes(received)[-200:]!r}"
                if not any(case.pauses):
                    expected = len(model(data, _relay.CONFIG.max_head_size))
                    assert len(answers.statuses) == expected or answers.closing, (
                        f"{len(answers.statuses)} responses to {expected} requests, "
                        f"and the last did not close: {bytes(received)[-300:]!r}"
                    )
            await healthy(tunnel)
            await settled(tunnel)

    _relay.run_case(one_case)


PROPERTIES: Final = (Property("visitor", visitor_cases(), check_visitor),)

if __name__ == "__main__":
    sys.exit(main("entry_visitor", PROPERTIES))
