"""In-process ASGI: the agent's stream handler that calls an ASGI 3 application.

Layer: beside the agent, above uplink. May import trio, errors and the internal HTTP/1.1
parser.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any, final

import trio

from tunnel2 import _http11 as http
from tunnel2.backend import _response_head_for_tunnel
from tunnel2.errors import ErrorCode, LocalProtocolError, StreamReset

TYPE_CHECKING = False
if TYPE_CHECKING:
    from tunnel2.uplink import TunnelStream

__all__ = ["AsgiApp", "AsgiHandler"]

logger = logging.getLogger("tunnel2.agent")

AsgiScope = MutableMapping[str, Any]
AsgiMessage = MutableMapping[str, Any]
AsgiApp = Callable[
    [AsgiScope, Callable[[], Awaitable[AsgiMessage]], Callable[[AsgiMessage], Awaitable[None]]],
    Awaitable[None],
]


def _forwarded_client(forwarded: bytes | None) -> tuple[str, int] | None:
    """The client address the relay determined, as an ASGI ``client``: from the first
    ``for=`` of the ``Forwarded`` field the relay writes (PROTOCOL.md §4.2), port 0 if
    unknown; ``None`` for ``for=unknown`` or no such field.

    The relay drops every visitor-supplied ``Forwarded`` line and writes exactly one whose
    first element is the client, so nothing a visitor sends can change this value (which
    is why X-Forwarded-For, which a trusted proxy's visitor can prefix, is not used).
    """
    if forwarded is None or forwarded[:4].lower() != b"for=":
        return None
    end = len(forwarded)
    for sep in (b";", b","):
        index = forwarded.find(sep)
        if 0 <= index < end:
            end = index
    node = forwarded[4:end].strip(b'"').decode("ascii", "replace")
    port = ""
    if node.startswith("["):
        node, _, rest = node[1:].partition("]")
        port = rest[1:]
    elif node.count(":") == 1:
        node, _, port = node.partition(":")
    try:
        ipaddress.ip_address(node)
    except ValueError:
        return None
    return node, int(port) if port.isdigit() and len(port) <= 5 else 0


@final
class AsgiHandler:
    """Answers streams by calling an ASGI 3 application in-process (HTTP scope only)."""

    def __init__(self, app: AsgiApp) -> None:
        self.app = app

    def __repr__(self) -> str:
        return f"<AsgiHandler {self.app!r}>"

    async def __call__(self, stream: TunnelStream) -> int | None:
        """Answer one request with the app; return the status it sent."""
        head = stream.head
        assert head is not None
        request = http.parse_request_head(head)
        framing, _length = http.request_framing(request)
        path, _, query = request.target.partition(b"?")
        scope: AsgiScope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version.decode(),
            "method": request.method.decode(),
            "scheme": (request.get(b"x-forwarded-proto") or b"http").decode(),
            "path": urllib.parse.unquote(path.decode("latin-1")),
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": [(n.lower(), v) for n, v in request.headers],
            "client": _forwarded_client(request.get(b"forwarded")),
            "server": None,
        }
        state = _AsgiExchange(stream, framing is http.Framing.NONE, request.method == b"HEAD")
        try:
            await self.app(scope, state.receive, state.send)
        except Exception:
            if state.head_sent or stream.local_ended:
                raise
            logger.exception("ASGI app failed on stream %d", stream.id)
            body = b"500 Internal Server Error: the application raised an exception\n"
            stream.send_head(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body)
            )
            await stream.send_data(body, end=True)
            return 500
        if not state.head_sent and not stream.local_ended:
            raise RuntimeError("the ASGI app returned without sending a response")
        if not stream.local_ended:
            await stream.send_data(b"", end=True)
        return state.status


class _AsgiExchange:
    def __init__(self, stream: TunnelStream, body_done: bool, head_request: bool) -> None:
        self.stream = stream
        self.body_done = body_done
        # A response to HEAD has no body (RFC 9110 §9.3.2); apps may send one anyway and
        # leave it to the server to drop, as uvicorn and hypercorn do (fuzz F3).
        self.head_request = head_request
        self.request_delivered = False
        self.head_sent = False
        self.status = 0  # the status sent, once head_sent
        self._start: AsgiMessage | None = None

    async def receive(self) -> AsgiMessage:
        if not self.body_done:
            data = await self.stream.receive_data()
            self.body_done = self.request_delivered = not data
            return {"type": "http.request", "body": data, "more_body": bool(data)}
        if not self.request_delivered:
            # A request with no body still gets one (empty) http.request message.
            self.request_delivered = True
            await trio.lowlevel.checkpoint()
            return {"type": "http.request", "body": b"", "more_body": False}
        # After the body: wait until the client goes away (the stream is reset).
        await trio.sleep(math.inf)
        raise AssertionError("unreachable")  # pragma: no cover

    async def send(self, message: AsgiMessage) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self._start is not None:
                raise RuntimeError("http.response.start sent twice")
            self._start = message
            await trio.lowlevel.checkpoint()
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unsupported ASGI message {kind!r}")
        if self._start is None:
            raise RuntimeError("http.response.body before http.response.start")
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if not self.head_sent:
            status = self.status = int(self._start["status"])
            headers = [(bytes(n), bytes(v)) for n, v in self._start.get("headers", [])]
            has_length = any(n.lower() == b"content-length" for n, _ in headers)
            if not has_length and not more:
                headers.append((b"Content-Length", b"%d" % len(body)))
                framing = http.Framing.LENGTH
            else:
                framing = http.Framing.LENGTH if has_length else http.Framing.CHUNKED
            try:
                reason = HTTPStatus(status).phrase.encode()
            except ValueError:
                reason = b""
            head = b"".join(
                [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
                + [b"%s: %s\r\n" % (n, v) for n, v in headers]
                + [b"\r\n"]
            )
            # Parsed like a backend's answer: an app's invalid header fails here, loudly.
            response = http.parse_response_head(head)
            stream = self.stream
            try:
                stream.send_head(_response_head_for_tunnel(response, head, framing, stream.head)[0])
            except LocalProtocolError as exc:  # it does not fit one OPEN frame
                kind = "the application's response head is too large for the tunnel"
                logger.warning("stream %d: %s (%s)", stream.id, kind, exc)
                stream.reset(ErrorCode.BACKEND_UNAVAILABLE, kind)  # the relay answers 502
                raise StreamReset(
                    stream_id=stream.id, code=ErrorCode.BACKEND_UNAVAILABLE, reason=kind
                ) from None
            self.head_sent = True
        await self.stream.send_data(b"" if self.head_request else body, end=not more)
