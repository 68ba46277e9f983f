"""In-process ASGI: the agent's stream handler that calls an ASGI 3 application.

Layer: beside the agent, above uplink. May import trio, wsproto, errors, backend's head
helpers and the internal HTTP/1.1 parser.

:class:`AsgiHandler` serves the ``http`` and ``websocket`` scopes and runs the ``lifespan``
protocol while it is entered (``async with handler:``; :func:`tunnel2.open_tunnel` and the
memory tunnels enter it before the agent connects, so startup is over before anyone learns
the URL). The ASGI protocol itself always runs on trio, in the agent's worker task; only the
app's own code may run elsewhere, on an asyncio loop (:class:`_AsyncioBridge`): each
``receive()``/``send()`` the app awaits there is one call into trio and one answer back, so
there is one implementation of the protocol whichever loop runs the app.

Invariants: every task the handler starts lives in its nursery (the lifespan) or in the
worker that called it (one request); a loop the handler owns lives in one thread that is
started when it is entered and joined when it is left.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import math
import threading
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from types import TracebackType
from typing import Any, Final, Literal, Self, final

import trio
import wsproto
import wsproto.events as ws_events
from wsproto.connection import ConnectionState
from wsproto.utilities import RemoteProtocolError as WsRemoteProtocolError

from tunnel2 import _http11 as http
from tunnel2.backend import _response_head_for_tunnel
from tunnel2.errors import AppStartupError, ErrorCode, LocalProtocolError, StreamReset

TYPE_CHECKING = False
if TYPE_CHECKING:
    from tunnel2.uplink import TunnelStream

__all__ = ["AsgiApp", "AsgiHandler", "AsgiLoop"]

logger = logging.getLogger("tunnel2.agent")

AsgiScope = MutableMapping[str, Any]
AsgiMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[AsgiMessage]]
Send = Callable[[AsgiMessage], Awaitable[None]]
AsgiApp = Callable[[AsgiScope, Receive, Send], Awaitable[None]]
#: Where an app's code runs: ``"asyncio"`` (a loop the handler owns, in a thread),
#: ``"trio"`` (the agent's own tasks), or a running asyncio loop of another thread.
AsgiLoop = Literal["asyncio", "trio"] | asyncio.AbstractEventLoop

_ASGI: Final = {"version": "3.0", "spec_version": "2.4"}
#: Seconds an app's code gets to end once cancelled on asyncio, and a lifespan to shut down.
SHUTDOWN_TIMEOUT: Final = 10.0
#: Seconds a visitor gets to answer the app's WebSocket close before the stream ends.
WEBSOCKET_CLOSE_TIMEOUT: Final = 5.0
#: Largest WebSocket message delivered to an app (as uvicorn's default); bigger: close 1009.
MAX_WEBSOCKET_MESSAGE: Final = 16 * 1024 * 1024


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


def _public_server(host: bytes | None, secure: bool) -> tuple[str, int] | None:
    """The ASGI ``server``: the public host and port from the relay's ``X-Forwarded-Host``
    (host-shaped, PROTOCOL.md §4.2), the scheme's default port if it names none."""
    if not host:
        return None
    text = host.decode("ascii", "replace")
    port = ""
    if text.startswith("["):
        name, _, rest = text[1:].partition("]")
        port = rest[1:]
    else:
        name, _, port = text.partition(":")
    if port and not (port.isdigit() and len(port) <= 5):
        return None
    return name, int(port) if port else (443 if secure else 80)


def _is_websocket(request: http.RequestHead) -> bool:
    upgrade = request.get(b"upgrade")
    return (
        request.method == b"GET"
        and upgrade is not None
        and b"websocket" in (t.strip().lower() for t in upgrade.split(b","))
        and b"upgrade" in http.connection_tokens(request)
    )


@final
class AsgiHandler:
    """Answers streams by calling an ASGI 3 application in-process.

    Serves the ``http`` and ``websocket`` scopes (with the ``websocket.http.response``
    denial extension), and the ``lifespan`` protocol while entered. Enter it before the
    agent serves (``async with handler:``): that runs the app's startup (and starts the
    loop it owns), and leaving runs its shutdown. An app that raises on the lifespan scope
    before receiving anything (or returns) does not support it; it then just serves.

    Args:
        app: the ASGI 3 application.
        loop: where the app's code runs. ``"asyncio"`` (the default): an asyncio loop the
            handler owns in a thread, so code that needs asyncio (``asyncio.sleep``,
            asyncio-only client libraries) works, as in every ASGI server; anyio code works
            too. ``"trio"``: in the agent's own trio tasks, the cheapest path, for apps
            written for trio (or anyio). An :class:`asyncio.AbstractEventLoop`: that loop,
            which must be running in another thread (:func:`tunnel2.aio.open_tunnel`
            passes the caller's own).
        shutdown_timeout: seconds the lifespan shutdown (and an app's code cancelled on
            asyncio) may take before it is abandoned with a warning.
    """

    def __init__(
        self,
        app: AsgiApp,
        *,
        loop: AsgiLoop = "asyncio",
        shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    ) -> None:
        if not (loop in ("asyncio", "trio") or isinstance(loop, asyncio.AbstractEventLoop)):
            raise ValueError(f"ASGI loop {loop!r} must be 'asyncio', 'trio' or an asyncio loop")
        self.app = app
        self.loop = loop
        self.shutdown_timeout = shutdown_timeout
        #: The lifespan state: what startup stored, copied into every request's scope.
        self.state: dict[str, Any] = {}
        self._bridge: _AsyncioBridge | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._entered = False

    def __repr__(self) -> str:
        loop = self.loop if isinstance(self.loop, str) else "caller's asyncio"
        return f"<AsgiHandler {self.app!r} on {loop}>"

    async def __aenter__(self) -> Self:
        """Start the app's loop (if the handler owns one) and run the lifespan startup.

        Raises:
            AppStartupError: the app's startup failed (its message is in ``.message``).
            RuntimeError: entered twice.
        """
        if self._entered:
            raise RuntimeError(f"{self!r} was already entered")
        self._entered = True
        async with contextlib.AsyncExitStack() as stack:
            loop = self.loop
            if loop == "asyncio":
                loop = await stack.enter_async_context(_owned_asyncio_loop())
            if isinstance(loop, asyncio.AbstractEventLoop):
                self._bridge = _AsyncioBridge(loop, self.shutdown_timeout)
            nursery = await stack.enter_async_context(trio.open_nursery())
            lifespan = _Lifespan(self.state)
            nursery.start_soon(lifespan.run, self._call)
            try:
                await lifespan.started.wait()
            except BaseException:  # cancelled during startup: stop the app's lifespan
                lifespan.cancel_scope.cancel()
                raise
            if lifespan.error is None:
                stack.push_async_callback(self._shut_down, lifespan)
                self._stack = stack.pop_all()
            else:
                lifespan.cancel_scope.cancel()
        if lifespan.error is not None:  # raised out here, not from inside the nursery
            raise AppStartupError(lifespan.error) from lifespan.exception
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Run the lifespan shutdown (also when cancelled: shielded, within
        ``shutdown_timeout``), then stop the loop the handler owns."""
        stack, self._stack = self._stack, None
        try:
            if stack is not None:
                await stack.__aexit__(exc_type, exc, tb)
        finally:
            self._bridge = None  # its loop is gone

    async def _shut_down(self, lifespan: _Lifespan) -> None:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.shutdown_timeout) as waited:
                await lifespan.shut_down()
            if waited.cancelled_caught:
                logger.warning(
                    "the ASGI app's lifespan shutdown took over %ss; abandoned",
                    self.shutdown_timeout,
                )
        lifespan.cancel_scope.cancel()

    async def _call(
        self,
        scope: AsgiScope,
        receive: Receive,
        send: Send,
        receive_nowait: Callable[[], AsgiMessage | None] | None = None,
    ) -> None:
        if self._bridge is None:
            await self.app(scope, receive, send)
        else:
            first = receive_nowait() if receive_nowait is not None else None
            await self._bridge.run(self.app, scope, receive, send, first)

    async def __call__(self, stream: TunnelStream) -> int | None:
        """Answer one stream with the app; return the status it sent (101 for an
        accepted WebSocket).

        Raises:
            RuntimeError: the handler runs its app on asyncio but was not entered.
        """
        if self.loop != "trio" and self._bridge is None:
            raise RuntimeError(f"{self!r} must be entered (async with) before it serves")
        head = stream.head
        assert head is not None
        request = http.parse_request_head(head)
        path, _, query = request.target.partition(b"?")
        websocket = _is_websocket(request)
        secure = request.get(b"x-forwarded-proto") == b"https"
        scheme = ("wss" if secure else "ws") if websocket else ("https" if secure else "http")
        scope: AsgiScope = {
            "type": "websocket" if websocket else "http",
            "asgi": dict(_ASGI),
            "http_version": request.http_version.decode(),
            "scheme": scheme,
            "path": urllib.parse.unquote(path.decode("latin-1")),
            "raw_path": path,
            "query_string": query,
            "root_path": (request.get(b"x-forwarded-prefix") or b"").decode("latin-1"),
            "headers": [(n.lower(), v) for n, v in request.headers],
            "client": _forwarded_client(request.get(b"forwarded")),
            "server": _public_server(request.get(b"x-forwarded-host"), secure),
            "state": self.state.copy(),
        }
        if websocket:
            return await self._websocket(stream, head, scope)
        scope["method"] = request.method.decode()
        framing, _length = http.request_framing(request)
        exchange = _AsgiExchange(stream, framing is http.NONE, request.method == b"HEAD")
        try:
            await self._call(scope, exchange.receive, exchange.send, exchange.receive_nowait)
        except Exception:
            if exchange.head_sent or stream.local_ended:
                raise
            logger.exception("ASGI app failed on stream %d", stream.id)
            return await exchange.answer_plain(500, "the application raised an exception")
        if not exchange.head_sent and not stream.local_ended:
            raise RuntimeError("the ASGI app returned without sending a response")
        if not stream.local_ended:
            await stream.send_data(b"", end=True)
        return exchange.status

    async def _websocket(self, stream: TunnelStream, head: bytes, scope: AsgiScope) -> int:
        denial = _AsgiExchange(stream, True, False)
        ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        try:
            ws.receive_data(head)
            event = next(ws.events())
        except (WsRemoteProtocolError, StopIteration) as exc:
            return await denial.answer_plain(400, f"invalid WebSocket handshake ({exc})")
        assert isinstance(event, ws_events.Request)
        scope["subprotocols"] = event.subprotocols
        scope["extensions"] = {"websocket.http.response": {}}
        exchange = _WebSocketExchange(stream, ws, denial)
        try:
            await self._call(scope, exchange.receive, exchange.send)
        except Exception:
            if exchange.accepted:
                logger.exception("ASGI app failed on WebSocket stream %d", stream.id)
                await exchange.finish(1011, "the application raised an exception")
                return 101
            if denial.head_sent or stream.local_ended:
                raise
            logger.exception("ASGI app failed on stream %d", stream.id)
            return await denial.answer_plain(500, "the application raised an exception")
        if exchange.accepted:
            await exchange.finish(1000, "")
            return 101
        if denial.head_sent:
            if not stream.local_ended:
                await stream.send_data(b"", end=True)
            return denial.status
        # As if it had closed before accepting (an app that serves no WebSockets).
        return await denial.answer_plain(403, "the application did not accept the WebSocket")


def _send_response_head(stream: TunnelStream, head: bytes, method: bytes) -> int:
    """Send an app's response head (checked like a backend's) as the stream's OPEN;
    return its status.

    Raises:
        RemoteProtocolError: the head is invalid (an app's bad header fails loudly).
        StreamReset: it does not fit one OPEN frame; the stream was reset (the relay
            answers 502).
    """
    response = http.parse_response_head(head)
    framing, _length = http.response_framing(response, method)
    try:
        stream.send_head(_response_head_for_tunnel(response, framing, stream.head)[0])
    except LocalProtocolError as exc:  # it does not fit one OPEN frame
        kind = "the application's response head is too large for the tunnel"
        logger.warning("stream %d: %s (%s)", stream.id, kind, exc)
        stream.reset(ErrorCode.BACKEND_UNAVAILABLE, kind)
        raise StreamReset(
            stream_id=stream.id, code=ErrorCode.BACKEND_UNAVAILABLE, reason=kind
        ) from None
    return response.status


class _AsgiExchange:
    """One HTTP response from an app (``http`` scope, or a WebSocket's denial)."""

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

    async def answer_plain(self, status: int, what: str) -> int:
        """Answer ``status`` with a plain-text body saying ``what`` went wrong (before any
        head was sent: a start the app recorded is dropped)."""
        self._start = None
        body = f"{status} {http.reason_phrase(status).decode()}: {what}\n".encode()
        start = {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        }
        await self.send(start)
        await self.send({"type": "http.response.body", "body": body})
        return status

    def receive_nowait(self) -> AsgiMessage | None:
        """The next message if it needs no waiting (the one of a request with no body)."""
        if self.body_done and not self.request_delivered:
            self.request_delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return None

    async def receive(self) -> AsgiMessage:
        if not self.body_done:
            data = await self.stream.receive_data()
            self.body_done = self.request_delivered = not data
            return {"type": "http.request", "body": data, "more_body": bool(data)}
        message = self.receive_nowait()  # a request with no body still gets one message
        if message is not None:
            await trio.lowlevel.checkpoint()
            return message
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
            status = int(self._start["status"])
            headers = [(bytes(n), bytes(v)) for n, v in self._start.get("headers", [])]
            has_length = any(n.lower() == b"content-length" for n, _ in headers)
            if not has_length and not more:
                headers.append((b"Content-Length", b"%d" % len(body)))
            elif not has_length:
                headers.append((b"Transfer-Encoding", b"chunked"))
            head = b"".join(
                [b"HTTP/1.1 %d %s\r\n" % (status, http.reason_phrase(status, b""))]
                + [b"%s: %s\r\n" % (n, v) for n, v in headers]
                + [b"\r\n"]
            )
            method = b"HEAD" if self.head_request else b"GET"
            self.status = _send_response_head(self.stream, head, method)
            self.head_sent = True
        await self.stream.send_data(b"" if self.head_request else body, end=not more)


class _WebSocketClosed(OSError):
    """``send()`` on a WebSocket that is closed (ASGI 2.4: an ``OSError``; Starlette turns it
    into ``WebSocketDisconnect``)."""


class _WebSocketExchange:
    """One WebSocket between a visitor and an app, wsproto as the server's state machine
    over the stream's raw bytes (PROTOCOL.md §4.4). Writes are serialised by a lock, so
    frames from concurrent sends and automatic pongs never interleave."""

    def __init__(self, stream: TunnelStream, ws: wsproto.WSConnection, denial: _AsgiExchange):
        self.stream = stream
        self.ws = ws
        self.denial = denial
        self.accepted = False
        self.connect_delivered = False
        self.closed_sent = False  # we sent a close frame
        self.disconnect: AsgiMessage | None = None  # set once the visitor's side is closed
        self._messages: collections.deque[AsgiMessage] = collections.deque()
        self._parts: list[Any] = []  # the fragments of a message (all str or all bytes)
        self._size = 0
        self._write_lock = trio.Lock()

    async def receive(self) -> AsgiMessage:
        if not self.connect_delivered:
            self.connect_delivered = True
            await trio.lowlevel.checkpoint()
            return {"type": "websocket.connect"}
        if not self.accepted:
            await trio.sleep(math.inf)  # nothing arrives before the app answers the handshake
        while not self._messages:
            if self.disconnect is not None:
                await trio.lowlevel.checkpoint()
                return self.disconnect
            await self._read()
        return self._messages.popleft()

    async def _read(self) -> None:
        data = await self.stream.receive_data()
        self.ws.receive_data(data or None)  # None: the visitor's side reached EOF
        for event in self.ws.events():
            if isinstance(event, ws_events.Message):
                await self._on_message(event)
            elif isinstance(event, ws_events.Ping):
                await self._write(event.response())
            elif isinstance(event, ws_events.CloseConnection):
                await self._on_close(event)

    async def _on_message(self, event: ws_events.Message[Any]) -> None:
        if self.disconnect is not None:
            return
        self._parts.append(event.data)
        self._size += len(event.data)
        if self._size > MAX_WEBSOCKET_MESSAGE:
            await self._close(1009, f"message over {MAX_WEBSOCKET_MESSAGE} bytes")
            self.disconnect = {"type": "websocket.disconnect", "code": 1009, "reason": ""}
            return
        if event.message_finished:
            parts, self._parts, self._size = self._parts, [], 0
            message: AsgiMessage = {"type": "websocket.receive"}
            if isinstance(event, ws_events.TextMessage):
                message["text"] = "".join(parts)
            else:
                message["bytes"] = b"".join(parts)
            self._messages.append(message)

    async def _on_close(self, event: ws_events.CloseConnection) -> None:
        if self.disconnect is None:
            reason = event.reason or ""
            self.disconnect = {"type": "websocket.disconnect", "code": event.code, "reason": reason}
        if self.ws.state is ConnectionState.REMOTE_CLOSING:
            await self._write(event.response())  # the close handshake's answer
        self.closed_sent = True
        # The stream ends in finish(), once the app has returned: ending it now would let
        # the relay close the visitor's connection and reset the stream, cancelling an app
        # (on the asyncio thread, a crossing behind) before it heard websocket.disconnect.

    async def _write(self, event: ws_events.Event) -> None:
        async with self._write_lock:
            data = self.ws.send(event)
            if data and not self.stream.local_ended:
                await self.stream.send_data(data)

    async def _close(self, code: int, reason: str) -> None:
        if not self.closed_sent and self.ws.state is ConnectionState.OPEN:
            self.closed_sent = True
            await self._write(ws_events.CloseConnection(code=code, reason=reason or None))

    async def send(self, message: AsgiMessage) -> None:
        kind = message["type"]
        if kind.startswith("websocket.http.response."):
            if self.accepted:
                raise RuntimeError(f"{kind} after websocket.accept")
            await self.denial.send({**message, "type": kind[len("websocket.") :]})
        elif self.denial.head_sent or self.denial._start is not None:
            raise RuntimeError(f"{kind} after websocket.http.response.start")
        elif kind == "websocket.accept":
            if self.accepted:
                raise RuntimeError("websocket.accept sent twice")
            accept = ws_events.AcceptConnection(
                subprotocol=message.get("subprotocol"),
                extra_headers=[(bytes(n), bytes(v)) for n, v in message.get("headers", [])],
            )
            _send_response_head(self.stream, self.ws.send(accept), b"GET")
            self.accepted = True
            await trio.lowlevel.checkpoint()
        elif kind == "websocket.close" and not self.accepted:
            # ASGI: closing before accepting refuses the handshake with 403.
            await self.denial.answer_plain(403, "the application refused the WebSocket")
        elif not self.accepted:
            raise RuntimeError(f"{kind} before websocket.accept")
        elif self.closed_sent or self.disconnect is not None:
            raise _WebSocketClosed(f"{kind}: the WebSocket is closed")
        elif kind == "websocket.send":
            text, data = message.get("text"), message.get("bytes")
            if text is not None:
                await self._write(ws_events.TextMessage(data=text))
            elif data is not None:
                await self._write(ws_events.BytesMessage(data=bytes(data)))
            else:
                raise RuntimeError("websocket.send with neither text nor bytes")
        elif kind == "websocket.close":
            await self._close(int(message.get("code", 1000)), message.get("reason") or "")
        else:
            raise RuntimeError(f"unsupported ASGI message {kind!r}")

    async def finish(self, code: int, reason: str) -> None:
        """After the app: close (if it did not), wait for the visitor's answer (at most
        ``WEBSOCKET_CLOSE_TIMEOUT``), and end the stream."""
        await self._close(code, reason)
        with trio.move_on_after(WEBSOCKET_CLOSE_TIMEOUT):
            while self.disconnect is None:
                await self._read()
        if not self.stream.local_ended:
            self.stream.send_end()


class _Lifespan:
    """The ``lifespan`` scope's messages (ASGI lifespan spec 2.0) and what they decided."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.scope: AsgiScope = {"type": "lifespan", "asgi": dict(_ASGI), "state": state}
        self.started = trio.Event()  # startup is over (complete, failed, or unsupported)
        self.error: str | None = None  # startup failed with this message
        self.exception: BaseException | None = None
        self.startup_sent = False
        self.complete = False
        self.cancel_scope = trio.CancelScope(shield=True)
        self._shutdown = trio.Event()
        self._shut_down = trio.Event()

    async def run(self, call: Callable[[AsgiScope, Receive, Send], Awaitable[None]]) -> None:
        """Call the app with the lifespan scope. Shielded: a cancelled tunnel still shuts
        the app down; ``cancel_scope`` is cancelled once that is over (or abandoned)."""
        try:
            with self.cancel_scope:
                await call(self.scope, self.receive, self.send)
        except Exception as exc:
            # ASGI: an app that raises on the lifespan scope does not support it, and the
            # server carries on (as uvicorn's "auto"); a startup that fails says so with
            # lifespan.startup.failed (Starlette and FastAPI send it for what startup raised).
            if self.error is not None:
                self.exception = exc
            elif not self.started.is_set():
                logger.info("the ASGI app raised on the lifespan scope (%r): serving without", exc)
            else:
                logger.error("the ASGI app's lifespan failed", exc_info=True)
        finally:
            self.started.set()
            self._shut_down.set()

    async def receive(self) -> AsgiMessage:
        if not self.startup_sent:
            self.startup_sent = True
            await trio.lowlevel.checkpoint()
            return {"type": "lifespan.startup"}
        await self._shutdown.wait()
        return {"type": "lifespan.shutdown"}

    async def send(self, message: AsgiMessage) -> None:
        kind = message["type"]
        await trio.lowlevel.checkpoint()
        if kind == "lifespan.startup.complete":
            self.complete = True
            self.started.set()
        elif kind == "lifespan.startup.failed":
            self.error = str(message.get("message", "")) or "lifespan.startup.failed"
            self.started.set()
        elif kind == "lifespan.shutdown.complete":
            self._shut_down.set()
        elif kind == "lifespan.shutdown.failed":
            logger.error("the ASGI app's shutdown failed: %s", message.get("message", ""))
            self._shut_down.set()
        else:
            raise RuntimeError(f"unsupported ASGI message {kind!r} in the lifespan scope")

    async def shut_down(self) -> None:
        """Send ``lifespan.shutdown`` (if startup completed) and wait for the answer."""
        if self.complete:
            self._shutdown.set()
            await self._shut_down.wait()
        else:
            await trio.lowlevel.checkpoint()


# Messages the trio side only records until the next one (so they need no crossing alone).
_RECORDED_ONLY: Final = frozenset({"http.response.start", "websocket.http.response.start"})

# The body messages whose last one (no ``more_body``) is sent without waiting for it.
_BODIES: Final = frozenset({"http.response.body", "websocket.http.response.body"})

_Call = tuple[Callable[..., Awaitable[Any]], tuple[Any, ...], "asyncio.Future[Any]"]


@final
class _AsyncioBridge:
    """Runs an app's coroutine on an asyncio loop in another thread while the ASGI
    protocol stays on trio.

    ``run()`` submits the coroutine with :func:`asyncio.run_coroutine_threadsafe`; each
    ``receive()``/``send()`` the app awaits there is handed to trio with
    ``TrioToken.run_sync_soon``, run as a task in ``run()``'s own nursery, and its result
    handed back with ``loop.call_soon_threadsafe``. A cancelled ``run()`` (the stream was
    reset, the tunnel closes) cancels the asyncio task and waits for it, shielded, at most
    ``timeout`` seconds.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout

    async def run(
        self,
        app: AsgiApp,
        scope: AsgiScope,
        receive: Receive,
        send: Send,
        first: AsgiMessage | None = None,
    ) -> None:
        """``await app(scope, receive, send)`` with the app on the loop; what it raised is
        raised here.

        Crossings are saved where the protocol allows (they are most of the bridge's cost):
        ``first``, if given, is what the app's first ``receive()`` returns (taken already);
        a ``*.response.start``, which the trio side only records, is held on the asyncio
        side and sent with the next message; and the last body message of a response is
        not waited for (as an ASGI server's buffered write: the app returns at once, and
        ``run()`` waits for that send and raises what it raised).
        """
        loop = self.loop
        token = trio.lowlevel.current_trio_token()
        finished = trio.Event()
        nursery: trio.Nursery | None = None  # the app's calls; cancelled once it returned
        sending: trio.Nursery | None = None  # final sends, which run() waits for
        errors: list[Exception] = []

        def post(call: _Call) -> None:  # on trio's thread
            if nursery is None:  # run() is over: the app is being cancelled
                _call_soon(loop, _cancel, call[2])
            else:
                nursery.start_soon(self._serve_call, call)

        def post_final(messages: list[AsgiMessage]) -> None:  # on trio's thread
            if sending is not None:
                sending.start_soon(send_final, messages)

        async def call(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:  # on asyncio
            future = loop.create_future()
            token.run_sync_soon(post, (fn, args, future))
            return await future

        prefetched = [first] if first is not None else []
        held: list[AsgiMessage] = []

        async def asyncio_receive() -> AsgiMessage:
            if prefetched:
                await asyncio.sleep(0)
                return prefetched.pop()
            message: AsgiMessage = await call(receive)
            return message

        async def send_in_order(messages: list[AsgiMessage]) -> None:  # on trio
            for message in messages:
                await send(message)

        async def send_final(messages: list[AsgiMessage]) -> None:  # on trio
            try:
                await send_in_order(messages)
            except Exception as exc:
                errors.append(exc)

        async def asyncio_send(message: AsgiMessage) -> None:
            kind = message["type"]
            if kind in _RECORDED_ONLY and not held:
                held.append(message)
                await asyncio.sleep(0)
                return
            messages = [held.pop(), message] if held else [message]
            if kind in _BODIES and not message.get("more_body", False):
                token.run_sync_soon(post_final, messages)
                await asyncio.sleep(0)
            else:
                await call(send_in_order, messages)

        async def main() -> None:
            await app(scope, asyncio_receive, asyncio_send)

        future = asyncio.run_coroutine_threadsafe(main(), loop)
        future.add_done_callback(lambda _: _run_sync_soon(token, finished.set))
        try:
            async with trio.open_nursery() as sending:
                try:
                    async with trio.open_nursery() as nursery:
                        try:
                            await finished.wait()
                        except trio.Cancelled:
                            future.cancel()
                            with trio.CancelScope(shield=True):
                                with trio.move_on_after(self.timeout) as waited:
                                    await finished.wait()
                            if waited.cancelled_caught:
                                logger.warning(
                                    "the ASGI app ignored its cancellation for %ss", self.timeout
                                )
                            raise
                        nursery.cancel_scope.cancel()  # calls the app left behind
                finally:
                    # Closed now: a call a task the app left running posts while the final
                    # sends go out is cancelled, not started in a closed nursery (which
                    # would raise in trio's run_sync_soon callback and stop the run).
                    nursery = None
        finally:
            nursery = sending = None
        if not future.cancelled():
            future.result()
        if errors:
            raise errors[0]

    async def _serve_call(self, call: _Call) -> None:
        fn, args, future = call
        loop = self.loop
        try:
            result = await fn(*args)
        except trio.Cancelled:
            _call_soon(loop, _cancel, future)
            raise
        except Exception as exc:  # the app gets it, as it would on trio
            _call_soon(loop, _fail, future, exc)
        else:
            _call_soon(loop, _resolve, future, result)


def _run_sync_soon(token: trio.lowlevel.TrioToken, fn: Callable[[], object]) -> None:
    with contextlib.suppress(trio.RunFinishedError):
        token.run_sync_soon(fn)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop was closed: nobody waits any more
        loop.call_soon_threadsafe(fn, *args)


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _cancel(future: asyncio.Future[Any]) -> None:
    future.cancel()


@contextlib.asynccontextmanager
async def _owned_asyncio_loop() -> AsyncIterator[asyncio.AbstractEventLoop]:
    """An asyncio loop running in a thread of its own for the duration of the block.

    The thread runs ``asyncio.run``, so leaving the block ends the loop as a program's
    main would (tasks the app left are cancelled, async generators and the default
    executor shut down) and joins the thread, within ``SHUTDOWN_TIMEOUT``.
    """
    token = trio.lowlevel.current_trio_token()
    ready = trio.Event()
    ended = trio.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        box["loop"] = asyncio.get_running_loop()
        box["stop"] = stop = asyncio.Event()
        _run_sync_soon(token, ready.set)
        await stop.wait()

    def thread_main() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # pragma: no cover - asyncio.run itself failed
            box["error"] = exc
        finally:
            _run_sync_soon(token, ready.set)
            _run_sync_soon(token, ended.set)

    thread = threading.Thread(target=thread_main, name="tunnel2-asgi-asyncio", daemon=True)
    thread.start()
    try:
        with trio.CancelScope(shield=True):  # the thread sets it at once
            await ready.wait()
        if "loop" not in box:  # pragma: no cover - asyncio.run itself failed
            raise RuntimeError("the ASGI app's asyncio loop did not start") from box.get("error")
        yield box["loop"]
    finally:
        with trio.CancelScope(shield=True):
            if "stop" in box:
                _call_soon(box["loop"], box["stop"].set)
            with trio.move_on_after(SHUTDOWN_TIMEOUT):
                await ended.wait()
            if ended.is_set():
                await trio.to_thread.run_sync(thread.join)
            else:
                logger.warning("the ASGI app's asyncio loop did not stop in %ss", SHUTDOWN_TIMEOUT)
