"""Tests for tunnel2._http11: unit tests per rule, and property tests with h11 as the oracle."""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import h11
import pytest
from h11._connection import _body_framing, _keep_alive
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.request_parser import norm_headers, stricter_reasons
from tunnel2 import _http11
from tunnel2._http11 import (
    LAST_CHUNK,
    MAX_HEAD_SIZE,
    BodyReader,
    Framing,
    RequestHead,
    ResponseHead,
    encode_chunk,
    find_head_end,
    make_body_reader,
    parse_request_head,
    parse_response_head,
    request_framing,
    response_framing,
)
from tunnel2.errors import LocalProtocolError, RemoteProtocolError

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ORACLE = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def request(*lines: bytes, start: bytes = b"GET / HTTP/1.1") -> bytes:
    return b"\r\n".join((start, *lines)) + b"\r\n\r\n"


def response(*lines: bytes, start: bytes = b"HTTP/1.1 200 OK") -> bytes:
    return b"\r\n".join((start, *lines)) + b"\r\n\r\n"


def feed(reader: BodyReader, buf: bytearray, pieces: list[bytes]) -> bytes:
    """Append each piece to ``buf`` and read after each, as a receive loop does."""
    out = []
    for piece in pieces:
        buf += piece
        out.append(reader.read(buf))
    return b"".join(out)


def _done(reader: BodyReader) -> bool:
    # A call, so that mypy does not narrow reader.done across the read() calls between asserts.
    return reader.done


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    pieces, last = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[last:point])
        last = point
    return pieces


# --- module rules ----------------------------------------------------------------------------


def test_module_imports_only_stdlib_and_errors() -> None:
    tree = ast.parse(Path(_http11.__file__).with_name("_http11.py").read_text())  # or compiled
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.module is not None
            imported.add(node.module)
    allowed = {"__future__", "attrs", "tunnel2.errors"}
    bad = {
        name
        for name in imported
        if name not in allowed and name.split(".")[0] not in sys.stdlib_module_names
    }
    assert not bad
    assert "logging" not in imported
    assert "trio" not in imported


def test_all_names_exist() -> None:
    assert sorted(_http11.__all__) == sorted(set(_http11.__all__))
    for name in _http11.__all__:
        assert hasattr(_http11, name), name


# --- find_head_end -----------------------------------------------------------------------------


def test_find_head_end() -> None:
    head = request(b"Host: a")
    assert find_head_end(head) == len(head)
    assert find_head_end(head + b"body") == len(head)
    assert find_head_end(head[:-1]) == -1
    assert find_head_end(b"") == -1


def test_find_head_end_with_start_finds_a_split_terminator() -> None:
    head = request(b"Host: a")
    buf = bytearray()
    found = -1
    for i in range(len(head)):
        previous = len(buf)
        buf += head[i : i + 1]
        found = find_head_end(buf, max(0, previous - 3))
        if found >= 0:
            break
    assert found == len(head)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"GET / HTTP/1.1\r\nHost: a\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n\n",
        b"GET / HTTP/1.1\r\n\n",
    ],
)
def test_find_head_end_refuses_bare_lf_blank_line(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="bare LF") as info:
        find_head_end(data)
    assert info.value.status_hint == 400


def test_find_head_end_ignores_bare_lf_after_the_head() -> None:
    head = request(b"Host: a")
    assert find_head_end(head + b"\n\n") == len(head)


@given(
    st.lists(st.sampled_from([b"\r", b"\n", b"a", b":", b"\r\n"]), max_size=24), st.integers(0, 30)
)
def test_find_head_end_agrees_with_the_step_by_step_search(parts: list[bytes], start: int) -> None:
    # The one-regex search against the three-find form it replaced (kept for a CRLF CRLF
    # that began before `start`): the same index or the same error, for any start.
    buf = b"".join(parts)
    results: list[int | str] = []
    for find in (find_head_end, _http11._find_head_end):
        try:
            results.append(find(buf, start))
        except RemoteProtocolError as exc:
            results.append(str(exc))
    assert results[0] == results[1]


# --- request heads: accepted ---------------------------------------------------------------------


def test_parse_request_head_fields() -> None:
    head = parse_request_head(
        request(
            b"Host: example.com",
            b"X-Empty:",
            b"x-tabs:\t a \t b\t ",
            b"X-Rep: 1",
            b"x-rep: 2",
            b"Cookie: \x01\x7f\x80\xff",
            start=b"POST /a?b=c HTTP/1.1",
        )
    )
    assert head.method == b"POST"
    assert head.target == b"/a?b=c"
    assert head.http_version == b"1.1"
    assert head.headers == [
        (b"Host", b"example.com"),
        (b"X-Empty", b""),
        (b"x-tabs", b"a \t b"),
        (b"X-Rep", b"1"),
        (b"x-rep", b"2"),
        (b"Cookie", b"\x01\x7f\x80\xff"),
    ]
    assert head.get(b"host") == b"example.com"
    assert head.get(b"x-rep") == b"1"
    assert head.get_all(b"x-rep") == [b"1", b"2"]
    assert head.get(b"absent") is None
    assert head.get_all(b"absent") == []
    assert request_framing(head) == (Framing.NONE, 0)


@pytest.mark.parametrize(
    "target", [b"*", b"http://example.com/x?y#z", b"example.com:443", b"/%00~!$&'()*+,;="]
)
def test_parse_request_targets(target: bytes) -> None:
    start = b"OPTIONS " + target + b" HTTP/1.1"
    assert parse_request_head(request(b"Host: a", start=start)).target == target


def test_host_is_matched_by_whole_name() -> None:
    head = parse_request_head(request(b"X-Forwarded-Host: b", b"Host: a", b"Ghost: c"))
    assert head.get(b"host") == b"a"
    with pytest.raises(RemoteProtocolError, match="missing Host header"):
        parse_request_head(request(b"X-Forwarded-Host: b"))


def test_http10_request_needs_no_host() -> None:
    head = parse_request_head(request(start=b"GET / HTTP/1.0"))
    assert head.http_version == b"1.0"
    assert head.headers == []


def _unset_slots(head: object) -> list[str]:
    slots = [name for cls in type(head).__mro__ for name in getattr(cls, "__slots__", ())]
    return [name for name in slots if not hasattr(head, name)]


@pytest.mark.parametrize(
    "fields",
    [
        [b"Host: a"],  # the parser's early return
        [b"Host: a", b"Connection: close"],
        [b"Host: a", b"Content-Length: 3"],
        [b"Host: a", b"Transfer-Encoding: chunked"],
        [b"Host: a", b"Connection: keep-alive, X-Hop", b"X-Hop: 1"],
    ],
)
def test_parsed_heads_set_every_slot(fields: list[bytes]) -> None:
    # The parsers build heads without __init__ (object.__new__) and set each slot by hand:
    # a slot added later and missed on one path would fail only there.
    assert _unset_slots(parse_request_head(request(*fields))) == []
    response = parse_response_head(
        b"HTTP/1.1 200 OK\r\n" + b"".join(f + b"\r\n" for f in fields[1:]) + b"\r\n"
    )
    assert _unset_slots(response) == []
    for built in (RequestHead(b"GET", b"/", b"1.1", []), ResponseHead(b"1.1", 200, b"OK", [])):
        assert _unset_slots(built) == []


def test_request_head_equality_and_repr() -> None:
    a = parse_request_head(request(b"Host: a"))
    b = RequestHead(b"GET", b"/", b"1.1", [(b"Host", b"a")])
    assert a == b
    assert a != RequestHead(b"GET", b"/x", b"1.1", [(b"Host", b"a")])
    assert a != "GET"
    assert repr(a) == (
        "RequestHead(method=b'GET', target=b'/', http_version=b'1.1', headers=[(b'Host', b'a')])"
    )
    with pytest.raises(AttributeError):
        a.other = 1  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("version", "connection", "expected"),
    [
        (b"1.1", [], True),
        (b"1.1", [b"Connection: close"], False),
        (b"1.1", [b"Connection: Keep-Alive, CLOSE"], False),
        (b"1.1", [b"Connection: upgrade", b"connection: close"], False),
        (b"1.1", [b"Connection: closed"], True),
        (b"1.0", [], False),
        (b"1.0", [b"Connection: keep-alive"], True),
        (b"1.0", [b"Connection: Upgrade,  Keep-Alive "], True),
        (b"1.0", [b"Connection: keep-alive, close"], False),
    ],
)
def test_keep_alive(version: bytes, connection: list[bytes], expected: bool) -> None:
    req = parse_request_head(request(b"Host: a", *connection, start=b"GET / HTTP/" + version))
    assert req.keep_alive is expected
    resp = parse_response_head(response(*connection, start=b"HTTP/" + version + b" 200 OK"))
    assert resp.keep_alive is expected


def test_connection_tokens_are_capped_before_any_split() -> None:
    # 32 tokens over two fields are fine; the 33rd is refused, however the fields are cut up.
    ok = parse_request_head(
        request(
            b"Host: a", b"Connection: " + b"a," * 15 + b"b", b"Connection: " + b"c," * 15 + b"d"
        )
    )
    assert len(_http11.connection_tokens(ok)) == 4
    for lines in (
        [b"Connection: " + b"x," * 32 + b"y"],
        [b"Connection: " + b",".join(b"n%d" % i for i in range(20))] * 2,
        [b"Connection: " + b"," * 40],
    ):
        with pytest.raises(RemoteProtocolError, match=r"tokens, at most 32") as info:
            parse_request_head(request(b"Host: a", *lines))
        assert info.value.status_hint == 400


def test_drop_fields_cuts_named_lines_case_insensitively() -> None:
    fields = b"Keep: 1\r\nX-Foo: a\r\nx-foo:b\r\nX-Food: 2\r\nFOO: 3\r\n"
    assert _http11.drop_fields(fields, {b"x-foo", b"foo"}) == b"Keep: 1\r\nX-Food: 2\r\n"
    assert _http11.drop_fields(b"", {b"x"}) == b""
    # Names with regex syntax are plain names here.
    assert _http11.drop_fields(b"A.B: 1\r\nAxB: 2\r\n", {b"a.b"}) == b"AxB: 2\r\n"


def test_fields_without_cuts_named_lines_of_a_parsed_head() -> None:
    names = _http11.field_names_re({b"x-foo", b"foo"})
    head = b"GET / HTTP/1.1\r\nKeep: 1\r\nX-Foo: a\r\nx-foo:b\r\nX-Food: 2\r\nFOO: 3\r\n\r\n"
    parsed = parse_request_head(head.replace(b"Keep", b"Host"))
    assert parsed.fields_without(names) == b"Host: 1\r\nX-Food: 2\r\n"
    only = parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert only.fields_without(_http11.field_names_re({b"host"})) == b""
    assert only.fields_without(names) == b"Host: a\r\n"
    # A hand-built head (never parsed) gives the same lines from its (name, value) list.
    built = RequestHead(b"GET", b"/", b"1.1", [(b"Host", b"a"), (b"FOO", b"3"), (b"B", b"c")])
    assert built.fields_without(names) == b"Host: a\r\nB: c\r\n"


_CUT_NAMES = st.sampled_from([b"host", b"a", b"x-foo", b"foo", b"connection", b"te"])


@given(
    st.lists(st.tuples(_CUT_NAMES, st.booleans(), st.binary(max_size=8)), max_size=8),
    st.sets(_CUT_NAMES),
)
def test_fields_without_agrees_with_drop_fields(
    lines: list[tuple[bytes, bool, bytes]], names: set[bytes]
) -> None:
    value_bytes = bytes(b for b in range(0x20, 0x7F))
    block = b"".join(
        b"%s:%s\r\n" % (name.upper() if upper else name, bytes(value_bytes[b % 95] for b in value))
        for name, upper, value in lines
    )
    parsed = parse_response_head(b"HTTP/1.1 200 OK\r\n" + block + b"\r\n")
    expected = _http11.drop_fields(block, names) if names else block
    assert parsed.fields_without(_http11.field_names_re(names or {b"none"})) == expected


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        # One line to cut, where it may stand (the single-match shortcut), and two.
        (b"Connection: close\r\n", b""),
        (b"Connection: close\r\nA: 1\r\n", b"A: 1\r\n"),
        (b"A: 1\r\nConnection: close\r\nB: 2\r\n", b"A: 1\r\nB: 2\r\n"),
        (b"A: 1\r\nB: 2\r\nConnection: close\r\n", b"A: 1\r\nB: 2\r\n"),
        (b"TE: x\r\nA: 1\r\nConnection: close\r\n", b"A: 1\r\n"),
        (b"A: 1\r\n", b"A: 1\r\n"),
    ],
)
def test_fields_without_cuts_one_line_anywhere(block: bytes, expected: bytes) -> None:
    parsed = parse_response_head(b"HTTP/1.1 200 OK\r\n" + block + b"\r\n")
    assert parsed.fields_without(_http11.field_names_re({b"connection", b"te"})) == expected


# --- request heads: refused ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "hint", "message"),
    [
        (request(start=b"GET  / HTTP/1.1"), 400, "invalid request line"),
        (request(start=b"GET / HTTP/1.1 "), 400, "invalid request line"),
        (request(start=b"GET /"), 400, "invalid request line"),
        (request(b"Host: a", start=b"G(T / HTTP/1.1"), 400, "invalid method b'G\\(T'"),
        (request(b"Host: a", start=b" / HTTP/1.1"), 400, "invalid method b''"),
        (request(b"Host: a", start=b"GET /\x7f HTTP/1.1"), 400, "invalid request target"),
        (request(b"Host: a", start=b"GET /\x80 HTTP/1.1"), 400, "invalid request target"),
        (request(b"Host: a", start=b"GET /\tx HTTP/1.1"), 400, "invalid request target"),
        (request(b"Host: a", start=b"GET / http/1.1"), 400, "invalid HTTP version"),
        (request(b"Host: a", start=b"GET / HTTP/1"), 400, "invalid HTTP version"),
        (request(b"Host: a", start=b"GET / HTTP/11.1"), 400, "invalid HTTP version"),
        (request(b"Host: a", start=b"GET / HTTP/2.0"), 505, "unsupported HTTP version"),
        (request(b"Host: a", start=b"GET / HTTP/1.2"), 505, "only 1.0 and 1.1"),
        (request(b"Host: a", start=b"GET / HTTP/0.9"), 505, "unsupported HTTP version"),
        (b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid request line b''"),
        (request(b"fo o: x", b"Host: a"), 400, "invalid header name b'fo o'"),
        (request(b"Host: a", b": x"), 400, "invalid header name b''"),
        (request(b"Host: a", b"X\x00: x"), 400, "invalid header name"),
        (request(b"Host: a", b"Foo : x"), 400, "whitespace before colon"),
        (request(b"Host: a", b"Foo\t: x"), 400, "whitespace before colon"),
        (request(b"Host: a", b"Foo x"), 400, "header line without colon"),
        (request(b"Host: a", b"X: a\x00b"), 400, "invalid value for header b'X'"),
        (request(b"Host: a", b"X: a\x0bb"), 400, "invalid value for header"),
        (request(b"Host: a", b"X: a\x0cb"), 400, "invalid value for header"),
        (request(b"Host: a", b"X: a\rb"), 400, "bare CR"),
        (request(b"Host: a", b"X: a\nb"), 400, "bare LF"),
        (request(b"Host: a", b"X: a", b" folded"), 400, "obs-fold"),
        (request(b"Host: a", b"X: a", b"\tfolded"), 400, "obs-fold"),
        (request(b" Host: a"), 400, "obs-fold"),
        (request(b"Host: a", b"", b"X: y"), 400, "empty line inside head"),
        (request(b"X: y"), 400, "missing Host header"),
        (request(b"Host: a", b"host: b"), 400, "2 Host headers, at most 1"),
        (request(b"Host: a", b"HOST: a", start=b"GET / HTTP/1.0"), 400, "2 Host headers"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n", 400, "does not end with CRLF CRLF"),
    ],
)
def test_request_head_refused(data: bytes, hint: int, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message) as info:
        parse_request_head(data)
    assert info.value.status_hint == hint


def test_request_head_size_limit() -> None:
    data = request(b"Host: a", b"X: " + b"a" * 70000)
    with pytest.raises(
        RemoteProtocolError, match=f"request head is {len(data)} bytes, limit 65536"
    ) as info:
        parse_request_head(data)
    assert info.value.status_hint == 431
    small = request(b"Host: a")
    assert parse_request_head(small, max_size=len(small)).target == b"/"
    with pytest.raises(RemoteProtocolError, match="limit 10") as info:
        parse_request_head(small, max_size=10)
    assert info.value.status_hint == 431
    assert MAX_HEAD_SIZE == 65536


def test_long_whitespace_runs_are_refused() -> None:
    # Would take minutes if the value regex backtracked quadratically.
    data = request(b"Host: a", b"X:" + b" " * 60000 + b"\x00")
    with pytest.raises(RemoteProtocolError, match="invalid value"):
        parse_request_head(data)
    data = request(b"Host: a", b"X: a" + b" a" * 30000 + b"\x00")
    with pytest.raises(RemoteProtocolError, match="invalid value"):
        parse_request_head(data)


_FIELD_BYTES = st.sampled_from(list(b'aZ09-!:; \t\r\n\x00\x0b\x0c\x1f\x7f\x80\xff"/,='))


@given(st.lists(st.binary(max_size=24) | st.lists(_FIELD_BYTES, max_size=24).map(bytes)))
def test_field_block_validation_matches_the_field_line_grammar(lines: list[bytes]) -> None:
    # The block check is a group-free rewrite of _FIELD_LINE (the grammar the header reader
    # uses); both must accept exactly the same blocks.
    grammar = re.compile(rb"(?:" + _http11._FIELD_LINE + rb")*+")
    for block in (b"".join(lines), b"".join(b"X-A: " + line + b"\r\n" for line in lines)):
        accepted = _http11._FIELD_BLOCK_RE.fullmatch(block) is not None
        assert accepted == (grammar.fullmatch(block) is not None), block


def test_error_messages_quote_at_most_64_bytes() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_request_head(request(b"Host: a", b"X" * 1000 + b" : v"))
    assert len(str(info.value)) < 200
    assert "..." in str(info.value)


# --- request framing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "version", "expected"),
    [
        ([], b"1.1", (Framing.NONE, 0)),
        ([b"Content-Length: 0"], b"1.1", (Framing.LENGTH, 0)),
        ([b"Content-Length: 12"], b"1.1", (Framing.LENGTH, 12)),
        ([b"content-length: 007"], b"1.1", (Framing.LENGTH, 7)),
        ([b"Content-Length: 5", b"Content-Length: 5"], b"1.1", (Framing.LENGTH, 5)),
        ([b"Content-Length: 9223372036854775807"], b"1.1", (Framing.LENGTH, 2**63 - 1)),
        ([b"Content-Length: 5"], b"1.0", (Framing.LENGTH, 5)),
        ([b"Transfer-Encoding: chunked"], b"1.1", (Framing.CHUNKED, 0)),
        ([b"transfer-encoding: Chunked "], b"1.1", (Framing.CHUNKED, 0)),
    ],
)
def test_request_framing(lines: list[bytes], version: bytes, expected: tuple[Framing, int]) -> None:
    head = parse_request_head(request(b"Host: a", *lines, start=b"POST / HTTP/" + version))
    assert request_framing(head) == expected
    # A head built by hand gets the same answer.
    rebuilt = RequestHead(head.method, head.target, head.http_version, list(head.headers))
    assert request_framing(rebuilt) == expected


@pytest.mark.parametrize(
    ("lines", "version", "hint", "message"),
    [
        ([b"Content-Length: 5", b"Content-Length: 6"], b"1.1", 400, "conflicting Content-Length"),
        ([b"Content-Length: 5", b"Content-Length: 05"], b"1.1", 400, "conflicting"),
        ([b"Content-Length: 5, 5"], b"1.1", 400, "invalid Content-Length b'5, 5'"),
        ([b"Content-Length: 5,6"], b"1.1", 400, "invalid Content-Length"),
        ([b"Content-Length: -1"], b"1.1", 400, "invalid Content-Length"),
        ([b"Content-Length: +5"], b"1.1", 400, "invalid Content-Length"),
        ([b"Content-Length: 0x5"], b"1.1", 400, "invalid Content-Length"),
        ([b"Content-Length:"], b"1.1", 400, "invalid Content-Length"),
        ([b"Content-Length: " + b"1" * 21], b"1.1", 400, "1 to 19 digits"),
        ([b"Content-Length: " + b"9" * 20], b"1.1", 400, "1 to 19 digits"),
        ([b"Content-Length: " + b"7" * 60000], b"1.1", 400, "1 to 19 digits"),
        ([b"Content-Length: 9223372036854775808"], b"1.1", 400, "over the limit of 2"),
        (
            [b"Content-Length: 5", b"Transfer-Encoding: chunked"],
            b"1.1",
            400,
            "both Content-Length and Transfer-Encoding",
        ),
        ([b"Transfer-Encoding: chunked"], b"1.0", 400, "Transfer-Encoding in an HTTP/1.0"),
        ([b"Transfer-Encoding: gzip"], b"1.1", 501, "unsupported Transfer-Encoding b'gzip'"),
        ([b"Transfer-Encoding: gzip, chunked"], b"1.1", 501, "unsupported Transfer-Encoding"),
        ([b"Transfer-Encoding: chunked, chunked"], b"1.1", 501, "unsupported"),
        ([b"Transfer-Encoding:"], b"1.1", 501, "unsupported Transfer-Encoding b''"),
        (
            [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
            b"1.1",
            501,
            "2 Transfer-Encoding headers",
        ),
    ],
)
def test_request_framing_refused(
    lines: list[bytes], version: bytes, hint: int, message: str
) -> None:
    data = request(b"Host: a", *lines, start=b"POST / HTTP/" + version)
    with pytest.raises(RemoteProtocolError, match=message) as info:
        parse_request_head(data)
    assert info.value.status_hint == hint
    # The same checks run on a head built by hand.
    bare = RequestHead(b"POST", b"/", version, [(b"Host", b"a"), *(_split(line) for line in lines)])
    with pytest.raises(RemoteProtocolError, match=message) as info:
        request_framing(bare)
    assert info.value.status_hint == hint


def _split(line: bytes) -> tuple[bytes, bytes]:
    name, _, value = line.partition(b":")
    return name, value.strip()


# --- response heads ---------------------------------------------------------------------------


def test_parse_response_head_fields() -> None:
    head = parse_response_head(
        response(
            b"Server: x", b"Set-Cookie: a=1", b"set-cookie: b=2", start=b"HTTP/1.0 404 Not  Found "
        )
    )
    assert head.http_version == b"1.0"
    assert head.status == 404
    assert head.reason == b"Not  Found "
    assert head.headers == [(b"Server", b"x"), (b"Set-Cookie", b"a=1"), (b"set-cookie", b"b=2")]
    assert head.get(b"set-cookie") == b"a=1"
    assert head.get_all(b"set-cookie") == [b"a=1", b"b=2"]
    assert head == ResponseHead(b"1.0", 404, b"Not  Found ", list(head.headers))
    assert head != ResponseHead(b"1.0", 405, b"Not  Found ", list(head.headers))
    assert head != 404
    assert repr(head).startswith("ResponseHead(http_version=b'1.0', status=404, reason=")


@pytest.mark.parametrize(
    ("start", "status", "reason"),
    [
        (b"HTTP/1.1 200", 200, b""),
        (b"HTTP/1.1 200 ", 200, b""),
        (b"HTTP/1.1 999 \x01\x80\tx", 999, b"\x01\x80\tx"),
        (b"HTTP/1.1 100 Continue", 100, b"Continue"),
    ],
)
def test_status_lines(start: bytes, status: int, reason: bytes) -> None:
    head = parse_response_head(response(start=start))
    assert (head.status, head.reason) == (status, reason)


@pytest.mark.parametrize(
    ("data", "hint", "message"),
    [
        (response(start=b"HTTP/1.1 20 OK"), 400, "invalid status line"),
        (response(start=b"HTTP/1.1 2000 OK"), 400, "invalid status line"),
        (response(start=b"HTTP/1.1 099 Low"), 400, "invalid status code 99"),
        (response(start=b"HTTP/1.1  200 OK"), 400, "invalid status line"),
        (response(start=b"HTTP/1.1 200 O\x00K"), 400, "invalid status line"),
        (response(start=b"HTTP/1.1 200 O\x0bK"), 400, "invalid status line"),
        (response(start=b"HTTP/1.1\t200 OK"), 400, "invalid status line"),
        (response(start=b"HTTP/1 200 OK"), 400, "invalid HTTP version"),
        (response(start=b"ICY 200 OK"), 400, "invalid HTTP version"),
        (response(start=b"HTTP/2.0 200 OK"), 505, "unsupported HTTP version"),
        (response(b"X : y"), 400, "whitespace before colon"),
        (response(b"X: y", b" folded"), 400, "obs-fold"),
        (response(b"X: \x00"), 400, "invalid value"),
        (response(b"Content-Length: 1", b"Content-Length: 2"), 400, "conflicting"),
        (response(b"Content-Length: 1, 1"), 400, "invalid Content-Length"),
        (response(b"Content-Length: x"), 400, "invalid Content-Length"),
        (response(b"Content-Length: 9223372036854775808"), 400, "over the limit of 2"),
        (response(b"Content-Length: " + b"1" * 5000), 400, "1 to 19 digits"),
        (response(b"Connection: " + b"x," * 32 + b"y"), 400, "names 33 tokens, at most 32"),
        (
            response(b"Content-Length: 1", b"Transfer-Encoding: chunked"),
            400,
            "both Content-Length and Transfer-Encoding",
        ),
        (
            response(b"Transfer-Encoding: chunked", start=b"HTTP/1.0 200 OK"),
            400,
            "Transfer-Encoding in an HTTP/1.0",
        ),
        (response(b"Transfer-Encoding: chunked, chunked"), 400, "more than once"),
        (response(b"Transfer-Encoding: gzip,,chunked"), 400, "invalid Transfer-Encoding"),
        (response(b"Transfer-Encoding:"), 400, "invalid Transfer-Encoding"),
        (response(b"Transfer-Encoding: g(zip"), 400, "invalid Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\n\r", 400, "does not end with CRLF CRLF"),
        (response(b"X: " + b"y" * MAX_HEAD_SIZE), 431, "response head is 65560 bytes, limit 65536"),
    ],
)
def test_response_head_refused(data: bytes, hint: int, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message) as info:
        parse_response_head(data)
    assert info.value.status_hint == hint


@pytest.mark.parametrize(
    ("data", "status", "tokens", "framing"),
    [
        # The parser's shortcuts (status by a table, common Connection values tokenised once,
        # Content-Length by isdigit) give what the general path gives.
        (response(start=b"HTTP/1.1 100"), 100, frozenset(), (Framing.NONE, 0)),
        (response(start=b"HTTP/1.1 999 Odd"), 999, frozenset(), (Framing.UNTIL_CLOSE, 0)),
        (response(b"Connection: keep-alive"), 200, {b"keep-alive"}, (Framing.UNTIL_CLOSE, 0)),
        (response(b"Connection: Keep-Alive"), 200, {b"keep-alive"}, (Framing.UNTIL_CLOSE, 0)),
        (response(b"Connection: close"), 200, {b"close"}, (Framing.UNTIL_CLOSE, 0)),
        (response(b"Connection: upgrade"), 200, {b"upgrade"}, (Framing.UNTIL_CLOSE, 0)),
        (response(b"Connection: close "), 200, {b"close"}, (Framing.UNTIL_CLOSE, 0)),
        (response(b"Connection: close, x"), 200, {b"close", b"x"}, (Framing.UNTIL_CLOSE, 0)),
        (response(b"Content-Length: 0015"), 200, frozenset(), (Framing.LENGTH, 15)),
        (
            response(b"Content-Length: 9223372036854775807"),
            200,
            frozenset(),
            (Framing.LENGTH, 2**63 - 1),
        ),
        (response(b"Content-Length:\t7\t"), 200, frozenset(), (Framing.LENGTH, 7)),
    ],
)
def test_response_head_shortcuts(
    data: bytes, status: int, tokens: set[bytes], framing: tuple[Framing, int]
) -> None:
    head = parse_response_head(data)
    assert head.status == status
    assert _http11.connection_tokens(head) == tokens
    assert response_framing(head, b"GET") == framing


@pytest.mark.parametrize(
    "value", [b"1" * 20, b"0" * 20, b"+5", b"5 5", b"\xd9\xa1", b"", b"0x5", b"\xef\xbc\x95"]
)
def test_response_content_length_shortcut_refuses(value: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="Content-Length") as info:
        parse_response_head(response(b"Content-Length: " + value))
    assert info.value.status_hint == 400


@pytest.mark.parametrize(
    ("status", "lines", "method", "expected"),
    [
        (b"200", [b"Content-Length: 5"], b"GET", (Framing.LENGTH, 5)),
        (b"200", [b"Content-Length: 0"], b"GET", (Framing.LENGTH, 0)),
        (b"200", [], b"GET", (Framing.UNTIL_CLOSE, 0)),
        (b"200", [b"Transfer-Encoding: chunked"], b"GET", (Framing.CHUNKED, 0)),
        (b"200", [b"Transfer-Encoding: gzip, CHUNKED"], b"GET", (Framing.CHUNKED, 0)),
        (
            b"200",
            [b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"],
            b"GET",
            (Framing.CHUNKED, 0),
        ),
        (b"200", [b"Transfer-Encoding: gzip;q=1"], b"GET", (Framing.UNTIL_CLOSE, 0)),
        (b"200", [b"Transfer-Encoding: chunked, gzip"], b"GET", (Framing.UNTIL_CLOSE, 0)),
        (b"200", [b"Content-Length: 5"], b"HEAD", (Framing.NONE, 0)),
        (b"200", [b"Transfer-Encoding: chunked"], b"HEAD", (Framing.NONE, 0)),
        (b"200", [], b"CONNECT", (Framing.NONE, 0)),
        (b"299", [b"Content-Length: 5"], b"CONNECT", (Framing.NONE, 0)),
        (b"407", [b"Content-Length: 5"], b"CONNECT", (Framing.LENGTH, 5)),
        (b"100", [], b"GET", (Framing.NONE, 0)),
        (b"101", [b"Upgrade: websocket"], b"GET", (Framing.NONE, 0)),
        (b"204", [b"Content-Length: 5"], b"POST", (Framing.NONE, 0)),
        (b"304", [b"Transfer-Encoding: chunked"], b"GET", (Framing.NONE, 0)),
        (b"205", [], b"GET", (Framing.UNTIL_CLOSE, 0)),
        (b"500", [b"content-length: 3"], b"POST", (Framing.LENGTH, 3)),
    ],
)
def test_response_framing(
    status: bytes, lines: list[bytes], method: bytes, expected: tuple[Framing, int]
) -> None:
    head = parse_response_head(response(*lines, start=b"HTTP/1.1 " + status + b" X"))
    assert response_framing(head, method) == expected
    rebuilt = ResponseHead(head.http_version, head.status, head.reason, list(head.headers))
    assert response_framing(rebuilt, method) == expected


def test_response_framing_of_hand_built_head_validates() -> None:
    head = ResponseHead(b"1.1", 200, b"OK", [(b"Content-Length", b"1"), (b"Content-Length", b"2")])
    with pytest.raises(RemoteProtocolError, match="conflicting") as info:
        response_framing(head, b"GET")
    assert info.value.status_hint == 400
    # Status rules come first: a 204 has no body whatever its headers say.
    head.status = 204
    assert response_framing(head, b"GET") == (Framing.NONE, 0)


# --- h11 as the oracle: requests ------------------------------------------------------------------

_NAMES = [b"Host", b"host", b"X-Foo", b"Accept", b"Content-Length", b"content-length"]
_NAMES += [b"Transfer-Encoding", b"Connection", b"Upgrade", b"fo o", b"", b"X\x00", b"\xff"]
_NAMES += [b"X-Foo ", b"X(1)", b"Host\t"]
_VALUES = [b"example.com", b"5", b"0", b"007", b"5, 5", b"5,6", b"-1", b"1" * 21, b"chunked"]
_VALUES += [b"Chunked", b"gzip, chunked", b"chunked, gzip", b"gzip", b"close", b"keep-alive"]
_VALUES += [b"a\x00b", b"a\x0bb", b"\x01", b"\x80\xff", b"a  \tb", b"", b"a\rb", b"a\nb", b"\x7f"]
_GOOD_FIELDS = [
    (b"Host", b"example.com"),
    (b"X-Foo", b"bar baz"),
    (b"Accept", b"*/*"),
    (b"Content-Length", b"5"),
    (b"content-length", b"0"),
    (b"Transfer-Encoding", b"chunked"),
    (b"Connection", b"close"),
    (b"Connection", b"keep-alive"),
    (b"Cookie", b"a=\x01b"),
    (b"X-Forwarded-Host", b"example.com"),
]
_FRAMINGS = [
    b"Content-Length: 5\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n",
    b"Content-Length: 5\r\ncontent-length: 5\r\n",
    b"Content-Length: 5\r\nContent-Length: 6\r\n",
    b"Content-Length: 5\r\nContent-Length: 05\r\n",
    b"Content-Length: 5, 5\r\n",
    b"Content-Length: " + b"1" * 21 + b"\r\n",
    b"Content-Length: " + b"1" * 20 + b"\r\n",
    b"Content-Length:  5 \r\n",
    b"Transfer-Encoding: gzip\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding: Chunked \r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
]
_BYTES = b'aZ09-!~:;,/ \t\r\n\x00\x01\x0b\x0c\x7f\x80\xff"()'
_junk = st.lists(st.sampled_from(list(_BYTES)), max_size=6).map(bytes)


def _weighted(good: list[bytes], bad: list[bytes], ratio: int = 6) -> st.SearchStrategy[bytes]:
    return st.sampled_from(good * ratio + bad)


_eol = _weighted([b"\r\n"], [b"\n", b"\r", b"\r\r\n"], ratio=80)


@st.composite
def _field_lines(draw: st.DrawFn, host: bool) -> bytes:
    lines: list[bytes] = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.integers(0, 19))
        if kind < 14:
            name, value = draw(st.sampled_from(_GOOD_FIELDS))
        elif kind < 16:
            name = draw(st.sampled_from(_GOOD_FIELDS))[0]
            value = draw(st.one_of(st.sampled_from(_VALUES), _junk))
        elif kind < 19:
            name = draw(st.one_of(st.sampled_from(_NAMES), _junk))
            value = draw(st.one_of(st.sampled_from(_VALUES), _junk))
        else:  # an obs-fold continuation line
            lines.append(draw(st.sampled_from([b" folded", b"\tfolded", b"  "])) + draw(_eol))
            continue
        colon = draw(_weighted([b": ", b":"], [b" :", b":\t ", b"", b"\t:"], ratio=20))
        trail = draw(_weighted([b""], [b" ", b"\t", b" \t"], ratio=3))
        lines.append(name + colon + value + trail + draw(_eol))
    if draw(st.booleans()):
        lines.append(draw(st.sampled_from(_FRAMINGS)))
    if host:
        host_line = draw(_weighted([b"Host: example.com"], [b"host:", b"HOST: a b"])) + b"\r\n"
        lines.insert(draw(st.integers(0, len(lines))), host_line)
    return b"".join(lines)


_methods = _weighted(
    [b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"M-SEARCH"],
    [b"get", b"G(T", b"", b"G\x80"],
    ratio=10,
)
_targets = _weighted(
    [b"/", b"/a?b=c", b"*", b"http://h/p", b"h:443"],
    [b"/a b", b"/\x7f", b"/\x80", b"", b"/\t"],
    ratio=10,
)
_versions = _weighted(
    [b"HTTP/1.1", b"HTTP/1.0"],
    [b"HTTP/2.0", b"HTTP/1.2", b"HTTP/0.9", b"http/1.1", b"HTTP/1"],
    ratio=12,
)


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    space = _weighted([b" "], [b"  ", b"\t"], ratio=40)
    line = draw(_methods) + draw(space) + draw(_targets) + draw(space) + draw(_versions)
    fields = draw(_field_lines(host=draw(st.integers(0, 4)) > 0))
    tail = draw(st.sampled_from([b"", b"", b"hello", b"\r\n", b"GET / HTTP/1.1\r\n\r\n"]))
    return line + draw(_eol) + fields + draw(_eol) + tail


Verdict = Literal["accept", "reject", "incomplete"]


def _h11_request(data: bytes) -> tuple[h11.Request | None, bytes, str]:
    """(event or None, the head bytes h11 consumed, h11's error text)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        return None, b"", str(exc)
    if event is h11.NEED_DATA:
        return None, b"", "need data"
    assert isinstance(event, h11.Request)
    return event, data[: len(data) - len(conn.trailing_data[0])], ""


def _norm_h11_framing(framing: tuple[str, tuple[()] | tuple[int]]) -> tuple[str, int]:
    kind, args = framing
    if kind == "content-length":
        assert len(args) == 1
        return ("length", args[0])
    return ("chunked", 0) if kind == "chunked" else ("close", 0)


def _norm_framing(framing: tuple[Framing, int]) -> tuple[str, int]:
    kind, length = framing
    if kind in (Framing.NONE, Framing.LENGTH):
        return ("length", length)
    return ("chunked", 0) if kind is Framing.CHUNKED else ("close", 0)


def _ours_request(data: bytes) -> tuple[Verdict, RequestHead | RemoteProtocolError | None]:
    try:
        end = find_head_end(data)
        if end < 0:
            return "incomplete", None
        head = parse_request_head(data[:end])
        request_framing(head)
    except RemoteProtocolError as exc:
        return "reject", exc
    return "accept", head


@ORACLE
@given(request_heads())
def test_request_parser_agrees_with_h11(data: bytes) -> None:
    event, h11_head, h11_error = _h11_request(data)
    verdict, ours = _ours_request(data)
    if verdict == "accept":
        # Never accept what h11 refuses, and read it exactly as h11 does.
        assert isinstance(ours, RequestHead)
        assert event is not None, f"h11 refused: {h11_error}"
        assert (ours.method, ours.target, ours.http_version) == (
            event.method,
            event.target,
            event.http_version,
        )
        assert norm_headers(ours.headers) == event.headers.raw_items()
        assert [(n.lower(), v) for n, v in norm_headers(ours.headers)] == list(event.headers)
        assert _norm_framing(request_framing(ours)) == _norm_h11_framing(_body_framing(b"", event))
        if ours.http_version == b"1.1":
            assert ours.keep_alive == _keep_alive(event)
        else:
            assert not _keep_alive(event)  # h11 never keeps HTTP/1.0 alive; we may
    elif verdict == "reject" and event is not None:
        # h11 accepted: we must be stricter for a documented reason, and say which.
        assert isinstance(ours, RemoteProtocolError)
        reasons = stricter_reasons(h11_head, event)
        assert reasons, f"refused {data!r} that h11 accepts: {ours}"
        assert any(text in str(ours) for text in reasons.values()), (reasons, str(ours))
    elif verdict == "incomplete":
        assert event is None  # we wait for more; h11 must not have found a request either


def test_request_oracle_generator_mixes_verdicts() -> None:
    # The property test above means little unless the grammar yields every verdict often.
    seen: dict[str, int] = {"accept": 0, "reject": 0, "h11 only": 0, "incomplete": 0}

    @settings(max_examples=400, deadline=None, database=None, derandomize=True)
    @given(request_heads())
    def count(data: bytes) -> None:
        verdict, _ = _ours_request(data)
        event = _h11_request(data)[0]
        seen["h11 only" if verdict == "reject" and event is not None else verdict] += 1

    count()
    assert seen["accept"] > 40, seen
    assert seen["reject"] > 40, seen
    assert seen["h11 only"] > 5, seen


# --- h11 as the oracle: responses ------------------------------------------------------------

_statuses = st.one_of(
    _weighted(
        [b"200", b"204", b"304", b"100", b"101", b"404", b"500", b"302"],
        [b"099", b"20", b"2000", b"20x", b"000"],
        ratio=2,
    ),
    st.integers(100, 999).map(lambda n: b"%d" % n),
)
_reasons = _weighted(
    [b" OK", b"", b" ", b" Not Found"], [b" a\x00", b" \x80\x01\t", b"  x", b" a\x0b"]
)
_response_fields = [
    (b"Transfer-Encoding", b"gzip, chunked"),
    (b"Transfer-Encoding", b"gzip"),
    (b"Transfer-Encoding", b"chunked, gzip"),
]


@st.composite
def response_heads(draw: st.DrawFn) -> bytes:
    line = draw(_versions) + b" " + draw(_statuses) + draw(_reasons)
    fields = draw(_field_lines(host=False))
    if draw(st.integers(0, 5)) == 0:
        name, value = draw(st.sampled_from(_response_fields))
        fields += name + b": " + value + b"\r\n"
    return line + draw(_eol) + fields + draw(_eol)


def _h11_response(
    data: bytes, method: bytes
) -> tuple[h11.Response | h11.InformationalResponse | None, bytes, str]:
    conn = h11.Connection(h11.CLIENT)
    target = b"h:443" if method == b"CONNECT" else b"/"
    # Propose an upgrade so that h11 takes a 101 instead of refusing it as unrequested.
    headers = [(b"Host", b"h"), (b"Upgrade", b"x"), (b"Connection", b"upgrade")]
    conn.send(h11.Request(method=method, target=target, headers=headers))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        return None, b"", str(exc)
    if event is h11.NEED_DATA:
        return None, b"", "need data"
    assert isinstance(event, h11.Response | h11.InformationalResponse)
    return event, data[: len(data) - len(conn.trailing_data[0])], ""


def _ours_response(
    data: bytes, method: bytes
) -> tuple[Verdict, ResponseHead | RemoteProtocolError | None]:
    try:
        end = find_head_end(data)
        if end < 0:
            return "incomplete", None
        head = parse_response_head(data[:end])
        response_framing(head, method)
    except RemoteProtocolError as exc:
        return "reject", exc
    return "accept", head


def _check_same_response(
    ours: ResponseHead, event: h11.Response | h11.InformationalResponse, method: bytes
) -> None:
    assert (ours.http_version, ours.status, ours.reason) == (
        event.http_version,
        event.status_code,
        event.reason,
    )
    assert norm_headers(ours.headers) == event.headers.raw_items()
    if isinstance(event, h11.Response):
        h11_framing = _norm_h11_framing(_body_framing(method, event))
    else:
        h11_framing = ("length", 0)
    assert _norm_framing(response_framing(ours, method)) == h11_framing
    if ours.http_version == b"1.1" and isinstance(event, h11.Response):
        assert ours.keep_alive == _keep_alive(event)


@ORACLE
@given(response_heads(), st.sampled_from([b"GET", b"HEAD", b"CONNECT", b"POST"]))
def test_response_parser_agrees_with_h11(data: bytes, method: bytes) -> None:
    event, h11_head, h11_error = _h11_response(data, method)
    verdict, ours = _ours_response(data, method)
    if verdict == "accept":
        assert isinstance(ours, ResponseHead)
        if event is None:
            _check_lenient_transfer_encoding(data, ours, h11_error, method)
        else:
            _check_same_response(ours, event, method)
    elif verdict == "reject" and event is not None:
        assert isinstance(ours, RemoteProtocolError)
        reasons = stricter_reasons(h11_head, event)
        assert reasons, f"refused {data!r} that h11 accepts: {ours}"
        assert any(text in str(ours) for text in reasons.values()), (reasons, str(ours))
    elif verdict == "incomplete":
        assert event is None


def _is_te(field: tuple[bytes, bytes]) -> bool:
    return field[0].lower() == b"transfer-encoding"


def _check_lenient_transfer_encoding(
    data: bytes, ours: ResponseHead, h11_error: str, method: bytes
) -> None:
    """Our one leniency: a response may use codings other than a lone "chunked".

    RFC 9112 §6.3: final coding chunked means chunked, anything else means "read until close".
    h11 refuses those; it must accept the same head with the Transfer-Encoding fields replaced
    by what they mean (a lone chunked, or nothing), and then agree with us on everything else.
    """
    assert "Transfer-Encoding" in h11_error, h11_error
    codings = b",".join(ours.get_all(b"transfer-encoding")).lower().split(b",")
    assert [c.strip() for c in codings] != [b"chunked"]
    lines = [line for line in data.split(b"\r\n") if not _is_te(_split(line))]
    if codings[-1].strip() == b"chunked":
        lines.insert(1, b"Transfer-Encoding: chunked")
    equivalent = b"\r\n".join(lines)
    event, _, h11_error = _h11_response(equivalent, method)
    assert event is not None, h11_error
    meant = parse_response_head(equivalent[: find_head_end(equivalent)])
    _check_same_response(meant, event, method)
    assert response_framing(meant, method) == response_framing(ours, method)
    assert [f for f in meant.headers if not _is_te(f)] == [f for f in ours.headers if not _is_te(f)]


def test_response_oracle_generator_mixes_verdicts() -> None:
    seen: dict[str, int] = {"accept": 0, "reject": 0, "lenient": 0, "incomplete": 0}

    @settings(max_examples=400, deadline=None, database=None, derandomize=True)
    @given(response_heads(), st.sampled_from([b"GET", b"HEAD"]))
    def count(data: bytes, method: bytes) -> None:
        verdict, _ = _ours_response(data, method)
        event = _h11_response(data, method)[0]
        seen["lenient" if verdict == "accept" and event is None else verdict] += 1

    count()
    assert seen["accept"] > 40, seen
    assert seen["reject"] > 40, seen
    assert seen["lenient"] > 3, seen


# --- fuzz: random bytes raise nothing but RemoteProtocolError ----------------------------------


def _error_of(fn: Callable[[], object]) -> RemoteProtocolError | None:
    try:
        fn()
    except RemoteProtocolError as exc:
        return exc
    return None


@FAST
@given(st.binary(max_size=80), st.binary(max_size=40))
def test_random_heads_raise_only_protocol_errors(line: bytes, fields: bytes) -> None:
    for data in (
        line + b"\r\n" + fields + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + fields + b"\r\n\r\n",
    ):
        error = _error_of(lambda: parse_request_head(data))  # noqa: B023
        assert error is None or error.status_hint in (400, 431, 501, 505)
        error = _error_of(lambda: parse_response_head(data))  # noqa: B023
        assert error is None or error.status_hint in (400, 505)
        error = _error_of(lambda: find_head_end(data))  # noqa: B023
        assert error is None or error.status_hint == 400


@FAST
@given(st.binary(max_size=200))
def test_random_chunked_bodies_raise_only_protocol_errors(data: bytes) -> None:
    reader = make_body_reader(Framing.CHUNKED, 0, max_chunk_line=64)

    def read_all() -> None:
        reader.read(bytearray(data))
        reader.feed_eof()

    error = _error_of(read_all)
    assert (error is None) == reader.done
    assert error is None or error.status_hint == 400


# --- body readers ---------------------------------------------------------------------------------


def test_none_reader_is_done_at_once() -> None:
    reader = make_body_reader(Framing.NONE, 0)
    buf = bytearray(b"GET / HTTP/1.1\r\n")
    assert _done(reader)
    assert reader.read(buf) == b""
    assert buf == b"GET / HTTP/1.1\r\n"
    reader.feed_eof()
    assert _done(reader)


def test_length_reader() -> None:
    reader = make_body_reader(Framing.LENGTH, 5)
    buf = bytearray(b"he")
    assert reader.read(buf) == b"he"
    assert buf == b""
    assert not _done(reader)
    assert reader.read(buf) == b""
    buf += b"lloNEXT"
    assert reader.read(buf) == b"llo"
    assert _done(reader)
    assert buf == b"NEXT"
    assert reader.read(buf) == b""
    assert buf == b"NEXT"
    reader.feed_eof()


def test_length_reader_zero_is_done() -> None:
    reader = make_body_reader(Framing.LENGTH, 0)
    assert _done(reader)
    buf = bytearray(b"x")
    assert reader.read(buf) == b""
    assert buf == b"x"


def test_length_reader_eof_mid_body() -> None:
    reader = make_body_reader(Framing.LENGTH, 10)
    reader.read(bytearray(b"abc"))
    with pytest.raises(
        RemoteProtocolError, match=r"connection closed before body ended \(3 of 10 bytes\)"
    ) as info:
        reader.feed_eof()
    assert info.value.status_hint == 400


def test_until_close_reader() -> None:
    reader = make_body_reader(Framing.UNTIL_CLOSE, 0)
    buf = bytearray(b"abc")
    assert reader.read(buf) == b"abc"
    assert buf == b""
    assert reader.read(buf) == b""
    buf += b"def"
    assert reader.read(buf) == b"def"
    assert not _done(reader)
    reader.feed_eof()
    assert _done(reader)
    buf += b"late"
    assert reader.read(buf) == b""


def test_body_reader_base_is_abstract() -> None:
    reader = BodyReader()
    assert not _done(reader)
    with pytest.raises(NotImplementedError):
        reader.read(bytearray())
    with pytest.raises(NotImplementedError):
        reader.feed_eof()


def test_chunked_reader_example() -> None:
    wire = b"5;name=value\r\nhello\r\nA\r\n, world!!!\r\n0\r\nX-Trailer: 1\r\nY: 2\r\n\r\nNEXT"
    reader = make_body_reader(Framing.CHUNKED, 0)
    buf = bytearray(wire)
    assert reader.read(buf) == b"hello, world!!!"
    assert _done(reader)
    assert buf == b"NEXT"
    assert reader.read(buf) == b""
    assert buf == b"NEXT"
    reader.feed_eof()


def test_chunked_reader_one_byte_at_a_time() -> None:
    wire = encode_chunk(b"hello") + encode_chunk(b"x" * 300) + b"0\r\nT: v\r\n\r\n"
    reader = make_body_reader(Framing.CHUNKED, 0)
    buf = bytearray()
    out = feed(reader, buf, [wire[i : i + 1] for i in range(len(wire))] + [b"NEXT"])
    assert out == b"hello" + b"x" * 300
    assert _done(reader)
    assert buf == b"NEXT"


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"g\r\n", "invalid chunk size line b'g'"),
        (b"\r\n", "invalid chunk size line b''"),
        (b"-1\r\n", "invalid chunk size line"),
        (b"0x5\r\n", "invalid chunk size line"),
        (b" 5\r\n", "invalid chunk size line"),
        (b"5 ;x\r\n", "invalid chunk size line"),
        (b"5 \r\n", "invalid chunk size line"),
        (b"5\t\r\n", "invalid chunk size line"),
        (b"5;a\x00\r\n", "invalid chunk size line"),
        (b"5\nhello\r\n", "invalid chunk size line"),
        (b"1" * 17 + b"\r\n", "invalid chunk size line"),
        (b"5\r\nhelloXX", "chunk data not followed by CRLF"),
        (b"5\r\nhello\rX", "chunk data not followed by CRLF"),
        (b"5\r\nhello\n\r\n", "chunk data not followed by CRLF"),
        (b"5\r\nhello\r\n0\r\nbad trailer\r\n\r\n", "invalid trailer line"),
        (b"0\r\nX: a\x00\r\n\r\n", "invalid trailer line"),
        (b"0\r\n folded\r\n\r\n", "invalid trailer line"),
        (b"5;" + b"e" * 100 + b"\r\n", "chunk size line is over 64 bytes"),
        (b"5;" + b"e" * 100, "chunk size line is over 64 bytes"),
        (b"0\r\n" + b"X: a\r\n" * 30, "trailer section is over 128 bytes"),
        (b"0\r\nX: " + b"a" * 200, "trailer section is over 128 bytes"),
    ],
)
def test_chunked_reader_refuses(wire: bytes, message: str) -> None:
    for pieces in ([wire], [wire[i : i + 1] for i in range(len(wire))]):
        reader = make_body_reader(Framing.CHUNKED, 0, max_chunk_line=64, max_trailer_size=128)
        buf = bytearray()
        with pytest.raises(RemoteProtocolError, match=message) as info:
            feed(reader, buf, pieces)
        assert info.value.status_hint == 400
        # Once failed, it stays failed.
        with pytest.raises(RemoteProtocolError, match=message):
            reader.read(bytearray(b"0\r\n\r\n"))
        with pytest.raises(RemoteProtocolError, match=message):
            reader.feed_eof()
        assert not _done(reader)


def test_chunked_reader_accepts_extension_and_whitespace_forms() -> None:
    wire = b'5;a=b;c="d e"\r\nhello\r\n5;\r\nworld\r\n000;x \t\r\n\r\n'
    reader = make_body_reader(Framing.CHUNKED, 0)
    assert reader.read(bytearray(wire)) == b"helloworld"
    assert _done(reader)


@pytest.mark.parametrize(
    "wire",
    [b"", b"5\r\nhel", b"5\r\nhello", b"5\r\nhello\r", b"5\r\nhello\r\n0\r\n", b"0\r\nX: 1\r\n"],
)
def test_chunked_reader_eof_mid_body(wire: bytes) -> None:
    reader = make_body_reader(Framing.CHUNKED, 0)
    reader.read(bytearray(wire))
    with pytest.raises(RemoteProtocolError, match="connection closed before body ended") as info:
        reader.feed_eof()
    assert info.value.status_hint == 400
    assert not _done(reader)


def test_chunked_reader_eof_counts_data_received() -> None:
    reader = make_body_reader(Framing.CHUNKED, 0)
    assert reader.read(bytearray(b"3\r\nabc\r\na\r\n0123")) == b"abc0123"
    with pytest.raises(RemoteProtocolError, match=r"\(7 bytes of chunk data\)"):
        reader.feed_eof()


def test_chunked_reader_does_not_rescan_a_growing_line() -> None:
    # A chunk line arriving byte by byte up to the limit is found, then refused past it.
    reader = make_body_reader(Framing.CHUNKED, 0, max_chunk_line=4096)
    buf = bytearray()
    feed(reader, buf, [b"5;"] + [b"e"] * 4000 + [b"\r", b"\nhello\r\n"])
    assert reader.read(buf) == b""
    assert not _done(reader)
    reader.read(bytearray(LAST_CHUNK))
    assert _done(reader)


_chunk_sizes = st.sampled_from([b"%x", b"%X", b"0%x", b"%x;ext", b'%x;a=1;b="2"'])


@FAST
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=40), max_size=8),
    size_forms=st.lists(_chunk_sizes, min_size=8, max_size=8),
    trailers=st.lists(st.sampled_from([b"X-Sum: 1", b"Y:", b"Z:  a b "]), max_size=3),
    trailing=st.binary(max_size=20),
    cuts=st.lists(st.integers(0, 500), max_size=12),
)
def test_chunked_round_trip(
    chunks: list[bytes],
    size_forms: list[bytes],
    trailers: list[bytes],
    trailing: bytes,
    cuts: list[int],
) -> None:
    wire = b"".join(
        form % len(chunk) + b"\r\n" + chunk + b"\r\n"
        for form, chunk in zip(size_forms, chunks, strict=False)
    )
    wire += b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"
    reader = make_body_reader(Framing.CHUNKED, 0)
    buf = bytearray()
    assert feed(reader, buf, split_at(wire + trailing, cuts)) == b"".join(chunks)
    assert _done(reader)
    assert buf == trailing


@FAST
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=60), max_size=6),
    trailing=st.binary(max_size=20),
    cuts=st.lists(st.integers(0, 400), max_size=10),
)
def test_encode_chunk_round_trip(chunks: list[bytes], trailing: bytes, cuts: list[int]) -> None:
    wire = b"".join(encode_chunk(chunk) for chunk in chunks) + LAST_CHUNK
    reader = make_body_reader(Framing.CHUNKED, 0)
    buf = bytearray()
    assert feed(reader, buf, split_at(wire + trailing, cuts)) == b"".join(chunks)
    assert _done(reader)
    assert buf == trailing
    # h11 decodes the same bytes to the same content.
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(request(b"Host: a", b"Transfer-Encoding: chunked") + wire)
    got = b""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        if isinstance(event, h11.Data):
            got += event.data
    assert got == b"".join(chunks)


@FAST
@given(
    body=st.binary(max_size=100),
    trailing=st.binary(max_size=20),
    cuts=st.lists(st.integers(0, 150), max_size=10),
)
def test_length_round_trip(body: bytes, trailing: bytes, cuts: list[int]) -> None:
    reader = make_body_reader(Framing.LENGTH, len(body))
    buf = bytearray()
    assert feed(reader, buf, split_at(body + trailing, cuts)) == body
    assert _done(reader)
    assert buf == trailing


def test_encode_chunk() -> None:
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n"
    assert encode_chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert LAST_CHUNK == b"0\r\n\r\n"
    with pytest.raises(LocalProtocolError, match="empty chunk"):
        encode_chunk(b"")


def test_reason_phrases_are_the_rfc_9110_ones() -> None:
    """The one table of reason phrases (relay answers, ASGI responses, load-test backend) has
    every status the standard library's HTTPStatus knows, with its phrase or RFC 9110's new
    name, and falls back to the default given."""
    from http import HTTPStatus

    from tunnel2._http11 import _REASONS, reason_phrase

    # RFC 9110 renamed these; Python before 3.13 still says e.g. "Request Entity Too Large".
    renamed = {
        413: b"Content Too Large",
        414: b"URI Too Long",
        416: b"Range Not Satisfiable",
        422: b"Unprocessable Content",
    }
    assert set(_REASONS) == {int(status) for status in HTTPStatus}
    for status, phrase in _REASONS.items():
        expected = renamed.get(status) or HTTPStatus(status).phrase.encode()
        assert phrase == expected
        assert reason_phrase(status) == phrase
    assert reason_phrase(299) == b"Error"
    assert reason_phrase(299, b"Unknown") == b"Unknown"


def test_plain_response_is_the_one_builder_of_tunnel2s_own_answers() -> None:
    """The relay's error answers and the TLS port's answers to plain HTTP, byte for byte."""
    from tunnel2._http11 import plain_response

    body = b"503 Service Unavailable: full\n"
    error = (
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\nConnection: close\r\nX-Tunnel2-Error: 1\r\n\r\n" % len(body)
    )
    headers = b"Retry-After: 1\r\n"
    assert plain_response(503, "full", close=True, headers=headers) == error + body
    assert plain_response(503, "full", close=True, headers=headers, head=True) == error
    assert plain_response(404, "none") == (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 20\r\nX-Tunnel2-Error: 1\r\n\r\n404 Not Found: none\n"
    )
    redirect = plain_response(
        308, "use https://a/", close=True, headers=b"Location: https://a/\r\n", error=False
    )
    assert redirect == (
        b"HTTP/1.1 308 Permanent Redirect\r\nLocation: https://a/\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 15\r\nConnection: close\r\n\r\n"
        b"use https://a/\n"
    )
