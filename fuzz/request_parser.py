"""Fuzz target 2: the request head parser against h11 as the oracle.

:func:`tunnel2._http11.parse_request_head` and :func:`~tunnel2._http11.request_framing` must
agree with ``h11.Connection(h11.SERVER)`` on every head: accept or reject, and for an accepted
head the method, target, version, headers (as h11 normalises them), framing, keep-alive and
where the head ends (a different end would desync a pipelined stream: request smuggling).
Where we refuse what h11 accepts, the reason must be one of the documented stricter choices in
the :mod:`tunnel2._http11` docstring (bare LF, obs-fold, versions other than 1.0/1.1, CL with
TE, TE in HTTP/1.0, a comma list in Content-Length) or the head size limit (431), and our
error message must say which. And :func:`~tunnel2._http11.find_head_end`, called as the entry
calls it on a growing buffer, finds the same end (or error) whatever the chunking.

Inputs are realistic but hostile heads: smuggling shapes (CL+TE, duplicate and conflicting CL,
odd TE values, whitespace before the colon, obs-fold, bare LF and CR), huge numbers, control
bytes, overlong lines and many fields, then random byte-level mutations of those.

Run: ``python -m fuzz.request_parser --seconds 300``.
"""

from __future__ import annotations

import re
import sys
from typing import Final, Literal

import h11
from h11._connection import _body_framing, _keep_alive
from hypothesis import strategies as st

from fuzz._campaign import Property, main
from tunnel2 import _http11
from tunnel2._http11 import (
    MAX_HEAD_SIZE,
    Framing,
    RequestHead,
    find_head_end,
    parse_request_head,
    request_framing,
)
from tunnel2.errors import RemoteProtocolError

# --- strategies -----------------------------------------------------------------------------

_CONTROL: Final = [bytes([b]) for b in [*range(0x00, 0x20), 0x7F, 0x80, 0xA0, 0xFF]]
_methods = st.sampled_from(
    [b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"CONNECT", b"PATCH", b"TRACE"] * 6
    + [b"get", b"M-SEARCH", b"G\x00T", b"GET\x7f", b"", b"\xc3\xa9", b"A" * 300, b"G(T"]
)
_targets = st.sampled_from(
    [b"/", b"/session/abc/x?y=1", b"*", b"http://h/p", b"h:443", b"/a%20b", b"//x", b"/?"] * 5
    + [b"", b"/a b", b"/\x7f", b"/\x80", b"/\t", b"/\x00", b"/%00"]
) | st.just(20000).map(lambda n: b"/" + b"a" * n)
_versions = st.sampled_from(
    [b"HTTP/1.1"] * 12
    + [b"HTTP/1.0"] * 4
    + [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"HTTP/9.9", b"http/1.1", b"HTTP/1", b"HTTP/1.10"]
    + [b"HTTP/1.1 ", b" HTTP/1.1", b"HTTP /1.1"]
)
_seps = st.sampled_from([b" "] * 30 + [b"  ", b"\t", b"", b" \x00 ", b"\x0b"])
_eols = st.sampled_from([b"\r\n"] * 40 + [b"\n", b"\r", b"\r\r\n", b"\n\r", b"\r\n\x00"])
_colons = st.sampled_from(
    [b": "] * 20 + [b":"] * 5 + [b" :", b"\t:", b" : ", b":\t", b"::", b"", b": \x00", b"\x0b:"]
)
_numbers = st.sampled_from(
    [
        *(b"0", b"5", b"05", b"5 ", b" 5", b"+5", b"-1", b"0x5", b"5, 5", b"5,5", b"5,6", b"1e3"),
        *(b"1" * 19, b"1" * 20, b"1" * 21, b"9" * 20, b"18446744073709551616", b"9" * 400),
        *(b"\xd9\xa5", b"5\x00", b"", b"5;", b"4294967296"),
    ]
) | st.integers(0, 2**70).map(lambda n: b"%d" % n)
_codings = st.sampled_from(
    [b"chunked"] * 8
    + [b"Chunked", b"CHUNKED", b" chunked", b"chunked ", b"xchunked", b"chunked, chunked"]
    + [b"gzip, chunked", b"chunked, gzip", b"identity", b"chunked;q=1", b"chunk", b"", b"\x00"]
    + [b"chunked\x0b", b'"chunked"', b"chunked,", b",chunked", b"gzip"]
)
_names = st.sampled_from(
    [b"Host", b"X-Foo", b"Accept", b"Cookie", b"User-Agent", b"Expect", b"Upgrade"] * 3
    + [b"Connection", b"Content-Length", b"Transfer-Encoding", b"content-length", b"TE"]
    + [b"Transfer_Encoding", b"Content Length", b"", b"X\x00", b"\xff", b"X-Foo ", b"Host\t"]
    + [b"(", b"Content-Length\x0b", b"\x7f"]
) | st.just(5000).map(lambda n: b"a" * n)
_values = (
    st.sampled_from(
        [b"example.com", b"*/*", b"a=1; b=2", b"close", b"keep-alive", b"upgrade", b"websocket"] * 2
        + [
            b"100-continue",
            b"a\x01b",
            b"a\x00b",
            b"a\rb",
            b"a\nb",
            b"a  \tb",
            b"",
            b" ",
            b"\x80\xff",
        ]
        + [b"keep-alive, close", b"Close", b"close, upgrade"]
    )
    | st.just(30000).map(lambda n: b"x" * n)
    | st.lists(st.sampled_from([*_CONTROL, b"a", b" ", b"\t", b",", b":"]), max_size=8).map(
        b"".join
    )
)


_GOOD_FIELDS: Final = [
    b"Accept: */*\r\n",
    b"User-Agent: fuzz/1.0\r\n",
    b"Cookie: a=1; b=\x01\r\n",
    b"X-Foo: bar  baz\r\n",
    b"Connection: keep-alive\r\n",
    b"Connection: close\r\n",
    b"Expect: 100-continue\r\n",
    b"Content-Length: 5\r\n",
    b"Transfer-Encoding: chunked\r\n",
]


@st.composite
def _field_line(draw: st.DrawFn, clean: bool) -> bytes:
    kind = draw(st.integers(0, 19))
    if clean and kind >= 5:
        return draw(st.sampled_from(_GOOD_FIELDS))
    if kind < 3:
        name, value = b"Content-Length", draw(_numbers)
    elif kind < 5:
        name, value = b"Transfer-Encoding", draw(_codings)
    elif kind < 6:
        # obs-fold: a continuation line, or a folded framing header
        return draw(st.sampled_from([b" x", b"\tchunked", b"  ", b" : 5"])) + draw(_eols)
    elif kind < 8:
        name = draw(st.sampled_from([b"Host", b"host", b"HOST"]))
        value = draw(st.sampled_from([b"example.com", b"a:80", b"", b"a b", b"[::1]:1", b"a,b"]))
    else:
        name, value = draw(_names), draw(_values)
    if clean:
        return name + b": " + value + b"\r\n"
    trail = draw(st.sampled_from([b""] * 6 + [b" ", b"\t"]))
    return name + draw(_colons) + value + trail + draw(_eols)


@st.composite
def _plain_head(draw: st.DrawFn) -> bytes:
    # Half the heads are clean but for their framing fields, so that many are accepted and
    # the comparison of what was parsed gets exercised, not only the verdicts.
    clean = draw(st.booleans())
    if clean:
        method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS"]))
        line = method + b" /p?q HTTP/" + draw(st.sampled_from([b"1.1"] * 5 + [b"1.0"])) + b"\r\n"
    else:
        line = draw(_methods) + draw(_seps) + draw(_targets) + draw(_seps) + draw(_versions)
        line += draw(_eols)
    lines = draw(st.lists(_field_line(clean), max_size=8))
    if draw(st.integers(0, 5)):
        host = draw(st.sampled_from([b"Host: example.com\r\n", b"host:x\r\n"]))
        lines.insert(draw(st.integers(0, len(lines))), host)
    many = draw(st.sampled_from([0] * 20 + [100, 2000]))
    lines += [b"X-%d: v\r\n" % i for i in range(many)]
    end = b"\r\n" if clean else draw(st.sampled_from([b"\r\n"] * 20 + [b"\n", b"", b"\r"]))
    tail = draw(st.sampled_from([b"", b"", b"hello", b"0\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n"]))
    return line + b"".join(lines) + end + tail


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with a few bytes replaced, cut or inserted (control bytes, CRLF, separators)."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        cut = draw(st.integers(0, 3))
        insert = draw(st.sampled_from([*_CONTROL, b"", b" ", b"\r\n", b":", b",", b"0"]))
        data[at : at + cut] = insert
    return bytes(data)


request_heads: Final = _plain_head().flatmap(
    lambda head: st.just(head) | mutated(head) if len(head) < 10000 else st.just(head)
)

# --- the oracle -----------------------------------------------------------------------------

Verdict = Literal["accept", "reject", "incomplete"]


def h11_request(data: bytes) -> tuple[h11.Request | None, int, str]:
    """h11's reading: (event or None, bytes of head it consumed, its error text)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=10 * len(data) + 1)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        return None, 0, str(exc)
    if event is h11.NEED_DATA:
        return None, 0, "need data"
    assert isinstance(event, h11.Request), event
    return event, len(data) - len(conn.trailing_data[0]), ""


def our_request(data: bytes) -> tuple[Verdict, RequestHead | RemoteProtocolError | None, int]:
    """Our reading, as the entry does it: (verdict, head or error, where the head ends)."""
    try:
        end = find_head_end(data)
        if end < 0:
            return "incomplete", None, -1
        head = parse_request_head(data[:end], max_size=MAX_HEAD_SIZE)
        request_framing(head)
    except RemoteProtocolError as exc:
        return "reject", exc, -1
    return "accept", head, end


def stricter_reasons(
    head: bytes, event: h11.Request | h11.Response | h11.InformationalResponse
) -> dict[str, str]:
    """Where we are deliberately stricter than h11: reason -> what our error message says."""
    reasons = {}
    if re.search(rb"(?<!\r)\n", head):
        reasons["bare LF line ending"] = "bare LF"
    if re.search(rb"\n[ \t]", head):
        reasons["obs-fold"] = "obs-fold"
    if event.http_version not in (b"1.0", b"1.1"):
        reasons["HTTP version not 1.0/1.1"] = "unsupported HTTP version"
    names = {name for name, _ in event.headers}
    if b"transfer-encoding" in names and b"content-length" in names:
        reasons["both CL and TE"] = "both Content-Length and Transfer-Encoding"
    if b"transfer-encoding" in names and event.http_version == b"1.0":
        reasons["TE in HTTP/1.0"] = "Transfer-Encoding in an HTTP/1.0"
    if re.search(rb"(?im)^content-length:[^\n]*,", head):
        reasons["comma list in Content-Length"] = "invalid Content-Length"
    lengths = [value for name, value in event.headers if name == b"content-length"]
    if any(len(value) > 19 for value in lengths):
        reasons["Content-Length over 19 digits"] = "must be 1 to 19 digits"
    if any(len(value) <= 19 and int(value) > 2**63 - 1 for value in lengths):
        reasons["Content-Length over 2**63-1"] = "over the limit of 2**63-1"
    tokens = sum(value.count(b",") + 1 for name, value in event.headers if name == b"connection")
    if tokens > _http11.MAX_CONNECTION_TOKENS:
        reasons["Connection over 32 tokens"] = "tokens, at most"
    if len(head) > MAX_HEAD_SIZE:
        reasons["head over the size limit"] = "limit"
    return reasons


def norm_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Our headers as h11 stores them: repeated Content-Length dropped, TE lower-cased."""
    out, seen_length = [], False
    for name, value in headers:
        lname = name.lower()
        if lname == b"content-length":
            if seen_length:
                continue
            seen_length = True
        if lname == b"transfer-encoding":
            value = value.lower()
        out.append((name, value))
    return out


def _norm_framing(framing: tuple[Framing, int]) -> tuple[str, int]:
    kind, length = framing
    if kind in (Framing.NONE, Framing.LENGTH):
        return ("length", length)
    return ("chunked", 0) if kind is Framing.CHUNKED else ("close", 0)


def _h11_framing(event: h11.Request) -> tuple[str, int]:
    kind, args = _body_framing(b"", event)
    if kind == "content-length":
        assert len(args) == 1
        return ("length", args[0])
    return ("chunked", 0) if kind == "chunked" else ("close", 0)


def _head_end_as_received(data: bytes, step: int) -> int | RemoteProtocolError:
    """Where the entry finds the head end when ``data`` arrives ``step`` bytes at a time
    (it rescans only the new bytes and the 3 before them), or the error it raises."""
    buf = bytearray()
    try:
        for at in range(0, len(data), step):
            chunk = data[at : at + step]
            buf += chunk
            end = find_head_end(buf, max(0, len(buf) - len(chunk) - 3))
            if end >= 0:
                return end
    except RemoteProtocolError as exc:
        return exc
    return -1


def check_request(data: bytes) -> None:
    """Our parser and h11 agree on ``data``, up to the documented stricter choices; and the
    head end is found the same whether ``data`` comes whole or a few bytes at a time."""
    whole = _head_end_as_received(data, max(1, len(data)))
    for step in (1, 7) if len(data) < 3000 else (997,):
        split = _head_end_as_received(data, step)
        assert repr(split) == repr(whole), (step, split, whole)
    event, h11_end, h11_error = h11_request(data)
    verdict, ours, end = our_request(data)
    if verdict == "accept":
        assert isinstance(ours, RequestHead)
        assert event is not None, f"we accept {data[:200]!r} that h11 refuses: {h11_error}"
        assert end == h11_end, f"head ends at {end}, h11 says {h11_end}"
        assert (ours.method, ours.target, ours.http_version) == (
            event.method,
            event.target,
            event.http_version,
        )
        assert norm_headers(ours.headers) == event.headers.raw_items()
        assert _norm_framing(request_framing(ours)) == _h11_framing(event)
        if ours.http_version == b"1.1":
            assert ours.keep_alive == _keep_alive(event)
    elif verdict == "reject":
        assert isinstance(ours, RemoteProtocolError)
        assert ours.status_hint in (400, 431, 501, 505), ours.status_hint
        if event is not None:
            reasons = stricter_reasons(data[:h11_end], event)
            assert reasons, f"refused {data[:200]!r} that h11 accepts: {ours}"
            assert any(text in str(ours) for text in reasons.values()), (reasons, str(ours))
    else:
        assert event is None, f"h11 found a request in {data[:200]!r}; we wait for more"


PROPERTIES: Final = (Property("request", request_heads, check_request),)

if __name__ == "__main__":
    sys.exit(main("request_parser", PROPERTIES))
