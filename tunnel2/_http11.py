"""A fast, strict, sans-IO HTTP/1.1 head parser and body framing for the data path.

Layer: bottom, next to :mod:`tunnel2.frames`. May import the standard library, attrs and
:mod:`tunnel2.errors`; no trio, no sockets, no clock, no logging. The entry parses every client
request with it, the agent every backend response, the load generator every response it gets.

h11 costs about three times as much per message (DESIGN.md, "Performance model"), so this
module does the same checks with a few precompiled regexes over the whole head instead of
per-line Python work, and keeps the hot path free of validating constructors.

Invariants:

* Anything h11 refuses, this module refuses (``tests/test_http11.py`` proves it with h11 as the
  oracle). It is stricter than h11 in a short documented list, because the entry forwards raw
  bytes to backends whose parsers we do not know (request smuggling): bare-LF line endings,
  obs-fold continuation lines, HTTP versions other than 1.0 and 1.1 (505), both Content-Length
  and Transfer-Encoding in one message, Transfer-Encoding in an HTTP/1.0 message,
  comma-separated Content-Length values (``5, 5``), Content-Length values over 2**63-1 or
  longer than 19 digits, a ``Connection`` header naming more than
  :data:`MAX_CONNECTION_TOKENS` tokens, and chunk-size lines with whitespace before the CRLF
  or more than 16 hex digits.
* It is looser than h11 in one place only: a *response* may carry transfer codings other than a
  lone ``chunked`` (RFC 9112 §6.3: final coding chunked means chunked, otherwise the body runs
  until close). Requests accept ``Transfer-Encoding: chunked`` only (501 otherwise).
* Every error is a :class:`~tunnel2.errors.RemoteProtocolError` whose ``status_hint`` is the
  status an entry should answer with: 400 malformed, 431 head too large, 501 unsupported
  transfer coding, 505 unsupported HTTP version.
* A head returned by :func:`parse_request_head` / :func:`parse_response_head` has already had
  its framing headers checked, so :func:`request_framing` / :func:`response_framing` cannot fail
  on it.
* Body readers consume only their own message's bytes from the front of the buffer; a
  pipelined next message stays in the buffer untouched. Once a reader has raised it stays failed.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from typing import Final, final

from tunnel2.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "CHUNKED",
    "LAST_CHUNK",
    "LENGTH",
    "MAX_CONNECTION_TOKENS",
    "MAX_CONTENT_LENGTH",
    "MAX_HEAD_SIZE",
    "NONE",
    "UNTIL_CLOSE",
    "BodyReader",
    "Framing",
    "RequestHead",
    "ResponseHead",
    "connection_tokens",
    "drop_fields",
    "encode_chunk",
    "field_lines_re",
    "field_names_re",
    "find_head_end",
    "make_body_reader",
    "parse_request_head",
    "parse_response_head",
    "plain_response",
    "reason_phrase",
    "request_framing",
    "response_framing",
]

MAX_HEAD_SIZE: Final = 65536
# The largest body length a message may declare: what a signed 64-bit length holds, as most
# servers store it. Longer digit strings are refused before any int() on them.
MAX_CONTENT_LENGTH: Final = 2**63 - 1
# Tokens (comma-separated items) all Connection fields of one message may carry together.
# Real clients send one or two; the names are cut out of the forwarded head (RFC 9110 §7.6.1).
MAX_CONNECTION_TOKENS: Final = 32
LAST_CHUNK: Final = b"0\r\n\r\n"
# The one table of reason phrases (RFC 9110 §15, with the other registered codes) for the
# answers tunnel2 writes itself: the relay's error answers, the ASGI handler's responses and the
# load-test backend's. Where RFC 9110 renamed a code (413, 414, 416, 422) it has the new name.
_REASONS: Final = {
    100: b"Continue", 101: b"Switching Protocols", 102: b"Processing", 103: b"Early Hints",
    200: b"OK", 201: b"Created", 202: b"Accepted", 203: b"Non-Authoritative Information",
    204: b"No Content", 205: b"Reset Content", 206: b"Partial Content", 207: b"Multi-Status",
    208: b"Already Reported", 226: b"IM Used",
    300: b"Multiple Choices", 301: b"Moved Permanently", 302: b"Found", 303: b"See Other",
    304: b"Not Modified", 305: b"Use Proxy", 307: b"Temporary Redirect",
    308: b"Permanent Redirect",
    400: b"Bad Request", 401: b"Unauthorized", 402: b"Payment Required", 403: b"Forbidden",
    404: b"Not Found", 405: b"Method Not Allowed", 406: b"Not Acceptable",
    407: b"Proxy Authentication Required", 408: b"Request Timeout", 409: b"Conflict",
    410: b"Gone", 411: b"Length Required", 412: b"Precondition Failed",
    413: b"Content Too Large", 414: b"URI Too Long", 415: b"Unsupported Media Type",
    416: b"Range Not Satisfiable", 417: b"Expectation Failed", 418: b"I'm a Teapot",
    421: b"Misdirected Request", 422: b"Unprocessable Content", 423: b"Locked",
    424: b"Failed Dependency", 425: b"Too Early", 426: b"Upgrade Required",
    428: b"Precondition Required", 429: b"Too Many Requests",
    431: b"Request Header Fields Too Large", 451: b"Unavailable For Legal Reasons",
    500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
    506: b"Variant Also Negotiates", 507: b"Insufficient Storage", 508: b"Loop Detected",
    510: b"Not Extended", 511: b"Network Authentication Required",
}  # fmt: skip


def reason_phrase(status: int, default: bytes = b"Error") -> bytes:
    """The reason phrase of ``status`` (``default`` for a status not in the table)."""
    return _REASONS.get(status, default)


def plain_response(
    status: int,
    message: str,
    *,
    close: bool = False,
    headers: bytes = b"",
    head: bool = False,
    error: bool = True,
) -> bytes:
    """A complete plain-text response that tunnel2 writes itself (the relay's error answers,
    the TLS port's answer to plain HTTP).

    Args:
        status: the status code; its phrase comes from the one table (:func:`reason_phrase`).
        message: what went wrong, said in the body.
        close: add ``Connection: close``.
        headers: extra field lines, each ending in CRLF (they come first).
        head: the answer to a HEAD request: the body is left out and Content-Length still
            says its size (RFC 9110 §9.3.2).
        error: an error answer: the body starts with the status and its phrase, and
            ``X-Tunnel2-Error: 1`` marks it as the relay's own. ``False`` (a redirect): the
            body is ``message`` alone, unmarked.
    """
    reason = _REASONS.get(status, b"Error")
    text = f"{status} {reason.decode()}: {message}" if error else message
    body = f"{text}\n".encode()
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            headers,
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"Connection: close\r\n" if close else b"",
            b"X-Tunnel2-Error: 1\r\n\r\n" if error else b"\r\n",
            b"" if head else body,
        ]
    )


# --- grammar (RFC 9110 §5.6.2, RFC 9112 §3-§5; the same classes as h11's _abnf.py) -----------

# In the start-line and whole-head regexes (the parsers' hot path) every run of one byte class
# is possessive (``++``, ``*+``: the same language, as the byte that ends each run is outside
# its class) and every class costs sre one test for an ordinary byte: a run that keeps its
# backtracking state, or a class written as a negation, costs sre more per byte.
_TOKEN: Final = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]++"
# h11's field-content: no NUL and no whitespace except single runs of SP/HTAB *inside* the value
# (h11 lets other control bytes through because real cookies carry them). In a bytes pattern \s
# is exactly [ \t\n\r\f\v].
_FIELD_CONTENT: Final = rb"[^\x00\s]++(?:[ \t]++[^\x00\s]++)*+"
# Possessive quantifiers (Python 3.11) keep a failing match linear: without them a value of
# 60000 spaces and a NUL costs O(n**2) steps.
_FIELD: Final = rb"(" + _TOKEN + rb"):[ \t]*+(" + _FIELD_CONTENT + rb")?[ \t]*+"
_FIELD_LINE: Final = _FIELD + rb"\r\n"

_REQUEST_LINE_RE: Final = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]++) HTTP/([0-9]\.[0-9])\r\n")
# Any byte but NUL, LF, VT, FF and CR, the common range first: sre tests a class's ranges in
# the order written, and a negated class (``[^\x00\n\r\x0b\x0c]``, the same bytes) costs it
# four tests a byte where this costs one (-3,000 instructions on nginx's 175-byte answer head
# with the runs made possessive and the reason an alternation, a 3,000-call loop).
_VALUE_BYTE: Final = rb"[\x0e-\xff\x01-\x09]"
_STATUS_LINE_RE: Final = re.compile(
    # reason-phrase = *( HTAB / SP / VCHAR / obs-text ), less NUL and \v\f as h11 does; h11
    # also accepts a status line without the space and reason, as many servers send one
    # (the empty branch: cheaper in sre than an optional group).
    rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: (" + _VALUE_BYTE + rb"*+)|)\r\n"
)
# The whole header section in one C-level pass.
# Validation only, so the same language without the groups: around and between the
# field-content's runs only SP/HTAB may come, so a value is any run of bytes other than NUL, CR,
# LF, VT and FF (a third fewer steps than _FIELD_LINE per line; tests/test_http11.py checks the
# two agree).
_FIELD_LINES: Final = rb"(?:" + _TOKEN + rb":" + _VALUE_BYTE + rb"*+\r\n)*+"
_FIELD_BLOCK_RE: Final = re.compile(_FIELD_LINES)
# A whole valid head in one C call: the start line, the field block and the blank line (the
# parsers' fast path; anything it refuses goes through the step-by-step checks, which say
# what is wrong). The same language as the start-line regex, then _FIELD_BLOCK_RE, then CRLF.
_REQUEST_HEAD_RE: Final = re.compile(_REQUEST_LINE_RE.pattern + _FIELD_LINES + rb"\r\n")
_RESPONSE_HEAD_RE: Final = re.compile(_STATUS_LINE_RE.pattern + _FIELD_LINES + rb"\r\n")
# The fields the parsers look at, found in the lower-cased head in one pass (findall): each
# match starts at a line's LF, and no value holds an LF, so each is one field line's name.
_REQUEST_NAMES_RE: Final = re.compile(rb"\n(host|connection|content-length|transfer-encoding):")
_HOST_ONLY: Final = [b"host"]
# Responses: the value too (leading whitespace cut; trailing whitespace sends a Content-Length
# to the general checks).
_RESPONSE_FIELDS_RE: Final = re.compile(
    rb"\n(connection|content-length|transfer-encoding):[ \t]*+([^\r]*+)"
)
_FIELD_LINE_RE: Final = re.compile(_FIELD_LINE)
_TOKEN_RE: Final = re.compile(_TOKEN)
_TARGET_RE: Final = re.compile(rb"[\x21-\x7e]++")
_FIELD_VALUE_RE: Final = re.compile(rb"[ \t]*+(?:" + _FIELD_CONTENT + rb")?[ \t]*+")
_VERSION_RE: Final = re.compile(rb"HTTP/[0-9]\.[0-9]")
_CONTENT_LENGTH_RE: Final = re.compile(rb"[0-9]{1,19}")
# chunk-size [ chunk-ext ] CRLF (RFC 9112 §7.1). Extensions are ignored but may not carry
# control bytes. Stricter than h11, which allows whitespace before the CRLF and 20 digits: the
# entry forwards chunked bodies as they came, and a backend must not frame them differently.
# 16 hex digits is 2**64.
_CHUNK_LINE_RE: Final = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[\t\x20-\x7e\x80-\xff]*+)?+")
_TRAILER_LINE_RE: Final = re.compile(_FIELD)

# The first blank line of a buffer: CRLF CRLF (preceded by CR) or a bare-LF one.
_BLANK_LINE_RE: Final = re.compile(rb"\n\r?\n")

_SUPPORTED_VERSIONS: Final = (b"1.1", b"1.0")
_SHOW: Final = 64  # bytes of offending input quoted in an error message


def _show(data: bytes | bytearray) -> str:
    if len(data) > _SHOW:
        return f"{bytes(data[:_SHOW])!r}..."
    return repr(bytes(data))


def _bad(message: str, status_hint: int = 400) -> RemoteProtocolError:
    return RemoteProtocolError(message, status_hint=status_hint)


# --- heads ------------------------------------------------------------------------------------


def find_head_end(buf: bytes | bytearray, start: int = 0) -> int:
    """Find the end of a message head.

    Args:
        buf: the bytes received so far.
        start: where to start looking. To avoid rescanning a growing buffer, pass
            ``max(0, previous_len - 3)``.

    Returns:
        The index just past the first ``b"\\r\\n\\r\\n"`` at or after ``start``, or -1 if
        there is none yet. The caller enforces the size limit while the result is -1.

    Raises:
        RemoteProtocolError: (400) the head ends with a bare-LF blank line (``\\n\\n`` or
            ``\\n\\r\\n``), which h11 would accept and we do not; raising here answers such a
            client at once instead of waiting for the size limit.
    """
    # One regex search for the first blank line (CRLF CRLF, or a bare-LF one): the common
    # head costs one C call instead of three finds.
    match = _BLANK_LINE_RE.search(buf, start)
    if match is None:
        return -1
    lf = match.start()
    if buf[lf + 1] == 0x0D and lf and buf[lf - 1] == 0x0D:  # CR LF CR LF
        if lf > start:
            return lf + 3
        return _find_head_end(buf, start)  # a CRLF CRLF that began before `start`
    raise _bad("bare LF line endings are not accepted")


def _find_head_end(buf: bytes | bytearray, start: int) -> int:
    end = buf.find(b"\r\n\r\n", start)
    stop = len(buf) if end < 0 else end + 2
    if buf.find(b"\n\n", start, stop) >= 0:
        raise _bad("bare LF line endings are not accepted")
    lf = buf.find(b"\n\r\n", start, stop)
    while lf >= 0:
        # Preceded by CR, this is a CRLF CRLF that began before `start` (only at `start`).
        if lf == 0 or buf[lf - 1] != 0x0D:
            raise _bad("bare LF line endings are not accepted")
        lf = buf.find(b"\n\r\n", lf + 1, stop)
    return -1 if end < 0 else end + 4


def _get(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _get_all(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


# The ``\nname:`` search keys of the names the data path asks for (two concatenations spared
# per lookup); other names are built at the call.
_KEYS: Final = {
    name: b"\n" + name + b":"
    for name in (
        b"host",
        b"connection",
        b"content-length",
        b"transfer-encoding",
        b"expect",
        b"upgrade",
        b"authorization",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
    )
}
_NO_TOKENS: Final[frozenset[bytes]] = frozenset()
# The Connection values nearly every response carries, tokenised once: a dict read instead of
# a split, a strip per token and a frozenset (~3,300 instructions a head).
_COMMON_TOKENS: Final[dict[bytes, frozenset[bytes]]] = {
    value: frozenset([value]) for value in (b"keep-alive", b"close", b"upgrade")
}
# Status codes by their three digits (the parser's regex guarantees three).
_STATUS_CODES: Final = {b"%03d" % code: code for code in range(1000)}


class _Head:
    """What request and response heads share: headers and their lookups."""

    __slots__ = ("_framing", "_headers", "_lower", "_raw", "_start", "_tokens", "http_version")

    http_version: bytes
    _framing: tuple[Framing, int] | None
    _headers: list[tuple[bytes, bytes]] | None
    # Set by the parsers: the whole head as received and lower-cased (the two are aligned
    # byte for byte), and where its field lines start (the index of the LF ending the start
    # line). A lookup is then a substring search in C (no LF comes before ``_start``, and
    # every field line starts after an LF), and the (name, value) list is only built if
    # someone asks for it.
    _raw: bytes | None
    _lower: bytes | None
    _start: int
    # The Connection tokens, once known (the parsers set them when there is no such field).
    _tokens: frozenset[bytes] | None

    def _set_fields(self, headers: list[tuple[bytes, bytes]]) -> None:
        self._headers = headers
        self._raw = self._lower = None
        self._start = 0
        self._framing = self._tokens = None

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """``(name, value)`` pairs in order, repeats kept; names exactly as received, values
        with leading and trailing whitespace stripped."""
        if self._headers is None:
            assert self._raw is not None
            self._headers = _FIELD_LINE_RE.findall(self._raw, self._start + 1)
        return self._headers

    def get(self, name: bytes) -> bytes | None:
        """Return the first value of header ``name`` (given in lower case), or ``None``."""
        lower = self._lower
        if lower is None:
            return _get(self.headers, name)
        key = _KEYS.get(name) or b"\n" + name + b":"
        index = lower.find(key)
        if index < 0:
            return None
        raw = self._raw
        assert raw is not None
        index += len(key)
        return raw[index : raw.find(b"\r\n", index)].strip(b" \t")

    def get_all(self, name: bytes) -> list[bytes]:
        """Return every value of header ``name`` (given in lower case), in order."""
        lower = self._lower
        if lower is None:
            return _get_all(self.headers, name)
        key = _KEYS.get(name) or b"\n" + name + b":"
        values = []
        index = lower.find(key)
        while index >= 0:
            values.append(self._value_at(index + len(key)))
            index = lower.find(key, index + len(key))
        return values

    def has_field_matching(self, names: re.Pattern[bytes]) -> bool:
        """Whether a field's lower-cased name matches ``names``: a constant pattern of the
        form ``\\n(?:a|b):``, searched in the lower-cased head in one C call (its field
        lines start after ``\\n``)."""
        lower = self._lower
        if lower is None:
            return any(names.match(b"\n" + n.lower() + b":") for n, _ in self.headers)
        return names.search(lower) is not None

    def fields_without(self, names: re.Pattern[bytes]) -> bytes:
        """The field lines as received (each ending in CRLF), less those whose lower-cased
        name ``names`` (a :func:`field_names_re`) matches.

        The names are found in the lower-cased head and the lines cut from the head as
        received (aligned byte for byte): a head without such a line costs one C search.
        """
        raw, lower = self._raw, self._lower
        if raw is None or lower is None:  # built by hand, not parsed
            return b"".join(
                b"%s: %s\r\n" % (n, v)
                for n, v in self.headers
                if names.match(b"\n" + n.lower() + b":") is None
            )
        # A match runs from a line's leading LF to its CR: cutting it leaves the lines around
        # it whole; the block runs from the start line's LF (dropped) to the blank line.
        pos = self._start
        match = names.search(lower, pos)
        if match is None:
            return raw[pos + 1 : -2]
        cut = match.end()
        after = names.search(lower, cut)
        if after is None:  # one such line (a backend's Connection): no list, one copy less
            first = match.start()
            if first == pos:  # the first field line: what follows it, less its LF
                return raw[cut + 1 : -2]
            return raw[pos + 1 : first] + raw[cut:-2]
        parts = []
        while match is not None:
            parts.append(raw[pos : match.start()])
            pos = match.end()
            match = names.search(lower, pos)
        parts.append(raw[pos:-2])
        return b"".join(parts)[1:]

    def _value_at(self, start: int) -> bytes:
        raw = self._raw
        assert raw is not None
        return raw[start : raw.find(b"\r\n", start)].strip(b" \t")

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry another exchange after this one (RFC 9112
        §9.3). A response body framed by closing the connection ends it anyway."""
        tokens = self._tokens
        if tokens is None:
            tokens = connection_tokens(self)
        if b"close" in tokens:
            return False
        # RFC 9112 §9.3: HTTP/1.1 persists by default, HTTP/1.0 only when asked to.
        return self.http_version == b"1.1" or b"keep-alive" in tokens


@final
class RequestHead(_Head):
    """A parsed request head.

    Attributes:
        method: the method, e.g. ``b"GET"``.
        target: the request-target as sent, e.g. ``b"/a?b=c"``.
        http_version: ``b"1.1"`` or ``b"1.0"``.
        headers: ``(name, value)`` pairs in order, repeats kept; names exactly as received,
            values with leading and trailing whitespace stripped.
    """

    __slots__ = ("method", "target")

    method: bytes
    target: bytes

    def __init__(
        self,
        method: bytes,
        target: bytes,
        http_version: bytes,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        self.method = method
        self.target = target
        self.http_version = http_version
        self._set_fields(headers)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RequestHead):
            return NotImplemented
        return (self.method, self.target, self.http_version, self.headers) == (
            other.method,
            other.target,
            other.http_version,
            other.headers,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, like h11's events

    def __repr__(self) -> str:
        return (
            f"RequestHead(method={self.method!r}, target={self.target!r}, "
            f"http_version={self.http_version!r}, headers={self.headers!r})"
        )


@final
class ResponseHead(_Head):
    """A parsed response head.

    Attributes:
        http_version: ``b"1.1"`` or ``b"1.0"``.
        status: the status code, 100 to 999.
        reason: the reason phrase (may be empty).
        headers: as in :class:`RequestHead`.
    """

    __slots__ = ("reason", "status")

    status: int
    reason: bytes

    def __init__(
        self,
        http_version: bytes,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        self.http_version = http_version
        self.status = status
        self.reason = reason
        self._set_fields(headers)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ResponseHead):
            return NotImplemented
        return (self.http_version, self.status, self.reason, self.headers) == (
            other.http_version,
            other.status,
            other.reason,
            other.headers,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, like h11's events

    def __repr__(self) -> str:
        return (
            f"ResponseHead(http_version={self.http_version!r}, status={self.status!r}, "
            f"reason={self.reason!r}, headers={self.headers!r})"
        )


def _check_size(head: bytes, max_size: int, what: str) -> None:
    if len(head) > max_size:
        raise _bad(f"{what} head is {len(head)} bytes, limit {max_size}", 431)
    if not head.endswith(b"\r\n\r\n"):
        raise _bad(f"{what} head does not end with CRLF CRLF")


def _check_fields(block: bytes) -> None:
    """Validate the field lines ``block`` (each ending in CRLF)."""
    if block and _FIELD_BLOCK_RE.fullmatch(block) is None:
        raise _diagnose_fields(block)


def _diagnose_fields(block: bytes) -> RemoteProtocolError:
    """Raise the most specific error for a header block the fast regex refused."""
    for line in block[:-2].split(b"\r\n"):
        if b"\n" in line:
            return _bad("bare LF line endings are not accepted")
        if b"\r" in line:
            return _bad(f"bare CR in header line {_show(line)}")
        if not line:
            return _bad("empty line inside head")
        if line[:1] in (b" ", b"\t"):
            # RFC 9112 §5.2 lets a server refuse obs-fold; h11 unfolds it.
            return _bad(f"obs-fold continuation lines are not accepted: {_show(line)}")
        name, colon, value = line.partition(b":")
        if not colon:
            return _bad(f"header line without colon: {_show(line)}")
        if name[-1:] in (b" ", b"\t"):
            return _bad(f"whitespace before colon in header line {_show(line)}")
        if _TOKEN_RE.fullmatch(name) is None:
            return _bad(f"invalid header name {_show(name)}")
        if _FIELD_VALUE_RE.fullmatch(value) is None:
            return _bad(f"invalid value for header {_show(name)}: {_show(value)}")
    return _bad(f"invalid header block {_show(block)}")  # pragma: no cover - defensive


def _version_error(line: bytes) -> RemoteProtocolError:
    return _bad(f"unsupported HTTP version in {_show(line)}; only 1.0 and 1.1", 505)


def _check_version(version: bytes, line: bytes) -> None:
    if version not in _SUPPORTED_VERSIONS:
        raise _version_error(line)


# Parsed heads come from their class's ``__new__`` with the constructor's arguments. In
# Python that is ``object.__new__``, which ignores them and skips ``__init__`` (a Python call
# per head); in a compiled build (mypyc) it runs ``__init__`` with them. Either way the
# parser then sets every slot. ``_NO_FIELDS`` is never mutated: ``_headers`` is set back to
# None, the field list being built only if someone asks for it.
_NO_FIELDS: Final[list[tuple[bytes, bytes]]] = []


def parse_request_head(head: bytes, *, max_size: int = MAX_HEAD_SIZE) -> RequestHead:
    """Parse and validate a request head, including its framing headers.

    Args:
        head: the whole head including the final ``b"\\r\\n\\r\\n"``, as delimited by
            :func:`find_head_end`.
        max_size: the largest head accepted.

    Returns:
        The head; :func:`request_framing` on it cannot fail.

    Raises:
        RemoteProtocolError: 400 for malformed input (including a missing or repeated Host in
            HTTP/1.1, and the smuggling-shaped framing headers listed in the module docstring),
            431 for a head over ``max_size``, 501 for a Transfer-Encoding other than chunked,
            505 for an HTTP version other than 1.0 and 1.1.
    """
    # The hot path is inlined (a few C calls per head: one regex for the whole head, one
    # lower(), one findall for the fields that matter); a head it refuses goes through the
    # step-by-step checks, which raise the specific error.
    if len(head) > max_size:
        raise _bad(f"request head is {len(head)} bytes, limit {max_size}", 431)
    match = _REQUEST_HEAD_RE.fullmatch(head)
    if match is None:
        raise _request_head_error(head)
    method, target, version = match.groups()
    if version != b"1.1" and version != b"1.0":
        raise _version_error(head[: len(method) + len(target) + 10])
    request = RequestHead.__new__(RequestHead, method, target, version, _NO_FIELDS)  # type: ignore[call-arg]
    request.method = method
    request.target = target
    request.http_version = version
    request._headers = None
    request._raw = head
    request._lower = lower = head.lower()
    # METHOD SP target SP HTTP/x.y CR LF: the index of that LF.
    request._start = start = len(method) + len(target) + 11
    names = _REQUEST_NAMES_RE.findall(lower, start)
    if names == _HOST_ONLY:  # the common request: one Host, no Connection, no body
        request._framing = _NO_BODY
        request._tokens = _NO_TOKENS
        return request
    request._framing = request._tokens = None
    # RFC 9112 §3.2: 400 for an HTTP/1.1 request without Host and for any with several.
    hosts = names.count(b"host")
    if hosts != 1 and (hosts > 1 or version == b"1.1"):
        raise _bad("missing Host header" if hosts == 0 else f"{hosts} Host headers, at most 1")
    if b"connection" in names:
        # Tokens are at most the head's commas plus its Connection fields: a C-level count
        # spares almost every message the exact check.
        if lower.count(b",", start) + names.count(b"connection") > MAX_CONNECTION_TOKENS:
            connection_tokens(request)  # raises: too many
    else:
        request._tokens = _NO_TOKENS
    if b"content-length" in names or b"transfer-encoding" in names:
        request._framing = _request_framing(request)
    else:
        request._framing = _NO_BODY
    return request


def _request_head_error(head: bytes) -> RemoteProtocolError:
    """The error for a request head the whole-head regex refused, found step by step."""
    _check_size(head, len(head), "request")
    match = _REQUEST_LINE_RE.match(head)
    if match is None:
        return _diagnose_request_line(head[: head.find(b"\r\n")])
    _check_version(match[3], head[: match.end() - 2])
    _check_fields(head[match.end() : -2])
    return _bad("invalid request head")  # pragma: no cover - defensive


def _diagnose_request_line(line: bytes) -> RemoteProtocolError:
    """Return the most specific error for a request line the fast regex refused."""
    if b"\n" in line:
        return _bad("bare LF line endings are not accepted")
    parts = line.split(b" ")
    if len(parts) != 3:
        return _bad(f"invalid request line {_show(line)}")
    method, target, version = parts
    if _TOKEN_RE.fullmatch(method) is None:
        return _bad(f"invalid method {_show(method)}")
    if _TARGET_RE.fullmatch(target) is None:
        return _bad(f"invalid request target {_show(target)}")
    if _VERSION_RE.fullmatch(version) is None:
        return _bad(f"invalid HTTP version {_show(version)}")
    return _bad(f"invalid request line {_show(line)}")  # pragma: no cover - defensive


def parse_response_head(head: bytes, *, max_size: int = MAX_HEAD_SIZE) -> ResponseHead:
    """Parse and validate a response head, including its framing headers.

    Args:
        head: the whole head including the final ``b"\\r\\n\\r\\n"``.
        max_size: the largest head accepted.

    Returns:
        The head; :func:`response_framing` on it cannot fail.

    Raises:
        RemoteProtocolError: 400 for malformed input, 431 for a head over ``max_size``, 505
            for an HTTP version other than 1.0 and 1.1. The agent, not this module, turns
            these into a 502 for its client.
    """
    # Inlined as parse_request_head is; the framing fields come with their values from one
    # findall, so the common Content-Length answer needs no lookup.
    if len(head) > max_size:
        raise _bad(f"response head is {len(head)} bytes, limit {max_size}", 431)
    match = _RESPONSE_HEAD_RE.fullmatch(head)
    if match is None:
        raise _response_head_error(head)
    version, status, reason = match.groups()
    # HTTP/x.y SP 3DIGIT [SP reason] CR LF: the index of that LF.
    start = 13 if reason is None else 14 + len(reason)
    if version != b"1.1" and version != b"1.0":
        raise _version_error(head[: start - 1])
    code = _STATUS_CODES[status]  # three digits: a dict read, not int() (~600 instructions)
    if code < 100:
        raise _bad(f"invalid status code {code}, must be 100 to 999")
    response = ResponseHead.__new__(ResponseHead, version, code, reason or b"", _NO_FIELDS)  # type: ignore[call-arg]
    response.http_version = version
    response.status = code
    response.reason = reason or b""
    response._headers = None
    response._raw = head
    response._lower = lower = head.lower()
    response._start = start
    response._framing = response._tokens = None
    length: bytes | None = None
    connection: list[bytes] = []
    general = False  # repeats, Transfer-Encoding, odd values: the general checks decide
    for name, value in _RESPONSE_FIELDS_RE.findall(lower, start):
        if name == b"connection":
            connection.append(value)
        elif name == b"content-length" and length is None:
            length = value
        else:
            general = True
    if connection:
        value = connection[0] if len(connection) == 1 else b",".join(connection)
        tokens = _COMMON_TOKENS.get(value)
        if tokens is None:
            if value.count(b",") >= MAX_CONNECTION_TOKENS:
                connection_tokens(response)  # raises: too many
            tokens = frozenset([token.strip() for token in value.split(b",")])
        response._tokens = tokens
    else:
        response._tokens = _NO_TOKENS
    if general:
        response._framing = _response_header_framing(response)
    elif length is None:
        response._framing = _UNTIL_CLOSE
    elif length.isdigit() and len(length) < 20 and (size := int(length)) <= MAX_CONTENT_LENGTH:
        response._framing = (LENGTH, size)
    else:
        response._framing = _response_header_framing(response)  # the general checks
    return response


def _response_head_error(head: bytes) -> RemoteProtocolError:
    """The error for a response head the whole-head regex refused, found step by step."""
    _check_size(head, len(head), "response")
    match = _STATUS_LINE_RE.match(head)
    if match is None:
        line = head[: head.find(b"\r\n")]
        if b"\n" in line:
            return _bad("bare LF line endings are not accepted")
        if _VERSION_RE.match(line) is None:
            return _bad(f"invalid HTTP version in status line {_show(line)}")
        return _bad(f"invalid status line {_show(line)}")
    _check_version(match[1], head[: match.end() - 2])
    code = int(match[2])
    if code < 100:
        return _bad(f"invalid status code {code}, must be 100 to 999")
    _check_fields(head[match.end() : -2])
    return _bad("invalid response head")  # pragma: no cover - defensive


# --- changing heads at the byte level ------------------------------------------------------

# RFC 9110 §7.6.1: fields that describe one connection, never forwarded as they are.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Connection-header tokens that are options rather than names of hop-by-hop fields.
CONNECTION_OPTIONS: Final = frozenset({b"close", b"keep-alive", b"upgrade", b""})


def field_names_re(names: Iterable[bytes]) -> re.Pattern[bytes]:
    """A regex for :meth:`RequestHead.fields_without` (and ``has_field_matching``): the
    lines of a parsed head named any of ``names`` (given in lower case).

    For constant name sets compiled once at import; names taken from a message go through
    :func:`drop_fields`, so no peer decides what gets compiled.
    """
    alternatives = b"|".join(re.escape(name) for name in sorted(names))
    return re.compile(rb"\n(?:" + alternatives + rb"):[^\n]*")


def field_lines_re(names: Iterable[bytes]) -> re.Pattern[bytes]:
    """A regex matching whole field lines (with their CRLF) named any of ``names``,
    case-insensitively; ``sub(b"", lines)`` cuts them out of validated field lines that were
    not parsed (a parsed head has the cheaper :meth:`RequestHead.fields_without`).

    For constant name sets compiled once at import; names taken from a message go through
    :func:`drop_fields`, so no peer decides what gets compiled.
    """
    alternatives = b"|".join(re.escape(name) for name in sorted(names))
    return re.compile(rb"(?im)^(?:" + alternatives + rb"):[^\r\n]*\r\n")


def connection_tokens(message: _Head) -> frozenset[bytes]:
    """The lower-cased tokens of every ``Connection`` field of ``message`` (computed once
    per head: the parsers know them already, or know there are none).

    Raises:
        RemoteProtocolError: (400) more than :data:`MAX_CONNECTION_TOKENS` of them; counted
            by their commas before any splitting. The parsers call this, so a parsed head
            never fails here.
    """
    tokens = message._tokens
    if tokens is not None:
        return tokens
    values = message.get_all(b"connection")
    if not values:
        message._tokens = _NO_TOKENS
        return _NO_TOKENS
    value = values[0] if len(values) == 1 else b",".join(values)
    count = value.count(b",") + 1
    if count > MAX_CONNECTION_TOKENS:
        raise _bad(f"Connection header names {count} tokens, at most {MAX_CONNECTION_TOKENS}")
    message._tokens = tokens = frozenset([token.strip() for token in value.lower().split(b",")])
    return tokens


def drop_fields(fields: bytes, names: set[bytes] | frozenset[bytes]) -> bytes:
    """Cut the field lines whose lower-cased name is in ``names`` out of ``fields``
    (validated field lines, each ending in CRLF). For the rare names a message's own
    ``Connection`` header marks hop-by-hop: a loop over lines, no regex built from them."""
    lines = fields.split(b"\r\n")
    kept = [line for line in lines[:-1] if line[: line.find(b":")].lower() not in names]
    return b"".join(line + b"\r\n" for line in kept)


# --- framing ------------------------------------------------------------------------------------


class Framing(enum.Enum):
    """How a message body is delimited (RFC 9112 §6.3)."""

    NONE = enum.auto()
    """No body."""
    LENGTH = enum.auto()
    """Exactly Content-Length bytes."""
    CHUNKED = enum.auto()
    """Transfer-Encoding: chunked."""
    UNTIL_CLOSE = enum.auto()
    """The body runs until the server closes the connection (responses only)."""


# The members as module constants, as ``re.IGNORECASE`` is ``re.RegexFlag.IGNORECASE``: on
# Python 3.11 a lookup like ``Framing.CHUNKED`` goes through EnumType.__getattr__ (a wrapper
# call, ~8 times a global read), so the code compares against these names.
NONE: Final = Framing.NONE
LENGTH: Final = Framing.LENGTH
CHUNKED: Final = Framing.CHUNKED
UNTIL_CLOSE: Final = Framing.UNTIL_CLOSE

_NO_BODY: Final = (NONE, 0)
_UNTIL_CLOSE: Final = (UNTIL_CLOSE, 0)
_CHUNKED: Final = (CHUNKED, 0)


def _content_length(message: _Head) -> int | None:
    # RFC 9112 §6.3 item 5: repeated values must agree. We accept repeats only as separate,
    # byte-identical fields; h11 also accepts "5, 5" in one field, which we refuse.
    found: bytes | None = None
    for value in message.get_all(b"content-length"):
        if _CONTENT_LENGTH_RE.fullmatch(value) is None:
            raise _bad(f"invalid Content-Length {_show(value)}, must be 1 to 19 digits")
        if found is None:
            found = value
        elif value != found:
            raise _bad(f"conflicting Content-Length values {found!r} and {value!r}")
    if found is None:
        return None
    length = int(found)  # at most 19 digits: no big-int work on hostile input
    if length > MAX_CONTENT_LENGTH:
        raise _bad(f"Content-Length {length} is over the limit of 2**63-1")
    return length


def _check_transfer_encoding(message: RequestHead | ResponseHead, length: int | None) -> None:
    # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means faulty framing; §6.3 item 3: with
    # Content-Length too it "ought to be handled as an error". h11 accepts both; an entry that
    # forwards raw bytes must not, or a backend may frame the body differently (smuggling).
    if message.http_version == b"1.0":
        raise _bad("Transfer-Encoding in an HTTP/1.0 message")
    if length is not None:
        raise _bad("both Content-Length and Transfer-Encoding")


def _request_framing(request: RequestHead) -> tuple[Framing, int]:
    length = _content_length(request)
    codings = request.get_all(b"transfer-encoding")
    if codings:
        _check_transfer_encoding(request, length)
        if len(codings) > 1:
            raise _bad(f"{len(codings)} Transfer-Encoding headers, only chunked supported", 501)
        if codings[0].lower() != b"chunked":
            raise _bad(f"unsupported Transfer-Encoding {_show(codings[0])}", 501)
        return _CHUNKED
    if length is None:
        return _NO_BODY
    return (LENGTH, length)


def _response_header_framing(response: ResponseHead) -> tuple[Framing, int]:
    length = _content_length(response)
    values = response.get_all(b"transfer-encoding")
    if values:
        _check_transfer_encoding(response, length)
        codings: list[bytes] = []
        for value in values:
            for item in value.lower().split(b","):
                coding = item.partition(b";")[0].strip()
                if _TOKEN_RE.fullmatch(coding) is None:
                    raise _bad(f"invalid Transfer-Encoding {_show(value)}")
                codings.append(coding)
        if codings[-1] != b"chunked":
            return _UNTIL_CLOSE  # RFC 9112 §6.3 item 4
        if b"chunked" in codings[:-1]:
            raise _bad("chunked transfer coding applied more than once")
        return _CHUNKED
    if length is None:
        return _UNTIL_CLOSE
    return (LENGTH, length)


def request_framing(head: RequestHead) -> tuple[Framing, int]:
    """Return how the body of a request is delimited (RFC 9112 §6.3).

    Returns:
        ``(CHUNKED, 0)``, ``(LENGTH, n)`` or, without either header,
        ``(NONE, 0)``.

    Raises:
        RemoteProtocolError: only for a head not made by :func:`parse_request_head`: 400 for
            bad or conflicting framing headers, 501 for a transfer coding other than chunked.
    """
    if head._framing is None:
        head._framing = _request_framing(head)
    return head._framing


def response_framing(head: ResponseHead, request_method: bytes) -> tuple[Framing, int]:
    """Return how the body of a response to ``request_method`` is delimited (RFC 9112 §6.3).

    Returns:
        ``(NONE, 0)`` for a HEAD request, 1xx, 204, 304 and a 2xx to CONNECT;
        otherwise ``CHUNKED`` if the final transfer coding is chunked, ``UNTIL_CLOSE`` for
        other transfer codings, ``(LENGTH, n)`` for Content-Length, else ``UNTIL_CLOSE``.

    Raises:
        RemoteProtocolError: (400) only for a head not made by :func:`parse_response_head`.
    """
    status = head.status
    if (
        status < 200
        or status == 204
        or status == 304
        or request_method == b"HEAD"
        or (request_method == b"CONNECT" and status < 300)
    ):
        return _NO_BODY
    if head._framing is None:
        head._framing = _response_header_framing(head)
    return head._framing


# --- bodies -------------------------------------------------------------------------------------


def take(buf: bytearray, count: int) -> bytes:
    """Remove and return the first ``count`` bytes of ``buf`` (``count <= len(buf)``)."""
    if count == len(buf):
        data = bytes(buf)
        buf.clear()
    else:
        data = bytes(buf[:count])
        del buf[:count]
    return data


class BodyReader:
    """Reads one message body from the front of a receive buffer.

    Made by :func:`make_body_reader`. Not thread-safe; once it has raised it stays failed.

    Attributes:
        done: whether the whole body has been read.
    """

    __slots__ = ("done",)

    done: bool

    def __init__(self) -> None:
        self.done = False

    def read(self, buf: bytearray) -> bytes:
        """Consume body bytes from the front of ``buf`` and return the content they carry.

        Args:
            buf: the receive buffer; the bytes read are deleted from it in place. Bytes after
                the end of the body (a pipelined next message) are left in it untouched.

        Returns:
            The decoded content available now, ``b""`` if none yet. Once :attr:`done` is
            true, always ``b""``.

        Raises:
            RemoteProtocolError: (400) the body is malformed.
        """
        raise NotImplementedError

    def feed_eof(self) -> None:
        """Tell the reader the connection closed.

        Raises:
            RemoteProtocolError: (400) the body was not complete; only a body framed by
                closing the connection ends here (and then :attr:`done` becomes true).
        """
        raise NotImplementedError


@final
class _LengthReader(BodyReader):
    __slots__ = ("_length", "_remaining")

    def __init__(self, length: int) -> None:
        self._length = length
        self._remaining = length
        self.done = length == 0

    def read(self, buf: bytearray) -> bytes:
        remaining = self._remaining
        if not remaining or not buf:
            return b""
        data = take(buf, min(remaining, len(buf)))
        self._remaining = remaining = remaining - len(data)
        self.done = not remaining
        return data

    def feed_eof(self) -> None:
        if not self.done:
            received = self._length - self._remaining
            raise _bad(f"connection closed before body ended ({received} of {self._length} bytes)")


@final
class _UntilCloseReader(BodyReader):
    __slots__ = ()

    def read(self, buf: bytearray) -> bytes:
        if self.done or not buf:
            return b""
        return take(buf, len(buf))

    def feed_eof(self) -> None:
        self.done = True


# Chunked reader states.
_SIZE: Final = 0
_DATA: Final = 1
_DATA_END: Final = 2
_TRAILER: Final = 3
_DONE: Final = 4


@final
class _ChunkedReader(BodyReader):
    __slots__ = (
        "_crlf_left",
        "_error",
        "_max_line",
        "_max_trailer",
        "_received",
        "_remaining",
        "_scanned",
        "_state",
        "_trailer_size",
    )

    def __init__(self, max_line: int, max_trailer: int) -> None:
        super().__init__()
        self._max_line = max_line
        self._max_trailer = max_trailer
        self._state = _SIZE
        self._remaining = 0  # data bytes left in the current chunk
        self._crlf_left = 0  # bytes of the CRLF after chunk data still to match
        self._scanned = 0  # bytes of buf already searched for the end of the current line
        self._trailer_size = 0
        self._received = 0
        self._error: RemoteProtocolError | None = None

    def _fail(self, message: str) -> RemoteProtocolError:
        self._error = _bad(message)
        return self._error

    def _line_end(self, buf: bytearray, used: int, limit: int, what: str) -> int:
        """Index of the CRLF ending the line at the front of ``buf``, or -1.

        Refuses the line once ``used`` plus its length exceeds ``limit``, without waiting for
        its end. Remembers how far it searched, so a line arriving a byte at a time costs
        O(n), not O(n**2).
        """
        end = buf.find(b"\r\n", max(0, self._scanned - 1))
        if end < 0:
            if used + len(buf) > limit + 1:  # + 1: the CR of a CRLF split after it
                raise self._fail(f"{what} is over {limit} bytes")
            self._scanned = len(buf)
            return -1
        self._scanned = 0
        if used + end > limit:
            raise self._fail(f"{what} is over {limit} bytes")
        return end

    def read(self, buf: bytearray) -> bytes:
        if self._error is not None:
            raise self._error
        out: list[bytes] = []
        while buf:
            state = self._state
            if state == _DATA:
                data = take(buf, min(self._remaining, len(buf)))
                out.append(data)
                self._received += len(data)
                self._remaining -= len(data)
                if self._remaining:
                    break
                self._state = _DATA_END
                self._crlf_left = 2
            elif state == _DATA_END:
                # Match b"\r\n" (or its tail after a split) at the front of buf.
                expected = b"\r\n"[2 - self._crlf_left :]
                count = min(len(expected), len(buf))
                if buf[:count] != expected[:count]:
                    got = bytes(buf[:2])
                    raise self._fail(f"chunk data not followed by CRLF (got {got!r})")
                del buf[:count]
                self._crlf_left -= count
                if not self._crlf_left:
                    self._state = _SIZE
            elif state == _SIZE:
                end = self._line_end(buf, 0, self._max_line, "chunk size line")
                if end < 0:
                    break
                match = _CHUNK_LINE_RE.fullmatch(buf, 0, end)
                if match is None:
                    raise self._fail(f"invalid chunk size line {_show(buf[:end])}")
                size = int(match[1], 16)
                del buf[: end + 2]
                if size:
                    self._state = _DATA
                    self._remaining = size
                else:
                    self._state = _TRAILER
            elif state == _TRAILER:
                end = self._line_end(buf, self._trailer_size, self._max_trailer, "trailer section")
                if end < 0:
                    break
                if end == 0:
                    del buf[:2]
                    self._state = _DONE
                    self.done = True
                    break
                if _TRAILER_LINE_RE.fullmatch(buf, 0, end) is None:
                    raise self._fail(f"invalid trailer line {_show(buf[:end])}")
                self._trailer_size += end + 2
                del buf[: end + 2]  # trailers are read and discarded
            else:  # _DONE
                break
        if len(out) == 1:
            return out[0]
        return b"".join(out)

    def feed_eof(self) -> None:
        if self._error is not None:
            raise self._error
        if not self.done:
            raise self._fail(
                f"connection closed before body ended ({self._received} bytes of chunk data)"
            )


def make_body_reader(
    framing: Framing,
    length: int,
    *,
    max_chunk_line: int = 4096,
    max_trailer_size: int = 8192,
) -> BodyReader:
    """Make the reader for a body framed as returned by :func:`request_framing` et al.

    Args:
        framing: the body's framing.
        length: the Content-Length for :data:`LENGTH`, else ignored.
        max_chunk_line: the longest chunk-size line accepted, extensions included.
        max_trailer_size: the largest trailer section accepted (trailers are discarded).

    Returns:
        A fresh :class:`BodyReader`; for :data:`NONE` it is already done.
    """
    if framing is LENGTH:
        return _LengthReader(length)
    if framing is CHUNKED:
        return _ChunkedReader(max_chunk_line, max_trailer_size)
    if framing is UNTIL_CLOSE:
        return _UntilCloseReader()
    return _LengthReader(0)


def encode_chunk(data: bytes) -> bytes:
    """Frame ``data`` as one chunk of a chunked body; end the body with :data:`LAST_CHUNK`.

    Raises:
        LocalProtocolError: ``data`` is empty (a zero-size chunk would end the body).
    """
    if not data:
        raise LocalProtocolError("cannot encode an empty chunk: it would end the body")
    return b"%x\r\n%b\r\n" % (len(data), data)
